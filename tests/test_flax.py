"""sam_step with Flax models: Linen + BatchNorm + dropout, NNX, bfloat16 (docs/contract.md §4, §6).

float16 loss scaling (pure JAX) is tests/test_loss_scale.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import sam_optax

RNG = np.random.default_rng(1)
X = jnp.asarray(RNG.normal(size=(32, 6)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 3, size=(32,)))


class Net(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16, dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(3, dtype=self.dtype, param_dtype=jnp.float32)(x)


def make_loss(model):
  def loss_fn(params, batch, batch_stats, dropout_key):
    x, y = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
    return loss, updates["batch_stats"]

  return loss_fn


def init(model):
  variables = model.init(jax.random.key(0), X, train=False)
  return variables["params"], variables["batch_stats"]


def test_linen_batchnorm_stats_from_clean_pass_and_same_dropout_key():
  model = Net()
  params, stats = init(model)
  loss_fn = make_loss(model)
  opt = sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.5, lambd=1.0)
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, donate=False)
  key = jax.random.key(7)
  new_params, _, metrics, new_stats = step(params, opt.init(params), (X, LABELS), stats, key)

  (loss, clean_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
    params, (X, LABELS), stats, key
  )
  norm = optax.tree.norm(g)
  e = jax.tree.map(lambda p, gi: p + 0.5 * gi / (norm + 1e-12), params, g)
  (loss_e, perturbed_stats), _ = jax.value_and_grad(loss_fn, has_aux=True)(
    e, (X, LABELS), stats, key
  )

  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(clean_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # the perturbed pass's statistics differ, and are discarded
  assert not all(
    np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(perturbed_stats))
  )
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  # same dropout key in both passes: f(e) matches a pass at e with that key, not another key
  assert float(metrics["perturbed_loss"]) == pytest.approx(float(loss_e), rel=1e-5)
  (loss_other, _), _ = jax.value_and_grad(loss_fn, has_aux=True)(
    e, (X, LABELS), stats, jax.random.key(8)
  )
  assert abs(float(loss_other) - float(loss_e)) > 1e-4


def test_linen_train_state_loop_learns():
  model = Net()
  params, stats = init(model)
  opt = sam_optax.sam_sps(rho=0.05, gamma_b=0.5, weight_decay=5e-4)

  class TrainState(train_state.TrainState):
    batch_stats: dict

  state = TrainState.create(apply_fn=model.apply, params=params, tx=opt, batch_stats=stats)
  step = sam_optax.sam_step(make_loss(model), opt, has_aux=True)

  @jax.jit
  def train_step(state, batch, key):
    params, opt_state, metrics, stats = step(
      state.params, state.opt_state, batch, state.batch_stats, key
    )
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, batch_stats=stats
    ), metrics

  losses = []
  for i in range(30):
    state, metrics = train_step(state, (X, LABELS), jax.random.key(i))
    losses.append(float(metrics["loss"]))
    assert 0.0 <= float(metrics["step_size"]) <= 0.5
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.3)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, dropout_key):
    # The dropout key is an explicit input, so both SAM passes can use the same one.
    h = self.drop(nnx.relu(self.bn(self.l1(x))), rngs=nnx.Rngs(dropout=dropout_key))
    return self.l2(h)


def test_nnx_functional_pattern():
  model = NnxNet(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch, rest, key):
    m = nnx.merge(graphdef, params, rest, copy=True)
    x, y = batch
    loss = optax.softmax_cross_entropy_with_integer_labels(m(x, key), y).mean()
    return loss, nnx.split(m, nnx.Param, ...)[2]  # BN statistics after the pass

  opt = sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, lambd="1-1/t")
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, donate=False)
  opt_state = opt.init(params)
  key = jax.random.key(3)
  (loss0, rest_clean), _ = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    params, (X, LABELS), rest, key
  )
  losses = []
  for i in range(20):
    params, opt_state, metrics, rest_next = step(
      params, opt_state, (X, LABELS), rest, jax.random.fold_in(key, i) if i else key
    )
    if not losses:  # BN statistics come from the clean pass
      for a, b in zip(jax.tree.leaves(rest_next), jax.tree.leaves(rest_clean)):
        np.testing.assert_array_equal(a, b)
    rest = rest_next
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(float(loss0), rel=1e-6)
  assert losses[-1] < 0.7 * losses[0]
  nnx.update(model, params, rest)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_nnx_optimizer_with_value_and_grad_fn():
  model = NnxNet(nnx.Rngs(0))
  opt = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05, lambd=1.0)
  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
  key = jax.random.key(0)

  def loss_of_model(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(X, key), LABELS).mean()

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params0, rest0 = jax.tree.map(jnp.array, (params, rest))  # split states alias the model: copy

  def loss_of_params(p):
    return loss_of_model(nnx.merge(graphdef, p, rest0, copy=True))

  grads = nnx.grad(loss_of_model)(model)  # clean pass (updates BN statistics in model)
  optimizer.update(model, grads, value_and_grad_fn=jax.value_and_grad(loss_of_params))
  ref, _, _ = sam_optax.sam_step(lambda p, b: loss_of_params(p), opt, donate=False)(
    params0, opt.init(params0), None
  )
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(ref)[0], jax.tree.leaves(params0)[0])


def test_bfloat16_compute_with_float32_params():
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = Net(dtype=dtype)
    params, stats = init(model)
    opt = sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, lambd="1-1/t")
    step = sam_optax.sam_step(make_loss(model), opt, has_aux=True, donate=False)
    opt_state = opt.init(params)
    losses = []
    for i in range(25):
      params, opt_state, metrics, stats = step(
        params, opt_state, (X, LABELS), stats, jax.random.key(i)
      )
      losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert metrics["grad_norm"].dtype == jnp.float32 and np.isfinite(float(metrics["grad_norm"]))
    results[dtype] = losses
  assert results[jnp.bfloat16][-1] < 0.7 * results[jnp.bfloat16][0]
  np.testing.assert_allclose(results[jnp.bfloat16][:3], results[jnp.float32][:3], rtol=5e-2)
