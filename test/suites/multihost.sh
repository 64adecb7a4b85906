#!/usr/bin/env bash
# test/suites/multihost.sh -- external workers on other machines: four hosts on a LAN of
# network namespaces, a link cut mid-run, limits and the guard across machines.
#
# Prints TAP.  Needs root (network namespaces; CI runs as root).  Run it alone with
# `prove test/suites/multihost.sh` once jobloop and jobloop-worker are built and installed
# (JL_BUILD=1 builds first); JL_KEEP=1 keeps the namespaces, the cluster and the mock.
#
# The LAN (scripts/lib.sh, jl_netns_*): a switch namespace holding a bridge, and
#
#   db   10.231.0.1          the PostgreSQL cluster (jobloop.workers = 0: only external
#                            workers serve), listening on that address; pg_hba lets the
#                            role mh_worker (a member of jobloop_worker) in from the LAN
#                            with scram-sha-256.  This script runs here too, as the
#                            operator logged in on the database host.
#   w1   10.231.0.11         jobloop-worker --name=mh-w1
#   w2   10.231.0.12         jobloop-worker --name=mh-w2
#   api  10.231.0.21, .22    the nginx mock (test/mock/nginx.conf.in on these addresses)
#
# jobloop.allowed_hosts lists the API host's two addresses only; jobloop.lease_timeout is
# 6 s, so a cut worker's jobs move within seconds.  Nothing reaches this machine's own
# network: the bridge is inside the switch namespace.
#
# Phases (each job's state says its tag; every URL carries tag, j (the job's number in its
# tag) and n (its step), and the access log says which worker host sent it):
#   basic    200 jobs x 5 steps: every job completes with exactly 5 steps, the business
#            logic's own rows (mh.applied) are written once per step, the API saw each
#            step once, and both worker hosts did the work
#   rate     max_rate 20 (rate_key mh-rate), 80 jobs, both hosts: the API's access log
#            never shows more than the bucket allows in any 1-second window
#   conc     max_concurrency 4 (rate_key mh-conc), 40 calls of 0.2 s from both hosts: never
#            more than 4 in flight at the API
#   guard    a job whose URL is the database host's address fails on the worker host
#            with the guard's reason, and nothing reached the database host; once
#            allowed_hosts lists it (a reload), the same call gets past the guard
#   cut      60 jobs x 10 calls of 0.2 s; once w1 has calls in flight its cable is pulled
#            at the switch (w1's sockets stay open, packets vanish).  Every job completes
#            on w2 while w1 is away, the jobs w1 held included; the cable goes back, w1
#            serves again, and its stale results are refused: every job's step count is
#            exact, mh.applied has each step once, and in the API's log a step sent
#            twice (the lost call and its re-send) carries the same Idempotency-Key,
#            while no two steps share one
#   end      SIGTERM: both workers exit 0; no job but the guard's failed
#
# "Exactly once" is about the job, not the wire: a call that was in flight when its worker
# vanished is sent again after the lease expires, with the same Idempotency-Key (at least
# once per call), but the job's state, step count and the rows its business logic wrote
# count every step once.
#
# Counted, not timed: the waits are deadlines on conditions; bounds on the API's log are
# upper bounds that a slow machine cannot break.  About 25 s (30 s under memcheck).  It
# runs the same in scripts/matrix.sh's chroots (the namespaces are entered with nsenter;
# see lib.sh); without root it prints "1..0 # SKIP" (run-tests.sh counts nothing), as
# root a kernel without namespaces, bridges or veth is a failure.
#
# MH_INSERVER=1 (for working on this script): two in-server workers on the database host
# instead of jobloop-worker on w1 and w2; the cut pulls the API host's cable instead, and
# the assertions about the worker hosts pass as skipped.
# shellcheck disable=SC2317  # functions run through jl_wait_for look unreachable
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

NET=10.231.0
DB_ADDR=$NET.1
W1_ADDR=$NET.11
W2_ADDR=$NET.12
API_ADDR=$NET.21
API_ADDR2=$NET.22

