#!/usr/bin/env bash
#
# test/crash/crash.sh -- kill -9 the worker (several times) and crash-stop the server in
# the middle of a few hundred multi-step jobs; every job must complete with the exact
# step count, each step reflected in its state exactly once and in order.
#
# The kind: request(state) asks /delay?s=D&n=<state.n>; step(state, response) sets
# n = n + 1 and appends the response's n to state.seen; done when n >= K.  A step lost,
# applied twice, or applied to the wrong state shows up in seen, which must be exactly
# [0, 1, ..., K-1] for every job.
#
# jobloop.lease_timeout is 600 s here: if a restarted worker did not free the jobs its
# dead predecessor held, they would sit until their lease ran out, far past the deadline.
# Completion within the deadline therefore shows that restarts free the jobs at once.
#
# Prints TAP; exits non-zero if a test failed.  Env: JL_BUILD=1 builds and installs
# first; CRASH_JOBS (300), CRASH_STEPS (8), CRASH_DEADLINE (180 s) tune the run.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../../scripts/lib.sh
. "$HERE/../../scripts/lib.sh"
# shellcheck source=../tap.sh
. "$HERE/../tap.sh"
# shellcheck source=common.sh
. "$HERE/common.sh"

JOBS=${CRASH_JOBS:-300}
K=${CRASH_STEPS:-8}
TENANTS=20
DEADLINE=${CRASH_DEADLINE:-180}
# 2 workers x 20 in flight x 0.2 s per call: a few hundred jobs take over ten seconds
# undisturbed, time for every disruption to land in the middle of the run.
IN_FLIGHT=20
DELAY=0.2
CR_WORKERS=2

if [[ "${JL_BUILD:-}" == 1 ]]; then
    jl_build >&2
fi

tap_plan 18
t_start=$SECONDS

jl_cluster_start "jobloop.workers = $CR_WORKERS" "jobloop.lease_timeout = '600s'" \
    "jobloop.max_in_flight = $IN_FLIGHT" >&2
jl_mock_start >&2

# ---- setup ------------------------------------------------------------------------
setup_out=$(jl_psql -At 2>&1 <<SQL
CREATE EXTENSION jobloop;
CREATE SCHEMA crashtest;
CREATE FUNCTION crashtest.request(s jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_build_object('url', '$JL_MOCK_URL/delay?s=$DELAY&n=' || (s->>'n'), 'timeout_ms', 10000)
\$\$;
CREATE FUNCTION crashtest.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT s || jsonb_build_object('n', (s->>'n')::int + 1,
                                   'seen', (s->'seen') || jsonb_build_array(r->'body'->'n'))
\$\$;
CREATE FUNCTION crashtest.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT (s->>'n')::int >= $K
\$\$;
SELECT jobloop.create_kind('crash', 'crashtest.request(jsonb)', 'crashtest.step(jsonb,jsonb)',
                           'crashtest.done(jsonb)', max_steps => 100, backoff => '50ms');
SELECT count(jobloop.submit('crash', '{"n": 0, "seen": []}', 'tenant-' || (g % $TENANTS)))
  FROM generate_series(1, $JOBS) g;
SHOW jobloop.lease_timeout;
SQL
) && setup_ok=1 || setup_ok=0
if [[ $setup_ok == 1 && "$setup_out" == *"$JOBS"*"10min"* ]]; then
    tap_ok 0 "setup: kind created, $JOBS jobs over $TENANTS tenants submitted, lease_timeout 10min"
else
    tap_ok 1 "setup: kind created, $JOBS jobs over $TENANTS tenants submitted, lease_timeout 10min" "$setup_out"
    tap_bail "setup failed"
fi
total=$((JOBS * K))
tap_diag "$JOBS jobs x $K steps = $total steps; workers $CR_WORKERS, max_in_flight $IN_FLIGHT, delay ${DELAY}s"

# ---- disruptions, each after progress since the last one --------------------------
# Thresholds (in steps) at which to strike; each also needs progress since the workers came
# back from the previous disruption, so every restarted worker is seen to resume.
cr_disrupt "$total" $((total * 8 / 100)) $((total * 20 / 100)) $((total * 32 / 100)) $((total * 45 / 100))

# ---- everything finishes, without waiting for a lease to expire ----------------------
t_wait=$SECONDS
if cr_wait_all_finished "$DEADLINE"; then
    tap_ok 0 "every job finished within ${DEADLINE}s of the last disruption (lease_timeout is 600s)"
else
    tap_ok 1 "every job finished within ${DEADLINE}s of the last disruption (lease_timeout is 600s)" \
        "$(cr_sql "SELECT status, worker, count(*) FROM jobloop.jobs GROUP BY 1, 2 ORDER BY 1, 2")"
fi
tap_diag "finished $((SECONDS - t_wait)) s after the last disruption"

# ---- the outcome of every job ------------------------------------------------------
tap_is "$(cr_sql "SELECT count(*) FILTER (WHERE status = 'completed') || '/' || count(*) FROM jobloop.jobs")" \
    "$JOBS/$JOBS" "all $JOBS jobs completed"
bad=$(cr_sql "SELECT id || ' ' || status || ': ' || coalesce(last_error, '') FROM jobloop.jobs
              WHERE status <> 'completed' ORDER BY id LIMIT 10")
tap_is "$bad" "" "no job failed or was cancelled"
tap_is "$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE step <> $K")" 0 "every job's step counter is exactly $K"
tap_is "$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE (state->>'n')::int IS DISTINCT FROM $K")" 0 \
    "every job's state.n is exactly $K"
