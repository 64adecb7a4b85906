#!/usr/bin/env bash
#
# scripts/run-demo.sh -- run jobloop's main job end to end.
#
# A web shop tracks thousands of orders at once: every order gets a job that polls the
# carrier's (slow) order-status API until the order has shipped.  This script
#
#   1. installs what is missing (Debian 12, as root) and builds jobloop,
#   2. starts a throw-away PostgreSQL 15 cluster with jobloop preloaded (2 workers)
#      and the mock API (nginx on loopback) standing in for the carrier,
#   3. creates the extension, the app roles and the job kind (examples/demo_kind.sql),
#   4. submits DEMO_JOBS jobs for DEMO_TENANTS shops, as the apps' own roles,
#   5. shows live progress once a second until every job is finished,
#   6. prints a summary, and removes the cluster and the mock again.
#
# Usage (as root, or a user with sudo):   scripts/run-demo.sh
# Settings (environment):
#   DEMO_JOBS=3000        jobs to submit
#   DEMO_TENANTS=50       shops (tenants) the orders belong to
#   DEMO_DEADLINE=300     seconds; exit 1 if the jobs are not all finished by then
#   JL_KEEP=1             leave the cluster and the mock running afterwards
# Works without a terminal (CI): progress then comes as plain lines, not one updating line.

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEMO_JOBS=${DEMO_JOBS:-3000}
DEMO_TENANTS=${DEMO_TENANTS:-50}
DEMO_DEADLINE=${DEMO_DEADLINE:-300}
[[ "$DEMO_JOBS" =~ ^[1-9][0-9]*$ ]] || jl_die "DEMO_JOBS must be a positive integer"
[[ "$DEMO_TENANTS" =~ ^[1-9][0-9]*$ ]] || jl_die "DEMO_TENANTS must be a positive integer"
[[ "$DEMO_DEADLINE" =~ ^[1-9][0-9]*$ ]] || jl_die "DEMO_DEADLINE must be a positive integer"

# ---------------------------------------------------------------------------------------
# 1-2. Dependencies, build, cluster, mock API

jl_install_deps
jl_build
jl_cluster_start "jobloop.workers = 2"
jl_mock_start

# psql as one of the demo's roles (they log in with trust auth on the throw-away cluster).
as_role() {
    local role=$1
    shift
    "$JL_PGBIN/psql" -X -q -P pager=off -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U "$role" \
        -d "$PGDATABASE" "$@"
}

# ---------------------------------------------------------------------------------------
# 3. Extension, roles, job kind

jl_log "creating the extension, the app roles and the order_status job kind"
jl_psql -c "CREATE EXTENSION jobloop"
jl_psql -v api="$JL_MOCK_URL" -f "$JL_ROOT/examples/demo_kind.sql" >/dev/null

# ---------------------------------------------------------------------------------------
# 4. Submit, as the apps would: each app connects as its own role and calls
#    jobloop.submit(kind, state, tenant) once per order.  Two thirds of the orders come
#    from the web shop, one third from the mobile app; the shops are of uneven size (a few
#    big ones, many small ones), like real tenants.  Both apps submit at the same time.

jl_log "submitting $DEMO_JOBS order_status jobs for $DEMO_TENANTS shops (as shop_web and shop_mobile)"

submit_sql="
SELECT setseed(0.42);
SELECT count(jobloop.submit(
           'order_status',
           jsonb_build_object('order_id', 100000 + g, 'polls', 0),
           format('shop-%s', lpad((1 + floor(:tenants * random() ^ 2))::int::text, 3, '0'))))
  FROM generate_series(1, :jobs) AS g
 WHERE g % 3 :op 0;"

start_us=$(_jl_now_us)
as_role shop_web    -v jobs="$DEMO_JOBS" -v tenants="$DEMO_TENANTS" -v op='<>' -At <<<"$submit_sql" >/dev/null &
web_pid=$!
as_role shop_mobile -v jobs="$DEMO_JOBS" -v tenants="$DEMO_TENANTS" -v op='=' -At <<<"$submit_sql" >/dev/null &
mobile_pid=$!
wait "$web_pid" || jl_die "shop_web could not submit its jobs"
wait "$mobile_pid" || jl_die "shop_mobile could not submit its jobs"
jl_log "submitted in $(( ($(_jl_now_us) - start_us) / 1000 )) ms; the workers started on them at commit"

# ---------------------------------------------------------------------------------------
# 5. Live progress, read as shop_ops (a member of jobloop_admin, so it sees every job).
#    On a terminal one line updates in place; otherwise (CI, a pipe) one line a second.

progress_sql="
SELECT count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'running'),
       count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'cancelled'),
       coalesce(sum(step), 0)
  FROM jobloop.jobs WHERE kind = 'order_status'"

