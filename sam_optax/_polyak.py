"""The Stochastic Polyak step size of SAM-SPS as a GradientTransformationExtraArgs."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax import _protocol


class PolyakStepSizeState(NamedTuple):
  """State of :func:`polyak_step_size`.

  Attributes:
    count: number of steps taken so far (int32).
    step_size: γ_t of the last step (0 before the first one).
  """

  count: jax.Array
  step_size: jax.Array

  def sam_metrics(self) -> dict[str, jax.Array]:
    return {"step_size": self.step_size}


def polyak_step_size(
  f_star: optax.ScalarOrSchedule = 0.0,
  gamma_b: optax.ScalarOrSchedule = 1.0,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  eps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Stochastic Polyak scheduler of SAM-SPS, capped at γ_b.

  Given the gradient at the perturbed point :math:`\nabla f(e)` (the incoming
  updates), the loss there :math:`f(e)` (``value=``) and the perturbation
  :math:`\delta = e - x` (``perturbation=``),

  .. math::
    r = \frac{f(e) - f^* - \langle \nabla f(e), \delta\rangle}
             {\max(\|\nabla f(e)\|^2, \epsilon)}, \qquad
    \gamma_t = \min(\max(r, 0), \gamma_b), \qquad
    u = -\gamma_t (\nabla f(e) + \mathrm{wd}\cdot x).

  A NaN ratio gives γ_t = 0, and γ_t = 0 leaves x exactly where it is (the
  update is selected to 0, so an inf or NaN in ∇f(e) cannot leak through
  0·inf). The norms and the inner product are computed overflow-safe: the ratio
  is finite wherever its true value is representable. Injected or scheduled
  values are clipped at run time: γ_b ← max(γ_b, 0) (so γ_t ∈ [0, max(γ_b, 0)],
  never an ascent), weight decay ← max(wd, 0), eps ← max(eps, tiny); NaN counts
  as 0. A schedule must return a real scalar. Weight decay is not part of the
  ratio; it enters only the update, at x. Without ``perturbation`` the inner product is 0 and
  this is the classical SPS_max step of Loizou et al. (2021). γ_t of the last
  step is kept in ``state.step_size``. Reductions run in at least float32.

  Args:
    f_star: lower bound f* on the (mini-batch) loss; 0 for non-negative losses.
    gamma_b: cap γ_b > 0 on the step size.
    weight_decay: coupled L2 coefficient (≥ 0) added at x; needs ``params``.
    eps: floor of the squared gradient norm in the denominator (default 1e-12;
      None keeps it out of ``optax.inject_hyperparams``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword-only extra arguments ``value`` (required) and ``perturbation``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> sps = sam_optax.polyak_step_size(f_star=0.0, gamma_b=10.0)
    >>> x = {"w": jnp.array([2.0])}          # f(x) = x², f* = 0
    >>> g = {"w": 2 * x["w"]}
    >>> u, s = sps.update(g, sps.init(x), x, value=jnp.sum(x["w"] ** 2))
    >>> float(s.step_size)                   # f / ‖g‖² = 4 / 16
    0.25

  References:
    - Oikonomou & Loizou, *Adaptive Sharpness-Aware Minimization with a Polyak-type
      Step Size: A Theory-Grounded Scheduler*, 2026, `arXiv:2606.01827 <https://arxiv.org/abs/2606.01827>`__.
    - Loizou et al., *Stochastic Polyak Step-size for SGD: An Adaptive Learning Rate
      for Fast Convergence*, AISTATS 2021, `arXiv:2002.10542 <https://arxiv.org/abs/2002.10542>`__.
  """
  _common.check_scalar_hyperparam("f_star", f_star)
  _common.check_scalar_hyperparam("gamma_b", gamma_b, low=0.0, low_open=True)
  _common.check_scalar_hyperparam("weight_decay", weight_decay, low=0.0)
  eps = _common.default_eps(eps)
  no_decay = _common.is_concrete_number(weight_decay) and float(weight_decay) == 0.0

  def init_fn(params):
    return PolyakStepSizeState(
      count=jnp.zeros([], jnp.int32),
      step_size=jnp.zeros([], _common.accumulation_dtype(params)),
    )

  def update_fn(
    updates,
    state,
    params=None,
    *,
    value=None,
    perturbation=None,
    sam_context=None,
    **extra_args,
  ):
    del extra_args
    _protocol.check_local_ascent(
      sam_context,
      "the Polyak step size (sam_sps)",
      "γ_t uses <∇f(e), δ> with each replica's own δ",
    )
    if value is None:
      raise ValueError(
        "polyak_step_size needs the loss at the point the gradient was taken: "
        "call update(..., value=loss)."
      )
    if not no_decay and params is None:
      raise ValueError("polyak_step_size(weight_decay=...) needs `params`.")
    dtype = _common.accumulation_dtype(updates)
    eps_t = _common.clip_traced(jnp.asarray(eps, dtype), float(jnp.finfo(dtype).tiny))
    f_star_t = _common.resolve_scalar("f_star", f_star, state.count, dtype)
    loss_gap = jnp.asarray(value, dtype) - f_star_t
    # Overflow-safe: finite wherever the true ratio is representable.
    ratio = _common.polyak_ratio(loss_gap, updates, perturbation, eps_t, dtype)
    # Injected/scheduled values are clipped: γ_b ← max(γ_b, 0), so γ_t ∈ [0, max(γ_b, 0)].
    cap = _common.clip_traced(_common.resolve_scalar("gamma_b", gamma_b, state.count, dtype), 0.0)
    gamma = jnp.where(jnp.isnan(ratio), 0.0, jnp.clip(ratio, 0.0, cap)).astype(dtype)
    # γ_t = 0 means "do not move", even where ∇f(e) is inf or NaN: select, never 0·inf.
    move = gamma > 0

    if no_decay:
      new_updates = jax.tree.map(
        lambda g: jnp.where(move, -gamma * g.astype(dtype), 0.0).astype(g.dtype), updates
      )
    else:
      wd = _common.clip_traced(
        _common.resolve_scalar("weight_decay", weight_decay, state.count, dtype), 0.0
      )
      new_updates = jax.tree.map(
        lambda g, x: jnp.where(move, -gamma * (g.astype(dtype) + wd * x.astype(dtype)), 0.0).astype(
          g.dtype
        ),
        updates,
        params,
      )
    new_state = PolyakStepSizeState(
      count=optax.safe_increment(state.count),
      step_size=gamma.astype(state.step_size.dtype),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
