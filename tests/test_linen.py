"""sam_optax.linen.sam_step: the two-pass step over a Flax TrainState, without `state.replace`."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import sam_optax
import sam_optax.linen

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(2)
BATCHES = [
  (jnp.asarray(RNG.normal(size=(16, 5)), jnp.float32), jnp.asarray(RNG.integers(0, 3, 16)))
  for _ in range(3)
]


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


MODEL = Net()
_VARIABLES = MODEL.init(jax.random.key(0), BATCHES[0][0], train=False)


def variables():  # fresh buffers: the steps donate the state they were created from
  return jax.tree.map(jnp.copy, _VARIABLES)


class TrainState(train_state.TrainState):
  batch_stats: dict


def loss_fn(params, batch, batch_stats, dropout_key):
  logits, updates = MODEL.apply(
    {"params": params, "batch_stats": batch_stats},
    batch[0],
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": dropout_key},
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
  return loss, updates["batch_stats"]


def make_state(tx):
  v = variables()
  return TrainState.create(
    apply_fn=MODEL.apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"]
  )


@pytest.mark.parametrize(
  "tx",
  [
    sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.1, lambd="1-1/t"),
    pytest.param(sam_optax.sam_sps(rho=0.1, gamma_b=0.5), marks=pytest.mark.slow),
  ],
  ids=["unified_sam", "sam_sps"],
)
def test_equals_sam_step_with_state_replace(tx):
  sam = sam_optax.sam_step(loss_fn, tx, has_aux=True, jit=False)

  @jax.jit
  def by_hand(state, batch, key):  # the README's former boilerplate
    params, opt_state, metrics, batch_stats = sam(
      state.params, state.opt_state, batch, state.batch_stats, key
    )
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
    ), metrics

  train_step = sam_optax.linen.sam_step(loss_fn)
  state, ref = make_state(tx), make_state(tx)
  for i, batch in enumerate(BATCHES):
    state, metrics = train_step(state, batch, jax.random.key(i))
    ref, ref_metrics = by_hand(ref, batch, jax.random.key(i))
    for a, b in zip(jax.tree.leaves((state, metrics)), jax.tree.leaves((ref, ref_metrics))):
      np.testing.assert_array_equal(a, b)
  assert int(state.step) == 3
  assert not np.allclose(state.batch_stats["BatchNorm_0"]["mean"], 0.0)


def test_without_batch_stats_and_with_aux():
  params, stats = variables()["params"], _VARIABLES["batch_stats"]

  def loss(params, batch, key):
    logits = MODEL.apply({"params": params, "batch_stats": stats}, batch[0], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), logits

  tx = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05)
  state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
  state, metrics, logits = sam_optax.linen.sam_step(loss, has_aux=True, donate=False)(
    state, BATCHES[0], jax.random.key(0)
  )
  p, _, m, ref_logits = sam_optax.sam_step(loss, tx, has_aux=True, donate=False)(
    params, tx.init(params), BATCHES[0], jax.random.key(0)
  )
  got, want = (state.params, metrics, logits), (p, m, ref_logits)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 1


def test_docstring_example():
  import doctest  # pylint: disable=g-import-not-at-top

  result = doctest.testmod(sam_optax.linen, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_clear_errors():
  with pytest.raises(TypeError, match="`state` must be a flax TrainState"):
    sam_optax.linen.sam_step(loss_fn)({"params": 1}, BATCHES[0])
  with pytest.raises(TypeError, match="`loss_fn` must be callable"):
    sam_optax.linen.sam_step(None)
  with pytest.raises(ValueError, match="`ascent`"):
    sam_optax.linen.sam_step(loss_fn, ascent="nope")


def test_readme_linen_example_runs():
  text = (ROOT / "README.md").read_text()
  section = text[text.index("## Flax Linen") :]
  section = section[: section.index("\n## ", 1)]
  code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
  namespace = {
    "jax": jax,
    "optax": optax,
    "sam_optax": sam_optax,
    "model": MODEL,
    "variables": variables(),
    "batch": {"image": BATCHES[0][0], "label": BATCHES[0][1]},
    "key": jax.random.key(0),
  }
  exec(code, namespace)  # pylint: disable=exec-used
  assert int(namespace["state"].step) == 1 and np.isfinite(float(namespace["metrics"]["loss"]))
