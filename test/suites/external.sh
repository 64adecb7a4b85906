#!/usr/bin/env bash
# test/suites/external.sh -- jobloop-worker, the external worker, on this machine.
#
# Prints TAP.  Starts its own cluster with jobloop.workers = 0 (only external workers serve)
# and jobloop.lease_timeout = 300 s, so that a job that moves within seconds moved because
# its worker's session ended, not because its lease ran out; and the nginx mock.  Run it
# alone with `prove test/suites/external.sh` once jobloop and jobloop-worker are built and
# installed (JL_BUILD=1 builds first).
#
#   cli      --help exits 0 and says how to call it; no CONNINFO is an error (exit 1)
#   role     a role that is not a member of jobloop_worker is refused: exit 1 at once, with
#            a message that names jobloop_worker (no retrying)
#   basic    two jobloop-worker processes (ext-a, ext-b): 200 jobs x 5 steps complete;
#            every job's step count is exactly 5, the business logic applied each step once
#            (ext.applied), the API saw each step once, and worker_stats() shows both
#            external workers with their host names and process ids
#   term     40 jobs whose call takes 30 s, held by ext-a (ext-b stopped meanwhile, as in
#            "kill"): SIGTERM ends ext-a with
#            status 0 within 5 s, and its jobs are held by ext-b within 10 s (the lease
#            would take 300 s)
#   kill     100 jobs x 5 calls of 0.2 s, claimed by ext-a while ext-b is stopped
#            (SIGSTOP, then SIGCONT); ext-a is killed (-9) while it holds calls in flight:
#            every job still completes on ext-b, each step applied exactly once, and
#            ext-a's worker is gone from worker_stats()
#   cancel   a job whose 5 s call is in flight on ext-b (its one connection to 127.0.0.2,
#            which only this job uses, is established): jobloop.cancel() makes it
#            cancelled, ext-b closes that connection (the call is aborted, not waited
#            out) within 3 s, and the API never sees a second request for the job
#   reconnect  the server crashes and restarts: ext-b connects and attaches again by itself
#            (with backoff) and serves new jobs; then SIGTERM ends it with status 0
#
# Counted, not timed: the waits are deadlines on conditions.
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

# The worker program: the ASan build's under memcheck (when the Makefile installs it there),
# else the installed one, else the tree's.
worker_bin() {
    local b
    for b in ${JL_SANITIZE:+"$(_jl_asan_bindir)/jobloop-worker"} "$JL_PGBIN/jobloop-worker" \
             "$JL_ROOT/jobloop-worker"; do
        [[ -x "$b" ]] && { echo "$b"; return 0; }
    done
    return 1
}
WORKER_BIN=$(worker_bin) || tap_bail "jobloop-worker is not built (make; make install)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-ext.XXXXXX")
chmod 0755 "$WORK"
jl_on_exit _jl_rm_dir "$WORK"

# The workers this script started, by pid: stopped at exit, by their pids only.
declare -A PIDS=()
stop_workers() {
    local name
    for name in "${!PIDS[@]}"; do
        kill -TERM "${PIDS[$name]}" 2>/dev/null || true
    done
    for name in "${!PIDS[@]}"; do
        jl_wait_for 10 _jl_pid_gone "${PIDS[$name]}" || kill -KILL "${PIDS[$name]}" 2>/dev/null || true
    done
}

jl_cluster_start "jobloop.workers = 0" \
    "jobloop.lease_timeout = '300s'" \
    "jobloop.allowed_hosts = '127.0.0.1,127.0.0.2'" >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
