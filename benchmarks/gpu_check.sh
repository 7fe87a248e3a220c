#!/usr/bin/env bash
# Does it work on CUDA, then how fast: one device call of at most 9 minutes on one H100/H200, JSON into $OUT.
#
#     bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#     bash benchmarks/gpu_check.sh --dry_run    # on a CPU: every check that can run does (tiny sizes), the rest listed
#
# First benchmarks/gpu_check.py (at most CHECK_S seconds, default 360): networks in fp32/fp16/bf16, losses, one SiDA
# iteration CUDA against CPU, --compile against eager, --fsdp on one process, a 2-kimg digits run in bf16 and fp16,
# peak memory against the memory plan. Then the speed runs of benchmarks/run_gpu_benchmarks.sh with the time left of
# TOTAL_S (default 540). SPEED=0 skips them.
#
# A machine without network that lacks packages (the lent one has no diffusers, datasets or clean-fid) installs them
# from a `.whl/` folder you prepare in the repository root (wheels for its Python, e.g. `pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 ...`) and send with the call; they go into
# /tmp/site. What comes back fits few files: $OUT/gpu_check.json (every check's record), $OUT/speed_all.jsonl,
# $OUT/device.csv, $OUT/log.txt and $OUT/gpu_out.tar.gz (everything else: per-run logs, the digits runs' outputs).
set -u
PY=${PYTHON:-python3}  # the interpreter with torch (PYTHON=... to pick another)
START=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
CHECK_S=${CHECK_S:-360}
TOTAL_S=${TOTAL_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--dry_run" ]; then
    "$PY" benchmarks/gpu_check.py --dry_run --out "$OUT" --budget_s "$CHECK_S" 2>&1 | tee "$OUT/log.txt"
    status=${PIPESTATUS[0]}
    # the speed part at tiny size on the CPU, so that it is known to start; the full-size runs need CUDA
    mkdir -p "$OUT/work/speed"
    "$PY" benchmarks/bench_train.py --tiny --preset edm2-xs --warmup 1 --iters 2 > "$OUT/work/speed/tiny_train.json"
    "$PY" benchmarks/bench_sample.py --tiny > "$OUT/work/speed/tiny_sample.json"
    { cat "$OUT"/work/speed/*.json; echo '{"skipped": "full-size speed runs (run_gpu_benchmarks.sh): need CUDA"}'; } \
        > "$OUT/speed_all.jsonl"
    tar czf "$OUT/gpu_out.tar.gz" -C "$OUT" work && rm -rf "$OUT/work"
    exit "$status"
fi

if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD WHEELS_READY=1
else
    export PYTHONPATH=$PWD WHEELS_READY=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
timeout "$CHECK_S" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget_s $((CHECK_S - 40)) 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
if [ "${SPEED:-1}" != 0 ]; then
    left=$((TOTAL_S - ($(date +%s) - START) - 20))
    OUT="$OUT/work/speed" BUDGET_S=$left bash benchmarks/run_gpu_benchmarks.sh 2>&1 | tee -a "$OUT/log.txt"
    cp "$OUT/work/speed/all.jsonl" "$OUT/speed_all.jsonl" 2>/dev/null
fi
tar czf "$OUT/gpu_out.tar.gz" -C "$OUT" work && rm -rf "$OUT/work"
echo "gpu_check.sh: done in $(($(date +%s) - START)) s; records in $OUT"
exit "$status"
