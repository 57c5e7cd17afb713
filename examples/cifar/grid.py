"""Runs the papers' CIFAR tables as grids of trainer runs and summarizes them.

Unified SAM, Table 2 (WRN-28-10, CIFAR-10): ρ ∈ {0.1, 0.2, 0.3, 0.4} × λ ∈ {0, 0.5, 1,
1/t, 1-1/t} plus the SGD baseline:

    python -m examples.cifar.grid --table=unified_sam --data_dir=~/data \
        --workdir=runs/table2 --seeds=0,1,2

SAM-SPS tables (ResNet-32, CIFAR-100): for λ ∈ {0 (USAM), 1 (SAM)} and ρ ∈ {0.1..0.4},
a constant learning rate (best of --constant_lrs, as the paper tunes it), cosine
annealing, and the Polyak scheduler:

    python -m examples.cifar.grid --table=sam_sps --data_dir=~/data \
        --workdir=runs/sam_sps --seeds=0,1,2 --constant_lrs=0.01,0.05,0.1

Each cell trains in ``<workdir>/<cell>/seed<k>``; a finished cell (report.json present) is
skipped and an interrupted one resumes, so the command can simply be rerun. ``--set
key=value`` overrides config keys in every cell (e.g. a short CPU version:
``--set model=wrn16_4 --set num_epochs=2``). ``--dry_run`` lists the cells and the
equivalent single-run commands; ``--summarize`` only rebuilds ``summary.md`` (mean ± std
of the final test accuracy over seeds, next to the papers' numbers).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import sys

import numpy as np

RHOS = (0.1, 0.2, 0.3, 0.4)
TABLE2_LAMBDAS = ("0", "0.5", "1", "1/t", "1-1/t")

# Unified SAM, Table 2: WRN-28-10 on CIFAR-10, test accuracy (%), mean ± std over 3 seeds.
PAPER_TABLE2 = {
  (0.1, "0"): (95.70, 0.01),
  (0.1, "0.5"): (95.68, 0.11),
  (0.1, "1"): (95.90, 0.08),
  (0.1, "1/t"): (95.84, 0.07),
  (0.1, "1-1/t"): (95.81, 0.03),
  (0.2, "0"): (95.80, 0.05),
  (0.2, "0.5"): (95.77, 0.09),
  (0.2, "1"): (95.93, 0.07),
  (0.2, "1/t"): (95.71, 0.13),
  (0.2, "1-1/t"): (95.98, 0.10),
  (0.3, "0"): (95.35, 0.30),
  (0.3, "0.5"): (95.88, 0.10),
  (0.3, "1"): (95.95, 0.09),
  (0.3, "1/t"): (95.68, 0.02),
  (0.3, "1-1/t"): (95.99, 0.06),
  (0.4, "0"): (95.46, 0.02),
  (0.4, "0.5"): (95.76, 0.10),
  (0.4, "1"): (95.62, 0.05),
  (0.4, "1/t"): (95.46, 0.27),
  (0.4, "1-1/t"): (95.79, 0.07),
}
PAPER_TABLE2_SGD = (95.35, 0.06)

# SAM-SPS, Tables 3-4 as given by the reference README (ResNet-32, CIFAR-100):
# (λ, ρ) -> {column: (mean, std)}.
PAPER_SAM_SPS = {
  (0, 0.1): {"constant": (90.56, 0.18), "cosine": (90.01, 0.32), "sps": (91.81, 0.04)},
  (0, 0.2): {"constant": (90.45, 0.34), "cosine": (88.77, 0.26), "sps": (92.23, 0.22)},
  (0, 0.3): {"constant": (90.25, 0.10), "cosine": (88.05, 0.23), "sps": (92.24, 0.30)},
  (0, 0.4): {"constant": (89.56, 0.07), "cosine": (86.52, 0.04), "sps": (92.01, 0.12)},
  (1, 0.1): {"constant": (90.17, 0.11), "cosine": (90.49, 0.02), "sps": (91.61, 0.12)},
  (1, 0.2): {"constant": (90.53, 0.02), "cosine": (89.03, 0.13), "sps": (92.24, 0.07)},
  (1, 0.3): {"constant": (89.61, 0.10), "cosine": (87.05, 0.24), "sps": (91.70, 0.15)},
  (1, 0.4): {"constant": (88.64, 0.13), "cosine": (84.61, 0.34), "sps": (90.79, 0.16)},
}


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str  # folder name
  config: str  # config module in examples/cifar/configs
  overrides: tuple  # ((key, value), ...)
  key: tuple  # where the result goes in the summary


def _slug(value) -> str:
  return str(value).replace("/", "_over_")


def cells(table: str, constant_lrs=(0.05,)) -> list[Cell]:
  """The cells of ``table`` ('unified_sam' or 'sam_sps'), without seeds."""
  out = []
  if table == "unified_sam":
    for rho in RHOS:
      for lam in TABLE2_LAMBDAS:
        out.append(
          Cell(
            f"rho{rho}_lambda{_slug(lam)}",
            "unified_sam_wrn28_10",
            (("rho", rho), ("lambd", lam)),
            (rho, lam),
          )
        )
    out.append(Cell("sgd", "sgd_wrn28_10", (), ("sgd",)))
  elif table == "sam_sps":
    for lam in (0, 1):
      for rho in RHOS:
        base = (("rho", rho), ("lambd", str(lam)))
        for lr in constant_lrs:
          out.append(
            Cell(
              f"lambda{lam}_rho{rho}_constant_lr{lr}",
              "sam_constant_resnet32_cifar100",
              base + (("learning_rate", lr),),
              (lam, rho, "constant", lr),
            )
          )
        out.append(
          Cell(
            f"lambda{lam}_rho{rho}_cosine",
            "sam_cosine_resnet32_cifar100",
            base,
            (lam, rho, "cosine"),
          )
        )
        out.append(
          Cell(f"lambda{lam}_rho{rho}_sps", "sam_sps_resnet32_cifar100", base, (lam, rho, "sps"))
        )
  else:
    raise ValueError(f"table must be 'unified_sam' or 'sam_sps', got {table!r}")
  return out


def parse_set(items) -> list[tuple[str, object]]:
  """['model=wrn16_4', 'num_epochs=2'] -> [('model', 'wrn16_4'), ('num_epochs', 2)]."""
  out = []
  for item in items or ():
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out.append((key.strip(), value))
  return out


def build_config(cell: Cell, seed: int, extra=()):
  """The cell's config with its overrides, the --set overrides and the seed applied."""
  from examples.cifar import train

  config = importlib.import_module(f"examples.cifar.configs.{cell.config}").get_config()
  for key, value in tuple(cell.overrides) + tuple(extra) + (("seed", seed),):
    current = config.get(key)
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if isinstance(current, str):
      value = str(value)
    config[key] = value  # an unknown key is added here and rejected just below
  config.name = f"{cell.name}_seed{seed}"
  train.check_config(config)
  return config


