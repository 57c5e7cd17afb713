"""Peak memory of one training step, from XLA's compiled memory analysis.

For each model, every JAX variant of ``benchmarks/_steps.py`` (SGD, the
hand-written SAM step, ``sam_step`` with four optimizers and
``optax.contrib.sam``) is compiled exactly as it runs, donation included, and
``jax.jit(step).lower(...).compile().memory_analysis()`` gives the sizes of
its arguments, outputs, donated (aliased) buffers and temporaries. The peak
live memory of the step is

    peak = arguments + outputs - aliased + temporaries

(XLA reports ``peak_memory_in_bytes`` itself on some backends; it is recorded
when non-zero). SAM needs, over SGD, the perturbed parameters and the second
gradient while the first is alive: about one or two parameter-sized buffers;
``sam_step`` should need no more than the hand-written step (target: ≤ +5%).

Run ``python -m benchmarks.memory [--quick]``; results go to
``benchmarks/results/memory[_quick].{json,md}``. Nothing is executed, so this
is deterministic and takes only the compile time.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import jax

from benchmarks import _models
from benchmarks import _report
from benchmarks import _steps
from benchmarks.step_time import FULL_MODELS
from benchmarks.step_time import QUICK_MODELS
from benchmarks.step_time import RESULTS
from benchmarks.step_time import environment

SCHEMA_VERSION = 1


def analyse(variant: _steps.Variant, params, batch_stats, batch) -> dict[str, int]:
  state = variant.fresh_state(params, batch_stats)
  compiled = variant.jitted.lower(*variant.args(state, batch)).compile()
  m = compiled.memory_analysis()
  out = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
  }
  out["peak_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  xla_peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  if xla_peak:
    out["xla_peak_memory_bytes"] = xla_peak
  return out


def bench_model(
  name: str, batch_size: int | None, log, only: list[str] | None = None
) -> dict[str, Any]:
  spec, params, batch_stats, batch, loss_fn = _models.make_problem(name, batch_size)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  variants = []
  for v in _steps.all_variants(loss_fn, only):
    variants.append({"name": v.name, "label": v.label, **analyse(v, params, batch_stats, batch)})
    log(f"[{name}] {v.name}: peak {variants[-1]['peak_bytes'] / 2**20:.2f} MiB")
  by_name = {v["name"]: v for v in variants}
  sgd, floor = by_name["sgd"]["peak_bytes"], by_name["hand_written_sam"]["peak_bytes"]
  for v in variants:
    v["ratio_to_hand_written"] = v["peak_bytes"] / floor
    v["extra_over_sgd_in_params"] = (v["peak_bytes"] - sgd) / param_bytes
  checks = []
  for v in variants:
    if v["name"].startswith("sam_step") and v["name"] != _steps.GUARDED:
      floor = _steps.FLOOR.get(v["name"], "hand_written_sam")
      ratio = v["peak_bytes"] / by_name[floor]["peak_bytes"]
      checks.append(
        {"target": f"{v['name']} peak <= 1.05 x {floor}", "value": ratio, "met": ratio <= 1.05}
      )
  micro = [
    {"name": v.name, "label": v.label, **analyse(v, params, batch_stats, batch)}
    for v in _steps.microbatch_variants(loss_fn)
  ]
  for v in micro:
    v["temp_ratio_to_k1"] = v["temp_bytes"] / micro[0]["temp_bytes"]
    log(f"[{name}] {v['name']}: temporaries {v['temp_bytes'] / 2**20:.2f} MiB")
  return {
    "model": name,
    "params": _models.param_count(params),
    "microbatches": micro,
    "param_bytes": int(param_bytes),
    "batch_size": spec.batch_size,
    "dtype": "float32",
    "variants": variants,
    "checks": checks,
    # The opt-in non-finite guard keeps the old parameters and state until it has
    # checked the new ones: reported, not held to the floor.
    "guard_cost": by_name[_steps.GUARDED]["peak_bytes"]
    / by_name["sam_step_unified_l1"]["peak_bytes"]
    if {_steps.GUARDED, "sam_step_unified_l1"} <= set(by_name)
    else None,
  }


def markdown(result: dict[str, Any]) -> str:
  env = result["environment"]
  lines = [
    f"Device: {env['device']}; jax {env['jax']}. XLA's compiled memory analysis of one "
    "jit-compiled step (parameters and optimizer state donated); peak = arguments + "
    "outputs − aliased + temporaries.",
    "",
    f"Command: `{result['command']}`",
    "",
  ]
  for m in result["models"]:
    lines += [
      f"**{m['model']}** ({m['params']:,} parameters = {m['param_bytes'] / 2**20:.2f} MiB, "
      f"batch {m['batch_size']}, {m['dtype']})",
      "",
      "| variant | arguments MiB | temporaries MiB | peak MiB | × hand-written SAM "
      "| extra over SGD (× parameter size) |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for v in m["variants"]:
      lines.append(
        f"| {v['label']} | {v['argument_bytes'] / 2**20:.2f} | {v['temp_bytes'] / 2**20:.2f} | "
        f"{v['peak_bytes'] / 2**20:.2f} | {v['ratio_to_hand_written']:.3f} | "
        f"{v['extra_over_sgd_in_params']:+.2f} |"
      )
    lines.append("")
    if m.get("microbatches"):
      lines += [
        f"`sam_step(..., microbatches=k)` on {m['model']} (exact accumulation; the "
        "temporaries hold the activations of one micro-batch):",
        "",
        "| k | temporaries MiB | × k = 1 | peak MiB |",
        "|---:|---:|---:|---:|",
      ]
      for v in m["microbatches"]:
        lines.append(
          f"| {v['name'].rsplit('_', 1)[1]} | {v['temp_bytes'] / 2**20:.2f} | "
          f"{v['temp_ratio_to_k1']:.2f} | {v['peak_bytes'] / 2**20:.2f} |"
        )
      lines.append("")
  lines += ["Targets:", ""]
  for m in result["models"]:
    if m.get("guard_cost"):
      lines.append(
        f"- {m['model']}: peak of `skip_nonfinite=True` (guarded / default sam_step, "
        f"informational): {m['guard_cost']:.3f}"
      )
  for m in result["models"]:
    for c in m["checks"]:
      lines.append(
        f"- {m['model']}: `{c['target']}`: {c['value']:.3f} — {'met' if c['met'] else '**missed**'}"
      )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="the tiny models only")
  parser.add_argument(
    "--models", default=None, help=f"comma-separated, from {sorted(_models.MODELS)}"
  )
  parser.add_argument(
    "--variants",
    default=None,
    help="comma-separated subset of the JAX variants (sgd and hand_written_sam are always run)",
  )
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--out", default=None, help="output path without extension")
  args = parser.parse_args(argv)
  models = (
    args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else FULL_MODELS)
  )
  for m in models:
    if m not in _models.MODELS:
      parser.error(f"--models: unknown model {m!r}; choose from {sorted(_models.MODELS)}")
  out = (
    pathlib.Path(args.out) if args.out else RESULTS / ("memory_quick" if args.quick else "memory")
  )
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  result = {
    "schema_version": SCHEMA_VERSION,
    "benchmark": "memory",
    "command": "python -m benchmarks.memory " + " ".join(sys.argv[1:] if argv is None else argv),
    "environment": environment(threads=0, torch_python=None),
    "models": [
      bench_model(m, args.batch_size, log, args.variants.split(",") if args.variants else None)
      for m in models
    ],
  }
  _report.write(out, result, markdown(result))
  return result


if __name__ == "__main__":
  main()
