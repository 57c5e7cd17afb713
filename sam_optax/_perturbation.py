"""The λ-perturbation of Unified SAM: the ascent step as a GradientTransformation."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _common

_LAMBDA_SCHEDULES = ("1/t", "1-1/t")
_NORMS = ("l2", "linf")


class UnifiedPerturbationState(NamedTuple):
  """State of :func:`unified_perturbation`.

  Attributes:
    count: number of perturbations computed so far (int32); the next one is
      step ``t = count + 1``.
    rho_t: ρ_t used by the last step.
    lambda_t: λ_t used by the last step.
    grad_norm: global norm ‖g‖ of the last gradient (the clean gradient, before
      any adaptive scaling).

  The fields are not named after the hyperparameters (``rho``, ``lambd``), so
  that ``optax.tree_utils.tree_get(state, "rho")`` finds the injected value of
  ``optax.inject_hyperparams``.
  """

  count: jax.Array
  rho_t: jax.Array
  lambda_t: jax.Array
  grad_norm: jax.Array

  def sam_metrics(self) -> dict[str, jax.Array]:
    return {"grad_norm": self.grad_norm, "rho": self.rho_t, "lambda": self.lambda_t}


def lambda_schedule(lambd: Any) -> Any:
  """Returns λ as a float or as a function of the 0-based step count.

  ``"1/t"`` gives λ_t = 1/t and ``"1-1/t"`` gives λ_t = 1 - 1/t with t = count + 1,
  so step 1 is SAM (λ=1) and USAM (λ=0) respectively. Floats and optax schedules
  are returned unchanged after validation.

  Raises:
    ValueError: for an unknown string or a float outside [0, 1].
  """
  if isinstance(lambd, str):
    if lambd == "1/t":
      return lambda count: 1.0 / (count + 1.0)
    if lambd == "1-1/t":
      return lambda count: 1.0 - 1.0 / (count + 1.0)
    raise ValueError(
      f"`lambd` must be a float in [0, 1], an optax schedule, or one of "
      f"{_LAMBDA_SCHEDULES}; got {lambd!r}."
    )
  _common.check_scalar_hyperparam("lambd", lambd, low=0.0, high=1.0)
  return lambd


def unified_perturbation(
  rho: optax.ScalarOrSchedule = 0.05,
  lambd: Any = 1.0,
  *,
  norm: str = "l2",
  eps: float | None = None,
  adaptive: bool = False,
  eta: float = 0.01,
  mask: Any = None,
) -> optax.GradientTransformation:
  r"""The Unified SAM ascent: maps the gradient at x to the perturbation δ.

  With :math:`g = \nabla f(x)` and the global norm over all leaves,

  .. math::
    \delta = \rho_t \left(1 - \lambda_t + \frac{\lambda_t}{\|g\| + \epsilon}\right) g,
    \qquad e = x + \delta .

  λ = 0 is USAM (unnormalized), λ = 1 is SAM; ``"1/t"`` starts as SAM and drifts
  to USAM, ``"1-1/t"`` starts as USAM and drifts to SAM. The step t counts from 1.

  ``norm="linf"`` replaces the normalized direction g/‖g‖ by sign(g):
  :math:`\delta = \rho_t((1-\lambda_t) g + \lambda_t \operatorname{sign}(g))`.

  ``adaptive=True`` is ASAM's scale-invariant ball (Kwon et al., 2021): with
  :math:`T = |x| + \eta` the rule above is applied to :math:`T g` and mapped back
  by T, i.e. :math:`\delta = \rho_t (1 - \lambda_t + \lambda_t/\|T g\|) T^2 g`.
  ``mask`` limits the scaling to some leaves: the others get T = 1 (they are
  perturbed as in plain SAM, inside the same ball), as the ASAM authors' code
  scales only the tensors named ``weight``. To keep leaves out of the
  perturbation altogether (δ = 0 there), zero their gradient before it:
  ``optax.chain(optax.masked(optax.set_to_zero(), excluded), unified_perturbation(...))``.

  Numerics: ‖g‖ is computed overflow-safe (a 1e20 float32 gradient still gives
  ‖δ‖ = ρ at λ = 1 and a finite ``grad_norm``), and ρ_t = 0 gives δ = 0 exactly.
  Injected (``optax.inject_hyperparams``) or scheduled values are clipped into
  the valid range at run time: ρ_t ← max(ρ_t, 0), λ_t ← clip(λ_t, 0, 1),
  η ← max(η, 0), eps ← max(eps, tiny); NaN counts as the lower bound. The
  state records the clipped ρ_t and λ_t. A schedule must return a real scalar.

  The output is δ itself (add it to the parameters with ``optax.apply_updates``
  to get the perturbed point). It may follow other transforms in an
  ``optax.chain`` (e.g. gradient clipping), which then shape the ascent only.

  Args:
    rho: the radius ρ (≥ 0), a float or an optax schedule of the 0-based count.
      The count advances once per ``update`` call: once per step, and once per
      micro-step when the caller accumulates with ``optax.MultiSteps`` (use
      ``sam_step(..., microbatches=k)`` to accumulate inside one step instead).
    lambd: λ in [0, 1], ``"1/t"``, ``"1-1/t"``, or a schedule of the 0-based count.
    norm: ``"l2"`` (default) or ``"linf"``.
    eps: guards the division by the norm (default 1e-12); a zero gradient gives
      δ = 0. The default is None rather than 1e-12 so that
      ``optax.inject_hyperparams`` does not inject it (it would round to 0 in float16).
    adaptive: use ASAM's adaptive (parameter-scaled) ball; needs ``params``.
    eta: ASAM's offset η in T = |x| + η. T ≈ |x| is well below 1 for most
      weights, so ‖δ‖ is much smaller than ρ: ASAM needs a ρ about ten times
      SAM's or more (ASAM's authors tune it roughly in 0.2-1.0 where SAM uses
      0.05-0.1).
    mask: with ``adaptive=True``, which leaves get T = |x| + η (the others get
      T = 1): a pytree of Python bools with the structure of the parameters (or
      a prefix of it), or a function of the parameters returning one, as in
      ``optax.masked``; e.g. ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)``
      scales kernels only, not biases or normalization scales. None (default)
      scales every leaf.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`UnifiedPerturbationState`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> pert = sam_optax.unified_perturbation(rho=0.1, lambd=1.0)
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> delta, _ = pert.update({"w": jnp.array([3.0, 4.0])}, pert.init(params), params)
    >>> [round(float(v), 6) for v in delta["w"]]  # ρ · g / ‖g‖
    [0.06, 0.08]

  References:
    - Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and
      Improved Rates*, ICLR 2025, `arXiv:2503.02225 <https://arxiv.org/abs/2503.02225>`__.
    - Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
      Generalization*, ICLR 2021, `arXiv:2010.01412 <https://arxiv.org/abs/2010.01412>`__.
    - Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
      Learning of Deep Neural Networks*, ICML 2021, `arXiv:2102.11600 <https://arxiv.org/abs/2102.11600>`__.
  """
  _common.check_scalar_hyperparam("rho", rho, low=0.0)
  lambd = lambda_schedule(lambd)
  if norm not in _NORMS:
    raise ValueError(f"`norm` must be one of {_NORMS}, got {norm!r}.")
  eps = _common.default_eps(eps)
  _common.check_scalar_hyperparam("eta", eta, low=0.0, allow_schedule=False)
  if not isinstance(adaptive, (bool, np.bool_)):
    raise ValueError(f"`adaptive` must be a bool, got {adaptive!r}.")
  if not adaptive and mask is not None:
    raise ValueError(
      "`mask` selects the leaves that ASAM scales and needs adaptive=True. To "
      "leave leaves out of the perturbation, zero their gradient before it with "
      "optax.masked(optax.set_to_zero(), ...) in an optax.chain."
    )

  def init_fn(params):
    dtype = _common.accumulation_dtype(params)
    # One buffer per field: a shared array could not be donated to a compiled step.
    return UnifiedPerturbationState(
      count=jnp.zeros([], jnp.int32),
      rho_t=jnp.zeros([], dtype),
      lambda_t=jnp.zeros([], dtype),
      grad_norm=jnp.zeros([], dtype),
    )

  def update_fn(updates, state, params=None):
    if adaptive and params is None:
      raise ValueError("unified_perturbation(adaptive=True) needs `params`.")
    dtype = _common.accumulation_dtype(updates)
    # Injected/scheduled values are not seen by the construction checks: clip them
    # into the valid range (never an ascent of the wrong sign, never NaN).
    rho_t = _common.clip_traced(_common.resolve_scalar("rho", rho, state.count, dtype), 0.0)
    lambd_t = _common.clip_traced(
      _common.resolve_scalar("lambd", lambd, state.count, dtype), 0.0, 1.0
    )
    # eps > 0 keeps a zero gradient's δ at 0 (not 0/0) if an injected eps is <= 0.
    eps_t = _common.clip_traced(jnp.asarray(eps, dtype), float(jnp.finfo(dtype).tiny))

    grad_norm = _common.tree_norm(updates, dtype)
    if adaptive:
      keep = _adaptive_mask(mask, params)
      eta_t = _common.clip_traced(jnp.asarray(eta, dtype), 0.0)
      # T = 1 on masked-out leaves: multiplying by 1.0 is exact (and folded away).
      scale = jax.tree.map(
        lambda x, k: jnp.abs(x.astype(dtype)) + eta_t if k else 1.0, params, keep
      )
      direction = jax.tree.map(lambda g, s: g.astype(dtype) * s, updates, scale)
      direction_norm = _common.tree_norm(direction, dtype)
    else:
      scale = None
      direction = jax.tree.map(lambda g: g.astype(dtype), updates)
      direction_norm = grad_norm

    if norm == "l2":
      # One scalar coefficient; eps keeps it finite for a zero gradient (δ = 0).
      coef = rho_t * (1.0 - lambd_t + lambd_t / (direction_norm + eps_t))
      delta = jax.tree.map(lambda d: coef * d, direction)
    else:
      delta = jax.tree.map(
        lambda d: rho_t * ((1.0 - lambd_t) * d + lambd_t * jnp.sign(d)), direction
      )
    if adaptive:
      delta = jax.tree.map(lambda d, s: d * s, delta, scale)
    # ρ_t = 0 means e = x exactly, even for a non-finite g (no 0·inf); computed in
    # the accumulation dtype, returned in each leaf's own dtype.
    delta = jax.tree.map(lambda d, g: jnp.where(rho_t > 0, d, 0.0).astype(g.dtype), delta, updates)

    new_state = UnifiedPerturbationState(
      count=optax.safe_increment(state.count),
      rho_t=rho_t.astype(state.rho_t.dtype),
      lambda_t=lambd_t.astype(state.lambda_t.dtype),
      grad_norm=grad_norm.astype(state.grad_norm.dtype),
    )
    return delta, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _adaptive_mask(mask: Any, params: Any) -> Any:
  """ASAM's mask as a pytree of Python bools with the structure of `params`."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  mask_tree = mask(params) if callable(mask) else mask
  try:
    # As in optax.masked, a mask leaf may stand for a whole subtree of params.
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask_tree, params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "`mask` must have the structure of the parameters (or a prefix of it); "
      f"got {jax.tree.structure(mask_tree)} for parameters "
      f"{jax.tree.structure(params)}."
    ) from err
  for leaf in jax.tree.leaves(full):
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(
        "`mask` leaves must be Python bools (the mask is static, as in "
        f"optax.masked); got {type(leaf).__name__}."
      )
  return jax.tree.map(bool, full)
