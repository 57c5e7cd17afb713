"""sam_optax.sharpness on quadratics with known spectra: values, dtypes, jit, sharding, errors.

The problem is least squares f(θ) = mean_i ½ (x_iᵀθ - y_i)² over the flattened pytree
θ = ravel(params) (three leaves), with X built so that its Hessian XᵀX/n has a chosen
spectrum. The sharded checks run this file in a subprocess with 4 fake CPU devices
(``python tests/test_sharpness.py`` prints one JSON line) and assert on its numbers.
"""

from __future__ import annotations

import json
import pathlib
import re

import _devices
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from sam_optax import sharpness

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Compiled once per loss, shapes and static options (the suite runs on 2 shared cores:
# one compilation is much cheaper than op-by-op dispatch of many small ops).
EIG = jax.jit(
  sharpness.top_hessian_eigenvalue, static_argnums=0, static_argnames=("num_iters", "has_aux")
)
TRACE = jax.jit(
  sharpness.hessian_trace, static_argnums=0, static_argnames=("num_samples", "has_aux")
)
BALL = jax.jit(
  sharpness.worst_case_sharpness,
  static_argnums=0,
  static_argnames=("num_steps", "adaptive", "groups", "has_aux"),
)
SPECTRUM = np.array([10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1])  # 8 = 3 + 4 + 1 parameters
N = 32  # examples: divisible by 2 and 4 (groups, devices)


def make_params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": jnp.asarray(rng.normal(size=3), dtype),
    "b": jnp.asarray(rng.normal(size=(2, 2)), dtype),
    "c": jnp.asarray(rng.normal(), dtype),
  }


def make_batch(spectrum=SPECTRUM, n=N, dtype=jnp.float32, seed=1):
  """{'x', 'y'} with XᵀX/n = V diag(spectrum) Vᵀ (a random rotation V)."""
  rng = np.random.default_rng(seed)
  p = len(spectrum)
  u, _ = np.linalg.qr(rng.normal(size=(n, p)))  # orthonormal columns
  v, _ = np.linalg.qr(rng.normal(size=(p, p)))
  x = np.sqrt(n) * u @ np.diag(np.sqrt(spectrum)) @ v.T
  y = rng.normal(size=n)
  return {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}


def loss_fn(params, batch):
  theta, _ = ravel_pytree(params)
  r = batch["x"] @ theta - batch["y"]
  return 0.5 * jnp.mean(r**2)


def loss_with_aux(params, batch, scale):
  loss = loss_fn(params, batch)
  return scale * loss, {"loss": loss, "count": jnp.ones([], jnp.int32)}


def hessian(batch):
  x = np.asarray(batch["x"], np.float64)
  return x.T @ x / len(x)


def gradient(params, batch):
  theta = np.asarray(ravel_pytree(params)[0], np.float64)
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  return x.T @ (x @ theta - y) / len(x)


def exact_ball_max(g, h, rho):
  """max_{‖d‖ ≤ ρ} gᵀd + ½ dᵀHd for a convex quadratic: the boundary point with
  (μ - H) d = g, μ > λ_max, found by bisection on μ (float64)."""
  w, q = np.linalg.eigh(h)
  gq = q.T @ g
  lo, hi = w.max(), w.max() + np.linalg.norm(g) / rho + 1.0
  for _ in range(200):
    mu = 0.5 * (lo + hi)
    lo, hi = (mu, hi) if np.linalg.norm(gq / (mu - w)) > rho else (lo, mu)
  d = q @ (gq / (mu - w))
  return g @ d + 0.5 * d @ h @ d


# --- top_hessian_eigenvalue -------------------------------------------------------------


def test_top_eigenvalue_of_a_known_spectrum():
  params, batch = make_params(), make_batch()
  lam = EIG(loss_fn, params, batch)
  assert lam.dtype == jnp.float32 and lam.shape == ()
  assert abs(float(lam) - 10.0) / 10.0 < 1e-3
  # Independent of the point (a quadratic) and of a rescaled loss: λ scales with it.
  lam2 = EIG(lambda p, b: 3.0 * loss_fn(p, b), make_params(seed=5), batch)
  assert abs(float(lam2) - 30.0) / 30.0 < 1e-3


