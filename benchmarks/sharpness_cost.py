"""Cost of one call of each sharpness diagnostic, in units of training steps.

Per model, on one fixed batch (the same for the steps and the diagnostics):

* ``sgd``: one SGD step (one forward/backward pass), jit, donated;
* ``sam``: one ``sam_step`` with ``unified_sam`` (λ = 1), jit, donated;
* ``top_hessian_eigenvalue``: ``num_iters`` Hessian-vector products (tol = 0, so the
  work is fixed), jit;
* ``hessian_trace``: ``num_samples`` Rademacher probes, jit;
* ``worst_case_sharpness``: ``num_steps`` ascent points (num_steps + 1 gradients), jit.

The diagnostics see the loss in inference mode (batch norm with its running
statistics), as the digits job measures them. Compilation and one warm-up call are
outside the timed region, every sample ends with ``block_until_ready``, and the
methods run round-robin (the first rotates every round); a cost is the median over
rounds of the per-round ratio time(diagnostic) / time(step), with its interquartile
range. Models: the digits job's CNN on a batch of its images, and the benchmark MLP.

    python -m benchmarks.sharpness_cost --quick   # CI-sized: < 2 min on 2 cores
    python -m benchmarks.sharpness_cost           # more rounds

Results go to ``benchmarks/results/sharpness_cost[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import sam_optax
from benchmarks import _models
from benchmarks import _report
from benchmarks.step_time import RESULTS
from benchmarks.step_time import environment
from benchmarks.step_time import paired_ratio
from benchmarks.step_time import summary
from sam_optax import sharpness

SCHEMA_VERSION = 1
DIAGNOSTICS = ("top_hessian_eigenvalue", "hessian_trace", "worst_case_sharpness")


def digits_problem(batch_size: int):
  """The digits job's CNN, its training and inference losses, and a batch of its images."""
  from examples.digits import train

  data = train.load_data()
  variables = train.MODEL.init(jax.random.key(0), data["x_train"][:1], train=False)
  batch = {
    "image": jnp.asarray(data["x_train"][:batch_size]),
    "label": jnp.asarray(data["y_train"][:batch_size]),
  }
  return (
    variables["params"],
    variables["batch_stats"],
    batch,
    train.make_loss_fn(train.MODEL),
    train.EVAL_LOSS,
  )


def mlp_problem(name: str, batch_size: int | None):
  spec, params, batch_stats, batch, loss_fn = _models.make_problem(name, batch_size)
  eval_loss = lambda p, b, s: loss_fn(p, b, s)[0]  # no batch norm: the same loss
  return params, batch_stats, batch, loss_fn, eval_loss


