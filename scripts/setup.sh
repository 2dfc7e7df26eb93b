#!/usr/bin/env bash
# Creates .venv with everything the demo and the tests need. Idempotent: a finished venv is reused.
# torch and torchvision are pinned as a pair: the local CPU torch wheel cannot import the registry's
# torchvision, so both come from the registry (PIP_FIND_LINKS emptied to skip the local wheel folder).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECTOK_VENV:-.venv}
STAMP="$VENV/.rectok-setup-v1"
if [ -f "$STAMP" ]; then exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
PIP_FIND_LINKS= "$VENV/bin/pip" install -q --isolated torch==2.13.0 torchvision==0.28.0
"$VENV/bin/pip" install -q -e '.[test]'
touch "$STAMP"
echo "setup: $VENV ready"
