#!/usr/bin/env bash
# test/suites/tls.sh -- HTTPS and HTTP/2 (issue 15): certificates, mutual TLS, reloads,
# connection and session reuse, multiplexing, prior knowledge, GOAWAY.
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 1) and the TLS mock API
# (scripts/lib.sh's jl_mock_tls: nginx on a dozen loopback ports with certificates made
# by openssl for this run, and an `openssl s_server` that requires a client
# certificate); run it alone with `prove test/suites/tls.sh` once jobloop is built and
# installed (JL_BUILD=1 builds first).
#
#   checks     jobloop.ca_file / client_cert / client_key name readable files, and
#              jobloop.http2_prior_knowledge is strict host:port: ALTER SYSTEM refuses
#              the rest with a DETAIL
#   failures   unknown CA (the system's CAs, then a CA we do not trust), expired
#              certificate, host name mismatch, TLS 1.0 only, no cipher in common, a
#              CA file that cannot be read: each job fails at its first attempt (the
#              kind allows 3) with a "TLS: ..." reason naming the server
#   https      jobloop.ca_file: a job's steps over HTTP/2, on one connection
#   reuse      HTTP/1.1 keep-alive: a job's steps on one connection; a server that
#              closes after each request: every new connection resumes the TLS session
#   mtls       nginx asking for a client certificate (HTTP 400 without: that reaches
#              step), and a server that refuses the handshake without one or with one
#              of another CA (failed at once); with jobloop.client_cert it works
#   reload     the CA file replaced at the same path, and reloaded: new requests are
#              verified against the new file at once (libcurl's CA cache and the open
#              connections would have kept the old one), both ways
#   h2         50 concurrent jobs over HTTP/2 share at most 2 connections (nginx logs
#              HTTP/2.0 and $connection)
#   h2c        jobloop.http2_prior_knowledge: plain HTTP/2 to a listed host:port
#   goaway     a server that sends GOAWAY every third request: every job completes with
#              its exact number of steps, each step's Idempotency-Key seen
#   limits     an endpoint's max_concurrency holds over HTTP/2 as over HTTP/1.1
#
# Every wait is a deadline on a condition.  Settings change through an included file,
# tls.conf, that each step rewrites, with a marker setting as in guard.sh.
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
sql_true() { [[ "$(jl_psql -At -c "$1" 2>/dev/null)" == t ]]; }

t_start=$SECONDS
jl_cluster_start "jobloop.workers = 1" "include_if_exists = 'tls.conf'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_tls >&2 || tap_bail "could not start the TLS mock API"
tap_plan 52

CERTS=$JL_TLS_CERTS
TRUST=$CERTS/trust.pem      # what jobloop.ca_file names; replaced in place by "reload"
cp "$CERTS/ca.crt" "$TRUST" && chmod 0644 "$TRUST"
H=https://127.0.0.1

