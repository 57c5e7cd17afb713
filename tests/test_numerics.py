"""Non-finite and extreme values (docs/contract.md §8), in float32, bfloat16, float16 and float64.

Each test pins the value after the fix; the comment ``before:`` records what the
code computed before issue 12 (measured on commit d0830e4).
The multi-device cases run this file in a subprocess on 4 fake CPU devices
(``python tests/test_numerics.py`` prints one JSON line), as test_parallel_devices.py.
"""

import json
import math
import os
import pathlib

import _devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _common
from sam_optax import _protocol
from sam_optax import _variants

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ["float32", "bfloat16", "float16", "float64"]
# A gradient entry whose square overflows the accumulation dtype (float32 for the
# low-precision leaves, float64 for float64); float16 leaves cannot overflow it
# (65504² is far below float32's max), so they use their largest values instead.
BIG = {"float32": 1e20, "bfloat16": 1e20, "float16": 6e4, "float64": 1e160}
RTOL = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3, "float64": 1e-12}


@pytest.fixture(params=DTYPES)
def dtype(request):
  if request.param == "float64":
    request.getfixturevalue("x64")
  return jnp.dtype(request.param)


def f64(x):
  return np.asarray(
    jnp.asarray(x).astype(jnp.float32) if jnp.asarray(x).dtype != jnp.float64 else x
  ).astype(np.float64)


def run(opt, loss, params, batch=None, steps=1):
  step = sam_optax.sam_step(loss, opt, donate=False)
  state = opt.init(params)
  for _ in range(steps):
    params, state, metrics = step(params, state, batch)
  return params, state, metrics


# --- 1. γ_t = 0 means "do not move" ------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_zero_step_size_does_not_move_when_the_perturbed_gradient_is_not_finite(
  dtype, weight_decay
):
  # -Σ log w: USAM with ρ = 1 moves w[1] = 1 to 0 and w[0] below 0, so f(e) and ∇f(e)
  # are not finite and γ_t = 0. before: w = [0.01, nan, 2.] with step_size = 0.
  loss = lambda p, b: -jnp.sum(jnp.log(p["w"]))
  w = {"w": jnp.array([0.01, 1.0, 2.0], dtype)}
  opt = sam_optax.sam_sps(rho=1.0, lambd=0.0, weight_decay=weight_decay)
  params, state, metrics = run(opt, loss, w)
  assert params["w"].dtype == dtype
  np.testing.assert_array_equal(f64(params["w"]), f64(w["w"]))
  assert float(metrics["step_size"]) == 0.0
  assert not np.isfinite(float(metrics["perturbed_loss"]))


def test_polyak_update_is_exactly_zero_for_an_inf_or_nan_gradient(dtype):
  # before: updates [nan, -0., -0.] (0·inf) and [nan, nan, nan].
  sps = sam_optax.polyak_step_size(weight_decay=1e-3)
  x = {"w": jnp.array([1.0, 2.0, 3.0], dtype)}
  for bad in (jnp.inf, jnp.nan):
    g = {"w": jnp.array([bad, 1.0, 2.0], dtype)}
    u, s = jax.jit(lambda g, x: sps.update(g, sps.init(x), x, value=jnp.asarray(1.0, dtype)))(g, x)
    assert float(s.step_size) == 0.0
    np.testing.assert_array_equal(f64(u["w"]), [0.0, 0.0, 0.0])
    assert u["w"].dtype == dtype


def test_zero_rho_gives_a_zero_perturbation_even_for_an_inf_gradient(dtype):
  # ρ = 0 means e = x exactly. before: δ = [nan, 0., 0.] (0·inf).
  pert = sam_optax.unified_perturbation(rho=0.0, lambd=0.0)
  g = {"w": jnp.array([jnp.inf, 1.0, 2.0], dtype)}
  delta, _ = jax.jit(pert.update)(g, pert.init(g), g)
  np.testing.assert_array_equal(f64(delta["w"]), [0.0, 0.0, 0.0])


# --- 2. Overflow-safe reductions --------------------------------------------------------------


def _big_gradient(dtype):
  big = BIG[dtype.name]
  return {"w": jnp.array([big, -big, big], dtype), "b": jnp.array(big / 2, dtype)}


