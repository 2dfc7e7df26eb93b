#!/usr/bin/env bash
# The main job end to end on the bundled default dataset, on CPU: tokenizer stage 1 (FSD + RAD,
# teacher, perceptual and GAN losses) then stage 2 (pixel-decoder fine-tuning) on the tiny recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/rectok demo --output-dir "${1:-runs/demo}"
