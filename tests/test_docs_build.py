"""The Sphinx site in docs/ builds with warnings as errors and documents the whole public API."""

import pathlib
import re
import subprocess
import sys
import types

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_sphinx_build_is_warning_free(tmp_path):
  pytest.importorskip("sphinx", reason='the docs extra: python3 -m pip install -e ".[dev]"')
  out = tmp_path / "html"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      "-d",
      str(tmp_path / "doctrees"),  # keep the pickled environment out of the source tree
      str(DOCS),
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
  for page in ("index", "readme", "contract", "variants", "api"):
    assert (out / f"{page}.html").is_file(), page
  api = (out / "api.html").read_text(encoding="utf-8")
  missing = [
    name
    for name in sam_optax.__all__
    if f'id="sam_optax.{name}"' not in api and f'id="module-sam_optax.{name}"' not in api
  ]
  assert not missing, f"public names without an entry on the API page: {missing}"


def test_api_page_lists_exactly_the_public_names():
  text = (DOCS / "api.md").read_text(encoding="utf-8")
  documented = re.findall(r"^\.\. auto(?:function|class):: (\w+)\s*$", text, flags=re.M)
  names = [n for n in sam_optax.__all__ if not isinstance(getattr(sam_optax, n), types.ModuleType)]
  assert sorted(documented) == sorted(names)  # submodules have their automodule lines
  assert len(documented) == len(set(documented))


_SECTION = re.compile(r"^## §(\d+) ", flags=re.M)
_CITATION = re.compile(r"docs/contract\.md\s*(?:§|sections?\s+)(\d+)(?:\s*[-–]\s*§?(\d+))?")
_FOLDERS = ("sam_optax", "tests", "tools", "benchmarks", "examples", "docs")


def _text_files():
  yield ROOT / "README.md"
  for folder in _FOLDERS:
    for path in sorted((ROOT / folder).rglob("*")):
      if path.suffix in {".py", ".md", ".json"} and "_build" not in path.parts:
        yield path


def test_contract_citations_point_at_existing_sections():
  contract = (DOCS / "contract.md").read_text(encoding="utf-8")
  sections = {int(n) for n in _SECTION.findall(contract)}
  assert sections == set(range(1, 9))
  cited = {}
  for path in _text_files():
    for first, last in _CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
      for n in range(int(first), int(last or first) + 1):
        cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
  assert cited, "nothing cites docs/contract.md"
  unknown = {n: files for n, files in cited.items() if n not in sections}
  assert not unknown, f"citations of sections docs/contract.md does not have: {unknown}"


def test_nothing_cites_the_external_semantics_file():
  """The contract lives in the repository (docs/contract.md), not in an outside SEMANTICS.md."""
  word = "SEMANTICS"
  offenders = [
    f"{path.relative_to(ROOT)}:{i}"
    for path in _text_files()
    if path != pathlib.Path(__file__).resolve()
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
    if word in line
  ]
  assert not offenders, f"cite docs/contract.md instead: {offenders}"
