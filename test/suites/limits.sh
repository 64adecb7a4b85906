#!/usr/bin/env bash
# test/suites/limits.sh -- per-endpoint limits (DESIGN §4), proven by what the API received.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 2, so every limit must hold across
# workers through shared memory) and its own nginx mock; run it alone with
# `prove test/suites/limits.sh` once jobloop is built and installed (JL_BUILD=1 builds first).
#
# Every assertion is read from the mock's access logs, loaded into the table lt.log: one row
# per request, with the time nginx started it (msec - request_time) and finished it (msec).
# Every URL carries tag=<phase> (and j=<job>), so phases, which run one after another, are
# told apart.  Bounds are upper bounds on what the API saw (rate, concurrency) and lower
# bounds on waits (Retry-After, backoff): a slow or loaded machine only makes requests
# sparser and waits longer, so it cannot make them fail.  Nothing asserts speed.
#
# Phases:
#   permissions  set_limit/drop_limit/set_tenant_limit are for superusers and jobloop_admin
#   rate         127.0.0.1:port at max_rate 20, 100 one-request jobs over 2 workers
#   ramp         127.0.0.2:port at max_rate 50, ramp 3 s: starts low, climbs, holds;
#                after >= 1 s idle it starts low again
#   concurrency  127.0.0.1:port at max_concurrency 4, /delay?s=0.2 (and, as a control,
#                the same load without a limit overlaps more than 4); drop_limit on a busy
#                endpoint lifts its limit
#   429          /status/429?retry_after=2 on 127.0.0.1:port while 40 other jobs use the
#                same endpoint: no request while paused, the job's own retry waits >= 2 s,
#                the job fails with "HTTP 429 Too Many Requests after 2 attempts", the
#                others resume (not held to a dropped limit); 5 attempts by default;
#                Retry-After is capped at 1 h
#   storms       503 storms on rate_key endpoints: each job backs off exponentially, and
#                the endpoint's rate is cut (with and without a ramp)
# shellcheck disable=SC2317  # functions run through jl_wait_for look unreachable
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

if [[ "${JL_BUILD:-}" == 1 ]]; then
    jl_build >&2
fi

# q SQL: one value (or rows) from the cluster, unaligned, tuples only.
q() { jl_psql -At -c "$1"; }

t_start=$SECONDS
jl_cluster_start "jobloop.workers = 2" "jobloop.max_in_flight = 30" \
    "jobloop.allowed_hosts = '127.0.0.1,127.0.0.2'" >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 32

EP1="127.0.0.1:$JL_MOCK_PORT"     # the endpoint of $JL_MOCK_URL
EP2="127.0.0.2:$JL_MOCK_PORT"     # the endpoint of $JL_MOCK_URL2

# ---- setup -------------------------------------------------------------------------------
# A job's state says what to call: base URL, path, tag, its number j, how many steps, and
# optionally a rate_key.  Each step is one request; step() counts them in n.
jl_psql >/dev/null <<'SQL' || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA lt;
CREATE FUNCTION lt.req(s jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'url', (s->>'base') || (s->>'path')
               || CASE WHEN strpos(s->>'path', '?') > 0 THEN '&' ELSE '?' END
               || 'tag=' || (s->>'tag') || '&j=' || (s->>'j') || '&n=' || coalesce(s->>'n', '0'),
        'rate_key', s->>'rate_key'))
$$;
CREATE FUNCTION lt.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1)
$$;
CREATE FUNCTION lt.done(s jsonb) RETURNS boolean LANGUAGE sql AS $$
    SELECT coalesce((s->>'n')::int, 0) >= coalesce((s->>'steps')::int, 1)
$$;
SELECT jobloop.create_kind('lt', 'lt.req(jsonb)', 'lt.step(jsonb,jsonb)', 'lt.done(jsonb)',
                           backoff => '50ms');
SELECT jobloop.create_kind('lt_429', 'lt.req(jsonb)', 'lt.step(jsonb,jsonb)', 'lt.done(jsonb)',
                           max_attempts => 2, backoff => '50ms');
SELECT jobloop.create_kind('lt_503', 'lt.req(jsonb)', 'lt.step(jsonb,jsonb)', 'lt.done(jsonb)',
                           max_attempts => 4, backoff => '100ms');

-- The access logs, one row per request (see load_log).
CREATE TABLE lt.raw (line text);
CREATE TABLE lt.log (ended numeric, started numeric, addr text, uri text, status int,
                     key text, job bigint, step int, tag text, j int);
-- Samples taken while phases run.
CREATE TABLE lt.sample (tag text, at timestamptz DEFAULT clock_timestamp(), what text, v text);

