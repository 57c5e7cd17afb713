"""sam_optax.nnx.sam_step: an NNX module and nnx.Optimizer driven in place (issue 15).

The multi-device check runs this file in a subprocess with 4 fake CPU devices
(``python tests/test_nnx.py devices`` prints one JSON line); ``python
tests/test_nnx.py bench`` times the step under jax.jit (what sam_step uses) and nnx.jit.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import _devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
import sam_optax.nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
BATCHES = [
  (jnp.asarray(RNG.normal(size=(16, 5)), jnp.float32), jnp.asarray(RNG.integers(0, 3, 16)))
  for _ in range(4)
]
TOL = 1e-6  # float32 round-off after a few steps


class Net(nnx.Module):
  """Linear -> BatchNorm -> exp -> Dropout -> Linear; `record` sees every dropout mask."""

  def __init__(self, rngs, dropout=0.3, record=None):
    self.l1 = nnx.Linear(5, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)
    self.record = record

  def __call__(self, x):
    h = jnp.exp(0.5 * self.bn(self.l1(x)))  # > 0, so the dropped entries are exactly the zeros
    h = self.drop(h)
    if self.record is not None:
      jax.debug.callback(self.record, h != 0)
    return self.l2(h)


def xent(model, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make(tx, **net):
  model = Net(nnx.Rngs(0, dropout=1), **net)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


OPTIMIZERS = {
  "unified_sam": lambda: sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), 0.1, "1-1/t"),
  "sam_sps": lambda: sam_optax.sam_sps(rho=0.1, gamma_b=0.5, weight_decay=1e-3),
  "gsam": lambda: sam_optax.gsam(sam_optax.unified_sam(optax.adam(1e-2), 0.1, 1.0), alpha=0.3),
  "interval_sam": lambda: sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1), 0.1), 2),
}


def functional_reference(model, tx, batches, loss=xent, **options):
  """The functional sam_step on nnx.split(model): (params, rest, opt_state, metrics) per step."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = jax.tree.map(jnp.array, nnx.as_pure((params, rest)))  # copies

  def loss_fn(p, batch, r):
    m = nnx.merge(graphdef, p, r, copy=True)
    return loss(m, batch), nnx.as_pure(nnx.split(m, nnx.Param, ...)[2])

  step = sam_optax.sam_step(loss_fn, tx, has_aux=True, donate=False, **options)
  opt_state, out = tx.init(params), []
  for batch in batches:
    params, opt_state, metrics, rest = step(params, opt_state, batch, rest)
    out.append((params, rest, opt_state, metrics))
  return out


def deep_copy(node):
  """nnx.clone with fresh buffers (nnx.clone shares the arrays)."""
  node = nnx.clone(node)
  nnx.update(node, jax.tree.map(lambda x: x.copy(), nnx.as_pure(nnx.state(node))))
  return node


def max_abs_diff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(
    float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
    for x, y in zip(la, lb)
  )


def floats(tree):
  return [x for x in jax.tree.leaves(nnx.as_pure(tree)) if jnp.issubdtype(x.dtype, jnp.inexact)]


def equality_figures(name, steps=4):
  tx = OPTIMIZERS[name]()
  model, optimizer = make(tx)
  ref = functional_reference(nnx.clone(model), tx, BATCHES[:steps])
  train_step = sam_optax.nnx.sam_step(xent)
  errs = {"params": 0.0, "rest": 0.0, "opt_state": 0.0, "metrics": 0.0}
  for batch, (p, r, s, m) in zip(BATCHES[:steps], ref):
    metrics = train_step(model, optimizer, batch)
    assert set(metrics) == set(m)
    for key, a, b in (
      ("params", nnx.state(model, nnx.Param), p),
      ("rest", floats(nnx.state(model, nnx.Not(nnx.Param))), floats(r)),
      ("opt_state", optimizer.opt_state, s),
      ("metrics", metrics, m),
    ):
      errs[key] = max(errs[key], max_abs_diff(nnx.as_pure(a), b))
    counts = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.RngCount)))
    np.testing.assert_array_equal(counts, jax.tree.leaves(nnx.as_pure(r["drop"]["rngs"]["count"])))
  assert int(optimizer.step) == steps
  return errs


@pytest.mark.parametrize(
  "name",
  # unified_sam in the default suite; the others (same code path, ~15 s each) are slow.
  [n if n == "unified_sam" else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS],
)
def test_equals_functional_sam_step_over_several_steps(name):
  errs = equality_figures(name)
  assert max(errs.values()) <= TOL, errs


