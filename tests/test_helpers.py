"""The shared tree assertions fail where they should (tests/helpers.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close
from helpers import assert_trees_equal

TREE = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}


def test_close_accepts_values_within_tolerance():
  assert_trees_close(TREE, {"w": jnp.array([1.0, 2.0 + 1e-7]), "b": jnp.array(0.5)})


def test_close_rejects_a_missing_leaf():
  with pytest.raises(AssertionError):
    assert_trees_close(TREE, {"w": TREE["w"]})


def test_close_rejects_a_renamed_leaf():
  with pytest.raises(AssertionError):
    assert_trees_close(TREE, {"w": TREE["w"], "c": TREE["b"]})


def test_close_rejects_a_different_shape():
  with pytest.raises(AssertionError):
    assert_trees_close(TREE, {"w": jnp.array([1.0, 2.0, 3.0]), "b": TREE["b"]})


def test_close_rejects_a_value_outside_tolerance():
  with pytest.raises(AssertionError):
    assert_trees_close(TREE, {"w": jnp.array([1.0, 2.001]), "b": TREE["b"]})


def test_close_checks_dtypes_only_on_request():
  as_f64 = {"w": np.array([1.0, 2.0]), "b": np.array(0.5)}
  assert_trees_close(TREE, as_f64)
  with pytest.raises(AssertionError):
    assert_trees_close(TREE, as_f64, check_dtypes=True)


def test_equal_is_bit_for_bit_and_checks_dtypes():
  assert_trees_equal(TREE, {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)})
  with pytest.raises(AssertionError):
    assert_trees_equal(TREE, {"w": jnp.array([1.0, 2.0 + 2.5e-7]), "b": TREE["b"]})
  with pytest.raises(AssertionError):
    assert_trees_equal(TREE, {"w": TREE["w"].astype(jnp.bfloat16), "b": TREE["b"]})
