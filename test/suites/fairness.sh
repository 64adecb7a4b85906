#!/usr/bin/env bash
# test/suites/fairness.sh -- tenants (DESIGN §4): fair claims and per-tenant caps.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 2, jobloop.max_in_flight = 100,
# jobloop.hold_delay = 500ms) and nginx mock; run it alone with
# `prove test/suites/fairness.sh` once jobloop is built and installed (JL_BUILD=1 builds).
#
#   fairness   tenant A queues 2000 jobs of 0.2 s; once they fill every slot, tenant B
#              submits one: B is claimed in the next claim round, so it completes while
#              A still has more than 1000 jobs to go (counted, not timed)
#   caps       set_tenant_limit caps the jobs of a tenant held at once (across both
#              workers), the GUC jobloop.tenant_max_concurrency is the default, a
#              tenant's own limit overrides it, NULL removes it; a job waiting in a long
#              delay is released and does not count
#
# Caps are checked on what the API received (every URL carries tenant=..., and the most
# calls of a tenant in flight at once is an upper bound of nothing but the cap) and by
# sampling jobloop.jobs every 0.1 s (jobs of the tenant with a worker).  Nothing asserts
# speed.
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

t_start=$SECONDS
jl_cluster_start "jobloop.workers = 2" "jobloop.max_in_flight = 100" "jobloop.hold_delay = '500ms'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 13

# ---- setup -------------------------------------------------------------------------------
# One request per job: /delay?s=<s>&tenant=<tenant>&j=<j>, after delay_ms if the state has one.
jl_psql >/dev/null <<'SQL' || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA ft;
CREATE FUNCTION ft.req(s jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'url', (s->>'base') || (s->>'path') || '&tenant=' || (s->>'tenant') || '&j=' || (s->>'j'),
        'delay_ms', (s->>'delay_ms')::int))
$$;
CREATE FUNCTION ft.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT s || '{"done": true}'
$$;
CREATE FUNCTION ft.done(s jsonb) RETURNS boolean LANGUAGE sql AS $$
    SELECT s ? 'done'
$$;
SELECT jobloop.create_kind('ft', 'ft.req(jsonb)', 'ft.step(jsonb,jsonb)', 'ft.done(jsonb)', backoff => '50ms');

CREATE TABLE ft.raw (line text);
CREATE TABLE ft.log (ended numeric, started numeric, uri text, status int, tenant text, j int);
CREATE TABLE ft.sample (at timestamptz DEFAULT clock_timestamp(), tenant text, held int);

-- The most calls of a tenant in flight at once (a sweep over [started, ended], each
-- interval shrunk by 5 ms at both ends: nginx stamps both with its cached time, to the ms,
-- per nginx worker process, so a call that starts right after another one's slot was freed
-- can look a ms or two earlier).  Only for /delay calls of 200 ms.
CREATE FUNCTION ft.overlap(t text) RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce(max(s), 0) FROM (
        SELECT sum(d) OVER (ORDER BY at, d ROWS UNBOUNDED PRECEDING) s FROM (
            SELECT started + 0.005 AS at, 1 AS d FROM ft.log WHERE tenant = t
            UNION ALL
            SELECT ended - 0.005, -1 FROM ft.log WHERE tenant = t) e) x
$$;
CREATE FUNCTION ft.held_max(t text) RETURNS int LANGUAGE sql AS $$
    SELECT coalesce(max(held), 0) FROM ft.sample WHERE tenant = t
$$;
SQL