-- Requests of one tag: how many started in each 1-second window aligned on the tag's first
-- request (w = 0 is the first second), and the most that started in any sliding 1-second
-- window [s, s + 1) (one anchored at each request's start: the busiest window of length
-- 1 s always starts at some request).  Times are nginx's, to the millisecond.
CREATE FUNCTION lt.aligned(t text) RETURNS TABLE (w int, n bigint) LANGUAGE sql AS $$
    SELECT floor(l.started - f.t0)::int, count(*)
      FROM lt.log l, (SELECT min(started) AS t0 FROM lt.log WHERE tag = t) f
     WHERE l.tag = t GROUP BY 1 ORDER BY 1
$$;
CREATE FUNCTION lt.sliding_max(t text) RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce(max(c), 0) FROM (
        SELECT count(*) OVER (ORDER BY started RANGE BETWEEN CURRENT ROW AND 0.999 FOLLOWING) c
          FROM lt.log WHERE tag = t) x
$$;
CREATE FUNCTION lt.sliding_busiest(t text) RETURNS text LANGUAGE sql AS $$
    SELECT format('busiest 1 s window starts %s s after the first request: %s requests',
                  round(s - (SELECT min(started) FROM lt.log WHERE tag = t), 3), c)
      FROM (SELECT started s, count(*) OVER (ORDER BY started RANGE BETWEEN CURRENT ROW AND 0.999 FOLLOWING) c
              FROM lt.log WHERE tag = t) x
     ORDER BY c DESC, s LIMIT 1
$$;
CREATE FUNCTION lt.aligned_text(t text) RETURNS text LANGUAGE sql AS $$
    SELECT 'requests per aligned second: ' || string_agg(n::text, ' ' ORDER BY w) FROM lt.aligned(t)
$$;
-- The most requests of one tag in flight at once: a sweep over [started, ended], each
-- interval shrunk by 5 ms at both ends.  nginx stamps both ends with its cached time, to
-- the millisecond, and each nginx worker process has its own cache: a call that starts
-- right after another one's slot was freed (after its response was logged) can look a
-- millisecond or two earlier.  Only used for /delay calls of 100 ms or more.  With
-- from_t: only the calls that started at or after from_t.
CREATE FUNCTION lt.overlap(t text, from_t numeric DEFAULT 0) RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce(max(s), 0) FROM (
        SELECT sum(d) OVER (ORDER BY at, d ROWS UNBOUNDED PRECEDING) s FROM (
            SELECT started + 0.005 AS at, 1 AS d FROM lt.log WHERE tag = t AND started >= from_t
            UNION ALL
            SELECT ended - 0.005, -1 FROM lt.log WHERE tag = t AND started >= from_t) e) x
$$;
SQL

jl_psql >/dev/null <<SQL || tap_bail "setup (roles) failed"
CREATE ROLE lt_app LOGIN;
CREATE ROLE lt_admin LOGIN IN ROLE jobloop_admin;
GRANT USAGE ON SCHEMA jobloop TO lt_app;
SQL

