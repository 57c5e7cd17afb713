"""The CIFAR trainer's data-parallel path: on 4 fake CPU devices it computes the 1-device run.

The multi-device checks need ``--xla_force_host_platform_device_count=4`` before jax
starts, so this file runs itself once in a subprocess (``python
tests/test_cifar_devices.py DATA_DIR WORKDIR`` prints one JSON line of measured errors)
and the tests below assert on those numbers; the rest of the suite keeps one device.
"""

import json
import os
import sys

import _devices
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

DEVICES = 4
STEPS = 3
# float32 round-off after a few steps, relative to max(1, |x|): parameters, momentum and
# BN statistics agree to ~1e-7; the epoch sums of per-step metrics to ~1e-5 (the sharpness
# sum is a difference of two sums of size ~40, whose float32 spacing is 4e-6).
TOL = 1e-6
SUMS_TOL = 5e-5


def tiny_config(**overrides):
  from examples.cifar.configs import smoke

  c = smoke.get_config()  # Unified SAM, λ_t = 1 - 1/t, ρ = 0.1, batch 16
  c.model, c.model_width = "resnet2", 4
  c.eval_batch_size = 10  # not a multiple of 4: rounded up to 12 on 4 devices
  c.num_epochs, c.num_train_steps = 1, STEPS
  c.checkpoint_every_steps = 100
  c.plots = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def host_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def model_state(state):
  return {k: state[k] for k in ("step", "params", "opt_state", "batch_stats")}


def max_rel_error(a, b):
  return max(
    float(np.max(np.abs(x.astype(np.float64) - y) / np.maximum(1.0, np.abs(x))))
    for x, y in zip(a, b)
  )


def run_steps(data_dir, steps=STEPS, **overrides):
  """(run, final state, per-step outputs) of ``steps`` trainer steps on the first batches."""
  import jax

  from examples.cifar import train

  run = train.setup(tiny_config(**overrides), data_dir)
  batches = train.input_pipeline.TrainBatches(run.data.train, run.config.batch_size, 0)
  state, outs = run.state, []
  for i in range(steps):
    state, out = run.train_step(state, run.put_batch(batches(i)))
    outs.append(jax.device_get(out))
  return run, state, outs


# ------------------------------------------------------------------ the subprocess


def _worker(data_dir, workdir) -> dict:
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sam_optax
  from examples.cifar import train

  assert jax.device_count() == DEVICES, jax.devices()
  result = {}

  def replicas_identical(tree):
    def same(x):
      first = np.asarray(x.addressable_shards[0].data)
      return all(np.array_equal(np.asarray(s.data), first) for s in x.addressable_shards)

    return all(
      x.sharding.is_fully_replicated and len(x.addressable_shards) == DEVICES and same(x)
      for x in jax.tree_util.tree_leaves(tree)
    )

  one_run, one, one_outs = run_steps(data_dir, num_devices=1)

  # The whole loop (prefetch thread, evaluation, checkpoints) on all 4 devices.
  four_outs = []
  report = train.train_and_evaluate(
    tiny_config(),
    workdir,
    data_dir=data_dir,
    hooks=[lambda step, out: four_outs.append(jax.device_get(out))],
  )
  mesh = train.make_mesh(tiny_config())
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), one_run.state
  )
  with train.checkpoint_manager(os.path.join(workdir, "checkpoints"), tiny_config()) as manager:
    four = manager.restore(manager.latest_step(), args=train.ocp.args.StandardRestore(abstract))
  batch = sam_optax.global_batch(
    train.input_pipeline.TrainBatches(one_run.data.train, 16, 0)(0), mesh
  )
  result["devices"] = report["devices"]
  result["shard_rows"] = sorted(s.data.shape[0] for s in batch["image"].addressable_shards)
  result["replicas_identical"] = replicas_identical(four)
  result["synced_vs_one"] = max_rel_error(
    host_leaves(model_state(one)), host_leaves(model_state(four))
  )
  result["synced_sums_vs_one"] = max_rel_error(host_leaves(one["sums"]), host_leaves(four["sums"]))
  result["synced_outputs_vs_one"] = max_rel_error(
    [np.array([o[k] for o in one_outs]) for k in ("loss", "accuracy", "lr")],
    [np.array([o[k] for o in four_outs]) for k in ("loss", "accuracy", "lr")],
  )
  # Evaluation: 24 test images in batches of 10 on 1 device, of 12 on 4 (padded, masked).
  test = train.evaluate(
    one_run.eval_step, one["params"], one["batch_stats"], one_run.data.test, one_run.eval_batch_size
  )
  result["test_loss"] = [test["loss"], report["test_loss"]]
  result["test_accuracy"] = [test["accuracy"], report["test_accuracy"]]
  # The 4-device checkpoint resumed on one device (no steps left: restore and evaluate).
  resumed = train.train_and_evaluate(
    tiny_config(num_devices=1), workdir, data_dir=data_dir, resume=True
  )
  result["resumed_on_one"] = [resumed["devices"], resumed["steps"], resumed["test_loss"]]

  _, m_one, _ = run_steps(data_dir, num_devices=1, m_sharpness=4)
  _, m_four, m_four_outs = run_steps(data_dir, m_sharpness=4)
  result["m_replicas_identical"] = replicas_identical(m_four)
  result["m_four_vs_m_one"] = max_rel_error(
    host_leaves(model_state(m_one)), host_leaves(model_state(m_four))
  )
  result["m_sums_four_vs_one"] = max_rel_error(
    host_leaves(m_one["sums"]), host_leaves(m_four["sums"])
  )
  result["m_vs_synced_params"] = max_rel_error(
    host_leaves(four["params"]), host_leaves(m_four["params"])
  )
  # Accuracy is a count over all groups: a multiple of 1/16 in [0, 1].
  result["m_accuracies"] = [float(o["accuracy"]) for o in m_four_outs]

  errors = {}
  for name, overrides in {
    "batch": dict(batch_size=18, eval_batch_size=18),
    "m": dict(m_sharpness=5),
    "devices": dict(num_devices=DEVICES + 1),
  }.items():
    try:
      train.setup(tiny_config(**overrides), data_dir)
      errors[name] = None
    except ValueError as e:  # train.ConfigError or sam_optax's ValueError
      errors[name] = str(e)
  result["errors"] = errors
  return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  from test_cifar_synthetic import make_archive

  data_dir = tmp_path_factory.mktemp("cifar_devices_data")
  make_archive(data_dir, "cifar10", n_train=64, n_test=24, seed=0)
  work = tmp_path_factory.mktemp("cifar_devices_work")
  return _devices.run(__file__, DEVICES, str(data_dir), str(work), timeout=240)


