"""The docstring examples and the README's quick start run and give what they show."""

import doctest
import pathlib
import re

import pytest

import sam_optax
from sam_optax import _perturbation
from sam_optax import _polyak
from sam_optax import _sam

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [_perturbation, _polyak, _sam])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quick_start_runs_and_learns():
  blocks = _python_blocks()
  namespace = {}
  exec(blocks[0], namespace)  # Unified SAM quick start
  assert float(namespace["metrics"]["loss"]) < 1e-2
  assert float(namespace["metrics"]["lambda"]) == pytest.approx(1 - 1 / 100)
  gammas = namespace["gammas"] = []
  exec(blocks[1].replace("print(", "gammas.append("), namespace)  # SAM-SPS
  assert len(gammas) == 100
  # "γ_t, also in the state's PolyakStepSizeState" (0 <= γ_t <= γ_b holds by clipping: not a check)
  polyak = sam_optax.find_state(namespace["state"], sam_optax.PolyakStepSizeState)
  assert int(polyak.count) == 100
  assert float(polyak.step_size) == float(namespace["metrics"]["step_size"]) == float(gammas[-1])
  assert set(sam_optax.__all__) >= {
    "unified_sam",
    "sam_sps",
    "sam_step",
    "unified_perturbation",
    "polyak_step_size",
  }