# ==== outside: make the LAN, then run the rest inside the database host ======================
_mh_stop_inner() {
    _jl_pid_alive "$1" || return 0
    kill -TERM "$1" 2>/dev/null
    jl_wait_for 60 _jl_pid_gone "$1" || kill -KILL "$1" 2>/dev/null
    return 0
}
if [[ -z "${MH_INNER:-}" ]]; then
    if ! why=$(jl_netns_check); then
        # Skipping is only for a developer's unprivileged run; CI is root, where a missing
        # capability is a failure.
        if [[ $EUID -ne 0 ]]; then
            echo "1..0 # SKIP $why"
            exit 0
        fi
        tap_bail "network namespaces do not work here: $why"
    fi
    if [[ "${JL_BUILD:-}" == 1 ]]; then
        jl_build >&2
    fi
    # The pid makes the names unique among concurrent runs (each has its own LAN).
    jl_netns_lan "jlmh$$" db="$DB_ADDR" w1="$W1_ADDR" w2="$W2_ADDR" api="$API_ADDR,$API_ADDR2" >&2 \
        || tap_bail "could not make the network namespaces"
    # In the background, and waited for: bash runs a trap only once its foreground command
    # is done, so a TERM for this script would otherwise wait for the whole suite.  At exit
    # the inner script gets the TERM and stops its daemons before the namespaces go.
    # (nsenter and env exec, so $! is the inner bash itself.)
    nsenter --net="/run/netns/$JL_NETNS_PREFIX-db" -- env MH_INNER=1 JL_BUILD='' bash "$0" &
    inner=$!
    jl_on_exit _mh_stop_inner "$inner"
    rc=0
    wait "$inner" || rc=$?
    exit "$rc"
fi

# ==== inside the database host's namespace ===================================================
q() { jl_psql -At -c "$1"; }
calc() { awk "BEGIN { print $1 }"; }

INSERVER=${MH_INSERVER:-}
if [[ -n "$INSERVER" ]]; then
    HOSTS=1         # distinct worker addresses the API should see
    WORKERS=2
else
    HOSTS=2
    WORKERS=0
fi
skip_inserver() { [[ -n "$INSERVER" ]] && tap_ok 0 "$1 # SKIP MH_INSERVER=1"; }

# The worker program: the ASan build's under memcheck (when the Makefile installs it there),
# else the installed one, else the tree's.
worker_bin() {
    local b
    for b in ${JL_SANITIZE:+"$(_jl_asan_bindir)/jobloop-worker"} "$JL_PGBIN/jobloop-worker" \
             "$JL_ROOT/jobloop-worker"; do
        [[ -x "$b" ]] && { echo "$b"; return 0; }
    done
    return 1
}
if [[ -z "$INSERVER" ]]; then
    WORKER_BIN=$(worker_bin) || tap_bail "jobloop-worker is not built (make; make install)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-mh.XXXXXX")
chmod 0755 "$WORK"
jl_on_exit _jl_rm_dir "$WORK"

jl_cluster_start "listen_addresses = '127.0.0.1,$DB_ADDR'" \
    "jobloop.workers = $WORKERS" \
    "jobloop.max_in_flight = 30" \
    "jobloop.lease_timeout = '6s'" \
    "jobloop.allowed_hosts = '$API_ADDR,$API_ADDR2'" \
    "log_connections = on" >&2 || tap_bail "could not start a cluster"
jl_netns_mock_start api "$API_ADDR" "$API_ADDR2" >&2 || tap_bail "could not start the mock API"
tap_plan 22

# The worker hosts log in over the LAN with a password, as a real remote machine would.
echo "host jobloop mh_worker $NET.0/24 scram-sha-256" >>"$JL_PGDATA/pg_hba.conf"
MH_PASSWORD=mh-$RANDOM$RANDOM

jl_psql >/dev/null <<SQL || tap_bail "setup failed"
SELECT pg_reload_conf();
CREATE EXTENSION jobloop;
CREATE ROLE mh_worker LOGIN PASSWORD '$MH_PASSWORD';
CREATE SCHEMA mh;
-- One row per step the business logic applied: a step applied twice shows up here.
-- pid: the backend that ran the step (an external worker's turns run in the backend of
-- its connection), to tell which worker applied it.
CREATE TABLE mh.applied (tag text, j int, n int, at timestamptz DEFAULT clock_timestamp(),
                         pid int DEFAULT pg_backend_pid());
CREATE FUNCTION mh.req(s jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'url', (s->>'base') || (s->>'path')
               || CASE WHEN strpos(s->>'path', '?') > 0 THEN '&' ELSE '?' END
               || 'tag=' || (s->>'tag') || '&j=' || (s->>'j') || '&n=' || (s->>'n'),
        'rate_key', s->>'rate_key'))
\$\$;
CREATE FUNCTION mh.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF (r->>'status')::int <> 200 THEN
        RAISE EXCEPTION 'HTTP %', r->>'status';
    END IF;
    INSERT INTO mh.applied (tag, j, n) VALUES (s->>'tag', (s->>'j')::int, (s->>'n')::int);
    RETURN s || jsonb_build_object('n', (s->>'n')::int + 1);
