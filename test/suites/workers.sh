#!/usr/bin/env bash
# test/suites/workers.sh -- the workers of a database share a burst of new jobs.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 2, jobloop.max_in_flight = 2000,
# so that either worker could take the whole burst) and nginx mock; run it alone with
# `prove test/suites/workers.sh` once jobloop is built and installed (JL_BUILD=1 builds).
#
#   share   1,200 jobs whose one call takes 20 s are submitted in one statement; once
#           all of them are held, each worker holds at least a quarter of them (a turn
#           claims at most 1,000 / jobloop.workers jobs, and a worker a whole share
#           ahead of its peer leaves the next jobs to it), and worker_stats() agrees
#           with the table
#   stuck   the same while one worker is stuck in a 4 s business-logic call: the other
#           does not wait for it for good, and every job of a second burst is held
#           before the stuck call ends
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

jl_cluster_start "jobloop.workers = 2" "jobloop.max_in_flight = 2000" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 7

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA wt;
-- One call per job; a state with "stall" makes request() sleep that long first.
CREATE FUNCTION wt.req(s jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF s ? 'stall' THEN
        PERFORM pg_sleep((s->>'stall')::float8);
    END IF;
    RETURN jsonb_build_object('url', '$JL_MOCK_URL/delay?s=' || (s->>'s') || '&j=' || (s->>'j'));
END
\$\$;
CREATE FUNCTION wt.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS \$\$ SELECT s || '{"done": true}' \$\$;
CREATE FUNCTION wt.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$ SELECT s ? 'done' \$\$;
SELECT jobloop.create_kind('wt', 'wt.req(jsonb)', 'wt.step(jsonb,jsonb)', 'wt.done(jsonb)');
SQL

all_held() {    # all_held N [FROM_ID]: N running jobs (with id > FROM_ID) held by a worker
    [[ "$(q "SELECT count(*) FROM jobloop.jobs
              WHERE status = 'running' AND worker IS NOT NULL AND id > ${2:-0}")" == "$1" ]]
}
per_worker() {  # "count count" of held jobs, largest first
    q "SELECT string_agg(n::text, ' ' ORDER BY n DESC) FROM (
         SELECT count(*) AS n FROM jobloop.jobs WHERE worker IS NOT NULL GROUP BY worker) c"
}
workers_started() { [[ "$(q "SELECT count(*) FROM jobloop.worker_stats()")" == 2 ]]; }
stats_agree() {
    [[ "$(q "SELECT string_agg(held::text, ' ' ORDER BY held DESC) FROM jobloop.worker_stats()")" == "$(per_worker)" ]]
}
none_left() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status IN ('pending', 'running')")" == 0 ]]; }
stuck() {       # a worker is inside the stalling request()
    [[ "$(q "SELECT count(*) FROM pg_stat_activity
              WHERE backend_type = 'jobloop worker' AND wait_event = 'PgSleep'")" == 1 ]]
}
completed() { [[ "$(q "SELECT status FROM jobloop.jobs WHERE id = $1")" == completed ]]; }

jl_wait_for 30 workers_started || tap_bail "two workers did not start"

# ---- share --------------------------------------------------------------------------------
q "SELECT count(jobloop.submit('wt', jsonb_build_object('s', 20, 'j', g))) FROM generate_series(1, 1200) g" >/dev/null
jl_wait_for 60 all_held 1200
tap_ok $? "all 1,200 jobs of the burst are held"
read -r most least <<<"$(per_worker)"
tap_diag "jobs per worker: ${most:-?} and ${least:-0}"
[[ -n "${least:-}" ]]
tap_ok $? "both workers hold jobs of the burst"
(( ${least:-0} >= 300 ))
tap_ok $? "each holds at least a quarter of them (300): ${most:-?} and ${least:-0}"
jl_wait_for 10 stats_agree
tap_ok $? "worker_stats() shows the same split" "worker_stats: $(q "SELECT string_agg(held::text, ' ') FROM jobloop.worker_stats()")"

q "SELECT count(jobloop.cancel(id)) FROM (SELECT id FROM jobloop.jobs WHERE status = 'running' ORDER BY id) j" >/dev/null
jl_wait_for 60 none_left || tap_bail "the first burst was not cancelled"

# ---- stuck --------------------------------------------------------------------------------
# One job whose request() stalls 6 s: whichever worker claims it is stuck in that turn.
# Then a burst of 1,200: the other worker must not wait for the stuck one for good, so
# the whole burst is held while the stall lasts (the stuck worker cannot claim meanwhile).
stalled=$(q "SELECT jobloop.submit('wt', '{\"s\": 1, \"j\": 0, \"stall\": 6}')")
jl_wait_for 10 stuck || tap_bail "no worker got stuck in the stalling job"
q "SELECT count(jobloop.submit('wt', jsonb_build_object('s', 20, 'j', g))) FROM generate_series(1, 1200) g" >/dev/null
jl_wait_for 20 all_held 1200 "$stalled"
tap_ok $? "the other worker takes the whole second burst" "per worker: $(per_worker)"
stuck
tap_ok $? "while the stuck worker is still inside its 6 s call"
jl_wait_for 20 completed "$stalled"
tap_ok $? "the stalled job completes"

tap_done