# Load both access logs into lt.log (again: they only grow).
load_log() {
    jl_psql -c "TRUNCATE lt.raw, lt.log" >/dev/null
    cat "$JL_MOCK_LOG" "$JL_MOCK_LOG2" \
        | jl_psql -c "COPY lt.raw FROM STDIN WITH (FORMAT text, DELIMITER E'\\x01')" >/dev/null
    jl_psql >/dev/null <<'SQL'
INSERT INTO lt.log
SELECT m[1]::numeric, m[1]::numeric - m[7]::numeric, m[2], m[4], m[5]::int, nullif(m[6], '-'),
       j.id, k[2]::int,
       (regexp_match(m[4], '[?&]tag=([^&]*)'))[1],
       (regexp_match(m[4], '[?&]j=([0-9]+)'))[1]::int
  FROM lt.raw
       CROSS JOIN LATERAL regexp_match(line, '^([0-9.]+) \S+ (\S+) "(\S+) (\S+)" ([0-9]+) [0-9]+ "([^"]*)" ([0-9.]+)$') m
       LEFT JOIN LATERAL regexp_match(m[6], '^jobloop-([0-9a-f-]{36})-([0-9]+)$') k ON true
       LEFT JOIN (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j ON j.key_token = k[1]::uuid;
SQL
}

# submit KIND N STATE_SQL: N jobs whose state is STATE_SQL (an SQL jsonb expression in g,
# the job's number 1..N); prints how many were submitted.
submit() {
    q "SELECT count(jobloop.submit('$1', $3)) FROM generate_series(1, $2) g"
}

unfinished() {      # unfinished TAG: how many jobs of TAG are not finished
    q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1' AND status IN ('pending', 'running')"
}

# wait_done TAG SECONDS [SAMPLE_SQL]: poll every 0.1 s until every job of TAG has finished;
# each poll also runs SAMPLE_SQL (if given), which records what it sees in lt.sample.
wait_done() {
    local tag=$1 secs=$2 sample=${3:-} deadline out
    deadline=$(( $(_jl_now_us) + secs * 1000000 ))
    while :; do
        if [[ -n "$sample" ]] && ! out=$(q "$sample" 2>&1); then
            tap_diag "sampling failed: $out"
        fi
        [[ "$(unfinished "$tag")" == 0 ]] && return 0
        if (( $(_jl_now_us) >= deadline )); then
            tap_diag "timed out after ${secs}s waiting for the jobs tagged $tag"
            return 1
        fi
        sleep 0.1
    done
}

# True when nothing was logged for LOGFILE during the last SECONDS (the endpoint is idle).
log_quiet_for() {
    local file=$1 secs=$2 last
    last=$(tail -n 1 "$file" | cut -d' ' -f1)
    [[ -n "$last" ]] || return 0
    awk -v last="$last" -v now="${EPOCHREALTIME/,/.}" -v s="$secs" 'BEGIN { exit !(now - last >= s) }'
}

# ==== permissions ===========================================================================
err=$(jl_psql -c "SET ROLE lt_app" -c "SELECT jobloop.set_limit('$EP1', max_rate => 5)" 2>&1 >/dev/null) || true
[[ "$err" == *"permission denied to set endpoint limits"* ]] && s=0 || s=1
tap_ok "$s" "a role outside jobloop_admin cannot set an endpoint limit" "$err"

err=$( { jl_psql -c "SET ROLE lt_app" -c "SELECT jobloop.drop_limit('$EP1')" 2>&1 >/dev/null;
         jl_psql -c "SET ROLE lt_app" -c "SELECT jobloop.set_tenant_limit('t', 3)" 2>&1 >/dev/null; } ) || true
[[ "$err" == *"permission denied to drop endpoint limits"* && "$err" == *"permission denied to set tenant limits"* ]] && s=0 || s=1
tap_ok "$s" "... nor drop one, nor set a tenant limit" "$err"

out=$(jl_psql -At -c "SET ROLE lt_admin" -c "SELECT 1 FROM jobloop.set_limit('lt-probe', max_rate => 5)" \
        -c "SELECT 2 FROM jobloop.set_tenant_limit('lt-probe', 2)" -c "SELECT 3 FROM jobloop.set_tenant_limit('lt-probe', NULL)" \
        -c "SELECT jobloop.drop_limit('lt-probe')" -c "SELECT count(*) FROM jobloop.endpoint_limit" 2>&1) || true
[[ "$out" == $'1\n2\n3\nt\n0' ]] && s=0 || s=1
tap_ok "$s" "a member of jobloop_admin may set and drop limits" "$out"

# ==== rate ==================================================================================
# How many requests may the API see in a window of 1 s?  A token bucket of rate r and depth
# b (jobloop: b = max(1, 0.05 r)) grants at most r + b in any window of 1 s (r when b = 1:
# a half-open window cannot hold both ends of a full second).  nginx sees a request a
# little after its grant, by a latency that varies (ms rounding, a worker descheduled
# between grant and send), so requests granted just before a window can show up inside
# it.  A stalled worker only delays what it was granted in its last turn, at most the
# bucket's depth, so + ceil(b) covers a stall of any length at a window's edge:
#   bound(r) = floor(r + b) + ceil(b)      r = 20: 22;  r = 50: 55
# (for windows aligned on the first request with b = 1: r + 1).
bound() { awk -v r="$1" 'BEGIN { b = (0.05 * r > 1) ? 0.05 * r : 1; c = (b == int(b)) ? b : int(b) + 1; print int(r + b) + c }'; }

# max_rate 20 on 127.0.0.1:port, no ramp.  100 jobs of one request each;
# jobloop.max_in_flight = 30, so both workers hold some and share the one bucket.
RATE=20
q "SELECT jobloop.set_limit('$EP1', max_rate => $RATE)" >/dev/null
submit lt 100 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/json', 'tag', 'rate', 'j', g)" >/dev/null
wait_done rate 30 "INSERT INTO lt.sample (tag, what, v)
    SELECT 'rate', 'worker', worker::text FROM jobloop.jobs WHERE state->>'tag' = 'rate' AND worker IS NOT NULL
    GROUP BY worker
    UNION ALL
    SELECT 'rate', 'view', format('%s %s %s', max_rate, round(allowed_rate::numeric, 3), requests_last_second)
      FROM jobloop.limits WHERE endpoint = '$EP1'" || true
load_log

tap_sql_ok "rate: 100 jobs, held by both workers, all completed and sent once each" \
    "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = 'rate' AND status = 'completed') = 100
        AND (SELECT count(*) FROM lt.log WHERE tag = 'rate') = 100
        AND (SELECT count(DISTINCT v) FROM lt.sample WHERE tag = 'rate' AND what = 'worker') = 2" \
    "SELECT 'jobs by status: ' || string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM jobloop.jobs WHERE state->>'tag' = 'rate' GROUP BY 1) s
     UNION ALL SELECT 'requests logged: ' || count(*) FROM lt.log WHERE tag = 'rate'
     UNION ALL SELECT 'workers seen holding jobs: ' || coalesce(string_agg(DISTINCT v, ','), 'none') FROM lt.sample WHERE tag = 'rate' AND what = 'worker'"