END
\$\$;
CREATE FUNCTION mh.done(s jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT (s->>'n')::int >= (s->>'steps')::int
\$\$;
SELECT jobloop.create_kind('mh', 'mh.req(jsonb)', 'mh.step(jsonb,jsonb)', 'mh.done(jsonb)',
                           backoff => '100ms', max_backoff => '1s', max_attempts => 10);
SELECT jobloop.create_kind('mh_once', 'mh.req(jsonb)', 'mh.step(jsonb,jsonb)', 'mh.done(jsonb)',
                           max_attempts => 1, timeout => '5s');

-- The API's access logs, one row per request: nginx's end time and start time (msec -
-- request_time), the worker host that sent it (remote_addr), the API address, the
-- Idempotency-Key split into the job's key token and step, and tag, j, n from the URL.
CREATE TABLE mh.raw (line text);
CREATE TABLE mh.log (ended numeric, started numeric, src text, dst text, uri text, status int,
                     key text, token uuid, kstep int, tag text, j int, n int);
CREATE FUNCTION mh.sliding_max(t text) RETURNS bigint LANGUAGE sql AS \$\$
    SELECT coalesce(max(c), 0) FROM (
        SELECT count(*) OVER (ORDER BY started RANGE BETWEEN CURRENT ROW AND 0.999 FOLLOWING) c
          FROM mh.log WHERE tag = t) x
\$\$;
CREATE FUNCTION mh.aligned_text(t text) RETURNS text LANGUAGE sql AS \$\$
    SELECT 'requests per second from the first: ' || string_agg(n::text, ' ' ORDER BY w)
      FROM (SELECT floor(l.started - f.t0)::int AS w, count(*) AS n
              FROM mh.log l, (SELECT min(started) AS t0 FROM mh.log WHERE tag = t) f
             WHERE l.tag = t GROUP BY 1) a
\$\$;
-- Most calls of a tag in flight at the API at once; each interval shrunk by 5 ms at both
-- ends, since nginx stamps them with a per-process cached clock (as in limits.sh).
CREATE FUNCTION mh.overlap(t text) RETURNS bigint LANGUAGE sql AS \$\$
    SELECT coalesce(max(s), 0) FROM (
        SELECT sum(d) OVER (ORDER BY at, d ROWS UNBOUNDED PRECEDING) s FROM (
            SELECT started + 0.005 AS at, 1 AS d FROM mh.log WHERE tag = t
            UNION ALL
            SELECT ended - 0.005, -1 FROM mh.log WHERE tag = t) e) x
\$\$;
CREATE FUNCTION mh.sources(t text) RETURNS text LANGUAGE sql AS \$\$
    SELECT coalesce(string_agg(src || ': ' || c, ', ' ORDER BY src), 'none')
      FROM (SELECT src, count(*) c FROM mh.log WHERE tag = t GROUP BY src) s
\$\$;
SQL

[[ -n "$INSERVER" ]] || q "GRANT jobloop_worker TO mh_worker" >/dev/null || tap_bail "no role jobloop_worker"

load_log() {
    jl_psql -c "TRUNCATE mh.raw, mh.log" >/dev/null
    cat "$JL_MOCK_LOG" "$JL_MOCK_LOG2" \
        | jl_psql -c "COPY mh.raw FROM STDIN WITH (FORMAT text, DELIMITER E'\\x01')" >/dev/null
    jl_psql >/dev/null <<'SQL'
INSERT INTO mh.log
SELECT m[1]::numeric, m[1]::numeric - m[8]::numeric, m[2], m[3], m[5], m[6]::int, nullif(m[7], '-'),
       k[1]::uuid, k[2]::int,
       (regexp_match(m[5], '[?&]tag=([^&]*)'))[1],
       (regexp_match(m[5], '[?&]j=([0-9]+)'))[1]::int,
       (regexp_match(m[5], '[?&]n=([0-9]+)'))[1]::int
  FROM mh.raw
       CROSS JOIN LATERAL regexp_match(line, '^([0-9.]+) (\S+) (\S+) "(\S+) (\S+)" ([0-9]+) [0-9]+ "([^"]*)" ([0-9.]+)$') m
       LEFT JOIN LATERAL regexp_match(m[7], '^jobloop-([0-9a-f-]{36})-([0-9]+)$') k ON true;
SQL
}

# submit TAG N STEPS PATH [RATE_KEY] [KIND]: N jobs of STEPS calls to the API's PATH.
submit() {
    q "SELECT count(jobloop.submit('${6:-mh}', jsonb_strip_nulls(jsonb_build_object(
           'base', '$JL_MOCK_URL', 'path', '$4', 'tag', '$1', 'j', g, 'n', 0, 'steps', $3,
           'rate_key', nullif('${5:-}', '')))))
         FROM generate_series(1, $2) g" >/dev/null
}
unfinished() {
    q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1' AND status IN ('pending', 'running')"
}
tag_done() { [[ "$(unfinished "$1")" == 0 ]]; }

