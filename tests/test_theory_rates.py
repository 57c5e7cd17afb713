"""examples/theory: measured convergence of sam_optax's optimizers against the theory.

Small problems, float64 inside a fixture. The bands are stated in
examples/theory/README.md ("What the tests check").
"""

import jax
import numpy as np
import optax
import pytest

import sam_optax
from examples.theory import problems
from examples.theory import runner
from examples.theory import samplers
from examples.theory import theory
from examples.theory.experiments import usam_sps


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# Full batch: an interpolated ridge problem (κ(H) = cond² = 16).
DET = problems.ridge_regression(20, 20, cond=4.0, seed=11)
# Mini-batches: interpolated, so C = 0 and the USAM bound has no neighbourhood.
STOCH = problems.ridge_regression(40, 4, cond=2.0, seed=12)


def _constant_unified_sam(p, sampler, lambd):
  noise = theory.noise_constants(p, sampler)
  rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, lambd)
  bound = theory.unified_sam_rate_bound(p.L, p.mu, noise, gamma, rho, lambd)
  return sam_optax.unified_sam(optax.sgd(gamma), rho, lambd), rho, gamma, bound


def test_full_batch_usam_rate_matches_the_spectrum_and_the_bound():
  p, full = DET, samplers.full_batch(DET.n)
  opt, rho, gamma, bound = _constant_unified_sam(p, full, 0.0)
  tr = runner.run(p, opt, full, steps=3000, record_every=10)
  measured = runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-24, hi=1e-10)
  exact = theory.usam_quadratic_slope(p.hessian_eigenvalues, gamma, rho)
  assert measured == pytest.approx(exact, rel=0.03)
  # The theorem's guarantee holds and is tight to a factor 2.
  assert 1.0 <= measured / bound.slope <= 2.0
  assert np.all(tr.mean_gap <= bound.curve(tr.t, tr.mean_gap[0]) * (1 + 1e-9) + 1e-28)


@pytest.mark.parametrize("lambd", [0.5, 1.0])
def test_full_batch_sam_settles_on_the_predicted_two_cycle(lambd):
  p, full = DET, samplers.full_batch(DET.n)
  opt, rho, gamma, bound = _constant_unified_sam(p, full, lambd)
  tr = runner.run(p, opt, full, steps=3000, record_every=10)
  floor = theory.sam_two_cycle_floor(p.L, gamma, rho, lambd)
  np.testing.assert_allclose(tr.mean_gap[-20:], floor, rtol=1e-6)
  assert floor <= bound.N  # the derived neighbourhood contains it


def test_full_batch_lambda_one_over_t_follows_the_shrinking_floor():
  p, full = DET, samplers.full_batch(DET.n)
  opt, rho, gamma, _ = _constant_unified_sam(p, full, 0.0)
  opt = sam_optax.unified_sam(optax.sgd(gamma), rho, "1/t")
  tr = runner.run(p, opt, full, steps=4000, record_every=1000)
  predicted = theory.sam_two_cycle_floor(p.L, gamma, rho, 1.0 / tr.t[2:])
  np.testing.assert_allclose(tr.mean_gap[2:], predicted, rtol=0.02)


@pytest.mark.parametrize("kind", ["uniform", "10-nice", "importance"])
def test_stochastic_usam_rate_is_within_the_band_of_the_bound(kind):
  p = STOCH
  sampler = {
    "uniform": samplers.tau_nice(p.n, 1),
    "10-nice": samplers.tau_nice(p.n, 10),
    "importance": samplers.importance(p.L_i),
  }[kind]
  opt, _, _, bound = _constant_unified_sam(p, sampler, 0.0)
  steps = int(round(5 / -bound.slope, -2))
  tr = runner.run(p, opt, sampler, steps=steps, record_every=steps // 100, trials=8)
  measured = runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-5, hi=0.3)
  assert 1.0 <= measured / bound.slope <= 2.0


