#!/usr/bin/env bash
# test/suites/guard.sh -- jobloop.allowed_hosts: no typo opens the guard, and no change of
# it leaves a way to an address it no longer allows (issue 10, defects 2 and 3).
#
# Prints TAP.  Starts its own cluster (jobloop.workers = 1, so "the worker has seen a
# reload" is one probe) and nginx mock; run it alone with `prove test/suites/guard.sh`
# once jobloop is built and installed (JL_BUILD=1 builds first).
#
#   check      ALTER SYSTEM SET jobloop.allowed_hosts with a malformed entry fails with
#              `invalid value for parameter "jobloop.allowed_hosts"` and a DETAIL naming
#              the entry; valid lists are accepted
#   reload     a malformed value written to postgresql.conf, or to postgresql.auto.conf,
#              and reloaded: the error is logged and the previous value stays in force
#              (SHOW, jobloop.address_allowed(), and the worker: 127.0.0.2 stays refused)
#   keepalive  a host removed from the list gets no request over the keep-alive
#              connections opened while it was allowed: by address (127.0.0.1), and by
#              host name (localhost, then the URL spelled LOCALHOST)
#
# Settings change through an included file, guard.conf, that each step rewrites; a
# placeholder setting, guardtest.marker, changes with it, so "the postmaster has read the
# file" is a new session seeing the new marker.  "The worker has read it" is a probe job
# whose outcome depends on the new list.  Every wait is a deadline on a condition.
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
jl_cluster_start "jobloop.workers = 1" "include_if_exists = 'guard.conf'" >&2 \
    || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"
tap_plan 25

jl_psql >/dev/null <<'SQL' || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE SCHEMA gt;
-- One call per job, to state.url; max_attempts 1, so every failure is final at once.
CREATE FUNCTION gt.req(s jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN s ? 'status' THEN NULL ELSE jsonb_build_object('url', s->>'url') END
$$;
CREATE FUNCTION gt.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT s || jsonb_build_object('status', r->'status')
$$;
SELECT jobloop.create_kind('gt', 'gt.req(jsonb)', 'gt.step(jsonb,jsonb)', max_attempts => 1);
SQL

WORKERS0=$(q "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE backend_type = 'jobloop worker'")

# ---- helpers -----------------------------------------------------------------------------
MARKER=0
# set_conf LINE...: guard.conf becomes LINE... (plus a new marker); reload; return once a
# new session sees the marker, i.e. the postmaster has processed the file.
set_conf() {
    MARKER=$((MARKER + 1))
    { printf '%s\n' "$@"; echo "guardtest.marker = '$MARKER'"; } >"$JL_PGDATA/guard.conf"
    chmod 0644 "$JL_PGDATA/guard.conf"
    q "SELECT pg_reload_conf()" >/dev/null
    jl_wait_for 15 sql_true "SELECT current_setting('guardtest.marker', true) = '$MARKER'"
}

# submit TAG URL...: one job per URL, in one transaction; state.tag = TAG.
submit() {
    local tag=$1 url values=()
    shift
    for url in "$@"; do values+=("('$url')"); done
    q "SELECT count(jobloop.submit('gt', jsonb_build_object('url', u, 'tag', '$tag'))) FROM (VALUES $(IFS=,; echo "${values[*]}")) v(u)" >/dev/null
}
finished() {    # finished TAG: every job of TAG has a final status
    sql_true "SELECT count(*) > 0 AND bool_and(status IN ('completed', 'failed', 'cancelled'))
                FROM jobloop.jobs WHERE state->>'tag' = '$1'"
}
outcomes_sql() {    # outcomes_sql TAG: a query listing the jobs of TAG, for diagnostics
    echo "SELECT format('job %s %s %s attempts %s: %s', id, state->>'url', status, attempts,
                        coalesce(last_error, 'no error'))
            FROM jobloop.jobs WHERE state->>'tag' = '$1' ORDER BY id"
}
outcomes() { q "$(outcomes_sql "$1")"; }
log_lines() { wc -l <"$1"; }