# exact TAG N STEPS: every job of TAG completed with exactly STEPS steps (row and state),
# and its business logic applied each step 0..STEPS-1 exactly once.
exact_sql() {
    echo "SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1'
                     AND status = 'completed' AND step = $3 AND (state->>'n')::int = $3) = $2
             AND (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = '$1') = $2
             AND (SELECT count(*) FROM mh.applied WHERE tag = '$1') = $2 * $3
             AND (SELECT count(*) FROM (SELECT DISTINCT j, n FROM mh.applied WHERE tag = '$1') d) = $2 * $3
             AND (SELECT bool_and(n BETWEEN 0 AND $3 - 1) FROM mh.applied WHERE tag = '$1')"
}
exact_diag() {
    echo "SELECT 'jobs: ' || coalesce(string_agg(format('%s %s with step %s', n, status, step), ', '), 'none')
            FROM (SELECT status, step, count(*) n FROM jobloop.jobs WHERE state->>'tag' = '$1'
                   GROUP BY 1, 2 ORDER BY 1, 2) s
          UNION ALL
          SELECT 'steps applied: ' || count(*) || ', distinct: ' || count(DISTINCT (j, n))
            FROM mh.applied WHERE tag = '$1'
          UNION ALL
          SELECT 'last errors: ' || string_agg(DISTINCT last_error, ' | ')
            FROM jobloop.jobs WHERE state->>'tag' = '$1' AND last_error IS NOT NULL"
}

# ---- the worker hosts ------------------------------------------------------------------------
declare -A WPID=()
worker_start() {    # worker_start HOST: jobloop-worker in HOST's namespace, host name mh-HOST
    local host=$1 conninfo
    conninfo="host=$DB_ADDR port=$PGPORT dbname=jobloop user=mh_worker"
    # The password comes from the environment, not the command line (ps shows that).
    # The namespaces share this machine's host name: --name tells the workers apart.
    # --turn-timeout 10: a worker whose cable is pulled gives its connection up after 10 s
    # rather than the default 60, which only shortens the suite.
    local env=("PGPASSWORD=$MH_PASSWORD")
    # Under memcheck the worker is the ASan build: its reports go where the cluster's do
    # (jl_sanitize_findings counts them), leaks included, as in test/suites/external.sh.
    [[ -n "${JL_SANITIZE:-}" ]] \
        && env+=("ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:disable_coredump=1:handle_segv=1:handle_abort=1:log_path=$JL_SANITIZE_DIR/reports/asan-jobloop-worker-$host")
    # nsenter itself, not jl_netns_exec: a function run with & is a subshell, and $! would
    # be that shell's pid rather than the worker's (nsenter and env exec the program).
    nsenter --net="/run/netns/$JL_NETNS_PREFIX-$host" -- env "${env[@]}" \
        "$WORKER_BIN" --name="mh-$host" --turn-timeout=10 "$conninfo" \
        >>"$WORK/worker-$host.log" 2>&1 </dev/null &
    WPID[$host]=$!
}
WRC=
worker_stop() {     # SIGTERM, then the exit status in WRC (in this shell: wait needs the parent)
    local host=$1 pid=${WPID[$1]:-}
    WRC=none
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    jl_wait_for 15 _jl_pid_gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    WRC=0
    wait "$pid" || WRC=$?
    unset "WPID[$host]"
}
_mh_cleanup() {
    local h
    for h in "${!WPID[@]}"; do
        worker_stop "$h"
    done
    # Under memcheck the workers' logs are judged with the server's (a report or a crash).
    if [[ -n "${JL_SANITIZE:-}" && -d "${JL_SANITIZE_DIR:-}/logs" ]]; then
        for h in w1 w2; do
            [[ -f "$WORK/worker-$h.log" ]] && cp "$WORK/worker-$h.log" "$JL_SANITIZE_DIR/logs/multihost-worker-$h.log"
        done
    fi
    return 0
}
jl_on_exit _mh_cleanup

# The worker host behind each attached external worker: its backend's client address.
WORKER_ADDRS_SQL="SELECT s.worker, a.client_addr FROM jobloop.worker_stats() s
                    JOIN pg_stat_activity a ON a.pid = s.pid"
