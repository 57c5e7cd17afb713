"""Where XLA:CPU loses to PyTorch on CNNs, and the fastest honest configuration.

Two measurements, each interleaved round-robin in one process (PyTorch through
``torch_reference.py`` in lockstep, as in ``step_time.py``):

1. One 3×3 convolution (default: ResNet-20's second stage, batch 128, 16×16,
   32→32 channels): forward, input gradient and weight gradient, in JAX for
   each layout (NHWC, NCHW), dtype (float32, bfloat16) and convolution lowering
   (XLA's default YNNPACK kernels, or Eigen), and in PyTorch for NCHW and
   channels-last at 1 and at N threads.
2. The SGD training step of a model (default ResNet-20) compiled with each
   XLA:CPU configuration below (per-compilation ``compiler_options``, so all
   of them run side by side), next to PyTorch's SGD step at 1 and N threads.
   Every configuration's parameters after one step are compared with the
   default's, to show which ones change the numerics.

Run ``python -m benchmarks.cpu_conv [--quick]``; results go to
``benchmarks/results/cpu_conv[_quick].{json,md}``. To use a configuration in
any JAX program, put its flags in ``XLA_FLAGS`` (the table gives them).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _models
from benchmarks import _report
from benchmarks import _steps
from benchmarks.step_time import RESULTS
from benchmarks.step_time import TorchWorker
from benchmarks.step_time import environment
from benchmarks.step_time import summary
from benchmarks.step_time import torch_python_default

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_YNN_ALL = ",".join(
  f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_CONVOLUTION", "ELTWISE", "REDUCE", "DOT")
)

# name -> (description, compiler options, the same as XLA_FLAGS)
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
  "default": ("XLA default (YNNPACK convolutions)", {}, ""),
  "eigen_conv": ("Eigen convolutions", {_YNN: ""}, f"--{_YNN}="),
  # YNNPACK is slow on the canonicalized weight-gradient convolutions (issue 16,
  # benchmarks/xla_cpu_transpose_repro.py) but keeps the batch-norm reductions fast.
  "eigen_conv_ynn_reduce": (
    "Eigen convolutions, YNNPACK reductions",
    {_YNN: "LIBRARY_FUSION_TYPE_REDUCE"},
    f"--{_YNN}=LIBRARY_FUSION_TYPE_REDUCE",
  ),
  "ynn_fusions": (
    "YNNPACK convolutions, elementwise, reductions and dots",
    {_YNN: _YNN_ALL},
    f"--{_YNN}={_YNN_ALL}",
  ),
  "fast_math": (
    "default + fast math (reassociates, approximates: not like-for-like)",
    {"xla_cpu_enable_fast_math": True},
    "--xla_cpu_enable_fast_math=true",
  ),
}


def _interleave(runners: dict[str, Any], rounds: int) -> dict[str, list[float]]:
  names = list(runners)
  samples = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      samples[n].append(runners[n]())
  return samples


def conv_parts(batch: int, size: int, channels: int, rounds: int, worker, threads: int, log):
  """Forward / input-gradient / weight-gradient times of one 3×3 convolution."""
  runners, meta = {}, {}
  for layout in ("NHWC", "NCHW"):
    for dtype in (jnp.float32, jnp.bfloat16):
      if layout == "NHWC":
        xs, ws, dn = (
          (batch, size, size, channels),
          (3, 3, channels, channels),
          ("NHWC", "HWIO", "NHWC"),
        )
      else:
        xs, ws, dn = (
          (batch, channels, size, size),
          (channels, channels, 3, 3),
          ("NCHW", "OIHW", "NCHW"),
        )
      kx, kw = jax.random.split(jax.random.key(0))
      x = jax.random.normal(kx, xs, dtype)
      w = jax.random.normal(kw, ws, dtype)

      def conv(x, w, dn=dn):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

      dy = conv(x, w)
      parts = {
        "fwd": (conv, (x, w)),
        "dx": (lambda dy, w, conv=conv, x=x: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0], (dy, w)),
        "dw": (lambda dy, x, conv=conv, w=w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0], (dy, x)),
      }
      for cfg in ("default", "eigen_conv"):
        key = f"jax {layout} {jnp.dtype(dtype).name} {cfg}"
        compiled = {
          p: jax.jit(f).lower(*a).compile(compiler_options=CONFIGS[cfg][1])
          for p, (f, a) in parts.items()
        }

        def run(compiled=compiled, parts=parts):
          out = {}
          for p, c in compiled.items():
            jax.block_until_ready(c(*parts[p][1]))  # warm caches, as PyTorch's side does
            start = time.perf_counter()
            jax.block_until_ready(c(*parts[p][1]))
            out[p] = time.perf_counter() - start
          return out

        runners[key] = run
        meta[key] = {
          "framework": "jax",
          "layout": layout,
          "dtype": jnp.dtype(dtype).name,
          "config": cfg,
        }
  if worker is not None:
    for th in sorted({1, threads}):
      for layout in ("NCHW", "NHWC"):
        for dtype in ("float32", "bfloat16"):
          key = f"torch {layout} {dtype} {th} thread{'s' if th > 1 else ''}"
          runners[key] = lambda th=th, layout=layout, dtype=dtype: worker.ask(
            cmd="conv",
            batch=batch,
            size=size,
            channels=channels,
            layout=layout,
            dtype=dtype,
            threads=th,
          )
          meta[key] = {"framework": "torch", "layout": layout, "dtype": dtype, "threads": th}
  log(f"[conv] {len(runners)} variants, {rounds} rounds")
  raw = _interleave(runners, rounds)
  rows = []
  for key, samples in raw.items():
    rows.append(
      {
        "name": key,
        **meta[key],
        **{p: summary([s[p] for s in samples]) for p in ("fwd", "dx", "dw")},
      }
    )
  return {"batch": batch, "size": size, "channels": channels, "rounds": rounds, "rows": rows}


def model_step(name: str, batch_size: int | None, rounds: int, worker, threads: int, log):
  """The SGD step of a model under each XLA configuration, next to PyTorch's."""
  spec, params, batch_stats, batch, loss_fn = _models.make_problem(name, batch_size)
  v = _steps.sgd(loss_fn)
  runners, rows, first = {}, {}, {}
  for cfg, (label, options, flags) in CONFIGS.items():
    state = v.fresh_state(params, batch_stats)
    t0 = time.perf_counter()
    compiled = v.jitted.lower(*v.args(state, batch)).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    state = jax.block_until_ready(v.carry(compiled(*v.args(state, batch))))
    first[cfg] = jax.tree.map(np.asarray, state[0])  # parameters after one step
    state = jax.block_until_ready(v.carry(compiled(*v.args(state, batch))))
    holder = {"state": state}

    def run(compiled=compiled, holder=holder):
      start = time.perf_counter()
      holder["state"] = jax.block_until_ready(v.carry(compiled(*v.args(holder["state"], batch))))
      return time.perf_counter() - start

    runners[cfg] = run
    rows[cfg] = {
      "name": cfg,
      "framework": "jax",
      "label": label,
      "xla_flags": flags,
      "compile_s": compile_s,
    }
  for cfg in CONFIGS:  # how far one step moves the parameters away from the default's
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), first[cfg], first["default"])
    rows[cfg]["max_param_diff_after_one_step"] = max(jax.tree.leaves(diff))
  if worker is not None:
    info = worker.ask(
      cmd="setup",
      model=name,
      batch_size=spec.batch_size,
      threads=threads,
      lr=_steps.LR,
      momentum=_steps.MOMENTUM,
      weight_decay=_steps.WEIGHT_DECAY,
      rho=_steps.RHO,
    )
    if info["params"] != _models.param_count(params):
      raise RuntimeError(f"[{name}] PyTorch and Flax networks differ in size.")
    for th in sorted({1, threads}):
      key = f"torch_sgd_{th}_threads"
      runners[key] = lambda th=th: worker.ask(cmd="time", variant="torch_sgd", steps=1, threads=th)[
        "seconds"
      ]
      rows[key] = {
        "name": key,
        "framework": "torch",
        "label": f"PyTorch SGD, {th} thread{'s' if th > 1 else ''}",
        "xla_flags": "",
        "threads": th,
      }
  log(f"[{name}] {len(runners)} variants, {rounds} rounds")
  raw = _interleave(runners, rounds)
  torch_key = "torch_sgd_1_threads" if "torch_sgd_1_threads" in raw else None
  for key, samples in raw.items():
    rows[key]["seconds"] = summary(samples)
    rows[key]["ratio_to_default"] = summary([a / b for a, b in zip(samples, raw["default"])])
    if torch_key:  # per-round ratio to PyTorch's SGD step on one thread, measured alongside
      rows[key]["ratio_to_torch_1_thread"] = summary(
        [a / b for a, b in zip(samples, raw[torch_key])]
      )
  return {
    "model": name,
    "params": _models.param_count(params),
    "batch_size": spec.batch_size,
    "rounds": rounds,
    "rows": list(rows.values()),
  }