load_log() {
    jl_psql -c "TRUNCATE ft.raw, ft.log" >/dev/null
    jl_psql -c "COPY ft.raw FROM STDIN WITH (FORMAT text, DELIMITER E'\\x01')" <"$JL_MOCK_LOG" >/dev/null
    jl_psql >/dev/null <<'SQL'
INSERT INTO ft.log
SELECT m[1]::numeric, m[1]::numeric - m[4]::numeric, m[2], m[3]::int,
       (regexp_match(m[2], '[?&]tenant=([^&]*)'))[1], (regexp_match(m[2], '[?&]j=([0-9]+)'))[1]::int
  FROM ft.raw,
       regexp_match(line, '^([0-9.]+) \S+ \S+ "\S+ (\S+)" ([0-9]+) [0-9]+ "[^"]*" ([0-9.]+)$') m;
SQL
}

# submit TENANT N [PATH] [DELAY_MS]: N jobs of TENANT (default path /delay?s=0.2).
submit() {
    local tenant=$1 n=$2 path=${3:-/delay?s=0.2} delay=${4:-NULL}
    q "SELECT count(jobloop.submit('ft', jsonb_build_object('base', '$JL_MOCK_URL', 'path', '$path',
            'tenant', '$tenant', 'j', g, 'delay_ms', $delay::int), '$tenant')) FROM generate_series(1, $n) g" >/dev/null
}
unfinished() {      # unfinished TENANT...: their jobs not finished yet
    local list
    list=$(printf "'%s'," "$@")
    q "SELECT count(*) FROM jobloop.jobs WHERE tenant IN (${list%,}) AND status IN ('pending', 'running')"
}
# sample: record how many jobs each tenant has held by a worker right now.
SAMPLE_SQL="INSERT INTO ft.sample (tenant, held)
    SELECT tenant, count(*) FILTER (WHERE worker IS NOT NULL) FROM jobloop.jobs
     WHERE status IN ('pending', 'running') GROUP BY tenant"
# wait_done SECONDS TENANT...: poll (and sample) every 0.1 s until their jobs are finished.
wait_done() {
    local secs=$1 deadline
    shift
    deadline=$(( $(_jl_now_us) + secs * 1000000 ))
    while :; do
        q "$SAMPLE_SQL" >/dev/null || true
        [[ "$(unfinished "$@")" == 0 ]] && return 0
        if (( $(_jl_now_us) >= deadline )); then
            tap_diag "timed out after ${secs}s waiting for the jobs of $*"
            return 1
        fi
        sleep 0.1
    done
}

# ==== fairness ==============================================================================
# 2 workers x max_in_flight 100 = 200 slots; A's 2000 jobs of 0.2 s fill them ten times
# over.  B's job is claimed in the first claim round after its submit (each tenant gets an
# equal share of the free slots), so at most a few rounds of A's jobs (200 each) finish
# before B does; a first-come claim would make B wait for all 2000.
submit A 2000
_a_saturates() { [[ $(q "SELECT count(*) FROM jobloop.jobs WHERE tenant = 'A' AND worker IS NOT NULL") -ge 150 ]]; }
jl_wait_for 30 _a_saturates || true
a_held=$(q "SELECT count(*) FROM jobloop.jobs WHERE tenant = 'A' AND worker IS NOT NULL")
submit B 1
wait_done 60 B || true
b_done=$(q "SELECT count(*) FROM jobloop.jobs WHERE tenant = 'A' AND status IN ('completed', 'failed')")
wait_done 90 A || true
load_log

B_SQL="WITH b AS (SELECT created_at, finished_at FROM jobloop.jobs WHERE tenant = 'B'),
            bl AS (SELECT started FROM ft.log WHERE tenant = 'B')"
tap_sql_ok "fairness: B's job completed" \
    "SELECT status = 'completed' FROM jobloop.jobs WHERE tenant = 'B'" \
    "SELECT status || ' ' || coalesce(last_error, '') FROM jobloop.jobs WHERE tenant = 'B'"
