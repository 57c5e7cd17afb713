"""The composition battery (issue 11 item 4, docs/contract.md §4, §6-§8).

Every public optimizer (rows: unified_sam in each λ mode, sam_sps, sharpness_aware with a
custom ascent chain, interval_sam, looksam, gsam, dynamic_loss_scale) × every optax wrapper
or idiom (columns), in float32 with the plain `sam_step`: each cell asserts either the
documented values against a hand-written float64 reference (tests/_composition_common.py)
or the documented error, raised while tracing, before anything is computed or donated.
Then dtypes (bfloat16/float16/float64) and modes (`microbatches`, pmap, sharded jit on 4
fake CPU devices, in one subprocess started at the beginning) on a representative subset.
"""

import json
import pathlib
import tempfile

import _devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _composition_common import BATCHES
from _composition_common import EVERY
from _composition_common import LABELS
from _composition_common import LOSS_SCALE
from _composition_common import LR
from _composition_common import LR2
from _composition_common import MASK
from _composition_common import MU
from _composition_common import NAN_BATCH
from _composition_common import NO_BASE
from _composition_common import RHO
from _composition_common import RHO2
from _composition_common import ROWS
from _composition_common import SF_B1
from _composition_common import SF_LR
from _composition_common import UPDATE_CLIP
from _composition_common import X0
from _composition_common import After
from _composition_common import Around
from _composition_common import ScheduleFree
from _composition_common import Sgd
from _composition_common import aux_loss_fn
from _composition_common import batch_as
from _composition_common import loss_fn
from _composition_common import make_opt
from _composition_common import make_ref
from _composition_common import ref_run
from _composition_common import rho_refs
from _composition_common import to_dtype

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
F32_TOL = {"rtol": 2e-5, "atol": 2e-6}  # float32 vs the float64 reference after two steps
INSIDE = "inside the base optimizer"
ERRORS = {  # column -> (message fragment naming the alternative, raised at "init"/"step")
  "chain_before": (INSIDE, "step"),
  "multisteps_around": (r"sam_step\(\.\.\., microbatches=k\)", "step"),
  "dls_nested": ("Wrap the optimizer once", "init"),
  "lookahead": ("Use lookahead in your own loop", "step"),
}
DLS_INSIDE_MASK = (r"dynamic_loss_scale\(optax\.masked", "step")


def cell(row, col):
  """(optimizer factory, reference factory or None, expected error or None); None for N/A."""
  opt, ref = (lambda **kw: make_opt(row, **kw)), (lambda **kw: make_ref(row, **kw))
  if col in ERRORS:
    wrap = {
      "chain_before": lambda: optax.chain(optax.clip_by_global_norm(1.0), opt()),
      "multisteps_around": lambda: optax.MultiSteps(opt(), EVERY).gradient_transformation(),
      "dls_nested": lambda: sam_optax.dynamic_loss_scale(sam_optax.dynamic_loss_scale(opt())),
      "lookahead": lambda: optax.lookahead(opt(), 2, 0.5),
    }[col]
    return wrap, None, ERRORS[col]
  if col in ("multisteps_inside", "masked_inside", "multi_transform_inside", "sf_sgd_base"):
    if row in NO_BASE:
      return None
    base = {
      "multisteps_inside": "multisteps",
      "masked_inside": "masked",
      "multi_transform_inside": "multi_transform",
      "sf_sgd_base": "schedule_free_sgd",
    }[col]
    return (lambda: opt(base=base)), (lambda: ref(base=base)), None
  if col == "plain":
    return opt, ref, None
  if col == "inject":
    return (lambda: opt(inject=True)), ref, None
  if col == "chain_after":
    return (
      (lambda: optax.chain(opt(), optax.clip_by_global_norm(UPDATE_CLIP))),
      (lambda: After(ref())),
      None,
    )
  if col in ("masked_around", "multi_transform_around"):
    if row == "dynamic_loss_scale":  # the passed-through leaves would get the scaled gradient
      err = (
        DLS_INSIDE_MASK
        if col == "masked_around"
        else (r"dynamic_loss_scale\(optax\.multi_transform", "step")
      )
    else:
      err = None
    if col == "masked_around":
      return (lambda: optax.masked(opt(), MASK)), (lambda: Around(ref())), err
    return (
      (lambda: optax.multi_transform({"sam": opt(), "other": optax.sgd(LR2)}, LABELS)),
      (lambda: Around(ref(), other=Sgd(LR2))),
      err,
    )
  if col == "apply_if_finite":
    return (lambda: optax.apply_if_finite(opt(), 3)), ref, None
  if col == "dynamic_loss_scale":
    if row == "dynamic_loss_scale":
      return (lambda: sam_optax.dynamic_loss_scale(opt())), None, ERRORS["dls_nested"]
    return (lambda: sam_optax.dynamic_loss_scale(opt(), init_scale=LOSS_SCALE)), ref, None
  if col == "schedule_free_around":
    return (
      (lambda: optax.contrib.schedule_free(opt(), SF_LR, SF_B1)),
      (lambda: ScheduleFree(ref(), SF_LR, SF_B1)),
      None,
    )
  raise KeyError(col)


