#!/usr/bin/env bash
# Installs everything the suite needs, then runs every gate: ruff (format + lint), mypy
# strict, the docs site built with mkdocs --strict, and pytest with branch coverage. The
# README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The suite starts real servers of its own (never the machine's): install what is missing.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
# the dashboard's browser tests drive Debian's chromium (nothing downloads a browser)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "the tests need ${missing[*]}: install them (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

echo "== ruff format --check"; python -m ruff format --check .
echo "== ruff check";          python -m ruff check .
echo "== mypy (strict)";       python -m mypy
echo "== mkdocs build --strict"; NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$(mktemp -d)"
echo "== pytest";              python -m pytest --cov --cov-report=term "$@"