def command(cell: Cell, seed: int, workdir: str, data_dir: str, extra=()) -> str:
  flags = " ".join(
    f"--config.{k}={v}" for k, v in tuple(cell.overrides) + tuple(extra) + (("seed", seed),)
  )
  return (
    f"python -m examples.cifar.main --config=examples/cifar/configs/{cell.config}.py "
    f"--data_dir={data_dir} --workdir={workdir} {flags}"
  )


def run_dir(workdir: str, cell: Cell, seed: int) -> str:
  return os.path.join(workdir, cell.name, f"seed{seed}")


def run_grid(
  table, workdir, data_dir, seeds, extra=(), constant_lrs=(0.05,), limit=0, dry_run=False, log=print
):
  from examples.cifar import train

  todo = [(c, s) for c in cells(table, constant_lrs) for s in seeds]
  if limit:
    todo = todo[:limit]
  for i, (cell, seed) in enumerate(todo):
    d = run_dir(workdir, cell, seed)
    if dry_run:
      log(command(cell, seed, d, data_dir, extra))
      continue
    if os.path.exists(os.path.join(d, "report.json")):
      log(f"[{i + 1}/{len(todo)}] {cell.name} seed {seed}: done, skipped")
      continue
    resume = os.path.isdir(os.path.join(d, "checkpoints"))
    log(f"[{i + 1}/{len(todo)}] {cell.name} seed {seed}" + (" (resuming)" if resume else ""))
    train.train_and_evaluate(build_config(cell, seed, extra), d, data_dir=data_dir, resume=resume)
  if not dry_run:
    return summarize(table, workdir, seeds, constant_lrs)
  return None