def _true_norm(tree, big):
  """‖tree‖ in float64 NumPy, scaled by `big` so that the squares do not overflow."""
  return float(np.sqrt(sum(np.sum((f64(x) / big) ** 2) for x in jax.tree.leaves(tree))) * big)


def test_tree_norm_is_bit_identical_to_the_plain_norm_when_nothing_overflows(dtype):
  tree = {"a": jnp.linspace(-3, 5, 37).astype(dtype), "b": jnp.array([[0.25, -7.0]], dtype)}
  acc = _common.accumulation_dtype(tree)
  plain = jnp.sqrt(_common.tree_sum_of_squares(tree, acc))
  assert jax.jit(_common.tree_norm, static_argnums=1)(tree, acc) == plain
  v = {"a": jnp.cos(jnp.arange(37.0)).astype(dtype), "b": jnp.array([[1.0, 2.0]], dtype)}
  coef = jax.jit(_common.tree_projection, static_argnums=2)(v, tree, acc)
  assert coef == _common.tree_vdot(v, tree, acc) / _common.tree_sum_of_squares(tree, acc)


def test_huge_gradient_keeps_sam_normalized(dtype):
  # before (float32, bfloat16, float64): ‖g‖² = inf, so δ = 0 and grad_norm = inf;
  # float16: already fine (‖δ‖ = ρ).
  g = _big_gradient(dtype)
  pert = sam_optax.unified_perturbation(rho=0.1, lambd=1.0)
  delta, state = jax.jit(pert.update)(g, pert.init(g), g)
  rtol = RTOL[dtype.name]
  np.testing.assert_allclose(_true_norm(delta, 1.0), 0.1, rtol=rtol)
  np.testing.assert_allclose(
    float(state.grad_norm), _true_norm(g, BIG[dtype.name]), rtol=max(rtol, 1e-6)
  )
  assert all(d.dtype == dtype for d in jax.tree.leaves(delta))


