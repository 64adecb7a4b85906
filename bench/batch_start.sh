#!/usr/bin/env bash
#
# bench/batch_start.sh -- where the start of a big batch goes (issue 15, part 3).
#
# One statement submits N jobs (default 10,000, L = 1 s, K = 10, two workers, the settings
# of bench/run.sh); for the first START_WATCH seconds after the commit it samples
#   * jobloop.worker_stats() every ~20 ms (held, in_flight, claim_ms, commit_ms per worker),
#   * the established connections to the mock every ~50 ms,
# and afterwards reads
#   * the access log: when each job's first request arrived ($msec - $request_time of its
#     step-0 line), as a histogram per 100 ms after the commit,
#   * pg_stat_statements (track = all: the workers' own statements), and
#     pg_stat_user_functions (track_functions = pl: request(), step(), done()),
#   * with PERF=1 (the third batch), perf record -g of both workers over the start.
# Batches: 1 = cold (the workers have no connection to the API yet), 2 = warm (the
# connections of batch 1 kept), 3 = warm again under perf (PERF=1).
#
#   bench/batch_start.sh                 # N=10000 L=1 K=10, ~1.5 minutes
#   START_N=1000 START_L=0.1 START_K=20 bench/batch_start.sh
#
# Writes bench/results/start-<timestamp>/: summary.txt (everything below), workers_*.tsv,
# conns_*.tsv, first_requests_*.tsv, pgss_*.txt, functions_*.txt, perf_*.txt.
# Never part of the tests.

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench

START_N=${START_N:-10000}
START_L=${START_L:-1}
START_K=${START_K:-10}
START_WATCH=${START_WATCH:-3}
PERF=${PERF:-1}
PERF_SECONDS=${PERF_SECONDS:-1.2}     # perf covers the first PERF_SECONDS after the submit
WORKERS=${BENCH_WORKERS:-2}
TENANTS=50

stamp=$(date -u +%Y%m%d-%H%M%S)
OUT=${BENCH_OUT:-$BENCH/results}/start-$stamp
mkdir -p "$OUT"
calc() { awk "BEGIN { print $1 }"; }

deps=(python3)
[[ "$PERF" == 1 ]] && deps+=(linux-perf)
jl_install_deps "${deps[@]}"
[[ "${BENCH_BUILD:-1}" == 1 ]] && jl_build
jl_cluster_start "jobloop.workers = $WORKERS" "jobloop.max_in_flight = $START_N" \
    "fsync = on" "synchronous_commit = on" "shared_buffers = 256MB" "max_wal_size = 4GB" \
    "checkpoint_timeout = 30min" "shared_preload_libraries = 'jobloop,pg_stat_statements'" \
    "pg_stat_statements.track = all" "track_functions = pl"