tap_sql_ok "rate: every 1-second window aligned on the first request has <= max_rate + 1 ($((RATE + 1))) requests" \
    "SELECT max(n) <= $RATE + 1 FROM lt.aligned('rate')" "SELECT lt.aligned_text('rate')"
tap_sql_ok "rate: every sliding 1-second window has <= max_rate + burst + 1 ($(bound $RATE)) requests" \
    "SELECT lt.sliding_max('rate') <= $(bound $RATE)" \
    "SELECT lt.sliding_busiest('rate') UNION ALL SELECT lt.aligned_text('rate')"
# The view, sampled every 0.1 s: it counts in 100 ms slices, so its "last second" is a
# window of 0.9 to 1 s, under the same bound.
tap_sql_ok "rate: jobloop.limits showed max_rate $RATE, allowed_rate <= $RATE, requests_last_second <= $(bound $RATE)" \
    "SELECT count(*) > 0 AND bool_and(split_part(v, ' ', 1)::real = $RATE AND split_part(v, ' ', 2)::numeric <= $RATE
                                      AND split_part(v, ' ', 3)::int <= $(bound $RATE))
       FROM lt.sample WHERE tag = 'rate' AND what = 'view'" \
    "SELECT 'samples (max_rate allowed_rate requests_last_second): ' || string_agg(v, ', ' ORDER BY at) FROM lt.sample WHERE tag = 'rate' AND what = 'view'"

# ==== ramp ==================================================================================
# 127.0.0.2:port is a fresh endpoint: max_rate 50, ramp 3 s.  The allowed rate starts at
# max(10% of 50, 1) = 5/s and climbs by 15/s each second: about 12.5 requests can leave in
# the first second, 27.5 in the second, 42.5 in the third, then 50/s.
MAXR=50
q "SELECT jobloop.set_limit('$EP2', max_rate => $MAXR, ramp => '3s')" >/dev/null
submit lt 200 "jsonb_build_object('base', '$JL_MOCK_URL2', 'path', '/json', 'tag', 'ramp1', 'j', g)" >/dev/null
wait_done ramp1 30 || true
# Idle for more than a second (nothing in flight: every job is done): the ramp starts over.
jl_wait_for 10 log_quiet_for "$JL_MOCK_LOG2" 1.5 || true
submit lt 100 "jsonb_build_object('base', '$JL_MOCK_URL2', 'path', '/json', 'tag', 'ramp2', 'j', g)" >/dev/null
wait_done ramp2 20 || true
load_log

tap_sql_ok "ramp: 300 jobs completed, one request each" \
    "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' IN ('ramp1', 'ramp2') AND status = 'completed') = 300
        AND (SELECT count(*) FROM lt.log WHERE tag IN ('ramp1', 'ramp2') AND addr = '127.0.0.2') = 300" \
    "SELECT 'requests logged: ' || count(*) FROM lt.log WHERE tag IN ('ramp1', 'ramp2')"
# Upper bound: ~12.5 (+1 token, +1 jitter) can leave in the first second; without a ramp it
# would be 50.  A slow machine only sends fewer.
tap_sql_ok "ramp: the first second after a fresh limit has < max_rate / 2 requests" \
    "SELECT n < $MAXR / 2 FROM lt.aligned('ramp1') WHERE w = 0" "SELECT lt.aligned_text('ramp1')"
# Climbs: some later second (the 3rd or 4th, where 42.5 and 50 may leave) sees more
# requests than the first (at most ~14).  Only the comparison is asserted, not a rate.
tap_sql_ok "ramp: it climbs (the 3rd or 4th second has more requests than the first)" \
    "SELECT (SELECT max(n) FROM lt.aligned('ramp1') WHERE w IN (2, 3)) > (SELECT n FROM lt.aligned('ramp1') WHERE w = 0)" \
    "SELECT lt.aligned_text('ramp1')"
