#!/usr/bin/env bash
# test/suites/pause.sh -- jobloop.pause() / resume() and jobloop.start_paused, as the API
# and the table see them.
#
# Prints TAP.  Starts its own cluster (2 workers) and nginx mock; run it alone with
# `prove test/suites/pause.sh` once jobloop is built and installed.
#
#   pause     30 jobs of 6 steps (one call each, 300 ms apart) of two tenants; the whole
#             database is paused mid-run: the calls in flight finish and commit their
#             step, then no request reaches the API; no worker holds a job; the jobs
#             show as paused in jobloop.jobs and jobloop.stats
#   resume    every job completes, each (job, step) requested exactly once in all:
#             pausing lost and repeated nothing
#   scoped    a pause of one tenant holds only that tenant's jobs, one of a kind only
#             that kind's
#   cancels   pausing a kind and cancelling its 600 waiting jobs in one transaction (the
#             cancel queues overflow): every job let go, no worker dies
#   start     with jobloop.start_paused = on, a restarted server's database starts
#             paused: submitted jobs stay pending until resume()
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
requests() { grep -cE '"jobloop-[0-9a-f-]{36}-[0-9]+"' "$JL_MOCK_LOG" || true; }

jl_cluster_start "jobloop.workers = 2" >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 17

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA ps;
CREATE FUNCTION ps.req(s jsonb) RETURNS jsonb LANGUAGE sql RETURN jsonb_build_object(
    'url', '$JL_MOCK_URL/delay?s=0.1&n=' || coalesce(s->>'n', '0'),
    'delay_ms', CASE WHEN s ? 'n' THEN 300 ELSE 0 END);
CREATE FUNCTION ps.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql
    RETURN s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1,
                                   'seen', coalesce(s->'seen', '[]') || to_jsonb((r->'body'->>'n')::int));
CREATE FUNCTION ps.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= 6;
SELECT jobloop.create_kind('ps', 'ps.req(jsonb)', 'ps.step(jsonb,jsonb)', 'ps.done(jsonb)');
SELECT jobloop.create_kind('ps_other', 'ps.req(jsonb)', 'ps.step(jsonb,jsonb)', 'ps.done(jsonb)');
SQL

# ---- pause mid-run --------------------------------------------------------------------
q "SELECT count(jobloop.submit('ps', '{}', 'shop-' || g % 2)) FROM generate_series(1, 30) g" >/dev/null
some_steps() { (( $(q "SELECT count(*) FROM jobloop.jobs WHERE step >= 2") >= 10 )); }
jl_wait_for 30 some_steps || tap_bail "the jobs did not start"
q "SELECT jobloop.pause()" >/dev/null

# Calls in flight finish and commit; then every job is back in the table, paused.
let_go() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE worker IS NOT NULL")" == 0 ]]; }
rc=0
jl_wait_for 20 let_go || rc=$?
tap_ok $rc "after pause(), the workers hold no job" \
    "$(q "SELECT string_agg(id || ':' || status || ':' || worker, ' ') FROM jobloop.jobs WHERE worker IS NOT NULL")"
tap_is "$(q "SELECT sum(held) FROM jobloop.worker_stats() WHERE database = 'jobloop'")" "0" \
    "... and worker_stats() says so (no job in worker memory)"
unfinished=$(q "SELECT count(*) FROM jobloop.jobs WHERE status IN ('pending', 'running')")
tap_ok "$( (( unfinished > 0 )); echo $?)" "the pause came mid-run ($unfinished jobs unfinished)"
tap_is "$(q "SELECT count(*) FILTER (WHERE paused) || ' ' || count(*) FROM jobloop.jobs
              WHERE status IN ('pending', 'running')")" "$unfinished $unfinished" \
    "jobloop.jobs shows every unfinished job as paused"
tap_is "$(q "SELECT paused FROM jobloop.stats")" "$unfinished" "jobloop.stats counts them as paused"

# Nothing reaches the API while paused.  An absence is observed over a window: two of the
# workers' idle claim intervals (500 ms), in which they would have claimed and sent.
before=$(requests)
q "SELECT pg_sleep_for('1 second')" >/dev/null
tap_is "$(requests)" "$before" "no request reaches the API while the database is paused"

# ---- resume -----------------------------------------------------------------------------
tap_is "$(q "SELECT jobloop.resume()")" "1" "resume() removes the pause"
all_done() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'")" == 30 ]]; }
rc=0
jl_wait_for 60 all_done || rc=$?
tap_ok $rc "after resume(), every job completes"
tap_is "$(q "SELECT count(*) FROM jobloop.jobs WHERE state->'seen' IS DISTINCT FROM '[0,1,2,3,4,5]'")" "0" \
    "every job saw each step's response once, in order"
