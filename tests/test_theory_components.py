"""examples/theory: problems, samplers, noise constants, the Polyak step and the adaptive baselines.

Everything runs in float64 inside a fixture, so nothing leaks into other test modules.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from examples.theory import adaptive
from examples.theory import problems
from examples.theory import samplers
from examples.theory import theory
from examples.theory.samplers import Batch


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _points(p, k=4, seed=0):
  rng = np.random.default_rng(seed)
  return [p.x_star + s * rng.standard_normal(p.d) for s in (1e-3, 0.1, 1.0, 3.0)[:k]]


# ----------------------------------------------------------------- problems -- #


@pytest.mark.parametrize("interpolated", [True, False])
def test_ridge_minimizer_and_exact_constants(interpolated):
  reg = 0.0 if interpolated else 0.05
  p = problems.ridge_regression(30, 10, cond=5.0, reg=reg, interpolated=interpolated, seed=3)

  @jax.jit
  def measured(x_star, xs):
    f_i = lambda x, i: p.losses(x, i[None])[0]
    return dict(
      grad_star=p.full_grad(x_star),
      hess=jax.hessian(p.full_loss)(x_star),
      hess_i=jax.vmap(jax.hessian(f_i), (None, 0))(x_star, jnp.arange(p.n)),
      gap=jax.vmap(p.gap)(xs),
      loss=jax.vmap(p.full_loss)(xs),
      losses_star=p.losses(x_star, jnp.arange(p.n)),
    )

  m = jax.tree.map(np.asarray, measured(jnp.asarray(p.x_star), jnp.asarray(np.stack(_points(p)))))
  assert np.linalg.norm(m["grad_star"]) < 1e-13
  eig = np.linalg.eigvalsh(m["hess"])
  assert p.L == pytest.approx(eig[-1], rel=1e-12) and p.mu == pytest.approx(eig[0], rel=1e-10)
  np.testing.assert_allclose(p.hessian_eigenvalues, eig, rtol=1e-10)
  assert np.linalg.cond(p.A) == pytest.approx(5.0, rel=1e-10)
  # L_i is the top eigenvalue of ∇²f_i = a_i a_iᵀ + reg I
  np.testing.assert_allclose(p.L_i, np.linalg.eigvalsh(m["hess_i"])[:, -1], rtol=1e-12)
  np.testing.assert_allclose(m["gap"], m["loss"] - p.f_star, rtol=1e-8, atol=1e-15)
  if interpolated:
    assert p.f_star == 0.0 and p.delta_inf == 0.0 and p.interpolated
    assert m["losses_star"].max() < 1e-28
  else:
    assert p.delta_inf > 0 and not p.interpolated
    # inf f_i = reg b_i²/(2(‖a_i‖² + reg)), attained at x = a_i b_i/(‖a_i‖² + reg)
    a, b = p.A[4], p.b[4]
    x_i = a * b / (a @ a + reg)
    f_i = 0.5 * (a @ x_i - b) ** 2 + 0.5 * reg * x_i @ x_i
    assert f_i == pytest.approx(p.f_i_inf[4], rel=1e-12)


def test_logistic_minimizer_and_constants():
  p = problems.logistic_regression(60, 5, seed=2)

  @jax.jit
  def measured(x_star, xs):
    return dict(
      grad_star=p.full_grad(x_star),
      hess_star=jax.hessian(p.full_loss)(x_star),
      hess0=jax.hessian(p.full_loss)(jnp.zeros(p.d)),
      hess=jax.vmap(jax.hessian(p.full_loss))(xs),
      f3=jax.vmap(lambda x: p.losses(x, jnp.array([3]))[0])(xs),
    )

  m = jax.tree.map(np.asarray, measured(jnp.asarray(p.x_star), jnp.asarray(np.stack(_points(p)))))
  assert np.linalg.norm(m["grad_star"]) < 1e-14
  # L is the largest Hessian eigenvalue, attained at x = 0; μ = reg bounds it from below.
  assert p.L == pytest.approx(np.linalg.eigvalsh(m["hess0"])[-1], rel=1e-12)
  eig = np.linalg.eigvalsh(m["hess"])
  assert np.all(p.mu <= eig[:, 0] + 1e-15) and np.all(eig[:, -1] <= p.L + 1e-15)
  np.testing.assert_allclose(p.hessian_eigenvalues, np.linalg.eigvalsh(m["hess_star"]), rtol=1e-10)
  # inf f_3: a fine 1-D grid along x = α y a (where the minimizer lies) agrees,
  # and f_3 never goes below it elsewhere.
  a = p.A[3]
  alpha = np.linspace(0, 50, 200001)
  values = np.logaddexp(0, -alpha * (a @ a)) + 0.5 * p.reg * alpha**2 * (a @ a)
  assert values.min() == pytest.approx(p.f_i_inf[3], rel=1e-9)
  assert np.all(m["f3"] >= p.f_i_inf[3])


def test_bad_problem_arguments_raise():
  with pytest.raises(ValueError, match="`n` must be >= `d`"):
    problems.ridge_regression(5, 10)
  with pytest.raises(ValueError, match="`cond`"):
    problems.ridge_regression(10, 10, cond=0.5)
  with pytest.raises(ValueError, match="`reg`"):
    problems.logistic_regression(10, 3, reg=0.0)


# ----------------------------------------------------------------- samplers -- #


def test_importance_estimator_is_unbiased_exactly():
  p = problems.ridge_regression(25, 8, cond=4.0, reg=0.01, interpolated=False, seed=1)
  s = samplers.importance(p.L_i)
  np.testing.assert_allclose(s.probs, p.L_i / p.L_i.sum(), rtol=1e-15)
  np.testing.assert_allclose(s.n * s.probs * s.weights, 1.0, rtol=1e-15)
  per_sample = jax.jit(
    jax.vmap(
      lambda i: jax.grad(p.loss)(
        jnp.asarray(p.x_star) + 1.0, Batch(i[None], jnp.asarray(s.weights)[i][None])
      )
    )
  )
  grads = np.asarray(per_sample(jnp.arange(p.n)))  # w_i ∇f_i(x)
  expectation = s.probs @ grads  # Σ_i p_i w_i ∇f_i(x)
  full = np.asarray(p.full_grad(jnp.asarray(p.x_star) + 1.0))
  np.testing.assert_allclose(expectation, full, rtol=1e-13, atol=1e-15)
  # Without the 1/(n p_i) weights the same sampling is biased.
  assert np.linalg.norm(s.probs @ (grads / s.weights[:, None]) - full) > 1e-3 * np.linalg.norm(full)


def test_importance_draws_follow_probabilities_and_carry_their_weights():
  L_i = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
  s = samplers.importance(L_i, tau=4)
  batches = jax.jit(jax.vmap(s))(jax.random.split(jax.random.PRNGKey(0), 10_000))
  idx, w = np.asarray(batches.idx).ravel(), np.asarray(batches.weight).ravel()
  np.testing.assert_array_equal(w, s.weights[idx])
  counts = np.bincount(idx, minlength=5)
  expected = s.probs * idx.size
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 18.5  # 99.9% quantile of χ² with 4 degrees of freedom


@pytest.mark.parametrize("n, tau", [(20, 7), (10, 10), (30, 1)])
def test_tau_nice_draws_without_replacement(n, tau):
  s = samplers.tau_nice(n, tau)
  draws = 4000
  keys = jax.random.split(jax.random.PRNGKey(1), draws)
  idx = np.asarray(jax.jit(jax.vmap(lambda k: s(k).idx))(keys))
  assert idx.shape == (draws, tau)
  assert all(len(set(row)) == tau for row in idx)  # never the same index twice in a batch
  freq = np.bincount(idx.ravel(), minlength=n) / draws
  p = tau / n  # P(i ∈ S) for τ-nice sampling
  assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / draws) + 1e-12)
  if 2 <= tau < n:  # pairs: P(i, j ∈ S) = τ(τ-1)/(n(n-1))
    both = np.mean([(0 in r) and (1 in r) for r in idx])
    q = tau * (tau - 1) / (n * (n - 1))
    assert abs(both - q) <= 4.5 * np.sqrt(q * (1 - q) / draws)


def test_sampler_arguments_are_validated():
  with pytest.raises(ValueError, match="`tau`"):
    samplers.tau_nice(10, 0)
  with pytest.raises(ValueError, match="`tau`"):
    samplers.tau_nice(10, 11)
  with pytest.raises(ValueError, match="`L_i`"):
    samplers.importance([1.0, 0.0, 2.0])


# ------------------------------------------------- noise constants and bound -- #


def _all_batches(p, s):
  """Every possible batch, stacked, with its probability (for exact expectations)."""
  if s.kind == "full":
    return Batch(jnp.arange(p.n)[None], jnp.ones((1, p.n))), np.ones(1)
  if s.kind == "importance":
    idx = np.arange(p.n)[:, None]
    return Batch(jnp.asarray(idx), jnp.asarray(s.weights[idx])), s.probs
  subsets = np.array(list(itertools.combinations(range(p.n), s.tau)))
  return Batch(jnp.asarray(subsets), jnp.ones(subsets.shape)), np.full(
    len(subsets), 1 / len(subsets)
  )


@pytest.mark.parametrize("kind", ["uniform", "3-nice", "importance"])
def test_noise_constants_bound_the_second_moment(kind):
  p = problems.ridge_regression(7, 3, cond=3.0, reg=0.02, interpolated=False, seed=4)
  s = {
    "uniform": samplers.tau_nice(7, 1),
    "3-nice": samplers.tau_nice(7, 3),
    "importance": samplers.importance(p.L_i),
  }[kind]
  A, B, C, L_S = theory.noise_constants(p, s)
  batches, probs = _all_batches(p, s)
  idx, w = np.asarray(batches.idx), np.asarray(batches.weight)
  H = p.A.T @ p.A / p.n + p.reg * np.eye(p.d)
  for x in _points(p):  # in NumPy: ∇f_i(x) = a_i(a_iᵀx - b_i) + reg·x
    g_i = p.A * (p.A @ x - p.b)[:, None] + p.reg * x
    g_S = np.einsum("bt,btd->bd", w, g_i[idx]) / idx.shape[1]
    second = probs @ np.sum(g_S**2, axis=1)  # E‖∇f_S(x)‖², exactly
    e = x - p.x_star
    g = H @ e
    assert second <= (2 * A * (0.5 * e @ H @ e) + B * g @ g + C) * (1 + 1e-12)
  # every sampled loss (1/τ) Σ w_j f_j is L_S-smooth
  for row_idx, row_w in zip(idx, w):
    a = p.A[row_idx] * np.sqrt(row_w / len(row_idx))[:, None]
    assert np.linalg.eigvalsh(a.T @ a)[-1] + p.reg * row_w.mean() <= L_S * (1 + 1e-12)


_BOUND_PROBLEM = problems.ridge_regression(8, 4, cond=3.0, reg=0.05, interpolated=False, seed=5)


@functools.partial(jax.jit, static_argnums=0)
def _gaps_after_one_step(p, xs, batches, hp):
  """f(x⁺) - f* for every start x and every batch, after one library Unified SAM step.

  ρ, γ and λ are traced (sam_optax never branches on them), so one compilation
  serves every case.
  """
  rho, gamma, lambd = hp
  opt = sam_optax.unified_sam(optax.sgd(gamma), rho, lambd)
  step = sam_optax.sam_step(p.loss, opt, jit=False)
  after = lambda x, b: p.gap(step(x, opt.init(x), b)[0])
  return jax.vmap(jax.vmap(after, (None, 0)), (0, None))(xs, batches)


@pytest.mark.parametrize("lambd", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["full", "uniform", "importance"])
def test_derived_bound_holds_for_one_exact_expected_step(lambd, kind):
  """E[f(x⁺)] - f* ≤ q (f(x) - f*) + (1 - q) N for the library's Unified SAM step."""
  p = _BOUND_PROBLEM
  s = {
    "full": samplers.full_batch(8),
    "uniform": samplers.tau_nice(8, 1),
    "importance": samplers.importance(p.L_i),
  }[kind]
  noise = theory.noise_constants(p, s)
  rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, lambd)
  bound = theory.unified_sam_rate_bound(p.L, p.mu, noise, gamma, rho, lambd)
  batches, probs = _all_batches(p, s)
  xs = jnp.asarray(np.stack(_points(p)))
  hp = jnp.array([rho, gamma, lambd])
  expected_after = np.asarray(_gaps_after_one_step(p, xs, batches, hp)) @ probs  # E[f(x⁺)] - f*
  before = np.asarray(jax.vmap(p.gap)(xs))
  assert np.all(expected_after <= bound.q * before + (1 - bound.q) * bound.N + 1e-15)