@pytest.mark.slow
def test_batch_is_split_over_all_devices(measured):
  assert measured["devices"] == DEVICES
  assert measured["shard_rows"] == [16 // DEVICES] * DEVICES


@pytest.mark.slow
def test_data_parallel_training_loop_equals_one_device(measured):
  """3 steps of train_and_evaluate on 4 devices, from its final checkpoint."""
  assert measured["replicas_identical"]
  assert measured["synced_vs_one"] < TOL  # params, momentum, BN statistics
  assert measured["synced_sums_vs_one"] < SUMS_TOL  # the epoch's metric sums
  assert measured["synced_outputs_vs_one"] < TOL  # loss, accuracy, lr of every step


@pytest.mark.slow
def test_evaluation_and_resume_on_another_device_count(measured):
  one, four = measured["test_loss"]  # eval batch 10 on 1 device, rounded to 12 on 4
  assert four == pytest.approx(one, rel=SUMS_TOL)
  assert measured["test_accuracy"][0] == measured["test_accuracy"][1]
  devices, steps, test_loss = measured["resumed_on_one"]
  assert (devices, steps) == (1, STEPS)
  assert test_loss == pytest.approx(one, rel=SUMS_TOL)


@pytest.mark.slow
def test_m_sharpness_is_device_independent_and_differs_from_synced(measured):
  assert measured["m_replicas_identical"]
  assert measured["m_four_vs_m_one"] < TOL  # the same 4 groups of 4, on 1 or 4 devices
  assert measured["m_sums_four_vs_one"] < SUMS_TOL
  assert measured["m_vs_synced_params"] > 1e-3  # a different algorithm
  assert all(0.0 <= a <= 1.0 and (16 * a) == round(16 * a) for a in measured["m_accuracies"])


@pytest.mark.slow
def test_bad_batch_sizes_are_clear_errors(measured):
  errors = measured["errors"]
  assert (
    "18 examples on its leading axis, which is not divisible by the 4 devices" in errors["batch"]
  )
  assert "m_sharpness (examples per ascent) must divide batch_size=16, got 5" in errors["m"]
  assert "num_devices must be an int in [0, 4]" in errors["devices"]


# ------------------------------------------------------------ in process (one device)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from test_cifar_synthetic import make_archive

  d = tmp_path_factory.mktemp("cifar_one_device")
  make_archive(d, "cifar10", n_train=64, n_test=24, seed=0)
  return str(d)


@pytest.mark.slow
def test_one_device_mesh_is_the_plain_jit_step_bit_for_bit(data_dir):
  """On one device the sharded step computes exactly what jax.jit alone computes."""
  import jax

  from examples.cifar import train

  run = train.setup(tiny_config(), data_dir)
  assert run.mesh.size == 1 and run.eval_batch_size == 10
  plain = jax.jit(run.train_step.__wrapped__, donate_argnums=0)
  batches = train.input_pipeline.TrainBatches(run.data.train, 16, 0)
  copy = lambda: jax.tree_util.tree_map(lambda x: np.array(x), run.state)  # noqa: E731
  a, b = jax.device_put(copy()), copy()
  for i in range(2):
    a, _ = plain(a, jax.device_put(batches(i)))
    b, _ = run.train_step(b, run.put_batch(batches(i)))
  assert int(a["step"]) == 2
  for x, y in zip(host_leaves(a), host_leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)


if __name__ == "__main__":
  print(json.dumps(_worker(sys.argv[1], sys.argv[2])))