def test_batch_stats_come_from_one_clean_forward_pass():
  model, optimizer = make(OPTIMIZERS["unified_sam"]())
  once, twice = nnx.clone(model), nnx.clone(model)
  xent(once, BATCHES[0])
  xent(twice, BATCHES[0])
  xent(twice, BATCHES[0])
  sam_optax.nnx.sam_step(xent)(model, optimizer, BATCHES[0])
  stats = floats(nnx.state(model, nnx.BatchStat))
  np.testing.assert_allclose(stats, floats(nnx.state(once, nnx.BatchStat)), rtol=1e-6, atol=1e-7)
  assert max_abs_diff(stats, floats(nnx.state(twice, nnx.BatchStat))) > 1e-3  # can fail


def test_dropout_same_mask_in_both_passes_and_rngs_advance_once():
  masks = []
  model, optimizer = make(
    OPTIMIZERS["unified_sam"](), dropout=0.5, record=lambda m: masks.append(np.asarray(m))
  )
  reference = nnx.clone(model)
  count_before = int(model.drop.rngs.count[...])
  metrics = sam_optax.nnx.sam_step(xent)(model, optimizer, BATCHES[0])
  jax.effects_barrier()
  assert len(masks) == 2  # the clean and the perturbed pass
  np.testing.assert_array_equal(masks[0], masks[1])
  assert 0.3 < masks[0].mean() < 0.7
  # the reference: one forward pass of the model as it was, in train mode
  del masks[:]
  loss = xent(reference, BATCHES[0])
  jax.effects_barrier()
  np.testing.assert_array_equal(masks[0], masks[-1])  # the eager pass draws the same mask
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(
    jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.RngState))),
    jax.tree.leaves(nnx.as_pure(nnx.state(reference, nnx.RngState))),
  ):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)
  assert int(model.drop.rngs.count[...]) == count_before + 1


def test_perturbed_pass_uses_the_clean_pass_mask():
  # f(e) equals the loss at e = x + δ with the model's RNG state before the step (the same
  # mask), and not with the next mask.
  tx = sam_optax.unified_sam(optax.sgd(0.1), rho=0.5, lambd=1.0)
  model, optimizer = make(tx, dropout=0.5)
  before = nnx.clone(model)
  metrics = sam_optax.nnx.sam_step(xent)(model, optimizer, BATCHES[0])
  grads = nnx.grad(xent)(nnx.clone(before), BATCHES[0])
  params = nnx.state(before, nnx.Param)
  norm = optax.tree.norm(nnx.as_pure(grads))
  e = jax.tree.map(lambda p, g: p + 0.5 * g / norm, nnx.as_pure(params), nnx.as_pure(grads))
  at_e = nnx.clone(before)
  nnx.update(at_e, e)
  same_mask = xent(nnx.clone(at_e), BATCHES[0])
  xent(at_e, BATCHES[0])  # advances the RNG: the next call draws another mask
  next_mask = xent(at_e, BATCHES[0])
  assert float(metrics["perturbed_loss"]) == pytest.approx(float(same_mask), rel=1e-5)
  assert abs(float(next_mask) - float(same_mask)) > 1e-3


def test_compiled_once():
  traces = []

  def loss(model, batch):
    traces.append(1)
    return xent(model, batch)

  model, optimizer = make(OPTIMIZERS["sam_sps"]())
  train_step = sam_optax.nnx.sam_step(loss)
  train_step(model, optimizer, BATCHES[0])
  first = len(traces)
  assert first >= 2
  for batch in BATCHES[1:]:
    train_step(model, optimizer, batch)
  assert len(traces) == first


def test_has_aux_returns_the_clean_pass_aux():
  def loss(model, batch):
    logits = model(batch[0])
    return xent_from_logits(logits, batch[1]), {"logits": logits}

  model, optimizer = make(OPTIMIZERS["unified_sam"]())
  reference = nnx.clone(model)
  metrics, aux = sam_optax.nnx.sam_step(loss, has_aux=True)(model, optimizer, BATCHES[0])
  np.testing.assert_allclose(aux["logits"], reference(BATCHES[0][0]), rtol=1e-6, atol=1e-6)
  expected = xent_from_logits(aux["logits"], BATCHES[0][1])
  assert float(metrics["loss"]) == pytest.approx(float(expected))


