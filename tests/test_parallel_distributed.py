"""Multi-process data parallelism: examples/distributed on 2 CPU processes (127.0.0.1, gloo).

Kept small: a few steps of a tiny MLP. Every subprocess has a timeout, and all
processes are killed at the end whatever happens.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH = 4, 32


def _load_train():
  spec = importlib.util.spec_from_file_location(
    "distributed_train", ROOT / "examples" / "distributed" / "train.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return env


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
  out = tmp_path / "two.npz"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "examples.distributed.launch",
      "--num-processes",
      "2",
      "--timeout",
      "150",
      "--",
      "--steps",
      str(STEPS),
      "--global-batch",
      str(GLOBAL_BATCH),
      "--local-devices",
      "2",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  for pid in (0, 1):  # each process checked its own devices and the other process
    assert f"[process {pid}/2] done: {STEPS} steps" in proc.stdout
    assert "replicas identical" in proc.stdout

  # The reference: one device, a plain loop over the same global batches.
  train = _load_train()
  args = train.parse_args(["--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH)])
  opt = train.make_optimizer(args)
  step = sam_optax.sam_step(train.loss_fn, opt, donate=False)
  params = train.init_params(args.seed)
  state = opt.init(params)
  x, y = train.make_data(args.seed, STEPS * GLOBAL_BATCH)
  losses = []
  for t in range(STEPS):
    rows = slice(t * GLOBAL_BATCH, (t + 1) * GLOBAL_BATCH)
    batch = {"x": x[rows], "y": y[rows]}
    params, state, metrics = step(params, state, batch)
    losses.append(float(metrics["loss"]))

  got = np.load(out)
  np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
  assert len(set(np.round(losses, 4))) == STEPS  # the loss moves: the run is not trivial
  for name, value in params.items():
    np.testing.assert_allclose(got[name], np.asarray(value), rtol=1e-5, atol=1e-6)


# Process 1 dying is the default case (the coordinator must notice); process 0
# (the coordinator itself) dying is checked in the slow suite.
@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_when_a_process_dies_the_other_exits_with_a_clear_error(victim):
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "examples.distributed.train",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--steps",
        "100000",
        "--global-batch",
        "8",
        "--heartbeat-timeout",
        "3",
        "--timeout",
        "60",
      ],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [[], []]
  running = threading.Event()

  def read(i):
    for line in procs[i].stdout:
      logs[i].append(line)
      if f"[process {victim}/2] step 3 " in line:
        running.set()

  readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
  for r in readers:
    r.start()
  try:
    assert running.wait(timeout=120), "".join(logs[0] + logs[1])[-3000:]
    procs[victim].kill()
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    rc = survivor.wait(timeout=60)
    elapsed = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  readers[1 - victim].join(timeout=10)
  log = "".join(logs[1 - victim])
  assert rc != 0
  assert elapsed < 30, elapsed  # bounded by the heartbeat timeout (3 s) plus shutdown
  assert re.search(r"another task died|heartbeat timeout|(reset|closed) by peer", log), log[-3000:]
  assert "replicas identical" not in log  # it did not claim to have finished


def _free_port():
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
