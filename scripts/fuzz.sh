#!/usr/bin/env bash
# Coverage-guided fuzzing of the launcher (fuzz/fuzz_<target>.py, atheris).
#
#   scripts/fuzz.sh [--minutes N] [--jit] [--seed S] [TARGET...]
#
# Targets: vring packed blk rng net console pci decode loader warm snapshot vsock (default: all), N minutes
# each (default 1).  Per target:
#   1. fuzz, starting from the committed seeds (fuzz/corpus/<t>); the kernels
#      run as plain Python (NUMBA_DISABLE_JIT=1) under atheris so their own
#      lines steer the mutation.  --jit fuzzes the compiled kernels instead
#      (many more inputs, coverage from the harness only).  Inputs finding
#      new coverage go to $FUZZ_WORK/corpus/<t>, never into the repo;
#   2. replay every corpus input under NUMBA_DISABLE_JIT=1 and under Numba in
#      separate processes and compare their digests (the compiled kernels
#      must do what the Python ones do).
# --seed S fixes libFuzzer's random seed (CI's smoke uses one, so a run there
# repeats the same mutations; campaigns leave it random to explore more).
# Figures per target go to $FUZZ_WORK/<t>.summary; a crash or a replay
# difference fails the script (the input is kept in $FUZZ_WORK/crash-<t>-*).
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=1
jit=0
seed=()
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --minutes=*) minutes="${1#*=}"; shift ;;
        --jit) jit=1; shift ;;
        --seed) seed=(-seed="$2"); shift 2 ;;
        --seed=*) seed=(-seed="${1#*=}"); shift ;;
        -h|--help) sed -n 2,20p "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(vring packed blk rng net console pci decode loader warm snapshot vsock)
work="${FUZZ_WORK:-${TMPDIR:-/tmp}/lguest-jit-fuzz}"
mkdir -p "$work"
seconds=$(python3 -c "print(max(1, int(float('$minutes') * 60)))")
status=0
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_$t.py" ] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
    mkdir -p "$work/corpus/$t"
    log="$work/$t.log"
    mode=pure; [ $jit = 1 ] && mode=jit
    if [ $jit = 1 ]; then env_jit=0; else env_jit=1; fi
    NUMBA_DISABLE_JIT=$env_jit python3 -m fuzz.run "$t" -max_total_time="$seconds" -timeout=60 \
        -rss_limit_mb=4096 -print_final_stats=1 "${seed[@]}" -artifact_prefix="$work/crash-$t-" \
        "$work/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    NUMBA_DISABLE_JIT=1 python3 -m "fuzz.fuzz_$t" --replay "$work/corpus/$t" "fuzz/corpus/$t" \
        >"$work/$t.replay-pure" 2>"$work/$t.replay-pure.err"
    rp=$?
    NUMBA_DISABLE_JIT=0 python3 -m "fuzz.fuzz_$t" --replay "$work/corpus/$t" "fuzz/corpus/$t" \
        >"$work/$t.replay-jit" 2>"$work/$t.replay-jit.err"
    rj=$?
    same=yes; cmp -s "$work/$t.replay-pure" "$work/$t.replay-jit" || same=no
    stat() { grep -o "stat::$1: *[0-9.]*" "$log" | tail -1 | awk '{print $2}'; }
    {
        echo "target=$t mode=$mode seconds=$seconds"
        echo "inputs_run=$(stat number_of_executed_units)"
        echo "new_coverage_inputs=$(stat new_units_added)"
        echo "corpus_size=$(ls "$work/corpus/$t" | wc -l)"
        echo "slowest_input_s=$(stat slowest_unit_time_sec)"
        echo "fuzz_exit=$rc replay_pure_exit=$rp replay_jit_exit=$rj jit_matches_pure=$same"
        echo "replayed=$(wc -l <"$work/$t.replay-jit") $(cat "$work/$t.replay-jit.err" | grep slowest)"
    } | tee "$work/$t.summary"
    if [ $rc != 0 ] || [ $rp != 0 ] || [ $rj != 0 ] || [ $same != yes ]; then
        echo "fuzz.sh: $t FAILED (see $log, $work/$t.replay-*)" >&2
        grep -m5 -E "Error|Traceback|assert|FAIL" "$log" "$work/$t.replay-jit" >&2 || true
        status=1
    fi
done
exit $status