tap_is "$(requests)" "180" "the API received 180 requests for 30 jobs x 6 steps: none lost, none repeated"

# ---- scoped pauses ----------------------------------------------------------------------
q "SELECT jobloop.pause(tenant => 'shop-1'), jobloop.pause(kind => 'ps_other')" >/dev/null
a=$(q "SELECT jobloop.submit('ps', '{}', 'shop-0')")
b=$(q "SELECT jobloop.submit('ps', '{}', 'shop-1')")
c=$(q "SELECT jobloop.submit('ps_other', '{}', 'shop-0')")
a_done() { [[ "$(q "SELECT status FROM jobloop.jobs WHERE id = $a")" == completed ]]; }
jl_wait_for 30 a_done || true
tap_is "$(q "SELECT string_agg(status || ':' || step, ' ' ORDER BY id) FROM jobloop.jobs WHERE id IN ($a, $b, $c)")" \
    "completed:6 pending:0 pending:0" \
    "with tenant shop-1 and kind ps_other paused, only the other job ran"
q "SELECT jobloop.resume()" >/dev/null

# ---- pause and cancel together ----------------------------------------------------------
# 600 jobs waiting 8 s in the workers' memory between steps; one transaction pauses their
# kind and cancels them all, which overflows the workers' cancel queues (256), so each
# rescans what it holds in the batch that also lets go of the paused jobs.
jl_psql >/dev/null <<SQL || tap_bail "could not create kind ps_wait"
CREATE FUNCTION ps.req_wait(s jsonb) RETURNS jsonb LANGUAGE sql RETURN jsonb_build_object(
    'url', '$JL_MOCK_URL/json?n=' || coalesce(s->>'n', '0'),
    'delay_ms', CASE WHEN s ? 'n' THEN 8000 ELSE 0 END);
SELECT jobloop.create_kind('ps_wait', 'ps.req_wait(jsonb)', 'ps.step(jsonb,jsonb)', 'ps.done(jsonb)');
SQL
q "SELECT count(jobloop.submit('ps_wait', '{}', 'shop-w')) FROM generate_series(1, 600)" >/dev/null
waiting() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE kind = 'ps_wait' AND step = 1 AND worker IS NOT NULL")" == 600 ]]; }
jl_wait_for 60 waiting || tap_bail "the 600 jobs did not reach their wait"
pids_before=$(q "SELECT string_agg(pid::text, ' ' ORDER BY pid) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")
jl_psql >/dev/null <<'SQL'
BEGIN;
SELECT jobloop.pause(kind => 'ps_wait');
SELECT count(jobloop.cancel(id)) FROM jobloop.jobs WHERE kind = 'ps_wait' AND status = 'running';
COMMIT;
SQL
released() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE kind = 'ps_wait' AND worker IS NOT NULL")" == 0 ]]; }
rc=0
jl_wait_for 30 released || rc=$?
tap_ok $rc "pausing a kind and cancelling its 600 waiting jobs in one transaction: all let go"
tap_is "$(q "SELECT string_agg(pid::text, ' ' ORDER BY pid) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")" \
    "$pids_before" "... and both workers are the same processes (none died)"
tap_is "$(grep -c 'terminated by signal' "$JL_PGLOG" || true)" "0" "... no process died by a signal"
q "SELECT jobloop.resume()" >/dev/null

# ---- start_paused -----------------------------------------------------------------------
cat >>"$JL_PGDATA/postgresql.conf" <<'CONF'
jobloop.start_paused = on
CONF
jl_cluster_restart_immediate >&2 || tap_bail "could not restart the cluster"
paused_at_start() { [[ "$(q "SELECT count(*) FROM jobloop.pause WHERE kind IS NULL AND tenant IS NULL")" == 1 ]]; }
rc=0
jl_wait_for 30 paused_at_start || rc=$?
tap_ok $rc "with jobloop.start_paused, the database is paused when the workers start"
d=$(q "SELECT jobloop.submit('ps', '{}', 'shop-0')")
q "SELECT pg_sleep_for('1 second')" >/dev/null   # the same observation window
tap_is "$(q "SELECT status FROM jobloop.jobs WHERE id = $d")" "pending" "... a new job stays pending"
q "SELECT jobloop.resume()" >/dev/null
d_done() { [[ "$(q "SELECT status FROM jobloop.jobs WHERE id = $d")" == completed ]]; }
rc=0
jl_wait_for 30 d_done || rc=$?
tap_ok $rc "... and runs after resume()"

tap_done