COLUMNS = [
  "plain",
  "chain_after",
  "chain_before",
  "inject",
  "multisteps_around",
  "multisteps_inside",
  "masked_around",
  "multi_transform_around",
  "masked_inside",
  "multi_transform_inside",
  "apply_if_finite",
  "dynamic_loss_scale",
  "dls_nested",
  "lookahead",
  "schedule_free_around",
  "sf_sgd_base",
]
CELLS = [(r, c) for r in ROWS for c in COLUMNS if cell(r, c) is not None]
EXACT = [(r, c) for r, c in CELLS if cell(r, c)[2] is None]
REFUSED = [(r, c) for r, c in CELLS if cell(r, c)[2] is not None]
_STEPS = {}


def compiled(key, opt, **kw):
  """One step per (cell, options), reused by every test of the cell.

  The product's cells other than "plain" run the step uncompiled (``jit=False``: the same
  code, op by op, and each op is compiled once for the whole file) to keep the battery fast;
  the plain cells, microbatches, the refusals (donation) and the device modes are compiled.
  """
  if key not in _STEPS:
    _STEPS[key] = sam_optax.sam_step(kw.pop("loss", loss_fn), opt, donate=False, **kw)
  return _STEPS[key]


def eager(key, opt, **kw):
  return compiled(key, opt, jit=False, **kw)


def _host(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def run_steps(step, opt, dtype=jnp.float32, batches=BATCHES, between=None, has_aux=False):
  params = to_dtype(X0, dtype)
  state = opt.init(params)
  out = []
  for i, b in enumerate(batches):
    if between is not None:
      state = between(i, state)
    res = step(params, state, batch_as(b, jnp.float64 if dtype == jnp.float64 else jnp.float32))
    params, state = res[0], res[1]
    out.append(res)
  return out


def assert_close_to_ref(outs, refs, tol=F32_TOL):
  for i, (out, (x_ref, _, _)) in enumerate(zip(outs, refs, strict=True)):
    got = _host(out[0])
    for k in x_ref:
      np.testing.assert_allclose(got[k], x_ref[k], err_msg=f"step {i + 1}, leaf {k}", **tol)


# --- the float32 product: optimizers × wrappers ------------------------------------------


@pytest.mark.parametrize(("row", "col"), EXACT, ids=[f"{r}-{c}" for r, c in EXACT])
def test_exact_cells_equal_the_hand_written_reference(row, col):
  opt_fn, ref_fn, _ = cell(row, col)
  opt = opt_fn()
  outs = run_steps((compiled if col == "plain" else eager)((row, col), opt), opt)
  assert_close_to_ref(outs, ref_run(ref_fn()))
  for out in outs:
    assert bool(out[2]["finite"])
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(out[0]))


@pytest.mark.parametrize(("row", "col"), REFUSED, ids=[f"{r}-{c}" for r, c in REFUSED])
def test_refused_cells_raise_before_any_compute_or_donation(row, col):
  opt_fn, _, (match, when) = cell(row, col)
  assert_refused(opt_fn, match, when)


