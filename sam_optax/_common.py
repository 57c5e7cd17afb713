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


def down_scale(dtype: jnp.dtype) -> float:
  """A power of two c that makes squares of any finite `dtype` value summable.

  With c = 2^(-3·maxexp/4) (2^-96 for float32, 2^-768 for float64), (x·c)² of the
  largest finite x is about 2^(maxexp/2), so sums of up to 2^(maxexp/2) such
  terms stay finite, and a sum that overflowed unscaled (‖x‖ ≥ 2^(maxexp/2))
  stays a normal number once scaled. Multiplying by a power of two is exact.
  """
  return float(2.0 ** -(3 * jnp.finfo(dtype).maxexp // 4))


def _tree_sum(terms: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  return sum(terms) if terms else jnp.zeros([], dtype)


def tree_sum_of_squares(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over all leaves of Σ x², accumulated in `dtype` (may overflow: see `tree_norm`)."""
  return _tree_sum([jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(tree)], dtype)


def sum_of_squares_pair(tree: Any, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """(Σ x², Σ (x·c)²): two sibling reductions of the same input, which XLA fuses
  into one pass; the second one is finite whenever the true norm is."""
  c = down_scale(dtype)
  leaves = [x.astype(dtype) for x in jax.tree.leaves(tree)]
  plain = _tree_sum([jnp.sum(jnp.square(x)) for x in leaves], dtype)
  scaled = _tree_sum([jnp.sum(jnp.square(x * c)) for x in leaves], dtype)
  return plain, scaled


def tree_norm(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """The global L2 norm over all leaves, overflow-safe, accumulated in `dtype`.

  Bit-identical to sqrt(Σ x²) whenever Σ x² is finite; when it overflows, the
  norm comes from the exactly down-scaled sum, so it is finite wherever the
  true norm is representable (a 1e20 float32 gradient has a finite norm).
  An inf element gives inf and a NaN element NaN, as they should.
  """
  plain, scaled = sum_of_squares_pair(tree, dtype)
  return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), jnp.sqrt(scaled) / down_scale(dtype))


def tree_vdot(a: Any, b: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over leaves of <a, b>, accumulated in `dtype` (may overflow: see `tree_vdot_pair`)."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return _tree_sum([jnp.sum(x.astype(dtype) * y.astype(dtype)) for x, y in pairs], dtype)


def tree_vdot_pair(a: Any, b: Any, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """(<a, b>, <a·c, b>) with the exact power of two c of `down_scale`.

  The second is finite wherever <a, b> is within a factor 1/c of the largest
  float; only `a` is scaled so that small entries of `b` do not underflow.
  """
  c = down_scale(dtype)
  pairs = [(x.astype(dtype), y.astype(dtype)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  plain = _tree_sum([jnp.sum(x * y) for x, y in pairs], dtype)
  scaled = _tree_sum([jnp.sum((x * c) * y) for x, y in pairs], dtype)
  return plain, scaled


def tree_norm_and_projection(v: Any, u: Any, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  r"""(‖u‖, <v, u>/‖u‖²), both overflow-safe; the ratio is 0 for a zero `u`.

  When neither reduction overflows this is the plain ``<v,u> / Σu²``
  (bit-identical to the naive formula); otherwise the ratio is evaluated as
  ((<v·c, u>·(1/‖u‖))/c)·(1/‖u‖), whose middle term is <v, u/‖u‖>, bounded by ‖v‖, so no
  intermediate overflows where the ratio itself is representable.
  """
  c = down_scale(dtype)
  uu, uu_scaled = sum_of_squares_pair(u, dtype)
  vu, vu_scaled = tree_vdot_pair(v, u, dtype)
  unorm = jnp.where(jnp.isfinite(uu), jnp.sqrt(uu), jnp.sqrt(uu_scaled) / c)
  nonzero = unorm > 0
  fast = jnp.isfinite(uu) & jnp.isfinite(vu)
  safe_uu = jnp.where(nonzero, uu, 1.0)
  # Multiplications by 1/‖u‖, not a chain of divisions: XLA rewrites (a/b)/b as
  # a/(b·b), which would overflow again.
  inv_unorm = 1.0 / jnp.where(nonzero, unorm, 1.0)
  ratio = jnp.where(fast, vu / safe_uu, ((vu_scaled * inv_unorm) / c) * inv_unorm)
  return unorm, jnp.where(nonzero, ratio, 0.0)


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
        jnp.issubdtype(dtype, jnp.bool_))
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


def find_state(tree: Any, cls: type) -> Any:
  """The first sub-state of type `cls` inside an optimizer state, or None.

  Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and
  the like, since it searches the whole state pytree.
  """
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)):
    if isinstance(node, cls):
      return node
  return None
