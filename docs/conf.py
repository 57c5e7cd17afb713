"""Sphinx configuration of the sam_optax documentation.

Build (what tests/test_docs_build.py runs, warnings as errors):
  python3 -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

import sam_optax  # noqa: E402

project = "sam_optax"
author = "sam_optax authors"
copyright = "sam_optax authors"  # noqa: A001
release = sam_optax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# No network in CI: no intersphinx, and nothing fetched at build time (MathJax loads in the browser).

# autodoc / autosummary: document the public names as `sam_optax.<name>`, in source order,
# with signatures as written; no stub files are generated into the source tree.
autosummary_generate = False
# `.. automodule:: sam_optax.<submodule>` alone documents the module's public members.
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
add_module_names = False
autodoc_typehints_format = "short"
# The library uses `from __future__ import annotations`: keep optax's alias names in signatures
# instead of their expansions (ScalarOrSchedule is a 200-character Union).
autodoc_type_aliases = {
  name: name
  for name in (
    "optax.ScalarOrSchedule",
    "optax.Schedule",
    "optax.GradientTransformation",
    "optax.GradientTransformationExtraArgs",
    "optax.OptState",
    "optax.Params",
    "optax.Updates",
    "jax.Array",
  )
}

# napoleon: the docstrings are Google style (Args / Returns / Raises / Example / References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple "Attributes:" become :ivar: fields, no duplicate targets
napoleon_attr_annotations = False  # field types are in the signature already

# MyST: the README and docs/*.md are CommonMark; `(label)=` anchors and $math$ are used.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# docs/variants.md starts at "##" (it is also rendered on its own by code hosts).
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"sam_optax {release}"


# ---------------------------------------------------------------------------------------------
# Two small source fixes, so that files written for GitHub and for `help()` render cleanly.

_ABS = re.compile(r"(?<![\\|])\|([^|\s`][^|`]*?)\|(?![|_])")
_CODE = re.compile(r"(`+[^`]*`+)")


def _escape_absolute_values(app, what, name, obj, options, lines):
  """Plain-text |x| in a docstring is an absolute value, not a reST substitution."""
  in_math, math_indent = False, 0
  for i, line in enumerate(lines):
    indent = len(line) - len(line.lstrip())
    if in_math and line.strip() and indent <= math_indent:
      in_math = False
    if line.lstrip().startswith(".. math::"):
      in_math, math_indent = True, indent
      continue
    if in_math:
      continue
    parts = _CODE.split(line)
    parts[::2] = [_ABS.sub(r"\\|\1\\|", p) for p in parts[::2]]
    lines[i] = "".join(parts)


# README links to repository files outside docs/ (examples/*/README.md, benchmarks/...) are
# links on GitHub; in the site they become the path in code, and docs/*.md become page links.
_LINK = re.compile(r"\[([^\]]+)\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def _readme_links(app, docname, source):
  if docname != "readme":
    return
  readme = ROOT / "README.md"
  app.env.note_dependency(str(readme))  # rebuild the page when the README changes
  text = readme.read_text(encoding="utf-8")

  def fix(match):
    label, target = match.groups()
    if target.startswith("docs/"):
      return f"[{label}]({target[len('docs/') :]})"
    return f"`{target}`" if label.strip("`") == target else f"{label} (`{target}`)"

  source[0] = _LINK.sub(fix, text)


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """State fields are listed under the class's Attributes; their accessors are not members."""
  if type(obj).__name__ == "_tuplegetter":
    return True
  return None


def setup(app):
  app.connect("autodoc-process-docstring", _escape_absolute_values)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("source-read", _readme_links)
