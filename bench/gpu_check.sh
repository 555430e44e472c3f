#!/usr/bin/env bash
# One call on a lent GPU machine (offline; torch, triton, nvcc, ninja, pybind11, pytest already installed):
#
#   bash bench/gpu_check.sh            # from anywhere in the checkout; OUT=<dir> chooses where results go
#                                      # (default: $OUT if set, else bench/results)
#
# 1. pip install --no-build-isolation --no-deps -e .   (builds the CUDA extension when the sources ask for it)
# 2. nvidia-smi                                        -> $OUT/nvidia-smi.txt
# 3. pytest -m gpu                                     -> $OUT/pytest-gpu.xml (junit)
# 4. python -m lorakern bench (full GPU shapes)        -> $OUT/<device>-<YYYYMMDD>-<commit>.json and .md,
#                                                         with step 3's counts (tests_scope "gpu")
# 5. pytest, the full suite (GPU tests included)       -> $OUT/pytest-all.xml; its counts then replace step 3's
#                                                         in the results (tests_scope "all")
# The benchmark runs before the full suite so that a slow suite cannot cost the numbers; the results file is
# rewritten after every benchmark case, so even an interrupted run leaves its rows so far.
#
# Everything is logged to $OUT/gpu_check.log. `set -u`; a failing step does not stop the others; the exit
# status is that of the first failing step (0 if all passed). Time limits per step, in seconds (env overrides):
# INSTALL_TIMEOUT=120 GPU_TESTS_TIMEOUT=200 BENCH_TIMEOUT=220 (ALL_TESTS_TIMEOUT=560, its own call), which fit the lent
# machine's 10-minute limit per call. SKIP_INSTALL=1 skips step 1; BENCH_ARGS adds options to step 4
# (e.g. BENCH_ARGS="--filter decode"); BENCH_DEVICE=cpu (with BENCH_ARGS=--quick) tries the script without a GPU;
# PYTHON picks the interpreter; LORAKERN_COMMIT=<hash> names the commit in the results when the machine's copy
# of .git is stale (the lent machine's was: pass LORAKERN_COMMIT=$(git rev-parse --short HEAD) from here).
#
# STEPS picks what runs (each set fits one 10-minute call of the lent machine):
#   STEPS=core (default)   steps 1-4: install, nvidia-smi, pytest -m gpu, the add_lora benchmark, then each path
#                          forced on the crossover-<m> cases (paths/: the gather/segment threshold), and
#                          a plan's fill and add_lora_moe's pair grouping, torch ops vs the grouping kernel
#                          (paths/grouping.json)
#   STEPS=tests            step 5: the full suite on the GPU (its counts go into the newest results JSON); with
#                          pytest-xdist, TEST_WORKERS (default 14) workers (worksteal); TESTS_EXTRA: more pytest
#                          arguments; failing test names in failures.txt, their tracebacks in failures-tb.txt;
#                          tests-log.tsv: a line per finished test (python -m lorakern testlog: counts, failures,
#                          the slowest), kept even when the call is cut; TESTS_DONE=<such a log, copied back into
#                          the checkout> runs only the tests it does not name (a cut run's second call)
#   STEPS=extra            bench_mla.py, bench_moe.py, bench_pool.py (results as JSON under $OUT)
#   STEPS=tune             the add_lora benchmark on the main cases (TUNE_FILTER) for TUNE_BACKENDS (default
#                          "cuda cuda-fused triton": cuda-fused = the fused segment kernel; TUNE_BASELINES, default
#                          none: the recorded run of STEPS=core has them), Nsight Compute on the
#                          prefill segment kernels and the decode gather kernel (ncu.txt) and on the fused kernel
#                          (ncu-fused.txt), the decode family again with LORAKERN_BENCH_FLUSH=read
#                          (read-flush/, READ_FLUSH_FILTER), bench/sweep_variants.sh on SWEEP_VARIANTS (default "default
#                          gather-guarded seg-fused seg-fused-branch seg-fused-s4 gather-prefetch gather-2cta seg-mma gather-xsmem
#                          seg-fused-s8 seg-fused-o4 gather-xsmem-prefetch gather-early-out": the variants not
#                          yet timed, the most
#                          telling first, since the sweep stops at its time budget; the others were timed,
#                          docs/cuda.md),
#                          then the cuda-backend op suites on the GPU
#                          (TUNE_TESTS_TIMEOUT, default 240 s, cut to what DEADLINE_S leaves): one call of a session that changes kernels
#   STEPS=all              everything (more than one call's worth)
# e.g.  bash bench/gpu_check.sh;  SKIP_INSTALL=1 STEPS=tests bash bench/gpu_check.sh;  SKIP_INSTALL=1 STEPS=extra ...
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-bench/results}"
mkdir -p "$OUT" 2>/dev/null || { OUT=bench/results; mkdir -p "$OUT"; }
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
unset TRITON_INTERPRET   # the interpreter runs kernels on the CPU; here they must run on the GPU
# torch.compile tests under pytest-xdist: without this every worker that compiles starts its own pool of inductor
# compile processes (one per CPU), 14 workers x 16 processes on the lent machine
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-1}"

