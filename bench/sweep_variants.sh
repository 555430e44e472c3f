#!/usr/bin/env bash
# The kernels' compile-time tuning variants, timed side by side on a GPU in one call (a tuning aid: the recorded
# benchmark is `python -m lorakern bench`). For each variant: rebuild lorakern._C with its LORAKERN_NVCC_DEFINES
# (the macros at the top of csrc/include/lorakern/dense_segment.cuh and dense_gather.cuh; one arch, ~10-20 s) over
# the installed module, then bench/profile_add_lora.py on the cases the variant concerns: graph time, kernel times,
# and the result checked against the float64 reference (a wrong result is printed as WRONG, never hidden). The
# default build is put back at the end.
#
#   LORAKERN_CUDA_ARCHS=90a OUT=<dir> bash bench/sweep_variants.sh [variant ...]    (default: all of them)
#
# Needs the package installed in place (pip install --no-build-isolation --no-deps -e .). Writes
# $OUT/sweep-<variant>.txt / .json and $OUT/sweep-summary.txt. VARIANT_TIMEOUT (default 60 s) bounds each profile.
# Every build is made first, BUILD_JOBS at a time (default: half the CPUs; each build compiles its four translation
# units in parallel, so the CPUs stay busy through each build's slowest unit; one build per distinct set of
# macros), so that the profiles run on an idle CPU and the builds cost the lent machine ~30 s in all instead of
# ~10 s per variant.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
unset TRITON_INTERPRET
SO="$("$PY" -c "import lorakern._C as m; print(m.__file__)" 2>/dev/null)"
if [ -z "$SO" ]; then
    echo "sweep_variants: lorakern._C is not installed (pip install --no-build-isolation --no-deps -e .)" >&2
    exit 2
fi
WORK="$(mktemp -d)"

SEG_CASES=("prefill uniform" "prefill-qkv")
# three ranks (sweep_summary.py fits fixed + rate) and the mixed-ranks batch (its excess over that fit: one CTA's
# critical path, docs/cuda.md session 9)
DEC_CASES=("rank-8-qkv" "decode-qkv distinct" "rank-128-qkv" "mixed-ranks-qkv distinct")
declare -A DEFS KIND ENVS
# add NAME "MACROS" KIND ["ENV=VALUE ..."]: a build (MACROS for LORAKERN_NVCC_DEFINES) and, optionally, run-time
# settings of the profile (a variant with no macros reuses the default build)
add() { DEFS[$1]="$2"; KIND[$1]="$3"; ENVS[$1]="${4:-}"; ORDER+=("$1"); }
ORDER=()
add default "" both
add seg-k128-s3 "LORAKERN_SEG_SK=128 LORAKERN_SEG_STAGES=3" seg
add seg-k64-s3 "LORAKERN_SEG_STAGES=3" seg
add seg-bf16-2terms "LORAKERN_SEG_BF16_TERMS=2" seg
add seg-mma "LORAKERN_SEG_MMA=1" seg
add seg-fused "" seg "LORAKERN_CUDA_SEGMENT=fused"
add seg-fused-s4 "LORAKERN_FUSED_DEEP_STAGES=0" seg "LORAKERN_CUDA_SEGMENT=fused"
add seg-fused-s8 "LORAKERN_FUSED_DEEP_STAGES=8" seg "LORAKERN_CUDA_SEGMENT=fused"
add seg-fused-o4 "LORAKERN_FUSED_OSTAGES=4" seg "LORAKERN_CUDA_SEGMENT=fused"
add seg-fused-branch "LORAKERN_FUSED_BLOCK_BRANCH=1" seg "LORAKERN_CUDA_SEGMENT=fused"
add gather-xsmem "LORAKERN_GATHER_X_SMEM=1" dec
add gather-prefetch "LORAKERN_GATHER_PREFETCH=1" dec
add gather-xsmem-prefetch "LORAKERN_GATHER_X_SMEM=1 LORAKERN_GATHER_PREFETCH=1" dec
add gather-guarded "LORAKERN_GATHER_GUARDED_SHRINK=1" dec
add gather-2cta "LORAKERN_GATHER_DECODE_CTAS=2" dec
add gather-early-out "LORAKERN_GATHER_EARLY_OUT=1" dec

