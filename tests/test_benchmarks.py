"""The benchmarks' own checks: their output schema, their statistics and the memory target.

Timing is never asserted (the machine is shared); what is asserted is that the
benchmark produces well-formed, internally consistent numbers, and the
deterministic memory analysis.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from benchmarks import _models
from benchmarks import memory
from benchmarks import step_time


def _ratios(tree):
  """Every {median, ...} summary under a "ratio"/"speedup" key or a target check's "value"."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if ("ratio" in key or "speedup" in key or key == "value") and isinstance(value, dict):
        yield key, value
      else:
        yield from _ratios(value)
  elif isinstance(tree, list):
    for item in tree:
      yield from _ratios(item)


def test_summary_and_paired_ratio():
  s = step_time.summary([4.0, 1.0, 3.0, 2.0, 5.0])
  assert s == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0}
  samples = {"a": [2.0, 4.0, 9.0], "b": [1.0, 2.0, 3.0]}
  r = step_time.paired_ratio(samples, "a", "b")  # per-round ratios 2, 2, 3
  assert r["median"] == 2.0 and r["max"] == 3.0 and r["min"] == 2.0


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "step_time"
  result = step_time.main(
    [
      "--quick",
      "--models",
      "tiny_mlp",
      "--rounds",
      "3",
      "--theory-steps",
      "10",
      "--torch-python",
      "none",
      "--out",
      str(out),
    ]
  )
  return result, out


@pytest.mark.slow
def test_step_time_quick_schema(quick_result):
  result, out = quick_result
  on_disk = json.loads(out.with_suffix(".json").read_text())
  assert on_disk["schema_version"] == step_time.SCHEMA_VERSION
  assert on_disk["benchmark"] == "step_time"
  assert set(on_disk["environment"]) >= {"device", "jax", "optax", "xla_flags", "threads"}
  (model,) = on_disk["models"]
  assert model["model"] == "tiny_mlp" and model["params"] == 2410 and model["rounds"] == 3
  names = [v["name"] for v in model["variants"]]
  assert names == [
    "sgd",
    "hand_written_sam",
    "sam_step_unified_l1",
    "sam_step_unified_l1_skip_nonfinite",
    "sam_step_unified_l0",
    "sam_step_unified_1-1/t",
    "hand_written_sam_sps",
    "sam_step_sam_sps",
    "optax_contrib_sam_opaque",
    "optax_contrib_sam",
  ]
  for v in model["variants"]:
    assert v["framework"] == "jax" and v["passes"] == (1 if v["name"] == "sgd" else 2)
    assert v["steps_per_sample"] >= 1
    assert len(v["samples_s"]) == 3 and all(s > 0 for s in v["samples_s"])
    assert v["seconds"]["median"] == pytest.approx(np.median(v["samples_s"]))
    assert v["seconds"]["min"] <= v["seconds"]["p25"] <= v["seconds"]["median"]
    assert v["seconds"]["median"] <= v["seconds"]["p75"] <= v["seconds"]["max"]
  by_name = {v["name"]: v for v in model["variants"]}
  assert by_name["sgd"]["ratio_to_sgd"]["median"] == 1.0
  assert by_name["hand_written_sam"]["ratio_to_hand_written"]["max"] == 1.0
  assert {c["target"] for c in model["checks"]} >= {
    "sam_step_unified_l1 / hand_written_sam <= 1.03",
    "sam_step_sam_sps / hand_written_sam_sps <= 1.03",
    "sam_step_unified_l1 / optax_contrib_sam_opaque <= 1.03",
  }
  # Theory problems: both optimizers on both problems, JAX's runs agree with each other.
  assert [t["problem"] for t in on_disk["theory"]] == ["ridge", "logistic"]
  for t in on_disk["theory"]:
    assert [o["optimizer"] for o in t["optimizers"]] == ["unified_sam", "sam_sps"]
    for o in t["optimizers"]:
      loss = o["final_loss"]
      assert loss["jax_scan"] == pytest.approx(loss["jax_python_loop"], rel=1e-4)