def _result(workdir, cell, seeds):
  accs = []
  for s in seeds:
    path = os.path.join(run_dir(workdir, cell, s), "report.json")
    if os.path.exists(path):
      with open(path) as f:
        accs.append(100.0 * json.load(f)["test_accuracy"])
  return accs


def _fmt(accs) -> str:
  if not accs:
    return "–"
  std = float(np.std(accs)) if len(accs) > 1 else 0.0
  return f"{np.mean(accs):.2f} ± {std:.2f} (n={len(accs)})"


def _paper(p) -> str:
  return f"{p[0]:.2f} ± {p[1]:.2f}"


def summarize(table, workdir, seeds, constant_lrs=(0.05,)) -> str:
  """Writes and returns ``workdir/summary.md``: our final test accuracy next to the paper's."""
  grid = cells(table, constant_lrs)
  lines = [f"# {table} grid: final test accuracy (%), ours vs paper", ""]
  if table == "unified_sam":
    lines += [
      "| ρ | " + " | ".join(f"λ={lam}" for lam in TABLE2_LAMBDAS) + " |",
      "|---" * (len(TABLE2_LAMBDAS) + 1) + "|",
    ]
    by_key = {c.key: c for c in grid}
    for rho in RHOS:
      row = [
        f"{_fmt(_result(workdir, by_key[(rho, lam)], seeds))} "
        f"[paper {_paper(PAPER_TABLE2[(rho, lam)])}]"
        for lam in TABLE2_LAMBDAS
      ]
      lines.append(f"| {rho} | " + " | ".join(row) + " |")
    sgd = _fmt(_result(workdir, by_key[("sgd",)], seeds))
    lines += ["", f"SGD baseline: {sgd} [paper {_paper(PAPER_TABLE2_SGD)}]"]
  else:
    for lam in (0, 1):
      name = "USAM" if lam == 0 else "SAM"
      lines += [
        "",
        f"## {name} (λ = {lam})",
        "",
        "| ρ | constant (best lr) | cosine | Polyak (SPS) |",
        "|---|---|---|---|",
      ]
      for rho in RHOS:
        best, best_lr = [], None
        for lr in constant_lrs:
          (cell,) = [c for c in grid if c.key == (lam, rho, "constant", lr)]
          accs = _result(workdir, cell, seeds)
          if accs and (not best or np.mean(accs) > np.mean(best)):
            best, best_lr = accs, lr
        cos = [c for c in grid if c.key == (lam, rho, "cosine")][0]
        sps = [c for c in grid if c.key == (lam, rho, "sps")][0]
        paper = PAPER_SAM_SPS[(lam, rho)]
        const = _fmt(best) + (f" lr={best_lr}" if best_lr is not None else "")
        lines.append(
          f"| {rho} | {const} [paper {_paper(paper['constant'])}] | "
          f"{_fmt(_result(workdir, cos, seeds))} [paper {_paper(paper['cosine'])}] | "
          f"{_fmt(_result(workdir, sps, seeds))} [paper {_paper(paper['sps'])}] |"
        )
  text = "\n".join(lines) + "\n"
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--table", required=True, choices=("unified_sam", "sam_sps"))
  p.add_argument("--workdir", required=True)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--seeds", default="0", help="comma-separated seeds (paper: 3 seeds)")
  p.add_argument(
    "--constant_lrs",
    default="0.05",
    help="learning rates for the constant baseline of the SAM-SPS table",
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config key in every cell (repeatable)",
  )
  p.add_argument("--limit", type=int, default=0, help="run only the first N runs")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  p.add_argument("--summarize", action="store_true", help="only rebuild summary.md")
  a = p.parse_args(argv)
  seeds = [int(s) for s in a.seeds.split(",")]
  lrs = tuple(float(x) for x in a.constant_lrs.split(","))
  if a.summarize:
    print(summarize(a.table, a.workdir, seeds, lrs))
    return 0
  if a.data_dir is None and not a.dry_run:
    p.error("--data_dir is required unless --dry_run or --summarize")
  text = run_grid(
    a.table, a.workdir, a.data_dir or "DATA_DIR", seeds, parse_set(a.set), lrs, a.limit, a.dry_run
  )
  if text:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
