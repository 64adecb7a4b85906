#!/usr/bin/env bash
# test/suites/hostile.sh -- nothing a job does may crash, stall or bloat the worker
# (issue 10), for the cases that need a cluster of their own: settings, reloads, a role
# holding locks, DROP EXTENSION.  The rest is test/pgtap/hostile.sql.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 1, so one stalled worker is a
# stalled database; jobloop.max_response_size = 1MB) and nginx mock; run it alone with
# `prove test/suites/hostile.sh` once jobloop is built and installed (JL_BUILD=1 builds).
#
#   combo      six rounds of eight jobs submitted together: a redirect to a refused
#              address, to file: and to gopher:, a 20 MB body over max_response_size, a
#              refused address, three plain ones (up to 200 KiB).  Each ends with its own
#              final status and reason; the worker keeps its pid; the log has no signal
#              and no "free(): invalid" (today's heap overflow in libcurl's receive buffer)
#   state      a step returning a 100 MB state fails its job (jobloop.max_state_size,
#              default 1MB) while the jobs beside it complete; the worker's peak resident
#              memory stays modest
#   advisory   a non-superuser session holds pg_advisory_lock(1785688949, 1), the key the
#              workers' claims took while a tenant cap exists: jobs still complete, and a
#              cancel still aborts an in-flight call
#   drop       DROP EXTENSION with calls in flight, then CREATE EXTENSION: no ERROR from
#              the worker, same pid, new jobs complete
#   timeout    jobloop.function_timeout = 300ms; a step that catches query_canceled and
#              sleeps again, and one that loops catching it, fail naming the setting;
#              another role's jobs submitted with them complete.  The worker may restart
#              for it (last, since it may change the pid), but never by a signal.
#
# Every wait is a deadline on a condition.
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
sql_true() { [[ "$(jl_psql -At -c "$1" 2>/dev/null)" == t ]]; }

t_start=$SECONDS
jl_cluster_start "jobloop.workers = 1" "jobloop.max_response_size = '1MB'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 26

# The kinds; run again after DROP EXTENSION / CREATE EXTENSION.
create_kinds() {
    jl_psql >/dev/null <<'SQL'
SELECT jobloop.create_kind('h', 'h.req(jsonb)', 'h.step(jsonb,jsonb)', 'h.done(jsonb)',
                           max_attempts => 3, backoff => '50 ms', max_backoff => '100 ms');
SELECT jobloop.create_kind('h_big_state', 'h.req(jsonb)', 'h.big_state_step(jsonb,jsonb)', 'h.done(jsonb)',
                           max_attempts => 1);
SELECT jobloop.create_kind('h_catch', 'h.req(jsonb)', 'h.catch_step(jsonb,jsonb)', 'h.done(jsonb)',
                           max_attempts => 1);
SELECT jobloop.create_kind('h_loop', 'h.req(jsonb)', 'h.loop_step(jsonb,jsonb)', 'h.done(jsonb)',
                           max_attempts => 1);
SELECT jobloop.create_kind('h_sleep', 'h.req(jsonb)', 'h.sleep_step(jsonb,jsonb)', 'h.done(jsonb)',
                           max_attempts => 1);
SQL
}