def test_importance_sampling_beats_uniform_in_theory_and_in_practice():
  p = STOCH
  uniform, importance = samplers.tau_nice(p.n, 1), samplers.importance(p.L_i)
  opt_u, _, gamma_u, bound_u = _constant_unified_sam(p, uniform, 0.0)
  opt_i, _, gamma_i, bound_i = _constant_unified_sam(p, importance, 0.0)
  assert gamma_i / gamma_u > 1.5 and bound_i.slope < 1.5 * bound_u.slope
  steps = int(round(3 / -bound_u.slope, -2))
  gaps = [
    runner.run(p, opt, s, steps=steps, record_every=steps, trials=8).mean_gap[-1]
    for opt, s in ((opt_u, uniform), (opt_i, importance))
  ]
  assert gaps[1] < 0.1 * gaps[0]


@pytest.mark.slow
def test_decreasing_steps_give_o_one_over_t():
  # Not interpolated (Δ_inf > 0): constant steps stall at a neighbourhood.
  p = problems.ridge_regression(20, 5, cond=2.0, reg=0.05, interpolated=False, seed=13)
  sampler = samplers.tau_nice(p.n, 1)
  lambd = 0.5
  rho, gamma = theory.unified_sam_step_sizes(p.mu, theory.noise_constants(p, sampler), lambd)
  rho_t, gamma_t = theory.decreasing_schedules(rho, gamma, p.mu)
  steps = 20_000  # ≈ 20× the switch point 2/(γμ) of the decreasing schedule
  t_gap = {}
  for name, opt in (
    ("constant", sam_optax.unified_sam(optax.sgd(gamma), rho, lambd)),
    ("decreasing", sam_optax.unified_sam(optax.sgd(gamma_t), rho_t, lambd)),
  ):
    tr = runner.run(p, opt, sampler, steps=steps, record_every=steps // 8, trials=32)
    t_gap[name] = tr.t[2:] * tr.mean_gap[2:]  # t·E[f(x_t) - f*], t = T/4 … T
  # O(1/t): t·error stays bounded (no growth from T/4 to T) ...
  assert t_gap["decreasing"].max() <= 1.3 * t_gap["decreasing"][0]
  # ... while the constant-step error sits at its floor, so t·error grows ∝ t.
  assert t_gap["constant"][-1] >= 2.5 * t_gap["constant"][0]


def test_interpolated_usam_sps_reaches_1e_minus_10():
  p = problems.ridge_regression()  # the SAM-SPS deterministic problem: n = d = 100, κ(A) = 10
  tr = runner.run(
    p, usam_sps(1 / (2 * p.L), gamma_b=1e4), samplers.full_batch(p.n), steps=300, record_every=1
  )
  assert tr.gap[0, -1] <= 1e-10 and tr.relative_gap[-1] <= 1e-10
  assert np.all(tr.step_size > 0) and np.all(tr.step_size < 1e4)


def test_stochastic_polyak_step_stays_in_zero_to_gamma_b():
  p = problems.ridge_regression(30, 10, cond=4.0, reg=0.01, interpolated=False, seed=14)
  gamma_b = 3.0  # about the median Polyak ratio on this problem
  tr = runner.run(
    p,
    usam_sps(0.5 / p.L_max, gamma_b=gamma_b),
    samplers.tau_nice(p.n, 3),
    steps=2000,
    record_every=1,
    trials=4,
  )
  gammas = tr.step_size
  assert gammas.min() >= 0.0 and gammas.max() <= gamma_b
  # Both regimes occur, so the bounds above are exercised: the cap binds on some
  # steps, the Polyak ratio is below it on others.
  assert (gammas == gamma_b).mean() > 0.05 and (gammas < gamma_b).mean() > 0.05
  assert tr.mean_gap[-100:].mean() < 0.5 * tr.mean_gap[0]  # it still makes progress


def test_logistic_full_batch_usam_rate():
  p = problems.logistic_regression(60, 5, seed=15)
  full = samplers.full_batch(p.n)
  opt, rho, gamma, bound = _constant_unified_sam(p, full, 0.0)
  tr = runner.run(p, opt, full, steps=300, record_every=1)
  measured = runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-13, hi=1e-7)
  # Near x* the iteration is USAM on the quadratic model with ∇²f(x*) ...
  local = theory.usam_quadratic_slope(p.hessian_eigenvalues, gamma, rho)
  assert measured == pytest.approx(local, rel=0.05)
  # ... which is more curved than μ = reg, so the global bound is looser (band [1, 4]).
  assert 1.0 <= measured / bound.slope <= 4.0
