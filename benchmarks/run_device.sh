#!/usr/bin/env bash
# The one script for the GPU machine: build, GPU tests, benchmarks, all logs and
# results under $OUT. Run from the repo root:  OUT=/some/dir bash benchmarks/run_device.sh
#
# Every step runs even if an earlier one failed; each step's exit code goes to
# steps.txt (124 = killed by its time limit). The whole script stays inside
# TOTAL_S seconds (default 540) so it fits one 10-minute device call.
#
# What comes back from a device call is limited to a few files, so the logs,
# CSVs, JSON summaries and plots are packed into $OUT/device_run.tar.gz; steps.txt
# and summary.txt (the benchmark tables) are also copied to $OUT as plain files.
#
# Knobs (environment):
#   STEPS        which steps to run, default "build pytest bench"; also "profile"
#                (benchmarks/profile_device.py: wall vs GPU kernel time, top kernels)
#                and "extra" (runs $EXTRA_CMD with bash, e.g. a debugger session)
#   PYTEST_ARGS  pytest arguments (default: the files with GPU tests, 8 xdist workers)
#   PYTEST_K     a -k expression for pytest (e.g. "not cpu" to leave the CPU tests out)
#   BENCHES      benchmarks to run, in order (default: all four)
#   BENCH_ARGS   extra arguments to every benchmark; BENCH_ARGS_<op> to one
#                (e.g. BENCH_ARGS_aw_conv2d="--providers reference plain_conv cuda")
#   PREBUILT     a folder holding a _C*.so built on an earlier call: copied into
#                manet_kernels/ instead of building (rebuilt if it does not load)
#   SAVE_SO=1    copy the built _C*.so to $OUT, to carry it to a later call

set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=${RAW:-$(mktemp -d /tmp/manet_device.XXXXXX)}
mkdir -p "$RAW"
TOTAL_S=${TOTAL_S:-540}
PY=${PYTHON:-$(command -v python3 || command -v python)}
STEPS=${STEPS:-build pytest bench}
GPU_TEST_FILES="tests/test_build.py tests/test_mixed_attention_passes_cuda.py
 tests/test_aw_conv2d_passes_cuda.py tests/test_brnpa_passes_cuda.py
 tests/test_mixed_attention_passes_triton.py tests/test_aw_conv2d_passes_triton.py
 tests/test_brnpa_passes_triton.py tests/test_mixed_attention.py tests/test_aw_conv2d.py
 tests/test_brnpa.py tests/test_models.py tests/test_eager_path.py"
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
"$PY" -c "import pytest_timeout" 2>/dev/null && XDIST="$XDIST --timeout=150"
PYTEST_ARGS=${PYTEST_ARGS:-$XDIST -q -rfE --tb=short -p no:cacheprovider $GPU_TEST_FILES}
BENCH_ARGS=${BENCH_ARGS:-}
export PYTHONUNBUFFERED=1
START=$SECONDS
: > "$RAW/steps.txt"

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
want() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME CAP_S CMD...: run CMD under min(CAP_S, time left), log to $RAW/NAME.log.
step() {
    local name=$1 cap=$2 lim t0 rc
    shift 2
    lim=$(left)
    (( cap < lim )) && lim=$cap
    if (( lim < 15 )); then
        echo "== $name: skipped, ${lim}s left of ${TOTAL_S}s"
        echo "$name rc=skipped (out of time)" >> "$RAW/steps.txt"
        return
    fi
    echo "== $name (limit ${lim}s): $*"
    t0=$SECONDS
    timeout --kill-after=10 "$lim" "$@" > "$RAW/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL_LINES:-15}" "$RAW/$name.log"
    echo "$name rc=$rc seconds=$(( SECONDS - t0 )) limit=$lim" >> "$RAW/steps.txt"
    echo "== $name: rc=$rc in $(( SECONDS - t0 ))s"
}

pack() {
    cp "$RAW/steps.txt" "$OUT/steps.txt"
    [[ -s "$RAW/summary.txt" ]] && cp "$RAW/summary.txt" "$OUT/summary.txt"
    tar czf "$OUT/device_run.tar.gz" -C "$RAW" . 2>/dev/null
}
trap pack EXIT

