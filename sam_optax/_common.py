"""Small numerical helpers shared by the transformations (private)."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def accumulation_dtype(tree: Any) -> jnp.dtype:
  """The dtype to accumulate reductions over `tree` in: at least float32.

  bfloat16/float16 leaves are reduced in float32 so that a global norm neither
  overflows nor loses the small components; float64 leaves keep float64.
  """
  dtypes = [jnp.asarray(x).dtype for x in jax.tree.leaves(tree)]
  return jnp.result_type(jnp.float32, *dtypes)


def _tree_sum(terms: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  return sum(terms) if terms else jnp.zeros([], dtype)


def tree_sum_of_squares(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over all leaves of Σ x², accumulated in `dtype` (may overflow: see `tree_norm`)."""
  return _tree_sum([jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(tree)], dtype)


def tree_vdot(a: Any, b: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over leaves of <a, b>, accumulated in `dtype` (may overflow: see `tree_projection`)."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return _tree_sum([jnp.sum(x.astype(dtype) * y.astype(dtype)) for x, y in pairs], dtype)


def cond(pred: Any, true_fn: Any, false_fn: Any, *operands: Any) -> Any:
  """``jax.lax.cond``, or the chosen branch called directly when ``pred`` is concrete.

  Inside a trace (jit, pmap, vmap, grad) this is ``lax.cond``. Called eagerly (a step
  with ``jit=False``, a plain loop) a ``lax.cond`` would compile both branches anew on
  every call, since they are fresh closures; the concrete predicate picks the branch
  in Python instead, and only that branch's operations run.
  """
  if isinstance(pred, jax.core.Tracer):
    return jax.lax.cond(pred, true_fn, false_fn, *operands)
  return (true_fn if bool(pred) else false_fn)(*operands)


# Overflow-safe reductions. The plain sums are computed as before and used whenever they
# are finite, so results are bit-identical to the textbook formulas and the usual step
# costs nothing extra. Only when a sum overflowed (or the data is not finite) does a
# `lax.cond` branch recompute it from the tree scaled by a power of two s with
# max|x·s| in [0.5, 1): the scaling is exact, and s is a run-time value, so XLA cannot
# re-associate (x·s)² into x²·s² (it does so for constant factors), which would
# overflow again. Under `vmap` the cond becomes a select: both branches run.


def tree_max_abs(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """max |x| over all leaves, in `dtype` (0 for an empty tree).

  From each leaf's max and min, reductions of the leaf itself: no leaf-sized
  temporary (such as |x| or a cast) for the overflow branches to reserve. A NaN
  entry may be skipped (XLA:CPU's max does not always propagate it); the callers
  only need the scale, and a NaN shows in their sums.
  """

  def max_abs(x):
    if jnp.iscomplexobj(x):
      return jnp.max(jnp.abs(x)).astype(dtype)
    return jnp.maximum(jnp.max(x).astype(dtype), -jnp.min(x).astype(dtype))

  leaves = [max_abs(x) for x in jax.tree.leaves(tree) if x.size]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([], dtype)


def pow2_scale(m: jax.Array) -> jax.Array:
  """The power of two s with m·s in [0.5, 1) (1 when m is 0 or not finite); exact to apply."""
  finfo = jnp.finfo(m.dtype)
  ok = jnp.isfinite(m) & (m > 0)
  _, exponent = jnp.frexp(jnp.where(ok, m, 1.0))
  # Keep s itself a normal number (m is not tiny on the paths that need s).
  exponent = jnp.clip(exponent, finfo.minexp + 1, finfo.maxexp - 1)
  return jnp.where(ok, jnp.ldexp(jnp.ones([], m.dtype), -exponent), 1.0).astype(m.dtype)


# `sliced_sum` reduces a leaf of more than `_SLICE` entries in up to `_SLICES` slices.
_SLICE = 1 << 16
_SLICES = 16


def sliced_sum(terms: Any, trees: tuple, dtype: jnp.dtype) -> jax.Array:
  """Σ over all leaves and entries of ``terms(x₁, x₂, ...)`` (one leaf from each tree).

  For the branches that almost never run (the overflow fallbacks, the exact
  finiteness tests). XLA reserves a branch's temporaries whether or not it runs,
  so a branch that transformed whole leaves would add a parameter-sized buffer to
  every step's peak memory (it raised SAM-SPS's by one copy of the parameters). A
  leaf of more than 2^16 entries is therefore reduced in equal slices (a
  ``fori_loop`` over ``dynamic_slice``), at least 2^16 entries and at most 16 of
  them: ``terms`` sees one slice at a time, a sixteenth of the leaf or less. (Under
  ``vmap`` a ``lax.cond`` runs both branches, so there the loops run every step: at
  most 16 iterations per leaf.) ``terms`` is elementwise; its result is summed in
  ``dtype``.
  """
  total = jnp.zeros([], dtype)
  for leaves in zip(*(jax.tree.leaves(t) for t in trees)):
    flat = [x.reshape(-1) for x in leaves]
    n = flat[0].size
    pieces = min(_SLICES, -(-n // _SLICE))
    if pieces <= 1:
      total = total + jnp.sum(terms(*flat).astype(dtype))
      continue
    size = -(-n // pieces)

    def add_slice(i, acc, flat=flat, n=n, size=size):
      # The last slice is shifted to end at n; the entries it shares with the one
      # before are counted once.
      start = jnp.minimum(i * size, n - size)
      values = terms(*(jax.lax.dynamic_slice(x, (start,), (size,)) for x in flat))
      fresh = start + jax.lax.iota(jnp.int32, size) >= i * size
      return acc + jnp.sum(jnp.where(fresh, values, 0).astype(dtype))

    total = total + jax.lax.fori_loop(0, pieces, add_slice, jnp.zeros([], dtype))
  return total


def _scale(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """The exact power-of-two scale of `tree` (`pow2_scale` of its largest magnitude)."""
  return pow2_scale(tree_max_abs(tree, dtype))


def tree_norm(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """The global L2 norm over all leaves, overflow-safe, accumulated in `dtype`.

  Equal, bit for bit, to sqrt(Σ x²) whenever Σ x² is finite; otherwise
  ‖x‖ = ‖x·s‖ / s with the exact power-of-two scale s of `pow2_scale`, so the
  norm is finite wherever the true norm is representable (a 1e20 float32
  gradient has a finite norm). An inf entry gives inf and a NaN entry NaN.
  """
  plain = tree_sum_of_squares(tree, dtype)

  def rescaled(tree):
    s = _scale(tree, dtype)
    return jnp.sqrt(sliced_sum(lambda x: jnp.square(x.astype(dtype) * s), (tree,), dtype)) / s

  return cond(jnp.isfinite(plain), lambda _: jnp.sqrt(plain), rescaled, tree)


def tree_projection(v: Any, u: Any, dtype: jnp.dtype) -> jax.Array:
  r"""<v, u> / ‖u‖², overflow-safe; 0 for a zero `u`.

  The plain ``<v,u> / Σu²`` (bit-identical to the naive formula) when neither
  reduction overflows; otherwise both trees are scaled by exact powers of two
  s_v, s_u first: <v,u>/‖u‖² = (<v s_v, u s_u> / ‖u s_u‖²) · s_u / s_v.
  """
  uu = tree_sum_of_squares(u, dtype)
  vu = tree_vdot(v, u, dtype)

  def plain(_):
    nonzero = uu > 0
    return jnp.where(nonzero, vu / jnp.where(nonzero, uu, 1.0), 0.0)

  def rescaled(trees):
    s_v, s_u = _scale(trees[0], dtype), _scale(trees[1], dtype)
    uu_s = sliced_sum(lambda u: jnp.square(u.astype(dtype) * s_u), (trees[1],), dtype)
    vu_s = sliced_sum(lambda v, u: (v.astype(dtype) * s_v) * (u.astype(dtype) * s_u), trees, dtype)
    nonzero = (uu_s > 0) & (vu_s != 0)
    ratio = (vu_s / jnp.where(nonzero, uu_s, 1.0)) * s_u / s_v
    return jnp.where(nonzero, ratio, 0.0)

  return cond(jnp.isfinite(uu) & jnp.isfinite(vu), plain, rescaled, (v, u))


def polyak_ratio(
  loss_gap: jax.Array, grads: Any, perturbation: Any, eps: jax.Array, dtype: jnp.dtype
) -> jax.Array:
  r"""(loss_gap - <g, δ>) / max(‖g‖², eps), overflow-safe (δ may be None: <g, δ> = 0).

  The plain formula when ‖g‖² and <g, δ> are finite; otherwise, with the exact
  power-of-two scale s of g, ((loss_gap·s - <g s, δ>) / max(‖g s‖², eps·s²)) · s,
  whose terms are all of order one where the ratio is representable.
  """
  gg = tree_sum_of_squares(grads, dtype)
  gd = jnp.zeros([], dtype) if perturbation is None else tree_vdot(grads, perturbation, dtype)

  def plain(_):
    return (loss_gap - gd) / jnp.maximum(gg, eps)

  def rescaled(trees):
    s = _scale(trees[0], dtype)
    gg_s = sliced_sum(lambda g: jnp.square(g.astype(dtype) * s), (trees[0],), dtype)
    if trees[1] is None:
      gd_s = jnp.zeros([], dtype)
    else:
      gd_s = sliced_sum(lambda g, d: (g.astype(dtype) * s) * d.astype(dtype), trees, dtype)
    return ((loss_gap * s - gd_s) / jnp.maximum(gg_s, eps * s * s)) * s

  return cond(jnp.isfinite(gg) & jnp.isfinite(gd), plain, rescaled, (grads, perturbation))


def clip_traced(value: jax.Array, low: float | None = None, high: float | None = None) -> jax.Array:
  """Clips a resolved (possibly traced or scheduled) hyperparameter into [low, high].

  The construction-time check cannot see injected or scheduled values; this is
  the run-time policy for them: out-of-range values are clipped, and NaN counts
  as `low` (selected with `where`, since `maximum`/`clip` propagate NaN).
  Bit-identical (and folded away by XLA) for in-range constants.
  """
  if high is not None:
    value = jnp.where(value < high, value, high)
  if low is not None:
    value = jnp.where(value > low, value, low)
  return value


def resolve_scalar(name: str, hyperparam: Any, count: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """`resolve`, then checks that the value is a real scalar and casts it to `dtype`.

  Shapes and dtypes are static, so a schedule (or injected value) returning a
  shape-(1,) array or a complex number fails here at trace time, instead of
  silently broadcasting the parameters to its shape.
  """
  value = jnp.asarray(resolve(hyperparam, count))
  if value.ndim != 0 or not (
    jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
  ):
    raise ValueError(
      f"`{name}` must resolve to a real scalar, got dtype {value.dtype} and shape {value.shape}."
    )
  return value.astype(dtype)


def resolve(hyperparam: Any, count: jax.Array) -> Any:
  """A hyperparameter's value at 0-based step `count` (schedule or scalar)."""
  return hyperparam(count) if callable(hyperparam) else hyperparam


def is_concrete_number(value: Any) -> bool:
  """True when `value` is a Python/NumPy number or a concrete 0-d array.

  Traced values (under `jit` or `optax.inject_hyperparams`) are not checked:
  the code never branches in Python on a value that may be traced.
  """
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Real):
    return True
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
    return True
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    return value.ndim == 0
  return False


def check_scalar_hyperparam(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  allow_schedule: bool = True,
) -> None:
  """Validates a float-or-schedule hyperparameter at construction time.

  Accepted: a real Python/NumPy number, a 0-d real array (concrete or traced),
  and, if `allow_schedule`, a callable. Everything else (lists, tuples, complex
  numbers, strings, bools, None, arrays with a shape) raises a ValueError naming
  `name`; concrete values are also range-checked. Traced values are left to the
  transform's run-time policy (`clip_traced`).
  """
  what = "a number" + (" or an optax schedule" if allow_schedule else "")
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if not allow_schedule:
      raise ValueError(f"`{name}` must be a number, got the callable {value!r}.")
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    dtype, shape = value.dtype, np.shape(value)
    real = (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) and not (
      jnp.issubdtype(dtype, jnp.bool_)
    )
    if shape != () or not real:
      raise ValueError(f"`{name}` must be {what}, got an array of dtype {dtype} and shape {shape}.")
    if isinstance(value, jax.core.Tracer):
      return  # traced: clipped at run time by the transform (see its docstring).
  elif isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(
      f"`{name}` must be {what} (a real scalar), got {value!r} ({type(value).__name__})."
    )
  v = float(value)
  if not np.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {value!r}.")
  if low is not None and (v < low or (low_open and v == low)):
    bound = f"> {low}" if low_open else f">= {low}"
    rng = f" and {'<' if high_open else '<='} {high}" if high is not None else ""
    raise ValueError(f"`{name}` must be {bound}{rng}, got {value!r}.")
  if high is not None and (v > high or (high_open and v == high)):
    raise ValueError(f"`{name}` must be {'<' if high_open else '<='} {high}, got {value!r}.")


DEFAULT_EPS = 1e-12


def default_eps(eps: Any) -> Any:
  """``eps`` validated, with None meaning :data:`DEFAULT_EPS`.

  The factories default to None, not 1e-12, so that ``optax.inject_hyperparams``
  (which injects every numeric argument, cast to the parameters' dtype) leaves
  it static: 1e-12 rounds to 0 in float16.
  """
  if eps is None:
    return DEFAULT_EPS
  check_scalar_hyperparam("eps", eps, low=0.0, low_open=True, allow_schedule=False)
  return eps


def find_state(tree: Any, cls: type) -> Any:
  """The first sub-state of type `cls` inside an optimizer state, or None.

  Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and
  the like, since it searches the whole state pytree.
  """
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)):
    if isinstance(node, cls):
      return node
  return None
