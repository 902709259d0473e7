#!/usr/bin/env bash
# The whole GPU part of issue 25 in one run on a lent device (one H200), in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh                     # on the device, from the repo root; writes under $OUT
#   GPU_CHECK_PREPARE=1 bash benchmarks/gpu_check.sh # here, once: copies the test assets into build/gpu_shared
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh     # here, on CPU: the same steps on tiny shapes (< 2 min)
#
# The device gets the repo but not ../shared, so the tests' assets (stories260K, TinyStories: 4 MB) travel
# as build/gpu_shared (git-ignored: name it in the run's `carry`). The device has python3 with torch (CUDA),
# transformers, tqdm, safetensors, peft and pytest, and no network; nothing is installed.
#
# Steps, most important first, each under `timeout` and cut to what is left of GPU_CHECK_BUDGET seconds
# (default 450); a failed or timed-out step is recorded in summary.txt and the next one runs:
#   1. nvidia-smi (card, driver, memory)
#   2. pytest tests/engine/test_engine_gpu.py (fp64-oracle tolerances on CUDA fp32 / bf16, stats bf16 / tf32,
#      one-pass = four-pass, auto batch size)
#   3. llama8b (Llama-3-8B shape, bf16 weights built on the card), n 128, T 256: one-pass vs plain fwd+bwd,
#      batch chosen from free memory, bf16 statistics
#   4. qwen05b (Qwen2-0.5B shape), n 128 and 512, T 256: one-pass and four-pass, auto batch, bf16 statistics,
#      the published loop's ratio (scaled from a subset)
#   5. qwen05b as measured before (batch 8, fp32 statistics), n 128 and 512, T 256: the baseline of step 4
#   6. qwen15b (Qwen2-1.5B shape), n 128, T 256, auto batch, bf16 statistics
#   7. where one-pass time goes at qwen05b n 128 (benchmarks/engine_profile.py: torch.profiler tables of
#      one-pass and a plain fwd+bwd, the shares of dtype copies and clones); the llama8b batch-8 / fp32
#      baseline that stood here was measured on 2026-12-04 (benchmarks/README.md)
# Files under $OUT (8, all of which come back): log.txt (everything), summary.txt (one line per step),
# pytest.txt, engine_llama8b.md, engine_qwen05b.md, engine_qwen05b_base.md, engine_qwen15b.md,
# profile_qwen05b.md. Exit status 0 only when no step failed or timed out.
#
# On the device: run(command="bash benchmarks/gpu_check.sh", carry=["build/gpu_shared"], timeout_s=540)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "${GPU_CHECK_PREPARE:-0}" = 1 ]; then
    src=${LAYERIF_SHARED:-../shared}
    mkdir -p build/gpu_shared/models build/gpu_shared/data
    cp -r "$src/models/stories260K" build/gpu_shared/models/
    cp -r "$src/data/tinystories" build/gpu_shared/data/
    du -sh build/gpu_shared
    echo "carry build/gpu_shared in the device run"
    exit 0
fi

DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
    OUT=${OUT:-bench_out/gpu_check_dry}
    # float32: bf16 matmuls on a CPU without bf16 instructions are ~50x slower (the pytest step covers bf16)
    DEVICE=cpu DTYPE=float32 BIG=llama32x256 SMALL=stories260k MID=stories260k NS_SMALL=8,16 N_BIG=8 T=32
    BUDGET=${GPU_CHECK_BUDGET:-115}
else
    PY=${PYTHON:-python3}
    DEVICE=cuda DTYPE=bfloat16 BIG=llama8b SMALL=qwen05b MID=qwen15b NS_SMALL=128,512 N_BIG=128 T=256
    BUDGET=${GPU_CHECK_BUDGET:-450}
fi
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
if [ -z "${LAYERIF_SHARED:-}" ] && [ -f build/gpu_shared/models/stories260K/stories260K.bin ]; then
    export LAYERIF_SHARED=$PWD/build/gpu_shared
fi
LOG=$OUT/log.txt SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
START=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: run under timeout (cut to the budget left), log it, one summary line
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "$name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY" "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$? secs=$(($(date +%s) - t0))
    local what=ok
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${limit}s"
    echo "$name: $what (${secs}s)" | tee -a "$SUMMARY" "$LOG"
}

# benchmarks/engine.py on $DEVICE in $DTYPE with synthetic T-token examples (random weights: timing only)
BENCH=("$PY" benchmarks/engine.py --device "$DEVICE" --dtype "$DTYPE" --data synthetic --lengths "$T")

if [ "$DRY" = 1 ]; then
    step "device" 10 "$PY" -c "import torch; print('dry run on CPU, torch', torch.__version__)"
else
    step "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
fi
step "pytest test_engine_gpu" 150 bash -c \
    "'$PY' -m pytest -q -rs -p no:cacheprovider tests/engine/test_engine_gpu.py 2>&1 | tee '$OUT/pytest.txt'; \
     exit \${PIPESTATUS[0]}"
step "engine $BIG n=$N_BIG T=$T (auto batch, bf16 stats)" 150 \
    "${BENCH[@]}" --out "$OUT/engine_llama8b.md" --models "$BIG" --ns "$N_BIG" --modes one-pass --batch-size auto --stats-precision bf16
step "engine $SMALL n=$NS_SMALL T=$T (auto batch, bf16 stats, published loop)" 150 \
    "${BENCH[@]}" --out "$OUT/engine_qwen05b.md" --models "$SMALL" --ns "$NS_SMALL" --modes one-pass,four-pass --batch-size auto \
    --stats-precision bf16 --reference
step "engine $SMALL n=$NS_SMALL T=$T (batch 8, fp32 stats: the earlier setting)" 90 \
    "${BENCH[@]}" --out "$OUT/engine_qwen05b_base.md" --models "$SMALL" --ns "$NS_SMALL" --modes one-pass --batch-size 8 \
    --stats-precision fp32
step "engine $MID n=$N_BIG T=$T (auto batch, bf16 stats)" 90 \
    "${BENCH[@]}" --out "$OUT/engine_qwen15b.md" --models "$MID" --ns "$N_BIG" --modes one-pass --batch-size auto --stats-precision bf16
step "profile $SMALL n=$N_BIG T=$T one-pass vs fwd+bwd (auto batch, bf16 stats)" 90 \
    "$PY" benchmarks/engine_profile.py --device "$DEVICE" --dtype "$DTYPE" --model "$SMALL" --n "$N_BIG" \
    --length "$T" --batch-size auto --stats-precision bf16 --out "$OUT/profile_qwen05b.md"
echo "total $(($(date +%s) - START))s of a ${BUDGET}s budget" | tee -a "$SUMMARY" "$LOG"
! grep -q -e FAILED -e "TIMED OUT" "$SUMMARY"
