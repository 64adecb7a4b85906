#!/usr/bin/env bash
# test/suites/failover.sh -- a primary with a synchronous streaming standby; the primary
# is crash-stopped mid-run and the standby promoted: every job finishes there.
#
# Prints TAP.  Starts its own primary (scripts/lib.sh), a standby made with
# pg_basebackup on another loopback port, and the nginx mock; run it alone with
# `prove test/suites/failover.sh` once jobloop is built and installed.
#
#   standby   no jobloop worker runs on the standby (workers start when recovery has
#             finished); submit() there fails with a clear read-only error
#   failover  40 jobs of 6 steps run on the primary with synchronous_commit on;
#             `pg_ctl stop -m immediate` of the primary mid-run, then pg_promote() of
#             the standby: every job completes on the new primary, each step counted
#             exactly once (state.seen = [0..5]), and every request any of the two
#             servers sent carries the key of the job and step it belongs to (the
#             key token is in the replicated row), and the steps in flight at the crash
#             were re-sent with the key of their first sending
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

JOBS=40
K=6

jl_cluster_start "jobloop.workers = 2" "wal_level = replica" "max_wal_senders = 4" \
    "hot_standby = on" >&2 || tap_bail "could not start the primary"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 9

primary_port=$PGPORT
qp() { jl_psql -p "$primary_port" -At -c "$1"; }

# ---- the standby: pg_basebackup -R, another port, its own log ----------------------------
standby_dir=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-standby.XXXXXX")
jl_on_exit _jl_rm_dir "$standby_dir"
chown postgres:postgres "$standby_dir" 2>/dev/null || true
chmod 0755 "$standby_dir"
standby_data=$standby_dir/data
standby_log=$standby_dir/server.log
_jl_as_pg "$JL_PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres \
    -D "$standby_data" -R -X stream --no-sync >"$standby_dir/basebackup.log" 2>&1 \
    || { cat "$standby_dir/basebackup.log" >&2; tap_bail "pg_basebackup failed"; }
standby_port=$(jl_free_port)
{
    echo "port = $standby_port"
    echo "unix_socket_directories = '$standby_dir'"
    echo "primary_conninfo = 'host=127.0.0.1 port=$primary_port user=postgres application_name=standby1'"
} >>"$standby_data/postgresql.auto.conf"
jl_on_exit _jl_cluster_cleanup "$standby_data"
_jl_pg_ctl_start "$standby_data" "$standby_log" >"$standby_dir/pg_ctl.out" 2>&1 \
    || { tail -n 20 "$standby_log" >&2; tap_bail "the standby did not start"; }
qs() { jl_psql -p "$standby_port" -At -c "$1"; }

