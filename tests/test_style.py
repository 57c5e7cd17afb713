"""The tree follows the house style: `ruff check` and `ruff format --check` pass.

The rules live in pyproject.toml ([tool.ruff]). Fix a failure with
`python3 -m ruff check --fix . && python3 -m ruff format .` (or scripts/check_style.sh --fix).
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args):
  try:
    import ruff  # noqa: F401  (the binary ships with the package)
  except ImportError:
    pytest.fail('ruff is not installed: python3 -m pip install -e ".[dev]"')
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_ruff_check_passes():
  result = _ruff("check", "--no-cache", "--output-format=concise", ".")
  assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format_check_passes():
  result = _ruff("format", "--no-cache", "--check", ".")
  assert result.returncode == 0, f"ruff format would change files:\n{result.stdout}{result.stderr}"
