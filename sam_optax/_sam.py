"""Two-pass SAM optimizers: a perturbation and a descent composed into one transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax import _protocol
from sam_optax._perturbation import unified_perturbation
from sam_optax._polyak import polyak_step_size

ValueAndGradFn = Callable[[optax.Params], tuple[jax.Array, optax.Updates]]


class SAMState(NamedTuple):
  """State of a two-pass SAM optimizer (:func:`sharpness_aware`).

  Attributes:
    perturbation: state of the ascent transformation.
    descent: state of the descent transformation (the base optimizer).
    perturbed_loss: f(e) of the last step.
  """

  perturbation: optax.OptState
  descent: optax.OptState
  perturbed_loss: jax.Array

  sam_two_pass = True  # read by sam_step's checks (see _protocol)

  def sam_metrics(self) -> dict[str, jax.Array]:
    return {"perturbed_loss": self.perturbed_loss}


def sharpness_aware(
  perturbation: optax.GradientTransformation,
  descent: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Composes an ascent and a descent into one two-pass SAM transformation.

  One ``update`` performs a whole SAM step from the clean gradient g at x:

  1. ``δ = perturbation.update(g, ·, x)``, ``e = x + δ``;
  2. ``f(e), ∇f(e) = value_and_grad_fn(e)`` (the second forward/backward pass);
  3. ``u = descent.update(∇f(e), ·, x, value=f(e), perturbation=δ, **extra_args)``.

  The descent sees the unperturbed parameters x, so weight decay and any other
  parameter-dependent term are evaluated at x, and its output is applied to x.

  Under :func:`sam_step` the update also receives the ``sam_context`` extra
  argument: it refuses a gradient other than the one the step computed (a
  transform chained in front of it would shape only the ascent; put it in the
  descent or before the perturbation instead), averages its perturbation state
  over the replicas when the ascent is local, and passes the context on to the
  descent. When ``optax.masked`` or ``optax.multi_transform`` hand it a subset of
  the parameters, the step evaluates the other leaves at x in the perturbed pass.

  This is the "opaque" form: a plain optax loop calls
  ``tx.update(grads, state, params, value_and_grad_fn=...)`` once per step.
  :func:`sam_optax.sam_step` builds and jit-compiles that loop for you.

  Args:
    perturbation: maps the clean gradient to δ, e.g. :func:`unified_perturbation`.
    descent: any optax transformation; it receives ∇f(e) and the extra keyword
      arguments ``value`` (= f(e)) and ``perturbation`` (= δ), which plain optax
      transformations ignore and :func:`polyak_step_size` uses.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword-only argument ``value_and_grad_fn(params) -> (loss, grads)``; its
    state is a :class:`SAMState`.
  """
  descent = optax.with_extra_args_support(descent)

  def init_fn(params):
    return SAMState(
      perturbation=perturbation.init(params),
      descent=descent.init(params),
      perturbed_loss=jnp.zeros([], _common.accumulation_dtype(params)),
    )

  def update_fn(
    updates, state, params=None, *, value_and_grad_fn=None, sam_context=None, **extra_args
  ):
    if params is None:
      raise ValueError("A SAM optimizer's update needs `params` (the point x).")
    if value_and_grad_fn is None:
      raise ValueError(
        "A SAM optimizer's update needs the keyword argument "
        "`value_and_grad_fn(params) -> (loss, grads)` to evaluate the perturbed "
        "point; use sam_optax.sam_step, which passes it for you. If you did, a wrapper "
        "around the SAM optimizer dropped it: wrappers that take no extra arguments "
        "(optax.lookahead, optax.MultiSteps, GradientTransformation(...) built by hand) "
        "cannot hold a SAM optimizer. Put them inside the base optimizer, "
        "unified_sam(wrapper(base), ...); for gradient accumulation use "
        "sam_step(..., microbatches=k)."
      )
    _protocol.check_clean_gradient(updates, sam_context)
    if sam_context is None and _has_masked_node(params):
      raise ValueError(
        "A masked SAM optimizer (optax.masked / optax.multi_transform around it) in a "
        "plain loop would call your value_and_grad_fn with optax.MaskedNode leaves. "
        "Use sam_optax.sam_step, which evaluates the masked-out leaves at x."
      )
    local_axes = sam_context.local_axes if sam_context is not None else ()
    delta, perturbation_state = perturbation.update(updates, state.perturbation, params)
    # With a local ascent each replica has its own δ; their states are averaged so
    # that replicas stay identical.
    perturbation_state = _protocol.mean_floating(perturbation_state, local_axes)
    perturbed_params = optax.apply_updates(params, delta)
    perturbed_loss, perturbed_grads = _split_value(value_and_grad_fn(perturbed_params))
    extra_args = {**extra_args, "value": perturbed_loss, "perturbation": delta}
    if sam_context is not None:
      extra_args["sam_context"] = sam_context
    new_updates, descent_state = descent.update(
      perturbed_grads, state.descent, params, **extra_args
    )
    new_state = SAMState(
      perturbation=perturbation_state,
      descent=descent_state,
      perturbed_loss=jnp.asarray(perturbed_loss, state.perturbed_loss.dtype),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _split_value(out: Any) -> tuple[jax.Array, Any]:
  """``(loss, grads)`` from a value_and_grad_fn's output; ``((loss, aux), grads)`` is accepted."""
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError(
      f"`value_and_grad_fn(params)` must return a pair (loss, grads); got {type(out).__name__}."
    )
  value, grads = out
  if isinstance(value, (tuple, list)) and len(value) == 2:
    value = value[0]  # jax.value_and_grad(..., has_aux=True): the aux is not needed here
  try:
    shape = jnp.shape(value)
  except TypeError:
    shape = None
  if shape != ():
    raise TypeError(
      "`value_and_grad_fn(params)` must return (loss, grads) with a scalar loss; got a "
      f"loss of type {type(value).__name__} and shape {shape}."
    )
  return value, grads


def _has_masked_node(tree: Any) -> bool:
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


def unified_sam(
  base_optimizer: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.05,
  lambd: Any = 1.0,
  *,
  norm: str = "l2",
  eps: float | None = None,
  adaptive: bool = False,
  eta: float = 0.01,
  mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Unified SAM: the λ-perturbation followed by any optax optimizer.

  .. math::
    x_{t+1} = x_t + \mathrm{base}\!\left(\nabla f\big(x_t + \rho_t(1-\lambda_t
      + \lambda_t/\|g_t\|)\, g_t\big)\right), \qquad g_t = \nabla f(x_t).

  The base optimizer is updated with the gradient at the perturbed point and
  with ``params = x`` (the unperturbed point), so its weight decay acts at x.
  PyTorch's ``SGD(lr, momentum=μ, weight_decay=wd)`` is
  ``optax.chain(optax.add_decayed_weights(wd), optax.trace(μ), optax.scale(-lr))``.

  Args:
    base_optimizer: any optax transformation (chains, schedules,
      ``inject_hyperparams``, ``MultiSteps``, masked/partitioned optimizers).
    rho, lambd, norm, eps, adaptive, eta, mask: see :func:`unified_perturbation`.

  Returns:
    A two-pass transformation (see :func:`sharpness_aware`); drive it with
    :func:`sam_optax.sam_step` or call ``update(..., value_and_grad_fn=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
    >>> opt = sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, lambd="1-1/t")
    >>> params = {"w": jnp.ones(3)}
    >>> step = sam_optax.sam_step(loss, opt, donate=False)
    >>> params, state, metrics = step(params, opt.init(params), jnp.eye(3))
    >>> sorted(metrics)
    ['finite', 'grad_norm', 'lambda', 'loss', 'perturbed_loss', 'rho', 'sharpness']

  References:
    Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and
    Improved Rates*, ICLR 2025, `arXiv:2503.02225 <https://arxiv.org/abs/2503.02225>`__.
  """
  if not hasattr(base_optimizer, "init") or not hasattr(base_optimizer, "update"):
    raise ValueError(
      f"`base_optimizer` must be an optax GradientTransformation, got {base_optimizer!r}."
    )
  perturbation = unified_perturbation(
    rho, lambd, norm=norm, eps=eps, adaptive=adaptive, eta=eta, mask=mask
  )
  return sharpness_aware(perturbation, base_optimizer)


def sam_sps(
  rho: optax.ScalarOrSchedule = 0.1,
  lambd: Any = 1.0,
  f_star: optax.ScalarOrSchedule = 0.0,
  gamma_b: optax.ScalarOrSchedule = 1.0,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  *,
  norm: str = "l2",
  eps: float | None = None,
  adaptive: bool = False,
  eta: float = 0.01,
  mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM-SPS: SAM (or USAM) with the Stochastic Polyak step size; no learning rate.

  .. math::
    e = x + \delta,\quad
    \gamma_t = \min\!\left(\left[\frac{f(e) - f^* - \langle\nabla f(e), \delta\rangle}
      {\|\nabla f(e)\|^2}\right]_+, \gamma_b\right),\quad
    x \leftarrow x - \gamma_t(\nabla f(e) + \mathrm{wd}\cdot x).

  δ is the λ-perturbation of :func:`unified_perturbation` (λ = 0: USAM-SPS,
  λ = 1: SAM-SPS). γ_t is reported by :func:`sam_step` as ``step_size`` and kept
  in the state's :class:`PolyakStepSizeState`.

  Args:
    rho: radius ρ (float or schedule).
    lambd: λ as in :func:`unified_perturbation`.
    f_star: lower bound on the mini-batch loss (0 for non-negative losses).
    gamma_b: the cap γ_b > 0.
    weight_decay: L2 coefficient applied in the final update, at x.
    norm, eps, adaptive, eta, mask: see :func:`unified_perturbation`.

  References:
    Oikonomou & Loizou, *Adaptive Sharpness-Aware Minimization with a Polyak-type
    Step Size: A Theory-Grounded Scheduler*, 2026, `arXiv:2606.01827 <https://arxiv.org/abs/2606.01827>`__.
  """
  perturbation = unified_perturbation(
    rho, lambd, norm=norm, eps=eps, adaptive=adaptive, eta=eta, mask=mask
  )
  descent = polyak_step_size(f_star, gamma_b, weight_decay=weight_decay, eps=eps)
  return sharpness_aware(perturbation, descent)
