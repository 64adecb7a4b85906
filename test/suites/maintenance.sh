#!/usr/bin/env bash
# test/suites/maintenance.sh -- what keeps a long-running installation healthy: the
# workers report table statistics, so autovacuum cleans up after them, and an idle
# worker closes its connections.
#
# Prints TAP.  Starts its own cluster (1 worker, autovacuum every second, insert-driven
# vacuums off, jobloop.idle_connection_timeout = 2s) and nginx mock; run it alone with
# `prove test/suites/maintenance.sh` once jobloop is built and installed.
#
#   stats       after 40 jobs of 25 steps each, pg_stat_user_tables counts the workers'
#               updates of jobloop.job (n_tup_upd): only the workers update that table
#   autovacuum  with jobloop.job's vacuum threshold at 50 dead rows and insert-driven
#               vacuums disabled, autovacuum vacuums the table: only the steps' updates,
#               reported by the worker, can have triggered it
#   idle        after the burst, the worker has sockets to the mock; once it has been
#               idle for idle_connection_timeout it has none (and none in CLOSE-WAIT)
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

jl_cluster_start "jobloop.workers = 1" "autovacuum_naptime = 1" \
    "autovacuum_vacuum_insert_threshold = -1" "jobloop.idle_connection_timeout = '2s'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 5

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
-- Only the steps' updates may count towards a vacuum: 50 dead rows (HOT pruning removes
-- most as it goes), whatever the size; and an analyze: 200 changed rows.
ALTER TABLE jobloop.job SET (autovacuum_vacuum_threshold = 50, autovacuum_vacuum_scale_factor = 0,
                             autovacuum_analyze_threshold = 200, autovacuum_analyze_scale_factor = 0);
CREATE SCHEMA mt;
CREATE FUNCTION mt.req(s jsonb) RETURNS jsonb LANGUAGE sql
    RETURN jsonb_build_object('url', '$JL_MOCK_URL/json?n=' || coalesce(s->>'n', '0'));
CREATE FUNCTION mt.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql
    RETURN s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1);
CREATE FUNCTION mt.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= 25;
SELECT jobloop.create_kind('mt', 'mt.req(jsonb)', 'mt.step(jsonb,jsonb)', 'mt.done(jsonb)',
                           notify_steps => false);
SQL

# Statistics and autovacuum counters as they are before any job runs.
worker_pid=$(q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")
vacuums_before=$(q "SELECT autovacuum_count FROM pg_stat_user_tables
                    WHERE relid = 'jobloop.job'::regclass")

q "SELECT count(jobloop.submit('mt', '{}')) FROM generate_series(1, 40)" >/dev/null
all_done() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'")" == 40 ]]; }
rc=0; jl_wait_for 120 all_done || rc=$?
tap_ok $rc "40 jobs of 25 steps completed"

# Sockets of the worker to the mock's port, in any state; and those in CLOSE-WAIT.
mock_sockets() {
    ss -tanp 2>/dev/null | grep -F "pid=$worker_pid," | grep -cF ":$JL_MOCK_PORT" || true
}
had=$(mock_sockets)
rc=0; (( had > 0 )) || rc=1
tap_ok $rc "right after the burst the worker has connections to the API ($had)"


# The worker reports at most once a second, and what it held back within 10 s.
updates_counted() {
    (( $(q "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'jobloop.job'::regclass") >= 1000 ))
}
rc=0; jl_wait_for 30 updates_counted || rc=$?
tap_ok $rc "pg_stat_user_tables counts the workers' updates of jobloop.job" \
    "$(q "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup FROM pg_stat_user_tables
          WHERE relid = 'jobloop.job'::regclass")"

vacuumed() {
    (( $(q "SELECT autovacuum_count FROM pg_stat_user_tables
            WHERE relid = 'jobloop.job'::regclass") > vacuums_before ))
}
rc=0; jl_wait_for 60 vacuumed || rc=$?
tap_ok $rc "autovacuum vacuumed jobloop.job, which only the workers changed" \
    "$(q "SELECT autovacuum_count, n_dead_tup, last_autovacuum FROM pg_stat_user_tables
          WHERE relid = 'jobloop.job'::regclass")"

no_sockets() { [[ "$(mock_sockets)" == 0 ]]; }
rc=0; jl_wait_for 30 no_sockets || rc=$?
tap_ok $rc "idle for jobloop.idle_connection_timeout, the worker has closed them all" \
    "$(ss -tanp | grep -F "pid=$worker_pid," || true)"

tap_done
