#!/usr/bin/env bash
# The linter (ruff, rules in pyproject.toml) over the whole repository; CI runs it before the tests.
# Extra arguments go to `ruff check` (e.g. --fix).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ruff check "$@" .