expected_seen=$(cr_sql "SELECT jsonb_agg(g) FROM generate_series(0, $K - 1) g")
bad=$(cr_sql "SELECT id || ': ' || (state->'seen')::text FROM jobloop.jobs
              WHERE state->'seen' IS DISTINCT FROM '$expected_seen'::jsonb ORDER BY id LIMIT 10")
tap_is "$bad" "" "every job's state.seen is exactly $expected_seen (each step once, in order)"

# ---- what the API saw ------------------------------------------------------------
if cr_load_access_log crashtest.access; then
    tap_diag "access log: $(cr_sql "SELECT count(*) FROM crashtest.access") requests"
    # Every (job, step) was requested, with the request computed from the state of that
    # step (n = step), and with a key of the documented form.
    bad=$(cr_sql "
        SELECT string_agg(x, '; ') FROM (
          SELECT 'unparsed log lines: ' || ((SELECT count(*) FROM crashtest.access_raw)
                                            - (SELECT count(*) FROM crashtest.access)) AS x
           WHERE (SELECT count(*) FROM crashtest.access_raw) <> (SELECT count(*) FROM crashtest.access)
          UNION ALL
          SELECT 'requests without a jobloop key: ' || count(*) FROM crashtest.access
           WHERE job IS NULL HAVING count(*) > 0
          UNION ALL
          SELECT 'wrong key form: ' || min(key) FROM crashtest.access
           WHERE key !~ '^jobloop-[0-9a-f-]{36}-[0-9]+\$' HAVING count(*) > 0
          UNION ALL
          SELECT 'request n differs from the key''s step: ' || min(key) || ' ' || min(uri)
            FROM crashtest.access WHERE n IS DISTINCT FROM step HAVING count(*) > 0
          UNION ALL
          SELECT 'never requested: job ' || j.id || ' step ' || s
            FROM jobloop.jobs j, generate_series(0, $K - 1) s
           WHERE NOT EXISTS (SELECT FROM crashtest.access a WHERE a.job = j.id AND a.step = s)
          UNION ALL
          SELECT 'requested beyond the last step: ' || min(key) FROM crashtest.access
           WHERE step >= $K OR job NOT IN (SELECT id FROM jobloop.jobs) HAVING count(*) > 0
        ) q")
    tap_is "$bad" "" "the API saw every (job, step) 0..$((K - 1)), keyed jobloop-<key_token>-<step>, with n = step"

    dups=$(cr_sql "SELECT count(*) || ' keys sent more than once, ' || coalesce(sum(c - 1), 0) || ' extra requests'
                     FROM (SELECT key, count(*) c FROM crashtest.access GROUP BY key HAVING count(*) > 1) d")
    boundaries=$(cr_boundaries_sql)
    tap_diag "duplicates (at-least-once): $dups; generations ended at $boundaries"
    # A step is sent again only if the worker died between sending it and committing its
    # response: two requests with one key must lie in different generations of processes.
    bad=$(cr_sql "
        SELECT string_agg(key || ' started at ' || prev || ' and ' || started, '; ')
          FROM (SELECT key, started, lag(started) OVER (PARTITION BY key ORDER BY started) prev
                  FROM crashtest.access) a
         WHERE prev IS NOT NULL
           AND NOT EXISTS (SELECT FROM unnest($boundaries) b
                            WHERE b BETWEEN a.prev - 0.005 AND a.started + 0.005)")
    tap_is "$bad" "" "a (job, step) was sent twice only across a disruption (at-least-once, no spurious resend)"
else
    tap_ok 1 "the API saw every (job, step)" "could not load $JL_MOCK_LOG"
    tap_ok 1 "a (job, step) was sent twice only across a disruption" "could not load $JL_MOCK_LOG"
fi
released=$(grep -c 'released [0-9]* jobs held before it started' "$JL_PGLOG" || true)
tap_diag "server log: $released worker starts released their predecessor's jobs;" \
    "$(grep -c 'terminated by signal 9' "$JL_PGLOG" || true) kill -9 crash restarts"

tap_is "$(cr_unexpected_crashes)" "" "no crash but ours in the server log (no other signal, no PANIC)"

# ---- the workers are alive and still work -----------------------------------------
rc=0
cr_workers_up "$CR_WORKERS" || rc=$?
tap_ok $rc "$CR_WORKERS workers are running" "workers running: $(cr_worker_pids | tr '\n' ' ')"
new_id=$(cr_sql "SELECT jobloop.submit('crash', '{\"n\": 0, \"seen\": []}', 'after')" || true)
if [[ -n "$new_id" ]]; then
    tap_is "$(cr_sql "SELECT jobloop.wait($new_id, '60s')")" completed "a job submitted afterwards completes"
    tap_is "$(cr_sql "SELECT step || ' ' || (state->'seen')::text FROM jobloop.jobs WHERE id = $new_id")" \
        "$K $expected_seen" "... with exactly $K steps"
else
    tap_ok 1 "a job submitted afterwards completes" "submit failed"
    tap_ok 1 "... with exactly $K steps" "submit failed"
fi

tap_diag "crash suite took $((SECONDS - t_start)) s"
tap_done