# probe_until WANT URL: submit probe jobs to URL, one after another, until one ends WANT
# ("completed": the worker now allows URL's host; "refused": it now refuses it) -- the
# worker has applied the new setting.  Deadline 15 s.
PROBE=0
probe_until() {
    local want=$1 url=$2 deadline=$((SECONDS + 15)) tag st
    while (( SECONDS < deadline )); do
        PROBE=$((PROBE + 1))
        tag=probe$PROBE
        submit "$tag" "$url"
        jl_wait_for 10 finished "$tag" || return 1
        st=$(q "SELECT CASE WHEN status = 'completed' THEN 'completed'
                            WHEN last_error LIKE '%not in jobloop.allowed_hosts%' THEN 'refused'
                            ELSE 'other' END FROM jobloop.jobs WHERE state->>'tag' = '$tag'")
        [[ "$st" == "$want" ]] && return 0
    done
    return 1
}

# ==== check: ALTER SYSTEM refuses malformed entries ========================================
# value | the entry the DETAIL must name
BAD=(
    "192.168.1.10/ 24|192.168.1.10/"
    "127.0.0.1/|127.0.0.1/"
    "10.1.2.3/abc|10.1.2.3/abc"
    "fd00::/|fd00::/"
    "24|24"
    "1.2.3.4/33|1.2.3.4/33"
)
for case in "${BAD[@]}"; do
    value=${case%%|*}
    entry=${case#*|}
    out=$(jl_psql -c "ALTER SYSTEM SET jobloop.allowed_hosts = '$value'" 2>&1) && rc=0 || rc=$?
    detail=$(grep '^DETAIL:' <<<"$out" || true)
    if (( rc != 0 )) && [[ "$out" == *'invalid value for parameter "jobloop.allowed_hosts"'* \
                           && "$detail" == *"$entry"* ]]; then
        s=0
    else
        s=1
        # It was accepted: take it back before anything reloads.
        (( rc == 0 )) && q "ALTER SYSTEM RESET jobloop.allowed_hosts" >/dev/null
    fi
    tap_ok "$s" "ALTER SYSTEM SET jobloop.allowed_hosts = '$value' fails, DETAIL naming \"$entry\"" \
        "exit status $rc, psql said:"$'\n'"$out"
done

out=
s=0
for value in '127.0.0.1, ::1' '10.0.0.0/8' 'api.example.com' '*' \
             'api.internal, 10.20.0.0/16, 192.168.1.10, fd00::/8'; do
    if ! o=$(jl_psql -c "ALTER SYSTEM SET jobloop.allowed_hosts = '$value'" 2>&1); then
        s=1
        out+="'$value': $o"$'\n'
    fi
done
q "ALTER SYSTEM RESET jobloop.allowed_hosts" >/dev/null
tap_ok "$s" "valid lists are accepted ('127.0.0.1, ::1', '10.0.0.0/8', 'api.example.com', '*', the README's example)" "$out"

# ==== reload: a malformed value in a file keeps the previous one ===========================
set_conf || tap_bail "the postmaster did not reload guard.conf"
guard_holds() {     # guard_holds DESC EXTRA_ADDRESSES: SHOW and address_allowed() unchanged
    tap_sql_ok "$1: SHOW jobloop.allowed_hosts still says 127.0.0.1" \
        "SELECT current_setting('jobloop.allowed_hosts') = '127.0.0.1'" \
        "SELECT 'SHOW: ' || current_setting('jobloop.allowed_hosts')"
    tap_sql_ok "$1: address_allowed() still refuses 169.254.169.254, 127.0.0.2, 10.0.0.1$2 and allows 127.0.0.1" \
        "SELECT NOT jobloop.address_allowed('169.254.169.254') AND NOT jobloop.address_allowed('127.0.0.2')
            AND NOT jobloop.address_allowed('10.0.0.1') AND NOT jobloop.address_allowed('fd00::1')
            AND NOT jobloop.address_allowed('::ffff:10.0.0.1') AND jobloop.address_allowed('127.0.0.1')" \
        "SELECT a || ': ' || jobloop.address_allowed(a::inet) FROM unnest(ARRAY['169.254.169.254', '127.0.0.2',
                '10.0.0.1', 'fd00::1', '::ffff:10.0.0.1', '127.0.0.1']) a"
}

# In postgresql.conf (through its include).
log_off=$(stat -c %s "$JL_PGLOG")
set_conf "jobloop.allowed_hosts = '127.0.0.1/'" || tap_bail "the postmaster did not reload guard.conf"
new_log=$(tail -c +"$((log_off + 1))" "$JL_PGLOG")
[[ "$new_log" == *'invalid value for parameter "jobloop.allowed_hosts"'* && "$new_log" == *'127.0.0.1/'* ]] && s=0 || s=1
tap_ok "$s" "postgresql.conf with allowed_hosts = '127.0.0.1/', reloaded: the error is logged, naming the entry" \
    "server log since the reload:"$'\n'"$new_log"
guard_holds "postgresql.conf '127.0.0.1/'" ""
# The worker reloaded too (it got the same SIGHUP; a probe would not tell the two values
# apart, since the old one refuses 127.0.0.2 as well): its next jobs to 127.0.0.2 are refused.
submit reload1 "$JL_MOCK_URL2/json?tag=reload1"
jl_wait_for 15 finished reload1 || true
tap_sql_ok "postgresql.conf '127.0.0.1/': the worker still refuses 127.0.0.2" \
    "SELECT bool_and(status = 'failed' AND last_error LIKE '%not in jobloop.allowed_hosts%')
       FROM jobloop.jobs WHERE state->>'tag' = 'reload1'" "$(outcomes_sql reload1)"
[[ ! -s "$JL_MOCK_LOG2" ]] && s=0 || s=1
tap_ok "$s" "postgresql.conf '127.0.0.1/': 127.0.0.2 received nothing" "$(cat "$JL_MOCK_LOG2")"

# In postgresql.auto.conf, where ALTER SYSTEM would have written it.
cp -p "$JL_PGDATA/postgresql.auto.conf" "$JL_PGDATA/postgresql.auto.conf.guard"
echo "jobloop.allowed_hosts = 'fd00::/, 10.1.2.3/abc'" >>"$JL_PGDATA/postgresql.auto.conf"
log_off=$(stat -c %s "$JL_PGLOG")
set_conf || tap_bail "the postmaster did not reload guard.conf"
new_log=$(tail -c +"$((log_off + 1))" "$JL_PGLOG")
[[ "$new_log" == *'invalid value for parameter "jobloop.allowed_hosts"'* ]] && s=0 || s=1
tap_ok "$s" "postgresql.auto.conf with allowed_hosts = 'fd00::/, 10.1.2.3/abc', reloaded: the error is logged" \
    "server log since the reload:"$'\n'"$new_log"
guard_holds "postgresql.auto.conf 'fd00::/, 10.1.2.3/abc'" ", fd00::1, ::ffff:10.0.0.1"
mv "$JL_PGDATA/postgresql.auto.conf.guard" "$JL_PGDATA/postgresql.auto.conf"
set_conf || tap_bail "the postmaster did not reload guard.conf"

# ==== keepalive: a removed host gets nothing more, even over open connections ==============
# By address.  Six calls at once leave up to six idle keep-alive connections to 127.0.0.1.
submit ka1 "$JL_MOCK_URL/json?tag=ka1&i="{1..6}
jl_wait_for 15 finished ka1 || true
tap_sql_ok "keepalive: 6 jobs to 127.0.0.1 complete while it is allowed" \
    "SELECT count(*) = 6 AND bool_and(status = 'completed') FROM jobloop.jobs WHERE state->>'tag' = 'ka1'"

lines0=$(log_lines "$JL_MOCK_LOG")
set_conf "jobloop.allowed_hosts = '127.0.0.2'" || tap_bail "the postmaster did not reload guard.conf"
probe_until completed "$JL_MOCK_URL2/json?tag=probe" && s=0 || s=1
tap_ok "$s" "keepalive: allowed_hosts = '127.0.0.2', reloaded: the worker now calls 127.0.0.2" "$(outcomes "probe$PROBE")"

submit ka2 "$JL_MOCK_URL/json?tag=ka2&i="{1..3}
jl_wait_for 15 finished ka2 || true
tap_sql_ok "keepalive: then 3 jobs to 127.0.0.1 fail at once: not in jobloop.allowed_hosts" \
    "SELECT count(*) = 3 AND bool_and(status = 'failed' AND attempts = 1
                                      AND last_error LIKE '%not in jobloop.allowed_hosts%')
       FROM jobloop.jobs WHERE state->>'tag' = 'ka2'" \
    "$(outcomes_sql ka2)"
lines1=$(log_lines "$JL_MOCK_LOG")
tap_is "$((lines1 - lines0))" 0 "keepalive: 127.0.0.1 received no request after it was removed"

# By host name: 'localhost' allowed, used, removed; the URL then says LOCALHOST (libcurl
# matches cached connections by host name without regard to case) or localhost.
set_conf "jobloop.allowed_hosts = 'localhost'" || tap_bail "the postmaster did not reload guard.conf"
probe_until completed "http://localhost:$JL_MOCK_PORT/json?tag=probe" && s=0 || s=1
tap_ok "$s" "keepalive: allowed_hosts = 'localhost', reloaded: the worker now calls http://localhost:port" \
    "$(outcomes "probe$PROBE")"
submit ka3 "http://localhost:$JL_MOCK_PORT/json?tag=ka3&i="{1..6}
jl_wait_for 15 finished ka3 || true
tap_sql_ok "keepalive: 6 jobs to http://localhost:port complete while it is allowed" \
    "SELECT count(*) = 6 AND bool_and(status = 'completed') FROM jobloop.jobs WHERE state->>'tag' = 'ka3'"

lines0=$(log_lines "$JL_MOCK_LOG")
set_conf "jobloop.allowed_hosts = '127.0.0.2'" || tap_bail "the postmaster did not reload guard.conf"
probe_until completed "$JL_MOCK_URL2/json?tag=probe" && s=0 || s=1
tap_ok "$s" "keepalive: allowed_hosts = '127.0.0.2' again, reloaded: the worker now calls 127.0.0.2" "$(outcomes "probe$PROBE")"
submit ka4 "http://LOCALHOST:$JL_MOCK_PORT/json?tag=ka4&i="{1..3} "http://localhost:$JL_MOCK_PORT/json?tag=ka4&i="{4..6}
jl_wait_for 15 finished ka4 || true
tap_sql_ok "keepalive: then 6 jobs to http://LOCALHOST:port and http://localhost:port fail at once: not in jobloop.allowed_hosts" \
    "SELECT count(*) = 6 AND bool_and(status = 'failed' AND attempts = 1
                                      AND last_error LIKE '%not in jobloop.allowed_hosts%')
       FROM jobloop.jobs WHERE state->>'tag' = 'ka4'" \
    "$(outcomes_sql ka4)"
lines1=$(log_lines "$JL_MOCK_LOG")
tap_is "$((lines1 - lines0))" 0 "keepalive: 127.0.0.1 received no request for localhost after it was removed"

# ==== the worker is fine ===================================================================
tap_sql_ok "the same worker (pid $WORKERS0) is still running" \
    "SELECT string_agg(pid::text, ',' ORDER BY pid) = '$WORKERS0' FROM pg_stat_activity WHERE backend_type = 'jobloop worker'" \
    "SELECT 'workers now: ' || coalesce(string_agg(pid::text, ',' ORDER BY pid), 'none') FROM pg_stat_activity WHERE backend_type = 'jobloop worker'"

tap_diag "guard.sh ran in $((SECONDS - t_start)) s"
tap_done