# pytest-xdist (installed on the lent machine): checked once; xdist_args WORKERS [MORE...] sets XARGS to its
# arguments, or to nothing without it
HAVE_XDIST=0
if "$PY" -c "import xdist" >/dev/null 2>&1; then HAVE_XDIST=1; fi
xdist_args() { XARGS=(); if [ "$HAVE_XDIST" = 1 ]; then XARGS=(-n "$@"); fi; }

# targets_in DIR: `lorakern targets` on the results JSON a bench step wrote into DIR (its own folder), into the log
targets_in() {
    local j
    j="$(find "$1" -maxdepth 1 -name '*.json' 2>/dev/null | head -n 1)"
    if [ -n "$j" ]; then "$PY" -m lorakern targets "$j" 2>&1 | tee -a "$LOG"; fi
}

STATUS=0
# The lent machine stops a call at 600 s, and whatever is under $OUT then comes back only if it is at most 8 files
# (the packing at the end of this script): every step's limit is cut to what is left before DEADLINE_S seconds
# after the start (default 560), and a step with less than 10 s left is skipped, so the packing always runs.
START_S=$(date +%s)
DEADLINE_S="${DEADLINE_S:-560}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log its output and exit status, keep going
    local name="$1" limit="$2"; shift 2
    local left=$(( DEADLINE_S - ($(date +%s) - START_S) ))
    if [ "$left" -lt 10 ]; then
        log "=== $name: skipped, ${left}s left of DEADLINE_S=${DEADLINE_S}"
        [ $STATUS -eq 0 ] && STATUS=124
        return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    log "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "=== $name: timed out after ${limit}s (rc=$rc)"
    else
        log "=== $name: rc=$rc"
    fi
    if [ $rc -ne 0 ] && [ $STATUS -eq 0 ]; then STATUS=$rc; fi
    return 0
}
junit_counts() {  # junit_counts FILE -> "passed failed skipped", or nothing when the file is missing/broken
    "$PY" - "$1" <<'PYEOF' 2>>"$LOG"
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
failed = n["failures"] + n["errors"]
print(n["tests"] - failed - n["skipped"], failed, n["skipped"])
PYEOF
}

: >"$LOG"
log "gpu_check in $(pwd), OUT=$OUT, python=$(command -v "$PY")"
COMMIT="${LORAKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
log "commit $COMMIT (LORAKERN_COMMIT overrides git, whose copy may be stale on the lent machine);" \
    "$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified tracked files"

STEPS="${STEPS:-core}"
run_core() { [ "$STEPS" = core ] || [ "$STEPS" = all ]; }
run_tests() { [ "$STEPS" = tests ] || [ "$STEPS" = all ]; }
run_extra() { [ "$STEPS" = extra ] || [ "$STEPS" = all ]; }
run_tune() { [ "$STEPS" = tune ]; }

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    log "=== install: skipped (SKIP_INSTALL=1)"
else
    # the CPU emulation of the kernels (lorakern._C_emu) is for machines without a GPU: not built here
    step install "${INSTALL_TIMEOUT:-120}" env LORAKERN_SKIP_CUDA_EMU=1 "$PY" -m pip install --no-build-isolation \
        --no-deps -e .
fi
step nvidia-smi 30 bash -c "nvidia-smi > '$OUT/nvidia-smi.txt' 2>&1; rc=\$?; cat '$OUT/nvidia-smi.txt'; exit \$rc"
step versions 60 "$PY" -c "
import torch
import lorakern
from lorakern.backends import BACKENDS
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print('triton', triton.__version__)
except Exception as e:
    print('triton not importable:', e)
d = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
for n, b in BACKENDS.items():
    print('backend', n, b.not_supported_reasons(d, torch.bfloat16) or 'ok')"

