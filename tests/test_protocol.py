"""sam_optax._protocol's finiteness checks, all_finite and stays_finite (docs/contract.md §8).

How sam_step uses them (which steps it skips) is tests/test_step.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import _protocol

INF, NAN = jnp.inf, jnp.nan


@pytest.mark.parametrize(
  "tree, expected",
  [
    pytest.param({"a": jnp.array([1.0, 2.0]), "n": jnp.int32(3)}, True, id="finite"),
    pytest.param({"a": jnp.array([1.0, NAN])}, False, id="nan"),
    pytest.param({"a": jnp.array([1.0, 2.0]), "b": jnp.float16(INF)}, False, id="inf_in_a_leaf"),
    pytest.param({"n": jnp.int32(3), "flag": jnp.array(True)}, True, id="no_floating_leaf"),
    pytest.param((), True, id="empty"),
    pytest.param({"a": jnp.zeros((0, 3)), "b": jnp.float32(1.0)}, True, id="empty_leaf"),
    # Σ x² overflows: the exact test decides (NaN, +inf, -inf, or finite entries only).
    pytest.param({"a": jnp.array([1e30, -1e30])}, True, id="overflow_finite"),
    pytest.param(
      {"a": jnp.array([1e30, 2.0]), "b": jnp.array([-INF])}, False, id="overflow_minus_inf"
    ),
    pytest.param({"a": jnp.array([1e30, INF])}, False, id="overflow_plus_inf"),
    pytest.param({"a": jnp.array([1e30, NAN, 1.0])}, False, id="overflow_nan"),
    pytest.param({"a": jnp.array([INF, NAN, -INF])}, False, id="inf_nan_minus_inf"),
    pytest.param({"a": jnp.array([3e38, 1.0], jnp.bfloat16)}, True, id="bfloat16_overflow_finite"),
    pytest.param({"a": jnp.array([1e30 + 1e30j, -1.0])}, True, id="complex_overflow_finite"),
    pytest.param({"a": jnp.array([1.0 + 1j, 2.0 + INF * 1j])}, False, id="complex_inf"),
  ],
)
def test_all_finite(tree, expected):
  assert bool(_protocol.all_finite(tree)) is expected  # eager: the branch picked in Python
  assert bool(jax.jit(_protocol.all_finite)(tree)) is expected  # compiled: lax.cond


@pytest.mark.parametrize(
  "old, new, expected",
  [
    pytest.param([1.0, 2.0], [3.0, -4.0], True, id="finite_stays_finite"),
    pytest.param([INF, 2.0], [INF, 3.0], True, id="inf_kept"),
    pytest.param([INF, 2.0], [NAN, 3.0], True, id="inf_to_nan"),
    pytest.param([NAN, 2.0], [-INF, 3.0], True, id="nan_to_inf"),
    pytest.param([INF, 2.0], [1.0, 3.0], True, id="inf_to_finite"),
    pytest.param([1.0, 2.0], [1.0, NAN], False, id="finite_to_nan"),
    pytest.param([1.0, 2.0], [-INF, 2.0], False, id="finite_to_inf"),
    # entry by entry: an inf elsewhere in the same leaf does not excuse a new one
    pytest.param([INF, 2.0], [INF, INF], False, id="finite_to_inf_next_to_an_inf"),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stays_finite_entry_by_entry(old, new, expected, dtype):
  tree = lambda values: {"x": jnp.asarray(values, dtype), "count": jnp.int32(1)}
  assert bool(_protocol.stays_finite(tree(old), tree(new))) is expected
  assert bool(jax.jit(_protocol.stays_finite)(tree(old), tree(new))) is expected


def test_stays_finite_checks_every_leaf():
  old = {"a": jnp.float32(1.0), "b": jnp.float32(INF), "c": jnp.float32(2.0)}
  assert bool(_protocol.stays_finite(old, {**old, "b": jnp.float32(NAN)}))
  assert not bool(_protocol.stays_finite(old, {**old, "c": jnp.float32(NAN)}))


def test_stays_finite_without_floating_leaves_is_true():
  counters = {"count": jnp.int32(1), "flag": jnp.array(False)}
  assert bool(_protocol.stays_finite(counters, counters))
  assert bool(_protocol.stays_finite((), ()))


@pytest.mark.parametrize(
  "values, finite",
  [([1.0, 2.0], True), ([1e30, 2.0], True), ([1e30, INF], False), ([NAN, 2.0], False)],
)
def test_checks_under_shard_map_with_a_per_device_input(values, finite):
  """ascent='local' under jax.shard_map: the checks see a gradient that varies over the mesh
  axis, and both branches of their lax.cond must vary alike (check_vma; before: TypeError
  "cond branches must have equal output types")."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  spec = jax.sharding.PartitionSpec("d")

  def checks(x):
    tree = {"a": x}
    return jnp.stack(
      [_protocol.all_finite(tree), _protocol.stays_finite({"a": jnp.zeros_like(x)}, tree)]
    )

  out = jax.jit(jax.shard_map(checks, mesh=mesh, in_specs=spec, out_specs=spec))
  assert out(jnp.array(values, jnp.float32)).tolist() == [finite, finite]