# Burst = max(1, 0.05 * 50) = 2.5 tokens.
# Every window, aligned or not, under bound(50) = 50 + 2.5 + 3 = 55 (see the rate section).
tap_sql_ok "ramp: max_rate holds (every sliding 1-second window has <= $(bound $MAXR) requests)" \
    "SELECT lt.sliding_max('ramp1') <= $(bound $MAXR) AND lt.sliding_max('ramp2') <= $(bound $MAXR)" \
    "SELECT lt.aligned_text('ramp1') UNION ALL SELECT lt.sliding_busiest('ramp1')
     UNION ALL SELECT lt.aligned_text('ramp2') UNION ALL SELECT lt.sliding_busiest('ramp2')"
tap_sql_ok "ramp: after >= 1 s idle it starts low again (first second < max_rate / 2)" \
    "SELECT n < $MAXR / 2 FROM lt.aligned('ramp2') WHERE w = 0" "SELECT lt.aligned_text('ramp2')"

# ==== concurrency ===========================================================================
# Control: without a limit, 20 calls of 0.3 s sent at once overlap (the measure can see it).
q "SELECT jobloop.drop_limit('$EP1')" >/dev/null
submit lt 20 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.3', 'tag', 'conc0', 'j', g)" >/dev/null
wait_done conc0 15 || true
CONC=4
q "SELECT jobloop.set_limit('$EP1', max_concurrency => $CONC)" >/dev/null
submit lt 48 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.2', 'tag', 'conc', 'j', g)" >/dev/null
wait_done conc 20 "INSERT INTO lt.sample (tag, what, v)
    SELECT 'conc', 'in_flight', in_flight::text FROM jobloop.limits WHERE endpoint = '$EP1'
    UNION ALL
    SELECT 'conc', 'holders', count(DISTINCT worker)::text FROM jobloop.jobs WHERE state->>'tag' = 'conc' AND worker IS NOT NULL" || true
load_log

tap_sql_ok "concurrency control: without a limit the same kind of load overlaps > $CONC" \
    "SELECT lt.overlap('conc0') > $CONC" "SELECT 'most in flight at once: ' || lt.overlap('conc0')"
tap_sql_ok "concurrency: 48 jobs, held by both workers, completed, one request each" \
    "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = 'conc' AND status = 'completed') = 48
        AND (SELECT count(*) FROM lt.log WHERE tag = 'conc') = 48
        AND (SELECT max(v::int) FROM lt.sample WHERE tag = 'conc' AND what = 'holders') = 2" \
    "SELECT 'requests logged: ' || count(*) FROM lt.log WHERE tag = 'conc'
     UNION ALL SELECT 'workers seen holding jobs at once: ' || max(v) FROM lt.sample WHERE tag = 'conc' AND what = 'holders'"
tap_sql_ok "concurrency: the API never had more than max_concurrency ($CONC) calls in flight" \
    "SELECT lt.overlap('conc') <= $CONC" \
    "SELECT 'most in flight at once (access log): ' || lt.overlap('conc')"
tap_sql_ok "concurrency: jobloop.limits never showed in_flight > $CONC" \
    "SELECT coalesce(max(v::int), 0) <= $CONC FROM lt.sample WHERE tag = 'conc' AND what = 'in_flight'" \
    "SELECT 'in_flight samples: ' || string_agg(v, ' ' ORDER BY at) FROM lt.sample WHERE tag = 'conc' AND what = 'in_flight'"

# drop_limit while the endpoint has calls in flight: the limit must go all the same.
# rate_key lt-drop, max_concurrency 2; once a call is in flight, drop the limit; when those
# jobs are done, 12 more calls of 0.3 s, sent at once, must overlap more than 2.
q "SELECT jobloop.set_limit('lt-drop', max_concurrency => 2)" >/dev/null
submit lt 12 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.3', 'tag', 'dropbusy', 'j', g,
                                 'rate_key', 'lt-drop')" >/dev/null
_drop_busy() { [[ $(q "SELECT in_flight FROM jobloop.limits WHERE endpoint = 'lt-drop'") -ge 1 ]]; }
jl_wait_for 20 _drop_busy || true
dropped_busy=$(q "SELECT in_flight FROM jobloop.limits WHERE endpoint = 'lt-drop'")
q "SELECT jobloop.drop_limit('lt-drop')" >/dev/null
wait_done dropbusy 20 || true
submit lt 12 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.3', 'tag', 'dropafter', 'j', g,
                                  'rate_key', 'lt-drop')" >/dev/null
