"""Step time of data-parallel SAM: 8 (fake CPU) devices vs 1 device on the same global batch.

  python benchmarks/data_parallel.py            # full run
  python benchmarks/data_parallel.py --quick    # what CI can afford

Modes, timed side by side in one process (round-robin, so load drift hits all alike):
  1 device          sam_step under jit on one device, the whole global batch
  jit, N devices    the same step, batch sharded over a mesh axis (global-batch semantics)
  pmap, N devices   sam_step(axis_name=...) under jax.pmap, ascent="sync"
  pmap local        the same with ascent="local" (m-sharpness: one all-reduce fewer)
  1 device groups   sam_step(groups=N, ascent="local") on one device (m-sharpness, vmap)

The devices are forced with --xla_force_host_platform_device_count, so on a CPU
they share the host's cores: the ratio says what the data-parallel machinery
costs or gains there, not what N accelerators would give. Writes JSON and a
markdown table next to this file (or to --out).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

DEVICES = 8
if __name__ == "__main__":  # must precede the jax import
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
  ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sam_optax  # noqa: E402
from benchmarks import _report  # noqa: E402


def loss_fn(params, batch):
  h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"] + params["b2"])
  logits = h @ params["w3"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make(features, hidden, classes, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w1": rng.normal(size=(features, hidden)) / np.sqrt(features),
    "b1": np.zeros(hidden),
    "w2": rng.normal(size=(hidden, hidden)) / np.sqrt(hidden),
    "b2": np.zeros(hidden),
    "w3": rng.normal(size=(hidden, classes)) / np.sqrt(hidden),
  }
  params = {k: v.astype(np.float32) for k, v in params.items()}
  batch = {
    "x": rng.normal(size=(batch_size, features)).astype(np.float32),
    "y": rng.integers(0, classes, size=batch_size).astype(np.int32),
  }
  return params, batch


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model, few repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--steps-per-repeat", type=int, default=None)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("data_parallel")))
  args = parser.parse_args(argv)
  if jax.device_count() != DEVICES:
    raise SystemExit(f"expected {DEVICES} devices, got {jax.devices()} (run as a script)")
  if args.quick:
    shape, repeats, steps = dict(features=64, hidden=128, classes=10, batch_size=256), 5, 5
  else:
    shape, repeats, steps = dict(features=256, hidden=512, classes=10, batch_size=1024), 7, 5
  repeats = args.repeats or repeats
  steps = args.steps_per_repeat or steps

  params, batch = make(**shape)
  opt = sam_optax.unified_sam(optax.sgd(0.05, momentum=0.9), rho=0.05, lambd="1-1/t")
  mesh = jax.make_mesh((DEVICES,), ("data",))
  dev0 = jax.devices()[0]

  def fresh(place):
    return place(jax.tree.map(np.array, (params, opt.init(params))))

  modes = {
    "1 device": (
      sam_optax.sam_step(loss_fn, opt),
      lambda: fresh(lambda t: jax.device_put(t, dev0)),
      jax.device_put(batch, dev0),
    ),
    f"jit, {DEVICES} devices": (
      sam_optax.sam_step(loss_fn, opt),
      lambda: fresh(lambda t: jax.device_put(t, NamedSharding(mesh, P()))),
      sam_optax.global_batch(batch, mesh),
    ),
    f"pmap, {DEVICES} devices": (
      jax.pmap(
        sam_optax.sam_step(loss_fn, opt, axis_name="b"), axis_name="b", donate_argnums=(0, 1)
      ),
      lambda: fresh(sam_optax.replicate),
      _pmap_batch(sam_optax.shard_batch(batch)),
    ),
    f"pmap local, {DEVICES} devices": (
      jax.pmap(
        sam_optax.sam_step(loss_fn, opt, axis_name="b", ascent="local"),
        axis_name="b",
        donate_argnums=(0, 1),
      ),
      lambda: fresh(sam_optax.replicate),
      _pmap_batch(sam_optax.shard_batch(batch)),
    ),
    f"1 device groups={DEVICES}": (
      sam_optax.sam_step(loss_fn, opt, ascent="local", groups=DEVICES),
      lambda: fresh(lambda t: jax.device_put(t, dev0)),
      jax.device_put(batch, dev0),
    ),
  }

  state = {}
  for name, (step, init, data) in modes.items():  # warm-up: compile + one step, untimed
    p, s = init()
    p, s, m = step(p, s, data)
    jax.block_until_ready((p, s, m))
    state[name] = (p, s)

  times = {name: [] for name in modes}
  for _ in range(repeats):
    for name, (step, _, data) in modes.items():
      p, s = state[name]
      start = time.perf_counter()
      for _ in range(steps):
        p, s, m = step(p, s, data)
      jax.block_until_ready((p, s, m))
      times[name].append((time.perf_counter() - start) / steps)
      state[name] = (p, s)

  base = statistics.median(times["1 device"])
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append(
      {
        "mode": name,
        "median_ms": 1e3 * med,
        "min_ms": 1e3 * min(ts),
        "max_ms": 1e3 * max(ts),
        "speedup_vs_1_device": base / med,
      }
    )
  report = {
    "command": "python benchmarks/data_parallel.py" + (" --quick" if args.quick else ""),
    "devices": f"{DEVICES} x {jax.devices()[0].platform} (forced), host cores: {os.cpu_count()}",
    "jax": jax.__version__,
    "model": shape,
    "repeats": repeats,
    "steps_per_repeat": steps,
    "rows": rows,
  }
  table = [
    "| mode | median ms/step | min–max ms | speed-up vs 1 device |",
    "| --- | --- | --- | --- |",
  ]
  table += [
    f"| {r['mode']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}–{r['max_ms']:.2f} | "
    f"{r['speedup_vs_1_device']:.2f}× |"
    for r in rows
  ]
  header = (
    f"`{report['command']}` — {report['devices']}, jax {jax.__version__}, "
    f"MLP {shape}, median of {repeats} repeats × {steps} steps"
  )
  _report.write(
    pathlib.Path(args.out),
    report,
    header + "\n\n" + "\n".join(table),
    indent=2,
    final_newline=False,
  )
  return 0


def _pmap_batch(sharded):
  """Puts a [devices, per-device, ...] batch on the devices once (not per step)."""
  devices = jax.local_devices()
  sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ("b",)), P("b"))
  return jax.device_put(sharded, sharding)


if __name__ == "__main__":
  sys.exit(main())
