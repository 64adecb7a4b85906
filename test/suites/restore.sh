#!/usr/bin/env bash
# test/suites/restore.sh -- a database with jobloop is dumped mid-run and restored into
# another database: the restored jobs resume at once, with the same Idempotency-Keys.
#
# Prints TAP.  Starts its own cluster (jobloop.database = 'jobloop, jl_copy', one worker
# each: worker 1 serves jobloop, worker 2 jl_copy) and nginx mock; run it alone with
# `prove test/suites/restore.sh` once jobloop is built and installed.
#
#   keys     a job whose step 1 is in flight (a 3 s call) when pg_dump runs is restored
#            into jl_copy; jl_copy's worker sends step 1 again with exactly the key the
#            source sent (jobloop-<key_token>-1): an API that honours Idempotency-Key
#            performs it once.  (The key used to name the cluster's system identifier
#            and database, so the copy sent a different one.)
#   holds    the restored rows say "held by worker 1", a worker jl_copy does not have,
#            with a lease far in the future: jl_copy's worker frees them at once
#            (seconds, not the lease) and runs the jobs to completion
#   retry    retry() of a failed job in the copy runs it again from its step, with the
#            same keys
#   owner    the database owner, not a superuser but a member of jobloop_admin, dumps
#            every job with pg_dump --enable-row-security
#   no db    until jl_copy is created, its worker logs one FATAL, then waits quietly
#            (one LOG line) instead of failing every 5 seconds
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

q() {       # q DB SQL: one value
    local db=$1
    shift
    jl_psql -d "$db" -At -c "$*"
}

jl_cluster_start "jobloop.database = 'jobloop, jl_copy'" "jobloop.workers = 1" \
    "jobloop.lease_timeout = '1h'" >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 17

work=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-restore.XXXXXX")
jl_on_exit rm -rf -- "$work"

jl_psql -d jobloop >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA rs;
-- Step n of a job calls /delay?s=<the state's delay for n>&n=n; "fail_at" makes that step
-- get a 422, which the step function turns into an error.
CREATE FUNCTION rs.req(s jsonb) RETURNS jsonb LANGUAGE sql RETURN jsonb_build_object(
    'url', CASE WHEN (s->>'n')::int = (s->>'fail_at')::int AND NOT s ? 'fixed'
                THEN '$JL_MOCK_URL/status/422'
                ELSE format('$JL_MOCK_URL/delay?s=%s&n=%s', coalesce(s->'delays'->>(s->>'n')::int, '0'),
                            s->>'n') END);
CREATE FUNCTION rs.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF (r->>'status')::int >= 400 THEN
        RAISE EXCEPTION 'the API said %', r->>'status';
    END IF;
    RETURN s || jsonb_build_object('n', (s->>'n')::int + 1);
END
\$\$;
CREATE FUNCTION rs.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= 3;
SELECT jobloop.create_kind('rs', 'rs.req(jsonb)', 'rs.step(jsonb,jsonb)', 'rs.done(jsonb)');
SQL

# A job whose step 1 takes 3 s, and one that fails at step 1.
slow=$(q jobloop "SELECT jobloop.submit('rs', '{\"n\": 0, \"delays\": [0, 3, 0]}')")
bad=$(q jobloop "SELECT jobloop.submit('rs', '{\"n\": 0, \"fail_at\": 1}')")
token=$(q jobloop "SELECT key_token FROM (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j WHERE id = $slow")
key1="jobloop-$token-1"

# Step 0 committed, so step 1's request is on its way (its answer takes 3 s).
in_flight() { [[ "$(q jobloop "SELECT step FROM jobloop.jobs WHERE id = $slow")" == 1 ]]; }
jl_wait_for 20 in_flight || tap_bail "step 1 of job $slow did not start"
failed() { [[ "$(q jobloop "SELECT status FROM jobloop.jobs WHERE id = $bad")" == failed ]]; }
jl_wait_for 20 failed || tap_bail "job $bad did not fail"

# Dump while step 1 of the slow job is in flight (the API answers after 3 s).
rc=0
"$JL_PGBIN/pg_dump" -h "$PGHOST" -p "$PGPORT" -U postgres -Fc -f "$work/jobloop.dump" jobloop \
    2>"$work/dump.err" || rc=$?
tap_ok $rc "pg_dump of a database with jobloop, mid-run" "$(cat "$work/dump.err")"
tap_is "$(q jobloop "SELECT status || ':' || step || ':' || (worker IS NOT NULL) FROM jobloop.jobs WHERE id = $slow")" \
    "running:1:true" "the dump was taken with step 1 in flight, the job held by worker 1"

# The source finishes the job, sending step 1 once.
done_src() { [[ "$(q jobloop "SELECT status FROM jobloop.jobs WHERE id = $slow")" == completed ]]; }
jl_wait_for 30 done_src || true

# Worker 2's database does not exist yet: its first start fails (FATAL, once), and the
# next one waits for the database quietly, with a backoff.
waits_for_db() { grep -q 'jobloop worker 2 waits for database "jl_copy", which does not exist' "$JL_PGLOG"; }
rc=0
jl_wait_for 30 waits_for_db || rc=$?
tap_ok $rc "a worker whose database does not exist says so once and waits for it"
tap_is "$(grep -c 'FATAL:  database "jl_copy" does not exist' "$JL_PGLOG" || true)" "1" \
    "... after one FATAL, not one every 5 seconds"

q postgres "CREATE DATABASE jl_copy" >/dev/null
rc=0
"$JL_PGBIN/pg_restore" -h "$PGHOST" -p "$PGPORT" -U postgres -d jl_copy "$work/jobloop.dump" \
    2>"$work/restore.err" || rc=$?
