#!/usr/bin/env bash
#
# bench/soak.sh -- a long run under steady load, sampled over time: does anything grow?
#
# A throw-away cluster (two workers, fsync on) and the nginx mock on loopback.  A submitter
# (bench/soak.sql: soak.run) submits SOAK_RATE jobs/s of SOAK_K steps each against the
# mock's /delay?s=SOAK_L, cancels a share of them while they run, and a share fails at a
# random step (HTTP 422); the workers' retention deletes finished jobs after
# SOAK_RETENTION seconds; every SOAK_KILL_EVERY seconds a worker is killed with kill -9
# (PostgreSQL then restarts the whole server, as for any backend that dies, and the
# submitter reconnects).  Every SOAK_SAMPLE seconds one CSV row records, per worker, its
# private memory (/proc/PID/smaps_rollup Private_Clean + Private_Dirty), RssAnon and open
# file descriptors, and for the system the steps/s (worker_stats and the mock's access
# log), jobloop.job's table and index size, n_live_tup / n_dead_tup / autovacuum counts
# (pg_stat_user_tables, which a crash restart resets), the true dead tuples
# (pgstattuple), autovacuums of jobloop.job counted in the server log (cumulative across
# restarts), jobs by status and the age of the oldest finished job.
#
#   bench/soak.sh                                     30 minutes, the defaults below
#   SOAK_DURATION=300 SOAK_KILL_EVERY=120 bench/soak.sh   a 5-minute check
#
# Output: bench/results/soak-<UTC timestamp>/ (results/soak-latest points at the newest):
#   soak.csv      one row per sample (columns in bench/README.md, "Soak")
#   soak.png      the plot (bench/soak.gp)
#   trend.txt     the settings, means per 10-minute window, and the slope per 10 minutes
#                 of each series after the warm-up (least squares)
#   kills.csv     when which worker was killed
#   server.log.gz, submitter.log
#
# Environment (all optional):
#   SOAK_DURATION=1800    seconds of load
#   SOAK_RATE=200         jobs submitted per second
#   SOAK_CANCEL=0.05      share of the jobs cancelled ~0.3 s after their submit
#   SOAK_FAIL=0.02        share of the jobs that fail at a random step (HTTP 422)
#   SOAK_K=10             steps per job
#   SOAK_L=0.05           API latency, seconds (the mock's /delay)
#   SOAK_TENANTS=100      tenants the jobs are spread over
#   SOAK_KILL_EVERY=300   seconds between kill -9s of a worker (alternating); 0: never
#   SOAK_RETENTION=120    jobloop.retention, seconds
#   SOAK_SAMPLE=10        seconds between samples
#   SOAK_WARMUP=300       seconds left out of the slopes in trend.txt
#   SOAK_WORKERS=2        jobloop.workers
#   SOAK_PG_SETTINGS      extra postgresql.conf lines, separated by ';'
#   BENCH_BUILD=1         build and install the extension from this tree first (0: use the
#                         installed one)
#   BENCH_OUT=bench/results

set -euo pipefail
trap 'echo "==> bench/soak.sh: line $LINENO: a command failed (status $?)" >&2' ERR

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench

SOAK_DURATION=${SOAK_DURATION:-1800}
SOAK_RATE=${SOAK_RATE:-200}
SOAK_CANCEL=${SOAK_CANCEL:-0.05}
SOAK_FAIL=${SOAK_FAIL:-0.02}
SOAK_K=${SOAK_K:-10}
SOAK_L=${SOAK_L:-0.05}
SOAK_TENANTS=${SOAK_TENANTS:-100}
SOAK_KILL_EVERY=${SOAK_KILL_EVERY:-300}
SOAK_RETENTION=${SOAK_RETENTION:-120}
SOAK_SAMPLE=${SOAK_SAMPLE:-10}
SOAK_WARMUP=${SOAK_WARMUP:-300}
SOAK_WORKERS=${SOAK_WORKERS:-2}
SOAK_PG_SETTINGS=${SOAK_PG_SETTINGS:-}
BENCH_BUILD=${BENCH_BUILD:-1}

