#!/usr/bin/env bash
# The test suite (CPU, about 14 minutes on 2 cores). Extra arguments go to pytest:
# `bash scripts/test.sh -m quick` runs the fast tier (under 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
