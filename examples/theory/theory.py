"""The step sizes the theorems prescribe and the rates they (and linear algebra) predict.

Everything here is a closed-form number computed from a problem's exact
constants; the experiments compare it with what sam_optax's optimizers do.
See README.md ("Where the numbers come from") for the derivations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from examples.theory.problems import Problem
from examples.theory.samplers import Sampler


class NoiseConstants(NamedTuple):
  """Constants of the sampled gradient ∇f_S (unbiased for ∇f).

  E‖∇f_S(x)‖² ≤ 2A (f(x) - f*) + B ‖∇f(x)‖² + C for all x, and every possible
  f_S is L_S-smooth.
  """

  A: float
  B: float
  C: float
  L_S: float


def noise_constants(problem: Problem, sampler: Sampler) -> NoiseConstants:
  """A, B, C and L_S of ``sampler`` on ``problem`` (Gower et al. 2019; Khaled & Richtárik 2020).

  * full batch: A = 0, B = 1, C = 0, L_S = L;
  * τ-nice (without replacement): A = L_max (n-τ)/(τ(n-1)), B = n(τ-1)/(τ(n-1)),
    C = 2AΔ_inf, L_S = L_max (L when τ = n);
  * importance, τ draws with p_i ∝ L_i and weights 1/(n p_i): every reweighted
    f_i/(n p_i) is L_avg-smooth, so A = L_avg/τ, B = 1 - 1/τ, C = 2AΔ_inf,
    L_S = L_avg.

  Δ_inf = f* - (1/n) Σ inf f_i. These follow from ‖∇h(x)‖² ≤ 2ℓ(h(x) - inf h)
  for an ℓ-smooth h and the variance of sampling without/with replacement.
  """
  n, tau, delta = problem.n, sampler.tau, problem.delta_inf
  if sampler.kind == "full":
    return NoiseConstants(0.0, 1.0, 0.0, problem.L)
  if sampler.kind == "tau_nice":
    if tau == n:
      return NoiseConstants(0.0, 1.0, 0.0, problem.L)
    A = problem.L_max * (n - tau) / (tau * (n - 1))
    B = n * (tau - 1) / (tau * (n - 1))
    return NoiseConstants(A, B, 2 * A * delta, problem.L_max)
  if sampler.kind == "importance":
    if not np.allclose(sampler.probs, problem.L_i / problem.L_i.sum(), rtol=1e-12):
      raise ValueError("the importance sampler's probabilities are not ∝ this problem's L_i.")
    A = problem.L_avg / tau
    return NoiseConstants(A, 1.0 - 1.0 / tau, 2 * A * delta, problem.L_avg)
  raise ValueError(f"unknown sampler kind {sampler.kind!r}.")


def unified_sam_step_sizes(mu: float, noise: NoiseConstants, lambd: float) -> tuple[float, float]:
  """Constant (ρ, γ) of Unified SAM's PL theorem (Oikonomou & Loizou 2025, Thm 3.2).

  With L = L_S, ρ_max = μ / (L (μ + 2(Bμ + A)(1-λ)²)), this returns ρ = ρ_max/2
  and the largest step the theorem allows for that ρ,

      γ = (μ - Lρ(μ + 2(Bμ+A)(1-λ)²)) / (2L(Bμ+A)(2L²ρ²(1-λ)² + 1)),

  the pair the SAM-SPS paper's experiments label "USAM - Oikonomou et al."
  (ρ = 1/(6L), γ = (1-3Lρ)/(2L(2L²ρ²+1)) for full-batch USAM). Both are
  non-increasing in (1-λ)², so the λ = 0 pair is valid for every λ ∈ [0, 1],
  including the schedules "1/t" and "1-1/t".
  """
  if not 0.0 <= lambd <= 1.0:
    raise ValueError(f"`lambd` must be in [0, 1], got {lambd!r}.")
  A, B, _, L = noise
  s = B * mu + A
  u = (1.0 - lambd) ** 2
  rho = 0.5 * mu / (L * (mu + 2 * s * u))
  gamma = (mu - L * rho * (mu + 2 * s * u)) / (2 * L * s * (2 * L**2 * rho**2 * u + 1))
  return rho, gamma


class RateBound(NamedTuple):
  """E[f(x_t) - f*] ≤ q^t (f(x_0) - f*) + N."""

  q: float
  N: float

  @property
  def slope(self) -> float:
    """log q: the guaranteed slope of log(f(x_t) - f*) per iteration."""
    return float(np.log(self.q)) if self.q > 0 else -np.inf

  def curve(self, t: np.ndarray, gap0: float) -> np.ndarray:
    return self.q ** np.asarray(t, dtype=np.float64) * gap0 + self.N


def unified_sam_rate_bound(
  L: float,
  mu: float,
  noise: NoiseConstants,
  gamma: float,
  rho: float,
  lambd: float,
  *,
  eps: float = 0.5,
  eta: float = 1.0,
) -> RateBound:
  """One-step PL bound for constant-step Unified SAM (derived in README.md).

  With a = L_S ρ(1-λ), b = L_S ρ λ (so ‖∇f_S(e) - ∇f_S(x)‖ ≤ a‖∇f_S(x)‖ + b),
  K = a/2 + (Lγ/2)(1+η)(1+a)² and c = 1 - a/2 - ε/2 - KB:

      q = 1 - 2γ(μc - KA),   N = (KC + b²(1/(2ε) + (Lγ/2)(1+1/η))) / (2(μc - KA)),

  for any ε, η > 0 (ε = η = 0 when b = 0, i.e. λ = 0). Raises ValueError when
  μc ≤ KA (the argument gives no contraction for these step sizes).
  """
  A, B, C, L_S = noise
  a = L_S * rho * (1.0 - lambd)
  b = L_S * rho * lambd
  if b == 0.0:
    eps = eta = 0.0
  K = a / 2 + (L * gamma / 2) * (1 + eta) * (1 + a) ** 2
  c = 1 - a / 2 - eps / 2 - K * B
  margin = mu * c - K * A
  if c <= 0 or margin <= 0:
    raise ValueError(
      f"no contraction: μc - KA = {margin:.3g} (c = {c:.3g}) for γ={gamma:.3g}, ρ={rho:.3g}."
    )
  noise_term = K * C + (b**2 * (1 / (2 * eps) + (L * gamma / 2) * (1 + 1 / eta)) if b else 0.0)
  return RateBound(q=max(1.0 - 2 * gamma * margin, 0.0), N=noise_term / (2 * margin))


def usam_quadratic_slope(hessian_eigenvalues: np.ndarray, gamma: float, rho: float) -> float:
  """Exact asymptotic slope of log(f(x_t) - f*) for full-batch USAM on a quadratic.

  With H = Q diag(h) Qᵀ, the USAM step is e ← (I - γH(I + ρH)) e, so each
  eigen-coordinate contracts by |1 - γh(1 + ρh)| and f - f* = ½ eᵀHe decays,
  for a generic start, as max_h (1 - γh(1+ρh))^{2t}.
  """
  h = np.asarray(hessian_eigenvalues, dtype=np.float64)
  return float(2 * np.log(np.max(np.abs(1 - gamma * h * (1 + rho * h)))))


def sam_two_cycle_floor(L: float, gamma: float, rho: float, lambd: float) -> float:
  """f - f* on the period-2 orbit full-batch Unified SAM settles into on a quadratic.

  Along the top eigenvector (curvature L) the step maps the coordinate c ≥ 0 to
  c(1 - γL - γρ(1-λ)L²) - γρλL; the orbit ±c has
  c = γρλL / (2 - γL - γρ(1-λ)L²) and f - f* = ½ L c². (Bartlett et al. 2023
  describe this orbit for SAM, λ = 1.) For λ = 0 it is 0: USAM converges.
  """
  c = gamma * rho * lambd * L / (2 - gamma * L - gamma * rho * (1 - lambd) * L**2)
  return 0.5 * L * c**2


def decreasing_schedules(rho: float, gamma: float, mu: float):
  """ρ_t = min(ρ, 1/(2t+1)), γ_t = min(γ, (2t+1)/((t+1)²μ)), t = 0, 1, … (Thm 3.5).

  The switch to the O(1/t) regime of Gower et al. (2019) used by the Unified SAM
  reference experiments. Returned as optax schedules of the 0-based count.
  """

  # optax passes the int32 step count: go to float first, (t+1)² overflows int32.
  def rho_t(count):
    t = jnp.asarray(count, dtype=float)
    return jnp.minimum(rho, 1.0 / (2 * t + 1))

  def gamma_t(count):
    t = jnp.asarray(count, dtype=float)
    return jnp.minimum(gamma, (2 * t + 1) / ((t + 1) ** 2 * mu))

  return rho_t, gamma_t


def andriushchenko_decreasing(mu: float, L_max: float):
  """USAM steps of Andriushchenko & Flammarion (2022) for the stochastic PL case.

  γ_t = min((8t+4)/(3μ(t+1)²), 1/(2L_max)), ρ_t = √(γ_t/L_max) (as in the
  SAM-SPS reference experiments).
  """

  def gamma_t(count):
    t = jnp.asarray(count, dtype=float)  # (t+1)² overflows int32
    return jnp.minimum((8 * t + 4) / (3 * mu * (t + 1) ** 2), 1 / (2 * L_max))

  def rho_t(count):
    return jnp.sqrt(gamma_t(count) / L_max)

  return rho_t, gamma_t
