#!/usr/bin/env bash
# The one script for the GPU machine: one device call of at most 8 minutes (TOTAL_S=480)
# that builds, runs the GPU tests that never ran on a GPU, then profiles and benchmarks,
# and packs everything into one tarball under $OUT. Run from the repo root:
#
#   MANET_KERNELS_COMMIT=<sha> bash benchmarks/run_device.sh         # run 1 (the default)
#   RUN=2 bash benchmarks/run_device.sh                              # optional second run
#   RUN=3 bash benchmarks/run_device.sh                              # optional third run
#   bash benchmarks/run_device.sh --dry-run       # no GPU: check the plan, print each step's
#                                                 # cap and its last recorded time
#   bash benchmarks/run_device.sh --record device_run.tar.gz [CSV]
#                      # append a fetched run's step times to benchmarks/results/device_steps.csv
#
# The plan (the `add` lines below; --dry-run prints it with its checks). Caps are
# seconds; a step gets min(cap, time left), and a step with under MIN_STEP_S left is
# skipped. Lane B runs beside lane A (it needs no extension, and the build leaves most
# of the 16 cores idle: 7 translation units), with WORKERS=8 xdist workers each, and is
# joined before anything is timed. Caps are first estimates (no step of this plan has
# been timed on a GPU yet; the slowest .cu file took 4-6 min to compile on the 2-core
# CPU machine while other builds ran): the dry run prints the last recorded time of
# each step from benchmarks/results/device_steps.csv; retune the caps from there.
#
#   run 1 (lane A 470 s + 10 s packing)          lane B, from t=15 s (ends by 345 s)
#     env                  15  nvidia-smi,         tests-triton-fp32 110  Triton pass tests
#                              versions                                   -k float32
#     build               180  sm_90, MAX_JOBS=16   tests-triton-bf16  90  -k bfloat16
#                              (or reused/PREBUILT) tests-triton-rest  80  fp16/fp64/no dtype
#     ext                  15  CUDA kernels load    tests-triton-aw_v2 50  the second Triton
#                                                     AW kernels through the op, gate open
#     tests-never          60  CUDA spatial conv, fused op with it, every C++ error path,
#                              the fused stages, GPU kernels per step, CUDA graph capture,
#                              the v2 AW weight gradient (tests/test_aw_conv2d_v2.py, which
#                              opens CUDA_AW_V2_VERIFIED itself)
#     tests-cuda-fp32      50  CUDA pass and stage tests -k float32
#     tests-cuda-bf16      40  CUDA pass and stage tests -k bfloat16
#     (join, at 360 s)
#     profile              35  profile_device.py: wall vs GPU kernel time, kernels/step
#     bench-mixed_attention 35 reference eager, cuda, triton; bf16+fp32; full; stage shapes
#     bench-aw_conv2d      20  + plain_conv; bf16 (matmul probe in the same run)
#     bench-brnpa          20  (copy-bandwidth probe in the same run, as mixed attention)
#   run 2 (470 s): env 15, build 180, ext 15, tests-cuda-rest 50 (fp16/fp64/no dtype),
#     tests-ops 90 (op, model and eager-path GPU tests), bench-host_time 20 (host time per
#     step at tiny shapes, cuda backend vs eager), bench-train_step 100
#   run 3 (470 s, no build): env 15,
#     bench-compile-{mixed_attention 180, aw_conv2d 140, brnpa 135}: the reference
#     eager and under torch.compile(mode="max-autotune") beside triton (and cuda where
#     the extension is there), full mode; the time budget drops what does not fit
#
# Outputs ($OUT holds at most 8 files): device_run.tar.gz (every step's log, steps.csv,
# summary.txt, the benchmarks' CSV/JSON rows, profile.txt), and as plain files
# steps.csv (date_utc,commit,device,run,step,seconds,limit,rc; rc 124 = hit its limit),
# summary.txt, and after a build extension.tar.gz (the stripped _C*.so and its _C.stamp)
# to carry to a later call as PREBUILT (on a warm machine the in-place build is reused).
# Benchmarks run with --no-save: their rows are the tarball's <op>.csv files.
#
# Knobs (environment):
#   RUN           which run of the plan (1, 2, 3)
#   STEPS         run only these steps of it (names as above, space-separated)
#   TOTAL_S       seconds for the whole run (default 480); RESERVE_S kept for packing (10)
#   PYTEST_K      a -k expression and-ed into every test step
#   WORKERS       xdist workers per test lane (default 8)
#   BENCH_ARGS    extra arguments to every benchmark; BENCH_ARGS_<op> to one
#   BENCH_DIR     where the benchmark scripts are (default benchmarks)
#   PREBUILT      an extension.tar.gz from an earlier call: used when its stamp (sources,
#                 Python, torch) matches these, else the extension is built
#   SAVE_SO=0     do not save a freshly built extension to $OUT/extension.tar.gz
#   DRY_RUN=1     as --dry-run; DRY_RUN_QUICK=1 checks files and budget only
#   MANET_KERNELS_COMMIT  the commit to record (the device copy has no .git)

