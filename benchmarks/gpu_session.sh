#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in ONE device call: phases in order of value, each under its
# own time limit, 530 s in all, 10 s left for the glue (`bash benchmarks/gpu_session.sh --plan` prints them).
#
# GPU machines are lent to some tasks only, for a few minutes of device time a session, with no network:
# this script is written and checked beforehand so that a session that gets one spends it measuring.
# That machine's python3 (3.12, PyTorch 2.11) has torch, torchvision, timm, triton, numpy, scipy and pyyaml,
# no deepspeed, ffcv, flash-attn, torch-fidelity or submitit (attention runs on PyTorch SDPA); lpips (the
# perceptual loss) travels as a wheel. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl lpips==0.1.4
# Then the one device call:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# It leaves under $OUT (the tool returns at most 8 files): session.txt (versions, GPU, each phase's exit
# code and time, a summary table), one NAME.txt per phase (its output, recompiles and graph breaks
# included: TORCH_LOGS), rows.jsonl (every `rectok profile` row, with its phase) and traces.tar.gz.
# Frozen networks without weight files (teacher, LPIPS VGG, ConvNeXt) get random weights of the real
# shape (trainer/workflows/profile_steps.py: FROZEN_WEIGHTS); the inputs are synthetic.
#
# A check of the script itself on a CPU, with the tiny recipes (about two minutes on 2 cores; also with
# PYTHONPATH=DIR whose sitecustomize.py makes the missing packages above fail to import, as there):
#   TINY=1 OUT=/tmp/gpu PY=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."

# Phase (a function below), time limit in seconds, what it measures. The limits include start-up (about
# 15 s to import and build) and the first compiled step (the blocks' compilation: a minute or more).
PLAN="\
setup               15  the lpips wheel, versions, nvidia-smi
dit_eager           50  DiT^DH-XL eager bf16, batch 64
dit_compiled       145  DiT^DH-XL compiled bf16, batch 128, peak memory
dit_fsdp           110  DiT^DH-XL FSDP2 on one GPU, compiled bf16, batch 128
tokenizer_eager    100  RecTok stage 1 (C = 128) eager bf16, batch 32; torch.profiler trace at 16
tokenizer_compiled 110  RecTok stage 1 (C = 128) compiled bf16, batch 64"
if [ "${1:-}" = --plan ]; then
    echo "$PLAN" | awk '{ print; total += $2 } END { print "total " total " s" }'
    exit 0
fi

OUT=${OUT:?set OUT to the folder for the results}
export PY=${PY:-python3} W=/tmp/rectok-gpu-session OUT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    TORCH_LOGS=recompiles,graph_breaks
if [ "${TINY:-0}" = 1 ]; then  # the same commands with the tiny recipes, small batches and fewer steps
    export DIT=dit/tiny_dit TOK=rectok/tiny_stage1 B_DIT_EAGER=8 B_DIT=16 B_TOK=4 B_TRACE=2 B_TOK_C=8 \
        WARM=1 CWARM=2 STEPS=2
else
    export DIT=dit/ditdh_xl TOK=rectok/stage1_d128 B_DIT_EAGER=64 B_DIT=128 B_TOK=32 B_TRACE=16 B_TOK_C=64 \
        WARM=2 CWARM=3 STEPS=10
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # where setup installs the wheels of .whl
rm -rf "$W"; mkdir -p "$OUT" "$W"

prof() {  # prof RECIPE BATCH ROWS [overrides, options]: `rectok profile` in bf16 with BATCH images per step in
    # one micro-batch (never the recipe's global batch of 1024), its rows into $W/ROWS.json
    local recipe=$1 batch=$2 rows=$3; shift 3
    $PY -m trainer.cli profile "$recipe" "data.global_batch=$batch" "data.micro_batch=$batch" \
        parallel.precision=bf16 "$@" --json "$W/$rows.json"
}
setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || return 1
    fi
    date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || echo "no git: commit unknown"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
    $PY -c "import sys, torch, torchvision, lpips; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), 'torchvision',
