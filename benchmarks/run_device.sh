#!/usr/bin/env bash
# The one script for the GPU machine: build, GPU tests, benchmarks, all logs and
# results under $OUT. Run from the repo root:  OUT=/some/dir bash benchmarks/run_device.sh
#
# Every step runs even if an earlier one failed; each step's exit code goes to
# $OUT/steps.txt (124 = killed by its time limit). The whole script stays inside
# TOTAL_S seconds (default 530) so it fits one 10-minute device call.

set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TOTAL_S=${TOTAL_S:-530}
PY=${PYTHON:-$(command -v python || command -v python3)}
PYTEST_ARGS=${PYTEST_ARGS:--q tests -x}
BENCH_ARGS=${BENCH_ARGS:-}  # to every benchmark, e.g. "--compile-mode max-autotune-no-cudagraphs"
export PYTHONUNBUFFERED=1
START=$SECONDS
: > "$OUT/steps.txt"

left() { echo $(( TOTAL_S - (SECONDS - START) )); }

# step NAME CAP_S CMD...: run CMD under min(CAP_S, time left), log to $OUT/NAME.log.
step() {
    local name=$1 cap=$2 lim t0 rc
    shift 2
    lim=$(left)
    (( cap < lim )) && lim=$cap
    if (( lim < 15 )); then
        echo "== $name: skipped, ${lim}s left of ${TOTAL_S}s"
        echo "$name rc=skipped (out of time)" >> "$OUT/steps.txt"
        return
    fi
    echo "== $name (limit ${lim}s): $*"
    t0=$SECONDS
    timeout --kill-after=10 "$lim" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$(( SECONDS - t0 )) limit=$lim" >> "$OUT/steps.txt"
    echo "== $name: rc=$rc in $(( SECONDS - t0 ))s"
}

step nvidia-smi 30 nvidia-smi
step versions 60 "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0)); import triton; print('triton', triton.__version__)"

# Build against the machine's torch: no isolation, no deps (never reinstall torch).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
step build 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
step ext 60 "$PY" -c "from manet_kernels import _ext as e; print('HAS_EXT', e.HAS_EXT, 'HAS_CUDA_KERNELS', e.HAS_CUDA_KERNELS, 'EXT_ERROR', e.EXT_ERROR)"

# shellcheck disable=SC2086  # PYTEST_ARGS and BENCH_ARGS are word lists on purpose
step pytest 150 "$PY" -m pytest $PYTEST_ARGS

# BENCHES picks and orders the benchmarks (BENCHES=aw_conv2d gives one a whole call).
# Each gets an even share of the time left when it starts, so what an earlier one
# leaves unused goes to the later ones; ~40 s stay for copying and plotting. A
# benchmark stops starting new providers 30 s before its own limit so it exits
# with its JSON written.
BENCHES=${BENCHES:-mixed_attention brnpa aw_conv2d train_step}
read -r -a benches <<< "$BENCHES"
todo=${#benches[@]}
for op in "${benches[@]}"; do
    cap=$(( ($(left) - 40) / todo ))
    todo=$(( todo - 1 ))
    # shellcheck disable=SC2086
    step "bench_$op" "$cap" "$PY" "benchmarks/bench_$op.py" --device cuda --out "$OUT" \
        --time-budget $(( cap > 60 ? cap - 30 : cap / 2 )) $BENCH_ARGS
done

mkdir -p "$OUT/results"
cp benchmarks/results/*.csv "$OUT/results/" 2>/dev/null
echo "copy-results rc=$? seconds=0" >> "$OUT/steps.txt"
csvs=()
for op in "${benches[@]}"; do
    [[ -s "$OUT/$op.csv" ]] && csvs+=("$OUT/$op.csv")
done
if (( ${#csvs[@]} )); then
    step plot 30 "$PY" benchmarks/plot.py "${csvs[@]}" --out-dir "$OUT/plots"
fi

echo "== done in $(( SECONDS - START ))s; steps:"
cat "$OUT/steps.txt"
