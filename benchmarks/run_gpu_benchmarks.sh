#!/usr/bin/env bash
# Every GPU benchmark of benchmarks/RESULTS.md in one go (~6 minutes on one H100/H200), JSON records into $OUT.
# benchmarks/gpu_check.sh runs it after the correctness checks, in the same device call (check first, speed second).
#
# On a machine without network that lacks diffusers/datasets/clean-fid, from the repo root, with a `.whl/` folder of
# wheels you prepared for its Python (see benchmarks/gpu_check.sh):
#     bash benchmarks/run_gpu_benchmarks.sh
# Options (environment): OUT (default ./bench_out), BUDGET_S (default 360: runs that would start later are recorded
# as skipped), ONLY (a grep -E pattern on run names, e.g. ONLY='compile' to rerun the compiled runs alone),
# WHEELS_READY=1 (the wheels are installed already: gpu_check.sh sets it).
# Runs, most important first: each preset in the official numerics (fp32 for CIFAR-10, the networks' fp16 path for
# ADM/EDM2), CIFAR-10 with TF32, each preset in bf16 + channels-last, one-step vs Heun sampling, then bf16 +
# channels-last + torch.compile (the compile itself is in the warm-up, not in the timing).
set -u
if [ "${WHEELS_READY:-0}" != 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-$PWD/bench_out}
BUDGET_S=${BUDGET_S:-360}
ONLY=${ONLY:-.}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
START=$(date +%s)

bench() {  # bench NAME TIMEOUT_S SCRIPT ARGS...
    local name=$1 limit=$2 script=$3
    shift 3
    echo "$name" | grep -qE "$ONLY" || return 0
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then
        echo "{\"run\": \"$name\", \"skipped\": \"time budget BUDGET_S=$BUDGET_S spent\"}" > "$OUT/$name.json"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $script $*"
    if ! timeout "$limit" python3 "benchmarks/$script" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
        echo "{\"run\": \"$name\", \"failed\": \"exit status or timeout after ${limit}s, see $name.log\"}" > "$OUT/$name.json"
    fi
    tail -c 600 "$OUT/$name.json"; echo
}

T="--warmup 2 --iters 8"
bench cifar10-fp32            90 bench_train.py --preset cifar10 --precision fp32 $T
bench imagenet64-fp16         90 bench_train.py --preset imagenet64 --precision fp16 $T
bench edm2-xs-fp16            90 bench_train.py --preset edm2-xs --precision fp16 $T
bench edm2-s-fp16             90 bench_train.py --preset edm2-s --precision fp16 $T
bench cifar10-tf32            60 bench_train.py --preset cifar10 --precision tf32 $T
B="--precision bf16 --allow_tf32 --channels_last"
bench cifar10-bf16            60 bench_train.py --preset cifar10 $B $T
bench imagenet64-bf16         90 bench_train.py --preset imagenet64 $B $T
bench edm2-xs-bf16            90 bench_train.py --preset edm2-xs $B $T
bench edm2-s-bf16             90 bench_train.py --preset edm2-s $B $T
bench sample-cifar10-bf16     90 bench_sample.py --preset cifar10 $B
bench sample-cifar10-fp32     90 bench_sample.py --preset cifar10 --precision fp32
bench cifar10-bf16-compile   240 bench_train.py --preset cifar10 $B --compile $T
bench edm2-xs-bf16-compile   300 bench_train.py --preset edm2-xs $B --compile $T
bench edm2-s-bf16-compile    300 bench_train.py --preset edm2-s $B --compile $T
bench imagenet64-bf16-compile 300 bench_train.py --preset imagenet64 $B --compile $T

cat "$OUT"/*.json > "$OUT/all.jsonl"
echo "done in $(($(date +%s) - START)) s; records in $OUT/all.jsonl"