def profile_step(name: str, batch_size: int | None, log) -> dict[str, Any]:
  """Time per kind of XLA thunk in the default configuration's SGD step (jax.profiler)."""
  import collections
  import glob
  import gzip
  import re
  import tempfile

  spec, params, batch_stats, batch, loss_fn = _models.make_problem(name, batch_size)
  v = _steps.sgd(loss_fn)
  state = v.fresh_state(params, batch_stats)
  for _ in range(2):
    state = jax.block_until_ready(v.step(state, batch))
  steps = 3
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state = jax.block_until_ready(v.step(state, batch))
    (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds = collections.Counter()
  for e in events:
    # XLA's thunks are named after their HLO instruction: "transpose_copy_fusion.29", ...
    if e.get("ph") == "X" and re.fullmatch(r"[a-z][a-z0-9_\-]*(\.\d+)?", e["name"]):
      kinds[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0) / 1e6 / steps
  total = sum(kinds.values())
  log(f"[profile {name}] {1e3 * total:.0f} ms of thunks per step")
  return {
    "model": name,
    "batch_size": spec.batch_size,
    "thunk_seconds_per_step": total,
    "by_kind": [{"kind": k, "seconds": s, "share": s / total} for k, s in kinds.most_common(12)],
  }


def markdown(result: dict[str, Any]) -> str:
  env = result["environment"]
  c = result["conv"]
  lines = [
    f"Device: {env['device']}, {env['cpu_cores']} cores; jax {env['jax']}. Load average "
    f"{env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end: the "
    "machine is shared, so the minimum (least disturbed sample) is given next to the median.",
    "",
    f"Command: `{result['command']}`",
    "",
    f"**One 3×3 convolution**, batch {c['batch']}, {c['size']}×{c['size']}, "
    f"{c['channels']}→{c['channels']} channels: ms, min / median of {c['rounds']} rounds.",
    "",
    "| implementation | forward | input gradient | weight gradient |",
    "|---|---:|---:|---:|",
  ]
  for r in c["rows"]:
    lines.append(
      f"| {r['name']} | "
      + " | ".join(
        f"{1e3 * r[p]['min']:.2f} / {1e3 * r[p]['median']:.2f}" for p in ("fwd", "dx", "dw")
      )
      + " |"
    )
  m = result["model"]
  lines += [
    "",
    f"**SGD step of {m['model']}** ({m['params']:,} parameters, batch {m['batch_size']}, "
    f"float32): ms, min / median of {m['rounds']} rounds; ratio to the XLA default "
    "(median of per-round ratios); largest parameter difference from the default "
    "after one step; ratio to PyTorch's SGD step on one thread (median of per-round "
    "ratios, `-` without PyTorch).",
    "",
    "| configuration | `XLA_FLAGS` | ms / step | × default | × PyTorch 1 thread | max param diff |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for r in m["rows"]:
    diff = r.get("max_param_diff_after_one_step")
    vs_torch = r.get("ratio_to_torch_1_thread")
    lines.append(
      f"| {r['label']} | `{r['xla_flags'] or '-'}` | {1e3 * r['seconds']['min']:.4g} / "
      f"{1e3 * r['seconds']['median']:.4g} | {r['ratio_to_default']['median']:.2f} | "
      + ("-" if vs_torch is None else f"{vs_torch['median']:.2f}")
      + " | "
      + ("-" if diff is None else f"{diff:.1e}")
      + " |"
    )
  if result.get("profile"):
    p = result["profile"]
    lines += [
      "",
      f"**Where the XLA default spends {p['model']}'s SGD step** (jax.profiler, "
      f"{1e3 * p['thunk_seconds_per_step']:.0f} ms of XLA thunks per step; the twelve "
      "largest kinds):",
      "",
      "| HLO kind | ms / step | share |",
      "|---|---:|---:|",
    ]
    for k in p["by_kind"]:
      lines.append(f"| `{k['kind']}` | {1e3 * k['seconds']:.1f} | {100 * k['share']:.0f}% |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model and convolution")
  parser.add_argument("--model", default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--no-profile", action="store_true", help="skip the per-kind profile of the default SGD step"
  )
  args = parser.parse_args(argv)
  model = args.model or ("tiny_cnn" if args.quick else "resnet20")
  rounds = args.rounds or (5 if args.quick else 10)
  threads = args.threads or len(os.sched_getaffinity(0))
  torch_python = (
    None if args.torch_python == "none" else args.torch_python or torch_python_default()
  )
  out = (
    pathlib.Path(args.out)
    if args.out
    else RESULTS / ("cpu_conv_quick" if args.quick else "cpu_conv")
  )
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  result = {
    "schema_version": 1,
    "benchmark": "cpu_conv",
    "command": "python -m benchmarks.cpu_conv " + " ".join(sys.argv[1:] if argv is None else argv),
    "environment": environment(threads, torch_python),
  }
  worker = TorchWorker(torch_python) if torch_python else None
  try:
    shape = (16, 8, 8) if args.quick else (128, 16, 32)
    result["conv"] = conv_parts(*shape, rounds=rounds, worker=worker, threads=threads, log=log)
    result["model"] = model_step(model, None, rounds, worker, threads, log)
    if not args.no_profile:
      result["profile"] = profile_step(model, None, log)
  finally:
    if worker is not None:
      worker.close()
  result["environment"]["loadavg_end"] = list(os.getloadavg())
  _report.write(out, result, markdown(result))
  return result


if __name__ == "__main__":
  main()