jl_on_exit stop_workers
tap_plan 26

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE ROLE ext_worker LOGIN;
GRANT jobloop_worker TO ext_worker;
CREATE ROLE ext_outsider LOGIN;
CREATE SCHEMA ext;
-- One row per step the business logic applied: a step applied twice shows up here.
CREATE TABLE ext.applied (tag text, j int, n int);
-- The URL carries the tag, the job's number j and its step n, for the access log.
CREATE FUNCTION ext.req(s jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_build_object('url', (s->>'base') || (s->>'path')
        || CASE WHEN strpos(s->>'path', '?') > 0 THEN '&' ELSE '?' END
        || 'tag=' || (s->>'tag') || '&j=' || (s->>'j') || '&n=' || (s->>'n'))
\$\$;
CREATE FUNCTION ext.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF (r->>'status')::int <> 200 THEN
        RAISE EXCEPTION 'HTTP %', r->>'status';
    END IF;
    INSERT INTO ext.applied VALUES (s->>'tag', (s->>'j')::int, (s->>'n')::int);
    RETURN s || jsonb_build_object('n', (s->>'n')::int + 1);
END
\$\$;
CREATE FUNCTION ext.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT (s->>'n')::int >= (s->>'steps')::int
\$\$;
SELECT jobloop.create_kind('ext', 'ext.req(jsonb)', 'ext.step(jsonb,jsonb)', 'ext.done(jsonb)',
                           backoff => '100ms', max_backoff => '1s', max_attempts => 10);
SQL

CONNINFO="host=127.0.0.1 port=$PGPORT dbname=jobloop user=ext_worker"

# Under memcheck the worker is the ASan build: its reports go where the cluster's do, so that
# jl_sanitize_findings counts them, and leaks count too (the program frees what it drops).
WORKER_ENV=()
if [[ -n "${JL_SANITIZE:-}" ]]; then
    WORKER_ENV=("ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:disable_coredump=1:handle_segv=1:handle_abort=1:log_path=$JL_SANITIZE_DIR/reports/asan-jobloop-worker")
fi

# start_worker NAME: jobloop-worker --name=NAME in the background, its log in $WORK/NAME.log.
start_worker() {
    env "${WORKER_ENV[@]}" "$WORKER_BIN" --name="$1" "$CONNINFO" 2>>"$WORK/$1.log" &
    PIDS[$1]=$!
}
attached() {    # attached NAME: its worker is in worker_stats(), with its pid
    [[ "$(q "SELECT count(*) FROM jobloop.worker_stats()
              WHERE host = '$1' AND remote_pid = ${PIDS[$1]}")" == 1 ]]
}
worker_of() { q "SELECT worker FROM jobloop.worker_stats() WHERE remote_pid = ${PIDS[$1]}"; }
# submit TAG COUNT STEPS PATH [BASE]
submit() {
    q "SELECT count(jobloop.submit('ext', jsonb_build_object('tag', '$1', 'j', g, 'n', 0,
         'steps', $3, 'path', '$4', 'base', '${5:-$JL_MOCK_URL}')))
       FROM generate_series(1, $2) g" >/dev/null
}
count_status() { q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1' AND status = '$2'"; }
all_status() { [[ "$(count_status "$1" "$3")" == "$2" ]]; }
# exact TAG COUNT STEPS: "jobs with exactly STEPS steps | applied rows | distinct (j, n)"
exact() {
    q "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1' AND status = 'completed'
                 AND step = $3 AND (state->>'n')::int = $3)
           || ' ' || (SELECT count(*) FROM ext.applied WHERE tag = '$1')
           || ' ' || (SELECT count(DISTINCT (j, n)) FROM ext.applied WHERE tag = '$1')"
}
# api_seen TAG LOG: "requests | distinct (j, n)" in the mock's access log
api_seen() {
    grep -o "tag=$1&j=[0-9]*&n=[0-9]*" "$2" | sort | awk '{ n++; if ($0 != last) d++; last = $0 }
        END { print n + 0, d + 0 }'
}
held_by() { q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1' AND worker = $2"; }
# exit_within SECONDS PID: EXIT_RC is the exit status of PID (a child of this shell), or
# 124 if it did not exit in time.  (Not in $(...): a subshell cannot wait for it.)
EXIT_RC=
exit_within() {
    local deadline=$((SECONDS + $1))
    EXIT_RC=0
    while _jl_pid_alive "$2" && (( SECONDS < deadline )); do sleep 0.05; done
    if _jl_pid_alive "$2"; then
        EXIT_RC=124
        return 0
    fi
    wait "$2" || EXIT_RC=$?
}

# ---- cli ----------------------------------------------------------------------------------
out=$("$WORKER_BIN" --help 2>&1) && rc=0 || rc=$?
[[ $rc == 0 && "$out" == *"Usage:"* && "$out" == *CONNINFO* && "$out" == *--ca-file* ]]
tap_ok $? "--help exits 0 and shows the usage" "exit $rc: $out"
out=$("$WORKER_BIN" 2>&1) && rc=0 || rc=$?
[[ $rc == 1 && "$out" == *"connection string"* ]]
tap_ok $? "no CONNINFO: exit 1, saying a connection string is needed" "exit $rc: $out"

# ---- role ---------------------------------------------------------------------------------
out=$(timeout 20 env "${WORKER_ENV[@]}" "$WORKER_BIN" --name=outsider \
      "host=127.0.0.1 port=$PGPORT dbname=jobloop user=ext_outsider" 2>&1) && rc=0 || rc=$?
tap_is "$rc" 1 "a role outside jobloop_worker: exit 1 at once (no retrying)"
[[ "$out" == *"must be a member of jobloop_worker"* && "$out" == *"SQLSTATE 42501"* ]]
tap_ok $? "... and the message says the role must be a member of jobloop_worker" "$out"

# ---- basic --------------------------------------------------------------------------------
start_worker ext-a
start_worker ext-b
jl_wait_for 20 attached ext-a && jl_wait_for 20 attached ext-b
tap_ok $? "two jobloop-workers attach; worker_stats() shows each with its host name and pid" \
    "$(q "SELECT * FROM jobloop.worker_stats()"; tail -n 5 "$WORK"/ext-*.log)"
[[ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobloop-worker'")" == 2 ]]
tap_ok $? "their sessions are named jobloop-worker in pg_stat_activity"

submit basic 200 5 /json
jl_wait_for 60 all_status basic 200 completed
tap_ok $? "200 jobs x 5 steps complete on two external workers" \
    "$(q "SELECT status, count(*) FROM jobloop.jobs GROUP BY 1"; tail -n 5 "$WORK"/ext-*.log)"
tap_is "$(exact basic 200 5)" "200 1000 1000" "every job has exactly 5 steps, each applied once"
tap_is "$(api_seen basic "$JL_MOCK_LOG")" "1000 1000" "the API saw each of the 1,000 steps once"
tap_diag "steps per worker: $(q "SELECT string_agg(host || ' ' || steps, ', ' ORDER BY host)
                                 FROM jobloop.worker_stats()")"


# ---- retention ----------------------------------------------------------------------------
# No background worker runs here: the external workers keep retention going
# (jobloop.worker_maintain() between turns), starting with the partitions of finished jobs.
has_partitions() {
    [[ "$(q "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'jobloop.finished_job'::regclass
                AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'")" -gt 0 ]]
}
jl_wait_for 40 has_partitions
tap_ok $? "with jobloop.workers = 0, the external workers make the partitions of finished jobs" \
    "$(q "SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'jobloop.finished_job'::regclass")"

# ---- term ---------------------------------------------------------------------------------
# As in "kill" below: ext-b is stopped while ext-a claims the jobs.
A=$(worker_of ext-a)
kill -STOP "${PIDS[ext-b]}"
submit term 40 1 '/delay?s=30'
all_held_by_a() { [[ "$(held_by term "$A")" == 40 ]] && all_status term 40 running; }
jl_wait_for 30 all_held_by_a || { kill -CONT "${PIDS[ext-b]}"; tap_bail "ext-a never held the 40 long jobs"; }
kill -CONT "${PIDS[ext-b]}"
tap_diag "ext-a (worker $A) holds $(held_by term "$A") of the 40 long jobs"
kill -TERM "${PIDS[ext-a]}"
exit_within 5 "${PIDS[ext-a]}"
tap_is "$EXIT_RC" 0 "SIGTERM: ext-a exits with status 0 within 5 s"
rc=0; grep -q "gave 40 jobs back to the server" "$WORK/ext-a.log" || rc=$?
tap_ok $rc "... having given its 40 jobs back (jobloop.worker_detach())" "$(tail -n 5 "$WORK/ext-a.log")"
unset 'PIDS[ext-a]'
B=$(worker_of ext-b)
moved_to_b() { [[ "$(held_by term "$B")" == 40 ]]; }
jl_wait_for 10 moved_to_b
tap_ok $? "its jobs are held by ext-b within 10 s (the lease is 300 s)" \
    "$(q "SELECT worker, status, count(*) FROM jobloop.jobs WHERE state->>'tag' = 'term' GROUP BY 1, 2")"
q "SELECT count(jobloop.cancel(id)) FROM jobloop.jobs WHERE state->>'tag' = 'term'" >/dev/null
jl_wait_for 10 all_status term 40 cancelled
tap_ok $? "the 40 jobs in flight on ext-b are cancelled"

# ---- kill ---------------------------------------------------------------------------------
start_worker ext-a
jl_wait_for 20 attached ext-a || tap_bail "ext-a did not attach again"
A=$(worker_of ext-a)
A_PID=${PIDS[ext-a]}
# ext-b is stopped (SIGSTOP) while the jobs are claimed, so that ext-a holds them: which
# worker claims what is the server's business, and this phase needs ext-a to hold calls.
kill -STOP "${PIDS[ext-b]}"
submit kill 100 5 '/delay?s=0.2'
a_busy() { (( $(held_by kill "$A") >= 5 )) && \
    (( $(q "SELECT count(*) FROM ext.applied WHERE tag = 'kill'") > 20 )); }
jl_wait_for 30 a_busy || { kill -CONT "${PIDS[ext-b]}"; tap_bail "ext-a never held 5 of the jobs"; }
kill -CONT "${PIDS[ext-b]}"
held=$(held_by kill "$A")
kill -KILL "$A_PID"
exit_within 5 "$A_PID"
unset 'PIDS[ext-a]'
tap_diag "ext-a killed (status $EXIT_RC) holding $held jobs; $(q "SELECT count(*) FROM ext.applied WHERE tag = 'kill'") steps applied so far"
jl_wait_for 60 all_status kill 100 completed
tap_ok $? "every job completes after ext-a is killed mid-run" \
    "$(q "SELECT status, worker, count(*) FROM jobloop.jobs WHERE state->>'tag' = 'kill' GROUP BY 1, 2")"
tap_is "$(exact kill 100 5)" "100 500 500" "every job has exactly 5 steps, each applied once"
a_gone() { [[ "$(q "SELECT count(*) FROM jobloop.worker_stats() WHERE remote_pid = $A_PID")" == 0 ]]; }
jl_wait_for 10 a_gone
tap_ok $? "the killed worker is gone from worker_stats()"

# ---- cancel -------------------------------------------------------------------------------
# 127.0.0.2 is this job's alone, so ext-b's connections to it are this job's call.
conns_to_2() { ss -Htn state established "( dst 127.0.0.2 and dport = :$JL_MOCK_PORT )" | wc -l; }
tap_is "$(conns_to_2)" 0 "before the cancel, nothing is connected to 127.0.0.2"
submit cancel 1 1 '/delay?s=5' "$JL_MOCK_URL2"
cid=$(q "SELECT id FROM jobloop.jobs WHERE state->>'tag' = 'cancel'")
in_flight() { (( $(conns_to_2) == 1 )) && all_status cancel 1 running; }
jl_wait_for 10 in_flight || tap_bail "the job's call never got in flight"
start_us=$(_jl_now_us)
q "SELECT jobloop.cancel($cid)" >/dev/null
jl_wait_for 5 all_status cancel 1 cancelled
tap_ok $? "jobloop.cancel() of a job whose call is in flight on ext-b: cancelled"
no_conn() { (( $(conns_to_2) == 0 )); }
jl_wait_for 3 no_conn
tap_ok $? "ext-b aborts the call: its connection is closed within 3 s of the cancel" \
    "$(ss -Htnp "( dst 127.0.0.2 )")"
tap_diag "connection closed $(( ($(_jl_now_us) - start_us) / 1000 )) ms after the cancel"
# nginx logs the request when its 5 s sleep ends, whether or not the client is still there
logged() { grep -q "tag=cancel&" "$JL_MOCK_LOG2"; }
jl_wait_for 15 logged || true
tap_is "$(grep -c "tag=cancel&" "$JL_MOCK_LOG2")" 1 "the API saw the cancelled job's call once, never again"

# ---- reconnect ----------------------------------------------------------------------------
# The server crashes and comes back (pg_ctl stop -m immediate, start): ext-b connects again
# by itself (backoff 1, 2, 4 ... s) and serves the jobs submitted afterwards.
jl_cluster_restart_immediate >&2 || tap_bail "the cluster did not restart"
jl_wait_for 30 attached ext-b
tap_ok $? "after the server's crash and restart, ext-b attaches again by itself" \
    "$(tail -n 8 "$WORK/ext-b.log")"
grep -q "connecting again in" "$WORK/ext-b.log"
tap_ok $? "... and its log says it lost the connection and connected again" "$(tail -n 8 "$WORK/ext-b.log")"
submit again 20 3 /json
jl_wait_for 30 all_status again 20 completed
tap_is "$(exact again 20 3)" "20 60 60" "20 jobs x 3 steps submitted after the restart complete, each step once"

# ---- stop ---------------------------------------------------------------------------------
kill -TERM "${PIDS[ext-b]}"
exit_within 5 "${PIDS[ext-b]}"
tap_is "$EXIT_RC" 0 "SIGTERM: ext-b exits with status 0"
unset 'PIDS[ext-b]'
nobody() { [[ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobloop-worker'")" == 0 ]]; }
jl_wait_for 10 nobody
tap_ok $? "no jobloop-worker session is left on the server"

tap_done