stamp=$(date -u +%Y%m%d-%H%M%S)
OUT_ROOT=${BENCH_OUT:-$BENCH/results}
OUT=$OUT_ROOT/soak-$stamp
mkdir -p "$OUT"
ln -sfn "soak-$stamp" "$OUT_ROOT/soak-latest"

settings=(
    "jobloop.workers = $SOAK_WORKERS"
    "jobloop.retention = '${SOAK_RETENTION}s'"
    "fsync = on"
    "synchronous_commit = on"
    "shared_buffers = 256MB"
    "log_autovacuum_min_duration = 0"
    "log_checkpoints = on"
    "restart_after_crash = on"
)
if [[ -n "$SOAK_PG_SETTINGS" ]]; then
    IFS=';' read -r -a extra <<<"$SOAK_PG_SETTINGS"
    settings+=("${extra[@]}")
fi

jl_install_deps gnuplot-nox
[[ "$BENCH_BUILD" == 1 ]] && jl_build
jl_cluster_start "${settings[@]}"
jl_mock_start

export PGCONNECT_TIMEOUT=5
jl_psql -c "CREATE EXTENSION jobloop" -c "CREATE EXTENSION pgstattuple"
jl_psql -f "$BENCH/soak.sql" >/dev/null

{
    echo "jobloop soak, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$JL_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$JL_ROOT" diff --quiet HEAD -- src sql 2>/dev/null || echo '+changes'), jobloop.so md5 $(md5sum "$("$JL_PGBIN/pg_config" --pkglibdir)/jobloop.so" | cut -c1-12)"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average at start $(cut -d' ' -f1-3 /proc/loadavg); $("$JL_PGBIN/postgres" --version)"
    echo "load: ${SOAK_RATE} jobs/s x ${SOAK_K} steps at L=${SOAK_L}s, ${SOAK_TENANTS} tenants, cancel ${SOAK_CANCEL}, fail ${SOAK_FAIL}; $( (( SOAK_KILL_EVERY > 0 )) && echo "kill -9 every ${SOAK_KILL_EVERY}s" || echo "no kill -9"); retention ${SOAK_RETENTION}s; ${SOAK_DURATION}s, a sample every ${SOAK_SAMPLE}s"
    echo "settings: ${settings[*]}"
} >"$OUT/settings.txt"
cat "$OUT/settings.txt" >&2

t0=$(date +%s)
end=$(( t0 + SOAK_DURATION ))

# ---------------------------------------------------------------------------------------
# The submitter: soak.run until the end, called again whenever a crash restart cut it off.
(
    while (( $(date +%s) < end )); do
        jl_psql -c "CALL soak.run($SOAK_RATE, $end, $SOAK_CANCEL, $SOAK_FAIL, $SOAK_TENANTS, $SOAK_K,
                                  '$JL_MOCK_URL/delay?s=$SOAK_L&n=', '$JL_MOCK_URL/status/422?n=')" \
            >>"$OUT/submitter.log" 2>&1 || sleep 0.5
    done
) </dev/null &
submitter=$!
stop_submitter() { kill "$1" 2>/dev/null || true; }
jl_on_exit stop_submitter "$submitter"

# ---------------------------------------------------------------------------------------
# Sampling

postmaster_pid() { head -n 1 "$JL_PGDATA/postmaster.pid" 2>/dev/null; }

# "N PID" for each jobloop worker of our postmaster, by worker number.
worker_pids() {
    local pm f cmd pid stat
    pm=$(postmaster_pid) || return 0
    for f in /proc/[0-9]*/cmdline; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
        [[ "$cmd" =~ ^postgres:\ jobloop\ worker\ ([0-9]+)\  ]] || continue
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # shellcheck disable=SC2086
        set -- $stat
        [[ "$2" == "$pm" ]] && echo "${BASH_REMATCH[1]} $pid"
    done | sort -n
}

# private kB (smaps_rollup Private_*), RssAnon kB, open fds of PID; blanks if it is gone.
proc_mem_fds() {
    local pid=$1 priv anon fds
    priv=$(awk '/^Private_(Clean|Dirty):/ { s += $2 } END { print s + 0 }' "/proc/$pid/smaps_rollup" 2>/dev/null) || priv=
    anon=$(awk '$1 == "RssAnon:" { print $2 }' "/proc/$pid/status" 2>/dev/null) || anon=
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) || fds=
    echo "$priv,$anon,$fds"
}

