"""CIFAR models: sizes of the published architectures, batch norm, dtypes, the NNX path."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_cifar_synthetic  # noqa: E402,F401  (shares compiled programs across tests)

from examples.cifar import models  # noqa: E402

X = jnp.zeros((2, 32, 32, 3), jnp.float32)


def key(seed):
  # The trainer's init key kind (threefry compiles far slower on a CPU).
  return jax.random.key(seed, impl="rbg")


def normal(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def compiled(model):
  return jax.jit(model.apply, static_argnums=3)


# Published parameter counts (CIFAR-10 head): WRN-28-10 36.5M and WRN-16-4 2.7M
# (Zagoruyko & Komodakis), ResNet-20/32/56 0.27M/0.46M/0.85M (He et al., Table 6).
@pytest.mark.parametrize(
  "name,count",
  [
    ("wrn28_10", 36_479_194),
    ("wrn16_4", 2_748_890),
    ("resnet20", 269_722),
    ("resnet32", 464_154),
    ("resnet56", 853_018),
    ("preact_resnet18", 11_172_170),
    ("nnx_resnet20", 269_722),
  ],
)
def test_parameter_counts(name, count):
  model = models.create_model(name, 10)
  params, batch_stats = jax.eval_shape(model.init, jax.random.key(0), X)
  assert models.count_params(params) == count
  assert models.count_params(batch_stats) > 0
  # One BN layer has a mean and a var per channel: batch_stats equals BN scale+bias.
  bn_params = sum(
    int(np.prod(x.shape))
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if any(getattr(k, "key", None) in ("scale", "bias") for k in path[-1:])
    and "head" not in jax.tree_util.keystr(path)
  )
  assert models.count_params(batch_stats) == bn_params


def test_cifar100_head_and_bad_names():
  model = models.create_model("resnet32", 100)
  params, _ = jax.eval_shape(model.init, jax.random.key(0), X)
  assert params["head"]["kernel"].shape == (64, 100)
  assert models.count_params(params) == 464_154 + 64 * 90 + 90
  for bad in ("resnet21", "wrn27_10", "vgg11", "nnx_resnet9"):
    with pytest.raises(ValueError):
      m = models.create_model(bad, 10)
      m.init(jax.random.key(0), X)


@pytest.mark.parametrize("name", ["resnet2", "nnx_resnet2"])
def test_batch_norm_train_and_eval(name):
  model = models.create_model(name, 10, width=4)
  x = normal((8, 32, 32, 3)) * 2 + 1
  params, stats = jax.jit(model.init)(key(0), x)
  logits, new_stats = compiled(model)(params, stats, x, True, None)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  # Running mean after one step: 0.9 * 0 + 0.1 * batch mean of the stem output.
  stem = jax.lax.conv_general_dilated(
    x, params["stem"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(
    new_stats["bn_stem"]["mean"], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    new_stats["bn_stem"]["var"], 0.9 + 0.1 * stem.var((0, 1, 2)), rtol=1e-4
  )
  # Eval mode uses the running statistics and changes nothing.
  out, same = compiled(model)(params, new_stats, x, False, None)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, same, new_stats))
  # Train-mode outputs depend on the batch; eval-mode outputs do not.
  single, _ = compiled(model)(params, new_stats, x[:1], False, None)
  np.testing.assert_allclose(single[0], out[0], rtol=1e-5, atol=1e-5)
  single_train, _ = compiled(model)(params, stats, x[:2], True, None)
  assert not np.allclose(single_train[0], logits[0], atol=1e-4)


@pytest.mark.slow
def test_wide_resnet_dropout_uses_the_rng():
  model = models.create_model("wrn10_1", 10, dropout_rate=0.5)
  x = normal((2, 32, 32, 3))
  params, stats = jax.jit(model.init)(key(0), x)
  a, _ = compiled(model)(params, stats, x, True, key(1))
  b, _ = compiled(model)(params, stats, x, True, key(1))
  c, _ = compiled(model)(params, stats, x, True, key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  e1, _ = compiled(model)(params, stats, x, False, None)
  e2, _ = compiled(model)(params, stats, x, False, None)
  np.testing.assert_array_equal(e1, e2)


@pytest.mark.parametrize("name", ["wrn10_1", "resnet2", "nnx_resnet2"])
def test_bfloat16_compute_float32_params(name):
  model = models.create_model(name, 10, dtype=jnp.bfloat16)
  x = normal((2, 32, 32, 3))
  params, stats = jax.jit(model.init)(key(0), x)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, stats, x, True, None))(params))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
  logits, new_stats = compiled(model)(params, stats, x, True, None)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  ref, _ = compiled(models.create_model(name, 10))(params, stats, x, True, None)
  np.testing.assert_allclose(logits, ref, atol=0.25, rtol=0.1)  # bf16 round-off only


@pytest.mark.slow
def test_nnx_matches_linen_when_given_the_same_weights():
  linen = models.create_model("resnet8", 10, width=4)
  nnx_model = models.create_model("nnx_resnet8", 10, width=4)
  x = normal((4, 32, 32, 3))
  lp, ls = jax.jit(linen.init)(key(0), x)
  np_, ns = jax.jit(nnx_model.init)(key(0), x)
  # Map Linen's names onto the NNX module's.
  linen_blocks = [lp[f"stage{s}_block1"] for s in (1, 2, 3)]
  np_["stem"]["kernel"] = lp["stem"]["kernel"]
  np_["bn_stem"] = dict(lp["bn_stem"])
  np_["head"] = {"kernel": lp["head"]["kernel"], "bias": lp["head"]["bias"]}
  for i, block in enumerate(linen_blocks):
    for layer in ("conv1", "conv2"):
      np_["blocks"][i][layer]["kernel"] = block[layer]["kernel"]
    for layer in ("bn1", "bn2"):
      np_["blocks"][i][layer] = dict(block[layer])
  a, sa = compiled(linen)(lp, ls, x, True, None)
  b, sb = compiled(nnx_model)(np_, ns, x, True, None)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    sa["stage3_block1"]["bn2"]["var"], sb["blocks"][2]["bn2"]["var"], rtol=1e-5
  )
