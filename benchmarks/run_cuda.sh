#!/usr/bin/env bash
# The CUDA measurements of the README, in one go on one GPU (under 10 minutes on an H100/H200).
# Stages run in order of importance, each under its own time limit; benchmark.py rewrites its
# benchmark.json after every model, so a stage cut short still leaves what it measured.
#   OUT_DIR=/tmp/cuda bash benchmarks/run_cuda.sh
#   python benchmarks/benchmark.py --merge /tmp/cuda/*/benchmark.json --out benchmarks/results/cuda
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/results/cuda}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BENCH="python3 benchmarks/benchmark.py --device cuda"
# resnet50 first: every ratio needs it, also from a stage that is cut short
EPSANETS="epsanet50_small epsanet50_large epsanet101_small epsanet101_large"
FORMS="epsanet50_small@official epsanet50_small@grouped epsanet50_small@depthwise"
BASELINES="seresnet50 ecaresnet50t skresnet50 res2net50_26w_4s"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@"
    echo "=== $name exit $? $(date +%T)"
    # COPY_DIR: one flat folder with every stage's results, for a machine that only returns files
    if [ -n "${COPY_DIR:-}" ]; then
        for f in "$OUT_DIR/$name/benchmark.json" "$OUT_DIR/$name.json"; do
            [ -f "$f" ] && cp "$f" "$COPY_DIR/$name.json"
        done
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
stage checks 100 python3 benchmarks/cuda_checks.py
stage branches 50 python3 benchmarks/psa_branches.py --device cuda --batch-size 128 --amp --layouts channels_last \
    --json "$OUT_DIR/branches.json"
# the targets: AMP + channels_last, every model, eager
stage amp_cl 165 $BENCH --precisions amp --layouts channels_last \
    --models resnet50 $EPSANETS $FORMS $BASELINES --out "$OUT_DIR/amp_cl"
# fp32 and NCHW too, for Small-50, the official structure and a baseline
stage subset 90 $BENCH --precisions fp32 amp --layouts nchw channels_last \
    --models resnet50 epsanet50_small epsanet50_small@official seresnet50 --out "$OUT_DIR/subset"
# torch.compile (inductor), AMP + channels_last
stage compile_infer 90 $BENCH --precisions amp --layouts channels_last --modes infer --compile --no-eager \
    --models resnet50 epsanet50_small epsanet50_small@official --out "$OUT_DIR/compile_infer"
stage compile_train 85 $BENCH --precisions amp --layouts channels_last --modes train --compile --no-eager \
    --models resnet50 epsanet50_small --out "$OUT_DIR/compile_train"
