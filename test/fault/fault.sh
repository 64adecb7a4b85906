#!/usr/bin/env bash
#
# test/fault/fault.sh -- a few hundred multi-step jobs against an API that answers 500s,
# 502s, 503s with Retry-After, timeouts, connection resets and truncated bodies, and that
# sometimes sits on an address the outbound guard refuses, while the worker is killed with
# kill -9 (three times) and the server is crash-stopped once.  At the
# end every job is completed or failed with a reason, each committed step is in the state
# exactly once, and the workers are alive.
#
# request(state) picks the endpoint of each step from hash(seed, n) (fault.path below),
# so the test knows which steps can never succeed:
#   45.0 %  /json?n=             always 200
#   15.0 %  /delay?s=0.1&n=      always 200, after 0.1 s
#   35.5 %  /flaky?n=            a random fault per request, 10/16 answer 200 (so retries
#                                 usually succeed): 500, 502, 503 + Retry-After: 1, reset,
#                                 timeout (timeout_ms 2000), truncated body
#    0.7 %  each of /status/500, /status/503?retry_after=1, /reset, /slow (timeout_ms 300),
#           /truncated: these fail on every attempt, so the job fails at that step
#    1.0 %  http://127.0.0.2:PORT/json: not in jobloop.allowed_hosts (127.0.0.1), so the
#           guard refuses it before connecting; the job fails at once with that reason
# Each tenant's jobs share a rate_key, so a Retry-After pauses that tenant's calls only.
# max_attempts 4, backoff 50 ms.  step(state, response) appends the response's n to
# state.seen and sets n = n + 1; done when n >= K.
#
# Prints TAP; exits non-zero if a test failed.  Env: JL_BUILD=1 builds first; FAULT_JOBS
# (300), FAULT_STEPS (6), FAULT_DEADLINE (180 s).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../../scripts/lib.sh
. "$HERE/../../scripts/lib.sh"
# shellcheck source=../tap.sh
. "$HERE/../tap.sh"
# shellcheck source=../crash/common.sh
. "$HERE/../crash/common.sh"

JOBS=${FAULT_JOBS:-300}
K=${FAULT_STEPS:-6}
TENANTS=20
DEADLINE=${FAULT_DEADLINE:-180}
IN_FLIGHT=20
CR_WORKERS=2

if [[ "${JL_BUILD:-}" == 1 ]]; then
    jl_build >&2
fi

tap_plan 22
t_start=$SECONDS

jl_cluster_start "jobloop.workers = $CR_WORKERS" "jobloop.lease_timeout = '600s'" \
    "jobloop.max_in_flight = $IN_FLIGHT" >&2
jl_mock_start >&2