def assert_refused(opt_fn, match, when, step_kw=None):
  params = to_dtype(X0, jnp.float32)
  if when == "init":
    with pytest.raises(ValueError, match=match):
      opt_fn().init(params)
    return
  opt = opt_fn()
  state = opt.init(params)
  step = sam_optax.sam_step(loss_fn, opt, **(step_kw or {}))  # donates params and state
  with pytest.raises(ValueError, match=match):
    step(params, state, batch_as(BATCHES[0]))
  assert not any(x.is_deleted() for x in jax.tree.leaves((params, state)))


def test_every_row_meets_every_column():
  for row in ROWS:
    assert {c for r, c in CELLS if r == row} == set(COLUMNS) - (
      {"multisteps_inside", "masked_inside", "multi_transform_inside", "sf_sgd_base"}
      if row in NO_BASE
      else set()
    )


_METRIC_KEYS = {"loss", "grad_norm", "perturbed_loss", "sharpness", "lambda", "rho", "finite"}


@pytest.mark.parametrize("row", ROWS)
def test_plain_metrics_equal_the_reference(row):
  opt = make_opt(row)
  ref = make_ref(row)
  seen = []
  refs = ref_run(ref, before_step=lambda i, r: seen.append(dict(rho_refs(r).metrics)))
  seen = seen[1:] + [dict(rho_refs(ref).metrics)]  # the metrics after each step
  outs = run_steps(compiled((row, "plain"), opt), opt)
  extra = {"sam_sps": {"step_size"}, "dynamic_loss_scale": {"loss_scale", "skipped"}}
  for out, (_, loss, gnorm), m_ref in zip(outs, refs, seen, strict=True):
    m = {k: float(v) for k, v in out[2].items()}
    assert set(m) == _METRIC_KEYS | extra.get(row, set())
    np.testing.assert_allclose(
      [m["loss"], m["perturbed_loss"], m["lambda"], m["rho"]],
      [loss, m_ref["perturbed_loss"], m_ref["lambda"], m_ref["rho"]],
      rtol=1e-5,
    )
    np.testing.assert_allclose(m["sharpness"], m["perturbed_loss"] - m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], gnorm, rtol=1e-5)  # ‖g‖ of the clean gradient
  if row == "sam_sps":
    np.testing.assert_allclose(m["step_size"], ref.base.gamma, rtol=1e-5)
    assert 0 < m["step_size"] < 1


def test_lambda_modes_first_steps():
  """§6: step 1 of "1/t" is λ = 1's; step 1 of "1-1/t" is λ = 0's (and step 2 differs)."""
  first = {}
  for row in ROWS[:5]:
    opt = make_opt(row)
    first[row] = [_host(o[0]) for o in run_steps(compiled((row, "plain"), opt), opt)]
  for a, b in [("'1/t'", "1"), ("'1-1/t'", "0")]:
    x, y = first[f"unified_sam(lambd={a})"], first[f"unified_sam(lambd={b})"]
    np.testing.assert_allclose(x[0]["w"], y[0]["w"], rtol=1e-6)
    assert np.max(np.abs(x[1]["w"] - y[1]["w"])) > 1e-4


@pytest.mark.parametrize("row", ROWS)
def test_non_finite_clean_gradient_skips_the_whole_step(row):
  """§8 with skip_nonfinite=True: params and state, counters included, unchanged."""
  opt = make_opt(row)
  params = to_dtype(X0, jnp.float32)
  state = opt.init(params)
  params, state, _ = compiled((row, "plain"), opt)(params, state, batch_as(BATCHES[0]))
  # By default the step is taken and reported. The NaN reaches the parameters except where
  # a component handles it itself: the loss scale skips, and SAM-SPS's γ_t is then 0.
  propagated, _, metrics = compiled((row, "plain"), opt)(params, state, batch_as(NAN_BATCH))
  assert not bool(metrics["finite"])
  finite = [np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(propagated)]
  assert all(finite) if row in ("dynamic_loss_scale", "sam_sps") else not any(finite)
  step = eager((row, "skip_nonfinite"), opt, skip_nonfinite=True)
  new_params, new_state, metrics = step(params, state, batch_as(NAN_BATCH))
  assert not bool(metrics["finite"])
  _assert_same(new_params, params)
  if row != "dynamic_loss_scale":
    _assert_same(new_state, state)
    return
  # dynamic_loss_scale handles the overflow itself: inner state kept, the scale backs off
  _assert_same(new_state.inner, state.inner)
  assert float(new_state.scale) == float(state.scale) / 2 and bool(new_state.skipped)
  assert bool(metrics["skipped"]) and int(new_state.good_steps) == 0


