"""Regenerates every figure and the rates table: ``python -m examples.theory``.

``--only NAME`` (repeatable) runs a subset, e.g. ``--only unified_sam_lambda_modes``;
``--out DIR`` writes somewhere else than examples/theory/figures/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

FIGURES = Path(__file__).resolve().parent / "figures"


def _table(rows) -> str:
  lines = [
    "| figure | setting | measured | predicted (theory) | note |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r.figure} | {r.setting} | {r.measured} | {r.predicted} | {r.note} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  from examples.theory import experiments

  names = [fn.__name__ for fn in experiments.ALL]
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--only", action="append", choices=names, help="run only this figure")
  parser.add_argument("--out", type=Path, default=FIGURES, help="output directory")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  selected = [fn for fn in experiments.ALL if not args.only or fn.__name__ in args.only]

  rows = []
  start = time.perf_counter()
  # float64 only inside this block: importing the package never changes JAX's config.
  with jax.enable_x64(True):
    for fn in selected:
      t0 = time.perf_counter()
      rows += fn(args.out)
      print(f"{fn.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
  table = _table(rows)
  print(table)
  if not args.only:
    header = (
      "# Measured rates vs theory\n\n"
      "Written by `python -m examples.theory` (see README.md for the bounds).\n\n"
    )
    (args.out / "rates.md").write_text(header + table)
  print(f"total: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
