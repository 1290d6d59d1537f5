#!/usr/bin/env bash
# The CUDA measurements in one go on one GPU (H100/H200), in about 8 minutes: the Triton kernels
# compiled first (in parallel, into Triton's cache), correctness of the fused kernels and of every
# branch form, the model table beside the peers (AMP fp16, channels-last, eager, batch 128, inference
# and training with peak memory), where the step's time goes (device busy against wall time, the
# top kernels), whole-PSA timings (the fused kernels against cuDNN), torch.compile with the Triton
# kernels, branch tuning's first-use cost and plans without the Triton kernels, then bf16 and batch
# 256.
# Stages run in order of importance, each under its own time limit (sized from the first H200 run,
# 2026-11-28, where every stage of the earlier plan ran out of time), each writing as it goes, so a
# stage cut short still leaves what it measured. STAGES picks stages; 'branches' (every branch in
# every form and layout), 'tiles' and 'tiles_spc' (the kernels' tiles; the fused kernels' candidates:
# loads through L1, 2D pixel tiles, the weight gradient's branches stacked and taps paired) and
# 'tuning_triton' are left out by default: a run of their own.
#   bash benchmarks/run_cuda.sh                              # results in /tmp/run_cuda
#   OUT_DIR=/tmp/cuda COPY_DIR=$OUT bash benchmarks/run_cuda.sh 2>&1 | tee $OUT/run.log   # on the device tool
#   STAGES="warm branches tiles" bash benchmarks/run_cuda.sh  # other stages
#   PYTHON=.venv/bin/python bash benchmarks/run_cuda.sh --dry-run   # CPU: every stage on tiny shapes, Triton interpreted
# One results file per device from the stages' CSVs, as the CPU's:
#   python benchmarks/benchmark.py --merge DIR/amp_*.csv --name benchmark-cuda-<gpu> --out benchmarks/results
# The run ends with what it decides (benchmarks/README.md, "What the next run decides") in DIR/decisions.md:
#   python benchmarks/cuda_decisions.py DIR --previous benchmarks/results/benchmark-cuda-h200.csv
# The EPSANet rows run 'auto' with the Triton kernels (TIMM_EPSANET_TRITON=1, opt-in until measured:
# the tensor-core kernels, the branches that share input slices fused, 'triton_spc'); @cudnn is
# 'auto' without them, @cudnn+attention the same with the attention's kernels, @dense / @grouped
# the cuDNN forms 'auto' picks from (the CUDA-core kernels, @triton, ran at 0.30x resnet50 in the
# first H200 run, the slowest form: no longer a row, which leaves its time to the tuning stages).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the GPU image: python3 holds torch
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TIMM_EPSANET_TRITON=1
PEERS="resnet50 seresnet50 resnext50_32x4d res2net50_26w_4s skresnet50"
EPSANETS="epsanet50_small epsanet50_large epsanet101_small"
# the CUDA default without triton (@cudnn: per branch the dense form or the grouped conv), the same
# with the attention's two Triton kernels for its dozen small ops (@cudnn+attention,
# TIMM_EPSANET_TRITON=attention), and the two cuDNN forms throughout; after the Triton rows, Large's
# default (its 32 groups of 1-2 outputs all on cuDNN's grouped conv, never timed whole), and the
# variant no run has timed, epsanet101_large (with the Triton kernels, as the other variants). Not by
# default (UNFUSED_FORMS=epsanet50_small@triton_mma): the tensor-core kernels one branch at a time,
# on which no choice rests (0.45x / 0.19x in the first run), last: the first row a stage cut short loses
OTHER_FORMS="epsanet50_small@cudnn epsanet50_small@cudnn+attention epsanet50_small@dense epsanet50_small@grouped"
LARGE_DEFAULT=epsanet50_large@cudnn
LARGE101=epsanet101_large
UNFUSED_FORMS=${UNFUSED_FORMS:-}
DEFAULT_STAGES="warm checks amp_fp16_b128 profile psa compile tuning amp_bf16_b128 amp_fp16_b256"
if [ "${1:-}" = --dry-run ]; then
    DEFAULT_STAGES="$DEFAULT_STAGES tiles_spc branches tiles tuning_triton"
    export TRITON_INTERPRET=1
    OUT_DIR=${OUT_DIR:-/tmp/run_cuda_dry_run}
    DEVICE=cpu TINY=--tiny SCALE=0  # SCALE=0: stage limits off
    BENCH_ARGS="--device cpu --img-size 64 --iters 1 --warmup 1"
    B128=2 B256=4 BRANCH_ARGS="--batch-size 1 --iters 1 --variants small" AMP=  # CPU bf16 dense convs: minutes
    TUNE_ARGS="--batch-size 2 --img-size 32 --rounds 1 --threads 2"
    TILE_SHAPES="--dtype float32 --size 4 --max-shapes 1"
    TILE_ARGS="--device cpu $TILE_SHAPES --batch-size 1 --stages 1 --max-tiles 2 --iters 1 --warmup 0"
    WARM_ARGS="--device cpu --processes 1 --max-launches 1 --size 4"
    PROFILE_ARGS="--device cpu --img-size 32 --iters 1 --top 3"
    PEERS="resnet50" EPSANETS="epsanet50_small@triton_spc" OTHER_FORMS="epsanet50_small@cudnn epsanet50_small@cudnn+attention"
    UNFUSED_FORMS="epsanet50_small@triton_mma" LARGE_DEFAULT= LARGE101=
