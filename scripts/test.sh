#!/usr/bin/env bash
# Installs everything the suite needs, then runs every gate: ruff (format + lint), mypy
# strict, and pytest with branch coverage. The README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

echo "== ruff format --check"; python -m ruff format --check .
echo "== ruff check";          python -m ruff check .
echo "== mypy (strict)";       python -m mypy
echo "== pytest";              python -m pytest --cov --cov-report=term "$@"