def test_huge_gradient_polyak_ratio_is_the_true_ratio(dtype):
  # r = (f - <g, δ>)/‖g‖² with ‖g‖² overflowing. before (float32, bfloat16, float64):
  # γ_t = 0; float16: already right.
  g = _big_gradient(dtype)
  delta = jax.tree.map(
    lambda x: (
      x.astype(jnp.float32 if x.dtype != jnp.float64 else x.dtype) * 1e-3 / BIG[dtype.name]
    ).astype(dtype),
    g,
  )
  value = 2.0 * BIG[dtype.name]
  sps = sam_optax.polyak_step_size(gamma_b=1.0, weight_decay=0.0)
  acc = _common.accumulation_dtype(g)
  u, s = jax.jit(
    lambda g, d: sps.update(g, sps.init(g), g, value=jnp.asarray(value, acc), perturbation=d)
  )(g, delta)
  big = BIG[dtype.name]
  gd = sum(
    float(np.sum(f64(a) / big * f64(b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(delta))
  )
  want = (value / big - gd) / big / (_true_norm(g, big) / big) ** 2
  np.testing.assert_allclose(float(s.step_size), want, rtol=max(RTOL[dtype.name], 1e-5))
  assert all(np.all(np.isfinite(f64(x))) for x in jax.tree.leaves(u))


def test_orthogonal_part_of_huge_vectors(dtype):
  big = BIG[dtype.name]
  v = {"w": jnp.array([big, 2 * big / 3], dtype)}
  u = {"w": jnp.array([big, 0.0], dtype)}
  out, norm = jax.jit(_variants._orthogonal_part)(v, u)
  # before (float32, bfloat16, float64): [nan, nan] and norm nan.
  np.testing.assert_allclose(f64(out["w"]), [0.0, f64(v["w"])[1]], rtol=RTOL[dtype.name])
  np.testing.assert_allclose(float(norm), f64(v["w"])[1], rtol=RTOL[dtype.name])


@pytest.mark.parametrize("variant", ["sam", "gsam", "looksam", "sam_sps"])
def test_huge_gradient_variants_stay_finite_and_exact(dtype, variant):
  # A linear loss f = Σ w·b: ∇f = b everywhere, so GSAM's g⊥ = 0 and LookSAM's g_v = 0,
  # and each step is x - lr·b; SAM-SPS's γ_t = f(x)/‖b‖² (the δ terms cancel).
  big = BIG[dtype.name]
  acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
  b = jnp.array([big, -big, big], acc)
  loss = lambda p, b: jnp.sum(p["w"].astype(acc) * b)
  w = {"w": jnp.array([1.0, 2.0, 3.0], dtype)}
  lr = 0.5 / big
  sgd = lambda: optax.sgd(lr)
  opt, steps = {
    "sam": (sam_optax.unified_sam(sgd(), rho=0.1), 1),
    "gsam": (sam_optax.gsam(sam_optax.unified_sam(sgd(), rho=0.1), alpha=0.1), 1),
    "looksam": (sam_optax.looksam(sam_optax.unified_sam(sgd(), rho=0.1), every=2), 2),
    "sam_sps": (sam_optax.sam_sps(rho=0.1, weight_decay=0.0, gamma_b=1.0), 1),
  }[variant]
  params, state, metrics = run(opt, loss, w, b, steps)
  got = f64(params["w"])
  assert np.all(np.isfinite(got))  # before (float32, bfloat16, float64): nan for gsam/looksam
  bb = f64(b.astype(dtype))
  np.testing.assert_allclose(
    float(metrics["grad_norm"]), np.linalg.norm(bb / big) * big, rtol=max(RTOL[dtype.name], 1e-6)
  )  # before: inf
  if variant == "sam_sps":
    gamma = float(np.sum(f64(w["w"]) * bb / big) / np.sum((bb / big) ** 2) / big)
    np.testing.assert_allclose(float(metrics["step_size"]), gamma, rtol=max(RTOL[dtype.name], 1e-5))
    want = f64(w["w"]) - gamma * bb  # before: γ_t = 0, params unchanged
  else:
    want = f64(w["w"]) - steps * lr * bb
  np.testing.assert_allclose(got, want, atol=2 * RTOL[dtype.name] * 4)


# Leaves large enough for the overflow branches to reduce them in slices (_common.sliced_sum):
# at the slice size (one piece), one past it (two slices, the last overlapping the first),
# three slices that no slice length divides, and the most slices, of more than 2^16 each.
SLICED_SIZES = [
  _common._SLICE,
  _common._SLICE + 1,
  2 * _common._SLICE + 12_347,
  _common._SLICES * _common._SLICE + 5,
]


@pytest.mark.parametrize("n", SLICED_SIZES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_sliced_sum_counts_every_entry_once(n, jit):
  # Small integers: every partial sum is exact in float32, so the totals must be equal.
  x = {"big": (jnp.arange(n) % 7 - 3.0).astype(jnp.float32), "small": jnp.array([1.0, -2.0])}
  y = {"big": (jnp.arange(n) % 5 - 2.0).astype(jnp.float32), "small": jnp.array([4.0, 8.0])}
  fn = lambda a, b: _common.sliced_sum(jnp.multiply, (a, b), jnp.float32)  # noqa: E731
  got = (jax.jit(fn) if jit else fn)(x, y)
  want = sum(np.sum(f64(a) * f64(b)) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert float(got) == want


@pytest.mark.parametrize("n", SLICED_SIZES)
def test_overflow_branches_on_sliced_leaves(n):
  """The fallbacks' values and the exact finiteness tests where they reduce in slices."""
  big = 1e20  # squares overflow float32
  pattern = (jnp.arange(n) % 5 - 2.0).astype(jnp.float32)
  g = {"w": pattern * big, "b": jnp.float32(big)}
  acc = jnp.float32
  ref = _true_norm(g, big)
  np.testing.assert_allclose(float(jax.jit(_common.tree_norm, static_argnums=1)(g, acc)), ref, 1e-6)
  np.testing.assert_allclose(float(_common.tree_norm(g, acc)), ref, rtol=1e-6)
  v = {"w": pattern * (2 * big), "b": jnp.float32(0.0)}
  gv = jax.jit(_common.tree_projection, static_argnums=2)(v, g, acc)  # <v, g>/‖g‖²
  want = float(np.sum(f64(pattern) ** 2) * 2) / (ref / big) ** 2
  np.testing.assert_allclose(float(gv), want, rtol=1e-5)
  # The exact finiteness tests (Σ x² overflows): huge but finite entries pass; a NaN in the
  # entries two slices share, or an inf at the very end, fails.
  pieces = min(_common._SLICES, -(-n // _common._SLICE))
  last_start = n - -(-n // pieces)  # the last slice's first entry
  assert bool(_protocol.all_finite(g)) and bool(jax.jit(_protocol.all_finite)(g))
  for index, bad in [(last_start + 2, jnp.nan), (n - 1, jnp.inf), (0, -jnp.inf)]:
    worse = {**g, "w": g["w"].at[index].set(bad)}
    assert not bool(_protocol.all_finite(worse))
    assert not bool(jax.jit(_protocol.all_finite)(worse))
    assert not bool(jax.jit(_protocol.stays_finite)(g, worse))
    assert bool(jax.jit(_protocol.stays_finite)(worse, worse))  # held on purpose: not counted


# --- 3. Bad hyperparameters at construction ---------------------------------------------------

BAD = [
  [0.05],
  (0.05,),
  1 + 1j,
  np.array([0.05]),
  jnp.array([0.05]),
  "0.05",
  jnp.array(1j),
  None,
  True,
]


def _factories():
  base = optax.sgd(0.1)
  two_pass = lambda: sam_optax.unified_sam(optax.sgd(0.1))
  return {
    "unified_perturbation": (sam_optax.unified_perturbation, ["rho", "lambd", "eps", "eta"]),
    "unified_sam": (lambda **kw: sam_optax.unified_sam(base, **kw), ["rho", "lambd", "eps", "eta"]),
    "sam_sps": (
      sam_optax.sam_sps,
      ["rho", "lambd", "f_star", "gamma_b", "weight_decay", "eps", "eta"],
    ),
    "polyak_step_size": (sam_optax.polyak_step_size, ["f_star", "gamma_b", "weight_decay", "eps"]),
    "gsam": (lambda **kw: sam_optax.gsam(two_pass(), **kw), ["alpha"]),
    "looksam": (lambda **kw: sam_optax.looksam(two_pass(), **kw), ["alpha", "every"]),
    "interval_sam": (lambda **kw: sam_optax.interval_sam(two_pass(), **kw), ["every"]),
    "dynamic_loss_scale": (
      lambda **kw: sam_optax.dynamic_loss_scale(two_pass(), **kw),
      ["init_scale", "min_scale", "growth_factor", "backoff_factor", "growth_interval"],
    ),
    "gsam_rho_schedule": (
      lambda **kw: sam_optax.gsam_rho_schedule(
        **{"learning_rate": 0.1, "rho_max": 0.1, "lr_max": 0.1, **kw}
      ),
      ["learning_rate", "rho_max", "rho_min", "lr_max", "lr_min"],
    ),
  }


CASES = [(f, name) for f, (_, names) in _factories().items() for name in names]


@pytest.mark.parametrize("factory,name", CASES)
def test_non_scalar_hyperparameters_are_rejected_naming_the_argument(factory, name):
  # before: rho=[0.05] was accepted (params became shape (1,)); rho=1+1j raised
  # "TypeError: float() argument must be ... not 'complex'"; gsam(alpha=1j),
  # looksam(alpha=[0.7]), dynamic_loss_scale(init_scale=[2.0]) were accepted.
  make = _factories()[factory][0]
  for bad in BAD:
    if name == "lambd" and isinstance(bad, str):
      continue  # strings name λ schedules; an unknown one has its own message
    if name == "eps" and bad is None:
      continue  # None means the default 1e-12 (kept out of inject_hyperparams)
    with pytest.raises(ValueError, match=f"`{name}`"):
      make(**{name: bad})


def test_unknown_lambda_string_and_scalar_forms_accepted():
  with pytest.raises(ValueError, match="`lambd`"):
    sam_optax.unified_perturbation(lambd="0.5")
  for ok in (0.1, 1, np.float32(0.1), np.array(0.1), jnp.array(0.1), lambda c: 0.1):
    sam_optax.sam_sps(rho=ok, gamma_b=ok, f_star=ok, weight_decay=ok)


def test_a_schedule_returning_a_vector_fails_at_trace_time():
  # before: params silently became shape (3, 1)... broadcast to the schedule's shape.
  opt = sam_optax.unified_sam(optax.sgd(0.1), rho=lambda c: jnp.array([0.05]))
  with pytest.raises(ValueError, match="`rho` must resolve to a real scalar"):
    run(opt, lambda p, b: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)})


# --- 4. Injected / scheduled values out of range: clipped --------------------------------------


def _quadratic(dtype):
  loss = lambda p, b: jnp.sum(p["w"].astype(jnp.float32 if dtype != jnp.float64 else dtype) ** 2)
  return loss, {"w": jnp.array([1.0, 2.0], dtype)}


def _inject_run(factory, params, loss, static=(), set_=None, **kw):
  # Hyperparameters in float32 (float64 under x64): in float16, eps = 1e-12 would be 0.
  hp_dtype = jnp.float64 if params["w"].dtype == jnp.float64 else jnp.float32
  opt = optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=hp_dtype)(**kw)
  state = opt.init(params)
  for k, v in (set_ or {}).items():
    state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
  step = sam_optax.sam_step(loss, opt, donate=False)
  return step(params, state, None)


@pytest.mark.parametrize("bad,clipped", [(-1.0, 0.0), (float("nan"), 0.0)])
def test_injected_gamma_b_is_clipped_to_zero(dtype, bad, clipped):
  # before (gamma_b = -1): step_size = -1, an ascent (w: [1, 2] -> [3.09, 6.18]).
  loss, w = _quadratic(dtype)
  p, s, m = _inject_run(
    sam_optax.sam_sps, w, loss, set_={"gamma_b": bad}, rho=0.1, gamma_b=1.0, weight_decay=0.0
  )
  assert float(m["step_size"]) == clipped
  np.testing.assert_array_equal(f64(p["w"]), f64(w["w"]))


def test_injected_weight_decay_is_clipped_to_zero(dtype):
  # before: wd = -1 gave w = [0.751, 1.502] (anti-decay); now equal to wd = 0.
  loss, w = _quadratic(dtype)
  p, _, _ = _inject_run(
    sam_optax.sam_sps, w, loss, set_={"weight_decay": -1.0}, rho=0.1, gamma_b=1.0, weight_decay=0.0
  )
  ref, _, _ = run(sam_optax.sam_sps(rho=0.1, gamma_b=1.0, weight_decay=0.0), loss, w)
  np.testing.assert_array_equal(f64(p["w"]), f64(ref["w"]))


@pytest.mark.parametrize("how", ["inject", "schedule"])
def test_negative_rho_is_clipped_to_zero(dtype, how):
  # before: ρ_t = -1 ran a descent-direction "ascent" (perturbed_loss 1.53 < loss 5).
  loss, w = _quadratic(dtype)
  if how == "inject":
    p, s, m = _inject_run(
      sam_optax.unified_sam,
      w,
      loss,
      static=("base_optimizer",),
      set_={"rho": -1.0},
      base_optimizer=optax.sgd(0.1),
      rho=0.1,
    )
  else:
    p, s, m = run(sam_optax.unified_sam(optax.sgd(0.1), rho=lambda c: -1.0 + 0 * c), loss, w)
  assert float(m["rho"]) == 0.0
  assert float(m["perturbed_loss"]) == float(m["loss"])  # e = x
  ref, _, _ = run(sam_optax.unified_sam(optax.sgd(0.1), rho=0.0), loss, w)
  np.testing.assert_array_equal(f64(p["w"]), f64(ref["w"]))


@pytest.mark.parametrize("how", ["inject", "schedule"])
def test_lambda_above_one_is_clipped_to_one(dtype, how):
  # before: λ_t = 5 ran with λ = 5 (perturbed_loss 0.897 < loss 5, a descent).
  loss, w = _quadratic(dtype)
  if how == "inject":
    p, s, m = _inject_run(
      sam_optax.unified_sam,
      w,
      loss,
      static=("base_optimizer",),
      set_={"lambd": 5.0},
      base_optimizer=optax.sgd(0.1),
      rho=0.1,
      lambd=0.5,
    )
  else:
    p, s, m = run(
      sam_optax.unified_sam(optax.sgd(0.1), rho=0.1, lambd=lambda c: 5.0 + 0 * c), loss, w
    )
  assert float(m["lambda"]) == 1.0
  ref, _, ref_m = run(sam_optax.unified_sam(optax.sgd(0.1), rho=0.1, lambd=1.0), loss, w)
  np.testing.assert_array_equal(f64(p["w"]), f64(ref["w"]))
  assert float(m["perturbed_loss"]) == float(ref_m["perturbed_loss"])


def test_negative_lambda_and_injected_gsam_alpha_are_clipped(dtype):
  loss, w = _quadratic(dtype)
  p, _, m = run(
    sam_optax.unified_sam(optax.sgd(0.1), rho=0.1, lambd=lambda c: -2.0 + 0 * c), loss, w
  )
  assert float(m["lambda"]) == 0.0
  ref, _, _ = run(sam_optax.unified_sam(optax.sgd(0.1), rho=0.1, lambd=0.0), loss, w)
  np.testing.assert_array_equal(f64(p["w"]), f64(ref["w"]))
  # α < 0 injected into GSAM: clipped to 0, i.e. the wrapped optimizer.
  inner = sam_optax.unified_sam(optax.sgd(0.1), rho=0.1)
  p, _, _ = _inject_run(
    sam_optax.gsam, w, loss, static=("optimizer",), set_={"alpha": -1.0}, optimizer=inner, alpha=0.1
  )
  ref, _, _ = run(inner, loss, w)
  np.testing.assert_array_equal(f64(p["w"]), f64(ref["w"]))


# --- 5. Loss scaling --------------------------------------------------------------------------


def _linear(dtype, b):
  acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return lambda p, _: jnp.sum(p["w"].astype(acc) * jnp.asarray(b, acc))


@pytest.mark.parametrize("opt_name", ["unified_sam", "sam_sps"])
def test_loss_scaled_step_equals_unscaled_step_near_the_dtype_max(dtype, opt_name):
  # A scaled float16 gradient of 49152 (finite, near 65504) unscales to 1.5 exactly;
  # the step equals the unscaled one bit for bit. before: the same (unscaled in
  # float32), except float64, which was unscaled in float32: 1 + 2^-40 became 1.
  b = np.array([1.5, -0.75, 1.0 + 2.0**-40 if dtype == jnp.float64 else 1.0])
  loss = _linear(dtype, b)
  w = {"w": jnp.array([1.0, 2.0, 3.0], dtype)}
  make = {
    "unified_sam": lambda: sam_optax.unified_sam(optax.sgd(0.25), rho=0.1),
    "sam_sps": lambda: sam_optax.sam_sps(rho=0.1, weight_decay=0.0),
  }[opt_name]
  ref, _, _ = run(make(), loss, w)
  p, s, m = run(sam_optax.dynamic_loss_scale(make(), init_scale=2.0**15), loss, w)
  assert not bool(m["skipped"])
  # Equal up to the fusion-dependent last bits (the two programs compile differently).
  np.testing.assert_allclose(
    f64(p["w"]), f64(ref["w"]), rtol=0, atol=4 * 3 * float(jnp.finfo(dtype).eps)
  )


def test_loss_scale_overflow_in_float16_skips_and_backs_off():
  # Scaled gradient 4·2^15 = 131072 > 65504: inf in float16, so the step is skipped.
  loss = _linear(jnp.float16, [4.0, 1.0, 1.0])
  w = {"w": jnp.array([1.0, 2.0, 3.0], jnp.float16)}
  opt = sam_optax.dynamic_loss_scale(
    sam_optax.unified_sam(optax.sgd(0.1), rho=0.1), init_scale=2.0**15
  )
  p, s, m = run(opt, loss, w)
  assert bool(m["skipped"]) and float(m["loss_scale"]) == 2.0**14
  np.testing.assert_array_equal(f64(p["w"]), f64(w["w"]))


def test_loss_scale_skips_when_only_the_perturbed_gradient_is_not_finite(dtype):
  # SAM-SPS maps an inf ∇f(e) to γ_t = 0 (a finite zero update); the loss scale must
  # still see the overflow. before: skipped as well (through the NaN update).
  loss = lambda p, b: -jnp.sum(jnp.log(p["w"]))
  w = {"w": jnp.array([0.01, 1.0, 2.0], dtype)}
  opt = sam_optax.dynamic_loss_scale(sam_optax.sam_sps(rho=1.0, lambd=0.0), init_scale=4.0)
  state0 = opt.init(w)
  p, s, m = run(opt, loss, w)
  assert bool(m["skipped"]) and float(m["loss_scale"]) == 2.0
  np.testing.assert_array_equal(f64(p["w"]), f64(w["w"]))
  assert int(sam_optax.find_state(s, sam_optax.PolyakStepSizeState).count) == int(
    sam_optax.find_state(state0, sam_optax.PolyakStepSizeState).count
  )


def test_loss_scale_never_grows_to_inf():
  opt = sam_optax.dynamic_loss_scale(
    sam_optax.unified_sam(optax.sgd(0.0), rho=0.0), init_scale=2.0**127, growth_interval=1
  )
  loss = lambda p, b: jnp.sum(p["w"] * 0.0)
  p, s, m = run(opt, loss, {"w": jnp.ones(2)}, steps=2)
  assert float(m["loss_scale"]) == 2.0**127  # before: inf after one step


# --- The step's finite metric and skip, and apply_if_finite -------------------------------------


def test_finite_metric_reports_the_bad_perturbed_pass(dtype):
  loss = lambda p, b: -jnp.sum(jnp.log(p["w"]))
  w = {"w": jnp.array([0.01, 1.0, 2.0], dtype)}
  _, _, m = run(sam_optax.sam_sps(rho=1.0, lambd=0.0), loss, w)
  assert m["finite"].dtype == jnp.bool_ and not bool(m["finite"])


def test_apply_if_finite_leaves_state_and_counters_unchanged(dtype):
  # Only the perturbed pass is non-finite: sam_step skips the whole step, so the
  # parameters, the inner state and every counter (apply_if_finite's included) are as before.
  loss = lambda p, b: -jnp.sum(jnp.log(p["w"]))
  w = {"w": jnp.array([0.01, 1.0, 2.0], dtype)}
  opt = optax.apply_if_finite(sam_optax.unified_sam(optax.sgd(0.1), rho=1.0, lambd=0.0), 5)
  state0 = opt.init(w)
  p, s, m = sam_optax.sam_step(loss, opt, donate=False)(w, state0, None)
  assert not bool(m["finite"])
  np.testing.assert_array_equal(f64(p["w"]), f64(w["w"]))
  assert jax.tree.structure(s) == jax.tree.structure(state0)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apply_if_finite_counts_a_non_finite_clean_gradient(dtype):
  loss = lambda p, b: jnp.sum(jnp.sqrt(p["w"]))  # ∇ = inf at w = 0, the loss is finite
  w = {"w": jnp.array([0.0, 1.0, 2.0], dtype)}
  opt = optax.apply_if_finite(sam_optax.unified_sam(optax.sgd(0.1), rho=0.1), 5)
  p, s, m = sam_optax.sam_step(loss, opt, donate=False)(w, opt.init(w), None)
  assert not bool(m["finite"]) and int(s.notfinite_count) == 1
  np.testing.assert_array_equal(f64(p["w"]), f64(w["w"]))
  pert = sam_optax.find_state(s, sam_optax.UnifiedPerturbationState)
  assert int(pert.count) == 0


# --- 6. Multi-device: a NaN/inf in one shard, on 4 fake CPU devices ---------------------------

DEVICES = 4


def _worker() -> dict:
  assert jax.device_count() == DEVICES, jax.devices()

  def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]

  def replicas_identical(tree):
    return all(
      all(np.asarray(x)[i].tobytes() == np.asarray(x)[0].tobytes() for i in range(DEVICES))
      for x in jax.tree.leaves(tree)
    )

  def pmapped(loss, opt, params, batch, dtype, **options):
    step = sam_optax.sam_step(loss, opt, axis_name="d", donate=False, **options)
    step = jax.pmap(step, axis_name="d")
    p, s = sam_optax.replicate((params, opt.init(params)))
    p1, s1, m = step(p, s, sam_optax.shard_batch(batch))

    def host(tree):  # replica 0, as JSON-able Python numbers
      return jax.tree.map(
        lambda x: (
          np.asarray(x)[0]
          .astype(np.float64 if np.asarray(x).dtype.kind == "f" else np.asarray(x).dtype)
          .tolist()
        ),
        tree,
      )

    return {
      "identical": replicas_identical((p1, s1, m)),
      "params": host(p1)["w"],
      "metrics": host(m),
      "state_unchanged": bits(jax.tree.map(lambda x: np.asarray(x)[0], s1))
      == bits(jax.tree.map(lambda x: np.asarray(x)[0], s)),
    }

  out = {}
  for dtype in ("float32", "bfloat16", "float16"):
    w = {"w": jnp.array([0.5, 1.0, 2.0], dtype)}
    # (a) A NaN in shard 2's inputs: every replica gets the same NaN step.
    x = np.ones((8, 3), np.float32)
    x[5, 1] = np.nan
    mse = lambda p, b: jnp.mean((b @ p["w"].astype(jnp.float32) - 1.0) ** 2)
    out[f"nan_shard/{dtype}"] = pmapped(
      mse, sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), w, x, dtype
    )
    out[f"nan_shard_skip/{dtype}"] = pmapped(
      mse, sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), w, x, dtype, skip_nonfinite=True
    )
    out[f"nan_shard_if_finite/{dtype}"] = pmapped(
      mse, optax.apply_if_finite(sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), 3), w, x, dtype
    )
    # (b) SAM-SPS whose perturbed point leaves the domain through shard 2 only: the
    # clean gradient of w[1] is -1 after the average, so USAM with ρ = 1 puts e[1] at 0
    # and ∇f(e)[1] = -inf on every replica after the average; γ_t = 0, nobody moves.
    weights = np.ones((8, 3), np.float32)
    weights[:, 1] = 0.0
    weights[4:6, 1] = 4.0  # shard 2 of 4 (2 examples per shard)

    def neg_log(p, b):
      logs = jnp.log(p["w"].astype(jnp.float32))
      return -jnp.mean(jnp.sum(jnp.where(b > 0, b * logs, 0.0), -1))

    out[f"inf_perturbed_shard_sps/{dtype}"] = pmapped(
      neg_log,
      sam_optax.sam_sps(rho=1.0, lambd=0.0, weight_decay=5e-4),
      {"w": jnp.array([0.5, 1.0, 2.0], dtype)},
      weights,
      dtype,
    )
    # (c) Loss scaling: one shard's scaled gradient overflows; every replica skips.
    big = np.ones((8, 3), np.float32)
    big[1] = [1e3, 1.0, 1.0]
    lin = lambda p, b: jnp.mean(b @ p["w"].astype(jnp.float32))
    out[f"loss_scale_overflow_shard/{dtype}"] = pmapped(
      lin,
      sam_optax.dynamic_loss_scale(
        sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), init_scale=2.0**15
      ),
      w,
      big,
      dtype,
    )
  return out


