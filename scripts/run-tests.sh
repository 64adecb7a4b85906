#!/usr/bin/env bash
#
# scripts/run-tests.sh -- build jobloop and run every test suite; the README's test command.
#
# On a fresh Debian 12, as root (or a user with sudo), interactively or in CI (CI=true,
# no stdin):
#
#   1. installs what is missing and builds and installs jobloop (scripts/lib.sh),
#   2. starts a throw-away PostgreSQL 15 cluster (jobloop preloaded, workers serving
#      database jobloop) and the nginx mock API on loopback,
#   3. runs, in order, each as one suite:
#        regress     make installcheck: the pg_regress tests (sql/, expected/), in
#                    database contrib_regression, which no worker serves
#        isolation   the PGXS isolation specs (test/isolation), if the Makefile lists any
#        pgtap       pg_prove on test/pgtap/*.sql, end to end in database jobloop
#                    against the mock (one suite per file)
#        tap         prove on test/isolation/check-sync.sh (the isolation specs' copies of
#                    the worker's statements still match src/store.c) and every executable
#                    test/suites/*.sh, test/crash/*.sh and test/fault/*.sh (each starts its
#                    own cluster; one suite per script)
#   4. ends with one line, "N passed, N failed", counting each pg_regress and isolation
#      test and each TAP assertion, after naming the suites that failed.
#
# Exit status: 0 only if nothing failed and at least one test ran.
# Usage:  scripts/run-tests.sh            everything
#         scripts/run-tests.sh SUITE...   only those suites: regress isolation pgtap tap
# Env:    JL_KEEP=1 leaves the cluster and the mock running afterwards (see lib.sh).

set -uo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$JL_ROOT" || exit 1