SAMPLE_SQL="
SELECT (SELECT coalesce(sum(steps_per_second_10s), 0)::int FROM jobloop.worker_stats()),
       (SELECT coalesce(sum(held), 0) FROM jobloop.worker_stats()),
       (SELECT coalesce(sum(in_flight), 0) FROM jobloop.worker_stats()),
       (SELECT round(avg(claim_ms)::numeric, 2) FROM jobloop.worker_stats()),
       (SELECT round(avg(commit_ms)::numeric, 2) FROM jobloop.worker_stats()),
       pg_table_size('jobloop.job') / 1024, pg_indexes_size('jobloop.job') / 1024,
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count,
       p.tuple_count, p.dead_tuple_count, round(p.free_percent::numeric, 1),
       c.pending, c.running, c.finished,
       coalesce(round(extract(epoch FROM now() - (SELECT min(finished_at) FROM jobloop.job
                                                   WHERE finished_at IS NOT NULL)))::int, 0),
       (SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity),
       g.submitted, g.cancelled,
       (SELECT string_agg((pg_relation_size(i.indexrelid) / 1024)::text, ',' ORDER BY c.relname)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'jobloop.job'::regclass)
  FROM pg_stat_user_tables s, pgstattuple('jobloop.job') p, soak.progress g,
       (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'running') AS running,
               count(*) FILTER (WHERE status NOT IN ('pending', 'running')) AS finished
          FROM jobloop.job) c
 WHERE s.relid = 'jobloop.job'::regclass"
