#!/usr/bin/env bash
# test/suites/stop.sh -- how a worker stops: a clean shutdown, pg_terminate_backend, and a
# shutdown while a job's function sleeps.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 2, jobloop.function_timeout =
# 120 s) and nginx mock; run it alone with `prove test/suites/stop.sh` once jobloop is
# built and installed (JL_BUILD=1 builds).
#
#   clean      pg_ctl stop -m fast with 200 calls in flight is prompt, and the server log
#              has no FATAL and no exit code for the workers (they exit with 0 at the
#              postmaster's SIGTERM instead of dying with FATAL "terminating background
#              worker ... due to administrator command", which monitoring alerts on)
#   resume     after a start, every one of those jobs completes
#   terminate  pg_terminate_backend() on a worker: no FATAL, one LOG line, and the worker
#              comes back (it exits with 1, so the postmaster restarts it)
#   sleeping   pg_ctl stop -m fast while a job's request() is in a 60 s pg_sleep is still
#              prompt: a function's call is interrupted at once, not after
#              jobloop.function_timeout
#
# Counted, not timed, except the stops, whose deadlines (15 s) are far from both the
# expected second and the 60 s that a stop waiting for the function would take.
# shellcheck disable=SC2317  # functions run through jl_wait_for look unreachable
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

if [[ "${JL_BUILD:-}" == 1 ]]; then
    jl_build >&2
fi

q() { jl_psql -At -c "$1"; }