def test_top_eigenvalue_float64(x64):
  params, batch = make_params(jnp.float64), make_batch(dtype=jnp.float64)
  lam = EIG(loss_fn, params, batch, num_iters=200, tol=0.0)
  assert lam.dtype == jnp.float64
  assert abs(float(lam) - np.linalg.eigvalsh(hessian(batch)).max()) < 1e-10


def test_top_eigenvalue_bfloat16_params_report_float32():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
  lam = EIG(
    lambda p, b: loss_fn(jax.tree.map(lambda x: x.astype(jnp.float32), p), b), params, make_batch()
  )
  assert lam.dtype == jnp.float32
  assert abs(float(lam) - 10.0) / 10.0 < 2e-2  # bfloat16 tangents: about 3 digits


def test_tolerance_stops_at_the_first_small_relative_change():
  # A slow spectrum (λ2/λ1 = 0.9). The sequence λ_k is replayed in float64 NumPy from
  # the same start (v0 ~ N(0, I) per leaf from jax.random.split(key, leaves)), and tol
  # must stop it at the first k with |λ_k - λ_{k-1}| <= tol |λ_k|.
  spectrum = np.array([1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
  params, batch, key = make_params(), make_batch(spectrum), jax.random.key(2)
  leaves, treedef = jax.tree.flatten(params)
  v0 = treedef.unflatten(
    [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(jax.random.split(key, len(leaves)), leaves)
    ]
  )
  v = np.asarray(ravel_pytree(v0)[0], np.float64)
  h, seq = hessian(batch), []
  for _ in range(60):
    v = v / np.linalg.norm(v)
    seq.append(v @ h @ v)
    v = h @ v
  changes = np.abs(np.diff(seq)) / np.abs(seq[1:])
  stop = 12  # choose tol between the 12th and 13th changes: far from both in float32
  tol = float(np.sqrt(changes[stop - 1] * changes[stop]))
  assert np.all(changes[:stop] > tol * 1.04) and changes[stop] < tol / 1.04
  early = EIG(loss_fn, params, batch, num_iters=100, tol=tol, key=key)
  assert float(early) == pytest.approx(seq[stop + 1], rel=1e-5)
  assert abs(float(early) - seq[stop]) > 1e-5 and abs(float(early) - seq[stop + 2]) > 1e-5
  exact = EIG(loss_fn, params, batch, num_iters=1000, tol=0.0, key=key)
  assert abs(float(exact) - 1.0) < 1e-5
  assert abs(float(early) - 1.0) > 1e-4  # stopping early did cost accuracy


def test_eigenvalue_is_deterministic_given_the_key():
  params, batch = make_params(), make_batch(np.array([1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]))
  f = lambda key: float(EIG(loss_fn, params, batch, num_iters=5, tol=0.0, key=key))
  assert f(jax.random.key(3)) == f(jax.random.key(3))
  assert f(jax.random.key(3)) != f(jax.random.key(4))
  assert f(None) == f(jax.random.key(0))  # the documented default
  assert f(jax.random.PRNGKey(3)) == f(jax.random.key(3))  # raw uint32 keys work too


def test_negative_dominant_eigenvalue_keeps_its_sign():
  params, batch = make_params(), make_batch()
  lam = EIG(lambda p, b: -loss_fn(p, b), params, batch)
  assert abs(float(lam) + 10.0) / 10.0 < 1e-3


# --- hessian_trace ------------------------------------------------------------------------


def test_trace_of_a_known_spectrum_within_five_percent():
  params, batch = make_params(), make_batch()  # rotated: the estimator has variance
  tr = TRACE(loss_fn, params, batch, num_samples=200)
  assert tr.dtype == jnp.float32
  assert abs(float(tr) - SPECTRUM.sum()) / SPECTRUM.sum() < 0.05
  one = TRACE(loss_fn, params, batch, num_samples=1)
  assert float(one) != pytest.approx(SPECTRUM.sum(), rel=1e-3)  # one probe is not exact


def test_trace_is_exact_for_a_diagonal_hessian():
  # zᵀ D z = tr D for every ±1 probe.
  d = jnp.array([3.0, 1.0, 0.5, 2.0])
  f = lambda p, d: 0.5 * jnp.sum(d * (p["u"] ** 2)) + 0.5 * jnp.sum(d[:2] * p["v"] ** 2)
  params = {"u": jnp.ones(4), "v": jnp.zeros(2)}
  tr = TRACE(f, params, d, num_samples=3, key=jax.random.key(7))
  assert float(tr) == pytest.approx(6.5 + 4.0, rel=1e-6)


def test_trace_float64_and_key(x64):
  params, batch = make_params(jnp.float64), make_batch(dtype=jnp.float64)
  a = TRACE(loss_fn, params, batch, num_samples=50, key=jax.random.key(1))
  b = TRACE(loss_fn, params, batch, num_samples=50, key=jax.random.key(1))
  c = TRACE(loss_fn, params, batch, num_samples=50, key=jax.random.key(2))
  assert a.dtype == jnp.float64
  assert float(a) == float(b) and float(a) != float(c)
  # Each probe's zᵀHz by hand: the same probes as the library draws are not needed,
  # only that the estimate is an average of values around tr H.
  assert abs(float(a) - np.trace(hessian(batch))) / np.trace(hessian(batch)) < 0.1


# --- worst_case_sharpness -----------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5])
def test_ball_sharpness_between_the_bounds_and_near_the_exact_maximum(rho):
  params, batch = make_params(), make_batch()
  g, h = gradient(params, batch), hessian(batch)
  lower = rho * np.linalg.norm(g)
  upper = lower + 0.5 * np.linalg.eigvalsh(h).max() * rho**2
  exact = exact_ball_max(g, h, rho)
  values = [float(BALL(loss_fn, params, batch, rho=rho, num_steps=k)) for k in (1, 2, 5, 20)]
  for v in values:
    assert lower * (1 - 1e-5) <= v <= upper * (1 + 1e-5)
    assert v <= exact * (1 + 1e-4)
  assert values == sorted(values)  # the best point so far: more steps never report less
  assert values[-1] == pytest.approx(exact, rel=1e-3)
  if rho >= 0.1:  # with a small ρ the gradient dominates and SAM's step is nearly the max
    assert values[0] < exact * (1 - 1e-3)


def test_one_step_is_the_sam_step_sharpness():
  params, batch, rho = make_params(), make_batch(), 0.05
  got = BALL(loss_fn, params, batch, rho=rho, num_steps=1)
  g = jax.grad(loss_fn)(params, batch)
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
  e = jax.tree.map(lambda x, gx: x + rho * gx / norm, params, g)
  want = loss_fn(e, batch) - loss_fn(params, batch)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  # ... which is what sam_step reports as its sharpness metric with λ = 1.
  opt = sam_optax.unified_sam(__import__("optax").sgd(0.0), rho=rho, lambd=1.0)
  _, _, metrics = sam_optax.sam_step(loss_fn, opt, donate=False)(params, opt.init(params), batch)
  assert float(got) == pytest.approx(float(metrics["sharpness"]), rel=1e-5)


def test_ball_sharpness_float64(x64):
  params, batch, rho = make_params(jnp.float64), make_batch(dtype=jnp.float64), 0.2
  got = BALL(loss_fn, params, batch, rho=rho, num_steps=30)
  assert got.dtype == jnp.float64
  exact = exact_ball_max(gradient(params, batch), hessian(batch), rho)
  assert abs(float(got) - exact) / exact < 1e-6


def test_adaptive_ball():
  params, batch, rho, eta = make_params(), make_batch(), 0.1, 0.05
  theta = np.asarray(ravel_pytree(params)[0], np.float64)
  t = np.abs(theta) + eta
  g, h = gradient(params, batch), hessian(batch)
  # One step: ASAM's perturbation d = ρ T² g / ‖T g‖.
  d = rho * t**2 * g / np.linalg.norm(t * g)
  one = BALL(loss_fn, params, batch, rho=rho, num_steps=1, adaptive=True, eta=eta)
  assert float(one) == pytest.approx(g @ d + 0.5 * d @ h @ d, rel=1e-4)
  # More steps: the maximum over ‖d / T‖ ≤ ρ, i.e. over ‖u‖ ≤ ρ of (Tg)ᵀu + ½ uᵀ(THT)u.
  exact = exact_ball_max(t * g, t[:, None] * h * t[None, :], rho)
  many = BALL(loss_fn, params, batch, rho=rho, num_steps=20, adaptive=True, eta=eta)
  assert float(many) == pytest.approx(exact, rel=1e-3)
  plain = BALL(loss_fn, params, batch, rho=rho, num_steps=20)
  assert abs(float(plain) - float(many)) > 1e-2 * float(plain)  # a different ball


def test_m_sharpness_is_the_mean_over_groups():
  params, batch, rho = make_params(), make_batch(), 0.1
  split = lambda i, m: jax.tree.map(lambda x: x[i * N // m : (i + 1) * N // m], batch)
  for m in (2, 4):
    got = BALL(loss_fn, params, batch, rho=rho, num_steps=3, groups=m)
    each = [float(BALL(loss_fn, params, split(i, m), rho=rho, num_steps=3)) for i in range(m)]
    assert float(got) == pytest.approx(np.mean(each), rel=1e-5)
    assert len(set(each)) == m  # the groups do differ
  whole = BALL(loss_fn, params, batch, rho=rho, num_steps=3)
  one = BALL(loss_fn, params, batch, rho=rho, num_steps=3, groups=1)
  assert float(one) == pytest.approx(float(whole), rel=1e-6)
  # Extra args after the batch are shared by every group.
  aux = BALL(loss_with_aux, params, batch, 2.0, rho=rho, num_steps=3, groups=2, has_aux=True)
  two = BALL(lambda p, b: 2.0 * loss_fn(p, b), params, batch, rho=rho, num_steps=3, groups=2)
  assert float(aux) == pytest.approx(float(two), rel=1e-6)


def test_zero_gradient_and_zero_hessian_give_zero_not_nan():
  zero_loss = lambda p, b: 0.0 * jnp.sum(p["w"]) + jnp.mean(b)
  params, batch = {"w": jnp.ones(4)}, jnp.ones(8)
  assert float(EIG(zero_loss, params, batch)) == 0.0
  assert float(TRACE(zero_loss, params, batch)) == 0.0
  assert float(BALL(zero_loss, params, batch, num_steps=3)) == 0.0
  assert float(BALL(zero_loss, params, batch, adaptive=True)) == 0.0
  # At the minimum of the quadratic the gradient is zero: the SAM start is d = 0.
  batch = make_batch()
  theta_star = np.linalg.lstsq(np.asarray(batch["x"]), np.asarray(batch["y"]), rcond=None)[0]
  x64_free = jax.tree.map(lambda x: jnp.zeros_like(x), make_params())
  _, unravel = ravel_pytree(x64_free)
  at_min = unravel(jnp.asarray(theta_star, jnp.float32))
  s = BALL(loss_fn, at_min, batch, rho=0.1, num_steps=3)
  assert np.isfinite(float(s)) and 0.0 <= float(s) <= 0.5 * 10.0 * 0.1**2
  # ρ = 0: nothing moves.
  assert float(BALL(loss_fn, make_params(), batch, rho=0.0)) == 0.0


def test_huge_float32_gradient_stays_finite():
  c = jnp.array([3e19, 4e19], jnp.float32)  # ‖c‖² overflows float32, ‖c‖ does not
  linear = lambda p, c: jnp.sum(c * p)
  got = BALL(linear, jnp.zeros(2), c, rho=0.1)
  assert float(got) == pytest.approx(0.1 * 5e19, rel=1e-5)


def test_has_aux_matches_the_plain_loss():
  params, batch = make_params(), make_batch()
  plain = lambda p, b: 2.0 * loss_fn(p, b)
  for fn, kw in [(EIG, {}), (TRACE, {"num_samples": 20}), (BALL, {"rho": 0.1})]:
    a = fn(loss_with_aux, params, batch, 2.0, has_aux=True, **kw)
    b = fn(plain, params, batch, **kw)
    assert float(a) == pytest.approx(float(b), rel=1e-6), fn.__name__
  with pytest.raises(TypeError, match="has_aux=True"):
    EIG(loss_with_aux, params, batch, 2.0)
  with pytest.raises(TypeError, match="pair"):
    TRACE(loss_fn, params, batch, has_aux=True)


def test_under_jit_with_traced_rho_equals_eager():
  params, batch = make_params(), make_batch()

  @jax.jit
  def diagnostics(params, batch, rho):
    return (
      sharpness.top_hessian_eigenvalue(loss_fn, params, batch),
      sharpness.hessian_trace(loss_fn, params, batch, num_samples=10),
      sharpness.worst_case_sharpness(loss_fn, params, batch, rho=rho, groups=2),
    )

  jitted = diagnostics(params, batch, 0.1)
  eager = (
    sharpness.top_hessian_eigenvalue(loss_fn, params, batch),
    sharpness.hessian_trace(loss_fn, params, batch, num_samples=10),
    sharpness.worst_case_sharpness(loss_fn, params, batch, rho=0.1, groups=2),
  )
  for a, b in zip(jitted, eager):
    assert float(a) == pytest.approx(float(b), rel=1e-5)
  assert float(diagnostics(params, batch, 0.2)[2]) > float(jitted[2])  # ρ is traced, not baked in


@pytest.mark.parametrize(
  "fn, kwargs, message",
  [
    ("top_hessian_eigenvalue", {"num_iters": 0}, "`num_iters` must be an int >= 1, got 0"),
    ("top_hessian_eigenvalue", {"num_iters": 2.5}, "`num_iters`"),
    ("top_hessian_eigenvalue", {"num_iters": True}, "`num_iters`"),
    ("top_hessian_eigenvalue", {"tol": -1e-3}, "`tol` must be a finite number >= 0"),
    ("top_hessian_eigenvalue", {"tol": float("nan")}, "`tol`"),
    ("hessian_trace", {"num_samples": 0}, "`num_samples` must be an int >= 1, got 0"),
    ("worst_case_sharpness", {"rho": -0.1}, "`rho` must be a finite number >= 0, got -0.1"),
    ("worst_case_sharpness", {"rho": "0.1"}, "`rho`"),
    ("worst_case_sharpness", {"rho": [0.1]}, "`rho`"),
    ("worst_case_sharpness", {"num_steps": 0}, "`num_steps` must be an int >= 1"),
    ("worst_case_sharpness", {"step_size": 0.0}, "`step_size` must be > 0"),
    ("worst_case_sharpness", {"adaptive": True, "eta": -1.0}, "`eta`"),
    ("worst_case_sharpness", {"adaptive": 1}, "`adaptive` must be a bool"),
    ("worst_case_sharpness", {"groups": 0}, "`groups` must be an int >= 1"),
    ("worst_case_sharpness", {"groups": 3}, "`groups`: `batch` has 32 examples"),
  ],
)
def test_bad_arguments_raise_value_errors_naming_them(fn, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    getattr(sharpness, fn)(loss_fn, make_params(), make_batch(), **kwargs)


def test_bad_params_and_loss_fn():
  with pytest.raises(ValueError, match="`params` must have floating-point leaves"):
    sharpness.hessian_trace(lambda p: jnp.sum(p), jnp.arange(3))
  with pytest.raises(ValueError, match="`loss_fn` must be callable"):
    sharpness.top_hessian_eigenvalue(None, make_params())
  with pytest.raises(ValueError, match="`params` has no array leaves"):
    sharpness.worst_case_sharpness(lambda p: jnp.zeros([]), {})
  with pytest.raises(ValueError, match="`groups` splits the batch"):
    sharpness.worst_case_sharpness(lambda p: jnp.sum(p**2), jnp.ones(2), groups=2)
  with pytest.raises(TypeError, match="scalar loss"):
    sharpness.worst_case_sharpness(
      lambda p, b: b["x"] @ ravel_pytree(p)[0], make_params(), make_batch()
    )


def test_public_submodule():
  import importlib

  assert importlib.import_module("sam_optax.sharpness") is sam_optax.sharpness
  assert "sharpness" in sam_optax.__all__
  assert set(sharpness.__all__) == {
    "top_hessian_eigenvalue",
    "hessian_trace",
    "worst_case_sharpness",
  }


def test_docstring_examples():
  import doctest

  result = doctest.testmod(sharpness, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 10 and result.failed == 0


def test_readme_sharpness_block_runs_and_shows_its_numbers():
  # The README's Sharpness section: its ```py block runs as written, and the values
  # in its comments are what it computes.
  text = (ROOT / "README.md").read_text()
  section = text.split("\n## Sharpness", 1)[1].split("\n## ", 1)[0]
  [block] = re.findall(r"```py\n(.*?)```", section, flags=re.S)
  printed = []
  exec(block.replace("print(", "_print("), {"_print": lambda *a: printed.append(a)})
  shown = re.findall(r"print\(.*?\)\s*#\s*(.+)", block)
  assert len(printed) == len(shown) >= 3
  for got, want in zip(printed, shown):
    assert " ".join(str(g) for g in got) == want.strip()


# --- sharded batches on 4 fake CPU devices (subprocess) -----------------------------------


@pytest.mark.parametrize(
  "measure",
  [
    lambda f, p, b: sharpness.top_hessian_eigenvalue(f, p, b, num_iters=5),
    lambda f, p, b: sharpness.hessian_trace(f, p, b, num_samples=3),
    lambda f, p, b: sharpness.worst_case_sharpness(f, p, b, rho=0.1, num_steps=3),
  ],
  ids=["eigenvalue", "trace", "ball"],
)
def test_eager_calls_compile_once_per_loss_and_agree_with_jit(measure):
  # A training loop measures every epoch: the second eager call with new parameters
  # traces the loss no more, and both equal the jitted call.
  traces = []

  def counted(params, batch):  # not quadratic: the Hessian depends on the parameters
    traces.append(1)
    return loss_fn(params, batch) + 0.25 * sum(jnp.sum(x**4) for x in jax.tree.leaves(params))

  batch = make_batch()
  first = measure(counted, make_params(seed=0), batch)
  after_first = len(traces)
  second = measure(counted, make_params(seed=3), batch)
  assert len(traces) == after_first  # no new trace: the compiled body is reused
  assert float(first) != float(second)  # ... and it computed on the new parameters
  jitted = jax.jit(lambda p, b: measure(counted, p, b))(make_params(seed=3), batch)
  assert float(second) == pytest.approx(float(jitted), rel=1e-5)


DEVICES = 4


def _worker() -> dict:
  """Each diagnostic under jit on a batch sharded over 4 devices, against one device."""
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == DEVICES, jax.devices()
  params, batch = make_params(), make_batch()
  out = {}
  for axis_type in ("explicit", "auto"):
    kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(kind,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    cases = {
      "eigenvalue": lambda p, b: sharpness.top_hessian_eigenvalue(loss_fn, p, b),
      "trace": lambda p, b: sharpness.hessian_trace(loss_fn, p, b, num_samples=20),
      "ball": lambda p, b: sharpness.worst_case_sharpness(loss_fn, p, b, rho=0.1),
      "ball_groups4": lambda p, b: sharpness.worst_case_sharpness(loss_fn, p, b, rho=0.1, groups=4),
      "ball_groups2_adaptive": lambda p, b: sharpness.worst_case_sharpness(
        loss_fn, p, b, rho=0.1, groups=2, adaptive=True
      ),
      # 16 groups of 2 do not split over 4 devices: the batch is gathered first.
      "ball_groups16": lambda p, b: sharpness.worst_case_sharpness(
        loss_fn, p, b, rho=0.1, num_steps=2, groups=16
      ),
    }
    for name, fn in cases.items():
      try:
        with jax.set_mesh(mesh):
          got = jax.jit(fn)(replicated, sharded)
        want = jax.jit(fn)(params, batch)  # one device: the unsharded arrays
        out[f"{axis_type}/{name}"] = {
          "sharded": float(got),
          "single": float(want),
          "batch_sharded": not sharded["x"].sharding.is_fully_replicated,
        }
      except Exception as e:  # noqa: BLE001  (reported to and asserted on by the test)
        out[f"{axis_type}/{name}"] = {"exception": f"{type(e).__name__}: {e}"[:2000]}
  return out


@pytest.fixture(scope="module")
def sharded_results():
  return _devices.run(__file__, DEVICES, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize(
  "name", ["eigenvalue", "trace", "ball", "ball_groups4", "ball_groups2_adaptive", "ball_groups16"]
)
def test_sharded_batch_under_jit_equals_one_device(sharded_results, axis_type, name):
  got = sharded_results[f"{axis_type}/{name}"]
  assert "exception" not in got, got
  assert got["batch_sharded"]
  assert got["sharded"] == pytest.approx(got["single"], rel=1e-5)
  assert got["single"] > 0


if __name__ == "__main__":
  print(json.dumps(_worker()))
