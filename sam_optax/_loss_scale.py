"""Dynamic loss scaling across both SAM passes (float16 training)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax import _protocol


class DynamicLossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    inner: the wrapped optimizer's state.
    scale: the current loss scale (float32).
    good_steps: finite steps since the scale last changed (int32).
    skipped: whether the last step was skipped for a non-finite gradient.
  """

  inner: optax.OptState
  scale: jax.Array
  good_steps: jax.Array
  skipped: jax.Array

  def sam_loss_scale(self) -> jax.Array:
    """The factor :func:`sam_step` multiplies the loss by in both passes."""
    return self.scale

  def sam_metrics(self) -> dict[str, jax.Array]:
    return {"loss_scale": self.scale, "skipped": self.skipped}


def dynamic_loss_scale(
  optimizer: optax.GradientTransformation,
  *,
  init_scale: float = 2.0**15,
  growth_interval: int = 2000,
  growth_factor: float = 2.0,
  backoff_factor: float = 0.5,
  min_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a SAM optimizer with dynamic loss scaling for float16 training.

  :func:`sam_step` reads the scale from the state (its ``sam_loss_scale()``) and
  multiplies the loss by it in *both* passes; this wrapper divides each pass's gradient
  (and the perturbed loss) by the scale before the optimizer uses them. If
  either pass produces a non-finite gradient, or the step a non-finite update
  or state, the whole step is skipped: updates are zero, the inner state is
  left untouched, and the scale is multiplied by ``backoff_factor``. After
  ``growth_interval`` finite steps in a row the scale grows by ``growth_factor``
  (never to inf).

  Gradients and f(e) are unscaled by dividing by the scale in at least float32
  (float64 stays float64), then cast back to their dtype, so a large but finite
  scaled float16 gradient never turns into inf or NaN where the unscaled value is
  representable. A non-finite perturbed gradient also marks f(e) as NaN, so the
  step is skipped even when the descent would turn it into a finite update
  (SAM-SPS takes γ_t = 0 then).

  It wraps a one-pass optax optimizer the same way. Wrapping it twice is a
  ValueError (the loss would be scaled once and unscaled twice), and so is
  ``sam_step(..., ascent="local")`` (replicas could disagree on skipping).

  Args:
    optimizer: a two-pass optimizer (:func:`unified_sam`, :func:`sam_sps`, ...)
      or any optax optimizer.
    init_scale: the initial loss scale.
    growth_interval: finite steps between two increases of the scale.
    growth_factor: factor (> 1) applied when growing.
    backoff_factor: factor in (0, 1) applied after an overflow.
    min_scale: the scale never drops below this.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for use with :func:`sam_step`.

  References:
    Micikevicius et al., *Mixed Precision Training*, ICLR 2018, `arXiv:1710.03740 <https://arxiv.org/abs/1710.03740>`__.
  """
  _common.check_scalar_hyperparam(
    "init_scale", init_scale, low=0.0, low_open=True, allow_schedule=False
  )
  _common.check_scalar_hyperparam(
    "min_scale", min_scale, low=0.0, low_open=True, allow_schedule=False
  )
  # Concrete values are checked here; traced ones (optax.inject_hyperparams) are not.
  _common.check_scalar_hyperparam("growth_interval", growth_interval, low=1.0, allow_schedule=False)
  if _common.is_concrete_number(growth_interval) and int(growth_interval) != growth_interval:
    raise ValueError(f"`growth_interval` must be a positive int, got {growth_interval!r}.")
  _common.check_scalar_hyperparam(
    "growth_factor", growth_factor, low=1.0, low_open=True, allow_schedule=False
  )
  _common.check_scalar_hyperparam(
    "backoff_factor",
    backoff_factor,
    low=0.0,
    low_open=True,
    high=1.0,
    high_open=True,
    allow_schedule=False,
  )
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    inner = optimizer.init(params)
    if any(isinstance(n, DynamicLossScaleState) for n in _protocol.nodes(inner)):
      raise ValueError(
        "dynamic_loss_scale is nested inside another dynamic_loss_scale: the loss would "
        "be scaled once and unscaled twice. Wrap the optimizer once."
      )
    return DynamicLossScaleState(
      inner=inner,
      scale=jnp.asarray(init_scale, jnp.float32),
      good_steps=jnp.zeros([], jnp.int32),
      skipped=jnp.array(False),
    )

  def update_fn(
    updates, state, params=None, *, value_and_grad_fn=None, sam_context=None, **extra_args
  ):
    _protocol.check_local_ascent(
      sam_context,
      "dynamic_loss_scale",
      "its overflow check reads each replica's own gradient, so replicas could disagree "
      "on skipping a step (use bfloat16 instead of float16 for local ascent)",
    )

    def unscale(x):
      # In at least float32 (float64 stays float64), then back: a float16 gradient
      # scaled near its max (65504) unscales to a normal number, and 1/scale (which
      # can be below float16's range) is never formed in the leaf's dtype.
      x = jnp.asarray(x)
      dtype = jnp.promote_types(x.dtype, jnp.float32)
      return (x.astype(dtype) / state.scale.astype(dtype)).astype(x.dtype)

    grads = jax.tree.map(unscale, updates)
    if value_and_grad_fn is not None:

      def unscaled_value_and_grad(p):
        value, g = value_and_grad_fn(p)
        g = jax.tree.map(unscale, g)
        # A non-finite ∇f(e) must skip the step even where the descent maps it to a
        # finite update: reported in f(e), which the finite check below reads.
        value = _protocol.nan_unless_finite(value, g)
        return value / state.scale.astype(value.dtype), g

      extra_args["value_and_grad_fn"] = unscaled_value_and_grad
    if sam_context is not None:
      # A transform before this wrapper (chain(T, dynamic_loss_scale(sam))) would shape the
      # scaled gradient of the ascent only: refused, as for the SAM optimizer itself.
      _protocol.check_clean_gradient(updates, sam_context)
      # The unscaled gradient is the clean gradient the wrapped optimizer must see.
      extra_args["sam_context"] = sam_context._replace(clean_grads=grads)
    new_updates, new_inner = optimizer.update(grads, state.inner, params, **extra_args)
    finite = (
      _protocol.all_finite(grads)
      & _protocol.all_finite(new_updates)
      & _protocol.all_finite(new_inner)
    )

    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    grown = state.scale * growth_factor
    scale = jnp.where(
      finite,
      # Never grow into inf (1/inf would zero every gradient).
      jnp.where(grow & jnp.isfinite(grown), grown, state.scale),
      jnp.maximum(state.scale * backoff_factor, min_scale),
    )
    return new_updates, DynamicLossScaleState(
      inner=new_inner,
      scale=scale.astype(jnp.float32),
      good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
      skipped=~finite,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
