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


def tree_sum_of_squares(tree: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over all leaves of Σ x², accumulated in `dtype`."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], dtype)
  return sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)


def tree_vdot(a: Any, b: Any, dtype: jnp.dtype) -> jax.Array:
  """Σ over leaves of <a, b>, accumulated in `dtype`."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  total = jnp.zeros([], dtype)
  for x, y in pairs:
    total = total + jnp.sum(x.astype(dtype) * y.astype(dtype))
  return total


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
    allow_schedule: bool = True,
) -> None:
  """Validates a float-or-schedule hyperparameter at construction time."""
  if callable(value):
    if not allow_schedule:
      raise ValueError(f"`{name}` must be a number, got the callable {value!r}.")
    return
  if isinstance(value, (str, bytes, bool)) or value is None:
    raise ValueError(
        f"`{name}` must be a number{' or an optax schedule' if allow_schedule else ''}, "
        f"got {value!r}."
    )
  if not is_concrete_number(value):
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
      raise ValueError(f"`{name}` must be a scalar, got an array of shape {np.shape(value)}.")
    return  # a traced scalar: checked by the caller's contract, not in Python.
  v = float(value)
  if not np.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {value!r}.")
  if low is not None and (v < low or (low_open and v == low)):
    bound = f"> {low}" if low_open else f">= {low}"
    rng = f" and <= {high}" if high is not None else ""
    raise ValueError(f"`{name}` must be {bound}{rng}, got {value!r}.")
  if high is not None and v > high:
    raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


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