torchvision.__version__, 'lpips from', lpips.__file__)"
}
dit_eager() { prof $DIT $B_DIT_EAGER dit_eager parallel.compile=false --warmup $WARM --steps $STEPS; }
dit_compiled() { prof $DIT $B_DIT dit_compiled parallel.compile=true --warmup $CWARM --steps $STEPS --scaling; }
dit_fsdp() { prof $DIT $B_DIT dit_fsdp parallel.compile=true parallel.strategy=fsdp --warmup $CWARM --steps $STEPS; }
tokenizer_eager() {
    prof $TOK $B_TOK tokenizer_eager parallel.compile=false --warmup $WARM --steps $STEPS
    local rc=$?
    # `rectok profile` splits a step into data / fwd_bwd / sync / optim / ema; the trace's table (top 30
    # operators by GPU time, printed here) ends with the forward GPU time of the generator, teacher, LPIPS,
    # ConvNeXt and discriminator (profiler labels; backward is not attributed); the whole trace is in
    # traces.tar.gz, for https://ui.perfetto.dev.
    prof $TOK $B_TRACE tokenizer_trace parallel.compile=false --warmup 1 --steps 1 \
        --trace "$W/traces" --trace-steps 2 || rc=1
    cat "$W"/traces/ops_*.txt
    tar -C "$W" -czf "$OUT/traces.tar.gz" traces && ls -l "$OUT/traces.tar.gz" || rc=1
    return $rc
}
tokenizer_compiled() { prof $TOK $B_TOK_C tokenizer_compiled parallel.compile=true --warmup $CWARM --steps $STEPS \
    --scaling; }
export -f prof setup dit_eager dit_compiled dit_fsdp tokenizer_eager tokenizer_compiled

summary() {  # the rows so far, one line each
    $PY - "$OUT/rows.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
f = lambda r, k, s: s.format(r[k]) if r.get(k) is not None else "-"
print(f"{'phase':<19}{'batch':>6}{'step ms':>9}{'img/s':>9}{'MFU':>7}{'fwd_bwd ms':>11}{'optim ms':>9}{'ema ms':>8}"
      f"{'peak GB':>9}")
for r in rows:
    print(f"{r['phase']:<19}{r['per_device_batch']:>6}{f(r, 'time/step_ms', '{:.1f}'):>9}"
          f"{f(r, 'img_per_s', '{:.1f}'):>9}{f(r, 'mfu', '{:.1%}'):>7}{f(r, 'time/fwd_bwd_ms', '{:.1f}'):>11}"
          f"{f(r, 'time/optim_ms', '{:.1f}'):>9}{f(r, 'time/ema_ms', '{:.1f}'):>8}{f(r, 'mem/peak_gb', '{:.1f}'):>9}")
EOF
}

failed=0 T0=$SECONDS
touch "$OUT/rows.jsonl"
echo "$PLAN" > "$OUT/session.txt"
while read -r name limit _; do
    t0=$SECONDS
    log=$OUT/$name.txt; [ "$name" = setup ] && log=$OUT/session.txt
    echo "== $name: limit $limit s, PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF TORCH_LOGS=$TORCH_LOGS" \
        | tee -a "$log"
    timeout -k 5 "$limit" bash -c "$name" < /dev/null 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    for rows in "$W"/*.json; do  # the rows of this phase, as they come
        [ -f "$rows" ] || continue
        $PY -c 'import json, os, sys; [print(json.dumps({"phase": os.path.basename(sys.argv[1])[:-5], **r}))
for r in json.load(open(sys.argv[1]))]' "$rows" >> "$OUT/rows.jsonl" && rm "$rows"
    done
    case $rc in 0) how=ok ;; 124|137) how="TIMEOUT after $limit s" ;; *) how=FAILED ;; esac
    line="== $name: exit $rc after $((SECONDS - t0)) s ($how)"
    echo "$line" | tee -a "$log"; [ "$name" = setup ] || echo "$line" >> "$OUT/session.txt"
    [ "$rc" = 0 ] || failed=1
done <<< "$PLAN"
{ echo "== all phases: $((SECONDS - T0)) s"; summary; } 2>&1 | tee -a "$OUT/session.txt"
ls -l "$OUT"
exit $failed