def test_step_sizes_reduce_to_the_published_deterministic_pair():
  p = problems.ridge_regression(10, 10)
  rho, gamma = theory.unified_sam_step_sizes(
    p.mu, theory.noise_constants(p, samplers.full_batch(10)), 0.0
  )
  L = p.L
  assert rho == pytest.approx(1 / (6 * L), rel=1e-12)
  assert gamma == pytest.approx((1 - 3 * L * rho) / (2 * L * (2 * L**2 * rho**2 + 1)), rel=1e-12)
  with pytest.raises(ValueError, match="no contraction"):
    theory.unified_sam_rate_bound(L, p.mu, theory.NoiseConstants(0, 1, 0, L), 10 / L, rho, 0.0)


# -------------------------------------------------------------- Polyak step -- #


def test_polyak_step_with_rho_zero_is_the_classical_polyak_step():
  p = problems.ridge_regression(20, 20, cond=5.0, reg=0.01, interpolated=False, seed=6)
  full = samplers.full_batch(p.n)(None)
  opt = sam_optax.sam_sps(rho=0.0, lambd=0.0, f_star=p.f_star, gamma_b=1e6, weight_decay=0.0)
  step = sam_optax.sam_step(p.loss, opt, donate=False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(p.d))
  state = opt.init(x)
  A, b, reg = p.A, p.b, p.reg
  for _ in range(5):
    xn = np.asarray(x)
    r = A @ xn - b
    f = 0.5 * np.mean(r**2) + 0.5 * reg * xn @ xn  # by hand, in NumPy
    g = A.T @ r / p.n + reg * xn
    polyak = (f - p.f_star) / (g @ g)
    x, state, metrics = step(x, state, full)
    assert float(metrics["step_size"]) == pytest.approx(polyak, rel=1e-12)
    np.testing.assert_allclose(np.asarray(x), xn - polyak * g, rtol=1e-12, atol=1e-14)


