#!/usr/bin/env bash
# test/suites/retention.sh -- retention by partitions: finished jobs move to
# jobloop.finished_job, partitioned by finished_at, and the workers make the partitions
# ahead and drop expired ones whole, without ever queueing behind a long reader.
#
# Prints TAP.  Starts its own cluster (2 workers, jobloop.retention = 10s, so partitions
# are a minute wide; lease_timeout 6s, so a heartbeat every 2 s) and nginx mock; run it
# alone with `prove test/suites/retention.sh` once jobloop is built and installed.
#
#   ahead     the workers make the partitions of this minute and the next two
#   move      finished jobs are in a partition, none in jobloop.job or the default one
#   reader    a session reading finished_job in an open transaction (ACCESS SHARE on it
#             and its partitions): jobs keep completing, and the partition that expires
#             meanwhile is not detached (the workers give up their lock after 100 ms and
#             log it); once the reader is gone, it is detached, counted out and dropped
#   rows      expired rows that no partition covers (in the default partition, and
#             finished rows left in jobloop.job by a version before 0.5.0) are deleted
#   counts    jobloop.stats still agrees with count(*)
#
# Counted, not timed: the waits are deadlines on conditions (the longest, about 70 s, is
# for the first partition to expire: its minute plus retention).
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

jl_cluster_start "jobloop.workers = 2" "jobloop.retention = '10s'" "jobloop.lease_timeout = '6s'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 11

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA rt;
CREATE FUNCTION rt.req(s jsonb) RETURNS jsonb LANGUAGE sql
    RETURN jsonb_build_object('url', '$JL_MOCK_URL/json?n=' || coalesce(s->>'n', '0'));
CREATE FUNCTION rt.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql
    RETURN s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1);
CREATE FUNCTION rt.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= 2;
SELECT jobloop.create_kind('rt', 'rt.req(jsonb)', 'rt.step(jsonb,jsonb)', 'rt.done(jsonb)');
SQL

# ---- ahead ----
ahead() {
    [[ "$(q "SELECT count(*) FROM jobloop.finished_job_partitions()
              WHERE upper_bound > now() AND lower_bound <= now() + interval '2 minutes'")" == 3 ]]
}
rc=0; jl_wait_for 30 ahead || rc=$?
tap_ok $rc "the workers make the partitions of this minute and the next two" \
    "$(q "SELECT string_agg(partition || ' ' || lower_bound || ' ' || upper_bound, E'\n') FROM jobloop.finished_job_partitions()")"

# ---- move ----
q "SELECT count(jobloop.submit('rt', '{}')) FROM generate_series(1, 50)" >/dev/null
all_done() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'")" == 50 ]]; }
rc=0; jl_wait_for 60 all_done || rc=$?
tap_ok $rc "50 jobs completed"
tap_is "$(q "SELECT (SELECT count(*) FROM jobloop.job) || ' ' ||
                    (SELECT count(*) FROM jobloop.finished_job_default) || ' ' ||
                    (SELECT count(*) FROM jobloop.finished_job
                      WHERE tableoid <> 'jobloop.finished_job_default'::regclass)")" "0 0 50" \
    "every finished job moved to a partition: none in jobloop.job or in the default partition"
# the partition of the first job to finish (they may straddle a minute)
first_part=$(q "SELECT tableoid::regclass::text FROM jobloop.finished_job ORDER BY finished_at LIMIT 1")

# Expired rows no partition covers: one in the default partition (it finished 2 hours
# ago), and a finished job in jobloop.job as a version before 0.5.0 left it.
q "INSERT INTO jobloop.finished_job (id, kind, owner, status, state, finished_at)
   VALUES (1000001, 'rt', current_user::regrole, 'completed', '{}', now() - interval '2 hours');
   INSERT INTO jobloop.job (kind, owner, status, state, finished_at)
   VALUES ('rt', current_user::regrole, 'completed', '{}', now() - interval '2 hours')" >/dev/null