# The grouping kernel (session 10: every plan's fill and MoE pair grouping on the GPU, for every backend) against
# the torch code it replaces, bit for bit, before any step relies on it: where it is not the same, or does not
# run, the rest of this call takes the torch code (LORAKERN_GROUP_KERNEL=0), and the log says so.
if [ "${LORAKERN_GROUP_KERNEL:-1}" != 0 ]; then
    step group-parity "${GROUP_PARITY_TIMEOUT:-90}" "$PY" -m pytest -q -p no:cacheprovider tests/test_grouping.py \
        -k on_the_gpu
    if ! grep -q "=== group-parity: rc=0" "$LOG"; then
        export LORAKERN_GROUP_KERNEL=0
        log "grouping kernel: NOT the torch code's result on this device (or did not run; see above):" \
            "LORAKERN_GROUP_KERNEL=0 for the rest of this call"
    fi
fi

if run_core; then
xdist_args "${GPU_TEST_WORKERS:-8}"  # the -m gpu tests took over 170 s in one process on an H100: spread them
GPU_XDIST=(${XARGS[@]+"${XARGS[@]}"})
step pytest-gpu "${GPU_TESTS_TIMEOUT:-200}" env LORAKERN_FAILURE_LOG="$OUT/failures-tb.txt" \
    LORAKERN_TEST_LOG="$OUT/tests-gpu-log.tsv" "$PY" -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider \
    ${GPU_XDIST[@]+"${GPU_XDIST[@]}"} --junitxml="$OUT/pytest-gpu.xml"
TESTS_ARGS=()
GPU_COUNTS="$(junit_counts "$OUT/pytest-gpu.xml")"
if [ -n "$GPU_COUNTS" ]; then
    log "tests (-m gpu): passed failed skipped = $GPU_COUNTS"
    read -r P F S <<<"$GPU_COUNTS"
    TESTS_ARGS=(--tests "$P" "$F" "$S")
fi

STAMP="$OUT/.bench-start"
: >"$STAMP"
# shellcheck disable=SC2086
step bench "${BENCH_TIMEOUT:-220}" "$PY" -m lorakern bench --device "${BENCH_DEVICE:-cuda}" --out "$OUT" \
    ${TESTS_ARGS[@]+"${TESTS_ARGS[@]}"} ${BENCH_ARGS:-}
RESULTS="$(find "$OUT" -maxdepth 1 -name '*.json' -newer "$STAMP" 2>/dev/null | head -n 1)"
rm -f "$STAMP"
if [ -n "$RESULTS" ]; then
    log "results: $RESULTS"
    "$PY" -m lorakern targets "$RESULTS" 2>&1 | tee -a "$LOG"  # issue #3's targets on this run
    if [ -n "$GPU_COUNTS" ]; then
        "$PY" -c "import sys; from lorakern.bench.harness import update_tests as u; u(sys.argv[1], *map(int, sys.argv[2:5]), scope='gpu')" \
            "$RESULTS" $GPU_COUNTS >>"$LOG" 2>&1
    fi
else
    log "results: none written by the bench step"
fi
# the gather/segment crossover (GATHER_MAX_MEAN_TOKENS): each path forced on the crossover-<m> cases, side by side
# (paths/; `targets` prints the path table; docs/cuda.md "Choices not yet measured")
if [ "${BENCH_DEVICE:-cuda}" = cuda ]; then
    step bench-paths "${PATHS_TIMEOUT:-90}" "$PY" -m lorakern bench --device cuda --out "$OUT/paths" \
        --backends cuda-gather cuda-segment cuda-fused triton-gather triton-segment --baselines none \
        --filter "crossover-"
    targets_in "$OUT/paths"
    # a plan's fill and add_lora_moe's pair grouping: the torch ops against the grouping kernel, eager and in a graph
    step bench-grouping "${GROUPING_TIMEOUT:-60}" "$PY" bench/bench_grouping.py --json "$OUT/paths/grouping.json"
fi

fi  # core