jl_cluster_start "jobloop.workers = 2" "jobloop.function_timeout = '120s'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 12

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA st;
-- One call per job; a state with "sleep" makes request() sleep that long first.
CREATE FUNCTION st.req(s jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF s ? 'sleep' THEN
        PERFORM pg_sleep((s->>'sleep')::float8);
    END IF;
    RETURN jsonb_build_object('url', '$JL_MOCK_URL/delay?s=' || (s->>'s') || '&j=' || (s->>'j'));
END
\$\$;
CREATE FUNCTION st.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS \$\$ SELECT s || '{"done": true}' \$\$;
CREATE FUNCTION st.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$ SELECT s ? 'done' \$\$;
SELECT jobloop.create_kind('st', 'st.req(jsonb)', 'st.step(jsonb,jsonb)', 'st.done(jsonb)');
SQL

workers_up() {      # workers_up N: N workers in pg_stat_activity
    [[ "$(q "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")" == "$1" ]]
}
in_flight() {       # in_flight N: at least N jobs held by a worker
    (( $(q "SELECT count(*) FROM jobloop.jobs WHERE status = 'running' AND worker IS NOT NULL") >= $1 ))
}
all_completed() {
    [[ "$(q "SELECT count(*) FILTER (WHERE status = 'completed') = count(*) FROM jobloop.jobs")" == t ]]
}
sleeping() {        # a worker is inside the sleeping request()
    [[ "$(q "SELECT count(*) FROM pg_stat_activity
              WHERE backend_type = 'jobloop worker' AND wait_event = 'PgSleep'")" == 1 ]]
}
worker_pid() {      # the pid of worker N
    q "SELECT pid FROM pg_stat_activity WHERE application_name = 'jobloop worker $1'"
}
new_worker() {      # new_worker N OLD_PID: worker N runs, with another pid
    local pid
    pid=$(worker_pid "$1")
    [[ -n "$pid" && "$pid" != "$2" ]]
}
log_from() {        # the server log from byte offset $1 on
    tail -c +"$(( $1 + 1 ))" "$JL_PGLOG"
}
log_size() { stat -c %s "$JL_PGLOG"; }
worker_fatals() {   # FATAL lines of jobloop workers in the log from offset $1
    log_from "$1" | grep -E 'jobloop worker +FATAL:|FATAL: .*background worker "jobloop' || true
}
worker_exits() {    # the postmaster's lines on workers that exited with a code, from $1
    log_from "$1" | grep -E 'background worker "jobloop worker" \(PID [0-9]+\) exited' || true
}
fast_stop_seconds() {   # pg_ctl stop -m fast; prints the seconds it took, or "failed"
    local t0=$EPOCHREALTIME t1
    if _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$JL_PGDATA" -m fast -w -t 60 stop >/dev/null 2>&1; then
        t1=$EPOCHREALTIME
        awk -v a="${t0/,/.}" -v b="${t1/,/.}" 'BEGIN { printf "%.1f\n", b - a }'
    else
        echo failed
    fi
}
start_again() {     # as jl_cluster_start started it (under ASan with JL_SANITIZE)
    local rc=0
    if declare -F _jl_pg_ctl_start >/dev/null; then
        _jl_pg_ctl_start "$JL_PGDATA" "$JL_PGLOG" >/dev/null 2>&1 || rc=$?
    else
        _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$JL_PGDATA" -l "$JL_PGLOG" -w -t 60 start >/dev/null 2>&1 || rc=$?
    fi
    (( rc == 0 )) || tap_bail "the cluster did not start again: $(tail -n 5 "$JL_PGLOG")"
}
within() {          # within SECONDS VALUE: VALUE is a number below SECONDS
    [[ "$2" != failed ]] && awk -v s="$1" -v v="$2" 'BEGIN { exit !(v < s) }'
}

jl_wait_for 30 workers_up 2 || tap_bail "two workers did not start"

# ---- clean --------------------------------------------------------------------------------
q "SELECT count(jobloop.submit('st', jsonb_build_object('s', 3, 'j', g))) FROM generate_series(1, 200) g" >/dev/null
jl_wait_for 30 in_flight 200 || tap_diag "not all 200 jobs were held before the stop"
offset=$(log_size)
took=$(fast_stop_seconds)
within 15 "$took"
tap_ok $? "pg_ctl stop -m fast with 200 calls in flight takes ${took} s (< 15)"
fatals=$(worker_fatals "$offset")
tap_is "$fatals" "" "the server log has no FATAL from the workers"
exits=$(worker_exits "$offset")
tap_is "$exits" "" "and no exit code from them: they exited with 0"
log_from "$offset" | grep -q 'database system is shut down'
tap_ok $? "the server shut down" "$(log_from "$offset" | tail -n 5)"

# ---- resume -------------------------------------------------------------------------------
start_again
jl_wait_for 30 workers_up 2
tap_ok $? "after a start, both workers run again"
jl_wait_for 60 all_completed
tap_ok $? "every job held at the stop completes" \
    "$(q "SELECT status, count(*) FROM jobloop.jobs GROUP BY status")"

# ---- terminate ----------------------------------------------------------------------------
old=$(worker_pid 1)
offset=$(log_size)
q "SELECT pg_terminate_backend($old)" >/dev/null
jl_wait_for 30 new_worker 1 "$old"
tap_ok $? "pg_terminate_backend() on worker 1: it is restarted"
fatals=$(worker_fatals "$offset")
tap_is "$fatals" "" "with no FATAL in the log"
log_from "$offset" | grep -q "jobloop worker 1 terminated; it restarts"
tap_ok $? "and one LOG line that says so" "$(log_from "$offset" | tail -n 10)"

# ---- sleeping -----------------------------------------------------------------------------
q "SELECT jobloop.submit('st', '{\"s\": 0, \"j\": 0, \"sleep\": 60}')" >/dev/null
jl_wait_for 20 sleeping || tap_diag "no worker got into the sleeping request()"
offset=$(log_size)
took=$(fast_stop_seconds)
within 15 "$took"
tap_ok $? "pg_ctl stop -m fast while a request() sleeps 60 s takes ${took} s (< 15)"
exits=$(worker_exits "$offset")
tap_ok "$([[ $(grep -c 'exited with exit code 1' <<<"$exits") -le 1 ]]; echo $?)" \
    "only the worker interrupted inside the function exits with a code" "$exits"
log_from "$offset" | grep -q 'database system is shut down'
tap_ok $? "the server shut down" "$(log_from "$offset" | tail -n 5)"

tap_done
