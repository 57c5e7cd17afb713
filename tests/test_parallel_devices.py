"""Data-parallel SAM on 8 fake CPU devices (docs/contract.md §5), float32.

The checks need `--xla_force_host_platform_device_count=8` before jax starts, so
this file runs itself once in a subprocess (``python tests/test_parallel_devices.py``
prints one JSON line of measured errors and flags) and the tests below assert on
those numbers; the rest of the suite keeps its single device.
"""

import json
import pathlib

import _devices
import pytest

# Slow (one 8-device subprocess, ~1 min on 2 cores); the composition battery covers pmap and
# sharded jit, bit-identical replicas included, on 4 devices in the default suite.
pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
STEPS = 3
TOL = 1e-5  # float32 round-off after a few steps (relative to max(1, |x|))


def _worker() -> dict:
  """Runs every multi-device configuration and returns errors/flags (in the subprocess)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import test_parallel as common
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sam_optax

  assert jax.device_count() == DEVICES, jax.devices()
  loss_fn, err = common.loss_fn, common.max_rel_error
  params, stats, batches = common.make_problem(batch_size=32, steps=STEPS)
  explicit_mesh = jax.make_mesh((DEVICES,), ("data",))  # jax's default: Explicit
  auto_mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))

  def host_copy(tree):  # fresh buffers: the steps donate their inputs
    return jax.tree.map(lambda a: np.array(a), tree)

  def from_pmap(tree):
    """(replica 0 on the host, whether all replicas are bit-identical)."""
    leaves = [np.asarray(a) for a in jax.tree.leaves(tree)]
    same = all(bool(np.all(a == a[:1])) for a in leaves)
    return jax.tree.map(lambda a: np.asarray(a)[0], tree), same

  def from_mesh(tree):
    """(device 0's copy on the host, whether every device holds the same bits)."""
    same = all(
      a.sharding.is_fully_replicated
      and all(
        np.array_equal(np.asarray(s.data), np.asarray(a.addressable_shards[0].data))
        for s in a.addressable_shards
      )
      for a in jax.tree.leaves(tree)
    )
    return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data), tree), same

  def trajectory(step, place, carry, batch_fn, inspect):
    """Runs STEPS steps; per step the host copy of (params, state, metrics, stats) and
    whether the replicas agree (read before the next step donates the buffers)."""
    p, s, st = place(carry)
    out, same = [], []
    for b in batches:
      p, s, m, st = step(p, s, batch_fn(b), st)
      host, identical = inspect((p, s, m, st))
      out.append(host)
      same.append(identical)
    return out, same

  def guarded(fn):
    """Runs one configuration; a failure is reported for that configuration only."""

    def run(*args):
      try:
        return fn(*args)
      except Exception as e:  # noqa: BLE001  (reported to and asserted on by the tests)
        return {"exception": f"{type(e).__name__}: {e}"[:2000]}

    return run

  @guarded
  def compare(run, refs):
    outs, same = run()
    return {"errors": [err(o, r) for o, r in zip(outs, refs, strict=True)], "identical": same}

  results = {"sync": {}, "local": {}, "errors": {}}

  # 1. Synced data parallelism == one device on the global batch.
  unified = optax.inject_hyperparams(sam_optax.unified_sam, static_args=("base_optimizer",))(
    common.base_optimizer(), rho=0.1, lambd=0.0
  )
  sps = sam_optax.sam_sps(rho=0.1, lambd=1.0, weight_decay=common.WD, gamma_b=1.0)
  cases = [(f"unified_lambda={lam}", unified, lam) for lam in (0.0, 0.5, 1.0)]
  cases.append(("sam_sps", sps, None))
  compiled = {}
  for name, opt, lam in cases:
    if id(opt) not in compiled:  # one compilation per optimizer and mode; λ lives in the state
      compiled[id(opt)] = (
        sam_optax.sam_step(loss_fn, opt, has_aux=True, donate=False),
        jax.pmap(
          sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch"),
          axis_name="batch",
          donate_argnums=(0, 1),
        ),
        sam_optax.sam_step(loss_fn, opt, has_aux=True),
        jax.jit(
          jax.shard_map(
            sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="data", jit=False),
            mesh=explicit_mesh,
            in_specs=(P(), P(), P("data"), P()),
            out_specs=P(),
          ),
          donate_argnums=(0, 1),
        ),
      )
    single, pmapped, sharded, shard_mapped = compiled[id(opt)]
    state = opt.init(params)
    if lam is not None:
      state.hyperparams["lambd"] = jnp.asarray(lam, jnp.float32)
    carry = (params, state, stats)
    ref, _ = trajectory(
      single, host_copy, carry, lambda b: b, lambda o: (jax.tree.map(np.asarray, o), True)
    )
    results["sync"][name] = {
      "pmap": compare(
        lambda: trajectory(
          pmapped,
          lambda c: sam_optax.replicate(host_copy(c)),
          carry,
          sam_optax.shard_batch,
          from_pmap,
        ),
        ref,
      ),
      "jit": compare(
        lambda: trajectory(
          sharded,
          lambda c: jax.device_put(host_copy(c), NamedSharding(explicit_mesh, P())),
          carry,
          lambda b: sam_optax.global_batch(b, explicit_mesh),
          from_mesh,
        ),
        ref,
      ),
      "shard_map": compare(
        lambda: trajectory(
          shard_mapped,
          lambda c: jax.device_put(host_copy(c), NamedSharding(explicit_mesh, P())),
          carry,
          lambda b: sam_optax.global_batch(b, explicit_mesh),
          from_mesh,
        ),
        ref,
      ),
      "step_size": [float(r[2].get("step_size", np.nan)) for r in ref],
      "lambda": [float(r[2]["lambda"]) for r in ref],
    }

  # 2. m-sharpness == the hand-written per-shard reference.
  rho, lam = 0.2, 0.5
  opt = sam_optax.unified_sam(common.base_optimizer(), rho=rho, lambd=lam)
  carry = (params, opt.init(params), stats)
  hand = {
    k: common.hand_msharpness(params, stats, batches, shards=k, rho=rho, lambd=lam)
    for k in (1, DEVICES, 2 * DEVICES)
  }

  @guarded
  def local_case(run, shards):
    outs, same = run()
    got = [(o[0], o[3]) for o in outs]  # params and BN-like stats
    return {
      "errors": [err(g, h[:2]) for g, h in zip(got, hand[shards], strict=True)],
      "vs_sync": err(got[-1][0], hand[1][-1][0]),
      "identical": same,
    }

  pmap_local = jax.pmap(
    sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch", ascent="local"),
    axis_name="batch",
    donate_argnums=(0, 1),
  )
  results["local"]["pmap"] = local_case(
    lambda: trajectory(
      pmap_local,
      lambda c: sam_optax.replicate(host_copy(c)),
      carry,
      sam_optax.shard_batch,
      from_pmap,
    ),
    DEVICES,
  )

  pmap_groups = jax.pmap(
    sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch", ascent="local", groups=2),
    axis_name="batch",
    donate_argnums=(0, 1),
  )
  results["local"]["pmap_groups2"] = local_case(
    lambda: trajectory(
      pmap_groups,
      lambda c: sam_optax.replicate(host_copy(c)),
      carry,
      sam_optax.shard_batch,
      from_pmap,
    ),
    2 * DEVICES,
  )

  shard_mapped = jax.jit(
    jax.shard_map(
      sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="data", ascent="local", jit=False),
      mesh=explicit_mesh,
      in_specs=(P(), P(), P("data"), P()),
      out_specs=P(),
    ),
    donate_argnums=(0, 1),
  )
  results["local"]["shard_map"] = local_case(
    lambda: trajectory(
      shard_mapped,
      lambda c: jax.device_put(host_copy(c), NamedSharding(explicit_mesh, P())),
      carry,
      lambda b: sam_optax.global_batch(b, explicit_mesh),
      from_mesh,
    ),
    DEVICES,
  )

  grouped = sam_optax.sam_step(loss_fn, opt, has_aux=True, ascent="local", groups=DEVICES)
  results["local"]["jit_groups_auto_mesh"] = local_case(
    lambda: trajectory(
      grouped,
      lambda c: jax.device_put(host_copy(c), NamedSharding(auto_mesh, P())),
      carry,
      lambda b: sam_optax.global_batch(b, auto_mesh),
      from_mesh,
    ),
    DEVICES,
  )

  # 3. Bad input: clear errors before any compute (nothing donated).
  def error_of(fn):
    try:
      fn()
    except ValueError as e:
      return str(e)
    return None

  odd = {"x": np.zeros((30, 6), np.float32), "y": np.zeros(30, np.float32)}
  results["errors"]["shard_batch"] = error_of(lambda: sam_optax.shard_batch(odd))
  results["errors"]["global_batch"] = error_of(lambda: sam_optax.global_batch(odd, explicit_mesh))
  p, s, st = sam_optax.replicate(host_copy(carry))
  wrong_axis = jax.pmap(
    sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch"),
    axis_name="devices",
    donate_argnums=(0, 1),
  )
  results["errors"]["pmap_axis"] = error_of(
    lambda: wrong_axis(p, s, sam_optax.shard_batch(batches[0]), st)
  )
  results["errors"]["pmap_axis_donated"] = any(a.is_deleted() for a in jax.tree.leaves((p, s)))
  p, s, st = jax.device_put(host_copy(carry), NamedSharding(explicit_mesh, P()))
  results["errors"]["groups_explicit_mesh"] = error_of(
    lambda: grouped(p, s, sam_optax.global_batch(batches[0], explicit_mesh), st)
  )
  return results