@pytest.mark.parametrize("row", ROWS)
def test_apply_if_finite_on_a_non_finite_gradient(row):
  """params, the inner state and its counters unchanged; apply_if_finite counts the step."""
  opt = optax.apply_if_finite(make_opt(row), 3)
  step = eager((row, "apply_if_finite"), opt)
  params = to_dtype(X0, jnp.float32)
  state = opt.init(params)
  params, state, _ = step(params, state, batch_as(BATCHES[0]))
  new_params, new_state, metrics = step(params, state, batch_as(NAN_BATCH))
  assert not bool(metrics["finite"])
  _assert_same(new_params, params)
  _assert_same(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
  assert not bool(new_state.last_finite)
  # and the next finite step is the reference's second step
  params, _, _ = step(new_params, new_state, batch_as(BATCHES[1]))
  np.testing.assert_allclose(_host(params)["w"], ref_run(make_ref(row))[1][0]["w"], **F32_TOL)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_set_rows():
  return [r for r in ROWS]


@pytest.mark.parametrize("row", _tree_set_rows())
def test_inject_hyperparams_tree_get_and_tree_set(row):
  """tree_get(state, "rho") finds the injected ρ; tree_set changes the next step."""
  opt = make_opt(row, inject=True)
  assert float(optax.tree_utils.tree_get(opt.init(to_dtype(X0, jnp.float32)), "rho")) == (
    pytest.approx(RHO)
  )

  def between(i, state):
    if i == 1:
      state = optax.tree_utils.tree_set(state, rho=jnp.asarray(RHO2, jnp.float32))
      assert float(optax.tree_utils.tree_get(state, "rho")) == pytest.approx(RHO2)
    return state

  def ref_between(i, ref):
    if i == 1:
      rho_refs(ref).rho = RHO2

  outs = run_steps(eager((row, "inject"), opt), opt, between=between)
  assert_close_to_ref(outs, ref_run(make_ref(row), before_step=ref_between))
  assert float(outs[1][2]["rho"]) == pytest.approx(RHO2)


def test_interval_variants_refuse_dynamic_loss_scale_and_sam_sps_inside():
  dls = sam_optax.dynamic_loss_scale(make_opt("unified_sam(lambd=1)"))
  params = to_dtype(X0, jnp.float32)
  for variant in (sam_optax.interval_sam, sam_optax.looksam):
    with pytest.raises(ValueError, match=r"dynamic_loss_scale\(interval_sam|looksam\(\.\.\.\)\)"):
      variant(dls, every=EVERY).init(params)
    with pytest.raises(ValueError, match="cannot wrap the Polyak step size"):
      variant(make_opt("sam_sps"), every=EVERY).init(params)


def test_dynamic_loss_scale_around_masked_is_exact():
  opt = sam_optax.dynamic_loss_scale(optax.masked(make_opt("unified_sam(lambd=1)"), MASK))
  outs = run_steps(eager(("dls(masked)", "plain"), opt), opt)
  assert_close_to_ref(outs, ref_run(Around(make_ref("unified_sam(lambd=1)"))))


def test_chain_before_is_refused_through_every_transparent_wrapper():
  """chain(T, W(sam)) for the wrappers that hand the gradient on: refused, not reshaped."""
  clip = optax.clip_by_global_norm(1e-3)
  sam = lambda: make_opt("unified_sam(lambd=1)")  # noqa: E731
  for wrapped in (
    lambda: sam_optax.dynamic_loss_scale(sam()),
    lambda: optax.inject_hyperparams(sam_optax.gsam)(sam()),
    lambda: optax.apply_if_finite(sam(), 3),
    lambda: optax.masked(sam(), MASK),
    lambda: optax.contrib.schedule_free(sam(), SF_LR, SF_B1),
    lambda: sam_optax.looksam(sam(), EVERY),
  ):
    assert_refused(lambda w=wrapped: optax.chain(clip, w()), INSIDE, "step")


# --- one-pass optax optimizers through sam_step -----------------------------------------


@pytest.mark.parametrize("microbatches", [None, 2])
def test_one_pass_sgd_equals_a_hand_written_optax_step(microbatches):
  opt = optax.sgd(LR, momentum=MU)
  outs = run_steps(compiled(("sgd", microbatches), opt, microbatches=microbatches), opt)
  params = to_dtype(X0, jnp.float32)
  state = opt.init(params)
  for out, b in zip(outs, BATCHES, strict=True):
    loss, g = jax.value_and_grad(loss_fn)(params, batch_as(b))
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
    assert set(out[2]) == {"loss", "grad_norm", "finite"}
    np.testing.assert_allclose(float(out[2]["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(out[2]["grad_norm"]), float(optax.tree.norm(g)), rtol=1e-6)
    for k in params:
      np.testing.assert_allclose(out[0][k], params[k], rtol=1e-6, atol=1e-7)
  refs = ref_run(Sgd(LR, MU))  # and the float64 formula
  assert_close_to_ref(outs, refs)


def test_one_pass_refusals():
  opt = optax.sgd(LR)
  assert_refused(lambda: opt, "needs a two-pass", "step", {"ascent": "local", "groups": 2})


# --- microbatches=k: the full-batch step to float32 round-off ----------------------------

MB_COLS = [
  "inject",
  "chain_after",
  "masked_around",
  "multi_transform_around",
  "apply_if_finite",
  "dynamic_loss_scale",
  "multisteps_inside",
  "schedule_free_around",
  "sf_sgd_base",
]
MB_CASES = [(r, "plain") for r in ROWS] + [("unified_sam(lambd=0.5)", c) for c in MB_COLS]


@pytest.mark.parametrize(("row", "col"), MB_CASES, ids=[f"{r}-{c}" for r, c in MB_CASES])
def test_microbatches_equal_the_full_batch_step(row, col):
  """sam_step(microbatches=4) == sam_step (has_aux statistics averaged) == the reference."""
  opt_fn, ref_fn, _ = cell(row, col)
  opt = opt_fn()
  full = run_steps(eager((row, col, "aux"), opt, loss=aux_loss_fn, has_aux=True), opt)
  micro = run_steps(
    compiled((row, col, "aux", 4), opt, loss=aux_loss_fn, has_aux=True, microbatches=4), opt
  )
  for f, m in zip(full, micro, strict=True):
    for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(m), strict=True):
      np.testing.assert_allclose(
        np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=1e-5, atol=1e-6
      )
  assert_close_to_ref(micro, ref_run(ref_fn()))
  for m, b in zip(micro, BATCHES, strict=True):
    np.testing.assert_allclose(float(m[3]["y_mean"]), np.mean(b["y"]), rtol=1e-6)


# --- dtypes ------------------------------------------------------------------------------

DTYPE_ROWS = [
  "unified_sam(lambd=1)",
  "unified_sam(lambd='1-1/t')",
  "sam_sps",
  "looksam",
  "gsam",
  "dynamic_loss_scale",
]
LOW_TOL = {"bfloat16": 4e-2, "float16": 5e-3}


def _rounded(tree, dtype):
  return {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in tree.items()}


def _low_precision_case(row, dtype, inject):
  opt = make_opt(row, inject=inject)
  step = (eager if inject else compiled)((row, "inject" if inject else "plain", dtype), opt)
  outs = run_steps(step, opt, dtype=dtype)
  batches = [_rounded(b, dtype) for b in BATCHES]
  refs = ref_run(make_ref(row), batches=batches, x0=_rounded(X0, dtype))
  tol = LOW_TOL[jnp.dtype(dtype).name]
  for out, (x_ref, _, _) in zip(outs, refs, strict=True):
    assert all(v.dtype == dtype for v in jax.tree.leaves(out[0]))
    assert all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in jax.tree.leaves(out))
    for k in x_ref:
      np.testing.assert_allclose(np.asarray(out[0][k], np.float64), x_ref[k], atol=tol, rtol=tol)
  # the update itself is the reference's to the dtype's precision (not just "params ≈ x0")
  u = np.asarray(outs[0][0]["w"], np.float64) - _rounded(X0, dtype)["w"]
  u_ref = refs[0][0]["w"] - _rounded(X0, dtype)["w"]
  assert np.max(np.abs(u - u_ref)) <= tol * max(1.0, np.max(np.abs(u_ref))) * 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("row", DTYPE_ROWS)
def test_low_precision_plain(row, dtype):
  _low_precision_case(row, dtype, inject=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("row", ["unified_sam(lambd=1)", "sam_sps"])
def test_low_precision_inject_hyperparams(row, dtype):
  """inject_hyperparams casts ρ, λ, ... to the parameters' dtype; eps stays static."""
  _low_precision_case(row, dtype, inject=True)


F64_CASES = [
  (r, c)
  for r in DTYPE_ROWS[:5]
  for c in ("plain", "masked_around", "multisteps_inside")
  if cell(r, c) is not None
]


@pytest.mark.parametrize(("row", "col"), F64_CASES, ids=[f"{r}-{c}" for r, c in F64_CASES])
def test_float64_to_round_off(x64, row, col):
  opt_fn, ref_fn, _ = cell(row, col)
  opt = opt_fn()
  step = sam_optax.sam_step(loss_fn, opt, donate=False, jit=col == "plain")  # x64: not cached
  outs = run_steps(step, opt, dtype=jnp.float64)
  assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(outs[-1][0]))
  assert_close_to_ref(outs, ref_run(ref_fn()), tol={"rtol": 1e-11, "atol": 1e-12})


# --- data parallelism on 4 fake CPU devices (one subprocess, started first) ---------------

DEVICE_COUNT = 4
_PROC = {}


@pytest.fixture(scope="module", autouse=True)
def _start_devices_worker():
  """Starts the fake-device worker when the module's first test runs; it works meanwhile."""
  # Files, not pipes: a full pipe would block the worker while the other tests run.
  _PROC["files"] = [tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")]
  _PROC["p"] = _devices.start(
    ROOT / "tests" / "_composition_devices.py", DEVICE_COUNT, *_PROC["files"]
  )
  yield
  if _PROC["p"].poll() is None:
    _PROC["p"].kill()
    _PROC["p"].wait()
  for f in _PROC["files"]:
    f.close()


@pytest.fixture(scope="module")
def devices():
  if "out" not in _PROC:
    _PROC["p"].wait(timeout=600)
    out, err = _PROC["files"]
    out.seek(0)
    err.seek(0)
    assert _PROC["p"].returncode == 0, err.read()[-4000:]
    _PROC["out"] = json.loads(out.read().strip().splitlines()[-1])
  return _PROC["out"]


def _device_cases():
  from _composition_devices import CASES  # noqa: PLC0415

  return list(CASES)


def _device_marks(name):
  del name
  return ()


@pytest.mark.parametrize("name", [pytest.param(n, marks=_device_marks(n)) for n in _device_cases()])
def test_data_parallel_equals_the_reference(devices, name):
  got = devices["cases"][name]
  assert "exception" not in got, got["exception"]
  row, col = got["row"], got["col"]
  refs = ref_run(cell(row, col)[1]() if row != "sgd" else Sgd(LR, MU))
  for i, (params, (x_ref, loss, _)) in enumerate(zip(got["params"], refs, strict=True)):
    for k in x_ref:
      np.testing.assert_allclose(params[k], x_ref[k], err_msg=f"step {i + 1} {k}", **F32_TOL)
    np.testing.assert_allclose(got["loss"][i], loss, rtol=1e-5)
  assert got["identical"] == [True] * len(BATCHES)  # bit-identical replicas


def test_data_parallel_refusals_before_donation(devices):
  for name, got in devices["refusals"].items():
    assert got["message"] is not None, name
    assert got["fragment"] in got["message"], (name, got["message"])
    assert got["deleted"] is False, name


def test_devices_worker_ran_every_case(devices):
  assert sorted(devices["cases"]) == sorted(_device_cases())
  assert devices["device_count"] == DEVICE_COUNT