jl_psql >/dev/null <<'SQL' || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA tl;
-- state: {"url": ..., "tag": ..., "steps": K}; one call per step to url?...&n=<step>&tag=<tag>,
-- the last response kept in state.last, its status in state.status.
CREATE FUNCTION tl.req(s jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN coalesce((s->>'i')::int, 0) >= coalesce((s->>'steps')::int, 1) THEN NULL
           ELSE jsonb_build_object('url', (s->>'url')
                || CASE WHEN strpos(s->>'url', '?') > 0 THEN '&' ELSE '?' END
                || 'n=' || coalesce((s->>'i')::int, 0) || '&tag=' || (s->>'tag')) END
$$;
CREATE FUNCTION tl.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT s || jsonb_build_object('i', coalesce((s->>'i')::int, 0) + 1,
                                   'status', r->'status', 'last', r->'body')
$$;
SELECT jobloop.create_kind('tl', 'tl.req(jsonb)', 'tl.step(jsonb,jsonb)', max_attempts => 3,
                           backoff => '50 ms', max_backoff => '100 ms');
SQL

WORKERS0=$(q "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")

# ---- helpers -----------------------------------------------------------------------------
MARKER=0
# set_conf LINE...: tls.conf becomes LINE... (plus a new marker); reload; return once a
# new session sees the marker, i.e. the postmaster has processed the file.
set_conf() {
    MARKER=$((MARKER + 1))
    { printf '%s\n' "$@"; echo "tlstest.marker = '$MARKER'"; } >"$JL_PGDATA/tls.conf"
    chmod 0644 "$JL_PGDATA/tls.conf"
    q "SELECT pg_reload_conf()" >/dev/null
    jl_wait_for 15 sql_true "SELECT current_setting('tlstest.marker', true) = '$MARKER'"
}

# submit TAG STEPS URL [COUNT]: COUNT (default 1) jobs of STEPS steps to URL, in one statement.
submit() {
    local tag=$1 steps=$2 url=$3 jobs=${4:-1}
    q "SELECT count(jobloop.submit('tl', jsonb_build_object('url', '$url', 'tag', '$tag', 'steps', $steps)))
         FROM generate_series(1, $jobs)" >/dev/null
}
finished() {    # finished TAG: every job of TAG has a final status
    sql_true "SELECT count(*) > 0 AND bool_and(status IN ('completed', 'failed', 'cancelled'))
                FROM jobloop.jobs WHERE state->>'tag' = '$1'"
}
outcomes_sql() {
    echo "SELECT format('job %s %s step %s attempts %s: %s; last %s', id, status, step, attempts,
                        coalesce(last_error, 'no error'), state->'last')
            FROM jobloop.jobs WHERE state->>'tag' = '$1' ORDER BY id LIMIT 10"
}
run() {         # run TAG STEPS URL [COUNT]: submit and wait until finished
    submit "$@"
    jl_wait_for 60 finished "$1" || true
}
# retries: the worker's retries so far
retries() { q "SELECT sum(retries) FROM jobloop.worker_stats()"; }
# log_of TAG: the TLS mock's access log lines of TAG's requests
log_of() { grep -E "[?&]tag=$1[\" &]" "$JL_TLS_LOG" || true; }
# connections TAG: distinct connections that carried TAG's requests (port and $connection)
connections() { log_of "$1" | awk '{print $2 "/" $3}' | sort -u | wc -l; }

# fails_at_once DESC TAG PATTERN: every job of TAG failed at its first attempt with a
# last_error LIKE PATTERN
fails_at_once() {
    tap_sql_ok "$1" \
        "SELECT count(*) > 0 AND bool_and(status = 'failed' AND attempts = 1 AND last_error LIKE \$p\$$3\$p\$)
           FROM jobloop.jobs WHERE state->>'tag' = '$2'" "$(outcomes_sql "$2")"
}

PROBE=0
# probe_until WANT URL: probe jobs to URL, one after another, until one ends WANT
# ("completed", or "failed"): the worker has applied a reload.  Deadline 20 s.
probe_until() {
    local want=$1 url=$2 deadline=$((SECONDS + 20)) tag st
    while (( SECONDS < deadline )); do
        PROBE=$((PROBE + 1))
        tag=probe$PROBE
        submit "$tag" 1 "$url"
        jl_wait_for 15 finished "$tag" || return 1
        st=$(q "SELECT status FROM jobloop.jobs WHERE state->>'tag' = '$tag'")
        [[ "$st" == "$want" ]] && return 0
    done
    return 1
}

