#!/usr/bin/env bash
# test/suites/upgrade.sh -- ALTER EXTENSION jobloop UPDATE from 0.1.0 to the current
# version with jobs in every state, and a fresh install that is the same schema.
#
# Prints TAP.  Starts its own cluster and mock API (scripts/lib.sh), so it runs alone:
# `prove test/suites/upgrade.sh` (jobloop built and installed first, as
# scripts/run-tests.sh does).  The workers serve two databases: jobloop (installed at
# 0.1.0, then upgraded while jobs are finished, pending and running) and jl_fresh
# (CREATE EXTENSION at the default version).  A third database, jl_unserved, has no
# worker: CREATE EXTENSION there warns, and its schema is the same all the same.
# shellcheck disable=SC2317  # functions run through jl_wait_for look unreachable
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

jl_cluster_start "jobloop.database = 'jobloop, jl_fresh'" "jobloop.workers = 1" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"

work=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-upgrade.XXXXXX")
jl_on_exit rm -rf -- "$work"

q() {       # q DB SQL: one value (or rows of |-separated values)
    local db=$1
    shift
    jl_psql -d "$db" -At -c "$*"
}

# ---- 1. 0.1.0 with jobs in every state ----

jl_psql -d jobloop -At >/dev/null <<SQL || tap_bail "could not install 0.1.0"
CREATE EXTENSION jobloop VERSION '0.1.0';
-- state: {"steps": n, "delay_ms": d, "fail": bool}; one GET /json?n=<step> per step.
CREATE FUNCTION upg_request(state jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_build_object(
        'url', CASE WHEN (state->>'fail')::boolean THEN '$JL_MOCK_URL/status/503'
                    ELSE format('$JL_MOCK_URL/json?n=%s', coalesce(state->>'n', '0')) END,
        'delay_ms', coalesce((state->>'delay_ms')::int, 0))
\$\$;
CREATE FUNCTION upg_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT state || jsonb_build_object('n', coalesce((state->>'n')::int, 0) + 1,
                                       'seen', coalesce(state->'seen', '[]') || (response->'body'->'n'))
\$\$;
CREATE FUNCTION upg_done(state jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT coalesce((state->>'n')::int, 0) >= (state->>'steps')::int
\$\$;
SELECT jobloop.create_kind('upg', 'upg_request(jsonb)', 'upg_step(jsonb,jsonb)', 'upg_done(jsonb)',
                           max_attempts => 2, backoff => '50 ms', max_backoff => '50 ms');
SQL

tap_is "$(q jobloop "SELECT extversion FROM pg_extension WHERE extname = 'jobloop'")" "0.1.0" \
    "CREATE EXTENSION jobloop VERSION '0.1.0' installs 0.1.0"
tap_is "$(q jobloop "SELECT to_regclass('jobloop.stats') IS NULL AND to_regclass('jobloop.errors') IS NULL
                    AND to_regprocedure('jobloop.worker_stats()') IS NULL")" "t" \
    "0.1.0 has no stats, errors or worker_stats"

# Finished jobs: three completed (1-3 steps, two tenants), one failed.
finished=$(q jobloop "SELECT string_agg(jobloop.submit('upg', jsonb_build_object('steps', g), 'upg-t' || g % 2)::text, ' ')
                        FROM generate_series(1, 3) g")
failed=$(q jobloop "SELECT jobloop.submit('upg', '{\"steps\": 1, \"fail\": true}', 'upg-t1')")
for id in $finished $failed; do
    q jobloop "SELECT jobloop.wait($id, '30 s')" >/dev/null
done
tap_is "$(q jobloop "SELECT string_agg(status || ':' || step, ' ' ORDER BY id) FROM jobloop.jobs")" \
    "completed:1 completed:2 completed:3 failed:0" "under 0.1.0 the workers ran jobs to completion and failure"

# Pending: not due for 8 s.  Running: 6 steps, 500 ms apart, going on through the upgrade.
pending=$(q jobloop "SELECT string_agg(jobloop.submit('upg', jsonb_build_object('steps', 2), 'upg-t2',
                                                      start_at => now() + interval '8 s')::text, ' ')
                       FROM generate_series(1, 3)")
running=$(q jobloop "SELECT jobloop.submit('upg', '{\"steps\": 6, \"delay_ms\": 500}', 'upg-t3')")
running_started() { [[ $(q jobloop "SELECT step FROM jobloop.jobs WHERE id = $running") -ge 1 ]]; }
jl_wait_for 10 running_started || true

cols="id, kind, tenant, owner, status, step, state, next_request, last_error, attempts,
      created_at, started_at, finished_at, run_after"
q jobloop "SELECT $cols FROM jobloop.jobs WHERE status IN ('completed', 'failed') ORDER BY id" >"$work/finished.before"
tap_is "$(q jobloop "SELECT string_agg(status, ' ' ORDER BY id) FROM jobloop.jobs WHERE id IN (${pending// /,})")" \
    "pending pending pending" "before the upgrade: 3 jobs pending (start_at in the future)"
tap_is "$(q jobloop "SELECT status || ':' || (step BETWEEN 1 AND 5) FROM jobloop.jobs WHERE id = $running")" \
    "running:true" "before the upgrade: 1 job running, between steps"

# ---- 2. the upgrade ----

rc=0
jl_psql -d jobloop -c "ALTER EXTENSION jobloop UPDATE" >"$work/alter.out" 2>&1 || rc=$?
tap_ok $rc "ALTER EXTENSION jobloop UPDATE succeeds"
tap_is "$(grep -c WARNING "$work/alter.out" || true)" "0" "... without a warning (a worker serves database jobloop)"
latest=$(q jobloop "SELECT default_version FROM pg_available_extensions WHERE name = 'jobloop'")
tap_is "$(q jobloop "SELECT extversion FROM pg_extension WHERE extname = 'jobloop'")" "$latest" "the version is now $latest"
tap_is "$(q jobloop "SELECT to_regclass('jobloop.stats') IS NOT NULL AND to_regclass('jobloop.errors') IS NOT NULL
                    AND to_regprocedure('jobloop.worker_stats()') IS NOT NULL
                    AND to_regclass('jobloop.job_finished_idx') IS NOT NULL")" "t" \
    "the new objects exist: jobloop.stats, jobloop.errors, jobloop.worker_stats(), job_finished_idx"

# 0.4.0 -> 0.5.0 made the partitions of finished jobs for now and two widths ahead (the
# job running through the update finishes into one, below), not members of the extension.
tap_is "$(q jobloop "SELECT bool_or(lower_bound <= now() AND upper_bound > now()) || '|' ||
                           (max(upper_bound) >= now() + 2 * jobloop.finished_job_width('7 days')) || '|' ||
                           (SELECT count(*) FROM pg_depend d JOIN jobloop.finished_job_partitions() p
                                ON d.objid = p.partition AND d.deptype = 'e')
                      FROM jobloop.finished_job_partitions()")" "true|true|0" \
    "the update made the partitions of finished jobs for now and ahead, outside the extension"

q jobloop "SELECT $cols FROM jobloop.jobs WHERE status IN ('completed', 'failed') AND id NOT IN ($running) ORDER BY id" \
    >"$work/finished.after"
rc=0
diff "$work/finished.before" "$work/finished.after" >"$work/finished.diff" || rc=$?
tap_ok $rc "finished jobs are untouched by the upgrade" "$(cat "$work/finished.diff")"

# ---- 3. jobs carry on under the new version ----

tap_is "$(q jobloop "SELECT jobloop.wait($running, '30 s')")" "completed" "the job running during the upgrade completes"
tap_is "$(q jobloop "SELECT step || ' ' || (state->'seen')::text FROM jobloop.jobs WHERE id = $running")" \
    "6 [0, 1, 2, 3, 4, 5]" "... with all 6 steps, in order"
key=$(q jobloop "SELECT format('jobloop-%s-%s-%s-', system_identifier,
                                (SELECT oid FROM pg_database WHERE datname = 'jobloop'), $running)
                   FROM pg_control_system()")
tap_is "$(grep -c "\"${key}[0-9]*\"" "$JL_MOCK_LOG" || true)" "6" "... and the API received each of its steps once"
for id in $pending; do
    q jobloop "SELECT jobloop.wait($id, '30 s')" >/dev/null
done
tap_is "$(q jobloop "SELECT string_agg(status || ':' || step, ' ' ORDER BY id) FROM jobloop.jobs WHERE id IN (${pending// /,})")" \
    "completed:2 completed:2 completed:2" "the jobs pending during the upgrade run to completion afterwards"
tap_is "$(q jobloop "SELECT pending || ' ' || running || ' ' || completed || ' ' || failed || ' ' || cancelled || ' ' || workers
                   FROM jobloop.stats")" "0 0 7 1 0 1" \
    "jobloop.stats counts the jobs from before and after the upgrade, and the database's worker"
tap_is "$(q jobloop "SELECT count(*) FROM jobloop.finished_job_default")" "0" \
    "no job that finished after the update went to the default partition"
tap_is "$(q jobloop "SELECT kind || ' ' || failed || ' ' || last_error FROM jobloop.errors")" \
    "upg 1 HTTP 503 Service Unavailable after 2 attempts" "jobloop.errors shows the failure from before the upgrade"
tap_is "$(q jobloop "SELECT count(*) FROM jobloop.worker_stats() WHERE database = 'jobloop' AND pid > 0")" "1" \
    "jobloop.worker_stats() lists the worker"

# Jobs from before the upgrade keep the keys they had (above); new ones are keyed by the
# token that travels with their row.
new=$(q jobloop "SELECT jobloop.submit('upg', '{\"steps\": 2}', 'upg-t1')")
q jobloop "SELECT jobloop.wait($new, '30 s')" >/dev/null
token=$(q jobloop "SELECT key_token FROM (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j WHERE id = $new")
tap_is "$(grep -cE "\"jobloop-${token}-[01]\"" "$JL_MOCK_LOG" || true)" "2" \
    "a job submitted after the upgrade is keyed jobloop-<key_token>-<step>"

# ---- 4. a fresh install is the same schema ----

# Every object of the extension, described without OIDs: members, columns, constraints,
# indexes, views, functions, policies, privileges, initial privileges, config tables.
cat >"$work/schema.sql" <<'SQL'
WITH ext AS (SELECT oid, extconfig, extcondition FROM pg_extension WHERE extname = 'jobloop'),
members AS (
    SELECT d.classid, d.objid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
-- (not the partitions of finished jobs and their indexes: made by the update, or by
-- the workers at their own time; they are no members of the extension)
rels AS (SELECT c.* FROM pg_class c WHERE c.relnamespace = 'jobloop'::regnamespace
                                      AND c.relname !~ '^finished_job_[0-9]')
SELECT 'member ' || pg_describe_object(classid, objid, 0) FROM members
UNION ALL
SELECT format('relation %s kind=%s persistence=%s rls=%s/%s options=%s acl=%s', relname, relkind,
              relpersistence, relrowsecurity, relforcerowsecurity, reloptions, relacl)
  FROM rels
UNION ALL
SELECT format('column %s.%s #%s %s notnull=%s default=%s identity=%s', c.relname, a.attname, a.attnum,
              format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid),
              a.attidentity)
  FROM rels c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
UNION ALL
SELECT format('constraint %s.%s %s', c.relname, k.conname, pg_get_constraintdef(k.oid))
  FROM rels c JOIN pg_constraint k ON k.conrelid = c.oid
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM rels c JOIN pg_index i ON i.indrelid = c.oid
UNION ALL
SELECT format('view %s %s', relname, pg_get_viewdef(oid)) FROM rels WHERE relkind = 'v'
UNION ALL
SELECT format('policy %s.%s cmd=%s permissive=%s roles=%s using=%s check=%s', c.relname, p.polname,
              p.polcmd, p.polpermissive, p.polroles::regrole[], pg_get_expr(p.polqual, p.polrelid),
              pg_get_expr(p.polwithcheck, p.polrelid))
  FROM rels c JOIN pg_policy p ON p.polrelid = c.oid
UNION ALL
SELECT format('function %s acl=%s %s', p.oid::regprocedure, p.proacl, pg_get_functiondef(p.oid))
  FROM pg_proc p WHERE p.pronamespace = 'jobloop'::regnamespace
UNION ALL
SELECT format('init_privs %s %s %s', pg_describe_object(classoid, objoid, objsubid), privtype, initprivs)
  FROM pg_init_privs
 WHERE (classoid = 'pg_class'::regclass AND objoid IN (SELECT oid FROM rels))
    OR (classoid = 'pg_proc'::regclass AND objoid IN (SELECT oid FROM pg_proc
                                                      WHERE pronamespace = 'jobloop'::regnamespace))
UNION ALL
SELECT format('config %s %s', extconfig::regclass[], extcondition) FROM ext
UNION ALL
SELECT format('schema %s acl=%s', nspname, nspacl) FROM pg_namespace WHERE nspname = 'jobloop'
ORDER BY 1;
SQL

q postgres "CREATE DATABASE jl_fresh" >/dev/null
q postgres "CREATE DATABASE jl_unserved" >/dev/null
rc=0
jl_psql -d jl_fresh -c "CREATE EXTENSION jobloop" >"$work/fresh.out" 2>&1 || rc=$?
tap_ok $rc "CREATE EXTENSION jobloop in a second served database"
tap_is "$(grep -c WARNING "$work/fresh.out" || true)" "0" "... without a warning (jobloop.database lists it)"
tap_is "$(q jl_fresh "SELECT extversion FROM pg_extension WHERE extname = 'jobloop'")" "$latest" \
    "... installs the default version, $latest"

rc=0
jl_psql -d jl_unserved -c "CREATE EXTENSION jobloop" >"$work/unserved.out" 2>&1 || rc=$?
tap_ok $rc "CREATE EXTENSION jobloop in a database no worker serves succeeds (a restore must not fail)"
tap_is "$(grep -c 'WARNING:  no jobloop worker serves database "jl_unserved"' "$work/unserved.out" || true)" "1" \
    "... with a warning that no worker serves it"
tap_is "$(grep -E '^(DETAIL|HINT):' "$work/unserved.out" || true)" \
    "DETAIL:  Jobs submitted here stay pending because jobloop.database is \"$(q postgres "SHOW jobloop.database")\" and no jobloop-worker is connected.
HINT:  Set jobloop.database and shared_preload_libraries and restart the server, or run jobloop-worker against this database." \
    "... which says why and what to do (the regression tests show it terse)"

jl_psql -d jobloop -At -f "$work/schema.sql" >"$work/schema.upgraded"
jl_psql -d jl_fresh -At -f "$work/schema.sql" >"$work/schema.fresh"
jl_psql -d jl_unserved -At -f "$work/schema.sql" >"$work/schema.unserved"
tap_diag "the schema description has $(wc -l <"$work/schema.fresh") lines"
tap_ok "$([[ $(grep -c '^member ' "$work/schema.fresh") -ge 20 ]]; echo $?)" \
    "the schema description lists the extension's members"
rc=0
diff "$work/schema.upgraded" "$work/schema.fresh" >"$work/schema.diff" || rc=$?
tap_ok $rc "the upgraded schema (0.1.0 -> $latest) is identical to a fresh $latest install" \
    "$(head -n 40 "$work/schema.diff")"
rc=0
diff "$work/schema.fresh" "$work/schema.unserved" >/dev/null || rc=$?
tap_ok $rc "a database without a worker gets the same schema"

# The second database's worker runs jobs there too.
jl_psql -d jl_fresh -At >/dev/null <<SQL || tap_bail "could not set up jl_fresh"
CREATE FUNCTION fresh_request(state jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT CASE WHEN state ? 'done' THEN NULL ELSE jsonb_build_object('url', '$JL_MOCK_URL/json?n=7') END
\$\$;
CREATE FUNCTION fresh_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT state || jsonb_build_object('done', response->'body'->'n')
\$\$;
SELECT jobloop.create_kind('fresh', 'fresh_request(jsonb)', 'fresh_step(jsonb,jsonb)');
SQL
fresh_job=$(q jl_fresh "SELECT jobloop.submit('fresh')")
tap_is "$(q jl_fresh "SELECT jobloop.wait($fresh_job, '30 s')")" "completed" \
    "a job in the freshly installed database runs to completion"
tap_is "$(q jl_fresh "SELECT state->>'done' FROM jobloop.jobs WHERE id = $fresh_job")" "7" \
    "... against the API"

tap_done