# ---- reader ----
# A dashboard's long query: a transaction that read finished_job and stays open.
reader_log=$(mktemp "${TMPDIR:-/tmp}/jobloop-reader.XXXXXX")
jl_on_exit rm -f -- "$reader_log"
PGAPPNAME=jl_reader jl_psql -At >"$reader_log" 2>&1 <<'SQL' &
BEGIN;
SELECT count(*) FROM jobloop.jobs;
SELECT pg_sleep(300);
COMMIT;
SQL
reader_pid=$!
reading() { [[ "$(q "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                      WHERE a.application_name = 'jl_reader' AND l.granted
                        AND l.relation = 'jobloop.finished_job'::regclass")" == 1 ]]; }
jl_wait_for 20 reading || tap_bail "the reader did not start"

# $first_part expires 10 s (retention) after its upper bound; give the workers two heartbeats
expired() { [[ "$(q "SELECT upper_bound + interval '14 s' < now() FROM jobloop.finished_job_partitions()
                      WHERE partition::text = '$first_part'")" == t ]]; }
rc=0; jl_wait_for 100 expired || rc=$?
tap_ok $rc "$first_part expired while the reader holds its lock, and is still there" \
    "$(q "SELECT string_agg(partition || ' ' || lower_bound || ' ' || upper_bound, E'\n') FROM jobloop.finished_job_partitions()")"
tap_ok "$(grep -q 'could not lock jobloop.finished_job within 100 ms' "$JL_PGLOG"; echo $?)" \
    "... the workers gave up their lock after 100 ms, and said so" "$(grep 'jobloop worker' "$JL_PGLOG" | tail -n 5)"

q "SELECT count(jobloop.submit('rt', '{}')) FROM generate_series(1, 100)" >/dev/null
more_done() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'")" == 150 ]]; }
rc=0; jl_wait_for 30 more_done || rc=$?
tap_ok $rc "with the reader still there, 100 more jobs completed (the workers' finishes do not queue)" \
    "$(q "SELECT status, count(*) FROM jobloop.jobs GROUP BY 1")"
tap_is "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jl_reader'
              AND state = 'active'")" "1" "... the reader's transaction was open all along"

q "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'jl_reader'" >/dev/null
wait "$reader_pid" 2>/dev/null || true
gone() { [[ "$(q "SELECT count(*) FROM jobloop.finished_job_partitions() WHERE partition::text = '$first_part'")" == 0 ]]; }
rc=0; jl_wait_for 30 gone || rc=$?
tap_ok $rc "once the reader is gone, the expired partition is dropped" \
    "$(grep 'jobloop worker' "$JL_PGLOG" | tail -n 5)"
tap_ok "$(grep -qE "dropped expired partition $first_part of finished jobs \([0-9]+ jobs\)" "$JL_PGLOG"; echo $?)" \
    "... with its jobs, as the log says" "$(grep 'dropped' "$JL_PGLOG" || true)"

# ---- rows ----
rows_gone() { [[ "$(q "SELECT (SELECT count(*) FROM jobloop.finished_job_default) +
                              (SELECT count(*) FROM jobloop.job WHERE finished_at IS NOT NULL)")" == 0 ]]; }
rc=0; jl_wait_for 30 rows_gone || rc=$?
tap_ok $rc "expired rows no partition covers are deleted (the default partition, old rows in jobloop.job)"

# ---- counts ----
tap_is "$(q "SELECT format('%s/%s/%s/%s/%s', s.pending = c.pending, s.running = c.running,
                           s.completed = c.completed, s.failed = c.failed, s.cancelled = c.cancelled)
               FROM jobloop.stats s,
                    (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                            count(*) FILTER (WHERE status = 'running') AS running,
                            count(*) FILTER (WHERE status = 'completed') AS completed,
                            count(*) FILTER (WHERE status = 'failed') AS failed,
                            count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                       FROM jobloop.jobs) c")" "t/t/t/t/t" \
    "jobloop.stats counts every status as count(*) does, after moves, drops and deletes"

tap_done