attached() {    # attached ADDR...: a worker is attached from each ADDR
    local addr
    for addr in "$@"; do
        [[ "$(q "SELECT count(*) FROM ($WORKER_ADDRS_SQL) w WHERE client_addr = '$addr'")" -ge 1 ]] || return 1
    done
}
worker_diag() {
    local h
    q "SELECT 'worker_stats: ' || coalesce(string_agg(format('worker %s host %s pid %s remote_pid %s from %s held %s in flight %s steps %s',
                 s.worker, s.host, s.pid, s.remote_pid, a.client_addr, s.held, s.in_flight, s.steps), '; '), 'none')
         FROM jobloop.worker_stats() s LEFT JOIN pg_stat_activity a ON a.pid = s.pid" 2>&1 || true
    for h in w1 w2; do
        [[ -f "$WORK/worker-$h.log" ]] && { echo "--- last lines of jobloop-worker on $h:"; tail -n 8 "$WORK/worker-$h.log"; }
    done
    return 0
}

two_inserver() { [[ "$(q "SELECT count(*) FROM jobloop.worker_stats()")" == 2 ]]; }
if [[ -n "$INSERVER" ]]; then
    jl_wait_for 30 two_inserver || tap_bail "two in-server workers did not start"
else
    worker_start w1
    worker_start w2
    jl_wait_for 30 attached "$W1_ADDR" "$W2_ADDR" || { tap_diag "$(worker_diag)"; tap_bail "the two worker hosts did not attach"; }
fi

# ==== basic ==================================================================================
submit basic 200 5 /json
jl_wait_for 60 tag_done basic || true
load_log
tap_sql_ok "basic: 200 jobs completed with exactly 5 steps each, each step applied once" \
    "$(exact_sql basic 200 5)" "$(exact_diag basic)"
tap_sql_ok "basic: the API got each of the 1,000 steps once (1,000 requests, 1,000 Idempotency-Keys)" \
    "SELECT count(*) = 1000 AND count(DISTINCT key) = 1000 AND count(DISTINCT (j, n)) = 1000
       FROM mh.log WHERE tag = 'basic'" \
    "SELECT format('requests %s, keys %s, steps %s', count(*), count(DISTINCT key), count(DISTINCT (j, n)))
       FROM mh.log WHERE tag = 'basic'"
tap_sql_ok "basic: the calls came from both worker hosts ($HOSTS address(es)), none from the database host" \
    "SELECT count(DISTINCT src) = $HOSTS AND bool_and(src <> '$DB_ADDR' OR $HOSTS = 1) FROM mh.log WHERE tag = 'basic'" \
    "SELECT 'requests by source: ' || mh.sources('basic')"
if ! skip_inserver "worker_stats() shows the two external workers with their host names"; then
    tap_sql_ok "worker_stats() shows the two external workers with their host names" \
        "SELECT count(*) = 2 AND bool_and(host IN ('mh-w1', 'mh-w2')) AND count(DISTINCT host) = 2
           FROM jobloop.worker_stats()" \
        "SELECT string_agg(format('worker %s host %s remote_pid %s steps %s', worker, host, remote_pid, steps), '; ')
           FROM jobloop.worker_stats()"
fi

# ==== rate ===================================================================================
# The bound on any 1-second window of a token bucket of rate r and depth b = max(1, 0.05 r),
# seen from the API: floor(r + b) + ceil(b) (the reasoning is in test/suites/limits.sh).
# Here the grants come from the database host and the calls leave from two other machines;
# the bound is the same, since a grant is spent by the worker that asked for it.
RATE=20
BOUND=22
q "SELECT jobloop.set_limit('mh-rate', max_rate => $RATE)" >/dev/null
submit rate 80 1 /json mh-rate
jl_wait_for 60 tag_done rate || true
load_log
tap_sql_ok "rate: 80 jobs completed, one request each" \
    "$(exact_sql rate 80 1) AND (SELECT count(*) FROM mh.log WHERE tag = 'rate') = 80" "$(exact_diag rate)"
tap_sql_ok "rate: both worker hosts sent calls under the one limit" \
    "SELECT count(DISTINCT src) = $HOSTS FROM mh.log WHERE tag = 'rate'" "SELECT mh.sources('rate')"
tap_sql_ok "rate: no 1-second window at the API has more than $BOUND requests (max_rate $RATE)" \
    "SELECT mh.sliding_max('rate') <= $BOUND" \
    "SELECT 'busiest window: ' || mh.sliding_max('rate') UNION ALL SELECT mh.aligned_text('rate')"

# ==== conc ===================================================================================
CONC=4
q "SELECT jobloop.set_limit('mh-conc', max_concurrency => $CONC)" >/dev/null
submit conc 40 1 '/delay?s=0.2' mh-conc
jl_wait_for 60 tag_done conc || true
load_log
tap_sql_ok "conc: 40 jobs completed, one request each" \
    "$(exact_sql conc 40 1) AND (SELECT count(*) FROM mh.log WHERE tag = 'conc') = 40" "$(exact_diag conc)"