# ==== checks: settings that cannot work are refused ========================================
check_refused() {   # check_refused SETTING VALUE DETAIL_PART
    local out rc detail
    out=$(jl_psql -c "ALTER SYSTEM SET $1 = '$2'" 2>&1) && rc=0 || rc=$?
    detail=$(grep '^DETAIL:' <<<"$out" || true)
    if (( rc != 0 )) && [[ "$out" == *"invalid value for parameter \"$1\""* && "$detail" == *"$3"* ]]; then
        tap_ok 0 "ALTER SYSTEM SET $1 = '$2' fails, DETAIL: ...$3..."
    else
        (( rc == 0 )) && q "ALTER SYSTEM RESET $1" >/dev/null
        tap_ok 1 "ALTER SYSTEM SET $1 = '$2' fails, DETAIL: ...$3..." "exit status $rc, psql said:"$'\n'"$out"
    fi
}
check_refused jobloop.ca_file /nonexistent/ca.pem 'cannot be read'
check_refused jobloop.client_cert "$CERTS/nonexistent.crt" 'cannot be read'
check_refused jobloop.http2_prior_knowledge 'localhost' 'has no port'
check_refused jobloop.http2_prior_knowledge '127.0.0.1:0, api:80' 'not a number from 1 to 65535'
check_refused jobloop.http2_prior_knowledge 'api.internal:80x' 'not a number from 1 to 65535'
check_refused jobloop.http2_prior_knowledge '::1:80' 'is not host:port'
check_refused jobloop.http2_prior_knowledge '127.1:80' 'neither an IPv4 address'
# a list longer than 1,000 entries (the check hook may run in the postmaster, where an
# allocation error would be fatal): refused before anything is allocated for it
long_list="$(printf 'api%d:80,' $(seq 1 1001))api0:80"
out=$(jl_psql -c "ALTER SYSTEM SET jobloop.http2_prior_knowledge = '$long_list'" 2>&1) && rc=0 || rc=$?
if (( rc != 0 )) && grep -q 'more than 1000 entries' <<<"$out"; then
    tap_ok 0 "a jobloop.http2_prior_knowledge of 1,002 entries fails, DETAIL: ...more than 1000 entries..."
else
    (( rc == 0 )) && q "ALTER SYSTEM RESET jobloop.http2_prior_knowledge" >/dev/null
    tap_ok 1 "a jobloop.http2_prior_knowledge of 1,002 entries fails, DETAIL: ...more than 1000 entries..." \
        "exit status $rc, psql said:"$'\n'"${out:0:500}"
fi
out=
s=0
for kv in "jobloop.ca_file=$TRUST" "jobloop.client_cert=$CERTS/client.crt" \
          "jobloop.http2_prior_knowledge=127.0.0.1:8080, [::1]:80, API.internal:443" \
          "jobloop.http2_prior_knowledge="; do
    if ! o=$(jl_psql -c "ALTER SYSTEM SET ${kv%%=*} = '${kv#*=}'" 2>&1); then
        s=1
        out+="$kv: $o"$'\n'
    fi
    q "ALTER SYSTEM RESET ${kv%%=*}" >/dev/null
done
tap_ok "$s" "readable files and strict host:port lists are accepted" "$out"

# ==== failures: each certificate failure ends the job at once ==============================
# No jobloop.ca_file: the system's CAs do not know the test CA.
run sys 1 "$H:$JL_TLS_PORT_H2/conn"
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    fails_at_once "system CAs: the test CA is unknown: failed at once, 'TLS: certificate verify failed'" \
        sys "TLS: certificate verify failed: %(https://127.0.0.1:$JL_TLS_PORT_H2)"
else
    # a minimal system (the chroots) has no ca-certificates package
    fails_at_once "system CAs (none installed here): failed at once, naming the system's CA certificates" \
        sys "TLS: %(jobloop.ca_file is empty: the system's CA certificates) (https://127.0.0.1:$JL_TLS_PORT_H2)"
fi
tap_is "$(log_of sys | wc -l)" 0 "system CAs: the server received no request"

set_conf "jobloop.ca_file = '$TRUST'" || tap_bail "the postmaster did not reload tls.conf"
probe_until completed "$H:$JL_TLS_PORT_H2/json" || tap_bail "the worker did not take jobloop.ca_file"

run expired 1 "$H:$JL_TLS_PORT_EXPIRED/json"
fails_at_once "expired certificate: failed at once, 'certificate has expired'" \
    expired "TLS: certificate verify failed: certificate has expired (https://127.0.0.1:$JL_TLS_PORT_EXPIRED)"
