"""Dynamic loss scaling across both SAM passes (float16 training)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _common


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


def _all_finite(tree) -> jax.Array:
  leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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

  :func:`sam_step` sees the :class:`DynamicLossScaleState` and multiplies the
  loss by ``scale`` in *both* passes; this wrapper divides each pass's gradient
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

  Args:
    optimizer: a two-pass optimizer (:func:`unified_sam`, :func:`sam_sps`, ...).
    init_scale: the initial loss scale.
    growth_interval: finite steps between two increases of the scale.
    growth_factor: factor (> 1) applied when growing.
    backoff_factor: factor in (0, 1) applied after an overflow.
    min_scale: the scale never drops below this.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for use with :func:`sam_step`.
  """
  _common.check_scalar_hyperparam("init_scale", init_scale, low=0.0, low_open=True, allow_schedule=False)
  _common.check_scalar_hyperparam("min_scale", min_scale, low=0.0, low_open=True, allow_schedule=False)
  if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) or (
      growth_interval < 1):
    raise ValueError(f"`growth_interval` must be a positive int, got {growth_interval!r}.")
  _common.check_scalar_hyperparam(
      "growth_factor", growth_factor, low=1.0, low_open=True, allow_schedule=False
  )
  _common.check_scalar_hyperparam(
      "backoff_factor", backoff_factor, low=0.0, low_open=True, high=1.0, high_open=True,
      allow_schedule=False,
  )
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    return DynamicLossScaleState(
        inner=optimizer.init(params),
        scale=jnp.asarray(init_scale, jnp.float32),
        good_steps=jnp.zeros([], jnp.int32),
        skipped=jnp.array(False),
    )

  def update_fn(updates, state, params=None, *, value_and_grad_fn=None, **extra_args):
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
        # finite update (SAM-SPS takes γ_t = 0 then): report it in f(e), which the
        # state keeps and the finite check below reads.
        value = jnp.asarray(value, jnp.promote_types(jnp.asarray(value).dtype, jnp.float32))
        value = jnp.where(_all_finite(g), value / state.scale.astype(value.dtype), jnp.nan)
        return value, g

      extra_args["value_and_grad_fn"] = unscaled_value_and_grad
    new_updates, new_inner = optimizer.update(grads, state.inner, params, **extra_args)
    finite = _all_finite(grads) & _all_finite(new_updates) & _all_finite(new_inner)

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