tap_sql_ok "conc: both worker hosts sent calls under the one limit" \
    "SELECT count(DISTINCT src) = $HOSTS FROM mh.log WHERE tag = 'conc'" "SELECT mh.sources('conc')"
tap_sql_ok "conc: the API never had more than $CONC calls in flight from the two hosts together" \
    "SELECT mh.overlap('conc') <= $CONC" "SELECT 'most in flight at once: ' || mh.overlap('conc')"

# ==== guard ==================================================================================
# A job whose URL is the database host's own address (its PostgreSQL port: something
# listens there).  allowed_hosts lists the API host only, so the worker host refuses it.
q "SELECT count(jobloop.submit('mh_once', jsonb_build_object('base', 'http://$DB_ADDR:$PGPORT', 'path', '/',
       'tag', 'guard', 'j', 1, 'n', 0, 'steps', 1)))" >/dev/null
jl_wait_for 30 tag_done guard || true
tap_sql_ok "guard: a call to the database host's address fails with the guard's reason" \
    "SELECT status = 'failed' AND last_error LIKE 'refused to connect to $DB_ADDR (private address)%not in jobloop.allowed_hosts%'
       FROM jobloop.jobs WHERE state->>'tag' = 'guard'" \
    "SELECT format('status %s, last_error %s', status, last_error) FROM jobloop.jobs WHERE state->>'tag' = 'guard'"
# An HTTP request on PostgreSQL's port is logged as a bad startup packet ("GET " read as
# a length); nothing of the kind may be in the log yet.
BAD_PACKET='invalid length of startup packet|unsupported frontend protocol|incomplete startup packet'
s=0; grep -q -E "$BAD_PACKET" "$JL_PGLOG" && s=1
tap_ok $s "guard: the database host's port received no HTTP request" "$(grep -E "$BAD_PACKET" "$JL_PGLOG" | tail -n 3)"

# Allowed now: the same call gets past the guard on the worker host (and fails another way:
# PostgreSQL does not speak HTTP).  A reload reaches the workers at their next turn, so try
# again until one does, within a deadline.
q "ALTER SYSTEM SET jobloop.allowed_hosts = '$API_ADDR,$API_ADDR2,$DB_ADDR'" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
guard_passed() {
    local i
    i=$(q "SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = 'guard2'")
    q "SELECT jobloop.submit('mh_once', jsonb_build_object('base', 'http://$DB_ADDR:$PGPORT', 'path', '/',
           'tag', 'guard2', 'j', $((i + 1)), 'n', 0, 'steps', 1))" >/dev/null
    jl_wait_for 20 tag_done guard2 || return 1
    [[ "$(q "SELECT last_error NOT LIKE 'refused to connect%' FROM jobloop.jobs
              WHERE state->>'tag' = 'guard2' AND (state->>'j')::int = $((i + 1))")" == t ]]
}
s=0; jl_wait_for 30 guard_passed || s=$?
tap_ok $s "guard: once allowed_hosts lists the database host (reload), the call gets past the guard" \
    "$(q "SELECT string_agg(format('job %s: %s', state->>'j', last_error), E'\n') FROM jobloop.jobs WHERE state->>'tag' = 'guard2'")"
q "ALTER SYSTEM RESET jobloop.allowed_hosts" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null

# ==== cut ====================================================================================
if [[ -n "$INSERVER" ]]; then
    CUT_HOST=api CUT_ADDR=$API_ADDR
else
    CUT_HOST=w1 CUT_ADDR=$W1_ADDR