tty=false
[[ -t 1 ]] && tty=true
deadline_us=$(( start_us + DEMO_DEADLINE * 1000000 ))
prev_steps=0
prev_us=$start_us
finished=false

while :; do
    sleep 1
    IFS='|' read -r pending running completed failed cancelled steps \
        < <(as_role shop_ops -Atc "$progress_sql")
    now_us=$(_jl_now_us)
    rate=$(( (steps - prev_steps) * 1000000 / (now_us - prev_us > 0 ? now_us - prev_us : 1) ))
    prev_steps=$steps
    prev_us=$now_us
    elapsed=$(( (now_us - start_us) / 100000 ))        # tenths of a second
    line=$(printf '%5d.%ds  pending %5d  running %5d  completed %5d  failed %3d  cancelled %3d | steps %7d  %6d steps/s' \
        $(( elapsed / 10 )) $(( elapsed % 10 )) "$pending" "$running" "$completed" "$failed" \
        "$cancelled" "$steps" "$rate")
    if $tty; then
        printf '\r%s' "$line"
    else
        printf '%s\n' "$line"
    fi
    if (( pending + running == 0 )); then
        finished=true
        break
    fi
    if (( now_us >= deadline_us )); then
        break
    fi
done
$tty && printf '\n'
wall_ms=$(( ($(_jl_now_us) - start_us) / 1000 ))

if ! $finished; then
    jl_log "deadline of ${DEMO_DEADLINE}s passed with $(( pending + running )) jobs unfinished; jobs not finished:"
    as_role shop_ops -c "SELECT id, tenant, status, step, last_error, updated_at FROM jobloop.jobs
                          WHERE status IN ('pending', 'running') ORDER BY id LIMIT 10"
    jl_log "last lines of the server log ($JL_PGLOG):"
    tail -n 20 "$JL_PGLOG" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------
# 6. Summary

requests=$(grep -c '"jobloop-' "$JL_MOCK_LOG" || true)

echo
echo "=== jobloop demo: $DEMO_JOBS order_status jobs, $DEMO_TENANTS shops, 2 workers ==="
echo
echo "Jobs by status, and by the order status their business logic decided:"
as_role shop_ops -c "
SELECT status AS job_status, state->>'status' AS order_status, count(*) AS jobs,
       sum(step) AS steps, round(avg(step), 1) AS avg_polls
  FROM jobloop.jobs WHERE kind = 'order_status'
 GROUP BY 1, 2 ORDER BY 1, 2"

as_role shop_ops -v wall_ms="$wall_ms" -v requests="$requests" <<SQL
SELECT count(*)                                                  AS jobs,
       sum(step)                                                 AS total_steps,
       round(:wall_ms / 1000.0, 1)                               AS wall_s,
       round(sum(step) / (:wall_ms / 1000.0))                    AS avg_steps_per_s,
       round(1000 * percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM finished_at - created_at))::numeric) AS p50_job_ms,
       round(1000 * percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM finished_at - created_at))::numeric) AS p95_job_ms,
       :requests                                                 AS api_requests_seen
  FROM jobloop.jobs WHERE kind = 'order_status';
SQL

echo "Biggest shops (tenants):"
as_role shop_ops -c "
SELECT tenant, count(*) AS jobs, sum(step) AS steps,
       count(*) FILTER (WHERE state->>'status' = 'needs_review') AS needs_review,
       round(1000 * avg(extract(epoch FROM finished_at - created_at))::numeric) AS avg_job_ms,
       round(1000 * percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM finished_at - created_at))::numeric) AS p95_job_ms
  FROM jobloop.jobs WHERE kind = 'order_status'
 GROUP BY tenant ORDER BY jobs DESC, tenant LIMIT 5"

echo "Who sees what (row-level security: a role sees its own jobs; jobloop_admin sees all):"
for role in shop_web shop_mobile shop_ops; do
    printf '  %-12s sees %s jobs\n' "$role" "$(as_role "$role" -Atc 'SELECT count(*) FROM jobloop.jobs')"
done
echo

failed=$(as_role shop_ops -Atc "SELECT count(*) FROM jobloop.jobs WHERE status <> 'completed'")
if (( failed > 0 )); then
    jl_log "$failed jobs did not complete:"
    as_role shop_ops -c "SELECT id, tenant, status, step, last_error FROM jobloop.jobs
                          WHERE status <> 'completed' ORDER BY id LIMIT 10"
    exit 1
fi
tenths=$(( (wall_ms + 50) / 100 ))
jl_log "demo finished: all $DEMO_JOBS jobs completed in $(( tenths / 10 )).$(( tenths % 10 ))s"
