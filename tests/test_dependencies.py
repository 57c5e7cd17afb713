"""sam_optax needs only jax, jaxlib, optax and numpy: no flax, orbax or torch at run time."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNTIME = {"jax", "jaxlib", "optax", "numpy"}
FORBIDDEN = ("flax", "orbax", "orbax-checkpoint", "tensorstore", "torch")

# Runs in a fresh interpreter in which importing flax, orbax, tensorstore or torch fails, as it
# would where they are not installed. One Unified SAM step (SGD, lr 0.1, rho 0.05, lambda 1) on
# f(w) = |w|^2 / 2 from w = (3, 4): g = w, |g| = 5, delta = 0.05 g / 5 = (0.03, 0.04),
# e = (3.03, 4.04), grad f(e) = e, so w <- w - 0.1 e = (2.697, 3.596), f(e) = 12.75125.
_WITHOUT_FLAX = textwrap.dedent(
  """
  import importlib.abc
  import json
  import sys

  BLOCKED = ("flax", "orbax", "tensorstore", "torch")

  class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in BLOCKED:
        raise ImportError(f"{name} is blocked by test_dependencies")
      return None

  sys.meta_path.insert(0, Block())
  for blocked in BLOCKED:
    try:
      __import__(blocked)
    except ImportError:
      pass
    else:
      raise SystemExit(f"the import blocker let {blocked} through")

  import jax.numpy as jnp
  import optax
  import sam_optax

  opt = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05, lambd=1.0)
  step = sam_optax.sam_step(lambda w, batch: 0.5 * jnp.sum(w ** 2), opt)
  params = jnp.array([3.0, 4.0])
  params, state, metrics = step(params, opt.init(params), None)
  loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
  print(json.dumps({
    "params": [float(p) for p in params],
    "loss": float(metrics["loss"]),
    "perturbed_loss": float(metrics["perturbed_loss"]),
    "grad_norm": float(metrics["grad_norm"]),
    "loaded": loaded,
  }))
  """
)


def test_import_and_sam_step_work_without_flax():
  result = subprocess.run(
    [sys.executable, "-c", _WITHOUT_FLAX],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["loaded"] == []
  assert out["params"] == pytest.approx([2.697, 3.596], rel=1e-6)
  assert out["loss"] == pytest.approx(12.5, rel=1e-6)
  assert out["perturbed_loss"] == pytest.approx(12.75125, rel=1e-6)
  assert out["grad_norm"] == pytest.approx(5.0, rel=1e-6)


def _names(requirements):
  return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_pyproject_runtime_dependencies_are_jax_optax_numpy():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert _names(project["dependencies"]) == RUNTIME
  extras = project["optional-dependencies"]
  assert "flax" in _names(extras["flax"])
  assert "sam-optax" in _names(extras["examples"])  # examples pull the flax extra
  assert any("flax" in r for r in extras["examples"] if r.startswith("sam-optax"))


def test_built_metadata_pulls_no_flax(tmp_path):
  """The wheel metadata setuptools builds from this checkout, as `pip install .` would."""
  pytest.importorskip("setuptools")
  src = tmp_path / "src"
  src.mkdir()
  (tmp_path / "meta").mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(
    ROOT / "sam_optax", src / "sam_optax", ignore=shutil.ignore_patterns("__pycache__")
  )
  # `egg_info` resolves the requirements a wheel of this checkout declares, without `wheel`.
  result = subprocess.run(
    [sys.executable, "-c", "import setuptools; setuptools.setup()", "egg_info", "-e", "../meta"],
    cwd=src,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  (requires_txt,) = (tmp_path / "meta").glob("*.egg-info/requires.txt")
  sections, current = {"": []}, ""
  for line in requires_txt.read_text().splitlines():
    if line.startswith("["):
      current = line.strip("[]").split(":")[0]
      sections.setdefault(current, [])
    elif line.strip():
      sections[current].append(line.strip())
  runtime = _names(sections[""])
  assert runtime == RUNTIME
  assert not any(name.startswith(FORBIDDEN) for name in runtime)
  assert "flax" in _names(sections["flax"])
