"""The grid runner for Table 2 (Unified SAM) and the SAM-SPS tables."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_cifar_synthetic import make_archive  # noqa: E402

from examples.cifar import grid  # noqa: E402
from examples.cifar import train  # noqa: E402


def test_table2_cells():
  cells = grid.cells("unified_sam")
  assert len(cells) == 4 * 5 + 1
  assert len({c.name for c in cells}) == len(cells)
  assert {c.key for c in cells if c.key != ("sgd",)} == set(grid.PAPER_TABLE2)
  cell = [c for c in cells if c.key == (0.3, "1-1/t")][0]
  config = grid.build_config(cell, seed=2)
  assert (config.optimizer, config.model, config.rho, config.lambd, config.seed) == (
    "unified_sam",
    "wrn28_10",
    0.3,
    "1-1/t",
    2,
  )
  assert "/" not in cell.name
  sgd = grid.build_config([c for c in cells if c.key == ("sgd",)][0], seed=0)
  assert sgd.optimizer == "sgd"


def test_sam_sps_cells():
  cells = grid.cells("sam_sps", constant_lrs=(0.01, 0.1))
  assert len(cells) == 2 * 4 * (2 + 2)
  keys = {(c.key[0], c.key[1]) for c in cells}
  assert keys == set(grid.PAPER_SAM_SPS)
  sps = grid.build_config([c for c in cells if c.key == (0, 0.4, "sps")][0], seed=0)
  assert (sps.optimizer, sps.lambd, sps.rho, sps.dataset, sps.model) == (
    "sam_sps",
    "0",
    0.4,
    "cifar100",
    "resnet32",
  )
  const = grid.build_config([c for c in cells if c.key == (1, 0.2, "constant", 0.01)][0], 0)
  assert (const.schedule, const.learning_rate, const.lambd) == ("constant", 0.01, "1")


def test_overrides_are_typed_and_checked():
  extra = grid.parse_set(
    ["model=wrn16_4", "num_epochs=2", "learning_rate=1", "lr_boundaries=(1, 2)"]
  )
  config = grid.build_config(grid.cells("unified_sam")[0], 0, extra)
  assert config.model == "wrn16_4" and config.num_epochs == 2
  assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
  assert tuple(config.lr_boundaries) == (1, 2)
  with pytest.raises(train.ConfigError, match="did you mean 'num_epochs'"):
    grid.build_config(grid.cells("unified_sam")[0], 0, grid.parse_set(["num_epoch=2"]))
  with pytest.raises(ValueError, match="key=value"):
    grid.parse_set(["model"])


def test_summary_puts_our_mean_next_to_the_paper(tmp_path):
  cells = grid.cells("unified_sam")
  by_key = {c.key: c for c in cells}
  for seed, acc in ((0, 0.90), (1, 0.92)):
    d = grid.run_dir(str(tmp_path), by_key[(0.2, "1")], seed)
    os.makedirs(d)
    with open(os.path.join(d, "report.json"), "w") as f:
      json.dump({"test_accuracy": acc}, f)
  text = grid.summarize("unified_sam", str(tmp_path), seeds=[0, 1])
  row = [line for line in text.splitlines() if line.startswith("| 0.2 |")][0]
  assert "91.00 ± 1.00 (n=2) [paper 95.93 ± 0.07]" in row
  assert "– [paper 95.80 ± 0.05]" in row
  assert "SGD baseline: – [paper 95.35 ± 0.06]" in text
  assert open(tmp_path / "summary.md").read() == text


def test_sam_sps_summary_picks_the_best_constant_lr(tmp_path):
  cells = grid.cells("sam_sps", constant_lrs=(0.01, 0.1))
  for lr, acc in ((0.01, 0.5), (0.1, 0.6)):
    (cell,) = [c for c in cells if c.key == (1, 0.3, "constant", lr)]
    d = grid.run_dir(str(tmp_path), cell, 0)
    os.makedirs(d)
    with open(os.path.join(d, "report.json"), "w") as f:
      json.dump({"test_accuracy": acc}, f)
  text = grid.summarize("sam_sps", str(tmp_path), [0], constant_lrs=(0.01, 0.1))
  sam = text.split("## SAM (λ = 1)")[1]
  row = [line for line in sam.splitlines() if line.startswith("| 0.3 |")][0]
  assert "60.00 ± 0.00 (n=1) lr=0.1 [paper 89.61 ± 0.10]" in row
  assert "[paper 91.70 ± 0.15]" in row


@pytest.mark.slow
def test_grid_runs_skips_and_resumes(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  make_archive(data, "cifar10", n_train=32, n_test=16)
  extra = grid.parse_set(
    [
      "model=resnet2",
      "model_width=4",
      "batch_size=16",
      "eval_batch_size=16",
      "num_train_steps=1",
      "progress_bar=False",
      "plots=False",
    ]
  )
  logs = []
  work = str(tmp_path / "runs")
  grid.run_grid("unified_sam", work, str(data), [0], extra, limit=2, log=logs.append)
  reports = [
    json.load(open(os.path.join(grid.run_dir(work, c, 0), "report.json")))
    for c in grid.cells("unified_sam")[:2]
  ]
  assert [(r["rho"], r["lambd"], r["steps"]) for r in reports] == [(0.1, "0", 1), (0.1, "0.5", 1)]
  logs.clear()
  grid.run_grid("unified_sam", work, str(data), [0], extra, limit=2, log=logs.append)
  assert sum("done, skipped" in line for line in logs) == 2
  grid.main(["--table=unified_sam", f"--workdir={work}", "--dry_run", "--limit=1"])