WANT=()
for v in "${@:-${ORDER[@]}}"; do
    if [ -z "${KIND[$v]+x}" ]; then
        echo "sweep_variants: unknown variant $v (known: ${ORDER[*]})" >&2
    else
        WANT+=("$v")
    fi
done
# The builds, all before the first profile: one per distinct LORAKERN_NVCC_DEFINES (BUILD_OF: variant -> the
# variant whose build it uses; "default" always, to put back at the end), BUILD_JOBS at a time.
declare -A BUILD_OF BUILT_FOR
BUILDS=()
for v in default "${WANT[@]}"; do
    d="k:${DEFS[$v]}"  # (bash refuses an empty key)
    if [ -z "${BUILT_FOR[$d]+x}" ]; then BUILT_FOR[$d]="$v"; BUILDS+=("$v"); fi
    BUILD_OF[$v]="${BUILT_FOR[$d]}"
done
build_one() {  # build_one VARIANT: $WORK/VARIANT/_C.so, its log in $OUT/sweep-VARIANT.build.txt, rc in $WORK/VARIANT/rc
    mkdir -p "$WORK/$1"
    LORAKERN_NVCC_DEFINES="${DEFS[$1]}" timeout 300 "$PY" tools/cuda_build.py "$WORK/$1/_C.so" \
        > "$OUT/sweep-$1.build.txt" 2>&1
    echo $? > "$WORK/$1/rc"
}
NCPU="$(nproc 2>/dev/null || echo 4)"
BUILD_JOBS="${BUILD_JOBS:-$(( NCPU / 2 > 0 ? NCPU / 2 : 1 ))}"
T0=$(date +%s)
for v in "${BUILDS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$BUILD_JOBS" ]; do wait -n; done
    build_one "$v" &
done
wait
echo "=== builds: ${#BUILDS[@]} in $(( $(date +%s) - T0 )) s, $BUILD_JOBS at a time"

for v in "${WANT[@]}"; do
    echo "=== $v: LORAKERN_NVCC_DEFINES='${DEFS[$v]}' ${ENVS[$v]}"
    b="${BUILD_OF[$v]}"
    if [ "$(cat "$WORK/$b/rc" 2>/dev/null)" != 0 ]; then
        echo "    build failed (or a ptxas warning): $OUT/sweep-$b.build.txt"; tail -3 "$OUT/sweep-$b.build.txt"
        continue
    fi
    cp "$WORK/$b/_C.so" "$SO"
    cases=()
    case "${KIND[$v]}" in
        seg) cases=("${SEG_CASES[@]}") ;;
        dec) cases=("${DEC_CASES[@]}") ;;
        *) cases=("${SEG_CASES[@]}" "${DEC_CASES[@]}") ;;
    esac
    # shellcheck disable=SC2086
    env ${ENVS[$v]} timeout "${VARIANT_TIMEOUT:-60}" "$PY" bench/profile_add_lora.py --quick --backends cuda --json "$OUT/sweep-$v.json" \
        --filter "${cases[@]}" 2>&1 | grep -v -e "UserWarning" -e "_warn_once" | tee "$OUT/sweep-$v.txt"
done

# put the default build back
if [ "$(cat "$WORK/default/rc" 2>/dev/null)" = 0 ]; then
    cp "$WORK/default/_C.so" "$SO"
else
    LORAKERN_NVCC_DEFINES="" "$PY" tools/cuda_build.py "$WORK/default/_C.so" >/dev/null 2>&1 && cp "$WORK/default/_C.so" "$SO"
fi
rm -rf "$WORK"

"$PY" bench/sweep_summary.py "$OUT" "${WANT[@]}" | tee "$OUT/sweep-summary.txt"