if run_tests; then
[ -n "${RESULTS:-}" ] || RESULTS="$(ls -t "$OUT"/*.json 2>/dev/null | grep -v -e '/mla-' -e '/moe-' -e '/pool-' | head -n 1)"
# -v with pytest-xdist's workers (when installed, as on the lent machine): every result line is in the log as it
# happens, so a run stopped by its time limit still names its failures (the junit file is written only at the end;
# two runs on an H100 stopped at ~90 % with failures whose names were lost)
# worksteal: the slow tests (model sizes, sanitizer, HF compile) no longer wait at the end of a worker's queue;
# failure tracebacks go to $OUT/failures-tb.txt as they happen (tests/conftest.py, LORAKERN_FAILURE_LOG)
xdist_args "${TEST_WORKERS:-14}" --dist worksteal
XDIST=(${XARGS[@]+"${XARGS[@]}"})
# $OUT/tests-log.tsv: a line per test as it finishes (outcome, seconds, node id; tests/conftest.py,
# LORAKERN_TEST_LOG), so a cut run still has its counts and its slowest tests. TESTS_DONE=<an earlier call's
# tests-log.tsv> resumes: the tests it names are deselected, and the log this call returns is both calls' (the
# earlier one's lines first), so when pytest finishes, its counts are the whole suite's.
TLOG="$OUT/tests-log.tsv"
DONE_ENV=()
if [ -n "${TESTS_DONE:-}" ]; then
    if [ -f "$TESTS_DONE" ]; then
        cp "$TESTS_DONE" "$TLOG"
        DONE_ENV=(LORAKERN_TESTS_DONE="$TESTS_DONE")
        log "resuming: $(wc -l < "$TESTS_DONE") tests already run in $TESTS_DONE are deselected"
    else
        log "TESTS_DONE=$TESTS_DONE: no such file; running the whole suite"
    fi
fi
step pytest-all "${ALL_TESTS_TIMEOUT:-560}" env LORAKERN_FAILURE_LOG="$OUT/failures-tb.txt" LORAKERN_TEST_LOG="$TLOG" \
    ${DONE_ENV[@]+"${DONE_ENV[@]}"} "$PY" -m pytest -v -rfE \
    --durations=60 -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --junitxml="$OUT/pytest-all.xml" ${TESTS_EXTRA:-}