@pytest.mark.slow
def test_every_ratio_is_finite_and_positive(quick_result):
  result, _ = quick_result
  found = list(_ratios(result))
  checks = result["models"][0]["checks"]
  # 4 sam_step variants vs the floor, l1 vs the two optax modes; the guarded step (opt-in
  # skip_nonfinite) is reported as guard_cost instead of being held to the floor.
  assert len(checks) == 6
  assert len(found) == 10 * 2 + len(checks)  # two ratios per variant, one per check
  guard = result["models"][0]["guard_cost"]
  assert math.isfinite(guard["median"]) and guard["median"] > 0
  for key, r in found:
    for stat in ("median", "p25", "p75", "min", "max"):
      assert math.isfinite(r[stat]) and r[stat] > 0, (key, r)


@pytest.mark.slow
def test_markdown_table_lists_every_variant(quick_result):
  result, out = quick_result
  table = out.with_suffix(".md").read_text()
  for v in result["models"][0]["variants"]:
    assert f"| {v['label']} |" in table
  assert "Command: `python -m benchmarks.step_time --quick" in table


def test_unknown_model_is_rejected():
  with pytest.raises(SystemExit):
    step_time.main(["--models", "resnet1000", "--torch-python", "none"])
  with pytest.raises(ValueError, match="`model` must be one of"):
    _models.make_problem("resnet1000")


def test_model_sizes_match_the_published_networks():
  # Counted from shapes only (no compilation): ResNet-20 0.27M, WRN-16-4 2.75M parameters.
  for name, expected in [("resnet20", 269_722), ("wrn16_4", 2_748_890), ("mlp", 1_841_162)]:
    spec = _models.MODELS[name]()
    x = jax.ShapeDtypeStruct((1, *spec.image_shape), np.float32)
    shapes = jax.eval_shape(lambda x: spec.module.init(jax.random.key(0), x, train=False), x)
    assert _models.param_count(shapes["params"]) == expected


@pytest.mark.slow
def test_memory_of_sam_step_is_within_five_percent_of_hand_written(tmp_path):
  result = memory.main(
    [
      "--models",
      "tiny_cnn",
      "--variants",
      "sam_step_unified_l1,sam_step_sam_sps",
      "--out",
      str(tmp_path / "memory"),
    ]
  )
  (model,) = result["models"]
  by_name = {v["name"]: v for v in model["variants"]}
  for v in model["variants"]:
    assert v["peak_bytes"] == (
      v["argument_bytes"] + v["output_bytes"] - v["alias_bytes"] + v["temp_bytes"]
    )
  assert by_name["hand_written_sam"]["ratio_to_hand_written"] == 1.0
  # SAM holds more than SGD (a perturbed copy of the parameters) ...
  assert by_name["hand_written_sam"]["peak_bytes"] > by_name["sgd"]["peak_bytes"]
  # ... and sam_step no more than the hand-written step, +5%.
  assert sorted(by_name) == [
    "hand_written_sam",
    "hand_written_sam_sps",
    "sam_step_sam_sps",
    "sam_step_unified_l1",
    "sgd",
  ]
  assert by_name["sam_step_unified_l1"]["ratio_to_hand_written"] <= 1.05
  sps = by_name["sam_step_sam_sps"]["peak_bytes"] / by_name["hand_written_sam_sps"]["peak_bytes"]
  assert sps <= 1.05
  assert all(c["met"] for c in model["checks"])


@pytest.mark.slow
def test_compared_variants_compute_the_same_steps():
  """The floors are the same algorithms as what they are compared with (else timing means little)."""
  _, params, batch_stats, batch, loss_fn = _models.make_problem("tiny_mlp")
  from benchmarks import _steps

  variants = {v.name: v for v in _steps.all_variants(loss_fn)}
  after = {}
  for name, v in variants.items():
    state = v.fresh_state(params, batch_stats)
    for _ in range(3):
      state = v.step(state, batch)
    after[name] = jax.tree.map(np.asarray, state[0])

  def close(a, b):
    return all(
      np.allclose(x, y, rtol=1e-5, atol=1e-6)
      for x, y in zip(jax.tree.leaves(after[a]), jax.tree.leaves(after[b]))
    )

  assert close("sam_step_unified_l1", "hand_written_sam")
  assert close("optax_contrib_sam_opaque", "hand_written_sam")
  assert close("optax_contrib_sam", "hand_written_sam")
  assert close("sam_step_sam_sps", "hand_written_sam_sps")
  assert not close("sgd", "hand_written_sam")  # the comparison can fail
  assert not close("sam_step_unified_l0", "hand_written_sam")