# ---- setup ----------------------------------------------------------------------------
setup_out=$(jl_psql -At 2>&1 <<SQL
CREATE EXTENSION jobloop;
CREATE SCHEMA fault;
-- The endpoint of step n of the job with this seed (see the header).
CREATE FUNCTION fault.path(seed int, n int) RETURNS text LANGUAGE sql IMMUTABLE AS \$\$
    SELECT CASE
        WHEN h < 450 THEN 'json'
        WHEN h < 600 THEN 'delay'
        WHEN h < 955 THEN 'flaky'
        WHEN h < 962 THEN '500'
        WHEN h < 969 THEN '503'
        WHEN h < 976 THEN 'reset'
        WHEN h < 983 THEN 'slow'
        WHEN h < 990 THEN 'truncated'
        ELSE 'refused' END
      FROM (SELECT abs(hashtext(seed || ':' || n)::bigint) % 1000 AS h) x
\$\$;
CREATE FUNCTION fault.request(s jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_build_object('url', CASE p WHEN 'refused' THEN '$JL_MOCK_URL2' ELSE '$JL_MOCK_URL' END || CASE p
                WHEN 'json' THEN '/json?n=' || n
                WHEN 'delay' THEN '/delay?s=0.1&n=' || n
                WHEN 'flaky' THEN '/flaky?n=' || n
                WHEN '500' THEN '/status/500'
                WHEN '503' THEN '/status/503?retry_after=1'
                WHEN 'reset' THEN '/reset'
                WHEN 'slow' THEN '/slow'
                WHEN 'truncated' THEN '/truncated'
                ELSE '/json?n=' || n END,
            'timeout_ms', CASE p WHEN 'slow' THEN 300 ELSE 2000 END,
            'rate_key', 'fault-tenant-' || ((s->>'seed')::int % $TENANTS))
      FROM (SELECT (s->>'n')::int AS n, fault.path((s->>'seed')::int, (s->>'n')::int) AS p) x
\$\$;
CREATE FUNCTION fault.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT s || jsonb_build_object('n', (s->>'n')::int + 1,
                                   'seen', (s->'seen') || jsonb_build_array(r->'body'->'n'))
\$\$;
CREATE FUNCTION fault.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT (s->>'n')::int >= $K
\$\$;
SELECT jobloop.create_kind('fault', 'fault.request(jsonb)', 'fault.step(jsonb,jsonb)',
                           'fault.done(jsonb)', max_steps => 100, max_attempts => 4,
                           backoff => '50ms', max_backoff => '1s');
SELECT count(jobloop.submit('fault', jsonb_build_object('n', 0, 'seen', '[]'::jsonb, 'seed', g),
                            'tenant-' || (g % $TENANTS)))
  FROM generate_series(1, $JOBS) g;
-- What the test expects of each job: the first step that can never succeed, if any.
CREATE TABLE fault.expect AS
    SELECT j.id, (j.state->>'seed')::int AS seed,
           (SELECT min(n) FROM generate_series(0, $K - 1) n
             WHERE fault.path((j.state->>'seed')::int, n) NOT IN ('json', 'delay', 'flaky')) AS doomed_at,
           (SELECT bool_and(fault.path((j.state->>'seed')::int, n) IN ('json', 'delay'))
              FROM generate_series(0, $K - 1) n) AS fault_free
      FROM jobloop.jobs j;
SELECT count(*) FILTER (WHERE doomed_at IS NOT NULL) || ' doomed, '
       || count(*) FILTER (WHERE fault_free) || ' fault-free' FROM fault.expect;
SQL
) && setup_ok=1 || setup_ok=0
if [[ $setup_ok == 1 && "$setup_out" == *"$JOBS"* ]]; then
    tap_ok 0 "setup: kind created, $JOBS jobs over $TENANTS tenants submitted"
    tap_diag "of which ${setup_out##*$'\n'} (no /flaky step either)"
else
    tap_ok 1 "setup: kind created, $JOBS jobs over $TENANTS tenants submitted" "$setup_out"
    tap_bail "setup failed"
fi
total=$((JOBS * K))

# ---- disruptions, each after progress since the last one -------------------------------
cr_disrupt "$total" $((total * 5 / 100)) $((total * 15 / 100)) $((total * 25 / 100)) $((total * 35 / 100))

# ---- every job accounted for ------------------------------------------------------------
t_wait=$SECONDS
if cr_wait_all_finished "$DEADLINE"; then
    tap_ok 0 "every job finished within ${DEADLINE}s of the last disruption (lease_timeout is 600s)"
else
    tap_ok 1 "every job finished within ${DEADLINE}s of the last disruption (lease_timeout is 600s)" \
        "$(cr_sql "SELECT status, worker, count(*) FROM jobloop.jobs GROUP BY 1, 2 ORDER BY 1, 2")"
fi
tap_diag "finished $((SECONDS - t_wait)) s after the last disruption"
tap_diag "outcomes: $(cr_sql "SELECT string_agg(status || ' ' || c, ', ') FROM
                               (SELECT status, count(*) c FROM jobloop.jobs GROUP BY 1 ORDER BY 1) s")"

tap_is "$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE status NOT IN ('completed', 'failed')")" 0 \
    "every job ended completed or failed"
