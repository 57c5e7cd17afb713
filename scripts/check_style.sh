#!/usr/bin/env bash
# The style check the tests run (tests/test_style.py); `--fix` applies the fixes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fix" ]]; then
  "${PYTHON:-python3}" -m ruff check --fix .
  "${PYTHON:-python3}" -m ruff format .
else
  "${PYTHON:-python3}" -m ruff check .
  "${PYTHON:-python3}" -m ruff format --check .
fi
