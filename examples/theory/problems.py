"""Finite-sum test problems with a known minimizer and exact constants.

Every problem is f(x) = (1/n) Σ_i f_i(x) with

* ridge:     f_i(x) = ½ (a_iᵀx - b_i)² + (reg/2) ‖x‖²
* logistic:  f_i(x) = log(1 + exp(-y_i a_iᵀx)) + (reg/2) ‖x‖²

and carries, computed once in NumPy float64:

* ``x_star``, ``f_star``: the minimizer and the minimum (closed form for ridge,
  Newton's method to machine precision for logistic);
* ``L``: the smoothness constant of f (largest Hessian eigenvalue; for logistic
  λ_max(AᵀA)/(4n) + reg, the Hessian's largest eigenvalue at x = 0, its maximum);
* ``mu``: the PL / strong-convexity constant of f (smallest Hessian eigenvalue
  for ridge, ``reg`` for logistic);
* ``L_i``: the smoothness constant of each f_i (‖a_i‖² + reg, resp.
  ‖a_i‖²/4 + reg), hence ``L_max`` and ``L_avg``;
* ``f_i_inf``: inf_x f_i(x), which gives Δ_inf = f* - (1/n) Σ inf f_i (0 when
  the problem interpolates);
* ``hessian_eigenvalues``: the spectrum of ∇²f(x*), which fixes the asymptotic
  linear rate of full-batch USAM (the global H for ridge).

The loss used by the optimizers is the weighted mini-batch loss
``loss(x, batch) = (1/τ) Σ_j w_j f_{i_j}(x)`` for a :class:`~examples.theory.samplers.Batch`
of indices i_j and weights w_j; with the samplers' weights its expectation is f(x).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A finite-sum problem f = (1/n) Σ f_i with exact constants (see module doc)."""

  name: str
  kind: str  # "ridge" or "logistic"
  A: np.ndarray  # (n, d) data
  b: np.ndarray  # (n,) targets (ridge) or labels in {-1, +1} (logistic)
  reg: float
  x_star: np.ndarray
  f_star: float
  L: float
  mu: float
  L_i: np.ndarray
  f_i_inf: np.ndarray
  hessian_eigenvalues: np.ndarray  # of ∇²f(x*), ascending

  @property
  def n(self) -> int:
    return self.A.shape[0]

  @property
  def d(self) -> int:
    return self.A.shape[1]

  @property
  def L_max(self) -> float:
    return float(self.L_i.max())

  @property
  def L_avg(self) -> float:
    return float(self.L_i.mean())

  @property
  def delta_inf(self) -> float:
    """Δ_inf = f* - (1/n) Σ inf f_i ≥ 0; zero iff every f_i is minimized at x*."""
    return max(float(self.f_star - self.f_i_inf.mean()), 0.0)

  @property
  def interpolated(self) -> bool:
    return self.delta_inf <= 1e-14 * max(1.0, abs(self.f_star))

  def losses(self, x: jax.Array, idx: jax.Array) -> jax.Array:
    """f_i(x) for the indices ``idx`` (a vector of losses)."""
    a = jnp.asarray(self.A)[idx]
    b = jnp.asarray(self.b)[idx]
    z = a @ x
    if self.kind == "ridge":
      data = 0.5 * (z - b) ** 2
    else:
      data = jnp.logaddexp(0.0, -b * z)
    return data + 0.5 * self.reg * jnp.sum(x * x)

  def loss(self, x: jax.Array, batch) -> jax.Array:
    """The weighted mini-batch loss (1/τ) Σ_j w_j f_{i_j}(x): unbiased for f(x)."""
    return jnp.mean(batch.weight * self.losses(x, batch.idx))

  def full_loss(self, x: jax.Array) -> jax.Array:
    return jnp.mean(self.losses(x, jnp.arange(self.n)))

  def full_grad(self, x: jax.Array) -> jax.Array:
    return jax.grad(self.full_loss)(x)

  def gap(self, x: jax.Array) -> jax.Array:
    """f(x) - f*, for ridge as ½(x-x*)ᵀH(x-x*) (exact, no cancellation near x*)."""
    if self.kind == "ridge":
      e = x - jnp.asarray(self.x_star)
      r = jnp.asarray(self.A) @ e
      return 0.5 * jnp.mean(r * r) + 0.5 * self.reg * jnp.sum(e * e)
    return self.full_loss(x) - self.f_star


