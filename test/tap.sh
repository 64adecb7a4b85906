# shellcheck shell=bash
#
# test/tap.sh -- the TAP helpers of every bash suite (test/suites/*.sh, test/crash/crash.sh,
# test/fault/fault.sh).
#
# Source it (never execute it), after scripts/lib.sh:   . "$(dirname "$0")/../tap.sh"
# Safe under `set -euo pipefail`: every helper but tap_bail and tap_done returns 0,
# whatever the test's outcome.  Everything goes to stdout, which the harness reads.
#
#   tap_plan N                    "1..N" now; tap_done checks that N tests ran.  Without
#                                 it, tap_done prints the plan last ("1..<tests run>").
#   tap_ok STATUS DESC [DIAG]     "ok" when STATUS is 0 (an exit status), else "not ok";
#                                 DIAG's lines follow as "#   ..." when the test failed,
#                                 or always with JL_VERBOSE=1
#   tap_is HAVE WANT DESC         ok when the strings are equal; else have/want as DIAG
#   tap_diag MSG...               the message (arguments joined by spaces) as "# ..." lines
#   tap_bail MSG...               "Bail out! MSG", then exit 1
#   tap_done                      a "# ..." summary if tests failed or the count is not
#                                 the plan's, then exit: 0 if all is well, else 1
#   tap_sql_ok DESC SQL [DIAG]    ok when the query returns t (needs scripts/lib.sh's jl_psql)

# Sourcing twice must not reset the counts.
if [[ -n "${_TAP_LOADED:-}" ]]; then
    return 0
fi
_TAP_LOADED=1

_tap_n=0
_tap_failed=0
_tap_planned=

tap_plan() {
    _tap_planned=$1
    echo "1..$1"
}

tap_diag() {
    printf '%s\n' "$*" | sed 's/^/# /'
}

tap_ok() {
    local status=$1 desc=$2 diag=${3:-}
    _tap_n=$((_tap_n + 1))
    if [[ "$status" == 0 ]]; then
        echo "ok $_tap_n - $desc"
    else
        echo "not ok $_tap_n - $desc"
        _tap_failed=$((_tap_failed + 1))
    fi
    if [[ -n "$diag" && ( "$status" != 0 || "${JL_VERBOSE:-}" == 1 ) ]]; then
        printf '%s\n' "$diag" | sed 's/^/#   /'
    fi
    return 0
}

tap_is() {
    local have=$1 want=$2 desc=$3
    if [[ "$have" == "$want" ]]; then
        tap_ok 0 "$desc"
    else
        tap_ok 1 "$desc" "have: $have"$'\n'"want: $want"
    fi
}

tap_bail() {
    echo "Bail out! $*"
    exit 1
}

tap_done() {
    local rc=0
    if [[ -z "$_tap_planned" ]]; then
        tap_plan "$_tap_n"
    fi
    if (( _tap_n != _tap_planned )); then
        tap_diag "planned $_tap_planned tests but ran $_tap_n"
        rc=1
    fi
    if (( _tap_failed > 0 )); then
        tap_diag "failed $_tap_failed of $_tap_n tests"
        rc=1
    fi
    exit "$rc"
}

# tap_sql_ok DESC SQL [DIAG_SQL]: ok when SQL returns t (through jl_psql, so source
# scripts/lib.sh first); on failure, what SQL returned and DIAG_SQL's rows explain.
tap_sql_ok() {
    local desc=$1 sql=$2 diag_sql=${3:-} got diag=
    got=$(jl_psql -At -c "$sql" 2>&1) || true
    if [[ -n "$diag_sql" ]]; then
        diag=$(jl_psql -At -c "$diag_sql" 2>&1) || true
    fi
    if [[ "$got" == t ]]; then
        tap_ok 0 "$desc" "$diag"
    else
        [[ "$got" == f ]] || diag="$got"$'\n'"$diag"
        tap_ok 1 "$desc" "$diag"
    fi
}