jl_psql >/dev/null <<'SQL' || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA h;
-- One call per job, to state.url; the step keeps the status and the body's length.
CREATE FUNCTION h.req(s jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('url', s->>'url')
$$;
CREATE FUNCTION h.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT s || jsonb_build_object('done', true, 'status', r->'status',
                                   'len', CASE WHEN jsonb_typeof(r->'body') = 'string'
                                               THEN length(r->>'body') END)
$$;
CREATE FUNCTION h.done(s jsonb) RETURNS boolean LANGUAGE sql AS $$ SELECT s ? 'done' $$;
-- A 100 MB state (the issue's example).
CREATE FUNCTION h.big_state_step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('done', true, 'x', repeat('a', 100 * 1024 * 1024))
$$;
-- Business logic that tries to outlive jobloop.function_timeout.
CREATE FUNCTION h.catch_step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        PERFORM pg_sleep(60);
    EXCEPTION WHEN query_canceled THEN
        PERFORM pg_sleep(60);
    END;
    RETURN s || '{"done": true}';
END
$$;
CREATE FUNCTION h.loop_step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        BEGIN
            PERFORM pg_sleep(1);
        EXCEPTION WHEN query_canceled THEN
            NULL;
        END;
    END LOOP;
END
$$;
-- Plain slow logic: fails under a short function_timeout, completes under a long one.
CREATE FUNCTION h.sleep_step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(1);
    RETURN s || '{"done": true}';
END
$$;
-- The jobs of each phase: label -> job id.
CREATE TABLE h.jobs (phase text, label text, id bigint);
GRANT USAGE ON SCHEMA h TO PUBLIC;
GRANT INSERT ON h.jobs TO PUBLIC;
CREATE ROLE h_locker LOGIN;     -- holds the advisory lock (not a superuser)
CREATE ROLE h_evil;             -- submits the jobs that catch query_canceled
CREATE ROLE h_other;            -- submits plain jobs beside them
GRANT USAGE ON SCHEMA jobloop TO h_evil, h_other;
SQL
create_kinds || tap_bail "setup (kinds) failed"

# ---- helpers -----------------------------------------------------------------------------
workers() {     # the pids of the jobloop workers, "pid,pid" ("down" if the server is not)
    q "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity
        WHERE backend_type = 'jobloop worker'" 2>/dev/null || echo down
}
server_up() { jl_psql -At -c "SELECT 1" >/dev/null 2>&1; }
# finished PHASE: every job of PHASE has a final status
finished() {
    sql_true "SELECT count(*) > 0 AND bool_and(j.status IN ('completed', 'failed', 'cancelled'))
                FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = '$1'"
}
outcomes_sql() {    # a query listing the jobs of PHASE, for diagnostics
    echo "SELECT format('%s: job %s %s attempts %s len %s: %s', p.label, j.id, j.status, j.attempts,
                        j.state->>'len', coalesce(j.last_error, 'no error'))
            FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = '$1' ORDER BY p.label, j.id"
}
log_since() { tail -c +"$(($1 + 1))" "$JL_PGLOG"; }
# The lines of the server log since OFFSET that show a process killed by a signal, a crash
# restart, or glibc's heap checks.
crashes_since() {
    log_since "$1" | grep -E 'terminated by signal|reinitializing|free\(\): invalid|double free|malloc\(\)|corrupted' || true
}
LOG0=$(stat -c %s "$JL_PGLOG")
WORKERS0=$(workers)

# ==== combo: eight jobs submitted together, six rounds =====================================
combo_sql() {   # one round, submitted in one transaction
    cat <<SQL
INSERT INTO h.jobs
SELECT 'combo', label, jobloop.submit('h', jsonb_build_object('url', url))
  FROM (VALUES ('redirect_refused', '$JL_MOCK_URL/hostile/redirect/refused?r=$1'),
               ('redirect_file',    '$JL_MOCK_URL/hostile/redirect/file?r=$1'),
               ('redirect_gopher',  '$JL_MOCK_URL/hostile/redirect/gopher?r=$1'),
               ('body_20mb',        '$JL_MOCK_URL/big?kb=20000&r=$1'),
               ('refused',          '$JL_MOCK_URL2/big?kb=64&r=$1'),
               ('plain_json',       '$JL_MOCK_URL/json?r=$1'),
               ('plain_64kb',       '$JL_MOCK_URL/big?kb=64&r=$1'),
               ('plain_200kb',      '$JL_MOCK_URL/big?kb=200&r=$1')) v(label, url);
SQL
}
for round in 1 2 3 4 5 6; do
    if ! out=$(jl_psql -c "$(combo_sql "$round")" 2>&1); then
        tap_diag "combo round $round: submit failed: $out"
        jl_wait_for 60 server_up || true
        continue
    fi
    jl_wait_for 30 finished combo || true
done
jl_wait_for 60 server_up || true
tap_sql_ok "combo: all 48 jobs of 6 rounds reached a final status" \
    "SELECT count(*) = 48 AND bool_and(j.status IN ('completed', 'failed'))
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'combo'" "$(outcomes_sql combo)"
tap_sql_ok "combo: the plain jobs completed, with their whole bodies (64 and 200 KiB)" \
    "SELECT count(*) = 18 AND bool_and(j.status = 'completed' AND j.state->>'status' = '200'
                                       AND (j.state->>'len')::int IS NOT DISTINCT FROM
                                           CASE p.label WHEN 'plain_64kb' THEN 65536 WHEN 'plain_200kb' THEN 204800 END)
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'combo' AND p.label LIKE 'plain%'" \
    "$(outcomes_sql combo)"
