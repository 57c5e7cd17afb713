"""Sharpness diagnostics: the top Hessian eigenvalue, the Hessian trace and ρ-ball sharpness.

Pure, jit-able functions of ``(loss_fn, params, *args)`` with the convention of
:func:`sam_optax.sam_step`: ``loss_fn(params, *args)`` returns a scalar loss (or
``(loss, aux)`` with ``has_aux=True``; the aux is discarded), and ``*args`` are
passed after the parameters, usually ``batch, ...``. Only ``params`` is
differentiated. Norms and inner products are global over all leaves of the pytree
and accumulated in at least float32 (float64 for float64 parameters), which is
also the dtype of every result.

Measure with a deterministic loss: batch norm in inference mode (running
statistics) and no dropout, on a fixed batch (e.g. the whole training set). A
batch sharded over a mesh under ``jax.jit`` works as is: the functions only call
``loss_fn`` and combine pytrees.

Example:
  >>> import jax.numpy as jnp
  >>> from sam_optax import sharpness
  >>> def loss_fn(params, batch):
  ...   return 0.5 * jnp.sum(batch * params["w"] ** 2)   # Hessian diag(batch)
  >>> params, batch = {"w": jnp.ones(3)}, jnp.array([1.0, 2.0, 4.0])
  >>> round(float(sharpness.top_hessian_eigenvalue(loss_fn, params, batch)), 4)
  4.0
  >>> round(float(sharpness.hessian_trace(loss_fn, params, batch)), 4)
  7.0
"""

from __future__ import annotations

import collections
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._common import accumulation_dtype
from sam_optax._parallel import check_batch_divisible

__all__ = ("hessian_trace", "top_hessian_eigenvalue", "worst_case_sharpness")

# ---------------------------------------------------------------------------------------
# Argument checks (Python values only: traced hyperparameters are not checked).


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
  if value < low:
    raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
  return int(value)


def _check_float(name: str, value: Any, low: float = 0.0) -> None:
  """A finite number >= low; traced scalars pass (they cannot be checked in Python)."""
  if isinstance(value, jax.core.Tracer):
    if np.ndim(value) != 0:
      raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}.")
    return
  if isinstance(value, (bool, str, bytes, complex)) or value is None:
    raise ValueError(f"`{name}` must be a finite number >= {low:g}, got {value!r}.")
  if np.ndim(value) != 0:
    raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}.")
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"`{name}` must be a finite number >= {low:g}, got {value!r}.") from None
  if not np.isfinite(v) or v < low:
    raise ValueError(f"`{name}` must be a finite number >= {low:g}, got {value!r}.")