step nvidia-smi 30 nvidia-smi
step versions 60 "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0)); import triton; print('triton', triton.__version__)"

# Build against the machine's torch, in place (never reinstall torch).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export MANET_KERNELS_CUDA=${MANET_KERNELS_CUDA:-1}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ext_check="from manet_kernels import _ext as e; print('HAS_EXT', e.HAS_EXT, 'HAS_CUDA_KERNELS', e.HAS_CUDA_KERNELS, 'EXT_ERROR', e.EXT_ERROR); assert e.HAS_CUDA_KERNELS"
if want build; then
    built=0
    if [[ -n "${PREBUILT:-}" ]] && ls "$PREBUILT"/_C*.so >/dev/null 2>&1; then
        cp "$PREBUILT"/_C*.so manet_kernels/
        step ext-prebuilt 60 "$PY" -c "$ext_check" && grep -q "ext-prebuilt rc=0" "$RAW/steps.txt" && built=1
    fi
    if (( ! built )); then
        rm -f manet_kernels/_C*.so
        step build 300 "$PY" setup.py build_ext --inplace
        step ext 60 "$PY" -c "$ext_check"
    fi
    if [[ "${SAVE_SO:-0}" == 1 ]]; then
        for so in manet_kernels/_C*.so; do
            strip --strip-debug -o "$OUT/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$OUT/"
        done
    fi
fi

if want pytest; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a word list on purpose
    kexpr=()
    [[ -n "${PYTEST_K:-}" ]] && kexpr=(-k "$PYTEST_K")  # one argument, spaces and all
    TAIL_LINES=60 step pytest "${PYTEST_CAP:-200}" "$PY" -m pytest $PYTEST_ARGS "${kexpr[@]}"
fi

if want profile; then
    TAIL_LINES=20 step profile "${PROFILE_CAP:-150}" "$PY" benchmarks/profile_device.py --out "$RAW"
fi
if want extra && [[ -n "${EXTRA_CMD:-}" ]]; then
    TAIL_LINES=40 step extra "${EXTRA_CAP:-60}" bash -c "$EXTRA_CMD"
fi

# BENCHES picks and orders the benchmarks (BENCHES=aw_conv2d gives one a whole call).
# Each gets an even share of the time left when it starts, so what an earlier one
# leaves unused goes to the later ones; ~25 s stay for packing. A benchmark stops
# starting new providers 30 s before its own limit so it exits with its JSON written.
if want bench; then
    BENCHES=${BENCHES:-mixed_attention aw_conv2d brnpa train_step}
    read -r -a benches <<< "$BENCHES"
    todo=${#benches[@]}
    for op in "${benches[@]}"; do
        cap=$(( ($(left) - 25) / todo ))
        todo=$(( todo - 1 ))
        extra_var="BENCH_ARGS_$op"
        # shellcheck disable=SC2086
        TAIL_LINES=0 step "bench_$op" "$cap" "$PY" "benchmarks/bench_$op.py" --device cuda \
            --out "$RAW" --time-budget $(( cap > 60 ? cap - 30 : cap / 2 )) $BENCH_ARGS \
            ${!extra_var:-}
        # the table (after the row-by-row log) goes to summary.txt
        sed -n "/^$op: [0-9]* rows/,\$p" "$RAW/bench_$op.log" >> "$RAW/summary.txt"
        grep -E "^(note|error|Traceback)" "$RAW/bench_$op.log" | head -n 20 >> "$RAW/summary.txt"
    done
    mkdir -p "$RAW/results"
    cp benchmarks/results/*.csv "$RAW/results/" 2>/dev/null
    csvs=()
    for op in "${benches[@]}"; do
        [[ -s "$RAW/$op.csv" ]] && csvs+=("$RAW/$op.csv")
    done
    if (( ${#csvs[@]} )) && (( $(left) > 20 )); then
        step plot 20 "$PY" benchmarks/plot.py "${csvs[@]}" --out-dir "$RAW/plots"
    fi
fi

echo "== done in $(( SECONDS - START ))s; steps:"
cat "$RAW/steps.txt"
[[ -s "$RAW/summary.txt" ]] && cat "$RAW/summary.txt"
exit 0
