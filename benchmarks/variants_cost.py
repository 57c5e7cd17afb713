"""Cost per step of interval SAM, LookSAM and GSAM against plain SGD, side by side.

A small CNN on random 32x32x3 images; every method trains the same model on the
same batch. Each repeat times a block of steps of every method in turn (the
order rotates between repeats), so slow phases of a shared machine hit all
methods alike; the reported ratio is the median over repeats of
time(method) / time(SGD) within the same repeat.

    python3 benchmarks/variants_cost.py            # full run
    python3 benchmarks/variants_cost.py --quick    # CI-sized

Targets: interval SAM with k = 5 at most 1.25x SGD per step on average
(LookSAM 1.30x); LookSAM's non-SAM steps at most 1.05x SGD. The periodic methods
run twice: as ``sam_step`` builds them by default (on CPU: one compiled program
per kind of step, chosen on the host) and with ``host_dispatch=False`` (one
program, ``lax.cond``), and a second timing pass times every step on its own to
report their SAM steps and skipped steps apart.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sam_optax  # noqa: E402
from benchmarks import _report  # noqa: E402


class SmallCNN(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


class MLP(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16 * self.width)(x))
    x = nn.relu(nn.Dense(16 * self.width)(x))
    return nn.Dense(10)(x)


MODELS = {"cnn": SmallCNN, "mlp": MLP}


def make_problem(model_name, batch_size, width, seed=0):
  model = MODELS[model_name](width)
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), images[:1])["params"]

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn, params, (images, labels)


def looksam_floor(loss_fn, tx, alpha=0.7):
  """The least a LookSAM non-SAM step must do beyond SGD, written by hand.

  ‖g‖, ‖g_v‖ and g + α‖g‖/‖g_v‖ g_v, with no cond, perturbation or metrics:
  what is left of LookSAM's overhead once the library's is taken away.
  """

  def init(params):
    return tx.init(params), jax.tree.map(jnp.ones_like, params)

  def step(params, state, batch):
    opt_state, g_v = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    coef = alpha * optax.tree.norm(grads) / optax.tree.norm(g_v)
    grads = jax.tree.map(lambda g, v: g + coef * v, grads, g_v)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), (opt_state, g_v), loss

  return init, jax.jit(step, donate_argnums=(0, 1))


def methods(loss_fn, k):
  """name -> (init, step); step(params, state, batch) -> (params, state, ...)."""
  base = lambda: optax.sgd(0.05, momentum=0.9)
  sam = lambda: sam_optax.unified_sam(base(), rho=0.05)
  never = 2**30  # LookSAM with no SAM step after the first: every timed step is a non-SAM step
  interval = lambda: sam_optax.interval_sam(sam(), every=k)  # noqa: E731
  look = lambda: sam_optax.looksam(sam(), every=k, alpha=0.7)  # noqa: E731
  steps = {  # name -> (optimizer, sam_step options); SGD runs through sam_step's one-pass path
    "sgd": (base(), {}),
    "sam": (sam(), {}),
    f"interval_sam_k{k}": (interval(), {}),
    f"interval_sam_k{k}_cond": (interval(), {"host_dispatch": False}),
    f"looksam_k{k}": (look(), {}),
    f"looksam_k{k}_cond": (look(), {"host_dispatch": False}),
    "looksam_non_sam_steps": (sam_optax.looksam(sam(), every=never, alpha=0.7), {}),
    "gsam": (sam_optax.gsam(sam(), alpha=0.1), {}),
  }
  out = {n: (tx.init, sam_optax.sam_step(loss_fn, tx, **kw)) for n, (tx, kw) in steps.items()}
  out["looksam_floor"] = looksam_floor(loss_fn, base())
  return out


PERIODIC = ("interval_sam", "looksam_k")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few, short repeats (CI)")
  parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
  parser.add_argument("--k", type=int, default=5, help="SAM every k steps")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--cycles", type=int, default=None, help="k-step cycles per timed block")
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = parser.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 9)
  cycles = args.cycles or (1 if args.quick else 4)
  steps = cycles * args.k

  loss_fn, params0, batch = make_problem(args.model, args.batch_size, args.width)
  runners = {}
  for name, (init, step) in methods(loss_fn, args.k).items():
    params = jax.tree.map(jnp.array, params0)
    state = jax.tree.map(jnp.array, init(params))
    # Compile and take the first step (the SAM step of the periodic methods) untimed.
    params, state, *_ = step(params, state, batch)
    jax.block_until_ready(params)
    runners[name] = [step, params, state]
    if name.startswith(PERIODIC):  # realign on a SAM step
      for _ in range(args.k - 1):
        runners[name][1], runners[name][2], *_ = step(runners[name][1], runners[name][2], batch)

  names = list(runners)
  times = {name: [] for name in names}
  cpu_times = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      step, params, state = runners[name]
      start, start_cpu = time.perf_counter(), time.process_time()
      for _ in range(steps):
        params, state, *_ = step(params, state, batch)
      jax.block_until_ready((params, state))
      times[name].append((time.perf_counter() - start) / steps)
      cpu_times[name].append((time.process_time() - start_cpu) / steps)
      runners[name][1:] = [params, state]

  # Every step timed on its own (a sync after each): SAM steps and skipped steps apart.
  per_step = {name: [] for name in names}
  for _ in range(repeats):
    for name in names:
      step, params, state = runners[name]
      for _ in range(steps):
        start = time.perf_counter()
        params, state, *_ = step(params, state, batch)
        jax.block_until_ready((params, state))
        per_step[name].append(time.perf_counter() - start)
      runners[name][1:] = [params, state]
  sgd_step_ms = 1e3 * statistics.median(per_step["sgd"])
  kinds = {}
  for name in names:
    if name.startswith(PERIODIC):  # blocks start on a SAM step: index % k == 0
      sam_steps = [t for i, t in enumerate(per_step[name]) if i % args.k == 0]
      skipped = [t for i, t in enumerate(per_step[name]) if i % args.k]
      kinds[name] = {
        "sam_step_ms": 1e3 * statistics.median(sam_steps),
        "skipped_step_ms": 1e3 * statistics.median(skipped),
        "sam_step_x_sgd": 1e3 * statistics.median(sam_steps) / sgd_step_ms,
        "skipped_step_x_sgd": 1e3 * statistics.median(skipped) / sgd_step_ms,
      }

  def summary(samples, sgd_samples):
    ratios = [t / s for t, s in zip(samples, sgd_samples)]
    return {
      "median_ms_per_step": 1e3 * statistics.median(samples),
      "median_ratio_to_sgd": statistics.median(ratios),
      "min_ratio": min(ratios),
      "max_ratio": max(ratios),
    }

  results = {
    "command": "python3 benchmarks/variants_cost.py "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "model": args.model,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "batch_size": args.batch_size,
    "width": args.width,
    "k": args.k,
    "repeats": repeats,
    "steps_per_block": steps,
    "wall": {n: summary(times[n], times["sgd"]) for n in names},
    "cpu": {n: summary(cpu_times[n], cpu_times["sgd"]) for n in names},
    "sgd_step_ms": sgd_step_ms,
    "step_kinds": kinds,
  }
  targets = {
    f"interval_sam_k{args.k}": 1.25,
    f"looksam_k{args.k}": 1.30,
    "looksam_non_sam_steps": 1.05,
  }
  lines = [
    f"Cost per step vs SGD: {args.model}, batch {args.batch_size}, {results['device']}, "
    f"median of {repeats} repeats of {steps} steps (wall clock; process CPU time)",
    "",
    "| method | ms/step (wall) | x SGD (wall) | spread | x SGD (CPU time) | spread | target |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for n in names:
    w, c = results["wall"][n], results["cpu"][n]
    target = f"<= {targets[n]:.2f}" if n in targets else ""
    lines.append(
      f"| {n} | {w['median_ms_per_step']:.2f} | {w['median_ratio_to_sgd']:.3f} | "
      f"{w['min_ratio']:.2f}-{w['max_ratio']:.2f} | {c['median_ratio_to_sgd']:.3f} | "
      f"{c['min_ratio']:.2f}-{c['max_ratio']:.2f} | {target} |"
    )
  lines += [
    "",
    f"Each step timed on its own (SGD step: {sgd_step_ms:.2f} ms):",
    "",
    "| method | SAM step ms | x SGD | skipped step ms | x SGD |",
    "|---|---:|---:|---:|---:|",
  ]
  for n, kd in kinds.items():
    lines.append(
      f"| {n} | {kd['sam_step_ms']:.2f} | {kd['sam_step_x_sgd']:.2f} | "
      f"{kd['skipped_step_ms']:.2f} | {kd['skipped_step_x_sgd']:.2f} |"
    )
  table = "\n".join(lines)
  suffix = f"_{args.model}" + ("_quick" if args.quick else "")
  out = pathlib.Path(args.out) / f"variants_cost{suffix}"
  _report.write(out, results, table, indent=2, final_newline=False)
  return results


if __name__ == "__main__":
  main()
