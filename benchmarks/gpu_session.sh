#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in phases that each fit one device call (10 minutes).
#
# GPU machines are lent to some tasks only, for 30 minutes of device time a session, with no network:
# this script is written and checked beforehand so that a session that gets one spends it measuring.
# That machine's python3 has torch, timm, numpy and pyyaml; lpips (the perceptual loss) travels as a
# wheel. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl lpips==0.1.4
# Then one device call per phase, each writing tables and JSON under $OUT:
#   run(command="bash benchmarks/gpu_session.sh dit", carry=[".whl"])        # DiT^DH-XL batch sweep, compiled
#   run(command="bash benchmarks/gpu_session.sh tokenizer", carry=[".whl"])  # RecTok stage 1 (C = 128)
#   run(command="bash benchmarks/gpu_session.sh baseline", carry=[".whl"])   # research-code path vs ours
#   run(command="bash benchmarks/gpu_session.sh trace", carry=[".whl"])      # torch.profiler traces (gzip)
# A check of the script itself on a CPU, with the tiny recipes (about two minutes):
#   TINY=1 OUT=/tmp/gpu PY=.venv/bin/python bash benchmarks/gpu_session.sh all
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
PHASES=${*:-all}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "${TINY:-0}" = 1 ]; then  # same commands, the tiny recipes and a few steps
    DIT=dit/tiny_dit TOK=rectok/tiny_stage1 DIT_BATCHES=8,16 TOK_BATCHES=4,8 BASE_BATCH=4 BASE_MODELS=tokenizer,T
    WARM=1 STEPS=2 TINY_FLAG=--tiny
else
    DIT=dit/ditdh_xl TOK=rectok/stage1_d128 DIT_BATCHES=64,128,256 TOK_BATCHES=32,64,128 BASE_BATCH=64
    BASE_MODELS=tokenizer,XL WARM=5 STEPS=15 TINY_FLAG=
fi
FAST="parallel.precision=bf16 parallel.compile=true"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: the output goes to $OUT/NAME.txt; a failure does not stop the others
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
    [ "$rc" = 0 ] || failed=1
}

{
    date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for phase in $PHASES; do
    case $phase in
    dit|all)
        for b in ${DIT_BATCHES//,/ }; do  # one process per batch: a timeout or OOM loses one row only
            step dit_b$b 180 $PY -m trainer.cli profile $DIT --warmup $WARM --steps $STEPS $FAST \
                data.global_batch=$b --scaling --json "$OUT/dit_b$b.json"
        done ;;&
    tokenizer|all)
        for b in ${TOK_BATCHES//,/ }; do
            step tokenizer_b$b 180 $PY -m trainer.cli profile $TOK --warmup $WARM --steps $STEPS $FAST \
                data.global_batch=$b --scaling --json "$OUT/tokenizer_b$b.json"
        done ;;&
    baseline|all)
        step baseline 560 $PY benchmarks/train_step.py $TINY_FLAG --models $BASE_MODELS --batch $BASE_BATCH \
            --warmup 3 --steps $STEPS --json "$OUT/baseline.json" ;;&
    trace|all)
        rm -rf /tmp/rectok-traces; mkdir -p /tmp/rectok-traces
        step trace_dit 270 $PY -m trainer.cli profile $DIT --warmup $WARM --steps 2 $FAST \
            --trace /tmp/rectok-traces/dit
        step trace_tokenizer 270 $PY -m trainer.cli profile $TOK --warmup $WARM --steps 2 $FAST \
            --trace /tmp/rectok-traces/tokenizer
        # $OUT returns at most 8 files of 16 MiB: one compressed archive of all traces
        tar -C /tmp/rectok-traces -czf "$OUT/traces.tar.gz" . && ls -la "$OUT/traces.tar.gz" ;;
    dit|tokenizer|baseline|all) ;;
    *) echo "unknown phase $phase (dit, tokenizer, baseline, trace, all)"; exit 2 ;;
    esac
done
exit $failed