else
    OUT_DIR=${OUT_DIR:-/tmp/run_cuda}
    DEVICE=cuda TINY= SCALE=1
    BENCH_ARGS="--device cuda --one-process --iters 20"
    B128=128 B256=256 BRANCH_ARGS="--batch-size 128 --iters 5" AMP=--amp
    TUNE_ARGS="--batch-size 128 --rounds 5"
    TILE_SHAPES=""
    TILE_ARGS="--device cuda --batch-size 128 --iters 10"
    WARM_ARGS="--processes 12"
    PROFILE_ARGS=""
fi
STAGES=${STAGES:-$DEFAULT_STAGES}
# the tiles_spc stage's sweep: the fused kernels of stage 1's PSAs, 4 tiles each (compiled by the
# warm stage where the stage runs)
TILES_SPC="--kernels spc --stages 1 --max-tiles 4"
WARM_TILES=()
case " $STAGES " in *" tiles_spc "*) WARM_TILES=(--tiles "$TILE_SHAPES $TILES_SPC") ;; esac
# NCHW branches and the CUDA-core kernels run only in the per-branch timings: compiled first only
# when those run (the warm stage ran out of its limit in the first run)
case " $STAGES " in
    *" branches "*) WARM_LAYOUTS="channels_last nchw" WARM_FORMS="triton_mma triton" ;;
    *) WARM_LAYOUTS=channels_last WARM_FORMS=triton_mma ;;
