"""Standalone reproduction: XLA:CPU transposes the operands of every convolution weight gradient.

Only ``jax`` is needed; nothing from this repository is imported, so the file can be
attached to an upstream (openxla/xla, jax-ml/jax) issue as it is.

What it shows, for one 3×3 NHWC/HWIO convolution of ResNet-20's first stage (batch 128,
32×32, 16→16 channels, stride 1, padding 1):

1. The weight gradient that ``jax.vjp`` emits is a convolution whose "batch" is the input
   channel and whose contracted "feature" is the example index
   (``dim_labels=f01b_i01o->01bf``). XLA:CPU's convolution canonicalization rewrites it
   into the only form its kernels take (``b01f_01io->b01f``) by materialising two
   transposes: the activation [N,H,W,C] → [C,H,W,N] and the output gradient
   [N,H,W,C] → [H,W,N,C] (``transpose_copy_fusion``), i.e. 2 × 8 MiB moved per
   convolution, by the generic loop emitter.
2. The canonical convolution then has a 32×32 window and 128 input "features": YNNPACK
   (the default convolution library since jax 0.8) accepts it and is several times
   slower on it than Eigen (``--xla_cpu_experimental_ynn_fusion_type=``), while YNNPACK
   is the faster of the two on the forward and input-gradient convolutions. There is no
   per-convolution choice, so no flag gives the best of both.
3. In a network, the elementwise producers of the activation (batch norm, ReLU, the
   residual additions) are fused into these transposes, so each transpose re-reads all
   their inputs in transposed order (up to 4 activations for ResNet-20's last block of a
   stage); an ``optimization_barrier`` does not prevent it on CPU.
4. PyTorch (oneDNN) computes the same weight gradient from NHWC/NCHW directly, without
   transposes.

Run: ``taskset -c 1 python benchmarks/xla_cpu_transpose_repro.py`` (one core; ``--rounds``).
Figures measured on this project's machine are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

DN = ("NHWC", "HWIO", "NHWC")
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DN)


def weight_grad(x, dy):
  w = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]


def forward(x, w):
  return conv(x, w)


def input_grad(w, dy):
  x = jnp.zeros(dy.shape[:3] + (w.shape[2],), dy.dtype)
  return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]


def transposes_only(x, dy):
  """The two copies XLA:CPU inserts, on their own."""
  return jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3))


def entry_ops(compiled) -> list[str]:
  entry = compiled.as_text().split("ENTRY")[1]
  ops = []
  for m in re.finditer(
    r"^\s+(?:ROOT )?%([\w\-]+?)(?:\.\d+)? = (\S+) (\w[\w\-]*)\((.*)$", entry, re.M
  ):
    name, shape, op, rest = m.groups()
    if op in ("parameter", "tuple", "bitcast", "constant", "get-tuple-element"):
      continue
    labels = re.search(r"dim_labels=(\S+?),", rest)
    ops.append(f"{name}: {shape.split('{')[0]}" + (f" {labels.group(1)}" if labels else ""))
  return ops


def profile(fn, *args, steps: int = 3) -> dict[str, float]:
  """Milliseconds per call by HLO instruction kind (jax.profiler)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and re.fullmatch(r"[a-z][a-z0-9_\-]*(\.\d+)?", e["name"]):
      kinds[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0) / 1e3 / steps
  return dict(kinds.most_common(4))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  n, s, c = args.batch, args.size, args.channels
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, s, s, c), jnp.float32)
  w = jax.random.normal(kw, (3, 3, c, c), jnp.float32) * 0.1
  dy = jax.random.normal(kd, (n, s, s, c), jnp.float32)
  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}; batch {n}, {s}x{s}, "
    f"{c}->{c} channels, float32, NHWC/HWIO"
  )
  print("\nThe weight gradient before optimisation:")
  hlo = jax.jit(weight_grad).lower(x, dy).as_text(dialect="hlo")
  for line in hlo.splitlines():
    if "convolution(" in line:
      print("  " + re.sub(r",? metadata=.*", "", line.strip()))
  cases = {
    "forward": (forward, (x, w)),
    "input gradient": (input_grad, (w, dy)),
    "weight gradient": (weight_grad, (x, dy)),
    "the two transposes alone": (transposes_only, (x, dy)),
  }
  compiled = {}
  for label, (fn, a) in cases.items():
    for cfg, options in (("YNNPACK (default)", {}), ("Eigen", EIGEN)):
      compiled[label, cfg] = (jax.jit(fn).lower(*a).compile(compiler_options=options), a)
  print("\nThe weight gradient after optimisation (entry computation):")
  for cfg in ("YNNPACK (default)", "Eigen"):
    print(f"  {cfg}:")
    for op in entry_ops(compiled["weight gradient", cfg][0]):
      print(f"    {op}")
  ref = np.asarray(compiled["weight gradient", "Eigen"][0](x, dy))
  got = np.asarray(compiled["weight gradient", "YNNPACK (default)"][0](x, dy))
  print(
    f"  YNNPACK vs Eigen: max relative difference {np.abs(got - ref).max() / np.abs(ref).max():.1e}"
  )
  cpu = {k: [] for k in compiled}
  wall = {k: [] for k in compiled}
  for _ in range(args.rounds):  # interleaved rounds: every variant sees the same load
    for k, (fn, a) in compiled.items():
      jax.block_until_ready(fn(*a))
      t, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn(*a))
      cpu[k].append(time.process_time() - t)
      wall[k].append(time.perf_counter() - t0)
  print(f"\nms per call, median of {args.rounds} interleaved rounds (CPU time / wall time):")
  print(f"  {'':26s} {'YNNPACK (default)':>22s} {'Eigen':>22s}")
  for label in cases:
    cells = [
      f"{1e3 * np.median(cpu[label, cfg]):8.1f} / {1e3 * np.median(wall[label, cfg]):8.1f}"
      for cfg in ("YNNPACK (default)", "Eigen")
    ]
    print(f"  {label:26s} {cells[0]:>22s} {cells[1]:>22s}")
  print("\nWeight gradient by HLO kind (jax.profiler, ms per call):")
  for cfg in ("YNNPACK (default)", "Eigen"):
    fn, a = compiled["weight gradient", cfg]
    print(f"  {cfg}: " + ", ".join(f"{k} {v:.1f}" for k, v in profile(fn, *a).items()))


if __name__ == "__main__":
  main()