fi
W1_WORKER=
submit cut 60 10 '/delay?s=0.2'
# Cut once the host has calls in flight, so that some of its calls are answered by the API
# and never reach it.
w1_busy() {
    if [[ -n "$INSERVER" ]]; then
        [[ "$(q "SELECT coalesce(sum(in_flight), 0) > 0 FROM jobloop.worker_stats()")" == t ]]
    else
        [[ "$(q "SELECT s.in_flight > 0 AND s.held > 0 FROM jobloop.worker_stats() s
                  JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.client_addr = '$W1_ADDR'")" == t ]]
    fi
}
jl_wait_for 30 w1_busy || { tap_diag "$(worker_diag)"; tap_bail "$CUT_HOST never had calls in flight"; }
W1_PID=0
if [[ -z "$INSERVER" ]]; then
    IFS='|' read -r W1_WORKER W1_PID < <(q "SELECT s.worker, s.pid FROM jobloop.worker_stats() s
                                             JOIN pg_stat_activity a ON a.pid = s.pid
                                            WHERE a.client_addr = '$W1_ADDR'")
fi
jl_netns_link "$CUT_HOST" down
t_cut=$(q "SELECT extract(epoch FROM clock_timestamp())")
if [[ -n "$W1_WORKER" ]]; then
    q "CREATE TABLE mh.held_at_cut AS SELECT id, (state->>'j')::int AS j, step
         FROM jobloop.jobs WHERE state->>'tag' = 'cut' AND worker = $W1_WORKER AND status = 'running'" >/dev/null
fi
tap_diag "pulled the cable of $CUT_HOST ($CUT_ADDR) at $t_cut; jobs it held: $(q "SELECT count(*) FROM mh.held_at_cut" 2>/dev/null || echo n/a)"

# Every job completes while the host is away: its jobs' leases expire (6 s) and w2 frees
# and claims them at its next heartbeat.  (With MH_INSERVER the API is away: the calls time
# out and are retried until it is back, so this waits for the cable.)
if [[ -n "$INSERVER" ]]; then
    jl_wait_for 8 tag_done cut || true
    jl_netns_link "$CUT_HOST" up
    s=0; jl_wait_for 90 tag_done cut || s=$?
    tap_ok $s "cut: every job completes"
    skip_inserver "cut: the jobs w1 held at the cut completed on w2, while w1 was away"
else
    s=0; jl_wait_for 90 tag_done cut || s=$?
    tap_ok $s "cut: every job completes on w2 while w1 is away" "$(worker_diag)"
    load_log
    tap_sql_ok "cut: the jobs w1 held at the cut completed on w2, while w1 was away" \
        "SELECT count(*) > 0 AND bool_and(done)
           FROM (SELECT h.id, EXISTS (SELECT FROM mh.log l WHERE l.tag = 'cut' AND l.j = h.j
                                        AND l.src = '$W2_ADDR' AND l.started > $t_cut) AS done
                   FROM mh.held_at_cut h) x" \
        "SELECT format('%s jobs held by w1 (worker %s) at the cut; %s of them later called from w2',
                       count(*), '$W1_WORKER',
                       count(*) FILTER (WHERE EXISTS (SELECT FROM mh.log l WHERE l.tag = 'cut' AND l.j = h.j
                                                        AND l.src = '$W2_ADDR' AND l.started > $t_cut)))
           FROM mh.held_at_cut h"
    jl_netns_link "$CUT_HOST" up
fi
t_up=$(q "SELECT extract(epoch FROM clock_timestamp())")

# The cut host serves again: small batches until one of its calls reaches the API (its
# reconnect backoff and TCP's retransmission timers decide when).  Its stale results of
# before the cut arrive in the meantime and must be refused.
back_i=0
serves_again() {
    back_i=$((back_i + 1))
    submit "back$back_i" 20 2 '/delay?s=0.2'
    jl_wait_for 30 tag_done "back$back_i" || return 1
    load_log
    [[ "$(q "SELECT count(*) FROM mh.log WHERE tag = 'back$back_i' AND src = '$CUT_ADDR'")" -gt 0 \
        || -n "$INSERVER" ]]
}
if [[ -n "$INSERVER" ]]; then
    serves_again || true
    skip_inserver "cut: w1 serves again once its cable is back"
else
    s=0; jl_wait_for 120 serves_again || s=$?
    tap_ok $s "cut: w1 serves again once its cable is back" "$(worker_diag)"
    tap_diag "the cable was out for $(calc "$t_up - $t_cut") s; w1's first call after it came back started $(q "SELECT round(min(started) - $t_up, 1) FROM mh.log WHERE src = '$W1_ADDR' AND started > $t_up") s later"
fi
load_log
tap_sql_ok "cut: every job completed exactly once: 10 steps each, each step applied once" \
    "$(exact_sql cut 60 10)" "$(exact_diag cut)
     UNION ALL
     SELECT format('steps applied twice: %s, the second time %s to %s s after the cut (the cable was back at %s s), %s of them by w1''s backend (pid %s)',
                   count(*), round(min(t2) - $t_cut, 1), round(max(t2) - $t_cut, 1), round($t_up - $t_cut, 1),
                   count(*) FILTER (WHERE p2 = $W1_PID), $W1_PID)
       FROM (SELECT j, n, extract(epoch FROM max(at)) t2, (array_agg(pid ORDER BY at DESC))[1] p2
               FROM mh.applied WHERE tag = 'cut' GROUP BY j, n HAVING count(*) > 1) d
     HAVING count(*) > 0"
tap_sql_ok "cut: the batches after the cable came back too (2 steps each, applied once)" \
    "SELECT bool_and(ok) FROM (
        SELECT (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = t AND status = 'completed' AND step = 2)
               = (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = t)
           AND (SELECT count(*) FROM mh.applied WHERE tag = t) = 2 * (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = t)
           AND (SELECT count(DISTINCT (j, n)) FROM mh.applied WHERE tag = t) = 2 * (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = t) AS ok
          FROM (SELECT DISTINCT state->>'tag' AS t FROM jobloop.jobs WHERE state->>'tag' LIKE 'back%') b) x" \
    "SELECT string_agg(format('%s: %s jobs, %s steps applied', t, (SELECT count(*) FROM jobloop.jobs WHERE state->>'tag' = t),
                              (SELECT count(*) FROM mh.applied WHERE tag = t)), '; ')
       FROM (SELECT DISTINCT state->>'tag' AS t FROM jobloop.jobs WHERE state->>'tag' LIKE 'back%') b"
