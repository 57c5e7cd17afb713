"""The benchmarks' one output writer: ``<out>.json`` and ``<out>.md`` side by side, the table printed."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def write_json(
  path: pathlib.Path, result: dict[str, Any], *, indent: int = 1, final_newline: bool = True
) -> None:
  """Writes ``result`` to ``path`` as JSON (creating the folder).

  Args:
    path: the file to write.
    result: the benchmark's result (JSON-serializable).
    indent: the JSON indentation.
    final_newline: end the file with a newline (the schema-versioned benchmarks do; the
      older ones, whose committed results have none, pass False).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=indent) + ("\n" if final_newline else ""))


def write(
  out: pathlib.Path,
  result: dict[str, Any],
  table: str,
  *,
  indent: int = 1,
  final_newline: bool = True,
) -> None:
  """Writes ``out.with_suffix(".json")`` and ``out.with_suffix(".md")``, then prints the table.

  Args:
    out: the output path without extension (a suffix it has is replaced).
    result: the benchmark's result, written as JSON (see :func:`write_json`).
    table: the markdown table; the ``.md`` file is the table, with a final newline added if it has none.
    indent: the JSON indentation.
    final_newline: end the JSON file with a newline.
  """
  out = pathlib.Path(out)
  write_json(out.with_suffix(".json"), result, indent=indent, final_newline=final_newline)
  out.with_suffix(".md").write_text(table if table.endswith("\n") else table + "\n")
  print(table)