tap_sql_ok "combo: the redirects to file: and gopher: failed at once (only http and https)" \
    "SELECT count(*) = 12 AND bool_and(j.status = 'failed' AND j.attempts = 1
                                       AND j.last_error LIKE '%redirect%' AND j.last_error LIKE '%only http and https%')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'combo' AND p.label IN ('redirect_file', 'redirect_gopher')" \
    "$(outcomes_sql combo)"
tap_sql_ok "combo: the 20 MB bodies failed at once (jobloop.max_response_size)" \
    "SELECT count(*) = 6 AND bool_and(j.status = 'failed' AND j.attempts = 1
                                      AND j.last_error LIKE '%jobloop.max_response_size%')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'combo' AND p.label = 'body_20mb'" \
    "$(outcomes_sql combo)"
tap_sql_ok "combo: refused addresses, direct or by redirect, failed at once (not in jobloop.allowed_hosts)" \
    "SELECT count(*) = 12 AND bool_and(j.status = 'failed' AND j.attempts = 1
                                       AND j.last_error LIKE '%not in jobloop.allowed_hosts%')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'combo' AND p.label LIKE '%refused%'" \
    "$(outcomes_sql combo)"
[[ ! -s "$JL_MOCK_LOG2" ]] && s=0 || s=1
tap_ok "$s" "combo: 127.0.0.2 received nothing" "$(cat "$JL_MOCK_LOG2")"
tap_is "$(workers)" "$WORKERS0" "combo: the worker kept its pid"
tap_is "$(crashes_since "$LOG0")" "" "combo: no process died by a signal, no heap corruption in the server log"

# ==== state: a 100 MB state ==================================================================
tap_sql_ok "state: jobloop.max_state_size and jobloop.max_request_size exist and default to 1MB" \
    "SELECT current_setting('jobloop.max_state_size') = '1MB' AND current_setting('jobloop.max_request_size') = '1MB'" \
    "SELECT 'max_state_size ' || coalesce(current_setting('jobloop.max_state_size', true), 'missing')
            || ', max_request_size ' || coalesce(current_setting('jobloop.max_request_size', true), 'missing')"
W=$(workers)
jl_psql >/dev/null -c "
INSERT INTO h.jobs
SELECT 'state', label, jobloop.submit(kind, jsonb_build_object('url', url))
  FROM (VALUES ('big', 'h_big_state', '$JL_MOCK_URL/json?state=big'),
               ('plain_1', 'h', '$JL_MOCK_URL/json?state=1'),
               ('plain_2', 'h', '$JL_MOCK_URL/big?kb=64&state=2'),
               ('plain_3', 'h', '$JL_MOCK_URL/json?state=3')) v(label, kind, url)" || true
jl_wait_for 60 finished state || true
tap_sql_ok "state: a step returning a 100 MB state fails its job, naming jobloop.max_state_size" \
    "SELECT j.status = 'failed' AND j.last_error LIKE '%jobloop.max_state_size%'
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'state' AND p.label = 'big'" \
    "SELECT p.label || ': ' || j.status || ', state ' || pg_column_size(j.state) || ' bytes: ' || coalesce(j.last_error, 'no error')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'state' ORDER BY p.label"
tap_sql_ok "state: the three jobs submitted with it completed" \
    "SELECT count(*) = 3 AND bool_and(j.status = 'completed')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'state' AND p.label LIKE 'plain%'" \
    "$(outcomes_sql state)"
tap_is "$(workers)" "$W" "state: the worker kept its pid"
# The step function itself needs ~320 MB to build a 100 MB jsonb (repeat(), its text
# output, the jsonb: measured in a plain backend); a worker that checks the size where the
# value is produced stays well under 640 MB; today's copies of the state took it to 1 GB.
hwm=$(awk '/^VmHWM:/ { print int($2 / 1024) }' "/proc/${W%%,*}/status" 2>/dev/null || echo unknown)
[[ "$hwm" =~ ^[0-9]+$ ]] && (( hwm < 640 )) && s=0 || s=1
tap_ok "$s" "state: the worker's peak resident memory (VmHWM) stayed under 640 MB" "VmHWM: $hwm MB"

