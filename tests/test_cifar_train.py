"""The CIFAR trainer: one step per config, resume equality, checkpoint safety, bad input."""

import glob
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_cifar_synthetic import make_archive  # noqa: E402

import sam_optax  # noqa: E402
from examples.cifar import train  # noqa: E402
from examples.cifar.configs import default  # noqa: E402

CONFIGS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(ROOT, "examples", "cifar", "configs", "*.py"))
  if not p.endswith("__init__.py")
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cifar_data")
  make_archive(d, "cifar10", n_train=64, n_test=24, seed=0)
  make_archive(d, "cifar100", n_train=64, n_test=24, seed=0)
  return str(d)


def load_config(name):
  return importlib.import_module(f"examples.cifar.configs.{name}").get_config()


def tiny(config):
  """Shrinks model and batch; keeps the optimizer settings of the config."""
  # ResNet-2: stem conv + BN + head, the smallest member of the CIFAR ResNet family.
  config.model = "nnx_resnet2" if config.model.startswith("nnx_") else "resnet2"
  config.model_width = 4
  config.batch_size = 16
  config.eval_batch_size = 16
  config.progress_bar = False
  config.plots = False
  return config


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


# ------------------------------------------------------------------ one step per config


def test_every_config_is_listed():
  assert {
    "unified_sam_wrn28_10",
    "sgd_wrn28_10",
    "sam_sps_resnet32_cifar100",
    "sam_cosine_resnet32_cifar100",
    "sam_constant_resnet32_cifar100",
    "cpu_wrn16_4",
    "smoke",
    "nnx_resnet20",
    "default",
  } <= set(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_one_step_smoke(name, data_dir):
  paper = load_config(name)
  train.check_config(paper)
  train.models.create_model(paper.model, 10, width=paper.model_width)  # a known model
  config = tiny(load_config(name))
  run = train.setup(config, data_dir)
  assert run.data.num_classes == (100 if paper.dataset == "cifar100" else 10)
  assert run.steps_per_epoch == 4 and run.total_steps == 4 * paper.num_epochs
  before = leaves(run.state["params"])
  batch = jax.device_put(
    train.input_pipeline.TrainBatches(run.data.train, config.batch_size, config.seed)(0)
  )
  state, out = run.train_step(run.state, batch)
  after = leaves(state["params"])
  assert int(state["step"]) == 1
  assert np.isfinite(float(out["loss"])) and 0.0 <= float(out["accuracy"]) <= 1.0
  # The initial loss of a fresh classifier is near log(num_classes).
  assert abs(float(out["loss"]) - np.log(run.data.num_classes)) < 1.5
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert all(np.isfinite(a).all() for a in after)

  if paper.optimizer == "sam_sps":
    gamma = float(out["lr"])
    assert 0.0 <= gamma <= paper.gamma_b
    polyak = sam_optax.find_state(state["opt_state"], sam_optax.PolyakStepSizeState)
    assert float(polyak.step_size) == pytest.approx(gamma)
  else:
    # Step 0 of every schedule (no warm-up in the paper configs) is the peak rate.
    assert float(out["lr"]) == pytest.approx(paper.learning_rate)
  if paper.optimizer == "sgd":
    assert sam_optax.find_state(state["opt_state"], sam_optax.SAMState) is None
  else:
    pert = sam_optax.find_state(state["opt_state"], sam_optax.UnifiedPerturbationState)
    assert float(pert.rho_t) == pytest.approx(paper.rho)
    lam = train.parse_lambda(paper.lambd)
    # Step t = 1: "1/t" is SAM (λ=1), "1-1/t" is USAM (λ=0).
    expected = {"1/t": 1.0, "1-1/t": 0.0}.get(lam, lam)
    assert float(pert.lambda_t) == pytest.approx(expected)
    assert float(pert.grad_norm) > 0
  # The epoch sums restart at step 0 and hold exactly one batch.
  assert float(state["sums"]["count"]) == config.batch_size
  assert float(state["sums"]["loss"]) == pytest.approx(16 * float(out["loss"]), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("m_sharpness", [None, 4])
def test_nnx_model_is_stepped_by_sam_optax_nnx(m_sharpness, data_dir, monkeypatch):
  """sam_optax.nnx.sam_step on the live module equals sam_step on the split state, bit for bit."""
  import sam_optax.nnx

  built, real = [], sam_optax.nnx.sam_step
  monkeypatch.setattr(sam_optax.nnx, "sam_step", lambda *a, **k: built.append(k) or real(*a, **k))
  config = tiny(load_config("nnx_resnet20"))
  config.m_sharpness = m_sharpness
  run = train.setup(config, data_dir)
  assert run.model.kind == "nnx" and len(built) == 1
  groups = {} if m_sharpness is None else dict(ascent="local", groups=16 // m_sharpness)
  assert {k: built[0][k] for k in groups} == groups
  functional = sam_optax.sam_step(run.loss_fn, run.tx, has_aux=True, **groups)
  host = jax.device_get(run.state)
  params, opt_state, stats = host["params"], host["opt_state"], host["batch_stats"]
  batches = train.input_pipeline.TrainBatches(run.data.train, 16, 0)
  state = run.state
  for i in range(3):
    state, out = run.train_step(state, run.put_batch(batches(i)))
    params, opt_state, metrics, aux = functional(params, opt_state, batches(i), stats, None)
    stats = aux["batch_stats"]
    assert float(out["loss"]) == float(metrics["loss"])
  for x, y in zip(
    leaves(state),
    leaves({"step": 3, "params": params, "opt_state": opt_state, "batch_stats": stats})
    + leaves(state["sums"]),
  ):
    assert np.array_equal(x, y)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(data_dir):
  config = tiny(load_config("smoke"))
  config.dtype = "bfloat16"
  run = train.setup(config, data_dir)
  batch = train.input_pipeline.TrainBatches(run.data.train, 16, 0)(0)
  jaxpr = str(
    jax.make_jaxpr(run.loss_fn)(
      run.state["params"], batch, run.state["batch_stats"], jax.random.key(0)
    )
  )
  assert "bf16" in jaxpr
  state, out = run.train_step(run.state, jax.device_put(batch))
  assert {x.dtype for x in jax.tree_util.tree_leaves(state["params"])} == {jnp.dtype("float32")}
  assert out["loss"].dtype == jnp.float32 and np.isfinite(float(out["loss"]))


@pytest.mark.slow
def test_label_smoothing_changes_the_loss(data_dir):
  losses = []
  for smoothing in (0.0, 0.1):
    config = tiny(load_config("smoke"))
    config.label_smoothing = smoothing
    run = train.setup(config, data_dir)
    batch = train.input_pipeline.TrainBatches(run.data.train, 16, 0)(0)
    loss, _ = run.loss_fn(run.state["params"], batch, run.state["batch_stats"], jax.random.key(0))
    losses.append(float(loss))
  logits = jnp.zeros((1, 10))
  smoothed = train.cross_entropy(logits, jnp.array([3]), 10, 0.1)
  assert float(smoothed[0]) == pytest.approx(np.log(10), rel=1e-6)  # uniform logits
  assert losses[0] != losses[1]


def test_schedules():
  c = default.get_config()
  c.num_epochs, c.learning_rate = 10, 0.1
  c.schedule = "cosine"
  s = train.learning_rate_schedule(c, 100)
  assert float(s(0)) == pytest.approx(0.1) and float(s(500)) == pytest.approx(0.05)
  assert float(s(1000)) == pytest.approx(0.0, abs=1e-9)
  c.schedule, c.lr_boundaries, c.lr_decay = "step", (3, 6, 8), 0.2
  s = train.learning_rate_schedule(c, 100)
  assert [round(float(s(t)), 6) for t in (0, 299, 300, 600, 800)] == [0.1, 0.1, 0.02, 0.004, 0.0008]
  c.schedule, c.warmup_epochs = "constant", 1
  s = train.learning_rate_schedule(c, 100)
  assert float(s(50)) == pytest.approx(0.05) and float(s(100)) == pytest.approx(0.1)


# --------------------------------------------------------------------- end to end, resume


def small_run_config(**overrides):
  config = tiny(load_config("smoke"))
  config.num_epochs = 2  # 4 steps per epoch on 64 images
  config.checkpoint_every_steps = 3
  config.log_every_steps = 2
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def final_state(workdir, run):
  manager = train.checkpoint_manager(os.path.join(workdir, "checkpoints"), run.config)
  metadata = train.checkpoint_metadata(run.config, run.data.num_classes)
  try:
    return train.restore_checkpoint(manager, manager.latest_step(), run.state, metadata)
  finally:
    manager.close()


def records(workdir):
  out = []
  for r in train._read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    r.pop("images_per_s", None)
    r.pop("sharpness_seconds", None)
    out.append(r)
  return out


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, data_dir):
  full = str(tmp_path / "full")
  report = train.train_and_evaluate(small_run_config(plots=True), full, data_dir=data_dir)
  assert report["steps"] == 8 and report["epochs"] == 2.0
  assert 0.0 <= report["test_accuracy"] <= 1.0

  # Same run, stopped by SIGTERM mid-epoch 1 and by Ctrl-C mid-epoch 2, resumed each time.
  split = str(tmp_path / "split")

  def sigterm_at_3(step, out):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # let the interpreter run the Python-level handler

  def ctrl_c_at_6(step, out):
    if step == 6:
      raise KeyboardInterrupt

  with pytest.raises(train.TrainingInterrupted) as e:
    train.train_and_evaluate(small_run_config(), split, data_dir=data_dir, hooks=[sigterm_at_3])
  assert (e.value.signum, e.value.step, e.value.saved) == (signal.SIGTERM, 3, True)
  with pytest.raises(train.TrainingInterrupted) as e:
    train.train_and_evaluate(
      small_run_config(), split, data_dir=data_dir, resume=True, hooks=[ctrl_c_at_6]
    )
  assert (e.value.signum, e.value.step, e.value.saved) == (signal.SIGINT, 6, True)
  resumed = train.train_and_evaluate(small_run_config(), split, data_dir=data_dir, resume=True)

  run = train.setup(small_run_config(), data_dir)
  a = final_state(full, run)
  b = final_state(split, run)
  assert int(a["step"]) == int(b["step"]) == 8
  for x, y in zip(leaves(a), leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)  # params, momentum, BN, sums
  assert records(full) == records(split)  # per-epoch metrics replay exactly
  assert [r["epoch"] for r in records(full)] == [1, 2]
  assert resumed["test_accuracy"] == report["test_accuracy"]
  assert resumed["test_loss"] == report["test_loss"]

  # The artefacts a user looks at.
  for png in ("curves.png", "step_size.png"):
    with open(os.path.join(full, "plots", png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  steps = train._read_jsonl(os.path.join(full, "steps.jsonl"))
  assert [r["step"] for r in steps] == [2, 4, 6, 8]
  first = records(full)[0]
  assert "top_hessian_eigenvalue" not in first  # diagnostics are off by default
  assert set(first) >= {
    "train_loss",
    "train_accuracy",
    "train_perturbed_loss",
    "train_sharpness",
    "learning_rate",
    "test_loss",
    "test_accuracy",
  }
  assert first["train_sharpness"] == pytest.approx(
    first["train_perturbed_loss"] - first["train_loss"], abs=1e-5
  )
  with open(os.path.join(full, "report.json")) as f:
    assert json.load(f)["best_test_accuracy"] == max(r["test_accuracy"] for r in records(full))


@pytest.mark.slow
def test_sharpness_diagnostics_are_logged(tmp_path, data_dir):
  from sam_optax import sharpness

  config = small_run_config(
    num_epochs=1,
    plots=True,
    sharpness_every_epochs=1,
    sharpness_num_iters=5,
    sharpness_num_samples=3,
    sharpness_rho=0.05,
  )
  train.train_and_evaluate(config, str(tmp_path), data_dir=data_dir)
  (rec,) = train._read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rec["sharpness_seconds"] > 0
  # What sam_optax.sharpness computes on the documented loss: inference-mode cross-entropy
  # on the first training batch without augmentation, keys from (seed + 2, epoch).
  run = train.setup(config, data_dir)
  state = final_state(str(tmp_path), run)
  batch = train.input_pipeline.TrainBatches(run.data.train, 16, 0, augment_images=False)(0)

  def loss_fn(params, batch, batch_stats):
    images = train.input_pipeline.normalize(batch["image"], run.data.mean, run.data.std)
    logits, _ = run.model.apply(params, batch_stats, images, False, None)
    return train.cross_entropy(logits, batch["label"], 10).mean()

  args = (loss_fn, state["params"], batch, state["batch_stats"])
  eig_key, trace_key = jax.random.split(jax.random.fold_in(jax.random.key(2), 1))
  expected = {
    "top_hessian_eigenvalue": sharpness.top_hessian_eigenvalue(*args, num_iters=5, key=eig_key),
    "hessian_trace": sharpness.hessian_trace(*args, num_samples=3, key=trace_key),
    "rho_sharpness": sharpness.worst_case_sharpness(*args, rho=0.05),
  }
  for key, value in expected.items():
    assert rec[key] == pytest.approx(float(value), rel=1e-4), key
  assert rec["top_hessian_eigenvalue"] > 0 and rec["rho_sharpness"] > 0
  with open(os.path.join(tmp_path, "plots", "sharpness.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sam_sps_logs_step_size(tmp_path, data_dir):
  config = small_run_config(optimizer="sam_sps", num_epochs=1, lambd="1")
  train.train_and_evaluate(config, str(tmp_path), data_dir=data_dir)
  (rec,) = records(str(tmp_path))
  steps = train._read_jsonl(os.path.join(tmp_path, "steps.jsonl"))
  assert "step_size" in rec and "learning_rate" not in rec
  assert all(0.0 <= r["lr"] <= 1.0 for r in steps) and any(r["lr"] > 0 for r in steps)


# ------------------------------------------------------------------- checkpoint safety


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.mark.slow
def test_existing_checkpoint_is_never_overwritten(tmp_path, data_dir):
  workdir = str(tmp_path)
  train.train_and_evaluate(small_run_config(num_epochs=1), workdir, data_dir=data_dir)
  ckpt = os.path.join(workdir, "checkpoints")
  digest = tree_digest(ckpt)
  assert sorted(os.listdir(ckpt)) == ["3", "4"]

  with pytest.raises(FileExistsError, match="--resume"):
    train.train_and_evaluate(small_run_config(num_epochs=1), workdir, data_dir=data_dir)

  other = small_run_config(num_epochs=2, model="resnet8")
  with pytest.raises(train.CheckpointMismatchError, match="model='resnet2'"):
    train.train_and_evaluate(other, workdir, data_dir=data_dir, resume=True)
  wider = small_run_config(num_epochs=2, model_width=8)
  with pytest.raises(train.CheckpointMismatchError, match="model_width"):
    train.train_and_evaluate(wider, workdir, data_dir=data_dir, resume=True)
  c100 = small_run_config(num_epochs=2, dataset="cifar100")
  with pytest.raises(train.CheckpointMismatchError, match="dataset"):
    train.train_and_evaluate(c100, workdir, data_dir=data_dir, resume=True)

  # A resumed run that diverges stops without saving its non-finite state.
  diverging = small_run_config(
    num_epochs=2, learning_rate=float("inf"), checkpoint_every_steps=1, log_every_steps=100
  )
  with pytest.raises(FloatingPointError, match="not finite|loss is"):
    train.train_and_evaluate(diverging, workdir, data_dir=data_dir, resume=True)
  assert tree_digest(ckpt) == digest


def test_restore_checks_the_run_and_the_shapes(tmp_path):
  config = default.get_config()
  config.optimizer = "sgd"
  manager = train.checkpoint_manager(str(tmp_path), config)
  state = {"params": {"a": jnp.ones(3)}, "step": jnp.int32(5)}
  metadata = train.checkpoint_metadata(config, 10)
  assert train.save_checkpoint(manager, 5, state, metadata)
  assert not train.save_checkpoint(manager, 5, state, metadata)  # never overwritten
  restored = train.restore_checkpoint(manager, 5, state, metadata)
  assert int(restored["step"]) == 5 and np.array_equal(restored["params"]["a"], np.ones(3))
  wider = {"params": {"a": jnp.ones(4)}, "step": jnp.int32(0)}
  with pytest.raises(train.CheckpointMismatchError, match=r"another layout.*\(4,\)"):
    train.restore_checkpoint(manager, 5, wider, metadata)
  with pytest.raises(train.CheckpointMismatchError, match="optimizer='sgd'"):
    train.restore_checkpoint(manager, 5, state, dict(metadata, optimizer="sam_sps"))
  with pytest.raises(FloatingPointError, match="not finite at step 6"):
    train.save_checkpoint(manager, 6, {"params": {"a": jnp.full(3, jnp.nan)}}, metadata)
  assert manager.all_steps() == [5]
  manager.close()


# --------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_an_error():
  c = default.get_config()
  c.lamda = 0.5
  with pytest.raises(train.ConfigError, match=r"'lamda' \(did you mean 'lambd'\?\)"):
    train.check_config(c)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("optimizer", "adam", "optimizer must be one of"),
    ("schedule", "linear", "schedule must be one of"),
    ("lambd", "2", r"`lambd` must be .*got 2\.0"),  # sam_optax's errors
    ("lambd", "1/t^2", r"`lambd` must be a float in \[0, 1\], an optax schedule, or one of"),
    ("dtype", "float16", "dtype must be one of"),
    ("model", "vgg16", "unknown model 'vgg16'"),
    ("dataset", "svhn", "dataset must be one of"),
    ("rho", -0.1, "`rho` must be >= 0"),
    ("label_smoothing", 1.0, "label_smoothing"),
  ],
)
def test_invalid_config_values(key, value, match, data_dir):
  c = tiny(load_config("smoke"))
  setattr(c, key, value)
  with pytest.raises(ValueError, match=match):  # ConfigError, or sam_optax's ValueError
    train.setup(c, data_dir)


def test_cli_reports_missing_archive(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "examples.cifar.main",
      "--config=examples/cifar/configs/smoke.py",
      f"--data_dir={tmp_path}",
      f"--workdir={tmp_path / 'w'}",
      "--config.lambd=1/t",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "cifar-10-python.tar.gz" in proc.stderr and "never downloads" in proc.stderr


def test_cli_rejects_unknown_override():
  from examples.cifar import main

  with pytest.raises(SystemExit) as e:
    main.check_overrides(["main", "--config.rho=0.2", "--config.lamda=0.5"])
  assert e.value.code == 2
  main.check_overrides(["main", "--config.rho=0.2", "--config.lambd=1/t", "--resume"])


@pytest.mark.slow
@pytest.mark.slow
def test_cli_trains_and_resumes_after_sigterm(tmp_path, data_dir):
  """A real process killed by SIGTERM mid-run, resumed from the command line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [
    sys.executable,
    "-m",
    "examples.cifar.main",
    "--config=examples/cifar/configs/smoke.py",
    f"--data_dir={data_dir}",
    f"--workdir={tmp_path}",
    "--config.num_epochs=30",
    "--config.model_width=4",
  ]
  proc = subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  for line in proc.stdout:  # wait until epoch 2 has finished, then stop the run
    if line.startswith("epoch=2 "):
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + signal.SIGTERM, rest
  done = subprocess.run(
    args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr
  assert "Resumed from" in done.stdout
  assert [r["epoch"] for r in records(str(tmp_path))] == list(range(1, 31))


def test_sgd_records_have_no_perturbed_point(tmp_path, data_dir):
  config = small_run_config(optimizer="sgd", num_epochs=1, plots=True)
  report = train.train_and_evaluate(config, str(tmp_path), data_dir=data_dir)
  (rec,) = records(str(tmp_path))
  assert "train_perturbed_loss" not in rec and "train_sharpness" not in rec
  assert rec["learning_rate"] == pytest.approx(
    np.mean([float(train.learning_rate_schedule(config, 4)(s)) for s in range(4)])
  )
  assert report["optimizer"] == "sgd" and os.path.exists(tmp_path / "plots" / "curves.png")