def _haar_orthogonal(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  """An n×d matrix with orthonormal columns, Haar distributed."""
  q, r = np.linalg.qr(rng.standard_normal((n, d)))
  return q * np.sign(np.diag(r))


def ridge_regression(
  n: int = 100,
  d: int = 100,
  *,
  cond: float = 10.0,
  reg: float = 0.0,
  interpolated: bool = True,
  seed: int = 0,
) -> Problem:
  """Ridge regression with cond(A) = ``cond``, as in the SAM-SPS synthetic experiments.

  A = U S Vᵀ with Haar-random U (n×d), V (d×d) and singular values S geometric
  in [cond^{-1/2}, cond^{1/2}], so the Hessian AᵀA/n + reg·I has eigenvalues
  in [1/(cond·n), cond/n] + reg (condition number cond² when reg = 0; for
  n = d = 100, cond = 10: μ = 0.001, L = 0.1, as in the SAM-SPS reference).
  ``interpolated=True`` sets b = A x° for a random x°, so with reg = 0 every
  f_i is minimized at x* = x° and f* = 0; otherwise b ~ N(0, I).
  """
  if n < d:
    raise ValueError(f"`n` must be >= `d` (full column rank), got n={n}, d={d}.")
  if cond < 1:
    raise ValueError(f"`cond` must be >= 1, got {cond}.")
  if reg < 0:
    raise ValueError(f"`reg` must be >= 0, got {reg}.")
  rng = np.random.default_rng(seed)
  s = np.geomspace(cond**-0.5, cond**0.5, d)
  A = _haar_orthogonal(rng, n, d) * s @ _haar_orthogonal(rng, d, d).T
  if interpolated:
    b = A @ rng.standard_normal(d)
  else:
    b = rng.standard_normal(n)
  H = A.T @ A / n + reg * np.eye(d)
  x_star = np.linalg.solve(H, A.T @ b / n)
  eig = np.linalg.eigvalsh(H)
  row_sq = np.sum(A * A, axis=1)
  f_star = 0.5 * np.mean((A @ x_star - b) ** 2) + 0.5 * reg * x_star @ x_star
  if interpolated and reg == 0:
    f_star = 0.0  # exact: b is in the range of A
  # inf_x ½(aᵀx - b)² + (reg/2)‖x‖² = reg b² / (2(‖a‖² + reg)) (0 when reg = 0).
  f_i_inf = reg * b**2 / (2 * (row_sq + reg)) if reg > 0 else np.zeros(n)
  return Problem(
    name=f"ridge(n={n}, d={d}, cond(A)={cond:g}, reg={reg:g}"
    + (", interpolated" if interpolated and reg == 0 else "")
    + ")",
    kind="ridge",
    A=A,
    b=b,
    reg=float(reg),
    x_star=x_star,
    f_star=float(f_star),
    L=float(eig[-1]),
    mu=float(eig[0]),
    L_i=row_sq + reg,
    f_i_inf=f_i_inf,
    hessian_eigenvalues=eig,
  )


def _logistic_loss_grad_hess(A, y, reg, x):
  z = y * (A @ x)
  n = A.shape[0]
  loss = np.mean(np.logaddexp(0.0, -z)) + 0.5 * reg * x @ x
  s = 0.5 * (1.0 - np.tanh(0.5 * z))  # σ(-z), stable
  grad = -(A.T @ (y * s)) / n + reg * x
  w = s * (1.0 - s)
  hess = (A.T * w) @ A / n + reg * np.eye(A.shape[1])
  return loss, grad, hess


def logistic_regression(
  n: int = 200, d: int = 20, *, reg: float | None = None, seed: int = 0
) -> Problem:
  """L2-regularized logistic regression on Gaussian data (default reg = 1/n).

  Rows a_i ~ N(0, I/d) (so ‖a_i‖² ≈ 1 and L_i ≈ 1/4 + reg). Labels y_i = sign(a_iᵀx° + noise) in {-1, +1}. The minimizer is found by
  Newton's method (quadratic convergence, stopped at ‖∇f‖ ≤ 1e-15), so f* is
  exact to float64 round-off. μ = reg is the global strong-convexity constant
  (hence PL with μ), L = λ_max(AᵀA)/(4n) + reg.
  """
  if reg is None:
    reg = 1.0 / n
  if reg <= 0:
    raise ValueError(f"`reg` must be > 0 (a finite minimizer and μ > 0), got {reg}.")
  rng = np.random.default_rng(seed)
  A = rng.standard_normal((n, d)) / np.sqrt(d)
  y = np.sign(A @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n))
  y[y == 0] = 1.0
  x = np.zeros(d)
  for _ in range(100):
    _, g, h = _logistic_loss_grad_hess(A, y, reg, x)
    if np.linalg.norm(g) <= 1e-15:
      break
    x = x - np.linalg.solve(h, g)
  f_star, _, hess = _logistic_loss_grad_hess(A, y, reg, x)
  row_sq = np.sum(A * A, axis=1)
  # inf_x log(1+exp(-y aᵀx)) + (reg/2)‖x‖² is attained at x = α y a with
  # reg·α = σ(-α‖a‖²): a scalar monotone equation, solved by bisection.
  lo, hi = np.zeros(n), np.full(n, 1.0 / reg)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    too_big = reg * mid > 0.5 * (1.0 - np.tanh(0.5 * mid * row_sq))
    hi = np.where(too_big, mid, hi)
    lo = np.where(too_big, lo, mid)
  alpha = 0.5 * (lo + hi)
  f_i_inf = np.logaddexp(0.0, -alpha * row_sq) + 0.5 * reg * alpha**2 * row_sq
  return Problem(
    name=f"logistic(n={n}, d={d}, reg={reg:g})",
    kind="logistic",
    A=A,
    b=y,
    reg=float(reg),
    x_star=x,
    f_star=float(f_star),
    L=float(np.linalg.eigvalsh(A.T @ A / n)[-1] / 4 + reg),
    mu=float(reg),
    L_i=row_sq / 4 + reg,
    f_i_inf=f_i_inf,
    hessian_eigenvalues=np.linalg.eigvalsh(hess),
  )