PG_CONFIG_PATH=$JL_PGBIN/pg_config
SELECTED=("$@")
(( ${#SELECTED[@]} > 0 )) || SELECTED=(regress isolation pgtap tap)
for s in "${SELECTED[@]}"; do
    case $s in
        regress|isolation|pgtap|tap) ;;
        *) jl_die "unknown suite '$s' (regress, isolation, pgtap, tap)" ;;
    esac
done
selected() {
    local s
    for s in "${SELECTED[@]}"; do [[ "$s" == "$1" ]] && return 0; done
    return 1
}

TOTAL_PASSED=0
TOTAL_FAILED=0
FAILED_SUITES=()
NEED_SERVER_LOG=
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-tests.XXXXXX") || exit 1
jl_on_exit rm -rf -- "$WORK"
START=$SECONDS

# record SUITE PASSED FAILED
record() {
    local suite=$1 passed=$2 failed=$3
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    if (( failed > 0 )); then
        FAILED_SUITES+=("$suite ($failed failed)")
    fi
    printf '==> %s: %d passed, %d failed\n' "$suite" "$passed" "$failed"
}

# The final report; every way out of this script after setup goes through it.
summary() {
    local s
    echo
    echo "==> ran for $((SECONDS - START)) s"
    if (( ${#FAILED_SUITES[@]} > 0 )); then
        echo "==> FAILED suites:"
        for s in "${FAILED_SUITES[@]}"; do
            echo "      $s"
        done
    elif (( TOTAL_PASSED + TOTAL_FAILED == 0 )); then
        echo "==> no test ran"
    fi
    echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
    if (( TOTAL_FAILED > 0 || TOTAL_PASSED == 0 )); then
        return 1
    fi
    return 0
}

# A setup step failed: count it as a failed suite and stop.
setup_failed() {
    jl_log "setup failed: $*"
    record "setup: $*" 0 1
    summary
    exit 1
}

# ---------------------------------------------------------------------------------------
# Counting

# pg_regress / pg_isolation_regress output: "test NAME ... ok 12 ms" (or "     NAME ...",
# in parallel groups); prints "PASSED FAILED".
count_regress() {
    awk '
        / \.\.\. +(ok|FAILED|failed) +\(ignored\)/   { next }
        / \.\.\. +ok( |$)/                          { ok++; next }
        / \.\.\. +(FAILED|failed)( |$)/             { bad++; next }
        END { printf "%d %d\n", ok, bad }' "$1"
}

# Verbose TAP harness output of one test file; prints "PASSED FAILED".  Each "ok N" is
# a pass (also "not ok ... # TODO"); each "not ok N" a failure; tests planned but never
# run, or run beyond the plan, count as failures too.  A file that exited non-zero with
# nothing counted as failed counts one failure.
count_tap() {
    local out=$1 rc=$2
    awk -v rc="$rc" '
        /^1\.\.[0-9]+/                  { plan = substr($0, 4) + 0; planned = 1; next }
        /^not ok( [0-9]+|$| -)/         { if ($0 ~ /# *TODO/) ok++; else bad++; next }
        /^ok( [0-9]+| -)/               { ok++; next }
        END {
            ran = ok + bad
            if (!planned)          bad++
            else if (plan > ran)   bad += plan - ran
            else if (ran > plan)   bad += ran - plan
            if (rc != 0 && bad == 0) bad = 1
            printf "%d %d\n", ok, bad
        }' "$out"
}

# ---------------------------------------------------------------------------------------
# Suites

make_var() {    # the value of a variable of our Makefile
    make --no-print-directory -s -C "$JL_ROOT" PG_CONFIG="$PG_CONFIG_PATH" \
        -f Makefile -f - "print-$1" 2>/dev/null <<EOF
print-%:
	@echo \$(\$*)
EOF
}

run_regress() {
    local out=$WORK/regress.out rc passed failed
    echo
    echo "######## regress: make installcheck (pg_regress: $(make_var REGRESS))"
    rm -f regression.diffs regression.out
    make --no-print-directory -C "$JL_ROOT" PG_CONFIG="$PG_CONFIG_PATH" ISOLATION= installcheck 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    read -r passed failed <<<"$(count_regress "$out")"
    if (( rc != 0 && failed == 0 )); then failed=1; fi
    if (( failed > 0 )); then
        echo "==> regress: regression.diffs:"
        cat regression.diffs 2>/dev/null || echo "(no regression.diffs)"
        NEED_SERVER_LOG=1
    fi
    record regress "$passed" "$failed"
}

run_isolation() {
    local out=$WORK/isolation.out rc passed failed specs
    specs=$(make_var ISOLATION)
    echo
    if [[ -z "$specs" ]]; then
        echo "######## isolation: the Makefile lists no ISOLATION specs; skipped"
        return 0
    fi
    echo "######## isolation: make installcheck (pg_isolation_regress: $specs)"
    rm -rf output_iso/regression.diffs
    make --no-print-directory -C "$JL_ROOT" PG_CONFIG="$PG_CONFIG_PATH" REGRESS= installcheck 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    read -r passed failed <<<"$(count_regress "$out")"
    if (( rc != 0 && failed == 0 )); then failed=1; fi
    if (( failed > 0 )); then
        echo "==> isolation: output_iso/regression.diffs:"
        cat output_iso/regression.diffs 2>/dev/null || echo "(no output_iso/regression.diffs)"
        NEED_SERVER_LOG=1
    fi
    record isolation "$passed" "$failed"
}

# run_tap SUITE HARNESS_CMD... FILE: one file under a TAP harness, verbose.
run_tap() {
    local suite=$1 out rc passed failed
    shift
    out=$WORK/$(echo "$suite" | tr '/ ' '__').out
    echo
    echo "######## $suite"
    "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    read -r passed failed <<<"$(count_tap "$out" "$rc")"
    record "$suite" "$passed" "$failed"
    (( failed == 0 ))
}

run_pgtap() {
    local f found=
    # The pgTAP files find the mock through these settings (see test/pgtap/lib.psql).
    jl_psql -d jobloop <<SQL || setup_failed "could not configure database jobloop for pgTAP"
ALTER DATABASE jobloop SET test.mock_url = '$JL_MOCK_URL';
ALTER DATABASE jobloop SET test.mock_url2 = '$JL_MOCK_URL2';
ALTER DATABASE jobloop SET test.mock_log = '$JL_MOCK_LOG';
ALTER DATABASE jobloop SET test.mock_log2 = '$JL_MOCK_LOG2';
SQL
    for f in test/pgtap/*.sql; do
        [[ -f "$f" ]] || continue
        found=1
        run_tap "pgtap $f" pg_prove --verbose --host 127.0.0.1 --port "$PGPORT" \
            --username postgres --dbname jobloop "$f" || NEED_SERVER_LOG=1
    done
    [[ -n "$found" ]] || echo "==> no test/pgtap/*.sql"
}

run_scripts() {
    local f found=
    for f in test/isolation/check-sync.sh test/suites/*.sh test/crash/*.sh test/fault/*.sh; do
        # Only executable scripts are suites (helpers such as common.sh are sourced).
        [[ -f "$f" && -x "$f" ]] || continue
        found=1
        run_tap "tap $f" prove --verbose --merge "$f" || true
    done
    [[ -n "$found" ]] || echo "==> no executable test/{suites,crash,fault}/*.sh"
}

# ---------------------------------------------------------------------------------------
# Main

# shellcheck disable=SC2119  # (lib.sh functions take optional arguments; none here)
jl_install_deps || setup_failed "installing dependencies"
jl_build || setup_failed "building jobloop"

if selected regress || selected isolation || selected pgtap; then
    # shellcheck disable=SC2119
    jl_cluster_start || setup_failed "starting PostgreSQL"
    if selected pgtap; then
        jl_mock_start || setup_failed "starting the mock API"
    fi
fi

selected regress && run_regress
selected isolation && run_isolation
selected pgtap && run_pgtap

if [[ -n "$NEED_SERVER_LOG" && -n "${JL_PGLOG:-}" ]]; then
    echo
    echo "==> last 60 lines of the server log ($JL_PGLOG):"
    tail -n 60 "$JL_PGLOG"
fi
# The script suites start their own clusters; free this one's memory and ports first.
if [[ -n "${JL_PGDATA:-}" && "${JL_KEEP:-}" != 1 ]]; then
    [[ -n "${JL_MOCK_DIR:-}" ]] && jl_mock_stop
    jl_cluster_stop
fi

selected tap && run_scripts

summary