run wronghost 1 "$H:$JL_TLS_PORT_WRONGHOST/json"
fails_at_once "certificate for another host: failed at once, 'subject name ... 127.0.0.1'" \
    wronghost "TLS: %subject name%127.0.0.1%(https://127.0.0.1:$JL_TLS_PORT_WRONGHOST)"
run rogue 1 "$H:$JL_TLS_PORT_ROGUE/json"
fails_at_once "certificate of a CA not in jobloop.ca_file: failed at once, 'certificate verify failed'" \
    rogue "TLS: certificate verify failed: %(https://127.0.0.1:$JL_TLS_PORT_ROGUE)"
run oldtls 1 "$H:$JL_TLS_PORT_OLDTLS/json"
fails_at_once "a server that speaks TLS 1.0 only: failed at once, 'TLS: ...'" \
    oldtls "TLS: %(https://127.0.0.1:$JL_TLS_PORT_OLDTLS)"
run cipher 1 "$H:$JL_TLS_PORT_CIPHER/json"
fails_at_once "a server with no cipher in common: failed at once, 'alert handshake failure'" \
    cipher "TLS: %alert handshake failure%(https://127.0.0.1:$JL_TLS_PORT_CIPHER)"
n=0
for t in expired wronghost rogue oldtls cipher; do n=$((n + $(log_of $t | wc -l))); done
tap_is "$n" 0 "none of those servers received a request"

# ==== https: jobloop.ca_file, HTTP/2, one connection =======================================
run https 5 "$H:$JL_TLS_PORT_H2/conn"
tap_sql_ok "https: a job of 5 steps completes" \
    "SELECT status = 'completed' AND step = 5 FROM jobloop.jobs WHERE state->>'tag' = 'https'" \
    "$(outcomes_sql https)"
tap_is "$(log_of https | awk '{print $5}' | sort | uniq -c | awk '{print $1, $2}')" "5 HTTP/2.0" \
    "https: nginx logged its 5 requests as HTTP/2.0"
tap_is "$(connections https)" 1 "https: its 5 steps used one connection"

# ==== reuse: keep-alive over HTTP/1.1, TLS sessions resumed ================================
run ka 5 "$H:$JL_TLS_PORT_H1/conn"
tap_sql_ok "keep-alive: a job of 5 steps over HTTP/1.1 completes" \
    "SELECT status = 'completed' AND step = 5 AND state->'last'->>'protocol' = 'HTTP/1.1'
       FROM jobloop.jobs WHERE state->>'tag' = 'ka'" "$(outcomes_sql ka)"
tap_is "$(connections ka)" 1 "keep-alive: its 5 steps used one connection"

run resume 6 "$H:$JL_TLS_PORT_NOKA/conn"
tap_sql_ok "sessions: a job of 6 steps to a server that closes every connection completes" \
    "SELECT status = 'completed' AND step = 6 FROM jobloop.jobs WHERE state->>'tag' = 'resume'" \
    "$(outcomes_sql resume)"
tap_is "$(connections resume)" 6 "sessions: its 6 steps used 6 connections"
tap_is "$(log_of resume | awk '$7 == "r"' | wc -l)" 5 \
    "sessions: the last 5 of them resumed the TLS session (nginx: \$ssl_session_reused = r)"

# ==== mtls: client certificates ============================================================
run mtls_none 1 "$H:$JL_TLS_PORT_MTLS/conn"
tap_sql_ok "mTLS, no client certificate: nginx's HTTP 400 reaches step, as any 4xx" \
    "SELECT status = 'completed' AND (state->>'status')::int = 400
            AND state->>'last' LIKE '%No required SSL certificate was sent%'
       FROM jobloop.jobs WHERE state->>'tag' = 'mtls_none'" "$(outcomes_sql mtls_none)"