def methods(loss_fn, eval_loss, *, num_iters: int, num_samples: int, num_steps: int, rho: float):
  """name -> (make_state(params, batch_stats) -> state, call(state, batch) -> state)."""
  base = optax.sgd(0.05, momentum=0.9)
  sam = sam_optax.unified_sam(optax.sgd(0.05, momentum=0.9), rho=rho, lambd=1.0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def sgd(params, opt_state, batch, batch_stats):
    (_, batch_stats), grads = grad_fn(params, batch, batch_stats)
    updates, opt_state = base.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats

  sgd_jit = jax.jit(sgd, donate_argnums=(0, 1))
  sam_jit = sam_optax.sam_step(loss_fn, sam, has_aux=True)
  copy = lambda t: jax.tree.map(jnp.copy, t)
  out: dict[str, tuple[Callable, Callable]] = {
    "sgd": (
      lambda p, s: (copy(p), base.init(p), copy(s)),
      lambda st, b: sgd_jit(st[0], st[1], b, st[2]),
    ),
    "sam": (
      lambda p, s: (copy(p), sam.init(p), copy(s)),
      lambda st, b: (lambda o: (o[0], o[1], o[3]))(sam_jit(st[0], st[1], b, st[2])),
    ),
  }
  diag = {
    "top_hessian_eigenvalue": lambda p, b, s: sharpness.top_hessian_eigenvalue(
      eval_loss, p, b, s, num_iters=num_iters, tol=0.0
    ),
    "hessian_trace": lambda p, b, s: sharpness.hessian_trace(
      eval_loss, p, b, s, num_samples=num_samples
    ),
    "worst_case_sharpness": lambda p, b, s: sharpness.worst_case_sharpness(
      eval_loss, p, b, s, rho=rho, num_steps=num_steps
    ),
  }
  for name, fn in diag.items():
    jitted = jax.jit(fn)
    # The state is (params, batch_stats, last value); the value is what is waited for.
    out[name] = (
      lambda p, s: (p, s, None),
      lambda st, b, f=jitted: (st[0], st[1], f(st[0], b, st[1])),
    )
  return out


def bench_model(
  name: str, *, batch_size: int | None, rounds: int, min_sample_s: float, log, **diag_kw
) -> dict[str, Any]:
  if name == "digits_cnn":
    params, batch_stats, batch, loss_fn, eval_loss = digits_problem(batch_size or 64)
  else:
    params, batch_stats, batch, loss_fn, eval_loss = mlp_problem(name, batch_size)
  runs = methods(loss_fn, eval_loss, **diag_kw)
  states, compile_s = {}, {}
  for n, (make, call) in runs.items():
    t0 = time.perf_counter()
    state = make(params, batch_stats)
    for _ in range(2):  # compiles, then one warm-up call
      state = jax.block_until_ready(call(state, batch))
    states[n], compile_s[n] = state, time.perf_counter() - t0
  log(f"[{name}] compiled in {sum(compile_s.values()):.1f}s")

  def timed(n: str, k: int) -> float:
    start, state = time.perf_counter(), states[n]
    for _ in range(k):
      state = runs[n][1](state, batch)
    jax.block_until_ready(state)
    states[n] = state
    return (time.perf_counter() - start) / k

  names = list(runs)
  calls = {n: max(1, math.ceil(min_sample_s / min(timed(n, 1) for _ in range(2)))) for n in names}
  samples = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      samples[n].append(timed(n, calls[n]))
  return {
    "model": name,
    "params": _models.param_count(params),
    "batch_size": int(jax.tree.leaves(batch)[0].shape[0]),
    "rounds": rounds,
    "methods": [
      {
        "name": n,
        "seconds": summary(samples[n]),
        "in_sgd_steps": paired_ratio(samples, n, "sgd"),
        "in_sam_steps": paired_ratio(samples, n, "sam"),
        "calls_per_sample": calls[n],
        "compile_and_warmup_s": compile_s[n],
        "samples_s": samples[n],
      }
      for n in names
    ],
  }


def markdown(result: dict[str, Any]) -> str:
  env, kw = result["environment"], result["diagnostics"]
  labels = {
    "sgd": "SGD step",
    "sam": "SAM step (sam_step, λ = 1)",
    "top_hessian_eigenvalue": f"top_hessian_eigenvalue ({kw['num_iters']} iterations)",
    "hessian_trace": f"hessian_trace ({kw['num_samples']} probes)",
    "worst_case_sharpness": f"worst_case_sharpness ({kw['num_steps']} steps, ρ = {kw['rho']})",
  }
  r = lambda x: f"{x['median']:.2f} [{x['p25']:.2f}–{x['p75']:.2f}]"
  lines = [
    f"Device: {env['device']}, {env['cpu_cores']} cores; jax {env['jax']}. Load average "
    f"{env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end.",
    "",
    f"Command: `{result['command']}`",
    "",
  ]
  for m in result["models"]:
    lines += [
      f"**{m['model']}** ({m['params']:,} parameters, batch {m['batch_size']}, float32; "
      f"{m['rounds']} rounds): median ms per call [interquartile range]; costs as the "
      "median of per-round ratios.",
      "",
      "| call | ms | in SGD steps | in SAM steps |",
      "|---|---:|---:|---:|",
    ]
    for x in m["methods"]:
      s = x["seconds"]
      lines.append(
        f"| {labels[x['name']]} | {1e3 * s['median']:.3g} "
        f"[{1e3 * s['p25']:.3g}–{1e3 * s['p75']:.3g}] | {r(x['in_sgd_steps'])} | "
        f"{r(x['in_sam_steps'])} |"
      )
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="few, short rounds (CI)")
  parser.add_argument(
    "--models",
    default="digits_cnn,tiny_mlp",
    help="comma-separated: digits_cnn and the models of benchmarks/_models.py",
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="examples per batch (default: 64 for digits_cnn, the model's own)",
  )
  parser.add_argument("--rounds", type=int, default=None, help="timed samples per method")
  parser.add_argument("--num-iters", type=int, default=20)
  parser.add_argument("--num-samples", type=int, default=20)
  parser.add_argument("--num-steps", type=int, default=5)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--out", default=None, help="output path without extension")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m != "digits_cnn" and m not in _models.MODELS:
      parser.error(f"--models: unknown model {m!r}; choose digits_cnn or {sorted(_models.MODELS)}")
  rounds = args.rounds or (5 if args.quick else 15)
  if rounds < 1:
    parser.error("--rounds must be >= 1")
  diag_kw = dict(
    num_iters=args.num_iters, num_samples=args.num_samples, num_steps=args.num_steps, rho=args.rho
  )
  out = (
    pathlib.Path(args.out)
    if args.out
    else RESULTS / ("sharpness_cost_quick" if args.quick else "sharpness_cost")
  )
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  result: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "benchmark": "sharpness_cost",
    "command": "python -m benchmarks.sharpness_cost "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "environment": environment(1, None),
    "diagnostics": diag_kw,
    "models": [],
  }
  for m in models:
    result["models"].append(
      bench_model(
        m,
        batch_size=args.batch_size,
        rounds=rounds,
        min_sample_s=0.05 if args.quick else 0.3,
        log=log,
        **diag_kw,
      )
    )
  result["environment"]["loadavg_end"] = list(os.getloadavg())
  _report.write(out, result, markdown(result))
  return result


if __name__ == "__main__":
  main()
