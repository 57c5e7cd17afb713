"""Two-pass SAM optimizers: a perturbation and a descent composed into one transform."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
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

  def update_fn(updates, state, params=None, *, value_and_grad_fn=None, **extra_args):
    if params is None:
      raise ValueError("A SAM optimizer's update needs `params` (the point x).")
    if value_and_grad_fn is None:
      raise ValueError(
          "A SAM optimizer's update needs the keyword argument "
          "`value_and_grad_fn(params) -> (loss, grads)` to evaluate the perturbed "
          "point; or use sam_optax.sam_step, which passes it for you."
      )
    delta, perturbation_state = perturbation.update(updates, state.perturbation, params)
    perturbed_params = optax.apply_updates(params, delta)
    perturbed_loss, perturbed_grads = value_and_grad_fn(perturbed_params)
    extra_args = {**extra_args, "value": perturbed_loss, "perturbation": delta}
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


def unified_sam(
    base_optimizer: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.05,
    lambd: Any = 1.0,
    *,
    norm: str = "l2",
    eps: float = 1e-12,
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
    ['grad_norm', 'lambda', 'loss', 'perturbed_loss', 'rho', 'sharpness']

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
    eps: float = 1e-12,
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