jl_mock_start
jl_psql -q -c "CREATE EXTENSION jobloop" -c "CREATE EXTENSION pg_stat_statements"
jl_psql -v lang=plpgsql -f "$BENCH/kind.sql" >/dev/null
jl_psql -d postgres -q -c "CREATE DATABASE bench"
jl_psql -d bench -q -c "CREATE UNLOGGED TABLE bench_req (t_end float8, rt float8, status int, job text, step int)"
mapfile -t wpids < <(jl_psql -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker' ORDER BY pid")

{
    echo "batch start: N=$START_N L=${START_L}s K=$START_K, $WORKERS workers, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$JL_ROOT" rev-parse --short HEAD)$(git -C "$JL_ROOT" diff --quiet HEAD -- src sql 2>/dev/null || echo '+changes')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/summary.txt"

url="$JL_MOCK_URL/delay?s=$START_L&n="
[[ "$START_L" == 0 ]] && url="$JL_MOCK_URL/json?n="

all_finished() {
    [[ "$(jl_psql -Atc "SELECT count(*) FROM jobloop.job WHERE status IN ('pending', 'running')")" == 0 ]]
}

batch() {
    local b=$1 perf=$2 off t_begin t_commit until_s sampler conns perf_pid="" i
    jl_psql -q -c "TRUNCATE jobloop.job" -c "CHECKPOINT" \
        -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset()" >/dev/null
    off=$(stat -c %s "$JL_MOCK_LOG")
    until_s=$(( $(date +%s) + 120 ))

    # Samplers, started before the submit; each ends by itself.
    for (( i = 0; i < START_WATCH * 50; i++ )); do
        echo "SELECT extract(epoch FROM clock_timestamp()), w.worker, w.held, w.in_flight, w.steps, round(w.claim_ms::numeric, 2), round(w.commit_ms::numeric, 2), coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU') FROM jobloop.worker_stats() w LEFT JOIN pg_stat_activity a ON a.pid = w.pid ORDER BY w.worker;"
        echo "SELECT pg_sleep(0.02) \\g /dev/null"
    done | jl_psql -At -F$'\t' >"$OUT/workers_$b.tsv" &
    sampler=$!
    (
        for (( i = 0; i < START_WATCH * 20; i++ )); do
            # time, established connections, each worker's CPU ticks (utime + stime)
            echo "$(date +%s.%N) $(ss -Htn state established "( dport = :$JL_MOCK_PORT )" | wc -l) $(for p in "${wpids[@]}"; do awk '{ printf "%d ", $14 + $15 }' "/proc/$p/stat"; done)"
            sleep 0.05
        done
    ) >"$OUT/conns_$b.tsv" &
    conns=$!
    if [[ "$perf" == 1 ]]; then
        # From before the submit until PERF_SECONDS after its commit (stopped below).
        perf record -q -g -o "$OUT/perf_$b.data" -p "$(IFS=,; echo "${wpids[*]}")" \
            >"$OUT/perf_$b.log" 2>&1 &
        perf_pid=$!
        sleep 0.3       # perf attaches
    else
        sleep 0.2
    fi

    read -r t_begin t_commit < <(jl_psql -At -v n="$START_N" -v k="$START_K" -v url="$url" \
        -v until="$until_s" -v tenants="$TENANTS" <<'SQL'
SELECT extract(epoch FROM clock_timestamp()) AS t_begin \gset
SELECT count(jobloop.submit('bench',
                            jsonb_build_object('url', :'url', 'n', 0, 'k', :k, 'until', :until),
                            'tenant-' || (g % :tenants))) AS submitted
  FROM generate_series(1, :n) AS g \gset
SELECT extract(epoch FROM clock_timestamp()) AS t_commit \gset
\echo :t_begin :t_commit
SQL
)
    if [[ -n "$perf_pid" ]]; then
        sleep "$PERF_SECONDS"
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
    fi
    wait "$sampler" "$conns"
    jl_wait_for 120 all_finished || jl_log "batch $b: jobs still unfinished after 120 s"
    local t_done
    t_done=$(jl_psql -Atc "SELECT extract(epoch FROM max(finished_at)) FROM jobloop.job")

    tail -c +$(( off + 1 )) "$JL_MOCK_LOG" | awk '
        $8 ~ /^"jobloop-/ {
            key = $8; gsub(/"/, "", key); m = split(key, p, "-")
            printf "%s\t%s\t%s\t%s\t%s\n", $1, $9, $6, substr(key, 1, length(key) - length(p[m]) - 1), p[m]
        }' >"$OUT/cell.tsv"
    jl_psql -d bench -q -c "TRUNCATE bench_req" -c "\\copy bench_req FROM '$OUT/cell.tsv'"
    rm -f "$OUT/cell.tsv"

    {
        echo
        echo "=== batch $b ($([[ $b == 1 ]] && echo "cold: no connection to the API yet" || echo "warm: batch 1's connections kept")$([[ "$perf" == 1 ]] && echo ", under perf")); load average $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "submit statement $(calc "int(1000 * ($t_commit - $t_begin))") ms; end to end $(calc "int(1000 * ($t_done - $t_commit)) / 1000") s (ideal $(calc "$START_K * $START_L") s)"
        jl_psql -d bench -At -F' ' -v t_commit="$t_commit" -f "$BENCH/analyze_e2e.sql" |
            awk '{ printf "first requests: %d jobs; first %s ms, median %s ms, last %s ms after the commit\n", $1, $2, $3, $4 }'
        echo "first requests out per 100 ms after the commit (cumulative):"
        jl_psql -d bench -At -F' ' -v t_commit="$t_commit" <<'SQL'
WITH s0 AS (SELECT job, min(t_end - rt) AS t FROM bench_req WHERE step = 0 GROUP BY job),
b AS (SELECT floor(10 * (t - :t_commit))::int AS bin, count(*) AS n FROM s0 GROUP BY 1)
SELECT format('  %5s-%5s ms: %5s  (%s)', 100 * bin, 100 * bin + 100, n, sum(n) OVER (ORDER BY bin))
  FROM b ORDER BY bin;
SQL
        echo "workers over the start (ms after the commit: held / in_flight per worker; c = claim_ms, k = commit_ms, the workers' moving averages; then each ~20 ms sample's wait event, CPU = none):"
        awk -v t0="$t_commit" -F'\t' '
            { ms = int(1000 * ($1 - t0)); if (ms < -50) next
              key = int(ms / 100); w[key, $2] = $3 "/" $4 " c" $6 " k" $7; if (!(key in seen)) { seen[key] = 1; order[++n] = key }
              waits[key, $2] = waits[key, $2] " " $8 }
            END { for (i = 1; i <= n; i++) { k = order[i]; printf "  %5d ms: w1 %-22s w2 %-22s waits w1:%s | w2:%s\n", 100 * k, w[k, 1], w[k, 2], waits[k, 1], waits[k, 2] } }' \
            "$OUT/workers_$b.tsv"
        echo "connections to the API and the workers' CPU (ms after the commit: established; CPU % of one core per worker over the last ~200 ms):"
        awk -v t0="$t_commit" -v hz="$(getconf CLK_TCK)" '
            { ms = int(1000 * ($1 - t0)) }
            NR > 1 && ms >= -50 && NR % 4 == 0 {
                dt = $1 - pt; printf "  %5d ms: %5s conns  CPU", ms, $2
                for (i = 3; i <= NF; i++) printf " %3.0f%%", 100 * ($i - p[i]) / hz / dt
                printf "\n"
            }
            NR % 4 == 0 || NR == 1 { pt = $1; for (i = 3; i <= NF; i++) p[i] = $i }' "$OUT/conns_$b.tsv"
        echo "pg_stat_statements (the whole batch; the workers' statements):"
        jl_psql -P pager=off -c "
            SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
                   round(mean_exec_time::numeric, 2) AS mean_ms, round(max_exec_time::numeric, 1) AS max_ms,
                   rows, regexp_replace(left(query, 90), '\s+', ' ', 'g') AS query
              FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%' AND query NOT LIKE '%worker_stats%'
             ORDER BY total_exec_time DESC LIMIT 10"
        echo "pg_stat_user_functions (the whole batch):"
        jl_psql -P pager=off -c "
            SELECT funcname, calls, round(total_time::numeric, 1) AS total_ms,
                   round((1000 * total_time / nullif(calls, 0))::numeric, 1) AS us_per_call
              FROM pg_stat_user_functions ORDER BY total_time DESC"
    } | tee -a "$OUT/summary.txt"

    if [[ "$perf" == 1 ]]; then
        perf report -i "$OUT/perf_$b.data" --no-children --sort symbol --stdio 2>/dev/null \
            | grep -v '^#' | grep '%' | head -40 >"$OUT/perf_$b.txt" || true
        perf report -i "$OUT/perf_$b.data" --children --sort symbol --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep '%' | head -400 >"$OUT/perf_children_$b.txt" || true
        {
            echo "perf (both workers, from just before the submit to ${PERF_SECONDS} s after its commit): jobloop's functions and libcurl, with their callees (% of samples)"
            perf report -i "$OUT/perf_$b.data" --stdio --sort pid 2>/dev/null \
                | awk '/^# Event count/ { printf "  the workers ran %.0f ms on a CPU in that window\n", $NF / 1e6 }' 
            awk '{ print $1, $4 }' "$OUT/perf_children_$b.txt" \
                | grep -E ' (jobloop_worker_main|batch_run|claim|start_claimed|store_[a-z_]+|advance_isolated|logic_[a-z]+|commit_and_act|CommitTransactionCommand|XLogFlush|held_[a-z_]+|http_[a-z_]+|curl_multi_[a-z_]+|Curl_[a-z_]+|notify_job|__send|__connect|__libc_connect|epoll_wait)$' | head -40
        } | tee -a "$OUT/summary.txt"
    fi
}

batch 1 0
batch 2 0
[[ "$PERF" == 1 ]] && batch 3 1
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/summary.txt"
jl_log "results in $OUT"