def test_polyak_step_is_zero_when_the_ratio_is_negative():
  # f(x) = x²/2, x = 1, USAM δ = ρx with ρ = 2: f(e) - <∇f(e), δ> = (1 - ρ²)/2 < 0.
  loss = lambda x, batch: 0.5 * jnp.sum(x**2)
  opt = sam_optax.sam_sps(rho=2.0, lambd=0.0, f_star=0.0, gamma_b=5.0, weight_decay=0.0)
  x = jnp.array([1.0])
  x_new, _, metrics = sam_optax.sam_step(loss, opt, donate=False)(x, opt.init(x), None)
  assert float(metrics["step_size"]) == 0.0
  np.testing.assert_array_equal(np.asarray(x_new), [1.0])


# ------------------------------------------------------- adaptive baselines -- #


def _np_grad(p, x, idx):
  a, b = p.A[idx], p.b[idx]
  return a.T @ (a @ x - b) / len(idx) + p.reg * x


def _oracle(method, p, x, batches, eps=1e-12, b1=0.9, b2=0.999):
  """The papers' update rules written out in NumPy, one step per batch."""
  x = x.copy()
  zeros, eps2 = np.zeros_like(x), np.full_like(x, eps**2)
  st = dict(
    m=zeros,
    v=eps2,
    vh=eps2,
    r=zeros,
    u=eps2,
    un=eps**2,
    vn=eps**2,
    eta=0.1,
    theta=np.inf,
    x_prev=x.copy(),
  )
  out = []
  for t, idx in enumerate(batches):
    s = _np_grad(p, x, idx)
    if method == "adasam":
      g = _np_grad(p, x + 0.01 * s / np.linalg.norm(s), idx)
      st["m"] = b1 * st["m"] + (1 - b1) * g
      st["v"] = b2 * st["v"] + (1 - b2) * g * g
      st["vh"] = np.maximum(st["vh"], st["v"])
      x_next = x - 1e-2 * st["m"] / np.sqrt(st["vh"])
    elif method == "lightsam-I":
      st["un"] += s @ s
      g = _np_grad(p, x + 0.1 * s / np.sqrt(st["un"]), idx)
      st["vn"] += g @ g
      x_next = x - 5.0 * g / np.sqrt(st["vn"])
    elif method == "lightsam-II":
      st["u"] = st["u"] + s * s
      g = _np_grad(p, x + 0.01 * s / np.sqrt(st["u"]), idx)
      st["v"] = st["v"] + g * g
      x_next = x - 0.5 * g / np.sqrt(st["v"])
    elif method == "lightsam-III":
      st["r"] = b1 * st["r"] + (1 - b1) * s
      st["u"] = b2 * st["u"] + (1 - b2) * s * s
      g = _np_grad(p, x + 0.01 * st["r"] / np.sqrt(st["u"]), idx)
      st["m"] = b1 * st["m"] + (1 - b1) * g
      st["v"] = b2 * st["v"] + (1 - b2) * g * g
      x_next = x - 0.01 * st["m"] / np.sqrt(st["v"])
    else:  # sa-sam, η_0 = 0.1
      if t > 0:
        diff = np.linalg.norm(s - _np_grad(p, st["x_prev"], idx))
        local = np.linalg.norm(x - st["x_prev"]) / (2 * diff)
        eta = min(local, np.sqrt(1 + st["theta"]) * st["eta"])
        st["theta"], st["eta"] = eta / st["eta"], eta
      g = _np_grad(p, x + np.sqrt(st["eta"]) * s / np.linalg.norm(s), idx)
      x_next = x - st["eta"] * g
    st["x_prev"], x = x, x_next
    out.append(x.copy())
  return out