set -u
cd "$(dirname "$0")/.." || exit 1
SELF="$PWD/benchmarks/run_device.sh"
PY=${PYTHON:-$(command -v python3 || command -v python)}
RUN=${RUN:-1}
TOTAL_S=${TOTAL_S:-480}
RESERVE_S=${RESERVE_S:-10}
MIN_STEP_S=${MIN_STEP_S:-10}
WORKERS=${WORKERS:-8}
BENCH_DIR=${BENCH_DIR:-benchmarks}
RECORD_CSV=${RECORD_CSV:-benchmarks/results/device_steps.csv}
STAMP=build/run_device.stamp
export PY RUN PREBUILT=${PREBUILT:-} SAVE_SO=${SAVE_SO:-1} STAMP

# --------------------------------------------------------------------------- the plan

# One pass-test file per op, parametrised over backends: every test id starts with its
# backend (cpu, cuda, triton, torch), so a backend word in -k picks a backend's cases.
PASS=(tests/test_mixed_attention_passes.py tests/test_aw_conv2d_passes.py
      tests/test_brnpa_passes.py tests/test_mixed_attention_stages.py tests/test_brnpa_stages.py)
OPS=(tests/test_mixed_attention.py tests/test_aw_conv2d.py tests/test_brnpa.py)
# Every C++/CUDA argument check segfaulted on the first H100 run (compiler ABI); the
# MK_CHECK rewrite has not run there since, nor have the CUDA spatial-conv kernels, the
# fused stages (tests/test_*_stages.py, issue 16) or the whole GPU steps
# (tests/test_gpu_steps.py: kernels per step, CUDA graph capture; AW-conv's with the
# second Triton kernels), nor the second CUDA AW kernels (tests/test_aw_conv2d_v2.py
# "aw_v2_cuda", which open CUDA_AW_V2_VERIFIED themselves).
NEVER_K="spatial_conv or bad_ or mixed_devices or name_the_argument or stage or gpu_kernels or cuda_graph or aw_v2_cuda"
REST_K="not float32 and not bfloat16 and not spatial_conv and not bad_ and not name_the_argument"
OURS=(--modes full)
# ours beside the compiled reference, so its ratio is side by side in one run (cuda only
# where an earlier call's build is still there or PREBUILT; skipped with a note otherwise)
COMPILE=(--providers reference reference_compile triton cuda --modes full)

PLAN=()
# add RUN LANE STEP CAP KIND WORDS...: KIND fn (a function of this script, then the
# files it needs), py (script, args), bench (script, args), pytest (-k, files), join.
add() { local IFS=$'\t'; PLAN+=("$*"); }

add 1 A env 15 fn env_info
add 1 B tests-triton-fp32 110 pytest "triton and float32" "${PASS[@]}"
add 1 B tests-triton-bf16 90 pytest "triton and bfloat16" "${PASS[@]}"
add 1 B tests-triton-rest 80 pytest "triton and not float32 and not bfloat16" "${PASS[@]}"
# The second Triton AW kernels (issue 17) run on a GPU only once verified
# (TRITON_AW_V2_VERIFIED): the pass tests above call them directly, this runs the op
# with the gate open (test ids "triton_aw_v2"); tests-never runs their GPU step tests.
add 1 B tests-triton-aw_v2 50 pytest "aw_v2" tests/test_aw_conv2d.py
add 1 A build 180 fn build_ext setup.py
add 1 A ext 15 fn ext_check
add 1 A tests-never 60 pytest "($NEVER_K) and not (triton and passes)" "${PASS[@]}" \
    "${OPS[@]}" tests/test_gpu_steps.py tests/test_aw_conv2d_v2.py