run strict_none 1 "$H:$JL_TLS_PORT_STRICT/"
fails_at_once "mTLS, no client certificate, a server that refuses the handshake: failed at once" \
    strict_none "TLS: %alert certificate required%(https://127.0.0.1:$JL_TLS_PORT_STRICT)"

set_conf "jobloop.ca_file = '$TRUST'" "jobloop.client_cert = '$CERTS/client.crt'" \
    "jobloop.client_key = '$CERTS/client.key'" || tap_bail "the postmaster did not reload tls.conf"
probe_until completed "$H:$JL_TLS_PORT_STRICT/" || true
run mtls_ok 1 "$H:$JL_TLS_PORT_MTLS/conn"
tap_sql_ok "mTLS with jobloop.client_cert: nginx verified the client certificate" \
    "SELECT status = 'completed' AND state->'last'->>'client_verify' = 'SUCCESS'
            AND state->'last'->>'client_dn' = 'CN=jobloop test client'
       FROM jobloop.jobs WHERE state->>'tag' = 'mtls_ok'" "$(outcomes_sql mtls_ok)"
run strict_ok 1 "$H:$JL_TLS_PORT_STRICT/"
tap_sql_ok "mTLS with jobloop.client_cert: the strict server answers 200" \
    "SELECT status = 'completed' AND (state->>'status')::int = 200
       FROM jobloop.jobs WHERE state->>'tag' = 'strict_ok'" "$(outcomes_sql strict_ok)"

set_conf "jobloop.ca_file = '$TRUST'" "jobloop.client_cert = '$CERTS/rogue-client.crt'" \
    "jobloop.client_key = '$CERTS/rogue-client.key'" || tap_bail "the postmaster did not reload tls.conf"
probe_until failed "$H:$JL_TLS_PORT_STRICT/" || true
run strict_rogue 1 "$H:$JL_TLS_PORT_STRICT/"
fails_at_once "mTLS, a client certificate of another CA: the strict server's refusal fails the job at once" \
    strict_rogue "TLS: %alert%(https://127.0.0.1:$JL_TLS_PORT_STRICT)"
run mtls_rogue 1 "$H:$JL_TLS_PORT_MTLS/conn"
tap_sql_ok "mTLS, a client certificate of another CA: nginx's HTTP 400 reaches step" \
    "SELECT status = 'completed' AND (state->>'status')::int = 400
       FROM jobloop.jobs WHERE state->>'tag' = 'mtls_rogue'" "$(outcomes_sql mtls_rogue)"

set_conf "jobloop.ca_file = '$TRUST'" "jobloop.client_key = '$CERTS/client.key'" \
    || tap_bail "the postmaster did not reload tls.conf"
probe_until failed "$H:$JL_TLS_PORT_H2/json" || true
run keyonly 1 "$H:$JL_TLS_PORT_H2/json"
fails_at_once "jobloop.client_key without jobloop.client_cert: failed at once, saying so" \
    keyonly "TLS: jobloop.client_key is set but jobloop.client_cert is not"

# An encrypted client key: the job fails at once, naming the key (the worker never asks
# for a passphrase: on a server started from a terminal, OpenSSL would wait on it).
openssl pkey -in "$CERTS/client.key" -aes256 -passout pass:secret -out "$CERTS/client-enc.key" 2>/dev/null \
    && chmod 0644 "$CERTS/client-enc.key"
set_conf "jobloop.ca_file = '$TRUST'" "jobloop.client_cert = '$CERTS/client.crt'" \
    "jobloop.client_key = '$CERTS/client-enc.key'" || tap_bail "the postmaster did not reload tls.conf"
probe_until failed "$H:$JL_TLS_PORT_STRICT/" || true
run enckey 1 "$H:$JL_TLS_PORT_STRICT/"
fails_at_once "an encrypted jobloop.client_key: failed at once, naming the key file" \
    enckey "TLS: %client-enc.key%"