# finished_at is the finishing transaction's start: A's jobs finished in the same batch as
# B's count as before it.  Counted from B's submission, so a slow test harness (A running
# on before B is even submitted) cannot make it fail.
tap_sql_ok "fairness: B completed while A still had > 1000 of its 2000 jobs to go" \
    "$B_SQL SELECT count(*) < 1000 FROM jobloop.jobs a, b
      WHERE a.tenant = 'A' AND a.finished_at >= b.created_at AND a.finished_at <= b.finished_at" \
    "$B_SQL SELECT format('A jobs held when B was submitted: $a_held; A jobs finished after B was submitted and before it finished: %s; A jobs to go when B finished: %s',
                          count(*) FILTER (WHERE a.finished_at >= b.created_at AND a.finished_at <= b.finished_at),
                          count(*) FILTER (WHERE a.finished_at > b.finished_at)) FROM jobloop.jobs a, b WHERE a.tenant = 'A'"
tap_sql_ok "fairness: the API got fewer than 1000 of A's calls between B's submission and B's call" \
    "$B_SQL SELECT count(*) < 1000 AND (SELECT count(*) FROM bl) = 1 FROM ft.log l, b, bl
      WHERE l.tenant = 'A' AND l.started >= extract(epoch FROM b.created_at) AND l.started < bl.started" \
    "$B_SQL SELECT format('A calls started in between: %s; A calls in all: %s', count(*) FILTER (WHERE l.started < bl.started),
                          count(*)) FROM ft.log l, b, bl WHERE l.tenant = 'A' AND l.started >= extract(epoch FROM b.created_at)"
tap_sql_ok "fairness: all 2000 of A's jobs completed, one call each" \
    "SELECT (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'A' AND status = 'completed') = 2000
        AND (SELECT count(*) FROM ft.log WHERE tenant = 'A') = 2000" \
    "SELECT 'A jobs: ' || string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM jobloop.jobs WHERE tenant = 'A' GROUP BY 1) s
     UNION ALL SELECT 'A calls logged: ' || count(*) FROM ft.log WHERE tenant = 'A'"
tap_diag "A had $b_done of 2000 jobs finished when the test saw B finished"

# ==== per-tenant cap ========================================================================
# 'capped' may hold 3 jobs at once (over both workers); 'free' has no cap and runs
# alongside, as a control that the measure sees overlap.
q "SELECT jobloop.set_tenant_limit('capped', 3)" >/dev/null
submit capped 30
submit free 30
wait_done 60 capped free || true
load_log
tap_sql_ok "cap: all 30 of capped's jobs completed" \
    "SELECT count(*) = 30 FROM jobloop.jobs WHERE tenant = 'capped' AND status = 'completed'" \
    "SELECT status || ' ' || count(*) FROM jobloop.jobs WHERE tenant = 'capped' GROUP BY status"
tap_sql_ok "cap: the API never had more than 3 of capped's calls at once (free, uncapped: more)" \
    "SELECT ft.overlap('capped') <= 3 AND ft.overlap('free') > 3" \
    "SELECT 'most calls in flight at once: capped ' || ft.overlap('capped') || ', free ' || ft.overlap('free')"
tap_sql_ok "cap: jobloop.jobs never showed more than 3 of capped's jobs held by workers" \
    "SELECT ft.held_max('capped') <= 3 AND count(*) > 0 FROM ft.sample WHERE tenant = 'capped'" \
    "SELECT 'most held at once: ' || ft.held_max('capped') || ' in ' || count(*) || ' samples' FROM ft.sample WHERE tenant = 'capped'"

# ==== the GUC default, a tenant's own limit over it, NULL removes ===========================
q "ALTER SYSTEM SET jobloop.tenant_max_concurrency = 2" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
# A new session started after the postmaster re-read the file sees 2; by then the
# postmaster has signalled the workers, which reload before their next claim.
_guc_is_2() { [[ $(q "SHOW jobloop.tenant_max_concurrency") == 2 ]]; }
jl_wait_for 10 _guc_is_2 || true
q "SELECT jobloop.set_tenant_limit('own5', 5)" >/dev/null
q "SELECT jobloop.set_tenant_limit('capped', NULL)" >/dev/null
jl_psql -c "TRUNCATE ft.sample" >/dev/null
submit dflt 12
submit own5 20
q "SELECT count(jobloop.submit('ft', jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.2',
        'tenant', 'capped_again', 'j', g), 'capped')) FROM generate_series(1, 10) g" >/dev/null
