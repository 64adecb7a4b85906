#!/usr/bin/env bash
#
# scripts/run-tests.sh -- build jobloop and run every test suite; the README's test command.
#
# By default it runs everything on each PostgreSQL version jobloop supports, 15, 17 and
# 18: scripts/matrix.sh runs this script once per version, natively for the one this
# Debian ships and in a debootstrap'd chroot for the others, prints one summary line per
# version and ends with the total.  JL_PG_VERSIONS=15 (any list) narrows it; for a single
# version that is this system's, the run is as below, with no chroot.
#
# On a fresh Debian 12, as root (or a user with sudo), interactively or in CI (CI=true,
# no stdin):
#
#   1. installs what is missing and builds and installs jobloop (scripts/lib.sh),
#   2. starts a throw-away PostgreSQL cluster (jobloop preloaded, workers serving
#      database jobloop) and the nginx mock API on loopback,
#   3. runs, in order, each as one suite:
#        regress     make installcheck: the pg_regress tests (sql/, expected/), in
#                    database contrib_regression, which no worker serves
#        isolation   the PGXS isolation specs (test/isolation), if the Makefile lists any
#        pgtap       pg_prove on test/pgtap/*.sql, end to end in database jobloop
#                    against the mock (one suite per file)
#        tap         prove on test/isolation/check-sync.sh (the isolation specs' copies of
#                    the worker's statements still match src/server/store.c) and every executable
#                    test/suites/*.sh, test/crash/*.sh, test/fault/*.sh and test/chaos/*.sh
#                    (each starts its own cluster; one suite per script)
#        fuzz        test/fuzz/run.sh: the libFuzzer targets of the parsers that need no
#                    backend (allowed_hosts, response headers, Retry-After), 20 s each;
#                    natively only (not again in each version's chroot)
#        memcheck    jobloop built with AddressSanitizer into a private installation (the
#                    system's is not touched; JL_SANITIZE in scripts/lib.sh), and under it
#                    the pgTAP files and the TAP suites again (and test/chaos/*.sh; not
#                    MEMCHECK_SKIP, below); after each, one more suite with a failed test
#                    per distinct ASan report or crash (a process that died of a signal
#                    other than the suites' kill -9); after the first findings the rest
#                    is skipped
#        package     test/package/package.sh: the Debian package postgresql-N-jobloop built
#                    with pg_buildext (debian/), installed with apt in place of `make
#                    install`'s files, and a job loop run from it (about 30 s); natively
#                    also test/package/dist.sh: META.json against PGXN's spec and
#                    jobloop.control, and `make dist`
#   4. ends with one line, "N passed, N failed", counting each pg_regress and isolation
#      test and each TAP assertion, after naming the suites that failed.
#
# Exit status: 0 only if nothing failed and at least one test ran.
# Usage:  scripts/run-tests.sh            everything
#         scripts/run-tests.sh SUITE...   only those suites: regress isolation pgtap tap
#                                         fuzz memcheck package
# Env:    JL_PG_VERSIONS="15 17 18" the PostgreSQL versions to run (scripts/matrix.sh).
#         JL_KEEP=1 leaves the cluster and the mock running afterwards (see lib.sh).

set -uo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$JL_ROOT" || exit 1