tap_ok $rc "pg_restore into jl_copy, which worker 2 serves" "$(cat "$work/restore.err")"
# jobloop.stats counts from counters that the restore's COPY of jobloop.job fills (its
# triggers); compared with count(*) in one snapshot.
tap_is "$(q jl_copy "SELECT format('%s/%s/%s/%s/%s', s.pending = c.pending, s.running = c.running,
                                    s.completed = c.completed, s.failed = c.failed, s.cancelled = c.cancelled)
                      FROM jobloop.stats s,
                           (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                                   count(*) FILTER (WHERE status = 'running') AS running,
                                   count(*) FILTER (WHERE status = 'completed') AS completed,
                                   count(*) FILTER (WHERE status = 'failed') AS failed,
                                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                              FROM jobloop.jobs) c")" "t/t/t/t/t" \
    "jobloop.stats in the copy counts every status as count(*) does"

# Finished jobs came back in the partitions they were in, attached to the copy's
# finished_job (the failed job, finished before the dump); the workers' retention drops
# such a partition whole like any other, counting its jobs out (run here for a day
# ahead with a retention of 10 s, as a worker would then).
part=$(q jobloop "SELECT tableoid::regclass FROM jobloop.finished_job WHERE id = $bad")
tap_is "$(q jl_copy "SELECT p.partition || ' ' || (f.id IS NOT NULL)
                       FROM jobloop.finished_job_partitions() p
                       LEFT JOIN jobloop.finished_job f ON f.tableoid = p.partition AND f.id = $bad
                      WHERE p.partition = '$part'::regclass")" "$part true" \
    "the copy's finished jobs are in the same partitions as the source's, attached"

# The restored job resumes at step 1: held by "worker 1" with an hour-long lease, which
# jl_copy's worker (2) must not wait out.
done_copy() { [[ "$(q jl_copy "SELECT status FROM jobloop.jobs WHERE id = $slow")" == completed ]]; }
rc=0
jl_wait_for 20 done_copy || rc=$?
tap_ok $rc "the restored job completes in the copy within seconds (the old cluster's hold is freed at once)" \
    "$(q jl_copy "SELECT status, step, worker, lease_expires_at FROM jobloop.jobs WHERE id = $slow")"
tap_is "$(q jl_copy "SELECT key_token FROM (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j WHERE id = $slow")" "$token" \
    "the restored row has the same key_token"
tap_is "$(grep -cF "\"$key1\"" "$JL_MOCK_LOG" || true)" "2" \
    "step 1 reached the API twice, from the source and from the copy, with the same key $key1"
tap_is "$(grep -cE "\"jobloop-$token-[0-9]+\"" "$JL_MOCK_LOG" || true)" "5" \
    "... and every other step of the job once from each side (steps 0 and 2 from the source, 2 from the copy)"

# retry() in the copy: the failed job runs again from step 1 with the same keys.
bad_token=$(q jl_copy "SELECT key_token FROM (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j WHERE id = $bad")
q jl_copy "UPDATE jobloop.finished_job SET state = state || '{\"fixed\": true}' WHERE id = $bad" >/dev/null
tap_is "$(q jl_copy "SELECT jobloop.retry($bad)")" "t" "retry() of the failed job in the copy"
done_bad() { [[ "$(q jl_copy "SELECT status FROM jobloop.jobs WHERE id = $bad")" == completed ]]; }
rc=0
jl_wait_for 20 done_bad || rc=$?
tap_ok $rc "it runs again from step 1 and completes" \
    "$(q jl_copy "SELECT status, step, last_error FROM jobloop.jobs WHERE id = $bad")"
tap_is "$(grep -cF "\"jobloop-$bad_token-1\"" "$JL_MOCK_LOG" || true)" "2" \
    "its step 1 reached the API with the same key before (the 422) and after the retry"

tap_is "$(q jl_copy "SELECT count(*) FILTER (WHERE status = 'dropped') > 0 FROM jobloop.maintain_finished_partitions('10 s', now() + interval '1 day')")|$(
          q jl_copy "SELECT count(*) FROM jobloop.finished_job_partitions() WHERE partition::text = '$part'")|$(
          q jl_copy "SELECT format('%s/%s/%s/%s/%s', s.pending = c.pending, s.running = c.running,
                                    s.completed = c.completed, s.failed = c.failed, s.cancelled = c.cancelled)
                      FROM jobloop.stats s,
                           (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                                   count(*) FILTER (WHERE status = 'running') AS running,
                                   count(*) FILTER (WHERE status = 'completed') AS completed,
                                   count(*) FILTER (WHERE status = 'failed') AS failed,
                                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                              FROM jobloop.jobs) c")" "t|0|t/t/t/t/t" \
    "retention drops the restored partition like any other, and the counts still agree"

# A database owner who is not a superuser dumps every job: as a member of jobloop_admin,
# with --enable-row-security (pg_dump's default, row_security = off, refuses a table with
# row-level security to anyone but its owner).
q postgres "CREATE ROLE jl_dbo LOGIN; ALTER DATABASE jobloop OWNER TO jl_dbo; GRANT jobloop_admin TO jl_dbo" >/dev/null
rc=0
"$JL_PGBIN/pg_dump" -h "$PGHOST" -p "$PGPORT" -U jl_dbo --enable-row-security -f "$work/owner.sql" jobloop \
    2>"$work/owner.err" || rc=$?
tap_ok $rc "pg_dump by the database owner (not a superuser, a member of jobloop_admin)" "$(cat "$work/owner.err")"
tap_is "$(awk '/^COPY jobloop\.(job|finished_job_[0-9a-z_]+) /{f=1; next} /^\\\.$/{f=0} f' "$work/owner.sql" | wc -l)" \
    "$(q jobloop "SELECT count(*) FROM jobloop.jobs")" "... with every job in it"

tap_done