bad=$(cr_sql "SELECT string_agg(id::text, ', ') FROM jobloop.jobs
              WHERE status = 'failed' AND coalesce(btrim(last_error), '') = ''")
tap_is "$bad" "" "every failed job has a last_error"
tap_diag "failure reasons:"
tap_diag "$(cr_sql "SELECT count(*) || ' x ' || e FROM (SELECT regexp_replace(last_error, '[0-9]+', 'N', 'g') e
                      FROM jobloop.jobs WHERE status = 'failed') f GROUP BY e ORDER BY count(*) DESC")"

expected_seen=$(cr_sql "SELECT jsonb_agg(g) FROM generate_series(0, $K - 1) g")
bad=$(cr_sql "SELECT string_agg(id || ': step ' || step || ' ' || state::text, '; ') FROM jobloop.jobs
              WHERE status = 'completed'
                AND NOT (step = $K AND (state->>'n')::int = $K AND state->'seen' = '$expected_seen'::jsonb)")
tap_is "$bad" "" "every completed job has step = n = $K and seen = $expected_seen (each step once, in order)"
bad=$(cr_sql "SELECT string_agg(id || ': step ' || step || ' ' || state::text, '; ') FROM jobloop.jobs j
              WHERE status = 'failed'
                AND NOT ((state->>'n')::int = step AND step < $K
                         AND state->'seen' = (SELECT coalesce(jsonb_agg(g ORDER BY g), '[]')
                                                FROM generate_series(0, j.step - 1) g))")
tap_is "$bad" "" "every failed job has n = step < $K and seen = [0 .. step-1] (each committed step once)"

# Which jobs had to end how: a step that can never succeed fails the job at that step at
# the latest; a job that only meets /json and /delay must complete despite the crashes.
bad=$(cr_sql "SELECT string_agg(j.id || ' (doomed at ' || e.doomed_at || '): ' || j.status || ' at step ' || j.step, '; ')
                FROM jobloop.jobs j JOIN fault.expect e USING (id)
               WHERE e.doomed_at IS NOT NULL AND NOT (j.status = 'failed' AND j.step <= e.doomed_at)")
tap_is "$bad" "" "every job with a step that always fails failed, at that step or before"
bad=$(cr_sql "SELECT string_agg(j.id || ': ' || j.status || ' ' || coalesce(j.last_error, ''), '; ')
                FROM jobloop.jobs j JOIN fault.expect e USING (id)
               WHERE e.fault_free AND j.status <> 'completed'")
tap_is "$bad" "" "every job that never met a fault completed"
bad=$(cr_sql "SELECT string_agg(j.id || ' step ' || j.step || ' (' || fault.path(e.seed, j.step) || '): ' || j.last_error, '; ')
                FROM jobloop.jobs j JOIN fault.expect e USING (id)
               WHERE j.status = 'failed' AND j.step = e.doomed_at
                 AND NOT CASE fault.path(e.seed, j.step)
                         WHEN '500' THEN j.last_error LIKE '%500%'
                         WHEN '503' THEN j.last_error LIKE '%503%'
                         WHEN 'refused' THEN j.last_error LIKE 'refused to connect to 127.0.0.2%'
                         ELSE true END")
tap_is "$bad" "" "a job failed by a 500, a 503 or a refused address says so in last_error"
tap_is "$(cr_sql "SELECT count(*) FILTER (WHERE status = 'completed') > 0
                         AND count(*) FILTER (WHERE status = 'failed') > 0
                         AND count(*) FILTER (WHERE status = 'completed' AND EXISTS (
                               SELECT FROM fault.expect e WHERE e.id = j.id AND NOT e.fault_free)) > 0
                    FROM jobloop.jobs j")" t \
    "both outcomes occur, and jobs that met /flaky faults also completed"

# ---- what the API saw -----------------------------------------------------------------------
if cr_load_access_log fault.access; then
    tap_diag "access log: $(cr_sql "SELECT string_agg(c || ' x ' || status, ', ' ORDER BY status)
                                      FROM (SELECT status, count(*) c FROM fault.access GROUP BY 1) s") (status)"
    # n in the URL (where the endpoint has one) must be the key's step: a resent or retried
    # request is the one computed from the committed state of that step.
    bad=$(cr_sql "SELECT string_agg(x, '; ') FROM (
          SELECT 'unparsed log lines: ' || ((SELECT count(*) FROM fault.access_raw)
                                            - (SELECT count(*) FROM fault.access)) AS x
           WHERE (SELECT count(*) FROM fault.access_raw) <> (SELECT count(*) FROM fault.access)
          UNION ALL
          SELECT 'requests without a jobloop key: ' || count(*) FROM fault.access
           WHERE job IS NULL HAVING count(*) > 0
          UNION ALL
          SELECT 'n differs from the key''s step: ' || min(key) || ' ' || min(uri) FROM fault.access
           WHERE n IS NOT NULL AND n IS DISTINCT FROM step HAVING count(*) > 0
          UNION ALL
          SELECT 'a request for step ' || a.step || ' of job ' || a.job || ' which ended at step ' || j.step
            FROM fault.access a JOIN jobloop.jobs j ON j.id = a.job
           WHERE a.step > j.step OR (a.step = j.step AND j.status = 'completed')
          UNION ALL
          SELECT 'wrong endpoint for ' || a.key || ': ' || a.uri
            FROM fault.access a JOIN fault.expect e ON e.id = a.job
           WHERE split_part(split_part(a.uri, '?', 1), '/', 2) <> CASE fault.path(e.seed, a.step)
                     WHEN '500' THEN 'status' WHEN '503' THEN 'status' ELSE fault.path(e.seed, a.step) END
        ) q")
    tap_is "$bad" "" "every request carried its (job, step) key, the step's n and endpoint, and no step past the job's end"
    # At most max_attempts tries of a step between two disruptions (a crash may lose the
    # count of a try whose failure was not yet committed, so count per disruption window).
    # Resets (444) are not counted: libcurl itself resends a request that died on a reused
    # keep-alive connection with no answer (up to 5 times, "Connection died, tried 5 times
    # before giving up"), so one try of a /reset step can reach the API several times.
    # A generation is the lifetime of one set of server processes (see cr_boundaries).
    boundaries=$(cr_boundaries_sql)
    cr_sql_must "CREATE VIEW fault.tries AS
        SELECT a.*, (SELECT count(*) FROM unnest($boundaries) b WHERE b < a.started) AS generation
          FROM fault.access a" >/dev/null
    bad=$(cr_sql "SELECT string_agg(key || ' x' || c || ' in generation ' || generation, ', ') FROM (
            SELECT key, generation, count(*) c FROM fault.tries WHERE status <> 444
             GROUP BY key, generation HAVING count(*) > 4) q")
    tap_is "$bad" "" "no step got more than max_attempts (4) answers in one generation (resets not counted)"
    tap_diag "requests per (job, step) in one generation, resets included: max $(cr_sql "
            SELECT max(c) FROM (SELECT count(*) c FROM fault.tries GROUP BY key, generation) q")"
    # Retry-After: 1 is honoured: tries of an always-503 step, with no disruption between
    # them, start at least ~1 s apart (a lower bound, not a speed).
    bad=$(cr_sql "SELECT string_agg(key || ' retried after ' || round(started - prev, 3) || ' s', ', ') FROM (
            SELECT key, uri, started, lag(started) OVER (PARTITION BY key ORDER BY started) prev
              FROM fault.access WHERE uri = '/status/503?retry_after=1') a
           WHERE prev IS NOT NULL AND started - prev < 0.95
             AND NOT EXISTS (SELECT FROM unnest($boundaries) b WHERE b BETWEEN a.prev - 0.005 AND a.started + 0.005)")
    tap_is "$bad" "" "Retry-After: 1 was honoured between tries of a 503 step"
else
    tap_ok 1 "every request carried its (job, step) key" "could not load $JL_MOCK_LOG"
    tap_ok 1 "no step got more than max_attempts (4) answers in one generation (resets not counted)" "could not load $JL_MOCK_LOG"
    tap_ok 1 "Retry-After: 1 was honoured between tries of a 503 step" "could not load $JL_MOCK_LOG"
fi

tap_is "$(cr_unexpected_crashes)" "" "no crash but ours in the server log (no other signal, no PANIC)"
rc=0
[[ ! -s "$JL_MOCK_LOG2" ]] || rc=$?
tap_ok $rc "no request reached 127.0.0.2 (refused by the guard before connecting)" "$(head -n 5 -- "$JL_MOCK_LOG2" 2>/dev/null)"

# ---- the workers are alive and still work ---------------------------------------------------
rc=0
cr_workers_up "$CR_WORKERS" || rc=$?
tap_ok $rc "$CR_WORKERS workers are running" "workers running: $(cr_worker_pids | tr '\n' ' ')"
# a seed whose steps are all /json or /delay, so the job must complete.
seed=$(cr_sql "SELECT s FROM generate_series(100000, 200000) s
                WHERE (SELECT bool_and(fault.path(s, n) IN ('json', 'delay')) FROM generate_series(0, $K - 1) n)
                LIMIT 1")
new_id=$(cr_sql "SELECT jobloop.submit('fault', jsonb_build_object('n', 0, 'seen', '[]'::jsonb, 'seed', $seed), 'after')" || true)
if [[ -n "$new_id" ]]; then
    st=$(cr_sql "SELECT jobloop.wait($new_id, '60s')" || true)
    tap_is "$st $(cr_sql "SELECT step || ' ' || (state->'seen')::text FROM jobloop.jobs WHERE id = $new_id")" \
        "completed $K $expected_seen" "a fault-free job submitted afterwards completes with exactly $K steps"
else
    tap_ok 1 "a fault-free job submitted afterwards completes with exactly $K steps" "submit failed"
fi

tap_diag "fault suite took $((SECONDS - t_start)) s"
tap_done
