#!/usr/bin/env bash
# test/suites/notify.sh -- NOTIFY on channel jobloop, as a listening client sees it.
#
# Prints TAP.  Starts its own cluster and mock API (scripts/lib.sh), so it runs
# alone: `prove test/suites/notify.sh` (jobloop built and installed first, as
# scripts/run-tests.sh does).  A psql session LISTENs on jobloop; jobs are
# submitted, waited for and cancelled from other sessions; then the payloads the
# listener printed are checked: valid JSON with id, status, step, tenant, kind,
# and the status sequence of each job.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

# shellcheck disable=SC2119
jl_cluster_start >&2 || tap_bail "could not start a cluster"
jl_mock_start >&2 || tap_bail "could not start the mock API"

psql_() { jl_psql -At "$@"; }

psql_ >/dev/null <<SQL || tap_bail "setup failed"
CREATE EXTENSION jobloop;
CREATE FUNCTION notify_request(state jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    SELECT jsonb_build_object('url', '$JL_MOCK_URL' || (state->>'path'))
\$\$;
CREATE FUNCTION notify_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
BEGIN
    IF state ? 'raise' THEN
        RAISE EXCEPTION 'step failed on purpose';
    END IF;
    RETURN state || jsonb_build_object('n', coalesce((state->>'n')::int, 0) + 1);
END
\$\$;
CREATE FUNCTION notify_done(state jsonb) RETURNS boolean LANGUAGE sql AS \$\$
    SELECT coalesce((state->>'n')::int, 0) >= coalesce((state->>'steps')::int, 1)
\$\$;
SELECT jobloop.create_kind('notify_plain', 'notify_request(jsonb)', 'notify_step(jsonb,jsonb)', 'notify_done(jsonb)');
SELECT jobloop.create_kind('notify_steps', 'notify_request(jsonb)', 'notify_step(jsonb,jsonb)', 'notify_done(jsonb)',
                           notify_steps => true);
SQL

# ---- the listener: a psql session fed through a fifo, its output in a file ----
work=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-notify.XXXXXX")
jl_on_exit rm -rf -- "$work"
mkfifo "$work/in"
jl_psql -At <"$work/in" >"$work/out" 2>&1 &
listener=$!
exec 3>"$work/in"
jl_on_exit kill "$listener"
echo "LISTEN jobloop;" >&3
echo "SELECT 'listening';" >&3
jl_wait_for 10 grep -qx listening "$work/out" || tap_bail "the listener did not start"

# psql prints a notification when it next talks to the server: keep it talking
# until WANT (a grep -E pattern) shows up, or the deadline passes.
# shellcheck disable=SC2317  # called through jl_wait_for
_seen() {
    echo "SELECT 1;" >&3
    grep -qE "$1" "$work/out"
}
saw() {     # saw PATTERN [SECONDS]
    jl_wait_for "${2:-30}" _seen "$1"
}

job() { psql_ -c "SELECT jobloop.submit($1)"; }

# A: two steps, tenant notify-t1, no per-step notifications.
a=$(job "'notify_plain', '{\"path\": \"/json?n=1\", \"steps\": 2}', 'notify-t1'")
# B: three steps with notify_steps.
b=$(job "'notify_steps', '{\"path\": \"/json?n=2\", \"steps\": 3}', 'notify-t2'")
# D: no tenant; its step raises.
d=$(job "'notify_plain', '{\"path\": \"/json?n=3\", \"raise\": true}'")
# R: submitted in a transaction that rolls back.
r=$(psql_ -c "BEGIN" -c "SELECT jobloop.submit('notify_plain', '{\"path\": \"/json\"}', 'notify-rollback')" -c "ROLLBACK")
for id in "$a" "$b" "$d"; do
    psql_ -c "SELECT jobloop.wait($id, '30 s')" >/dev/null
done
# C: a running job that is cancelled.
c=$(job "'notify_plain', '{\"path\": \"/slow\"}', 'notify-t3'")
saw "\"id\": *$c,.*\"status\": *\"running\"" || true
psql_ -c "SELECT jobloop.cancel($c)" >/dev/null

# Wait for the last notification of every job (then anything else has come too:
# a job's notifications are sent in commit order).
saw "\"id\": *$a,.*\"status\": *\"completed\"" || true
saw "\"id\": *$b,.*\"status\": *\"completed\"" || true
saw "\"id\": *$d,.*\"status\": *\"failed\"" || true
saw "\"id\": *$c,.*\"status\": *\"cancelled\"" || true
echo "SELECT 'finished';" >&3
jl_wait_for 10 grep -qx finished "$work/out" || true

# The payloads, without psql's wording around them and the sender's PID.
sed -n 's/^Asynchronous notification "jobloop" with payload "\(.*\)" received from server process with PID [0-9]*\.$/\1/p' \
    "$work/out" >"$work/payloads"
tap_diag "$(wc -l <"$work/payloads") notifications received"

# Parse them as JSON in SQL: one row per notification, in order.
payload_sql() {
    psql_ -v ON_ERROR_STOP=1 <<SQL
CREATE TEMP TABLE n (seq serial, payload text);
\copy n (payload) FROM '$work/payloads' WITH (FORMAT csv, DELIMITER E'\x01', QUOTE E'\x02')
$1
SQL
}

# Every payload is a JSON object with exactly the documented keys.
bad=$(payload_sql "SELECT count(*) FROM n WHERE NOT (payload::jsonb ?& ARRAY['id', 'status', 'step', 'tenant', 'kind'])
                     OR jsonb_typeof(payload::jsonb->'id') <> 'number' OR jsonb_typeof(payload::jsonb->'step') <> 'number'
                     OR jsonb_typeof(payload::jsonb->'status') <> 'string';")
tap_is "$bad" 0 "every payload is a JSON object with id, status, step, tenant and kind"
tap_is "$(payload_sql "SELECT count(*) FROM n WHERE length(payload) > 8000;")" 0 "payloads fit in a NOTIFY (8000 bytes)"

# sequence ID -> "status:step status:step ..."
sequence() {
    payload_sql "SELECT coalesce(string_agg((payload::jsonb->>'status') || ':' || (payload::jsonb->>'step'), ' ' ORDER BY seq), '')
                   FROM n WHERE (payload::jsonb->>'id')::bigint = $1;"
}
fields() {  # fields ID -> distinct "tenant|kind" of its payloads
    payload_sql "SELECT string_agg(DISTINCT coalesce(payload::jsonb->>'tenant', '<null>') || '|' || (payload::jsonb->>'kind')
                                          || '|' || jsonb_typeof(payload::jsonb->'tenant'), ',')
                   FROM n WHERE (payload::jsonb->>'id')::bigint = $1;"
}

tap_is "$(sequence "$a")" "pending:0 running:0 completed:2" \
    "a 2-step job: pending, running, completed (step 2); no per-step notification by default"
tap_is "$(fields "$a")" "notify-t1|notify_plain|string" "its payloads carry its tenant and kind"
tap_is "$(sequence "$b")" "pending:0 running:0 running:1 running:2 completed:3" \
    "notify_steps: a notification after every step, with the step number"
tap_is "$(fields "$b")" "notify-t2|notify_steps|string" "with its tenant and kind"
tap_is "$(sequence "$d")" "pending:0 running:0 failed:0" "a job whose step raises: pending, running, failed"
tap_is "$(fields "$d")" "<null>|notify_plain|null" "a job without a tenant has \"tenant\": null"
tap_is "$(grep -E "\"id\": *$d,.*\"status\": *\"failed\"" "$work/out" | grep -oE '"error": *"[^"]*"')" \
    '"error": "step failed on purpose"' "the failed job's notification carries its reason (last_error)"
tap_is "$(grep -c '"error"' "$work/out" || true)" "1" "... and no other notification has one"
tap_is "$(sequence "$c")" "pending:0 running:0 cancelled:0" "a cancelled running job: pending, running, cancelled"
tap_is "$(sequence "$r")" "" "a submit that rolled back sent no notification"
tap_is "$(psql_ -c "SELECT string_agg(status, ',' ORDER BY id) FROM jobloop.jobs WHERE id IN ($a, $b, $c, $d)")" \
    "completed,completed,failed,cancelled" "the jobs ended as their last notification said"

tap_done