SQL_COLS=steps_s,held,in_flight,claim_ms,commit_ms,table_kb,index_kb,n_live_tup,n_dead_tup,autovacuum_count,autoanalyze_count,pst_live,pst_dead,pst_free_pct,pending,running,finished,oldest_finished_s,max_xmin_age,submitted,cancelled
# and the size of each index of jobloop.job (kB), in the order of their names
SQL_COLS+=$(jl_psql -At -c "SELECT string_agg(',idx_' || c.relname || '_kb', '' ORDER BY c.relname)
                              FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                             WHERE i.indrelid = 'jobloop.job'::regclass")
SQL_BLANK=$(printf '%*s' $(( $(tr -cd , <<<"$SQL_COLS" | wc -c) )) '' | tr ' ' ',')

csv=$OUT/soak.csv
header="t_s,epoch,kills,restarts,req_s,av_log,aa_log,load1,$SQL_COLS"
for (( w = 1; w <= SOAK_WORKERS; w++ )); do
    header+=",w${w}_pid,w${w}_private_kb,w${w}_anon_kb,w${w}_fds"
done
echo "$header" >"$csv"
echo "t_s,worker,pid" >"$OUT/kills.csv"

log_off=0
mock_off=0
av_log=0
aa_log=0
restarts=0
kills=0
last_t=$t0
next_kill=$(( SOAK_KILL_EVERY > 0 ? t0 + SOAK_KILL_EVERY : end + 1 ))
kill_worker=1
next_sample=$t0

jl_log "soak: ${SOAK_DURATION}s; $OUT"
while :; do
    now=$(date +%s)
    (( now >= end )) && break
    if (( now >= next_kill )); then
        while read -r w pid; do
            if [[ "$w" == "$kill_worker" ]]; then
                kill -9 "$pid" 2>/dev/null && {
                    kills=$(( kills + 1 ))
                    echo "$(( now - t0 )),$w,$pid" >>"$OUT/kills.csv"
                    jl_log "t=$(( now - t0 ))s: kill -9 worker $w (pid $pid)"
                }
            fi
        done < <(worker_pids)
        kill_worker=$(( kill_worker % SOAK_WORKERS + 1 ))
        next_kill=$(( next_kill + SOAK_KILL_EVERY ))
    fi
    if (( now >= next_sample )); then
        next_sample=$(( next_sample + SOAK_SAMPLE ))
        # autovacuum / autoanalyze of jobloop.job and crash restarts, from the new log lines
        # (the new bytes are copied first: a pipe into head would end tail with SIGPIPE)
        tail -c +$(( log_off + 1 )) "$JL_PGLOG" >"$OUT/.chunk"
        size=$(stat -c %s "$OUT/.chunk")
        if (( size > 0 )); then
            read -r a b r < <(awk '
                /automatic vacuum of table "jobloop\.jobloop\.job"/ { a++ }
                /automatic analyze of table "jobloop\.jobloop\.job"/ { b++ }
                /all server processes terminated; reinitializing/ { r++ }
                END { print a + 0, b + 0, r + 0 }' "$OUT/.chunk")
            av_log=$(( av_log + a )); aa_log=$(( aa_log + b )); restarts=$(( restarts + r ))
            log_off=$(( log_off + size ))
        fi
        # requests answered by the mock since the last sample
        tail -c +$(( mock_off + 1 )) "$JL_MOCK_LOG" >"$OUT/.chunk"
        mock_off=$(( mock_off + $(stat -c %s "$OUT/.chunk") ))
        lines=$(wc -l <"$OUT/.chunk")
        : >"$OUT/.chunk"
        req_s=$(awk -v n="$lines" -v dt=$(( now - last_t )) 'BEGIN { printf "%.0f", (dt > 0 ? n / dt : 0) }')
        last_t=$now
        row=$(PGOPTIONS='-c statement_timeout=8000' jl_psql -At -F, -c "$SAMPLE_SQL" 2>/dev/null) || row=$SQL_BLANK
        [[ -n "$row" ]] || row=$SQL_BLANK
        line="$(( now - t0 )),$now,$kills,$restarts,$req_s,$av_log,$aa_log,$(cut -d' ' -f1 /proc/loadavg),$row"
        declare -A wp=()
        while read -r w pid; do wp[$w]=$pid; done < <(worker_pids)
        for (( w = 1; w <= SOAK_WORKERS; w++ )); do
            if [[ -n "${wp[$w]:-}" ]]; then
                line+=",${wp[$w]},$(proc_mem_fds "${wp[$w]}")"
            else
                line+=",,,,"
            fi
        done
        unset wp
        echo "$line" >>"$csv"
        IFS=, read -r -a f <<<"$line"
        printf '  t=%5ss  %5s req/s  table+idx %6s kB  dead %7s (stats %7s)  finished %6s  w1 %6s kB %5s fds\n' \
            "${f[0]}" "${f[4]}" "$(( ${f[13]:-0} + ${f[14]:-0} ))" "${f[20]}" "${f[16]}" "${f[24]}" \
            "${f[-3]:-}" "${f[-1]:-}" >&2
    fi
    sleep 1
done
wait "$submitter" 2>/dev/null || true
rm -f "$OUT/.chunk"

jl_psql -At -c "SELECT status, count(*) FROM jobloop.job GROUP BY 1 ORDER BY 1" >"$OUT/final_status.txt" || true
jl_psql -At -c "SELECT submitted, cancelled, calls FROM soak.progress" >>"$OUT/final_status.txt" || true
# jobloop.stats (counters kept through every crash restart, 0.4.0) against count(*)
jl_psql -At -c "SELECT 'stats ' || format('%s/%s/%s/%s/%s', s.pending, s.running, s.completed, s.failed, s.cancelled)
                       || CASE WHEN (s.pending, s.running, s.completed, s.failed, s.cancelled)
                                    = (c.pending, c.running, c.completed, c.failed, c.cancelled)
                               THEN ' = count(*)' ELSE ' <> count(*) ' || format('%s/%s/%s/%s/%s',
                                    c.pending, c.running, c.completed, c.failed, c.cancelled) END
                  FROM jobloop.stats s,
                       (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                               count(*) FILTER (WHERE status = 'running') AS running,
                               count(*) FILTER (WHERE status = 'completed') AS completed,
                               count(*) FILTER (WHERE status = 'failed') AS failed,
                               count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                          FROM jobloop.job) c" >>"$OUT/final_status.txt" 2>/dev/null || true
gzip -c "$JL_PGLOG" >"$OUT/server.log.gz"

# ---------------------------------------------------------------------------------------
# Trend: means per 10-minute window and least-squares slopes per 10 minutes after warm-up.

soak_trend() {
    awk -F, -v warm="$SOAK_WARMUP" -v nw="$SOAK_WORKERS" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    function val(name,   v) { v = $(col[name]); return v }
    {
        t = $1; win = int(t / 600)
        # worker memory and fds: the largest worker
        pm = ""; fd = ""
        for (w = 1; w <= nw; w++) {
            p = val("w" w "_private_kb"); f = val("w" w "_fds")
            if (p != "" && (pm == "" || p + 0 > pm + 0)) pm = p
            if (f != "" && (fd == "" || f + 0 > fd + 0)) fd = f
        }
        tb = val("table_kb"); ix = val("index_kb")
        v["worker_private_MB(max)"] = (pm == "" ? "" : pm / 1024)
        v["worker_fds(max)"] = fd
        v["steps_per_s(mock)"] = val("req_s")
        v["table_MB"] = (tb == "" ? "" : tb / 1024)
        v["indexes_MB"] = (ix == "" ? "" : ix / 1024)
        v["dead_tuples(pgstattuple)"] = val("pst_dead")
        v["n_dead_tup(stats)"] = val("n_dead_tup")
        v["finished_rows"] = val("finished")
        v["oldest_finished_s"] = val("oldest_finished_s")
        for (c in col) if (c ~ /^idx_.*_kb$/) { x = val(c); v[c] = (x == "" ? "" : x / 1024) }
        for (k in v) {
            if (v[k] == "") continue
            names[k] = 1
            ws[k, win] += v[k]; wn[k, win]++
            if (win > maxwin) maxwin = win
            if (t >= warm) { n[k]++; sx[k] += t; sy[k] += v[k]; sxx[k] += t * t; sxy[k] += t * v[k] }
        }
    }
    END {
        printf "%-26s", "series \\ 10-min window"
        for (w = 0; w <= maxwin; w++) printf "%12s", (w * 10) "-" (w * 10 + 10) "m"
        printf "%16s\n", "slope/10min"
        split("worker_private_MB(max) worker_fds(max) steps_per_s(mock) table_MB indexes_MB dead_tuples(pgstattuple) n_dead_tup(stats) finished_rows oldest_finished_s", order, " ")
        for (i = 1; i in order; i++) {
            k = order[i]
            if (!(k in names)) continue
            printf "%-26s", k
            for (w = 0; w <= maxwin; w++) printf "%12s", (wn[k, w] ? sprintf("%.1f", ws[k, w] / wn[k, w]) : "-")
            d = n[k] * sxx[k] - sx[k] * sx[k]
            printf "%16s\n", (n[k] > 2 && d != 0 ? sprintf("%+.2f", 600 * (n[k] * sxy[k] - sx[k] * sy[k]) / d) : "-")
        }
        for (k in names) {
            if (k !~ /^idx_/) continue
            printf "%-26s", substr(k, 5, length(k) - 7) "_MB"
            for (w = 0; w <= maxwin; w++) printf "%12s", (wn[k, w] ? sprintf("%.2f", ws[k, w] / wn[k, w]) : "-")
            d = n[k] * sxx[k] - sx[k] * sx[k]
            printf "%16s\n", (n[k] > 2 && d != 0 ? sprintf("%+.3f", 600 * (n[k] * sxy[k] - sx[k] * sy[k]) / d) : "-")
        }
    }' "$csv"
}

{
    cat "$OUT/settings.txt"
    echo
    echo "kills: $kills, crash restarts seen in the log: $restarts; autovacuums of jobloop.job: $av_log, autoanalyzes: $aa_log"
    echo "final: $(tr '\n' ' ' <"$OUT/final_status.txt")"
    echo
    soak_trend
} >"$OUT/trend.txt"
cat "$OUT/trend.txt"

kill_times=$(awk -F, 'NR > 1 { printf "%s ", $1 }' "$OUT/kills.csv")
gnuplot -e "csv='$csv'; out='$OUT/soak.png'; workers=$SOAK_WORKERS; kills='$kill_times'; title='$(head -n 3 "$OUT/settings.txt" | sed -n 3p | tr -d "'")'" \
    "$BENCH/soak.gp" || jl_log "gnuplot failed"
jl_log "wrote $OUT (soak.csv, trend.txt, soak.png)"
