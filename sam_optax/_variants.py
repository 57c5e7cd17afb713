"""Cheaper and corrected SAM steps: interval SAM, LookSAM and GSAM.

Each variant wraps a two-pass optimizer (:func:`unified_sam`, :func:`sam_sps`,
:func:`sharpness_aware`, or another wrapper) and changes only what it hands to
the descent; the perturbation, the descent and :func:`sam_step` are reused as
they are.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _common
from sam_optax import _protocol
from sam_optax._loss_scale import DynamicLossScaleState
from sam_optax._polyak import PolyakStepSizeState
from sam_optax._sam import SAMState


class IntervalSAMState(NamedTuple):
  """State of :func:`interval_sam` and :func:`looksam`.

  Attributes:
    count: steps taken so far (int32); step ``count + 1`` is a full SAM step
      when ``count % every == 0``.
    inner: the wrapped two-pass optimizer's state (it holds the
      :class:`SAMState`).
    orthogonal: LookSAM's g_v, the part of the last SAM gradient orthogonal to
      the clean gradient (None for :func:`interval_sam`).
    orthogonal_norm: ‖g_v‖ (None for :func:`interval_sam`).
  """

  count: jax.Array
  inner: optax.OptState
  orthogonal: optax.Updates | None
  orthogonal_norm: jax.Array | None


def _find(tree: Any, cls: type) -> Any:
  return next((n for n in _protocol.nodes(tree) if isinstance(n, cls)), None)


def _orthogonal_part(v: Any, u: Any) -> tuple[Any, jax.Array]:
  r"""The component of `v` orthogonal to `u`, :math:`v - (\langle v,u\rangle/\|u\|^2)\,u`.

  Returned in `v`'s leaf dtypes (computed in at least float32) with its global
  norm. A zero `u` has no direction to remove: the result is `v`. The
  coefficient and the norm are overflow-safe (finite for 1e20 float32 inputs).
  """
  dtype = _common.accumulation_dtype(v)
  coef = _common.tree_projection(v, u, dtype)
  out = jax.tree.map(lambda a, b: (a.astype(dtype) - coef * b.astype(dtype)).astype(a.dtype), v, u)
  return out, _common.tree_norm(out, dtype)


def _is_traced_int(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer) or (
    isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer)
  )


def _check_two_pass(optimizer: Any, name: str) -> optax.GradientTransformationExtraArgs:
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(
      f"`optimizer` of {name} must be a two-pass optax transformation "
      f"(sam_optax.unified_sam, sam_sps, ...), got {optimizer!r}."
    )
  return optax.with_extra_args_support(optimizer)


def _check_inner_state(state: Any, name: str) -> None:
  if _find(state, SAMState) is None:
    raise TypeError(
      f"{name} wraps a two-pass optimizer (sam_optax.unified_sam, sam_sps, "
      "sharpness_aware); the given optimizer's state has no SAMState."
    )


def _need_value_and_grad_fn(value_and_grad_fn: Any, name: str) -> None:
  if value_and_grad_fn is None:
    raise ValueError(
      f"{name}'s update needs the keyword argument `value_and_grad_fn(params) "
      "-> (loss, grads)`; or use sam_optax.sam_step, which passes it for you."
    )


def _every_k(
  optimizer: Any, every: int, alpha: Any, name: str
) -> optax.GradientTransformationExtraArgs:
  """interval_sam (alpha None) and looksam: one implementation of both."""
  optimizer = _check_two_pass(optimizer, name)
  # A traced `every` (optax.inject_hyperparams) is used as is; a concrete one is checked.
  if not _is_traced_int(every) and (
    isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1
  ):
    raise ValueError(f"`every` must be a positive int, got {every!r}.")
  reuse = alpha is not None
  why_local = "its descent uses the clean gradient, each replica's (or group's) own in local mode"

  def init_fn(params):
    inner = optimizer.init(params)
    _check_inner_state(inner, name)
    if _find(inner, PolyakStepSizeState) is not None:
      raise ValueError(
        f"{name} cannot wrap the Polyak step size (sam_sps): on the skipped steps "
        "it would need the clean loss f(x), which the optimizer is not given."
      )
    if _find(inner, DynamicLossScaleState) is not None:
      raise ValueError(
        f"Wrap dynamic_loss_scale around {name}, not inside it: dynamic_loss_scale({name}(...))."
      )
    if not reuse:
      return IntervalSAMState(jnp.zeros([], jnp.int32), inner, None, None)
    return IntervalSAMState(
      count=jnp.zeros([], jnp.int32),
      inner=inner,
      orthogonal=jax.tree.map(jnp.zeros_like, params),
      orthogonal_norm=jnp.zeros([], _common.accumulation_dtype(params)),
    )

  def update_fn(
    updates, state, params=None, *, value_and_grad_fn=None, sam_context=None, **extra_args
  ):
    _need_value_and_grad_fn(value_and_grad_fn, name)
    _protocol.check_local_ascent(sam_context, name, why_local)
    last_perturbed_loss = _find(state.inner, SAMState).perturbed_loss
    if reuse:
      # LookSAM's weight α‖g‖/‖g_v‖, computed outside the cond, where XLA merges
      # ‖g‖ with the perturbation's own.
      dtype = _common.accumulation_dtype(updates)
      grad_norm = _common.tree_norm(updates, dtype)
      v_norm = state.orthogonal_norm.astype(dtype)
      positive = v_norm > 0
      # α ← max(α, 0) if injected; the ratio first, so α‖g‖ cannot overflow.
      alpha_t = _common.clip_traced(jnp.asarray(alpha, dtype), 0.0)
      coef = jnp.where(positive, alpha_t * (grad_norm / jnp.where(positive, v_norm, 1.0)), 0.0)

    def perturbed_pass(e):
      value, grads = value_and_grad_fn(e)
      # In the state's dtype, as the other branch's: a float16 loss would not match it.
      value = jnp.asarray(value, last_perturbed_loss.dtype)
      if not reuse:
        return value, grads, state.orthogonal, state.orthogonal_norm
      orthogonal, norm = _orthogonal_part(grads, updates)
      return value, grads, orthogonal, norm.astype(state.orthogonal_norm.dtype)

    def no_perturbed_pass(e):
      del e  # the clean gradient stands in for ∇f(e); LookSAM adds the reused g_v
      if not reuse:
        return last_perturbed_loss, updates, state.orthogonal, state.orthogonal_norm
      grads = jax.tree.map(
        lambda g, v: (g.astype(dtype) + coef * v.astype(dtype)).astype(g.dtype),
        updates,
        state.orthogonal,
      )
      return last_perturbed_loss, grads, state.orthogonal, state.orthogonal_norm

    new_orthogonal = []

    perturb = None if sam_context is None else sam_context.perturb
    if isinstance(every, int) and every == 1:
      perturb = True
    elif (
      isinstance(every, int) and sam_context is not None and sam_context.host_selectors is not None
    ):
      # Offer the step to choose this step's kind on the host (two compiled programs):
      # XLA:CPU runs convolution gradients far slower inside a cond branch.
      sam_context.host_selectors.append((state, lambda node: int(node.count) % every == 0))

    def value_and_grad_at(e):  # the wrapped optimizer calls this once, at e = x + δ
      if perturb is None:
        is_sam_step = state.count % every == 0
        value, grads, *orthogonal = _common.cond(is_sam_step, perturbed_pass, no_perturbed_pass, e)
      else:
        value, grads, *orthogonal = (perturbed_pass if perturb else no_perturbed_pass)(e)
      new_orthogonal.extend(orthogonal)
      return value, grads

    if sam_context is not None:
      extra_args["sam_context"] = sam_context
    new_updates, inner = optimizer.update(
      updates, state.inner, params, value_and_grad_fn=value_and_grad_at, **extra_args
    )
    orthogonal, orthogonal_norm = new_orthogonal
    new_state = IntervalSAMState(
      count=optax.safe_increment(state.count),
      inner=inner,
      orthogonal=orthogonal,
      orthogonal_norm=orthogonal_norm,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def interval_sam(optimizer: Any, every: int = 5) -> optax.GradientTransformationExtraArgs:
  r"""Interval SAM: a full SAM step every ``every`` steps, the base optimizer alone between.

  Steps t = 1, 1 + k, 1 + 2k, ... (t counts from 1, k = ``every``) are full
  two-pass steps of ``optimizer``; on the others the descent receives the clean
  gradient g = ∇f(x) and the perturbed pass is not evaluated, so they cost one
  forward/backward pass, as in MosaicML Composer's SAM ``interval``. The choice
  is made inside the compiled step with ``jax.lax.cond``: one compilation, and
  the average cost per step is (k + 1)/k passes.

  Only the perturbed pass sits inside the ``cond``: the wrapped optimizer's
  ``update`` runs on every step, so the base optimizer's count and schedules
  advance every step, and so does the perturbation's count: ρ_t and λ_t are
  schedules of the step number, not of the number of SAM steps (the skipped
  steps still compute ‖g‖, δ and e, which are cheap). On skipped steps the
  state's ``perturbed_loss`` (and so :func:`sam_step`'s ``perturbed_loss`` and
  ``sharpness`` metrics) keep the value of the last SAM step.

  ``every = 1`` runs the wrapped optimizer unchanged, bit for bit.

  On CPU, XLA does not take its fast convolution path inside a ``cond``
  branch (jax-ml/jax#12868), so with a convolutional model the SAM steps
  become much slower there; GPUs and TPUs, and dense models on CPU, are not
  affected.

  Args:
    optimizer: a two-pass optimizer: :func:`unified_sam`,
      :func:`sharpness_aware`, :func:`gsam`, ... Not :func:`sam_sps` (its
      Polyak step would need f(x) on the skipped steps); wrap
      :func:`dynamic_loss_scale` around this one, not inside it.
    every: k ≥ 1, the number of steps per SAM step.

  Returns:
    A two-pass transformation with state :class:`IntervalSAMState`; drive it
    with :func:`sam_step`.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
    >>> opt = sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), every=5)
    >>> params = {"w": jnp.ones(3)}
    >>> step = sam_optax.sam_step(loss, opt, donate=False)
    >>> params, state, metrics = step(params, opt.init(params), jnp.eye(3))
    >>> int(state.count)
    1
  """
  return _every_k(optimizer, every, None, "interval_sam")


def looksam(
  optimizer: Any, every: int = 5, alpha: float = 0.7
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM (Liu et al., 2022): interval SAM that reuses the SAM direction between SAM steps.

  On the full SAM steps (t = 1, 1 + k, ...), with g = ∇f(x) and
  :math:`g_s = \nabla f(e)`, the part of g_s orthogonal to g is stored,

  .. math::
    g_v = g_s - \|g_s\| \cos\theta \,\frac{g}{\|g\|}
        = g_s - \frac{\langle g, g_s\rangle}{\|g\|^2}\, g ,

  and the descent gets g_s as usual. On the other steps only the clean pass
  runs and the descent gets

  .. math::
    g + \alpha \frac{\|g\|}{\|g_v\|}\, g_v .

  α = 0 is :func:`interval_sam`. Counts, schedules and metrics behave as in
  :func:`interval_sam`; the state also holds g_v (one copy of the parameters).

  Args:
    optimizer: a two-pass optimizer, as for :func:`interval_sam`.
    every: k ≥ 1, the number of steps per SAM step (the paper's k).
    alpha: α ≥ 0, the weight of the reused direction (a traced value is
      clipped to ≥ 0; NaN counts as 0).

  Returns:
    A two-pass transformation with state :class:`IntervalSAMState`.

  References:
    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*,
    CVPR 2022, `arXiv:2203.02714 <https://arxiv.org/abs/2203.02714>`__.
  """
  _common.check_scalar_hyperparam("alpha", alpha, low=0.0, allow_schedule=False)
  return _every_k(optimizer, every, alpha, "looksam")