@pytest.mark.parametrize(
  "method",
  [
    "adasam",
    "lightsam-I",
    "lightsam-II",
    "lightsam-III",
    "sa-sam",
  ],
)
def test_adaptive_baselines_follow_the_papers_rules(method):
  p = problems.ridge_regression(20, 6, cond=4.0, reg=0.01, interpolated=False, seed=7)
  opt = {
    "adasam": adaptive.adasam(1e-2, 0.01),
    "lightsam-I": adaptive.lightsam("I", 5.0, 0.1),
    "lightsam-II": adaptive.lightsam("II", 0.5, 0.01),
    "lightsam-III": adaptive.lightsam("III", 0.01, 0.01),
    "sa-sam": adaptive.sa_sam(0.1),
  }[method]
  rng = np.random.default_rng(8)
  batches = [rng.choice(p.n, 5, replace=False) for _ in range(8)]
  x0 = rng.standard_normal(p.d)
  step = sam_optax.sam_step(p.loss, opt, donate=False)
  x, state = jnp.asarray(x0), opt.init(jnp.asarray(x0))
  for idx, expected in zip(batches, _oracle(method, p, x0, batches)):
    x, state, _ = step(x, state, Batch(jnp.asarray(idx), jnp.ones(5)))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-9, atol=1e-12)


def test_lightsam_rejects_an_unknown_variant():
  with pytest.raises(ValueError, match="`variant`"):
    adaptive.lightsam("IV", 0.1, 0.1)
