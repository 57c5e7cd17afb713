"""Shared by the tests: pytree assertions and the small regression problem sam_step runs on.

Import them as `from helpers import assert_trees_close` (pytest puts tests/ on sys.path).
"""

import chex
import jax.numpy as jnp
import numpy as np

import sam_optax


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


# A small nonlinear regression problem: f(w, b) = ½ mean((tanh(A w + b) - y)²), float32.
_RNG = np.random.default_rng(0)
A = jnp.asarray(_RNG.normal(size=(16, 5)), jnp.float32)
Y = jnp.asarray(_RNG.normal(size=(16,)), jnp.float32)
BATCH = (A, Y)
PARAMS = {"w": jnp.asarray(_RNG.normal(size=(5,)), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}


def loss_fn(params, batch):
  """The regression loss of `PARAMS`-shaped parameters on a `BATCH`-shaped batch."""
  a, y = batch
  pred = jnp.tanh(a @ params["w"] + params["b"])
  return 0.5 * jnp.mean((pred - y) ** 2)


def run(opt, steps=5, params=PARAMS, loss=loss_fn, batch=BATCH):
  """`steps` steps of `sam_step(loss, opt, donate=False)` on one batch.

  Returns:
    The final parameters, the final optimizer state and the list of each step's metrics.
  """
  step = sam_optax.sam_step(loss, opt, donate=False)
  state = opt.init(params)
  history = []
  for _ in range(steps):
    params, state, metrics = step(params, state, batch)
    history.append(metrics)
  return params, state, history