esac
mkdir -p "$OUT_DIR"

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, copy its result to COPY_DIR
    local name=$1 limit=$(($2 * SCALE)); shift 2
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"  # a stage's output apart, for cuda_decisions.py
    echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)"
    # COPY_DIR: one flat folder of every stage's results, for a machine that only returns files
    if [ -n "${COPY_DIR:-}" ]; then
        for f in "$OUT_DIR/$name"/*.csv; do
            [ -f "$f" ] && cp "$f" "$COPY_DIR/$name.csv"
        done
        [ -f "$OUT_DIR/$name.json" ] && cp "$OUT_DIR/$name.json" "$COPY_DIR/$name.json"
        cp "$OUT_DIR/$name.log" "$COPY_DIR/$name.log"
    fi
}

$PYTHON - <<'EOF' | tee "$OUT_DIR/machine.txt"
import platform, subprocess, torch, timm
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = 'not installed'
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                            capture_output=True, text=True).stdout.strip()
    gpu = f'{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), driver {driver}, CUDA {torch.version.cuda}'
else:
    gpu = f'no GPU ({platform.processor() or platform.machine()} CPU, dry run)'
print(f'Machine: {gpu}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, '
      f'triton {triton_version}, timm {timm.__version__}')
EOF
# every Triton kernel the stages below run, compiled first on 12 processes into Triton's cache, the
# tiles_spc stage's too where it runs (it would otherwise compile its candidates one by one in its limit)
stage warm 45 $PYTHON benchmarks/triton_warmup.py $WARM_ARGS --layouts $WARM_LAYOUTS --forms $WARM_FORMS \
    ${WARM_TILES[@]+"${WARM_TILES[@]}"}
# the fused kernels on every PSA first (18 checks took 50 s in the first run), every form last
stage checks 40 $PYTHON benchmarks/cuda_checks.py fused attention cpu grads forms --device $DEVICE $TINY
# the targets: AMP fp16, channels-last, eager; peers first, every ratio needs resnet50
# (epsanet101_large's 20 s come from tiles_spc, no longer a default stage: its choice is the tiles of
# the Triton kernels, which ran slower whole than cuDNN in the first run)
stage amp_fp16_b128 155 $PYTHON benchmarks/benchmark.py $BENCH_ARGS --batch-size $B128 --precisions amp \
    --layouts channels_last --models $PEERS $OTHER_FORMS $EPSANETS $LARGE_DEFAULT $LARGE101 $UNFUSED_FORMS \
    --out "$OUT_DIR/amp_fp16_b128"
# device busy against wall time per step, the host's time to issue its passes, the lines that wait
# for the GPU, and inference as one CUDA graph: whether faster kernels or fewer launches pay; Small with the Triton kernels, then as 'auto' runs without them (@cudnn)
stage profile 60 $PYTHON benchmarks/step_profile.py --batch-size $B128 \
    --models resnet50 epsanet50_small epsanet50_small@cudnn \
    $PROFILE_ARGS --json "$OUT_DIR/profile.json"
# each PSA's branches together: the fused kernels against cuDNN's grouped and dense forms, Small's
# four stages first (the first run reached stage 3 in 20 s; one branch at a time, 'triton_mma',
# trained slower than both there and is the model table's @triton_mma row), then its strided first
# blocks of stages 2-4, which no run has timed alone (the CUDA rule chose for them from whole models)
stage psa 45 $PYTHON benchmarks/psa_branches.py --whole-psa --device $DEVICE $AMP $BRANCH_ARGS \
    --layouts channels_last --forms grouped dense triton_spc --strides 1 2 --json "$OUT_DIR/psa.json"
# the fused kernels of stage 1's PSAs on their default tile (loads pipelined, past L1) and with the
# loads unpipelined (through L1), then the forward and input gradient through L1 on 2D pixel tiles
# and pipelined 2 deep, the weight gradient with its branches in one product and with its taps in
# pairs: the first H200 run's fused forward read every tap's tile from L2 at about its bandwidth
stage tiles_spc 20 $PYTHON benchmarks/triton_tiles.py $TILE_ARGS $TILES_SPC --json "$OUT_DIR/tiles_spc.json"
# the first run's compile (then traced twice) passed its check and ran out of time before its timing
stage compile 40 $PYTHON benchmarks/cuda_checks.py compile --device $DEVICE $TINY
# branch tuning (training first) against the rules, as users get it: without the Triton kernels
# (TIMM_EPSANET_TRITON=0, the default) the cuDNN forms only, whose first use should cost seconds
stage tuning 25 env TIMM_EPSANET_TRITON=0 $PYTHON benchmarks/branch_tuning.py --device $DEVICE $AMP $TUNE_ARGS \
    --modes train infer --layouts channels_last --json "$OUT_DIR/tuning.json"
# not by default: tuning with the Triton kernels (the plans that mix fused kernels and cuDNN forms
# per branch; the psa stage times the same choice per PSA, both strides, in both modes)
stage tuning_triton 20 $PYTHON benchmarks/branch_tuning.py --device $DEVICE $AMP $TUNE_ARGS \
    --modes train infer --layouts channels_last --json "$OUT_DIR/tuning_triton.json"
# the other precision and batch size: resnet50 and Small only (each new shape costs cuDNN's benchmark)
stage amp_bf16_b128 25 $PYTHON benchmarks/benchmark.py $BENCH_ARGS --batch-size $B128 --precisions amp_bf16 \
    --layouts channels_last --models resnet50 ${EPSANETS%% *} --out "$OUT_DIR/amp_bf16_b128"
stage amp_fp16_b256 15 $PYTHON benchmarks/benchmark.py $BENCH_ARGS --batch-size $B256 --precisions amp \
    --layouts channels_last --modes infer --models resnet50 ${EPSANETS%% *} --out "$OUT_DIR/amp_fp16_b256"
# not by default: the cuDNN forms and the Triton kernels of every branch in both layouts (the
# depthwise and volumetric forms are CPU forms, 3-7x slower than the grouped conv on CUDA:
# BRANCH_FORMS to add them), 10 s a branch in the first run
stage branches 35 $PYTHON benchmarks/psa_branches.py --device $DEVICE $AMP $BRANCH_ARGS \
    --layouts channels_last nchw --forms ${BRANCH_FORMS:-grouped dense regrouped triton triton_mma} --json "$OUT_DIR/branches.json"
# not by default: the Triton kernels' tiles, the defaults against their neighbours, the fused kernels
# per PSA stage first, then Small's branches largest first, the tensor-core kernels before the CUDA-core ones
stage tiles 25 $PYTHON benchmarks/triton_tiles.py $TILE_ARGS --json "$OUT_DIR/tiles.json"
# what the run decides (benchmarks/README.md, "What the next run decides"), against the last committed H200 run
$PYTHON benchmarks/cuda_decisions.py "$OUT_DIR" --previous benchmarks/results/benchmark-cuda-h200.csv \
    --out "$OUT_DIR/decisions.md" > /dev/null && [ -n "${COPY_DIR:-}" ] && cp "$OUT_DIR/decisions.md" "$COPY_DIR/"
echo "=== done $(date +%T)"