PG_CONFIG_PATH=$JL_PGBIN/pg_config
SELECTED=("$@")
# The fuzz targets test code that does not depend on PostgreSQL (allowlist.c, headers.c):
# they run once, natively, not again in each version's chroot.
if (( ${#SELECTED[@]} == 0 )); then
    SELECTED=(regress isolation pgtap tap memcheck package)
    [[ -n "${JL_IN_CHROOT:-}" ]] || SELECTED+=(fuzz)
fi
for s in "${SELECTED[@]}"; do
    case $s in
        regress|isolation|pgtap|tap|memcheck|fuzz|package) ;;
        *) jl_die "unknown suite '$s' (regress, isolation, pgtap, tap, memcheck, fuzz, package)" ;;
    esac
done
selected() {
    local s
    for s in "${SELECTED[@]}"; do [[ "$s" == "$1" ]] && return 0; done
    return 1
}

# Several PostgreSQL versions (by default 15, 17 and 18), or another than this system's:
# scripts/matrix.sh runs this script once per version, natively or in a chroot.
if jl_matrix_wanted; then
    exec bash "$JL_ROOT/scripts/matrix.sh" "$@"
fi

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
    # PostgreSQL 16 and later print "ok 1 - NAME  12 ms" ("+" in parallel groups) and
    # "not ok 2 - NAME  12 ms" instead.
    awk '
        / \.\.\. +(ok|FAILED|failed) +\(ignored\)/   { next }
        / \.\.\. +ok( |$)/                          { ok++; next }
        / \.\.\. +(FAILED|failed)( |$)/             { bad++; next }
        /^(not )?ok +[0-9]+ +[-+] .*# *\(?ignored/   { next }
        /^ok +[0-9]+ +[-+] /                        { ok++; next }
        /^not ok +[0-9]+ +[-+] /                    { bad++; next }
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

# run_pgtap [LABEL]: every pgTAP file against the cluster and mock of this shell, each a
# suite named "[LABEL ]pgtap FILE".
run_pgtap() {
    local label=${1:+$1 } f found=
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
        run_tap "${label}pgtap $f" pg_prove --verbose --host 127.0.0.1 --port "$PGPORT" \
            --username postgres --dbname jobloop "$f" || NEED_SERVER_LOG=1
    done
    [[ -n "$found" ]] || echo "==> no test/pgtap/*.sql"
}

run_scripts() {
    local f found=
    for f in test/isolation/check-sync.sh test/suites/*.sh test/crash/*.sh test/fault/*.sh \
             test/chaos/*.sh; do
        # Only executable scripts are suites (helpers such as common.sh are sourced).
        [[ -f "$f" && -x "$f" ]] || continue
        found=1
        run_tap "tap $f" prove --verbose --merge "$f" || true
    done
    [[ -n "$found" ]] || echo "==> no executable test/{suites,crash,fault,chaos}/*.sh"
}

# memcheck: after the pgTAP files, the executable suite scripts that start a server run
# again under ASan (test/chaos/ too; check-sync.sh starts none), but those of
# MEMCHECK_SKIP.  ASan sees malloc'd memory (libcurl's buffers, the HTTP engine's),
# jobloop's stack and globals, and every fatal signal; not shared memory, nor palloc'd
# memory inside PostgreSQL's blocks.  The skipped suites exercise little else (shared-memory
# rate limits, claim order, SQL upgrade scripts) and spend their time waiting (80 s of the
# 5 minutes all suites took).  The rest takes about 4 minutes.
MEMCHECK_SCRIPTS=(test/suites/*.sh test/crash/*.sh test/fault/*.sh test/chaos/*.sh)
MEMCHECK_SKIP=(test/suites/limits.sh test/suites/fairness.sh test/suites/upgrade.sh)

# memcheck_verdict LABEL [LOG...]: one suite, "LABEL: ASan reports and crashes", with one
# failed test per distinct finding of jl_sanitize_findings (ASan reports; crashes in LOGs
# or, by default, in the server logs the suite's clusters left), else one passed test.
# The evidence then moves to judged/, so each suite is judged by its own.  Status 1 if
# anything was found.
memcheck_verdict() {
    local label=$1 out=$WORK/memcheck-findings.out found
    shift
    jl_sanitize_findings "$@" >"$out" 2>&1
    found=$JL_SANITIZE_FOUND
    if (( found > 0 )); then
        echo "==> $label: AddressSanitizer reports or crashes:"
        cat "$out"
        record "$label: ASan reports and crashes" 0 "$found"
    else
        record "$label: ASan reports and crashes" 1 0
    fi
    mkdir -p "$JL_SANITIZE_DIR/judged"
    find "$JL_SANITIZE_DIR/reports" "$JL_SANITIZE_DIR/logs" -maxdepth 1 -type f \
        -exec mv -t "$JL_SANITIZE_DIR/judged" -- {} +
    (( found == 0 ))
}

run_memcheck() {
    local t0=$SECONDS t f pglog="" clean=1
    echo
    echo "######## memcheck: jobloop under AddressSanitizer"
    # Under $WORK (removed at exit), which postgres must be able to traverse.
    chmod 0755 "$WORK"
    export JL_SANITIZE=address JL_SANITIZE_DIR=$WORK/asan
    if ! jl_build; then
        record "memcheck: building jobloop with AddressSanitizer" 0 1
        unset JL_SANITIZE JL_SANITIZE_DIR
        return 0
    fi

    t=$SECONDS
    # shellcheck disable=SC2119
    if jl_cluster_start && pglog=$JL_PGLOG && jl_mock_start; then
        run_pgtap memcheck
        if [[ "${JL_KEEP:-}" != 1 ]]; then
            jl_mock_stop
            jl_cluster_stop
        fi
    else
        record "memcheck: starting PostgreSQL and the mock API under ASan" 0 1
    fi
    memcheck_verdict "memcheck pgtap" ${pglog:+"$pglog"} || clean=
    echo "==> memcheck pgtap: $((SECONDS - t)) s"

    for f in "${MEMCHECK_SCRIPTS[@]}"; do
        [[ -f "$f" && -x "$f" ]] || continue
        [[ " ${MEMCHECK_SKIP[*]} " == *" $f "* ]] && continue
        if [[ -z "$clean" ]]; then
            # A worker that dies of a memory error makes every suite wait out its
            # deadlines (minutes each); the first reports are the ones to read.
            echo "==> memcheck: $f skipped after the findings above"
            continue
        fi
        t=$SECONDS
        run_tap "memcheck tap $f" prove --verbose --merge "$f" || true
        memcheck_verdict "memcheck tap $f" || clean=
        echo "==> memcheck $f: $((SECONDS - t)) s"
    done
    unset JL_SANITIZE JL_SANITIZE_DIR
    echo "==> memcheck ran for $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------------------
# Main

# shellcheck disable=SC2119  # (lib.sh functions take optional arguments; none here)
jl_install_deps || setup_failed "installing dependencies"
# (memcheck builds its own variant, and leaves the system's installation alone)
if selected regress || selected isolation || selected pgtap || selected tap; then
    jl_build || setup_failed "building jobloop"
fi

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
selected fuzz && { run_tap "fuzz test/fuzz/run.sh" prove --verbose --merge test/fuzz/run.sh || true; }
selected memcheck && run_memcheck
if selected package; then
    run_tap "package test/package/package.sh" prove --verbose --merge test/package/package.sh || true
    # make dist archives the git checkout, which a version's chroot does not get.
    [[ -n "${JL_IN_CHROOT:-}" ]] \
        || run_tap "package test/package/dist.sh" prove --verbose --merge test/package/dist.sh || true
fi

summary