def xent_from_logits(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_extra_args_are_passed_after_the_batch():
  def loss(model, batch, weight):
    return weight * xent(model, batch)

  tx = OPTIMIZERS["unified_sam"]()
  model, optimizer = make(tx)
  ref = functional_reference(nnx.clone(model), tx, BATCHES[:2], loss=lambda m, b: 2.0 * xent(m, b))
  train_step = sam_optax.nnx.sam_step(loss)
  for batch in BATCHES[:2]:
    train_step(model, optimizer, batch, jnp.float32(2.0))
  assert max_abs_diff(nnx.as_pure(nnx.state(model, nnx.Param)), ref[-1][0]) <= TOL


def test_no_donation_by_default_so_clones_stay_valid():
  model, optimizer = make(OPTIMIZERS["unified_sam"]())
  clone = nnx.clone(model)  # shares the model's arrays
  raw = nnx.as_pure(nnx.state(model, nnx.Param))["l1"]["kernel"]
  sam_optax.nnx.sam_step(xent)(model, optimizer, BATCHES[0])
  assert not raw.is_deleted() and not np.array_equal(raw, model.l1.kernel[...])
  clone(BATCHES[0][0])


def test_donation_keeps_the_model_and_optimizer_valid():
  model, optimizer = make(OPTIMIZERS["unified_sam"]())
  held = nnx.state(model, nnx.Param)  # holds the model's variables
  raw = nnx.as_pure(nnx.state(model, nnx.Param))["l1"]["kernel"]  # a raw array: donated
  train_step = sam_optax.nnx.sam_step(xent, donate=True)
  for batch in BATCHES[:2]:
    train_step(model, optimizer, batch)
  for leaf in jax.tree.leaves(nnx.as_pure(nnx.state((model, optimizer)))):
    assert not leaf.is_deleted()
  np.testing.assert_array_equal(nnx.as_pure(held)["l1"]["kernel"], model.l1.kernel[...])
  assert raw.is_deleted()
  model(BATCHES[1][0])  # the model still runs eagerly


def test_shared_array_is_not_donated_twice():
  model, optimizer = make(OPTIMIZERS["unified_sam"]())
  model.bn.scale.set_value(model.bn.bias.get_value())  # one array in two variables
  optimizer = nnx.Optimizer(model, OPTIMIZERS["unified_sam"](), wrt=nnx.Param)
  sam_optax.nnx.sam_step(xent, donate=True)(model, optimizer, BATCHES[0])
  assert not model.bn.scale.get_value().is_deleted()


@pytest.mark.slow
def test_wrt_filter_trains_only_the_selected_variables():
  tx = OPTIMIZERS["unified_sam"]()
  model = Net(nnx.Rngs(0, dropout=1))
  wrt = nnx.All(nnx.Param, nnx.PathContains("l2"))
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  before = jax.tree.map(jnp.array, nnx.as_pure(nnx.state(model, nnx.Param)))
  graphdef, params, rest = nnx.split(nnx.clone(model), wrt, ...)
  params, rest = jax.tree.map(jnp.array, nnx.as_pure((params, rest)))

  def loss_fn(p, batch, r):
    m = nnx.merge(graphdef, p, r, copy=True)
    return xent(m, batch), nnx.as_pure(nnx.split(m, wrt, ...)[2])

  ref = sam_optax.sam_step(loss_fn, tx, has_aux=True, donate=False)
  opt_state = tx.init(params)
  step = sam_optax.nnx.sam_step(xent)
  for batch in BATCHES[:3]:
    params, opt_state, _, rest = ref(params, opt_state, batch, rest)
    step(model, optimizer, batch)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  assert max_abs_diff(after["l2"], params["l2"]) <= TOL
  jax.tree.map(np.testing.assert_array_equal, after["l1"], before["l1"])


def _has_microbatches():
  import inspect  # noqa: PLC0415

  return "microbatches" in inspect.signature(sam_optax.sam_step).parameters


SPLITS = [
  pytest.param({"ascent": "local", "groups": 2}, id="groups"),
  pytest.param(
    {"microbatches": 2},
    id="microbatches",
    marks=pytest.mark.skipif(not _has_microbatches(), reason="sam_step has no microbatches"),
  ),
]


@pytest.mark.slow
@pytest.mark.parametrize("options", SPLITS)
def test_split_batch_options_equal_functional_sam_step(options):
  # groups (m-sharpness) and microbatches average aux over the pieces of the batch, so the
  # reference returns the floating statistics only and advances the dropout stream by hand.
  tx = OPTIMIZERS["unified_sam"]()
  model, optimizer = make(tx, dropout=0.5)
  graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
  params, rest = jax.tree.map(lambda x: x.copy(), nnx.as_pure((params, rest)))

  def loss_fn(p, batch, r):
    m = nnx.merge(graphdef, p, r, copy=True)
    return xent(m, batch), nnx.as_pure(nnx.state(m.bn, nnx.BatchStat))

  ref = sam_optax.sam_step(loss_fn, tx, has_aux=True, donate=False, **options)
  opt_state = tx.init(params)
  step = sam_optax.nnx.sam_step(xent, **options)
  for batch in BATCHES[:3]:
    params, opt_state, m_ref, stats = ref(params, opt_state, batch, rest)
    rest["bn"] = stats
    rest["drop"]["rngs"]["count"] = rest["drop"]["rngs"]["count"] + 1  # one forward pass
    metrics = step(model, optimizer, batch)
  assert max_abs_diff(nnx.as_pure(nnx.state(model, nnx.Param)), params) <= TOL
  assert max_abs_diff(floats(nnx.state(model, nnx.BatchStat)), floats(stats)) <= TOL
  assert max_abs_diff(metrics, m_ref) <= TOL
  assert int(model.drop.rngs.count[...]) == 3


def test_not_jitted_inside_nnx_jit_matches():
  tx = OPTIMIZERS["sam_sps"]()
  model, optimizer = make(tx)
  model2, optimizer2 = deep_copy((model, optimizer))
  step = sam_optax.nnx.sam_step(xent)
  step2 = nnx.jit(sam_optax.nnx.sam_step(xent, jit=False), donate_argnums=(0, 1))
  for batch in BATCHES[:3]:
    m1, m2 = step(model, optimizer, batch), step2(model2, optimizer2, batch)
  assert max_abs_diff(floats(nnx.state(model)), floats(nnx.state(model2))) <= TOL
  assert max_abs_diff(m1, m2) <= TOL and int(optimizer2.step) == 3
  assert int(model2.drop.rngs.count[...]) == 3


def _runs_one_pass_optimizers():
  try:
    sam_optax.sam_step(lambda p, b: jnp.sum(p**2), optax.sgd(0.1), donate=False)(
      jnp.ones(2), optax.sgd(0.1).init(jnp.ones(2)), None
    )
    return True
  except TypeError:
    return False


@pytest.mark.skipif(not _runs_one_pass_optimizers(), reason="sam_step drives SAM optimizers only")
def test_one_pass_optax_optimizer():
  model, optimizer = make(optax.sgd(0.1, momentum=0.9))
  reference = nnx.clone((model, optimizer))
  metrics = sam_optax.nnx.sam_step(xent)(model, optimizer, BATCHES[0])
  grads = nnx.grad(xent)(reference[0], BATCHES[0])
  ref_model, ref_opt = reference
  ref_opt.update(ref_model, grads)
  assert max_abs_diff(floats(nnx.state(model)), floats(nnx.state(ref_model))) <= TOL
  assert int(model.drop.rngs.count[...]) == int(ref_model.drop.rngs.count[...]) == 1
  assert "loss" in metrics and "perturbed_loss" not in metrics


def test_docstring_example():
  import doctest  # pylint: disable=g-import-not-at-top

  result = doctest.testmod(sam_optax.nnx, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_clear_errors():
  tx = OPTIMIZERS["unified_sam"]()
  model, optimizer = make(tx)
  step = sam_optax.nnx.sam_step(xent)
  with pytest.raises(TypeError, match="`optimizer` must be an nnx.Optimizer"):
    step(model, tx, BATCHES[0])
  with pytest.raises(TypeError, match="`model` must be an nnx.Module"):
    step(nnx.as_pure(nnx.state(model)), optimizer, BATCHES[0])
  with pytest.raises(TypeError, match="`loss_fn` must return a scalar loss"):
    sam_optax.nnx.sam_step(lambda m, b: m(b[0]))(model, optimizer, BATCHES[0])
  with pytest.raises(TypeError, match=r"scalar loss \(did you mean has_aux=True\?\)"):
    sam_optax.nnx.sam_step(lambda m, b: (xent(m, b), 0.0))(model, optimizer, BATCHES[0])
  with pytest.raises(TypeError, match="has_aux=True must return a pair"):
    sam_optax.nnx.sam_step(xent, has_aux=True)(model, optimizer, BATCHES[0])
  no_params = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`model` .* has no variables matching"):
    step(no_params, nnx.Optimizer(no_params, tx, wrt=nnx.Param), BATCHES[0])
  with pytest.raises(TypeError, match="`loss_fn` must be callable"):
    sam_optax.nnx.sam_step(None)
  with pytest.raises(ValueError, match="`ascent`"):
    sam_optax.nnx.sam_step(xent, ascent="nope")
  with pytest.raises(ValueError, match="needs ascent='local'"):
    sam_optax.nnx.sam_step(xent, groups=2)
  assert int(optimizer.step) == 0  # nothing ran


def test_sam_optax_does_not_import_flax():
  code = (
    "import sys, sam_optax; assert 'flax' not in sys.modules, 'flax imported'; "
    "m = sam_optax.nnx; assert 'flax' in sys.modules and m.sam_step"
  )
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_cached_partial_matches():
  tx = OPTIMIZERS["unified_sam"]()
  model, optimizer = make(tx)
  model2, optimizer2 = deep_copy((model, optimizer))
  step = sam_optax.nnx.sam_step(xent)
  cached = nnx.cached_partial(sam_optax.nnx.sam_step(xent), model2, optimizer2)
  for batch in BATCHES[:2]:
    m1, m2 = step(model, optimizer, batch), cached(batch)
  assert max_abs_diff(floats(nnx.state(model)), floats(nnx.state(model2))) == 0.0
  assert max_abs_diff(m1, m2) == 0.0 and int(optimizer2.step) == 2


DEVICES = 4


def _device_worker():
  """Sharded jit (state replicated, batch sharded) vs one device; runs in the subprocess."""
  # pylint: disable-next=g-import-not-at-top
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == DEVICES, jax.devices()
  out = {}
  # (Not adam-based gsam: adam's g/√v turns the round-off of a ~0 gradient into ±lr.)
  for mesh_kind, name in (
    ("auto", "unified_sam"),
    ("auto", "sam_sps"),
    ("explicit", "unified_sam"),
  ):
    try:
      types = (AxisType.Auto,) if mesh_kind == "auto" else (AxisType.Explicit,)
      mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=types)
      model, optimizer = make(OPTIMIZERS[name]())
      sharded = deep_copy((model, optimizer))
      nnx.update(sharded, jax.device_put(nnx.as_pure(nnx.state(sharded)), NamedSharding(mesh, P())))
      step, sharded_step = sam_optax.nnx.sam_step(xent), sam_optax.nnx.sam_step(xent)
      err, replicated, batch_sharded = 0.0, True, True
      for batch in BATCHES[:3]:
        metrics = step(model, optimizer, batch)
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        sharding = batch[0].sharding
        batch_sharded &= len(sharding.device_set) == DEVICES and not sharding.is_fully_replicated
        sharded_metrics = sharded_step(*sharded, batch)
        state = nnx.as_pure(nnx.state(sharded))
        replicated &= all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
        err = max(
          err,
          max_abs_diff(floats(nnx.state((model, optimizer))), floats(state)),
          max_abs_diff(metrics, sharded_metrics),
        )
      counts = [int(model.drop.rngs.count[...]), int(sharded[0].drop.rngs.count[...])]
      out[f"{mesh_kind}-{name}"] = {
        "err": err,
        "replicated": bool(replicated),
        "batch_sharded": bool(batch_sharded),
        "counts": counts,
      }
    except Exception as e:  # noqa: BLE001  (reported to and asserted on by the test)
      out[f"{mesh_kind}-{name}"] = {"exception": f"{type(e).__name__}: {e}"[:2000]}
  try:  # axis_name: the step (jit=False) inside nnx.shard_map, BatchNorm averaged over the axis
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
    model, optimizer = make(OPTIMIZERS["unified_sam"](), dropout=0.0)
    sharded = deep_copy((model, optimizer))
    sharded[0].bn.axis_name = "data"
    nnx.update(sharded, jax.device_put(nnx.as_pure(nnx.state(sharded)), NamedSharding(mesh, P())))
    inner = sam_optax.nnx.sam_step(xent, axis_name="data", jit=False)

    @nnx.jit
    def train(model, optimizer, batch):
      @nnx.shard_map(mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
      def per_device(model, optimizer, batch):
        return inner(model, optimizer, batch)

      return per_device(model, optimizer, batch)

    step, err = sam_optax.nnx.sam_step(xent), 0.0
    for batch in BATCHES[:3]:
      metrics = step(model, optimizer, batch)
      sharded_metrics = train(*sharded, jax.device_put(batch, NamedSharding(mesh, P("data"))))
      state = nnx.as_pure(nnx.state(sharded))
      err = max(
        err,
        max_abs_diff(floats(nnx.state((model, optimizer))), floats(state)),
        max_abs_diff(metrics, sharded_metrics),
      )
    out["shard_map-unified_sam"] = {
      "err": err,
      "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
      "batch_sharded": True,
      "counts": [int(optimizer.step[...]), int(sharded[1].step[...])],
    }
  except Exception as e:  # noqa: BLE001
    out["shard_map-unified_sam"] = {"exception": f"{type(e).__name__}: {e}"[:2000]}
  return out


@pytest.fixture(scope="module")
def device_results():
  return _devices.run(__file__, DEVICES, "devices", timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize(
  "case", ["auto-unified_sam", "auto-sam_sps", "explicit-unified_sam", "shard_map-unified_sam"]
)
def test_sharded_jit_equals_one_device(device_results, case):
  result = device_results[case]
  assert "exception" not in result, result
  assert result["batch_sharded"] and result["replicated"], result
  assert result["err"] <= 1e-5, result
  assert result["counts"] == [3, 3], result


def _readme_block(heading):
  text = (ROOT / "README.md").read_text()
  section = text[text.index(f"## {heading}") :]
  section = section[: section.index("\n## ", 1)]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_readme_nnx_example_runs_and_learns():
  namespace = {}
  exec(_readme_block("Flax NNX"), namespace)  # pylint: disable=exec-used
  model, optimizer, metrics = namespace["model"], namespace["optimizer"], namespace["metrics"]
  x = namespace["x"]
  assert int(optimizer.step) == 100 and int(model.drop.rngs.count[...]) == 100
  assert float(metrics["loss"]) < 0.25 * float(jnp.var(jnp.sin(x).sum(1)))
  assert set(metrics) >= {"loss", "perturbed_loss", "sharpness", "grad_norm"}


def _jax_jit_step(loss, donate=False):
  """The alternative to nnx.jit: jax.jit over nnx.split with a static graphdef."""
  inner = sam_optax.nnx.sam_step(loss, jit=False)

  def pure(graphdef, state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = inner(model, optimizer, batch)
    return nnx.as_pure(nnx.state((model, optimizer))), metrics

  pure = jax.jit(pure, static_argnums=0, donate_argnums=1 if donate else ())

  def step(model, optimizer, batch):
    graphdef, state = nnx.split((model, optimizer))
    new_state, metrics = pure(graphdef, nnx.as_pure(state), batch)
    nnx.update((model, optimizer), new_state)
    return metrics

  return step


def _bench(repeats=15, steps=40):
  """Time per step (µs, median and spread over interleaved repeats) on the small Net."""
  import time  # pylint: disable=g-import-not-at-top

  tx = OPTIMIZERS["unified_sam"]()
  calls = {}
  for name in (
    "sam_optax.nnx.sam_step (nnx.jit)",
    "jax.jit over nnx.split/merge/update",
    "nnx.cached_partial(sam_optax.nnx.sam_step(...), model, optimizer)",
  ):
    model, optimizer = make(tx)
    if name.startswith("jax.jit"):
      step = _jax_jit_step(xent)
      calls[name] = (lambda s, m, o: lambda b: s(m, o, b))(step, model, optimizer)
    elif name.startswith("nnx.cached"):
      calls[name] = nnx.cached_partial(sam_optax.nnx.sam_step(xent), model, optimizer)
    else:
      step = sam_optax.nnx.sam_step(xent)
      calls[name] = (lambda s, m, o: lambda b: s(m, o, b))(step, model, optimizer)
    jax.block_until_ready(calls[name](BATCHES[0]))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      for i in range(steps):
        metrics = call(BATCHES[i % 4])
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / steps * 1e6)
  return {
    name: {
      "median_us": round(float(np.median(t))),
      "min_us": round(float(np.min(t))),
      "max_us": round(float(np.max(t))),
    }
    for name, t in times.items()
  }


if __name__ == "__main__":
  if sys.argv[1:] == ["devices"]:
    print(json.dumps(_device_worker()))
  elif sys.argv[1:] == ["bench"]:
    print(json.dumps(_bench(), indent=1))
  elif sys.argv[1:] == ["figures"]:
    print(json.dumps({name: equality_figures(name) for name in OPTIMIZERS}, indent=1))