# ==== advisory: a role holding the workers' lock key =========================================
W=$(workers)
q "SELECT jobloop.set_tenant_limit('h-t1', 5)" >/dev/null || true
q "INSERT INTO h.jobs SELECT 'adv_slow', 'slow', jobloop.submit('h', jsonb_build_object('url', '$JL_MOCK_URL/drip?adv=slow'), tenant => 'h-t1')" >/dev/null || true
in_flight() { sql_true "SELECT in_flight >= 1 FROM jobloop.worker_stats()"; }
jl_wait_for 15 in_flight || tap_diag "the /drip call never got in flight"

LOCKER_PID=
"$JL_PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGPORT" -U h_locker -d jobloop \
    -c "SET application_name = 'h_locker'" -c "SELECT pg_advisory_lock(1785688949, 1)" \
    -c "SELECT pg_sleep(300)" >/dev/null 2>&1 </dev/null &
LOCKER_PID=$!
stop_locker() { _jl_pid_alive "$LOCKER_PID" && kill "$LOCKER_PID" 2>/dev/null; return 0; }
jl_on_exit stop_locker
lock_held() {
    sql_true "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                              WHERE a.usename = 'h_locker' AND l.locktype = 'advisory' AND l.granted
                                AND l.classid = 1785688949 AND l.objid = 1 AND l.objsubid = 2)"
}
jl_wait_for 15 lock_held && s=0 || s=1
tap_ok "$s" "advisory: role h_locker (not a superuser) holds pg_advisory_lock(1785688949, 1), a tenant cap exists"

q "INSERT INTO h.jobs SELECT 'adv', 'job_' || g, jobloop.submit('h', jsonb_build_object('url', '$JL_MOCK_URL/json?adv=' || g),
                                                                tenant => 'h-t' || (g % 2 + 1))
     FROM generate_series(1, 6) g" >/dev/null || true
jl_wait_for 15 finished adv || true
tap_sql_ok "advisory: 6 jobs submitted meanwhile (tenants h-t1 and h-t2) complete" \
    "SELECT count(*) = 6 AND bool_and(j.status = 'completed') FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'adv'" \
    "$(outcomes_sql adv)"
# /drip sends a byte a second for 60 s; nginx logs it within about a second of the client
# leaving.  A worker stuck on the lock would not abort it.
slow_closed() { grep -q '"GET /drip?adv=slow"' "$JL_MOCK_LOG"; }
cancelled=$(q "SELECT jobloop.cancel(id) FROM h.jobs WHERE phase = 'adv_slow'" 2>&1) || true
jl_wait_for 10 slow_closed && s=0 || s=1
tap_ok "$s" "advisory: cancelling the job whose /drip call is in flight aborts the call (the mock logs it within 10 s)" \
    "cancel returned $cancelled; /drip is not in the access log yet"
q "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'h_locker'" >/dev/null || true
jl_wait_for 10 _jl_pid_gone "$LOCKER_PID" || stop_locker
q "SELECT jobloop.set_tenant_limit('h-t1', NULL)" >/dev/null || true
tap_is "$(workers)" "$W" "advisory: the worker kept its pid"

# ==== drop: DROP EXTENSION with calls in flight ==============================================
W=$(workers)
q "INSERT INTO h.jobs SELECT 'drop', 'job_' || g, jobloop.submit('h', jsonb_build_object('url', '$JL_MOCK_URL/delay?s=1.5&drop=' || g))
     FROM generate_series(1, 5) g" >/dev/null || true
five_in_flight() { sql_true "SELECT in_flight >= 5 FROM jobloop.worker_stats()"; }
jl_wait_for 15 five_in_flight || tap_diag "the 5 /delay calls never were all in flight"
LOG2=$(stat -c %s "$JL_PGLOG")
q "DROP EXTENSION jobloop" >/dev/null || tap_diag "DROP EXTENSION jobloop failed"
delays_answered() { [[ $(grep -c '"GET /delay?s=1.5&drop=' "$JL_MOCK_LOG") == 5 ]]; }
jl_wait_for 15 delays_answered || tap_diag "the mock did not answer the 5 /delay calls"
t_answered=$(grep '"GET /delay?s=1.5&drop=' "$JL_MOCK_LOG" | cut -d' ' -f1 | sort -n | tail -n 1)
# The worker has dealt with the answers: it ran a turn after them (pg_stat_activity's
# state_change), logged something, or is gone.
worker_noticed() {
    local pids=${W:-0}
    log_since "$LOG2" | grep -qE "\[(${pids//,/|})\]" && return 0
    sql_true "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid IN ($pids))
                  OR EXISTS (SELECT FROM pg_stat_activity WHERE pid IN ($pids)
                              AND state_change > to_timestamp(${t_answered:-0}))"
}
jl_wait_for 15 worker_noticed && s=0 || s=1
tap_ok "$s" "drop: DROP EXTENSION jobloop with 5 calls in flight; the answers arrive and the worker deals with them"
jl_psql >/dev/null -c "CREATE EXTENSION jobloop" -c "GRANT USAGE ON SCHEMA jobloop TO h_evil, h_other" || true
create_kinds || true
q "INSERT INTO h.jobs SELECT 'recreated', 'job_' || g, jobloop.submit('h', jsonb_build_object('url', '$JL_MOCK_URL/json?recreated=' || g))
     FROM generate_series(1, 3) g" >/dev/null || true