@pytest.fixture(scope="module")
def results():
  return _devices.run(__file__, DEVICES, timeout=300)


CASES = ["unified_lambda=0.0", "unified_lambda=0.5", "unified_lambda=1.0", "sam_sps"]


@pytest.mark.parametrize("mode", ["pmap", "jit", "shard_map"])
@pytest.mark.parametrize("case", CASES)
def test_synced_data_parallel_equals_one_device_on_the_global_batch(results, case, mode):
  got = results["sync"][case][mode]
  assert "exception" not in got, got
  assert len(got["errors"]) == STEPS
  assert max(got["errors"]) < TOL, got["errors"]  # params, state, metrics and BN stats


@pytest.mark.parametrize("mode", ["pmap", "jit", "shard_map"])
@pytest.mark.parametrize("case", CASES)
def test_replicas_bit_identical_after_every_step(results, case, mode):
  got = results["sync"][case][mode]
  assert "exception" not in got, got
  assert got["identical"] == [True] * STEPS


def test_the_sync_cases_exercise_what_they_claim(results):
  assert results["sync"]["unified_lambda=0.5"]["lambda"] == [0.5] * STEPS
  assert results["sync"]["unified_lambda=1.0"]["lambda"] == [1.0] * STEPS
  step_sizes = results["sync"]["sam_sps"]["step_size"]
  assert all(0.0 < g <= 1.0 for g in step_sizes) and len(set(step_sizes)) == STEPS


@pytest.mark.parametrize("mode", ["pmap", "pmap_groups2", "shard_map", "jit_groups_auto_mesh"])
def test_m_sharpness_equals_hand_written_per_shard_reference(results, mode):
  got = results["local"][mode]
  assert "exception" not in got, got
  assert max(got["errors"]) < TOL, got["errors"]
  assert got["vs_sync"] > 1e-3  # not the synced step
  assert got["identical"] == [True] * STEPS


def test_bad_input_gives_clear_errors_before_compute(results):
  errors = results["errors"]
  assert "`batch` has 30 examples" in errors["shard_batch"]
  assert "not divisible by the 8 devices" in errors["shard_batch"]
  assert "not divisible by this process's 8 devices on mesh axis 'data'" in errors["global_batch"]
  assert "sam_step(axis_name='batch')" in errors["pmap_axis"]
  assert "names must match" in errors["pmap_axis"]
  assert errors["pmap_axis_donated"] is False
  assert "Explicit mesh axis ('data')" in errors["groups_explicit_mesh"]


if __name__ == "__main__":
  print(json.dumps(_worker()))