# The wire: every step reached the API, each step of a job under one key and each key for
# one step (the key's step and the URL's n agree), keys of different jobs differ; steps
# sent more than once are the calls lost with the cable, re-sent with the same key.
tap_sql_ok "cut: the API saw every one of the 600 steps, each step under one Idempotency-Key of its own" \
    "SELECT count(DISTINCT (j, n)) = 600 AND count(DISTINCT key) = 600 AND bool_and(key IS NOT NULL)
        AND NOT EXISTS (SELECT FROM mh.log WHERE tag = 'cut' GROUP BY key HAVING count(DISTINCT (j, n)) > 1)
        AND NOT EXISTS (SELECT FROM mh.log WHERE tag = 'cut' GROUP BY j, n HAVING count(DISTINCT key) > 1)
        AND NOT EXISTS (SELECT FROM mh.log WHERE tag = 'cut' GROUP BY j HAVING count(DISTINCT token) > 1)
        AND bool_and(kstep = n)
       FROM mh.log WHERE tag = 'cut'" \
    "SELECT format('requests %s, steps %s, keys %s, keys of two steps %s, steps under two keys %s, key step <> n: %s',
                   count(*), count(DISTINCT (j, n)), count(DISTINCT key),
                   (SELECT count(*) FROM (SELECT key FROM mh.log WHERE tag = 'cut' GROUP BY key HAVING count(DISTINCT (j, n)) > 1) a),
                   (SELECT count(*) FROM (SELECT 1 FROM mh.log WHERE tag = 'cut' GROUP BY j, n HAVING count(DISTINCT key) > 1) b),
                   count(*) FILTER (WHERE kstep <> n))
       FROM mh.log WHERE tag = 'cut'"
if ! skip_inserver "cut: calls lost with w1's cable were re-sent by w2 with the same Idempotency-Key"; then
    tap_sql_ok "cut: calls lost with w1's cable were re-sent by w2 with the same Idempotency-Key" \
        "SELECT count(*) > 0 FROM (
            SELECT key FROM mh.log WHERE tag = 'cut' GROUP BY key
            HAVING bool_or(src = '$W1_ADDR') AND bool_or(src = '$W2_ADDR' AND started > $t_cut)) r" \
        "SELECT format('steps sent more than once: %s (from w1 then w2: %s)',
                       count(*), count(*) FILTER (WHERE from_w1 AND from_w2))
           FROM (SELECT key, bool_or(src = '$W1_ADDR') from_w1, bool_or(src = '$W2_ADDR') from_w2
                   FROM mh.log WHERE tag = 'cut' GROUP BY key HAVING count(*) > 1) r"
fi

# ==== the end: a clean stop ===================================================================
if [[ -n "$INSERVER" ]]; then
    skip_inserver "SIGTERM: each jobloop-worker exits 0"
else
    worker_stop w1; rc1=$WRC
    worker_stop w2; rc2=$WRC
    s=0; [[ "$rc1" == 0 && "$rc2" == 0 ]] || s=1
    tap_ok $s "SIGTERM: each jobloop-worker exits 0" "exit statuses: w1 $rc1, w2 $rc2"$'\n'"$(worker_diag)"
fi
tap_sql_ok "no job failed or is left unfinished but the guard's" \
    "SELECT count(*) = 0 FROM jobloop.jobs WHERE state->>'tag' NOT IN ('guard', 'guard2') AND status <> 'completed'" \
    "SELECT format('%s %s: %s', state->>'tag', status, last_error) FROM jobloop.jobs
      WHERE state->>'tag' NOT IN ('guard', 'guard2') AND status <> 'completed' LIMIT 5"

tap_done
