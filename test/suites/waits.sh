#!/usr/bin/env bash
# test/suites/waits.sh -- what pg_stat_activity shows a worker waiting on.
#
# Prints TAP.  Starts its own cluster (one worker) and nginx mock; run it alone with
# `prove test/suites/waits.sh` once jobloop is built and installed (JL_BUILD=1 builds).
#
# On PostgreSQL 17 and later the worker registers its own wait events, and wait_event
# says what it waits for: JobloopExtension (CREATE EXTENSION jobloop), JobloopIdle (it
# holds no job), JobloopHTTP (calls in flight), JobloopDelay (its jobs wait for their
# delay_ms), JobloopLimit (an endpoint's limit holds due jobs back); pg_wait_events lists
# them.  Before 17 every one of these waits is the generic "Extension".
#
# Counted, not timed: each state is held for seconds and polled for.
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

# shellcheck disable=SC2119
jl_cluster_start >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 7

custom=$(( $(q "SHOW server_version_num") >= 170000 ))
expect() {      # the wait event to expect for one of ours on this server
    if (( custom )); then echo "$1"; else echo Extension; fi
}
worker_waits() {    # worker_waits EVENT: the worker waits with that wait_event, type Extension
    [[ "$(q "SELECT wait_event_type || '/' || wait_event FROM pg_stat_activity
              WHERE backend_type = 'jobloop worker'")" == "Extension/$1" ]]
}
seen() {        # what the worker waits on now
    q "SELECT coalesce(wait_event_type, '-') || '/' || coalesce(wait_event, '-')
         FROM pg_stat_activity WHERE backend_type = 'jobloop worker'"
}
check() {       # check EVENT DESC
    local want
    want=$(expect "$1")
    jl_wait_for 15 worker_waits "$want"
    tap_ok $? "$2: wait_event $want" "seen: $(seen)"
}
none_left() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status IN ('pending', 'running')")" == 0 ]]; }

check JobloopExtension "before CREATE EXTENSION jobloop"

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA wv;
-- One call per job: to /delay?s=S, after delay_ms D, with rate_key K if given.
CREATE FUNCTION wv.req(s jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'url', '$JL_MOCK_URL/delay?s=' || (s->>'s') || '&j=' || (s->>'j'),
        'delay_ms', (s->>'delay_ms')::int, 'rate_key', s->>'key'))
\$\$;
CREATE FUNCTION wv.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS \$\$ SELECT s || '{"done": true}' \$\$;
CREATE FUNCTION wv.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$ SELECT s ? 'done' \$\$;
SELECT jobloop.create_kind('wv', 'wv.req(jsonb)', 'wv.step(jsonb,jsonb)', 'wv.done(jsonb)');
SELECT jobloop.set_limit('wv-one-at-a-time', max_concurrency => 1);
SQL

check JobloopIdle "holding no job"

q "SELECT jobloop.submit('wv', '{\"s\": 6, \"j\": 1}')" >/dev/null
check JobloopHTTP "a call in flight"
jl_wait_for 20 none_left || tap_diag "the job did not finish"

q "SELECT jobloop.submit('wv', '{\"s\": 0, \"j\": 2, \"delay_ms\": 6000}')" >/dev/null
check JobloopDelay "a job waiting for its delay_ms"
jl_wait_for 20 none_left || tap_diag "the job did not finish"

# Two jobs of an endpoint that allows one call at a time: one in flight, one held back.
q "SELECT count(jobloop.submit('wv', jsonb_build_object('s', 6, 'j', 10 + g, 'key', 'wv-one-at-a-time')))
     FROM generate_series(1, 2) g" >/dev/null
check JobloopLimit "a job held back by its endpoint's limit, beside a call in flight"
jl_wait_for 30 none_left || tap_diag "the jobs did not finish"

check JobloopIdle "idle again"

if (( custom )); then
    tap_is "$(q "SELECT string_agg(name, ' ' ORDER BY name) FROM pg_wait_events
                  WHERE type = 'Extension' AND name LIKE 'Jobloop%'")" \
        "JobloopDelay JobloopExtension JobloopHTTP JobloopIdle JobloopLimit" \
        "pg_wait_events lists the five"
else
    tap_ok 0 "# SKIP pg_wait_events and custom wait events need PostgreSQL 17"
fi

tap_done