def gsam(optimizer: Any, alpha: float = 0.1) -> optax.GradientTransformationExtraArgs:
  r"""GSAM (Zhuang et al., 2022): SAM's descent minus the clean gradient's orthogonal part.

  With g = ∇f(x) and :math:`g_s = \nabla f(e)` from the wrapped two-pass
  optimizer, the descent receives

  .. math::
    g_s - \alpha\, g_\perp, \qquad
    g_\perp = g - \frac{\langle g, g_s\rangle}{\|g_s\|^2}\, g_s ,

  which descends the perturbed loss while raising the clean loss only along a
  direction orthogonal to g_s, shrinking the surrogate gap f(e) - f(x).
  α = 0 is the wrapped optimizer, bit for bit. GSAM ties ρ to the learning rate:
  pass ``rho=gsam_rho_schedule(...)`` to :func:`unified_sam`. Everything the
  descent does with the gradient (momentum, the Polyak step of
  :func:`sam_sps`) uses the corrected one.

  Args:
    optimizer: a two-pass optimizer (:func:`unified_sam`, :func:`sam_sps`,
      :func:`sharpness_aware`).
    alpha: α ≥ 0; may be traced (``optax.inject_hyperparams``), where a
      negative or NaN value is clipped to 0.

  Returns:
    A two-pass transformation; its state is the wrapped optimizer's, unchanged.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, 1000)
    >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01, lr_max=0.1, lr_min=0.0)
    >>> opt = sam_optax.gsam(sam_optax.unified_sam(optax.sgd(lr), rho=rho), alpha=0.1)

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware
    Training*, ICLR 2022, `arXiv:2203.08065 <https://arxiv.org/abs/2203.08065>`__.
  """
  _common.check_scalar_hyperparam("alpha", alpha, low=0.0, allow_schedule=False)
  optimizer = _check_two_pass(optimizer, "gsam")

  def init_fn(params):
    state = optimizer.init(params)
    _check_inner_state(state, "gsam")
    return state

  def update_fn(
    updates, state, params=None, *, value_and_grad_fn=None, sam_context=None, **extra_args
  ):
    _need_value_and_grad_fn(value_and_grad_fn, "gsam")
    _protocol.check_local_ascent(
      sam_context,
      "gsam",
      "its descent uses the clean gradient, each replica's (or group's) own in local mode",
    )
    if sam_context is not None:
      extra_args["sam_context"] = sam_context

    def corrected_value_and_grad(p):
      value, perturbed_grads = value_and_grad_fn(p)
      clean_orthogonal, _ = _orthogonal_part(updates, perturbed_grads)
      dtype = _common.accumulation_dtype(perturbed_grads)
      alpha_t = _common.clip_traced(jnp.asarray(alpha, dtype), 0.0)  # α ← max(α, 0) if injected
      grads = jax.tree.map(
        lambda gs, go: (gs.astype(dtype) - alpha_t * go.astype(dtype)).astype(gs.dtype),
        perturbed_grads,
        clean_orthogonal,
      )
      return value, grads

    return optimizer.update(
      updates, state, params, value_and_grad_fn=corrected_value_and_grad, **extra_args
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gsam_rho_schedule(
  learning_rate: optax.ScalarOrSchedule,
  rho_max: float,
  rho_min: float = 0.0,
  *,
  lr_max: float,
  lr_min: float = 0.0,
  every_k: int = 1,
) -> optax.Schedule:
  r"""GSAM's radius, tied to the learning rate: ρ_t moves with lr_t between ρ_min and ρ_max.

  .. math::
    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})
      \frac{\mathrm{lr}_t - \mathrm{lr}_{\min}}{\mathrm{lr}_{\max} - \mathrm{lr}_{\min}} .

  With ``lr_max == lr_min`` (a constant learning rate) ρ_t = ρ_max. The
  schedule is called with the perturbation's 0-based count, which advances
  once per ``update`` call like the base optimizer's (also under
  :func:`interval_sam`), so ρ_t follows the learning rate actually used. With
  ``optax.MultiSteps(base, every_k_schedule=k)`` inside :func:`unified_sam`, the
  base optimizer's count (and so its learning rate) advances once every k calls
  while the perturbation's advances every call: pass ``every_k=k`` so that ρ_t
  follows lr at ``count // k``.

  Args:
    learning_rate: the base optimizer's learning rate, a float or schedule.
    rho_max: ρ at the peak learning rate.
    rho_min: ρ at the lowest learning rate (≤ ρ_max).
    lr_max: the peak learning rate of the schedule.
    lr_min: its lowest value (≤ lr_max), e.g. 0 for a decay to zero.
    every_k: the base optimizer's update calls per learning-rate step (the k of
      an ``optax.MultiSteps`` inside the base optimizer); 1 otherwise.

  Returns:
    An optax schedule for the ``rho`` argument of :func:`unified_sam`.
  """
  for name, value in (
    ("rho_max", rho_max),
    ("rho_min", rho_min),
    ("lr_max", lr_max),
    ("lr_min", lr_min),
  ):
    _common.check_scalar_hyperparam(name, value, low=0.0, allow_schedule=False)
  if not rho_min <= rho_max:
    raise ValueError(f"`rho_min` must be <= `rho_max`, got {rho_min!r} > {rho_max!r}.")
  if not lr_min <= lr_max:
    raise ValueError(f"`lr_min` must be <= `lr_max`, got {lr_min!r} > {lr_max!r}.")
  _common.check_scalar_hyperparam("learning_rate", learning_rate, low=0.0)
  if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f"`every_k` must be a positive int, got {every_k!r}.")
  span = lr_max - lr_min

  def schedule(count):
    if span == 0:
      return rho_max
    lr = _common.resolve(learning_rate, count // every_k if every_k > 1 else count)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / span

  return schedule