wait_done dropafter 20 || true
load_log
tap_sql_ok "drop_limit on a busy endpoint lifts the limit (later calls overlap > the old max_concurrency 2)" \
    "SELECT lt.overlap('dropafter') > 2 AND $dropped_busy >= 1" \
    "SELECT 'calls in flight when the limit was dropped: $dropped_busy; most in flight at once before: '
            || lt.overlap('dropbusy') || ', after: ' || lt.overlap('dropafter')"

# ==== 429 + Retry-After =====================================================================
# No limit configured on 127.0.0.1:port: the pause must work on any endpoint.  Background:
# 40 jobs (more than one worker holds) of 12 steps each calling /delay?s=0.1 on the same
# endpoint, so calls are always wanted, from both workers.  Once they flow, 3 jobs
# (max_attempts 2) call /status/429?retry_after=2.
q "SELECT jobloop.drop_limit('$EP1')" >/dev/null
submit lt 40 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/delay?s=0.1', 'tag', 'bg429', 'j', g, 'steps', 12)" >/dev/null
_bg_flowing() { [[ $(grep -c 'tag=bg429' "$JL_MOCK_LOG") -ge 40 ]]; }
jl_wait_for 30 _bg_flowing || true
submit lt_429 3 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/status/429?retry_after=2', 'tag', 'p429', 'j', g)" >/dev/null
wait_done p429 30 "INSERT INTO lt.sample (tag, what, v)
    SELECT 'p429', 'paused_until', extract(epoch FROM paused_until)::text FROM jobloop.limits
     WHERE endpoint = '$EP1' AND paused_until IS NOT NULL
    UNION ALL
    SELECT 'bg429', 'holders', count(DISTINCT worker)::text FROM jobloop.jobs WHERE state->>'tag' = 'bg429' AND worker IS NOT NULL" || true
wait_done bg429 30 || true
load_log

tap_sql_ok "429: the jobs failed with \"HTTP 429 Too Many Requests after 2 attempts\"" \
    "SELECT count(*) = 3 FROM jobloop.jobs WHERE state->>'tag' = 'p429' AND status = 'failed'
        AND last_error = 'HTTP 429 Too Many Requests after 2 attempts' AND attempts = 2" \
    "SELECT id || ' ' || status || ' attempts ' || attempts || ': ' || coalesce(last_error, '-') FROM jobloop.jobs WHERE state->>'tag' = 'p429'"
# Grouped by Idempotency-Key: the retry of a step reuses its key.
tap_sql_ok "429: each job's retry (same Idempotency-Key) started >= Retry-After (2 s) after its 429 (50 ms slack)" \
    "SELECT count(*) = 3 AND bool_and(n = 2 AND gap >= 1.95) FROM (
        SELECT key, count(*) n, max(started) - min(ended) gap FROM lt.log WHERE tag = 'p429' GROUP BY key) x" \
    "SELECT 'key ' || key || ': ' || count(*) || ' requests, retry ' || round(max(started) - min(ended), 3) || ' s after the first 429'
       FROM lt.log WHERE tag = 'p429' GROUP BY key"
# The endpoint pause.  Every poll of wait_done above sampled jobloop.limits.paused_until.
# Take the earliest value seen, U.  It was set by a worker that learned of a 429 at U - 2
# (paused_until = then + Retry-After), and a pause is only ever extended, never cut, so the
# endpoint was paused over all of [U - 2, U]: no request of any job may start in it.  The
# window is shrunk by 100 ms at the start (a call granted just before the pause is sent
# after the worker's current transaction, and times are rounded to the ms) and 50 ms at
# the end.  Sampling can only make U later, never invalid.
PAUSE_SQL="WITH w AS (SELECT min(v::numeric) - 2 AS p, min(v::numeric) - 2 + 0.1 AS lo, min(v::numeric) - 0.05 AS hi
                        FROM lt.sample WHERE tag = 'p429' AND what = 'paused_until')"
tap_sql_ok "429: the endpoint got no request (from any job) while paused for Retry-After (2 s)" \
    "$PAUSE_SQL SELECT w.p IS NOT NULL
        AND (SELECT count(*) FROM lt.log l WHERE l.addr = '127.0.0.1' AND l.started > w.lo AND l.started < w.hi) = 0
       FROM w" \
    "$PAUSE_SQL SELECT format('pause began at P = %s (first 429 answered at P - %s); checked P + 0.1 .. P + 1.95', w.p,
                             round(w.p - (SELECT min(ended) FROM lt.log WHERE tag = 'p429'), 3)) FROM w
     UNION ALL SELECT format('request started at P + %s: %s', round(l.started - w.p, 3), l.uri)
       FROM w, lt.log l WHERE l.addr = '127.0.0.1' AND l.started > w.p - 0.2 AND l.started < w.p + 2.2
        AND NOT (l.tag = 'bg429' AND l.started < w.p)"