qp "ALTER SYSTEM SET synchronous_standby_names = 'standby1'" >/dev/null
qp "SELECT pg_reload_conf()" >/dev/null
sync_standby() { [[ "$(qp "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'")" == sync ]]; }
jl_wait_for 30 sync_standby || tap_bail "the standby did not become synchronous"

jl_psql -p "$primary_port" >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA fo;
CREATE FUNCTION fo.req(s jsonb) RETURNS jsonb LANGUAGE sql RETURN jsonb_build_object(
    'url', '$JL_MOCK_URL/delay?s=0.3&n=' || coalesce(s->>'n', '0'));
CREATE FUNCTION fo.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql
    RETURN s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1,
                                   'seen', coalesce(s->'seen', '[]') || to_jsonb((r->'body'->>'n')::int));
CREATE FUNCTION fo.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= $K;
SELECT jobloop.create_kind('fo', 'fo.req(jsonb)', 'fo.step(jsonb,jsonb)', 'fo.done(jsonb)');
SQL
replicated() { [[ "$(qs "SELECT count(*) FROM jobloop.kind")" == 1 ]]; }
jl_wait_for 30 replicated || tap_bail "the kind did not reach the standby"

# ---- the standby runs no worker and refuses submits ---------------------------------------
tap_is "$(qs "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")" "0" \
    "no jobloop worker runs on the standby"
err=$(jl_psql -p "$standby_port" -At -c "SELECT jobloop.submit('fo', '{}')" 2>&1 || true)
tap_ok "$([[ "$err" == *"cannot submit jobs on a standby server"* ]]; echo $?)" \
    "submit() on the standby fails with a clear read-only error" "$err"

# ---- run, crash the primary, promote -------------------------------------------------------
qp "SELECT count(jobloop.submit('fo', '{}', 'shop-' || g % 4)) FROM generate_series(1, $JOBS) g" >/dev/null
midway() { (( $(qp "SELECT count(*) FROM jobloop.jobs WHERE step >= 2") >= JOBS / 2 )); }
jl_wait_for 60 midway || tap_bail "the jobs made no progress"
_jl_as_pg "$JL_PGBIN/pg_ctl" -D "$JL_PGDATA" -m immediate stop >/dev/null 2>&1 \
    || tap_bail "could not crash-stop the primary"
unfinished=$(qs "SELECT count(*) FROM jobloop.jobs WHERE status <> 'completed'")
tap_ok "$( (( unfinished > 0 )); echo $?)" "the primary stopped mid-run ($unfinished of $JOBS jobs unfinished on the standby)"
tap_is "$(qs "SELECT pg_promote(wait => true)")" "t" "the standby is promoted"

# ---- the new primary finishes every job ----------------------------------------------------
workers_up() { [[ "$(qs "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")" == 2 ]]; }
rc=0
jl_wait_for 30 workers_up || rc=$?
tap_ok $rc "the workers start on the new primary"
all_done() { [[ "$(qs "SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'")" == "$JOBS" ]]; }
rc=0
jl_wait_for 90 all_done || rc=$?
tap_ok $rc "every job completes on the new primary" \
    "$(qs "SELECT status, count(*) FROM jobloop.jobs GROUP BY 1")"
expected_seen=$(qs "SELECT jsonb_agg(g) FROM generate_series(0, $K - 1) g")
tap_is "$(qs "SELECT count(*) FROM jobloop.jobs WHERE state->'seen' IS DISTINCT FROM '$expected_seen'::jsonb")" "0" \
    "each step counted exactly once (state.seen = $expected_seen for every job)"

# Every request either server sent: its key is jobloop-<key_token of a job>-<step>, and its
# n= is that step (the response went to the job and step it was for).
bad=$( (echo "CREATE TEMP TABLE raw (line text); COPY raw FROM STDIN WITH (FORMAT text, DELIMITER E'\\x01');"
        cat "$JL_MOCK_LOG"; echo '\.'
        echo "SELECT count(*) FILTER (WHERE j.id IS NULL OR (regexp_match(r.line, '[?&]n=([0-9]+)'))[1]::int
                                              IS DISTINCT FROM k[2]::int)
                     || ' of ' || count(*) || ' resent ' || (count(*) - count(DISTINCT k[1] || k[2]))
                FROM raw r
                CROSS JOIN LATERAL regexp_match(r.line, '\"jobloop-([0-9a-f-]{36})-([0-9]+)\"') k
                LEFT JOIN (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j ON j.key_token = k[1]::uuid
               WHERE k IS NOT NULL;") \
       | jl_psql -p "$standby_port" -At 2>&1 | tail -n 1)
tap_ok "$([[ "$bad" =~ ^0\ of\ ([0-9]+)\ resent\ ([0-9]+)$ ]] && (( BASH_REMATCH[1] >= JOBS * K )); echo $?)" \
    "every request of both servers carried the key of its job's step" "$bad"
tap_ok "$([[ "$bad" =~ resent\ ([0-9]+)$ ]] && (( BASH_REMATCH[1] > 0 )); echo $?)" \
    "steps in flight at the crash were sent again by the new primary with the same key" "$bad"

tap_done