add 1 A tests-cuda-fp32 50 pytest "cuda and float32 and not spatial_conv" "${PASS[@]}"
add 1 A tests-cuda-bf16 40 pytest "cuda and bfloat16 and not spatial_conv" "${PASS[@]}"
add 1 A join 0 join
add 1 A profile 35 py "$BENCH_DIR/profile_device.py" --out @RAW@
add 1 A bench-mixed_attention 35 bench "$BENCH_DIR/bench_mixed_attention.py" \
    --providers reference cuda triton "${OURS[@]}"
add 1 A bench-aw_conv2d 20 bench "$BENCH_DIR/bench_aw_conv2d.py" \
    --providers reference plain_conv cuda triton "${OURS[@]}"
add 1 A bench-brnpa 20 bench "$BENCH_DIR/bench_brnpa.py" --providers reference cuda triton \
    "${OURS[@]}"

add 2 A env 15 fn env_info
add 2 A build 180 fn build_ext setup.py
add 2 A ext 15 fn ext_check
add 2 A tests-cuda-rest 50 pytest "cuda and $REST_K" "${PASS[@]}"
add 2 A tests-ops 90 pytest "gpu or cuda" "${OPS[@]}" tests/test_models.py tests/test_boundary.py \
    tests/test_timm.py
add 2 A bench-host_time 20 bench "$BENCH_DIR/bench_host_time.py"
add 2 A bench-train_step 100 bench "$BENCH_DIR/bench_train_step.py"

add 3 A env 15 fn env_info
add 3 A bench-compile-mixed_attention 180 bench "$BENCH_DIR/bench_mixed_attention.py" \
    "${COMPILE[@]}"
add 3 A bench-compile-aw_conv2d 140 bench "$BENCH_DIR/bench_aw_conv2d.py" "${COMPILE[@]}"
add 3 A bench-compile-brnpa 135 bench "$BENCH_DIR/bench_brnpa.py" "${COMPILE[@]}"

# --------------------------------------------------------------------------- step bodies

env_info() {
    nvidia-smi
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0), 'triton', triton.__version__)"
}

# What the extension was built from: a PREBUILT or in-place one is reused only if this matches.
build_stamp() {
    { find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum
      "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } | sha256sum
}

build_ext() {
    local want
    want=$(build_stamp)
    if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]] && ext_check; then
        echo "reusing the extension built here from the same sources"
        return 0
    fi
    [[ -n $PREBUILT ]] && use_prebuilt "$want" && return 0
    rm -f manet_kernels/_C*.so "$STAMP"
    # against the machine's torch, in place: never (re)install torch there
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        MANET_KERNELS_CUDA=${MANET_KERNELS_CUDA:-1} "$PY" setup.py build_ext --inplace || return
    mkdir -p build && echo "$want" > "$STAMP"
    if [[ $SAVE_SO == 1 ]]; then save_extension; fi
}

use_prebuilt() {  # STAMP_WANTED
    local dir
    dir=$(mktemp -d)
    if ! tar xzf "$PREBUILT" -C "$dir" 2>/dev/null \
            || [[ $(cat "$dir/_C.stamp" 2>/dev/null) != "$1" ]]; then
        echo "PREBUILT=$PREBUILT holds no extension built from these sources: building"
        return 1
    fi
    cp "$dir"/_C*.so manet_kernels/ && ext_check && mkdir -p build && echo "$1" > "$STAMP"
}

# The stripped extension (~21 MB for sm_90, ~5 MB gzipped: one file back is at most
# 16 MiB) with its stamp, for PREBUILT on a later call.
save_extension() {
    local dir so
    dir=$(mktemp -d)
    for so in manet_kernels/_C*.so; do
        strip --strip-debug -o "$dir/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$dir/"
    done
    cp "$STAMP" "$dir/_C.stamp"
    tar czf "$OUT/extension.tar.gz" -C "$dir" .
}

ext_check() {
    "$PY" -c "from manet_kernels import _ext as e; print('HAS_EXT', e.HAS_EXT, 'HAS_CUDA_KERNELS', e.HAS_CUDA_KERNELS, 'EXT_ERROR', e.EXT_ERROR); assert e.HAS_CUDA_KERNELS"
}

