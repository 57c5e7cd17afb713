"""Runs a sam_optax optimizer on a problem with ``lax.scan`` + ``jit``, ``vmap``-ed over trials.

Each step is :func:`sam_optax.sam_step` (the library's own two-pass step) on the
sampler's mini-batch; nothing here re-implements the SAM update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from examples.theory.problems import Problem
from examples.theory.samplers import Sampler


class Trace(NamedTuple):
  """What one run records, every ``record_every`` steps (and at t = 0).

  Attributes:
    t: (R+1,) iteration counts 0, k, 2k, …, T.
    gap: (trials, R+1) f(x_t) - f*.
    grad_sq: (trials, R+1) ‖∇f(x_t)‖² (full gradient).
    step_size: (trials, R) γ_t of the last step of each block, for optimizers
      that report one (SAM-SPS); None otherwise.
    step_size_min, step_size_max: (trials, R) extremes of γ_t within each block.
  """

  t: np.ndarray
  gap: np.ndarray
  grad_sq: np.ndarray
  step_size: np.ndarray | None
  step_size_min: np.ndarray | None
  step_size_max: np.ndarray | None

  @property
  def mean_gap(self) -> np.ndarray:
    """E[f(x_t) - f*] estimated by the mean over trials."""
    return self.gap.mean(axis=0)

  @property
  def relative_gap(self) -> np.ndarray:
    """(E f(x_t) - f*) / (f(x_0) - f*)."""
    return self.mean_gap / self.mean_gap[0]


def default_x0(problem: Problem, seed: int = 1) -> np.ndarray:
  """x0 ~ N(0, I_d) (as in both reference experiments), from a fixed seed."""
  return np.random.default_rng(seed).standard_normal(problem.d)


def run(
  problem: Problem,
  optimizer: optax.GradientTransformationExtraArgs,
  sampler: Sampler,
  *,
  steps: int,
  record_every: int = 1,
  trials: int = 1,
  seed: int = 0,
  x0: np.ndarray | None = None,
) -> Trace:
  """Runs ``trials`` independent copies of ``steps`` iterations of ``optimizer``.

  Args:
    problem: the finite-sum problem (its weighted mini-batch loss is optimized).
    optimizer: a two-pass sam_optax optimizer (``unified_sam``, ``sam_sps`` or
      ``sharpness_aware(perturbation, descent)``).
    sampler: draws each step's mini-batch.
    steps: number of iterations T (a multiple of ``record_every``).
    record_every: evaluate f(x_t) - f* and ‖∇f(x_t)‖² every this many steps.
    trials: independent runs (different sampling keys, same x0), vmapped.
    seed: seed of the sampling keys; trial i uses fold_in(PRNGKey(seed), i).
    x0: the starting point (default :func:`default_x0`).

  Returns:
    A :class:`Trace` of NumPy arrays.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
  if not isinstance(record_every, int) or record_every < 1 or steps % record_every:
    raise ValueError(
      f"`record_every` must be a positive int dividing steps={steps}, got {record_every!r}."
    )
  if not isinstance(trials, int) or trials < 1:
    raise ValueError(f"`trials` must be a positive int, got {trials!r}.")
  if sampler.n != problem.n:
    raise ValueError(f"`sampler` is over n={sampler.n} functions, the problem has n={problem.n}.")
  x0 = jnp.asarray(default_x0(problem) if x0 is None else x0)
  records = steps // record_every
  step = sam_optax.sam_step(problem.loss, optimizer, jit=False, donate=False)
  reports_step_size = "step_size" in jax.eval_shape(
    lambda x: step(x, optimizer.init(x), sampler(jax.random.PRNGKey(0)))[2], x0
  )

  def measure(x):
    return problem.gap(x), jnp.sum(problem.full_grad(x) ** 2)

  def one_step(carry, key):
    x, state = carry
    x, state, metrics = step(x, state, sampler(key))
    return (x, state), metrics.get("step_size", jnp.zeros([], x.dtype))

  def block(carry, keys):
    carry, gammas = jax.lax.scan(one_step, carry, keys)
    gap, grad_sq = measure(carry[0])
    return carry, (gap, grad_sq, gammas[-1], gammas.min(), gammas.max())

  def single(key):
    keys = jax.random.split(key, steps).reshape(records, record_every, -1)
    _, (gap, grad_sq, gamma, gamma_min, gamma_max) = jax.lax.scan(
      block, (x0, optimizer.init(x0)), keys
    )
    gap0, grad_sq0 = measure(x0)
    return (
      jnp.concatenate([gap0[None], gap]),
      jnp.concatenate([grad_sq0[None], grad_sq]),
      gamma,
      gamma_min,
      gamma_max,
    )

  base = jax.random.PRNGKey(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(trials))
  gap, grad_sq, gamma, gamma_min, gamma_max = jax.jit(jax.vmap(single))(keys)
  to_np = lambda a: np.asarray(a) if reports_step_size else None
  return Trace(
    t=np.arange(records + 1) * record_every,
    gap=np.asarray(gap),
    grad_sq=np.asarray(grad_sq),
    step_size=to_np(gamma),
    step_size_min=to_np(gamma_min),
    step_size_max=to_np(gamma_max),
  )


def fitted_slope(t: np.ndarray, gap: np.ndarray, *, lo: float, hi: float) -> float:
  """Least-squares slope of log(gap) against t over the points with lo ≤ gap/gap[0] ≤ hi.

  The window keeps the linear phase: below ``hi`` the start-up transient is
  gone, above ``lo`` a neighbourhood floor or round-off does not flatten it.
  """
  rel = gap / gap[0]
  keep = (rel >= lo) & (rel <= hi)
  if keep.sum() < 3:
    raise ValueError(f"fewer than 3 points with {lo} <= gap/gap[0] <= {hi}; run longer.")
  return float(np.polyfit(t[keep], np.log(gap[keep]), 1)[0])