tap_sql_ok "429: the other jobs (held by both workers) resumed after the pause and all completed" \
    "$PAUSE_SQL SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = 'bg429' AND status = 'completed') = 40
        AND (SELECT max(v::int) FROM lt.sample WHERE tag = 'bg429' AND what = 'holders') = 2
        AND (SELECT count(*) FROM lt.log l, w WHERE l.tag = 'bg429' AND l.started < w.p) > 0
        AND (SELECT count(*) FROM lt.log l, w WHERE l.tag = 'bg429' AND l.started > w.p + 2) > 0" \
    "SELECT 'bg429 jobs: ' || string_agg(status || ' ' || n, ', ') FROM (SELECT status, count(*) n FROM jobloop.jobs WHERE state->>'tag' = 'bg429' GROUP BY 1) s
     UNION ALL SELECT 'workers seen holding them at once: ' || max(v) FROM lt.sample WHERE tag = 'bg429' AND what = 'holders'"
# The endpoint has no limit (the concurrency phase's was dropped): once the pause is over,
# the 40 background jobs, all due, go at once, not max_concurrency 4 at a time.
tap_sql_ok "429: after the pause the endpoint (no limit) is not held to a dropped limit (overlap > $CONC)" \
    "$PAUSE_SQL SELECT lt.overlap('bg429', (SELECT hi FROM w)) > $CONC" \
    "$PAUSE_SQL SELECT 'most background calls in flight at once after the pause: ' || lt.overlap('bg429', (SELECT hi FROM w))
                      || ', before: ' || lt.overlap('bg429') FROM w"
tap_sql_ok "429: jobloop.limits showed the pause (paused_until) while it lasted" \
    "SELECT count(*) > 0 FROM lt.sample WHERE tag = 'p429' AND what = 'paused_until'" ""

# Attempts run out without Retry-After: the kind's max_attempts (5 for kind lt).
submit lt 1 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/status/429', 'tag', 'p429b', 'j', g)" >/dev/null
wait_done p429b 15 || true
load_log
tap_sql_ok "429: out of attempts, the job fails with \"HTTP 429 Too Many Requests after 5 attempts\" (5 requests)" \
    "SELECT (SELECT last_error = 'HTTP 429 Too Many Requests after 5 attempts' AND status = 'failed'
               FROM jobloop.jobs WHERE state->>'tag' = 'p429b')
        AND (SELECT count(*) FROM lt.log WHERE tag = 'p429b') = 5" \
    "SELECT status || ': ' || coalesce(last_error, '-') FROM jobloop.jobs WHERE state->>'tag' = 'p429b'
     UNION ALL SELECT 'requests logged: ' || count(*) FROM lt.log WHERE tag = 'p429b'"

# A Retry-After above an hour counts as an hour (for the endpoint and the job's retry).
# rate_key lt-long: the hour-long pause blocks nothing else.
submit lt_429 1 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/status/429?retry_after=7200', 'tag', 'p429long',
                                    'j', g, 'rate_key', 'lt-long')" >/dev/null