wait_done 60 dflt own5 capped || true
load_log
tap_sql_ok "default cap: jobloop.tenant_max_concurrency = 2 holds for a tenant without its own limit" \
    "SELECT ft.overlap('dflt') <= 2 AND ft.held_max('dflt') <= 2
        AND (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'dflt' AND status = 'completed') = 12" \
    "SELECT format('dflt: most calls at once %s, most held %s, completed %s', ft.overlap('dflt'), ft.held_max('dflt'),
                   (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'dflt' AND status = 'completed'))"
tap_sql_ok "own limit: set_tenant_limit(own5, 5) overrides the default of 2 (<= 5 at once, and > 2)" \
    "SELECT ft.overlap('own5') BETWEEN 3 AND 5 AND ft.held_max('own5') <= 5
        AND (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'own5' AND status = 'completed') = 20" \
    "SELECT format('own5: most calls at once %s, most held %s', ft.overlap('own5'), ft.held_max('own5'))"
tap_sql_ok "NULL removes a tenant's limit: capped falls back to the default of 2" \
    "SELECT ft.overlap('capped_again') <= 2 AND ft.held_max('capped') <= 2
        AND (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'capped' AND status = 'completed') = 40" \
    "SELECT format('capped: most calls at once %s, most held %s', ft.overlap('capped_again'), ft.held_max('capped'))"
q "ALTER SYSTEM RESET jobloop.tenant_max_concurrency" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
_guc_is_0() { [[ $(q "SHOW jobloop.tenant_max_concurrency") == 0 ]]; }
jl_wait_for 10 _guc_is_0 || true

# ==== a job waiting in a long delay is not held =============================================
# 'sleepy' may hold 2 jobs; its 6 jobs' first request has delay_ms 3000, longer than
# jobloop.hold_delay (500 ms), so each is released while it waits: all 6 wait at once.
q "SELECT jobloop.set_tenant_limit('sleepy', 2)" >/dev/null
jl_psql -c "TRUNCATE ft.sample" >/dev/null
submit sleepy 6 '/json?x=1' 3000
_all_sleeping() {
    [[ $(q "SELECT count(*) FROM jobloop.jobs WHERE tenant = 'sleepy' AND status = 'running'
               AND worker IS NULL AND run_after > now() + interval '0.5 s'") == 6 ]]
}
sleeping=0
jl_wait_for 10 _all_sleeping && sleeping=1
wait_done 20 sleepy || true
tap_ok "$(( sleeping == 1 ? 0 : 1 ))" "long delay: all 6 of sleepy's jobs waited out their delay at once, unheld (cap 2)" \
    "$(q "SELECT id || ' ' || status || ' worker ' || coalesce(worker::text, '-') || ' run_after ' || run_after FROM jobloop.jobs WHERE tenant = 'sleepy'")"
tap_sql_ok "long delay: all 6 completed, never more than 2 held at once" \
    "SELECT ft.held_max('sleepy') <= 2 AND (SELECT count(*) FROM jobloop.jobs WHERE tenant = 'sleepy' AND status = 'completed') = 6" \
    "SELECT 'most held at once: ' || ft.held_max('sleepy')
     UNION ALL SELECT status || ' ' || count(*) FROM jobloop.jobs WHERE tenant = 'sleepy' GROUP BY status"

tap_sql_ok "both workers are still running" \
    "SELECT count(*) = 2 FROM pg_stat_activity WHERE application_name LIKE 'jobloop worker %'" ""

tap_diag "fairness.sh ran in $((SECONDS - t_start)) s"
tap_done
