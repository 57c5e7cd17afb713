"""Dynamic loss scaling across both SAM passes (float16 training)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
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
  ``growth_interval`` finite steps in a row the scale grows by ``growth_factor``.

  Args:
    optimizer: a two-pass optimizer (:func:`unified_sam`, :func:`sam_sps`, ...).
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
  _common.check_scalar_hyperparam("init_scale", init_scale, low=0.0, low_open=True, allow_schedule=False)
  _common.check_scalar_hyperparam("min_scale", min_scale, low=0.0, low_open=True, allow_schedule=False)
  if not isinstance(growth_interval, int) or growth_interval < 1:
    raise ValueError(f"`growth_interval` must be a positive int, got {growth_interval!r}.")
  if not growth_factor > 1.0:
    raise ValueError(f"`growth_factor` must be > 1, got {growth_factor!r}.")
  if not 0.0 < backoff_factor < 1.0:
    raise ValueError(f"`backoff_factor` must be in (0, 1), got {backoff_factor!r}.")
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    return DynamicLossScaleState(
        inner=optimizer.init(params),
        scale=jnp.asarray(init_scale, jnp.float32),
        good_steps=jnp.zeros([], jnp.int32),
        skipped=jnp.array(False),
    )

  def update_fn(updates, state, params=None, *, value_and_grad_fn=None, **extra_args):
    inv_scale = 1.0 / state.scale

    def unscale(tree):
      return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv_scale).astype(g.dtype), tree)

    grads = unscale(updates)
    if value_and_grad_fn is not None:
      def unscaled_value_and_grad(p):
        value, g = value_and_grad_fn(p)
        return jnp.asarray(value, jnp.float32) * inv_scale, unscale(g)

      extra_args["value_and_grad_fn"] = unscaled_value_and_grad
    new_updates, new_inner = optimizer.update(grads, state.inner, params, **extra_args)
    finite = _all_finite(grads) & _all_finite(new_updates) & _all_finite(new_inner)

    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(
        finite,
        jnp.where(grow, state.scale * growth_factor, state.scale),
        jnp.maximum(state.scale * backoff_factor, min_scale),
    )
    return new_updates, DynamicLossScaleState(
        inner=new_inner,
        scale=scale.astype(jnp.float32),
        good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
        skipped=~finite,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
