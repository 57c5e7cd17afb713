"""Adaptive-step SAM baselines as optax transformations on top of sam_optax.

Each method is ``sam_optax.sharpness_aware(perturbation, descent)``: the
library's two-pass composition with a perturbation (ascent) transformation and
a descent transformation; only the per-coordinate or per-norm *scalings* are
new here. The rules follow the papers (see README.md for the choices made
where a detail is open); ``eps`` enters as the initial accumulator ε², not as an
additive constant in the denominator, as in the SAM-SPS reference code.

* :func:`adasam` (Sun et al., 2024): SAM ascent, AMSGrad descent without bias
  correction.
* :func:`lightsam` (Cheng et al., 2025): I = AdaGrad-Norm, II = AdaGrad,
  III = Adam-type moments, in *both* the ascent and the descent.
* :func:`sa_sam`: the SAM step with the locally-adaptive step size of Malitsky
  & Mishchenko (2020), η_t from a local smoothness estimate, and ρ_t = √η_t.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_optax


class ScaleByMomentsState(NamedTuple):
  m: optax.Updates
  v: optax.Updates
  v_max: optax.Updates


def scale_by_moments(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-12, *, amsgrad: bool = False
) -> optax.GradientTransformation:
  """u = m_t / √v_t (or / √max_{s≤t} v_s with ``amsgrad``), no bias correction.

  m_t = b1 m_{t-1} + (1-b1) g_t, v_t = b2 v_{t-1} + (1-b2) g_t², with m_0 = 0
  and v_0 = ε²: the moments of AdaSAM's Algorithm 1 and of LightSAM-III.
  """

  def init_fn(params):
    eps2 = jax.tree.map(lambda p: jnp.full_like(p, eps**2), params)
    return ScaleByMomentsState(jax.tree.map(jnp.zeros_like, params), eps2, eps2)

  def update_fn(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, updates)
    v_max = jax.tree.map(jnp.maximum, state.v_max, v) if amsgrad else v
    out = jax.tree.map(lambda m, v: m / jnp.sqrt(v), m, v_max)
    return out, ScaleByMomentsState(m, v, v_max)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdagradNormState(NamedTuple):
  sum_sq: jax.Array


def scale_by_adagrad_norm(eps: float = 1e-12) -> optax.GradientTransformation:
  """u = g_t / √(ε² + Σ_{s≤t} ‖g_s‖²): AdaGrad-Norm's scalar step (global norm)."""

  def init_fn(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return ScaleByAdagradNormState(jnp.asarray(eps**2, dtype))

  def update_fn(updates, state, params=None):
    del params
    sum_sq = state.sum_sq + sum(jnp.sum(g * g) for g in jax.tree.leaves(updates))
    scale = 1.0 / jnp.sqrt(sum_sq)
    return jax.tree.map(lambda g: scale * g, updates), ScaleByAdagradNormState(sum_sq)

  return optax.GradientTransformation(init_fn, update_fn)


def adasam(
  learning_rate: float, rho: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-12
) -> optax.GradientTransformationExtraArgs:
  """AdaSAM: δ = ρ g/‖g‖ (SAM), x ← x - γ m_t/√v̂_t (AMSGrad, no bias correction)."""
  return sam_optax.sharpness_aware(
    sam_optax.unified_perturbation(rho=rho, lambd=1.0),
    optax.chain(scale_by_moments(b1, b2, eps, amsgrad=True), optax.scale(-learning_rate)),
  )


def lightsam(
  variant: str,
  learning_rate: float,
  rho: float,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  """LightSAM-I/II/III: the same adaptive scaling in the ascent (×ρ) and the descent (×-η).

  ``variant`` "I": AdaGrad-Norm, "II": AdaGrad (coordinate-wise), "III":
  Adam-type moments m/√v without bias correction. The ascent and the descent
  keep separate accumulators (u_t for the gradient at x, v_t for the gradient
  at the perturbed point).
  """

  def scaling():
    if variant == "I":
      return scale_by_adagrad_norm(eps)
    if variant == "II":
      return optax.scale_by_rss(initial_accumulator_value=eps**2, eps=0.0)
    if variant == "III":
      return scale_by_moments(b1, b2, eps)
    raise ValueError(f"`variant` must be 'I', 'II' or 'III', got {variant!r}.")

  return sam_optax.sharpness_aware(
    optax.chain(scaling(), optax.scale(rho)),
    optax.chain(scaling(), optax.scale(-learning_rate)),
  )


class SASAMState(NamedTuple):
  count: jax.Array
  prev_params: optax.Params
  eta: jax.Array  # η_{t-1}
  theta: jax.Array  # θ_{t-1} = η_{t-1}/η_{t-2} (+inf before the second step)
  inner: optax.OptState


def sa_sam(eta0: float) -> optax.GradientTransformationExtraArgs:
  """SA-SAM: SAM with η_t from a local smoothness estimate and ρ_t = √η_t.

  η_0 = ``eta0``; for t ≥ 1, on the current mini-batch ξ_t,

      η_t = min(‖x_t - x_{t-1}‖ / (2‖∇f_ξt(x_t) - ∇f_ξt(x_{t-1})‖), √(1+θ_{t-1}) η_{t-1}),

  θ_t = η_t/η_{t-1} (θ_0 = +∞), then the SAM step
  x_{t+1} = x_t - η_t ∇f_ξt(x_t + ρ_t g/‖g‖). The gradient at x_{t-1} is a third
  pass through ``value_and_grad_fn``; the SAM step itself is
  ``sharpness_aware(unified_perturbation(λ=1), sgd)`` with (ρ_t, η_t) injected.
  """
  inner = sam_optax.sharpness_aware(
    optax.inject_hyperparams(sam_optax.unified_perturbation, static_args=("lambd",))(
      rho=float(eta0) ** 0.5, lambd=1.0
    ),
    optax.inject_hyperparams(optax.sgd)(learning_rate=float(eta0)),
  )

  def init_fn(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return SASAMState(
      count=jnp.zeros([], jnp.int32),
      prev_params=params,
      eta=jnp.asarray(eta0, dtype),
      theta=jnp.asarray(jnp.inf, dtype),
      inner=inner.init(params),
    )

  def update_fn(updates, state, params=None, *, value_and_grad_fn=None, **extra_args):
    if value_and_grad_fn is None or params is None:
      raise ValueError("sa_sam's update needs `params` and `value_and_grad_fn`.")
    _, prev_grads = value_and_grad_fn(state.prev_params)
    grad_diff = optax.tree.norm(optax.tree.sub(updates, prev_grads))
    step = optax.tree.norm(optax.tree.sub(params, state.prev_params))
    local = jnp.where(grad_diff > 0, step / (2 * jnp.where(grad_diff > 0, grad_diff, 1.0)), jnp.inf)
    eta = jnp.minimum(local, jnp.sqrt(1 + state.theta) * state.eta)
    eta = jnp.where((state.count == 0) | ~jnp.isfinite(eta), state.eta, eta)
    theta = jnp.where(state.count == 0, jnp.inf, eta / state.eta)

    pert, desc, f_e = state.inner
    pert = pert._replace(hyperparams={**pert.hyperparams, "rho": jnp.sqrt(eta)})
    desc = desc._replace(hyperparams={**desc.hyperparams, "learning_rate": eta})
    new_updates, new_inner = inner.update(
      updates,
      sam_optax.SAMState(pert, desc, f_e),
      params,
      value_and_grad_fn=value_and_grad_fn,
      **extra_args,
    )
    return new_updates, SASAMState(
      count=optax.safe_increment(state.count),
      prev_params=params,
      eta=eta.astype(state.eta.dtype),
      theta=theta.astype(state.theta.dtype),
      inner=new_inner,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