# A CA file that the worker cannot read (it was readable when set; then removed).
cp "$CERTS/ca.crt" "$CERTS/gone.pem" && chmod 0644 "$CERTS/gone.pem"
set_conf "jobloop.ca_file = '$CERTS/gone.pem'" || tap_bail "the postmaster did not reload tls.conf"
rm -f "$CERTS/gone.pem"
q "SELECT pg_reload_conf()" >/dev/null     # the worker sees the file gone (a new signature)
probe_until failed "$H:$JL_TLS_PORT_H2/json" || true
run gone 1 "$H:$JL_TLS_PORT_H2/json"
fails_at_once "a jobloop.ca_file that is gone: failed at once, naming jobloop.ca_file" \
    gone "TLS: %(jobloop.ca_file)%"

# ==== reload: the CA file replaced at the same path ========================================
set_conf "jobloop.ca_file = '$TRUST'" || tap_bail "the postmaster did not reload tls.conf"
probe_until completed "$H:$JL_TLS_PORT_H2/json" || tap_bail "the worker did not take jobloop.ca_file back"
run warm 2 "$H:$JL_TLS_PORT_H2/json" 3    # open connections and a cached CA store to lose
cp "$CERTS/rogue-ca.crt" "$TRUST.new" && chmod 0644 "$TRUST.new" && mv "$TRUST.new" "$TRUST"
set_conf "jobloop.ca_file = '$TRUST'" || tap_bail "the postmaster did not reload tls.conf"
probe_until failed "$H:$JL_TLS_PORT_H2/json" && s=0 || s=1
tap_ok "$s" "reload: $TRUST replaced by another CA: the worker's next requests fail verification" \
    "$(q "$(outcomes_sql "probe$PROBE")")"
run reload_bad 1 "$H:$JL_TLS_PORT_H2/json" 3
fails_at_once "reload: then 3 jobs fail at once, certificate verify failed" \
    reload_bad "TLS: certificate verify failed: %"
cp "$CERTS/ca.crt" "$TRUST.new" && chmod 0644 "$TRUST.new" && mv "$TRUST.new" "$TRUST"
set_conf "jobloop.ca_file = '$TRUST'" || tap_bail "the postmaster did not reload tls.conf"
probe_until completed "$H:$JL_TLS_PORT_H2/json" && s=0 || s=1
tap_ok "$s" "reload: the test CA back at the same path: the worker's next requests succeed" \
    "$(q "$(outcomes_sql "probe$PROBE")")"

# ==== h2: multiplexing =====================================================================
r0=$(retries)
run h2 2 "$H:$JL_TLS_PORT_H2/delay?s=0.5" 50
tap_sql_ok "h2: 50 concurrent jobs of 2 steps (0.5 s each) complete" \
    "SELECT count(*) = 50 AND bool_and(status = 'completed' AND step = 2)
       FROM jobloop.jobs WHERE state->>'tag' = 'h2'" "$(outcomes_sql h2)"
tap_is "$(log_of h2 | awk '$5 == "HTTP/2.0"' | wc -l)" 100 "h2: nginx logged 100 requests as HTTP/2.0"
tap_is "$(( $(retries) - r0 ))" 0 "h2: no attempt was retried"
c=$(connections h2)
(( c <= 2 )) && s=0 || s=1
tap_ok "$s" "h2: they shared at most 2 connections (have $c)"
# Overlap: without multiplexing on so few connections, 50 calls of 0.5 s take 25 s.
span=$(log_of h2 | awk 'NR == 1 { min = $1 } { if ($1 < min) min = $1; if ($1 > max) max = $1 } END { printf "%d", (max - min) * 1000 }')
(( span < 5000 )) && s=0 || s=1
tap_ok "$s" "h2: the 100 responses came within 5 s (have $span ms): the streams ran side by side"

# ==== h2c: prior knowledge =================================================================
set_conf "jobloop.ca_file = '$TRUST'" "jobloop.http2_prior_knowledge = 'LOCALHOST:1, 127.0.0.1:$JL_TLS_PORT_H2C'" \
    || tap_bail "the postmaster did not reload tls.conf"