_long_retry_planned() {
    [[ $(q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = 'p429long' AND attempts = 1 AND worker IS NULL") == 1 ]]
}
jl_wait_for 30 _long_retry_planned || true
load_log
tap_sql_ok "429: Retry-After 7200 pauses the endpoint and delays the retry by 1 h (the cap), not 2 h" \
    "SELECT (SELECT paused_until BETWEEN to_timestamp(t) + interval '3600 s' AND to_timestamp(t) + interval '3610 s'
               FROM jobloop.limits WHERE endpoint = 'lt-long')
        AND (SELECT run_after BETWEEN to_timestamp(t) + interval '3600 s' AND to_timestamp(t) + interval '3610 s'
               FROM jobloop.jobs WHERE state->>'tag' = 'p429long' AND status = 'running')
       FROM (SELECT min(ended)::float8 - 0.001 AS t FROM lt.log WHERE tag = 'p429long') x" \
    "SELECT 'paused_until: ' || coalesce(paused_until::text, 'none') FROM jobloop.limits WHERE endpoint = 'lt-long'
     UNION ALL SELECT format('job %s %s attempts %s worker %s run_after %s updated_at %s: %s', id, status, attempts,
                             worker, run_after, updated_at, last_error)
       FROM jobloop.jobs WHERE state->>'tag' = 'p429long'
     UNION ALL SELECT '429 logged at ' || to_timestamp(min(ended)::float8) FROM lt.log WHERE tag = 'p429long'"
q "SELECT jobloop.cancel(id) FROM jobloop.jobs WHERE state->>'tag' = 'p429long'" >/dev/null

# ==== 503 storms ============================================================================
# 30 jobs (max_attempts 4, backoff 100 ms) call /status/503, which always fails, on an
# endpoint named by rate_key, max_rate 100.  Each job's retries wait at least
# 100 * 2^(a-1) / 2 ms after attempt a (exponential backoff with equal jitter: the wait is
# in [d/2, d], d = 100 ms * 2^(a-1)).
#
# The endpoint's cut: every 503 halves the allowed rate (not below the ramp's start,
# 10/s), and it climbs back at the ramp's slope.  storm-ramp has ramp 0.5 s (slope 180/s
# per second): answers arrive at the allowed rate r, so between two cuts it climbs by
# about 180/r; halving balances that near r = 13/s, i.e. 10 to 30 requests a second,
# whatever the machine's speed -- a stall of a worker delays cuts but also its sends.  So
# "every 1 s window holds <= max_rate / 2 (50)" has a wide margin; without the cut the
# demand here (30 jobs retrying within 50-400 ms) would fill 100/s.
# storm-flat is the same with no ramp configured.
storm() {   # storm TAG RATE_KEY RAMP_SQL
    q "SELECT jobloop.set_limit('$2', max_rate => 100, ramp => $3)" >/dev/null
    submit lt_503 30 "jsonb_build_object('base', '$JL_MOCK_URL', 'path', '/status/503', 'tag', '$1', 'j', g,
                                         'rate_key', '$2')" >/dev/null
    wait_done "$1" 40 || true
}
storm_checks() {    # storm_checks TAG WHAT
    local tag=$1 what=$2
    tap_sql_ok "$what: every job failed with \"HTTP 503 Service Unavailable after 4 attempts\", 4 requests per Idempotency-Key" \
        "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$tag' AND status = 'failed'
                   AND last_error = 'HTTP 503 Service Unavailable after 4 attempts') = 30
            AND (SELECT count(*) = 30 AND bool_and(n = 4) FROM (SELECT key, count(*) n FROM lt.log WHERE tag = '$tag' GROUP BY key) x)" \
        "SELECT status || ' ' || n || ': ' || coalesce(e, '-') FROM (SELECT status, last_error e, count(*) n FROM jobloop.jobs WHERE state->>'tag' = '$tag' GROUP BY 1, 2) s
         UNION ALL SELECT 'requests logged: ' || count(*) FROM lt.log WHERE tag = '$tag'"
    # The attempts of a job's step share its Idempotency-Key.  The wait after attempt a
    # (its end to the next one's start) >= 100 ms * 2^(a-1) / 2, less 5 ms for ms rounding.
    tap_sql_ok "$what: each job backs off exponentially (wait after attempt a >= 50 ms * 2^(a-1))" \
        "SELECT bool_and(gap >= 0.05 * 2 ^ (a - 1) - 0.005) FROM (
            SELECT lead(started) OVER w - ended AS gap, row_number() OVER w AS a
              FROM lt.log WHERE tag = '$tag' WINDOW w AS (PARTITION BY key ORDER BY started)) x WHERE gap IS NOT NULL" \
        "SELECT 'shortest wait after attempt ' || a || ': ' || round(min(gap), 3) || ' s (at least ' || 0.05 * 2 ^ (a - 1) || ')' FROM (
            SELECT lead(started) OVER w - ended AS gap, row_number() OVER w AS a
              FROM lt.log WHERE tag = '$tag' WINDOW w AS (PARTITION BY key ORDER BY started)) x WHERE gap IS NOT NULL GROUP BY a ORDER BY a"
    tap_sql_ok "$what: the endpoint's rate is cut (every sliding 1 s window has <= max_rate / 2 = 50 requests)" \
        "SELECT lt.sliding_max('$tag') <= 50" \
        "SELECT lt.sliding_busiest('$tag') UNION ALL SELECT lt.aligned_text('$tag')"
}
storm storm1 storm-ramp "'0.5s'"
storm storm2 storm-flat NULL
load_log
storm_checks storm1 "503 storm (ramp 0.5 s)"
storm_checks storm2 "503 storm (no ramp)"

# ==== the workers are fine ==================================================================
tap_sql_ok "both workers are still running" \
    "SELECT count(*) = 2 FROM pg_stat_activity WHERE application_name LIKE 'jobloop worker %'" \
    "SELECT application_name || ' ' || coalesce(state, '') FROM pg_stat_activity WHERE backend_type LIKE '%jobloop%' OR application_name LIKE 'jobloop%'"

tap_diag "limits.sh ran in $((SECONDS - t_start)) s"
tap_done