jl_wait_for 15 finished recreated || true
tap_sql_ok "drop: after CREATE EXTENSION, new jobs complete" \
    "SELECT count(*) = 3 AND bool_and(j.status = 'completed') FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'recreated'" \
    "$(outcomes_sql recreated)"
errors=$(log_since "$LOG2" | grep -E 'jobloop worker (ERROR|FATAL|PANIC):|terminated by signal|exited with exit code' || true)
tap_is "$errors" "" "drop: the server log has no ERROR from the worker, and no worker exit"
tap_is "$(workers)" "$W" "drop: the worker kept its pid"

# ==== timeout: business logic that catches query_canceled ====================================
LOG3=$(stat -c %s "$JL_PGLOG")
jl_psql >/dev/null -c "ALTER SYSTEM SET jobloop.function_timeout = '300ms'" -c "SELECT pg_reload_conf()" || true
# The worker has applied it once a step sleeping 1 s fails (under 10 s it completes).
PROBE=0
probe_fails() {
    PROBE=$((PROBE + 1))
    q "INSERT INTO h.jobs SELECT 'probe$PROBE', 'probe', jobloop.submit('h_sleep', jsonb_build_object('url', '$JL_MOCK_URL/json?probe=$PROBE'))" >/dev/null
    jl_wait_for 10 finished "probe$PROBE" || return 1
    sql_true "SELECT j.status = 'failed' FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'probe$PROBE'"
}
jl_wait_for 20 probe_fails && s=0 || s=1
tap_ok "$s" "timeout: jobloop.function_timeout = 300ms is in force (a step sleeping 1 s fails)" "$(outcomes_sql "probe$PROBE")"

t0=$SECONDS
jl_psql >/dev/null <<SQL || true
BEGIN;
SET LOCAL ROLE h_evil;
INSERT INTO h.jobs VALUES
    ('evil', 'catch_and_sleep', jobloop.submit('h_catch', jsonb_build_object('url', '$JL_MOCK_URL/json?evil=catch'))),
    ('evil', 'catch_in_loop', jobloop.submit('h_loop', jsonb_build_object('url', '$JL_MOCK_URL/json?evil=loop')));
SET LOCAL ROLE h_other;
INSERT INTO h.jobs SELECT 'other', 'job_' || g, jobloop.submit('h', jsonb_build_object('url', '$JL_MOCK_URL/json?other=' || g))
  FROM generate_series(1, 5) g;
COMMIT;
SQL
jl_wait_for 15 finished other || true
tap_sql_ok "timeout: another role's 5 jobs, submitted with them, complete within 15 s" \
    "SELECT count(*) = 5 AND bool_and(j.status = 'completed') FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'other'" \
    "$(outcomes_sql other)"
jl_wait_for $((15 - (SECONDS - t0) > 1 ? 15 - (SECONDS - t0) : 1)) finished evil || true
tap_sql_ok "timeout: both jobs that catch query_canceled fail within 15 s, naming jobloop.function_timeout" \
    "SELECT count(*) = 2 AND bool_and(j.status = 'failed' AND j.last_error LIKE '%jobloop.function_timeout%')
       FROM h.jobs p JOIN jobloop.jobs j USING (id) WHERE p.phase = 'evil'" \
    "$(outcomes_sql evil)"
tap_is "$(crashes_since "$LOG3")" "" "timeout: no process died by a signal (a restart of the worker is allowed, a crash is not)"

# ==== the whole run ==========================================================================
tap_is "$(crashes_since "$LOG0")" "" "no process died by a signal, no crash restart, no heap corruption in the whole run"

tap_diag "hostile.sh ran in $((SECONDS - t_start)) s"
tap_done