@pytest.fixture(scope="module")
def devices():
  return _devices.run(__file__, DEVICES, timeout=300)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_nan_in_one_shard_is_handled_identically_on_every_replica(devices, dtype_name):
  got = devices[f"nan_shard/{dtype_name}"]
  assert got["identical"]  # by default the NaN propagates, to every replica alike, and is reported
  assert all(math.isnan(v) for v in got["params"]) and not got["metrics"]["finite"]
  got = devices[f"nan_shard_skip/{dtype_name}"]
  assert got["identical"]
  # skip_nonfinite=True skips the step, on every replica alike (before: NaN everywhere).
  assert got["params"] == [0.5, 1.0, 2.0] and not got["metrics"]["finite"]
  got = devices[f"nan_shard_if_finite/{dtype_name}"]
  assert got["identical"]
  assert got["params"] == [0.5, 1.0, 2.0]  # apply_if_finite skipped it everywhere


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_inf_perturbed_gradient_in_one_shard_moves_no_replica(devices, dtype_name):
  # before: params [0.5, nan, 2.0] (0·inf) on every replica.
  got = devices[f"inf_perturbed_shard_sps/{dtype_name}"]
  assert got["identical"]
  assert got["metrics"]["step_size"] == 0.0
  assert got["params"] == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_loss_scale_overflow_in_one_shard_skips_on_every_replica(devices, dtype_name):
  got = devices[f"loss_scale_overflow_shard/{dtype_name}"]
  assert got["identical"]
  skipped = got["metrics"]["skipped"]
  if dtype_name == "float16":  # 1e3·2^15/8 overflows float16 only
    assert skipped and got["metrics"]["loss_scale"] == 2.0**14
    assert got["params"] == [0.5, 1.0, 2.0]
  else:
    assert not skipped and got["metrics"]["loss_scale"] == 2.0**15


if __name__ == "__main__":
  if os.environ.get("SAM_OPTAX_MODULE"):  # e.g. an old copy of the package, for "before" values
    import importlib

    sam_optax = importlib.import_module(os.environ["SAM_OPTAX_MODULE"])
  print(json.dumps(_worker()))