def _check_loss_fn(loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")


def _check_params(params: Any) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("`params` has no array leaves.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
        f"`params` must have floating-point leaves only, got a {jnp.result_type(leaf)} leaf."
      )


def _default_key(key: Any) -> jax.Array:
  return jax.random.key(0) if key is None else key


# ---------------------------------------------------------------------------------------
# Pytree arithmetic in the accumulation dtype, overflow-safe norms.


def _scalar_loss(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., jax.Array]:
  """params, *args -> the scalar loss (aux dropped), checked like sam_step's."""

  def f(params, *args):
    out = loss_fn(params, *args)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
          f"`loss_fn` with has_aux=True must return a pair (loss, aux); got {type(out).__name__}."
        )
      out = out[0]
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != ():
      hint = " (did you mean has_aux=True?)" if isinstance(out, (tuple, list)) else ""
      raise TypeError(f"`loss_fn` must return a scalar loss{hint}; got shape {shape}.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
      raise TypeError(f"`loss_fn` must return a floating-point loss, got dtype {out.dtype}.")
    return out

  return f


def _vdot(a: Any, b: Any, dtype: jnp.dtype) -> jax.Array:
  total = jnp.zeros([], dtype)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    total = total + jnp.sum(x.astype(dtype) * y.astype(dtype))
  return total


def _norm(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """Global L2 norm in ``dtype``, scaled by the largest entry so it neither overflows nor
  underflows wherever the norm itself is representable; 0 for an all-zero tree."""
  leaves = [x.astype(dtype) for x in jax.tree.leaves(tree)]
  scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
  safe = jnp.where(scale > 0, scale, 1.0)
  ssq = sum(jnp.sum(jnp.square(x / safe)) for x in leaves)
  return jnp.where(scale > 0, safe * jnp.sqrt(ssq), 0.0)


def _scale(tree: Any, c: jax.Array) -> Any:
  """c · tree, each leaf computed in the accumulation dtype and kept in its own dtype."""
  return jax.tree.map(lambda x: (x.astype(c.dtype) * c).astype(x.dtype), tree)


def _normalized(tree: Any, norm: jax.Array) -> Any:
  """tree / norm, or zeros where the norm is zero (never NaN)."""
  inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
  return _scale(tree, inv)


def _hvp_fn(f: Callable[..., jax.Array], params: Any, args: tuple) -> Callable[[Any], Any]:
  """v -> H v at ``params``, forward-over-reverse (``jax.linearize`` of ``jax.grad``).

  Linearizing once keeps the gradient's residuals, so each product costs only the
  tangent (forward-mode) pass over the backward pass, not a new gradient as well.
  """
  _, hvp = jax.linearize(lambda p: jax.grad(f)(p, *args), params)
  return hvp


# worst_case_sharpness unrolls its ascent up to this many steps, and loops beyond.
_MAX_UNROLLED_STEPS = 8


def _is_concrete(tree: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


# Compiled loop bodies of eager calls, by (function, loss_fn, has_aux, dtype): a
# training loop that measures every epoch compiles each body once. Bounded, as
# the entries hold on to the loss functions.
_BODIES: collections.OrderedDict = collections.OrderedDict()
_MAX_BODIES = 32


def _compiled(cache_key: tuple, body: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.jit(body)``, shared by every eager call with the same ``cache_key``.

  ``cache_key`` must name every Python value ``body`` closes over; arrays go in
  the operands or the carry.
  """
  try:
    hash(cache_key)
  except TypeError:  # an unhashable loss_fn: compile for this call only
    return jax.jit(body)
  if cache_key not in _BODIES:
    _BODIES[cache_key] = jax.jit(body)
    if len(_BODIES) > _MAX_BODIES:
      _BODIES.popitem(last=False)
  _BODIES.move_to_end(cache_key)
  return _BODIES[cache_key]


def _iterate(
  body: Callable[..., Any],
  carry: Any,
  operands: Any,
  *,
  until: Callable[..., Any],
  cache_key: tuple,
  trips: int | None = None,
) -> Any:
  """Runs ``carry = body(operands, carry)`` until ``until(carry)`` (or ``trips`` times).

  Called with concrete values, the loop runs on the host around one compiled
  ``body`` (compiled once per ``cache_key``, see :func:`_compiled`): XLA:CPU runs
  convolutions inside a ``while``/``fori`` loop body far slower than at top level
  (as inside ``lax.cond``, jax-ml/jax#12868), which made the diagnostics of a
  small CNN cost ~10x their arithmetic. Under a trace (inside ``jit``) it is a
  ``lax.while_loop``; both compute the same values.
  """
  if _is_concrete((carry, operands)):
    step = _compiled(cache_key, body)
    for _ in range(trips) if trips is not None else iter(int, 1):
      if trips is None and bool(until(carry)):
        break
      carry = step(operands, carry)
    return carry
  if trips is not None:
    return jax.lax.fori_loop(0, trips, lambda i, c: body(operands, c), carry)
  return jax.lax.while_loop(lambda c: jnp.logical_not(until(c)), lambda c: body(operands, c), carry)


def _split_groups(x: jax.Array, groups: int) -> jax.Array:
  """[B, ...] -> [groups, B / groups, ...], keeping an Explicit mesh sharding of the batch
  axis on the examples of each group when they divide evenly over its devices; otherwise
  the batch is gathered first (an Explicit reshape must be told its output sharding, and
  vmap cannot map over an Explicit-sharded axis)."""
  shape = (groups, jnp.shape(x)[0] // groups) + tuple(jnp.shape(x)[1:])
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  mesh = getattr(sharding, "mesh", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  lead = spec[0] if spec else None
  if lead is None or mesh is None or not getattr(mesh, "axis_names", ()):
    return jnp.reshape(x, shape)
  names = lead if isinstance(lead, tuple) else (lead,)
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if not all(types.get(n) == explicit for n in names):  # Auto / Manual: XLA decides
    return jnp.reshape(x, shape)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  devices = int(np.prod([sizes[n] for n in names]))
  rest = spec[1:] + (None,) * (len(jnp.shape(x)) - len(spec))
  if shape[1] % devices == 0:
    out = jax.sharding.PartitionSpec(None, lead, *rest)
  else:
    x = jax.sharding.reshard(x, jax.sharding.PartitionSpec(None, *rest))
    return jnp.reshape(x, shape)
  return jnp.reshape(x, shape, out_sharding=out)


# ---------------------------------------------------------------------------------------
# The diagnostics.


def top_hessian_eigenvalue(
  loss_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  num_iters: int = 100,
  tol: float = 1e-4,
  key: jax.Array | None = None,
  has_aux: bool = False,
) -> jax.Array:
  r"""The top eigenvalue of the loss Hessian, by power iteration on Hessian-vector products.

  With :math:`H = \nabla^2_x f(x)` (``f(x) = loss_fn(x, *args)``) and a random start
  :math:`v_0 \sim \mathcal{N}(0, I)`,

  .. math::
    \lambda_k = v_k^\top H v_k, \qquad v_{k+1} = H v_k / \|H v_k\|, \qquad v_k \leftarrow
    v_0 / \|v_0\| \text{ at } k = 0,

  stopping after ``num_iters`` products or once
  :math:`|\lambda_k - \lambda_{k-1}| \le \text{tol} \cdot |\lambda_k|` (inside a
  ``lax.while_loop``). Each product :math:`Hv` is ``jax.jvp`` of ``jax.grad``
  (forward-over-reverse; linearized once), about the cost of two gradients.

  Power iteration converges to the eigenvalue of largest magnitude, returned with
  its sign; near a minimum, where H is (nearly) positive semi-definite, that is
  :math:`\lambda_{\max}`. The error of :math:`\lambda_k` shrinks like
  :math:`(\lambda_2/\lambda_1)^{2k}`. A zero Hessian gives 0, never NaN.

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar loss, or ``(loss, aux)``
      with ``has_aux=True``.
    params: the point x, any pytree of floating-point arrays.
    *args: passed to ``loss_fn`` after ``params`` (the batch, batch statistics, ...);
      not differentiated.
    num_iters: the most Hessian-vector products (≥ 1).
    tol: relative change of :math:`\lambda_k` at which to stop (≥ 0; 0 runs all
      ``num_iters``).
    key: a JAX PRNG key for :math:`v_0`; None means ``jax.random.key(0)``. The same key
      gives the same result.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A scalar in the accumulation dtype of ``params`` (float32, or float64 for float64
    parameters).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> A = jnp.diag(jnp.array([1.0, 3.0, 10.0]))
    >>> loss_fn = lambda params, A: 0.5 * params @ A @ params
    >>> lam = jax.jit(lambda p, A: sharpness.top_hessian_eigenvalue(loss_fn, p, A))(
    ...     jnp.zeros(3), A)
    >>> round(float(lam), 3)
    10.0

  References:
    Yao et al., *PyHessian: Neural Networks Through the Lens of the Hessian*, 2020
    (https://arxiv.org/abs/1912.07145). Pearlmutter, *Fast Exact Multiplication by the
    Hessian*, Neural Computation 1994. Foret et al., *Sharpness-Aware Minimization for
    Efficiently Improving Generalization*, ICLR 2021 (https://arxiv.org/abs/2010.01412).
  """
  _check_loss_fn(loss_fn)
  num_iters = _check_int("num_iters", num_iters, 1)
  _check_float("tol", tol)
  _check_params(params)
  dtype = accumulation_dtype(params)
  f = _scalar_loss(loss_fn, has_aux)

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(_default_key(key), len(leaves))
  v0 = treedef.unflatten(
    [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
  )
  v0 = _normalized(v0, _norm(v0, dtype))

  def until(carry):
    k, _, _, done = carry
    return jnp.logical_or(k >= num_iters, done)

  def body(operands, carry):
    p, a, tol = operands
    k, v, lam_prev, _ = carry
    hv = _hvp_fn(f, p, a)(v)
    lam = _vdot(v, hv, dtype)
    hv_norm = _norm(hv, dtype)
    # A zero product (zero Hessian, or v in its null space) ends the iteration at λ = 0.
    v_next = jax.tree.map(lambda a, b: jnp.where(hv_norm > 0, a, b), _normalized(hv, hv_norm), v)
    converged = jnp.logical_and(k > 0, jnp.abs(lam - lam_prev) <= tol * jnp.abs(lam))
    done = jnp.logical_or(converged, hv_norm == 0)
    return k + 1, v_next, lam, done

  init = (jnp.zeros([], jnp.int32), v0, jnp.zeros([], dtype), jnp.zeros([], bool))
  tol = jnp.asarray(tol, dtype)
  cache_key = ("top_hessian_eigenvalue", loss_fn, has_aux, jnp.dtype(dtype).name)
  _, _, lam, _ = _iterate(body, init, (params, args, tol), until=until, cache_key=cache_key)
  return lam


def hessian_trace(
  loss_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  num_samples: int = 100,
  key: jax.Array | None = None,
  has_aux: bool = False,
) -> jax.Array:
  r"""The trace of the loss Hessian, by Hutchinson's estimator with Rademacher probes.

  With :math:`H = \nabla^2_x f(x)` and S probes :math:`z_s` whose entries are ±1 with
  equal probability,

  .. math::
    \operatorname{tr} H \approx \frac{1}{S} \sum_{s=1}^{S} z_s^\top H z_s .

  The estimator is unbiased with variance
  :math:`\frac{2}{S}\sum_{i \ne j} H_{ij}^2` (exact for a diagonal H). The probes are
  drawn one at a time inside a ``lax.fori_loop``, so memory does not grow with S;
  each costs one Hessian-vector product (``jax.jvp`` of ``jax.grad``).

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar loss, or ``(loss, aux)``
      with ``has_aux=True``.
    params: the point x, any pytree of floating-point arrays.
    *args: passed to ``loss_fn`` after ``params``; not differentiated.
    num_samples: the number S of probes (≥ 1).
    key: a JAX PRNG key for the probes; None means ``jax.random.key(0)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A scalar in the accumulation dtype of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda params, A: 0.5 * params @ A @ params
    >>> A = jnp.array([[2.0, 0.0], [0.0, 5.0]])
    >>> round(float(sharpness.hessian_trace(loss_fn, jnp.zeros(2), A, num_samples=10)), 3)
    7.0

  References:
    Hutchinson, *A Stochastic Estimator of the Trace of the Influence Matrix for
    Laplacian Smoothing Splines*, 1989. Avron & Toledo, *Randomized Algorithms for
    Estimating the Trace of an Implicit Symmetric Positive Semi-definite Matrix*, 2011.
    Yao et al., *PyHessian*, 2020 (https://arxiv.org/abs/1912.07145).
  """
  _check_loss_fn(loss_fn)
  num_samples = _check_int("num_samples", num_samples, 1)
  _check_params(params)
  dtype = accumulation_dtype(params)
  f = _scalar_loss(loss_fn, has_aux)
  key = _default_key(key)

  def body(operands, carry):
    p, a, key = operands
    s, total = carry
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.fold_in(key, s), len(leaves))
    z = treedef.unflatten(
      [jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    )
    return s + 1, total + _vdot(z, _hvp_fn(f, p, a)(z), dtype)

  init = (jnp.zeros([], jnp.int32), jnp.zeros([], dtype))
  cache_key = ("hessian_trace", loss_fn, has_aux, jnp.dtype(dtype).name)
  operands = (params, args, key)
  _, total = _iterate(body, init, operands, until=None, trips=num_samples, cache_key=cache_key)
  return total / num_samples


def worst_case_sharpness(
  loss_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  rho: float = 0.05,
  num_steps: int = 5,
  step_size: float | None = None,
  adaptive: bool = False,
  eta: float = 0.01,
  groups: int | None = None,
  has_aux: bool = False,
) -> jax.Array:
  r"""The ρ-ball sharpness :math:`\max_{\|d\| \le \rho} f(x + d) - f(x)`, by projected ascent.

  Projected normalized gradient ascent from SAM's step (Foret et al., 2021), keeping the
  best point seen (d = 0 included, so the result is ≥ 0):

  .. math::
    d_1 = \rho \frac{g}{\|g\|}, \quad
    d_{k+1} = P_\rho\Big(d_k + \alpha_k \frac{\nabla f(x + d_k)}{\|\nabla f(x + d_k)\|}\Big),
    \quad \text{result} = \max\big(0, \max_{k \le K} f(x + d_k) - f(x)\big),

  with :math:`g = \nabla f(x)`, K = ``num_steps``, :math:`P_\rho` the projection onto the
  ball and :math:`\alpha_k = \alpha / \sqrt{k}` (α = ``step_size``, default 2ρ). K = 1 is
  the sharpness that a SAM step measures (``sam_step``'s ``metrics["sharpness"]``
  with λ = 1). Every iterate lies in the ball, so the result is a lower bound of the
  true maximum; it grows with K. A zero gradient gives d = 0 and 0.

  ``adaptive=True`` uses ASAM's scale-invariant ball :math:`\|d / T\| \le \rho`
  with :math:`T = |x| + \eta` (Kwon et al., 2021; the adaptive sharpness of
  Andriushchenko et al., 2023): the same ascent on :math:`u = d / T`, whose gradient
  is :math:`T \nabla f`, so the first step is ASAM's :math:`\rho T^2 g / \|T g\|`.

  ``groups=m`` is m-sharpness: the leading axis of the batch (``args[0]``, every leaf)
  is split into m equal groups, the maximum is taken for each group's loss
  :math:`f_k` with its own d, and the mean over groups is returned
  (:math:`\frac1m \sum_k \max_{\|d_k\| \le \rho} f_k(x + d_k) - f_k(x)`); the other
  ``args`` are shared by all groups. The groups run side by side under ``jax.vmap``.

  Args:
    loss_fn: ``loss_fn(params, *args)`` returning a scalar loss, or ``(loss, aux)``
      with ``has_aux=True``.
    params: the point x, any pytree of floating-point arrays.
    *args: passed to ``loss_fn`` after ``params``; not differentiated.
    rho: the radius ρ ≥ 0 (may be traced).
    num_steps: the number K ≥ 1 of ascent points evaluated (K + 1 gradients in all).
      Up to 9 the ascent is unrolled (fast convolutions on XLA:CPU); beyond, it is a
      ``fori_loop``, which compiles in constant time.
    step_size: α > 0, the length of the first step after d_1; None means 2ρ (in
      the u-space with ``adaptive=True``).
    adaptive: use the adaptive ball :math:`\|d / (|x| + \eta)\| \le \rho`.
    eta: η ≥ 0 of the adaptive ball.
    groups: None, or the number m ≥ 1 of groups for m-sharpness; the batch's
      leading axis must be divisible by m.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A scalar ≥ 0 in the accumulation dtype of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda params, c: jnp.sum(c * params)          # linear: g = c
    >>> c = jnp.array([3.0, 4.0])
    >>> round(float(sharpness.worst_case_sharpness(loss_fn, jnp.zeros(2), c, rho=0.1)), 4)
    0.5

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
    Generalization*, ICLR 2021 (https://arxiv.org/abs/2010.01412). Andriushchenko et
    al., *A Modern Look at the Relationship between Sharpness and Generalization*,
    ICML 2023 (https://arxiv.org/abs/2302.07011). Kwon et al., *ASAM: Adaptive
    Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
    Networks*, ICML 2021 (https://arxiv.org/abs/2102.11600). Keskar et al., *On
    Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima*,
    ICLR 2017 (https://arxiv.org/abs/1609.04836).
  """
  _check_loss_fn(loss_fn)
  _check_float("rho", rho)
  num_steps = _check_int("num_steps", num_steps, 1)
  if step_size is not None:
    _check_float("step_size", step_size)
    if not isinstance(step_size, jax.core.Tracer) and float(step_size) == 0.0:
      raise ValueError(f"`step_size` must be > 0 or None, got {step_size!r}.")
  if not isinstance(adaptive, bool):
    raise ValueError(f"`adaptive` must be a bool, got {adaptive!r}.")
  if adaptive:
    _check_float("eta", eta)
  _check_params(params)
  if _is_concrete((params, args, rho, step_size, eta)):
    # Called eagerly: compile the whole ascent once per loss function and options
    # (unrolled at top level, where XLA:CPU's convolutions are fast).
    try:
      hash(loss_fn)
    except TypeError:
      pass
    else:
      return _worst_case_jit(
        loss_fn,
        params,
        *args,
        rho=rho,
        num_steps=num_steps,
        step_size=step_size,
        adaptive=adaptive,
        eta=eta,
        groups=groups,
        has_aux=has_aux,
      )
  f = _scalar_loss(loss_fn, has_aux)
  dtype = accumulation_dtype(params)
  rho = jnp.asarray(rho, dtype)
  alpha = 2.0 * rho if step_size is None else jnp.asarray(step_size, dtype)
  # T = |x| + η (adaptive) or 1; the ascent runs on u = d / T, inside ‖u‖ ≤ ρ.
  if adaptive:
    t = jax.tree.map(lambda x: jnp.abs(x) + jnp.asarray(eta, x.dtype), params)
  else:
    t = jax.tree.map(jnp.ones_like, params)

  def to_d(u):
    return jax.tree.map(lambda a, b: a * b, u, t)

  def one_group(*fargs):
    vg = jax.value_and_grad(f)
    loss, g = vg(params, *fargs)
    loss = loss.astype(dtype)
    gu = jax.tree.map(lambda a, b: a * b, g, t)  # the gradient in u-space
    u = _scale(_normalized(gu, _norm(gu, dtype)), rho)

    def body(k, carry):
      u, best = carry
      value, g = vg(jax.tree.map(jnp.add, params, to_d(u)), *fargs)
      best = jnp.maximum(best, value.astype(dtype) - loss)
      gu = jax.tree.map(lambda a, b: a * b, g, t)
      step = alpha / jnp.sqrt(jnp.asarray(k + 1, dtype))
      u = jax.tree.map(jnp.add, u, _scale(_normalized(gu, _norm(gu, dtype)), step))
      u_norm = _norm(u, dtype)
      shrink = jnp.where(u_norm > rho, rho / jnp.where(u_norm > 0, u_norm, 1.0), 1.0)
      return _scale(u, shrink), best

    # The last iterate's gradient is not needed: evaluate its value alone. A few steps
    # are unrolled (XLA:CPU is slow on convolutions inside loop bodies); more would
    # make the compilation time grow faster than the number of steps.
    unroll = num_steps - 1 <= _MAX_UNROLLED_STEPS
    u, best = jax.lax.fori_loop(0, num_steps - 1, body, (u, jnp.zeros([], dtype)), unroll=unroll)
    value = f(jax.tree.map(jnp.add, params, to_d(u)), *fargs)
    return jnp.maximum(best, value.astype(dtype) - loss)

  if groups is None:
    return one_group(*args)
  groups = _check_int("groups", groups, 1)
  if not args:
    raise ValueError("`groups` splits the batch, the first of `*args`, but none was given.")
  batch, rest = args[0], args[1:]
  try:
    check_batch_divisible(batch, groups, what=f"`groups` = {groups}")
  except ValueError as e:
    raise ValueError(f"`groups`: {e}") from None
  split = jax.tree.map(lambda x: _split_groups(x, groups), batch)
  per_group = jax.vmap(one_group, in_axes=(0,) + (None,) * len(rest))(split, *rest)
  return jnp.mean(per_group)


_worst_case_jit = jax.jit(
  worst_case_sharpness,
  static_argnums=0,
  static_argnames=("num_steps", "adaptive", "groups", "has_aux"),
)
