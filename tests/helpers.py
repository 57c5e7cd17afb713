"""Assertions shared by the tests: pytrees compared by structure, shape, dtype and value.

Import them as `from helpers import assert_trees_close` (pytest puts tests/ on sys.path).
"""

import chex


def assert_trees_close(actual, expected, *, rtol=1e-6, atol=1e-7, check_dtypes=False):
  """`actual` and `expected` have the same tree structure and shapes and close values.

  A missing, extra or renamed leaf fails (plain `zip` over the leaves would not notice).
  Values are compared as `numpy.testing.assert_allclose(actual, expected, rtol, atol)` does.

  Args:
    actual: the computed pytree.
    expected: the reference pytree.
    rtol: relative tolerance.
    atol: absolute tolerance.
    check_dtypes: also require every pair of leaves to have the same dtype.
  """
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  if check_dtypes:
    chex.assert_trees_all_equal_dtypes(actual, expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_trees_equal(actual, expected, *, check_dtypes=True):
  """Bit for bit: same tree structure, shapes, dtypes (by default) and values."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  if check_dtypes:
    chex.assert_trees_all_equal_dtypes(actual, expected)
  chex.assert_trees_all_equal(actual, expected)