if [[ ${1:-} == --fn ]]; then  # a step body, run by `timeout` in a fresh shell
    "$2"
    exit
fi

# --------------------------------------------------------------------------- plan walking

# The words a step runs; a bench step gets the harness options, its time budget from
# its limit (a quarter kept for the provider running when the budget is spent).
step_command() {  # KIND LIMIT WORDS...
    local kind=$1 lim=$2 script op var
    shift 2
    case $kind in
        fn) CMD=(bash "$SELF" --fn "$1") ;;
        py) CMD=("$PY" "${@//@RAW@/$RAW}") ;;
        bench)
            script=$1 op=$(basename "$1" .py)
            op=${op#bench_} var=BENCH_ARGS_$op
            shift
            # shellcheck disable=SC2206  # BENCH_ARGS* are word lists on purpose
            CMD=("$PY" "$script" --device cuda --out "$RAW" --no-save
                 --time-budget $(( lim * 3 / 4 > 5 ? lim * 3 / 4 : 5 )) "$@"
                 ${BENCH_ARGS:-} ${!var:-}) ;;
        pytest)
            local k xdist=()
            k=$(keyword "$1")
            shift
            "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$WORKERS")
            "$PY" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout=150)
            # lane B runs in the background, where SIGINT starts ignored and a shell cannot
            # restore it: Python can, for the pytest it then becomes
            CMD=("$PY" -c "$DEFAULT_INT" -m pytest "${xdist[@]}" -v -rfE --tb=short
                 -p no:cacheprovider -k "$k" "$@") ;;
    esac
}
DEFAULT_INT='import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); os.execv(sys.executable, [sys.executable] + sys.argv[1:])'

keyword() { if [[ -n ${PYTEST_K:-} ]]; then echo "($1) and ($PYTEST_K)"; else echo "$1"; fi; }

# The plan's entries for this call: the run's steps, or STEPS of them.
selected() {  # RUN
    local e f
    for e in "${PLAN[@]}"; do
        IFS=$'\t' read -r -a f <<< "$e"
        [[ ${f[0]} == "$1" ]] || continue
        [[ -z ${STEPS:-} || ${f[4]} == join || " $STEPS " == *" ${f[2]} "* ]] || continue
        printf '%s\n' "$e"
    done
}

# The words of STEPS that name no step of the runs given.
unknown_steps() {  # RUN...
    local w e f found words
    read -r -a words <<< "${STEPS:-}"
    for w in "${words[@]}"; do
        found=0
        for e in "${PLAN[@]}"; do
            IFS=$'\t' read -r -a f <<< "$e"
            [[ " $* " == *" ${f[0]} "* && ${f[2]} == "$w" ]] && found=1
        done
        (( found )) || echo "$w"
    done
}

left() { echo $(( TOTAL_S - RESERVE_S - ($(date +%s) - START) )); }

run_step() {  # a plan entry
    local f name cap kind lim t0 rc sig=TERM
    IFS=$'\t' read -r -a f <<< "$1"
    name=${f[2]} cap=${f[3]} kind=${f[4]}
    lim=$(left)
    (( cap < lim )) && lim=$cap
    if (( lim < MIN_STEP_S )); then
        echo "== $name: skipped, ${lim}s left"
        echo "$RUN_ID,$name,0,$lim,skipped" >> "$RAW/steps.csv"
        return
    fi
    step_command "$kind" "$lim" "${f[@]:5}"
    [[ $kind == pytest ]] && sig=INT  # pytest prints its summary on SIGINT
    echo "== $name (limit ${lim}s): ${CMD[*]}"
    t0=$(date +%s)
    timeout -s "$sig" --kill-after=10 "$lim" "${CMD[@]}" > "$RAW/$name.log" 2>&1
    rc=$?
    echo "$RUN_ID,$name,$(( $(date +%s) - t0 )),$lim,$rc" >> "$RAW/steps.csv"
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
    tail -n 3 "$RAW/$name.log"
}

# --------------------------------------------------------------------------- modes

if [[ ${1:-} == --record ]]; then
    [[ -n ${2:-} ]] || { echo "usage: $0 --record device_run.tar.gz [CSV]" >&2; exit 2; }
    exec "$PY" benchmarks/run_device_plan.py record "$2" --csv "${3:-$RECORD_CSV}"
