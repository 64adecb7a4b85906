#!/usr/bin/env bash
#
# test/fuzz/run.sh -- build the libFuzzer targets and run each for a bounded time.
#
# The parsers that need no backend -- jobloop.allowed_hosts and address classification
# (src/engine/allowlist.c), the response header block and Retry-After (src/engine/headers.c) -- read
# what a superuser typed or an API sent, inside a server process; the messages of a turn
# (src/engine/wire.c) are what jobloop-worker and the server send each other.  Each has a target here
# that feeds it arbitrary bytes under ASan and UBSan and checks its invariants (see the
# comment at the top of each fuzz_*.c).
#
# Prints TAP, one test per target, e.g.
#   1..3
#   # fuzz_allowlist: 1081234 runs in 20 s, 54061 exec/s, corpus 19 -> 412 inputs
#   ok 1 - fuzz_allowlist: 1081234 runs, no crash
# A target that crashes, breaks an invariant, leaks, hangs on one input or runs out of
# memory is "not ok", followed by "#" lines: the sanitizer's report, where the reproducer
# was kept, its bytes, and the command that replays it.  Exit status 0 only if every
# target built and ran clean.
#
# Usage:  bash test/fuzz/run.sh [TARGET...]           every target, or only those named
#         bash test/fuzz/run.sh --repro TARGET FILE   run one input once (a reproducer)
# Env:    FUZZ_SECONDS    seconds per target (default 20); 0 runs only the seed corpus
#         FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 10)
#         FUZZ_ARTIFACTS  where reproducers are kept (default ${TMPDIR:-/tmp}/jobloop-fuzz)
#
# Every run starts from a fresh copy of test/fuzz/corpus/TARGET in a temp dir, so what
# libFuzzer finds never changes the committed seeds.  (To add a seed, put the file there
# by hand.)  Needs clang-14 and libclang-rt-14-dev (libFuzzer and the sanitizer
# runtimes): when they are missing they are installed through scripts/lib.sh, as root or
# with sudo; nothing else is.

set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$JL_ROOT/test/tap.sh"