grep -E "(FAILED|ERROR) tests/" "$LOG" | sed -E 's/^\[gw[0-9]+\] *(\[ *[0-9]+%\] *)?//' | sort -u > "$OUT/failures.txt" || true
log "failures so far: $(wc -l < "$OUT/failures.txt") (names in $OUT/failures.txt)"
[ -f "$TLOG" ] && "$PY" -m lorakern testlog "$TLOG" --slowest 40 2>&1 | tee -a "$LOG"
ALL_COUNTS="$(junit_counts "$OUT/pytest-all.xml")"
if [ -n "$ALL_COUNTS" ] && [ ${#DONE_ENV[@]} -gt 0 ]; then
    ALL_COUNTS="$("$PY" -m lorakern testlog "$TLOG" --counts 2>>"$LOG")"  # both calls together
fi
if [ -n "$ALL_COUNTS" ]; then
    log "tests (full suite): passed failed skipped = $ALL_COUNTS"
    if [ -n "$RESULTS" ]; then
        # shellcheck disable=SC2086
        "$PY" -c "import sys; from lorakern.bench.harness import update_tests as u; u(sys.argv[1], *map(int, sys.argv[2:5]), scope='all')" \
            "$RESULTS" $ALL_COUNTS >>"$LOG" 2>&1 && log "recorded the full suite's counts in $RESULTS"
    fi
else
    log "tests (full suite): not finished (no $OUT/pytest-all.xml); resume with TESTS_DONE=<this call's" \
        "tests-log.tsv, copied into the checkout> STEPS=tests"
fi
fi  # tests

if run_extra; then
    TAG="${COMMIT%%+*}"
    step bench-mla "${MLA_TIMEOUT:-150}" "$PY" bench/bench_mla.py --json "$OUT/mla-$TAG.json"
    step bench-moe "${MOE_TIMEOUT:-200}" "$PY" bench/bench_moe.py --json "$OUT/moe-$TAG.json"
    step bench-pool "${POOL_TIMEOUT:-200}" "$PY" bench/bench_pool.py --json "$OUT/pool-$TAG.json"
fi

if run_tune; then
    # shellcheck disable=SC2086
    TSTAMP="$OUT/.tune-bench-start"
    : >"$TSTAMP"
    step bench "${BENCH_TIMEOUT:-140}" "$PY" -m lorakern bench --device cuda --out "$OUT" \
        --backends ${TUNE_BACKENDS:-cuda cuda-fused triton} --baselines ${TUNE_BASELINES:-none} \
        --filter "${TUNE_FILTER:-decode-qkv distinct|decode-qkv-qwen3moe|prefill|mixed-ranks|rank-}"
    TRESULTS="$(find "$OUT" -maxdepth 1 -name '*.json' -newer "$TSTAMP" 2>/dev/null | head -n 1)"
    rm -f "$TSTAMP"
    [ -n "$TRESULTS" ] && "$PY" -m lorakern targets "$TRESULTS" 2>&1 | tee -a "$LOG"  # issue #3's targets
    # the decode family again with the L2 flushed by reading (clean lines): how much of the fit's fixed part is the
    # default write flush's dirty lines written back during the timed call (docs/cuda.md, session 9)
    step bench-read-flush "${READ_FLUSH_TIMEOUT:-70}" env LORAKERN_BENCH_FLUSH=read "$PY" -m lorakern bench \
        --device cuda --out "$OUT/read-flush" --backends cuda --baselines none \
        --filter "${READ_FLUSH_FILTER:-decode-qkv distinct|rank-8-qkv|rank-64-qkv|rank-128-qkv}"
    targets_in "$OUT/read-flush"
    if command -v ncu >/dev/null 2>&1; then
        step ncu "${NCU_TIMEOUT:-80}" bash -c "ncu --clock-control none --kernel-name regex:'segment|dense_gather' \
            --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section WarpStateStats --section LaunchStats $PY bench/ncu_case.py --calls 1 \
            --filter 'prefill uniform' 'decode-qkv distinct' > '$OUT/ncu.txt' 2>&1"
        step ncu-fused "${NCU_TIMEOUT:-80}" bash -c "ncu --clock-control none --kernel-name regex:'segment_fused' \
            --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section WarpStateStats --section LaunchStats $PY bench/ncu_case.py --calls 1 --backend cuda-fused \
            --filter 'prefill uniform' 'prefill-qkv' > '$OUT/ncu-fused.txt' 2>&1"
    fi
    step sweep "${SWEEP_TIMEOUT:-340}" env OUT="$OUT/sweep" VARIANT_TIMEOUT="${VARIANT_TIMEOUT:-40}" \
        bash bench/sweep_variants.sh ${SWEEP_VARIANTS:-default gather-guarded seg-fused seg-fused-branch seg-fused-s4 gather-prefetch gather-2cta seg-mma gather-xsmem seg-fused-s8 seg-fused-o4 gather-xsmem-prefetch gather-early-out}
    [ -f "$OUT/sweep/sweep-summary.txt" ] && cat "$OUT/sweep/sweep-summary.txt" | tee -a "$LOG"
    xdist_args "${TEST_WORKERS:-14}" --dist worksteal
    XDIST=(${XARGS[@]+"${XARGS[@]}"})
    step pytest-cuda "${TUNE_TESTS_TIMEOUT:-240}" env LORAKERN_FAILURE_LOG="$OUT/failures-tb.txt" \
        LORAKERN_TEST_LOG="$OUT/tests-cuda-log.tsv" "$PY" -m pytest -q \
        -rfE -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --junitxml="$OUT/pytest-cuda.xml" tests/test_ops_lora.py \
        tests/test_moe.py tests/test_mla.py tests/test_cuda_graphs.py tests/test_registration.py \
        -k "cuda or opcheck or moe_large"
    CUDA_COUNTS="$(junit_counts "$OUT/pytest-cuda.xml")"
    log "tests (cuda-backend op suites on the GPU): passed failed skipped = ${CUDA_COUNTS:-none (did not finish)}"
    [ -f "$OUT/tests-cuda-log.tsv" ] && "$PY" -m lorakern testlog "$OUT/tests-cuda-log.tsv" --slowest 15 2>&1 \
        | tee -a "$LOG"
fi

log "done: exit status $STATUS; results in $OUT"
ls -laR "$OUT" >>"$LOG" 2>&1
# the lent machine returns at most 8 files: with more, everything goes into one archive, and only the archive, the
# log, the summaries and the top-level results stay beside it (sub-folders and junit files are in the archive only)
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    if tar czf "/tmp/lorakern-results.tgz" -C "$OUT" .; then
        [ -f "$OUT/sweep/sweep-summary.txt" ] && cp "$OUT/sweep/sweep-summary.txt" "$OUT/"
        find "$OUT" -mindepth 1 -type d -exec rm -rf {} + 2>/dev/null
        rm -f "$OUT"/*.xml "$OUT/nvidia-smi.txt"
        mv /tmp/lorakern-results.tgz "$OUT/results.tgz"
        log "packed $(tar tzf "$OUT/results.tgz" | grep -vc '/$') files into $OUT/results.tgz; beside it: $(ls "$OUT" | tr '\n' ' ')"
    fi
fi
exit $STATUS