fi

if [[ ${1:-} == --dry-run || ${DRY_RUN:-0} == 1 ]]; then
    bad=$(unknown_steps 1 2 3)
    [[ -z $bad ]] || { echo "STEPS names no step of the plan:" "${bad//$'\n'/ }" >&2; exit 1; }
    plan=$(mktemp /tmp/manet_plan.XXXXXX)
    for r in 1 2 3; do
        while IFS= read -r e; do
            IFS=$'\t' read -r -a f <<< "$e"
            if [[ ${f[4]} == fn ]] && ! declare -F "${f[5]}" > /dev/null; then
                echo "plan error: step ${f[2]} calls ${f[5]}, not a function here" >&2; exit 1
            fi
            # the checker sees what runs: pytest's -k and files, a script and its options
            case ${f[4]} in
                pytest) words=("$(keyword "${f[5]}")" "${f[@]:6}") ;;
                py|bench) RAW=@RAW@ step_command "${f[4]}" "${f[3]}" "${f[@]:5}"
                          words=("${CMD[@]:1}") ;;
                *) words=("${f[@]:5}") ;;
            esac
            (IFS=$'\t'; echo "${f[*]:0:5}"$'\t'"${words[*]}") >> "$plan"
        done < <(selected "$r")
    done
    quick=()
    [[ ${DRY_RUN_QUICK:-0} == 1 ]] && quick=(--quick)
    "$PY" benchmarks/run_device_plan.py check "$plan" --csv "$RECORD_CSV" --total "$TOTAL_S" \
        --reserve "$RESERVE_S" --python "$PY" "${quick[@]}"
    rc=$?
    rm -f "$plan"
    exit $rc
fi

bad=$(unknown_steps "$RUN")
[[ -z $bad ]] || { echo "STEPS names no step of run $RUN:" "${bad//$'\n'/ }" >&2; exit 2; }
mapfile -t steps < <(selected "$RUN")
(( ${#steps[@]} )) || { echo "no run $RUN in the plan" >&2; exit 2; }

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=$(mktemp -d /tmp/manet_device.XXXXXX)
export OUT RAW PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
COMMIT=${MANET_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export MANET_KERNELS_COMMIT=$COMMIT
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
DEVICE=${DEVICE:-unknown}
RUN_ID="$(date -u +%Y-%m-%dT%H:%M:%SZ),$COMMIT,${DEVICE//,/ },$RUN"
START=$(date +%s)
echo "date_utc,commit,device,run,step,seconds,limit,rc" > "$RAW/steps.csv"
BG=""

finish() {
    [[ -n $BG ]] && wait "$BG"
    {
        column -s, -t < "$RAW/steps.csv" 2>/dev/null || cat "$RAW/steps.csv"
        for log in "$RAW"/tests-*.log; do
            [[ -f $log ]] || continue
            echo "$(basename "$log" .log): $(grep -E '^=+ .*(passed|failed|error|deselected|no tests ran)' "$log" | tail -n 1)"
            grep -E '^(FAILED|ERROR) ' "$log" | head -n 30
        done
        for log in "$RAW"/bench-*.log; do
            [[ -f $log ]] || continue
            sed -n '/^[a-z_0-9]*: [0-9]* rows$/,$p' "$log"
            grep -E '^(note|error|Traceback)' "$log" | head -n 20
        done
    } > "$RAW/summary.txt"
    cp "$RAW/steps.csv" "$RAW/summary.txt" "$OUT/"
    tar czf "$OUT/device_run.tar.gz" -C "$RAW" .
    echo "== done in $(( $(date +%s) - START ))s"
    cat "$RAW/summary.txt"
    rm -rf "$RAW"
}
trap finish EXIT

for e in "${steps[@]}"; do
    IFS=$'\t' read -r -a f <<< "$e"
    if [[ ${f[1]} == B ]]; then
        if [[ -z $BG ]]; then  # lane B: all its steps in order, in the background
            ( for b in "${steps[@]}"; do
                  IFS=$'\t' read -r -a g <<< "$b"
                  [[ ${g[1]} == B ]] && run_step "$b"
              done ) &
            BG=$!
        fi
    elif [[ ${f[4]} == join ]]; then
        [[ -n $BG ]] && wait "$BG"
        BG=""
    else
        run_step "$e"
    fi
done