cd "$JL_ROOT"

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_ARTIFACTS=${FUZZ_ARTIFACTS:-${TMPDIR:-/tmp}/jobloop-fuzz}
[[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]] || jl_die "FUZZ_SECONDS must be a whole number of seconds"
[[ "$FUZZ_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || jl_die "FUZZ_TIMEOUT must be a whole number of seconds > 0"

PG_CONFIG_BIN=${JL_PGBIN:-/usr/lib/postgresql/15/bin}/pg_config
[[ -x "$PG_CONFIG_BIN" ]] || PG_CONFIG_BIN=pg_config
PKGLIBDIR=$("$PG_CONFIG_BIN" --pkglibdir)
INCLUDEDIR_SERVER=$("$PG_CONFIG_BIN" --includedir-server)

# target -> the sources it links, the libraries, the longest input (-max_len).  The header
# block's longest is http.c's cap on it (MAX_HEADER_BYTES); a setting or a Retry-After
# value longer than 4 kB tells nothing a shorter one does not.
declare -A SOURCES=(
    [fuzz_allowlist]="src/engine/allowlist.c"
    [fuzz_headers]="src/engine/headers.c"
    [fuzz_retry_after]="src/engine/headers.c"
    [fuzz_wire]="src/engine/wire.c"
)
declare -A LIBS=(
    [fuzz_allowlist]=""
    [fuzz_headers]="-lcurl"
    [fuzz_retry_after]="-lcurl"
    [fuzz_wire]="-L$PKGLIBDIR -lpgcommon -lpgport"
)
declare -A MAX_LEN=(
    [fuzz_allowlist]=4096
    [fuzz_headers]=262144
    [fuzz_retry_after]=4096
    [fuzz_wire]=65536
)
# wire.c is built as jobloop-worker builds it: a frontend (palloc, StringInfo from libpgcommon)
declare -A EXTRA_CFLAGS=(
    [fuzz_allowlist]=""
    [fuzz_headers]=""
    [fuzz_retry_after]=""
    [fuzz_wire]="-DFRONTEND -I$INCLUDEDIR_SERVER -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers -Wno-ignored-attributes"
)
ALL_TARGETS=(fuzz_allowlist fuzz_headers fuzz_retry_after fuzz_wire)

# -fno-sanitize-recover: a UBSan finding (an overflow, a bad shift) must stop the run
# like an ASan one, or libFuzzer would print it and go on.  -D_GNU_SOURCE and -std=c11
# as in the extension's build (PostgreSQL's flags).
CFLAGS=('-fsanitize=fuzzer,address,undefined' -fno-sanitize-recover=all -g -O1
        -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Isrc/engine -Isrc/server -Itest/fuzz)

REPRO=
if [[ "${1:-}" == --repro ]]; then
    [[ $# -eq 3 && -f "$3" ]] || jl_die "usage: $0 --repro TARGET FILE"
    REPRO=$3
    set -- "$2"
fi
TARGETS=("$@")
(( ${#TARGETS[@]} > 0 )) || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [[ -n "${SOURCES[$t]+set}" ]] || jl_die "unknown target '$t' (${ALL_TARGETS[*]})"
done

# libFuzzer's runtime ships in libclang-rt-14-dev, apart from the compiler.
have_clang() {
    command -v clang-14 >/dev/null 2>&1 \
        && compgen -G "/usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a" >/dev/null
}
if ! have_clang; then
    # jl_install_deps with no JL_DEPS of its own: these two packages, nothing else
    ( JL_DEPS=(); jl_install_deps clang-14 libclang-rt-14-dev ) >&2 \
        || tap_bail "clang-14 and libclang-rt-14-dev are needed and could not be installed"
    have_clang || tap_bail "clang-14 with libFuzzer is still missing after the install"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-fuzz-run.XXXXXX")
jl_on_exit rm -rf -- "$WORK"
mkdir -p "$FUZZ_ARTIFACTS"

# build TARGET: the binary at $WORK/TARGET; on failure, the compiler's output as the diag.
build() {
    local t=$1 libs extra
    read -r -a libs <<<"${LIBS[$t]}"
    read -r -a extra <<<"${EXTRA_CFLAGS[$t]}"
    # shellcheck disable=SC2086  # SOURCES holds a list of files
    clang-14 "${CFLAGS[@]}" "${extra[@]}" -o "$WORK/$t" "test/fuzz/$t.c" ${SOURCES[$t]} "${libs[@]}" \
        >"$WORK/$t.build" 2>&1
}

# What to show of a failed run: the report (from the first sanitizer or CHECK line), the
# reproducer and its bytes.
failure_diag() {
    local t=$1 log=$2 unit=${3:-} first size
    first=$(grep -n -m1 -E '^fuzz: |^==[0-9]+==|runtime error|^ALARM|out-of-memory' \
        "$log" | cut -d: -f1 || true)
    if [[ -n "$first" ]]; then
        # the report without libFuzzer's own frames and progress lines
        sed -n "$first,\$p" "$log" \
            | grep -v -E '^(MS:|base unit:|#[0-9]+|stat::)| in (fuzzer::|__libc_start|_start )' \
            | head -n 60 || true
    else
        tail -n 40 "$log"
    fi
    [[ -n "$unit" ]] || unit=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [[ -n "$unit" && -f "$unit" ]]; then
        size=$(stat -c %s "$unit")
        echo "reproducer: $unit ($size bytes), first 256 bytes:"
        od -A d -t x1z -v -N 256 "$unit"
        echo "replay: bash test/fuzz/run.sh --repro $t $unit"
    else
        echo "no reproducer was written (log: see above)"
    fi
}

# run TARGET: fuzz for FUZZ_SECONDS from a copy of its seeds; prints a TAP line.
run() {
    local t=$1
    local log=$WORK/$t.log corpus=$WORK/$t.corpus rc start elapsed runs rate seeds found
    local -a limit
    mkdir -p "$corpus"
    cp test/fuzz/corpus/"$t"/* "$corpus"/
    seeds=$(find "$corpus" -type f | wc -l)
    if (( FUZZ_SECONDS > 0 )); then
        limit=(-max_total_time="$FUZZ_SECONDS")
    else
        limit=(-runs=0)             # the seeds once each, no mutation
    fi
    start=$SECONDS
    # -timeout bounds one input; timeout(1) bounds the whole run should libFuzzer itself hang.
    set +e
    timeout -k 10 $((FUZZ_SECONDS + FUZZ_TIMEOUT + 120)) "$WORK/$t" \
        "${limit[@]}" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=2048 -max_len="${MAX_LEN[$t]}" \
        -dict="test/fuzz/$t.dict" -artifact_prefix="$FUZZ_ARTIFACTS/$t-" -print_final_stats=1 \
        "$corpus" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$((SECONDS - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    found=$(find "$corpus" -type f | wc -l)
    tap_diag "$t: ${runs:-?} runs in $elapsed s, ${rate:-?} exec/s, corpus $seeds -> $found inputs"
    if (( rc == 0 )) && [[ -n "$runs" ]]; then
        tap_ok 0 "$t: $runs runs, no crash"
    elif (( rc == 124 || rc == 137 )); then
        tap_ok 1 "$t: libFuzzer did not stop on time" "$(tail -n 40 "$log")"
    else
        tap_ok 1 "$t: crashed after ${runs:-?} runs (exit $rc)" "$(failure_diag "$t" "$log")"
    fi
}

# repro TARGET FILE: one input, once.
repro() {
    local t=$1 file=$2
    local log=$WORK/$t.log rc
    set +e
    "$WORK/$t" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=2048 "$file" >"$log" 2>&1
    rc=$?
    set -e
    if (( rc == 0 )); then
        tap_ok 0 "$t: $file runs clean"
    else
        tap_ok 1 "$t: $file fails (exit $rc)" "$(failure_diag "$t" "$log" "$file")"
    fi
}

tap_plan "${#TARGETS[@]}"
for t in "${TARGETS[@]}"; do
    if ! build "$t"; then
        tap_ok 1 "$t: does not build" "$(cat "$WORK/$t.build")"
    elif [[ -n "$REPRO" ]]; then
        repro "$t" "$REPRO"
    else
        run "$t"
    fi
done
tap_done