probe_until completed "http://127.0.0.1:$JL_TLS_PORT_H2C/json" || true
r0=$(retries)
run h2c 3 "http://127.0.0.1:$JL_TLS_PORT_H2C/conn" 10
tap_sql_ok "h2c: 10 jobs of 3 steps to a listed host:port complete" \
    "SELECT count(*) = 10 AND bool_and(status = 'completed' AND step = 3)
       FROM jobloop.jobs WHERE state->>'tag' = 'h2c'" "$(outcomes_sql h2c)"
tap_is "$(log_of h2c | awk '{print $5}' | sort | uniq -c | awk '{print $1, $2}')" "30 HTTP/2.0" \
    "h2c: nginx logged their 30 requests as HTTP/2.0 (prior knowledge, no TLS)"
tap_is "$(( $(retries) - r0 ))" 0 "h2c: no attempt was retried"
c=$(connections h2c)
# libcurl before 8.0.0 cannot reuse such connections (src/engine/http.c): one per request there.
if (( $(curl-config --vernum | sed 's/^/0x/') >= 0x080000 )); then
    (( c <= 2 )) && s=0 || s=1
    tap_ok "$s" "h2c: they shared at most 2 connections (have $c)"
else
    tap_is "$c" 30 "h2c: libcurl $(curl-config --version | cut -d' ' -f2) < 8.0.0: one connection per request, none reused"
fi

# ==== goaway: retried like a transport error ===============================================
run goaway 6 "$H:$JL_TLS_PORT_GOAWAY/delay?s=0.05" 30
tap_sql_ok "goaway: 30 jobs of 6 steps through a GOAWAY every 3 requests: all completed, none failed" \
    "SELECT count(*) = 30 AND bool_and(status = 'completed' AND step = 6 AND (state->>'i')::int = 6)
       FROM jobloop.jobs WHERE state->>'tag' = 'goaway'" "$(outcomes_sql goaway)"
tap_is "$(log_of goaway | awk '$10 == 200 { print $11 }' | sort -u | wc -l)" 180 \
    "goaway: nginx answered each of the 180 steps' Idempotency-Keys"
c=$(connections goaway)
(( c >= 60 )) && s=0 || s=1
tap_ok "$s" "goaway: the server closed connections as configured: at least 60 for 180 requests (have $c)"

# ==== limits: unchanged over HTTP/2 ========================================================
q "SELECT jobloop.set_limit('127.0.0.1:$JL_TLS_PORT_H2', max_concurrency => 4)" >/dev/null
run h2limit 1 "$H:$JL_TLS_PORT_H2/delay?s=0.3" 20
tap_sql_ok "limits: 20 jobs over HTTP/2 to an endpoint with max_concurrency 4 complete" \
    "SELECT count(*) = 20 AND bool_and(status = 'completed')
       FROM jobloop.jobs WHERE state->>'tag' = 'h2limit'" "$(outcomes_sql h2limit)"
# the most requests nginx had in progress at once (start = end - \$request_time)
overlap=$(log_of h2limit | awk '{ printf "%.3f 1\n%.3f -1\n", $1 - $12, $1 }' | sort -k1,1n -k2,2n \
          | awk '{ c += $2; if (c > m) m = c } END { print m + 0 }')
(( overlap >= 1 && overlap <= 4 )) && s=0 || s=1
tap_ok "$s" "limits: at most 4 of them were in progress at once over the multiplexed connection (have $overlap)"

# ==== the worker is fine ===================================================================
tap_sql_ok "the same worker (pid $WORKERS0) is still running" \
    "SELECT string_agg(pid::text, ',' ORDER BY pid) = '$WORKERS0' FROM pg_stat_activity WHERE backend_type = 'jobloop worker'" \
    "SELECT 'workers now: ' || coalesce(string_agg(pid::text, ',' ORDER BY pid), 'none') FROM pg_stat_activity WHERE backend_type = 'jobloop worker'"

tap_diag "tls.sh ran in $((SECONDS - t_start)) s"
tap_done
