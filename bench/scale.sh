#!/usr/bin/env bash
#
# bench/scale.sh -- does jobloop stay as fast with millions of finished jobs in its table?
#
# A throw-away cluster (two workers, fsync on) and the nginx mock on loopback.  For each
# size in BENCH_SCALE_ROWS (finished jobs in jobloop.job, added with INSERT ... SELECT:
# bench/scale_fill.sql) and each state of the statistics:
#
#   stale     as the fill left them: no VACUUM or ANALYZE since the rows were added (the
#             statistics are those of the previous size's last run, or none at all for
#             the first size), as on a table that grew since autovacuum last looked at it
#   prequeue  VACUUM ANALYZE after the fill, while no job was queued; then the burst
#             arrives -- the statistics say that nothing is runnable
#   fresh     VACUUM ANALYZE with the burst queued
#
# it queues the same claim-heavy burst (more jobs than slots: SCALE_JOBS jobs of
# SCALE_TENANTS tenants, SCALE_K steps each, against the mock at L = SCALE_L, submitted
# while jobloop.pause() holds them back), lets the two workers run it (jobloop.resume())
# and records:
#   * steps/s (requests the mock answered / the time between the first and the last),
#   * the claim statement in the workers: calls, mean and max ms (pg_stat_statements), the
#     workers' own claim_ms (jobloop.worker_stats(), a moving average), and the plans of
#     claims slower than SCALE_AUTO_EXPLAIN_MS (auto_explain in the workers),
#   * EXPLAIN (ANALYZE, BUFFERS) of the claim statement (extracted from src/server/store.c, run
#     in a transaction that is rolled back) with a custom plan, a generic plan, and the
#     plan the plan cache picks after five executions (as the worker's cached plan does),
#   * table and index sizes, and the time of each monitoring query, as a superuser and as
#     a member of jobloop_admin (row-level security applies), with its EXPLAIN.
# Autovacuum is off for jobloop.job during the run, so that each state is what it says.
#
# With SCALE_EXPERIMENTS=1 (the default), at the largest size it then tries changes that
# need only SQL (bench/scale_experiments.sql, bench/scale_counters.sql): partial indexes
# for the monitoring queries, retention by dropping a partition against the delete loop,
# status counters kept by statement triggers -- and runs the burst again with the indexes,
# then with the triggers too, to see what they cost the workers.
#
#   bench/scale.sh                                  0, 1M and 5M rows: ~20 minutes on 2 cores
#   BENCH_SCALE_ROWS="0 100000" bench/scale.sh      a quick check (~3 minutes)
#
# Output: bench/results/scale-<UTC timestamp>/ (results/scale-latest points at the newest):
#   summary.txt     settings and the side-by-side table
#   scale.csv       one row per size and state
#   <rows>_<state>/ claim_explain.txt, auto_explain.txt, pgss.txt, monitor_explain.txt,
#                   monitor_times.txt, sizes.txt
#   experiments.txt the experiments' output
#
# Environment (all optional):
#   BENCH_SCALE_ROWS="0 1000000 5000000"  sizes, ascending (the table is filled up to each)
#   SCALE_STATES="stale prequeue fresh"   ("none": only fill, then the experiments)
#   SCALE_JOBS=20000  SCALE_TENANTS=100  SCALE_K=5  SCALE_L=0.01 (0: the mock's /json)
#   SCALE_DAYS=7            finished_at spread over this many days
#   SCALE_RUNS=2            bursts per size and state (steps/s: their mean, and each)
#   SCALE_REPEAT=3          timed runs of each monitoring query (the median is reported)
#   SCALE_AUTO_EXPLAIN_MS=20
#   SCALE_EXPERIMENTS=1
#   BENCH_BUILD=1           build and install the extension from this tree first
#   BENCH_OUT=bench/results
#   JL_KEEP=1               keep the cluster and the mock afterwards

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench

BENCH_SCALE_ROWS=${BENCH_SCALE_ROWS:-"0 1000000 5000000"}
SCALE_STATES=${SCALE_STATES:-"stale prequeue fresh"}
SCALE_JOBS=${SCALE_JOBS:-20000}
SCALE_TENANTS=${SCALE_TENANTS:-100}
SCALE_K=${SCALE_K:-5}
SCALE_L=${SCALE_L:-0.01}
SCALE_DAYS=${SCALE_DAYS:-7}
SCALE_REPEAT=${SCALE_REPEAT:-3}
SCALE_AUTO_EXPLAIN_MS=${SCALE_AUTO_EXPLAIN_MS:-20}
SCALE_EXPERIMENTS=${SCALE_EXPERIMENTS:-1}
SCALE_TIMEOUT=${SCALE_TIMEOUT:-600}
SCALE_RUNS=${SCALE_RUNS:-2}
BENCH_BUILD=${BENCH_BUILD:-1}
WORKERS=2
MAX_IN_FLIGHT=1000

stamp=$(date -u +%Y%m%d-%H%M%S)
OUT_ROOT=${BENCH_OUT:-$BENCH/results}
OUT=$OUT_ROOT/scale-$stamp
mkdir -p "$OUT"
ln -sfn "scale-$stamp" "$OUT_ROOT/scale-latest"
scale_t0=$(date +%s)

settings=(
    "jobloop.workers = $WORKERS"
    "jobloop.max_in_flight = $MAX_IN_FLIGHT"
    "jobloop.retention = 0"
    "fsync = on"
    "synchronous_commit = on"
    "shared_buffers = 256MB"
    "max_wal_size = 8GB"
    "checkpoint_timeout = 30min"
    "shared_preload_libraries = 'jobloop,pg_stat_statements,auto_explain'"
    "pg_stat_statements.track = all"
    "auto_explain.log_min_duration = $SCALE_AUTO_EXPLAIN_MS"
    "auto_explain.log_nested_statements = on"
    "auto_explain.log_analyze = off"
)

jl_install_deps
[[ "$BENCH_BUILD" == 1 ]] && jl_build
jl_cluster_start "${settings[@]}"
jl_mock_start

calc() { awk "BEGIN { print $1 }"; }
# psql -At; a statement that fails because the library is being reinstalled at that moment
# (`make install` by someone else: "could not access file "$libdir/jobloop"") is retried.
q() {
    local i err
    for (( i = 0; i < 20; i++ )); do
        if err=$(jl_psql -At "$@" 2>"$OUT/.qerr"); then
            [[ -n "$err" ]] && printf '%s\n' "$err"
            return 0
        fi
        grep -q 'could not access file "\$libdir/jobloop"\|could not load library' "$OUT/.qerr" || break
        jl_log "the jobloop library is being reinstalled; retrying"
        sleep 1
    done
    cat "$OUT/.qerr" >&2
    return 1
}

q -c "CREATE EXTENSION jobloop" -c "CREATE EXTENSION pg_stat_statements" >/dev/null
jl_psql -v lang=plpgsql -f "$BENCH/kind.sql" >/dev/null
# No autovacuum or autoanalyze of jobloop.job: each state of the statistics is made on
# purpose below (the README's monitoring role reads it through row-level security).
q -c "ALTER TABLE jobloop.job SET (autovacuum_enabled = off)" \
  -c "CREATE ROLE jl_monitor LOGIN IN ROLE jobloop_admin" \
  -c "GRANT USAGE ON SCHEMA jobloop TO jl_monitor" >/dev/null

if [[ "$SCALE_L" == 0 ]]; then
    url="$JL_MOCK_URL/json?n="
else
    url="$JL_MOCK_URL/delay?s=$SCALE_L&n="
fi

# The claim statement as the worker runs it (schemas from 0.3.0 on), put together from
# src/server/store.c's CLAIM_SQL_* macros the way store_claim does.
claim_sql() {
    local src=$JL_ROOT/src/server/store.c
    {
        sed -n '/^#define CLAIM_SQL_/,/[^\\]$/p' "$src"
        printf 'JL_CLAIM_SQL_IS '
        awk '/^store_claim\(/ { f = 1 } f && /if \(has_key_tokens\)/ { g = 1; next }
             g && /types, values/ { exit } g { print }' "$src" \
            | sed 's/store_run_plan(&plan,//' | grep -oE 'CLAIM_SQL_[A-Z_]+|"[^"]*"' | tr '\n' ' '
        echo
    } | cpp -P - 2>/dev/null | sed -n 's/^JL_CLAIM_SQL_IS //p' | grep -oE '"[^"]*"' \
      | sed 's/^"//; s/"$//' | tr -d '\n'
}
CLAIM_SQL=$(claim_sql)
[[ "$CLAIM_SQL" == "WITH RECURSIVE"* ]] || jl_die "could not extract the claim statement from src/server/store.c"
printf '%s\n' "$CLAIM_SQL" >"$OUT/claim.sql"
CLAIM_LIMIT=$(( 1000 / WORKERS ))

MONITOR_NAMES=(stats errors retrying limits worker_stats)
MONITOR_SQL=(
    "SELECT * FROM jobloop.stats"
    "SELECT * FROM jobloop.errors"
    "SELECT id, kind, tenant, step, last_error, updated_at FROM jobloop.jobs WHERE status = 'running' AND last_error IS NOT NULL"
    "SELECT * FROM jobloop.limits"
    "SELECT * FROM jobloop.worker_stats()"
)

{
    echo "jobloop scale bench, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$JL_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$JL_ROOT" diff --quiet HEAD -- src sql 2>/dev/null || echo '+changes'), jobloop.so md5 $(md5sum "$("$JL_PGBIN/pg_config" --pkglibdir)/jobloop.so" | cut -c1-12)"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average at start $(cut -d' ' -f1-3 /proc/loadavg); $("$JL_PGBIN/postgres" --version)"
    echo "burst: $SCALE_JOBS jobs of $SCALE_TENANTS tenants x $SCALE_K steps at L=${SCALE_L}s; $WORKERS workers, max_in_flight $MAX_IN_FLIGHT; finished rows spread over $SCALE_DAYS days"
    echo "settings: ${settings[*]}"
} >"$OUT/settings.txt"
cat "$OUT/settings.txt" >&2

# ---------------------------------------------------------------------------------------
# Pieces of a run

# EXPLAIN (ANALYZE, BUFFERS) of the claim: custom plan, generic plan, and the plan cache's
# own choice after five executions.  In one transaction that is rolled back, each in a
# savepoint; the pause that holds the burst back is lifted inside it only, so the workers
# never see it lifted.
explain_claim() {
    local out=$1 args="($CLAIM_LIMIT, 99, 60, 0, '')"
    {
        echo "BEGIN;"
        echo "DELETE FROM jobloop.pause;"
        echo "PREPARE claim(integer, integer, integer, integer, text) AS $CLAIM_SQL;"
        for mode in force_custom_plan force_generic_plan; do
            echo "\\echo ==== claim, plan_cache_mode = $mode"
            echo "SAVEPOINT s; SET LOCAL plan_cache_mode = $mode;"
            echo "EXPLAIN (ANALYZE, BUFFERS) EXECUTE claim$args;"
            echo "ROLLBACK TO SAVEPOINT s;"
        done
        echo "SET LOCAL plan_cache_mode = auto;"
        for i in 1 2 3 4 5; do
            echo "SAVEPOINT s; EXECUTE claim$args \\g /dev/null"
            echo "ROLLBACK TO SAVEPOINT s;"
        done
        echo "\\echo ==== claim, the choice of the plan cache at the sixth execution (a generic plan shows \$1...)"
        echo "SAVEPOINT s; EXPLAIN (ANALYZE, BUFFERS) EXECUTE claim$args; ROLLBACK TO SAVEPOINT s;"
        echo "\\echo ==== plan cache: generic and custom plans made so far (1 forced of each, 5 custom, then its choice)"
        echo "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'claim';"
        echo "\\echo ==== next runnable (store_next_runnable)"
        echo "EXPLAIN (ANALYZE, BUFFERS) SELECT min(run_after) FROM jobloop.job WHERE worker IS NULL AND status = ANY (ARRAY['pending', 'running']);"
        echo "ROLLBACK;"
    } | jl_psql -P pager=off >"$out" 2>&1 || jl_log "EXPLAIN of the claim failed (see $out)"
}

# "ms buffers" of an EXPLAIN section: its Execution Time and the top node's Buffers line.
explain_numbers() {
    awk -v sec="$2" '
        /^==== / { on = (index($0, sec) > 0); top = 0; next }
        on && /Buffers:/ && !top { sub(/^ *Buffers: */, ""); buf = $0; gsub(/ /, "_", buf); top = 1 }
        on && /Execution Time:/ { ms = $3 }
        END { printf "%s %s\n", (ms == "" ? "-" : ms), (buf == "" ? "-" : buf) }' "$1"
}

# "generic" or "custom": what the plan cache chose at the sixth execution.
plan_choice() {
    awk '/^==== plan cache/ { on = 1; next }
         on && /^ *[0-9]+ *\| *[0-9]+/ { gsub(/ /, ""); split($0, a, "|"); print (a[1] >= 2 ? "generic" : "custom"); exit }' "$1"
}

# Times of the monitoring queries: "name median_ms" lines, as role $2 ('' = superuser).
time_monitoring() {
    local out=$1 role=$2 i r
    {
        [[ -n "$role" ]] && echo "SET ROLE $role;"
        echo "\\o /dev/null"
        echo "\\timing on"
        for i in "${!MONITOR_SQL[@]}"; do
            echo "\\echo ==== ${MONITOR_NAMES[i]}"
            for (( r = 0; r < SCALE_REPEAT; r++ )); do echo "${MONITOR_SQL[i]};"; done
        done
    } | jl_psql -P pager=off 2>&1 | awk '
        /^==== / { name = $2; next }
        /^Time: / { print name, $2 }' | sort -k1,1 -k2,2n | awk '
        { t[$1] = t[$1] " " $2; c[$1]++ }
        END { for (n in t) { split(t[n], a, " "); print n, a[int((c[n] + 1) / 2)] } }' >"$out" || true
}

explain_monitoring() {
    local out=$1 i
    {
        for i in "${!MONITOR_SQL[@]}"; do
            echo "\\echo ==== ${MONITOR_NAMES[i]} (superuser)"
            echo "EXPLAIN (ANALYZE, BUFFERS) ${MONITOR_SQL[i]};"
        done
        echo "SET ROLE jl_monitor;"
        for i in 0 1 2; do
            echo "\\echo ==== ${MONITOR_NAMES[i]} (jl_monitor, a member of jobloop_admin: row-level security)"
            echo "EXPLAIN (ANALYZE, BUFFERS) ${MONITOR_SQL[i]};"
        done
    } | jl_psql -P pager=off >"$out" 2>&1 || true
}

sizes() {
    q -F ' ' -c "SELECT pg_table_size('jobloop.job') / 1048576, pg_indexes_size('jobloop.job') / 1048576"
}

# The claim plans auto_explain logged from byte offset $1 of the server log: one line per
# slow claim (its duration, the plan's estimated cost, the index its tenant walk used with
# its row estimate, and whether JIT compiled it -- above jit_above_cost it does, at every
# execution),
# then the first two plans and the slowest in full.
auto_explain_claims() {
    tail -c +$(( $1 + 1 )) "$JL_PGLOG" | awk '
        function flush() {
            if (buf != "" && buf ~ /WITH RECURSIVE tenants/) {
                n++
                match(buf, /duration: [0-9.]+ ms/); d = substr(buf, RSTART + 10, RLENGTH - 13) + 0
                walk = "?"
                if (match(buf, /Index (Only )?Scan using [a-z_]+ on job  \(cost=[0-9.]+ rows=[0-9]+/) ||
                    match(buf, /Index (Only )?Scan using [a-z_]+ on job  \(cost=[0-9.]+\.\.[0-9.]+ rows=[0-9]+/))
                    walk = substr(buf, RSTART, RLENGTH)
                sub(/ on job  \(cost=[0-9.]+(\.\.[0-9.]+)? /, " ", walk); sub(/Index (Only )?Scan using /, "", walk)
                cost = "?"
                if (match(buf, /Update on job j  \(cost=[0-9.]+\.\.[0-9.]+/)) {
                    cost = substr(buf, RSTART, RLENGTH); sub(/.*\.\./, "", cost)
                }
                jit = (buf ~ /JIT:/ ? ", JIT compiled" : "")
                line[n] = sprintf("%10.1f ms  plan cost %10s  tenant walk: %s%s", d, cost, walk, jit)
                count[walk jit]++
                if (n <= 2) first[n] = buf
                if (d > maxd) { maxd = d; slowest = buf }
            }
            buf = ""
        }
        /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] / { flush(); if ($0 ~ /duration: .* plan:/) buf = $0; next }
        buf != "" { buf = buf "\n" $0 }
        END {
            flush()
            print "==== slow claims by the index of the tenant walk (and its row estimate), and whether JIT compiled the plan:"
            for (w in count) printf "%6d  %s\n", count[w], w
            print "==== each slow claim, in order:"
            for (i = 1; i <= n; i++) print line[i]
            for (i = 1; i <= 2 && i <= n; i++) { print "==== slow claim " i ":"; print first[i] }
            if (n > 0) { print "==== the slowest:"; print slowest }
            print "==== claims logged by auto_explain (slower than the threshold): " n + 0
        }'
}

csv=$OUT/scale.csv
echo "rows,state,run,jobs,steps,steps_per_s_runs,steps_per_s,wall_s,claim_calls,claim_mean_ms,claim_max_ms,claim_total_ms,claim_ms_workers,claim_explain_ms,claim_explain_buffers,claim_cached_plan,claim_custom_ms,claim_generic_ms,slow_claims,table_mb,index_mb,stats_ms,errors_ms,retrying_ms,limits_ms,worker_stats_ms,stats_rls_ms,errors_rls_ms,retrying_rls_ms,load1" >"$csv"

# One run of the burst in state $2 at size $1, results in $OUT/$1_$2$3 ($3: a label suffix).
run_burst() {
    local rows=$1 state=$2 label=${3:-} dir done0 t0 now deadline done_n off logoff run
    local steps secs sps wall pgss ms buf plan slow cms gms tb ix claim_w samples=0 claim_sum=0 cw
    local sps_runs=() wall_sum=0 steps_sum=0
    dir=$OUT/${rows}_${state}${label}
    mkdir -p "$dir"
    q -c "SELECT pg_stat_statements_reset()" >/dev/null
    logoff=$(stat -c %s "$JL_PGLOG")

    for (( run = 1; run <= SCALE_RUNS; run++ )); do
        jl_log "rows=$rows state=$state$label, run $run: queueing $SCALE_JOBS jobs"
        # the state of the statistics, made anew for each run
        [[ "$state" == prequeue ]] && q -c "VACUUM ANALYZE jobloop.job" >/dev/null
        q -c "SELECT jobloop.pause()" >/dev/null
        q -c "SELECT count(jobloop.submit('bench', jsonb_build_object('url', '$url', 'n', 0, 'k', $SCALE_K, 'until', 4102444800),
                                          'tenant-' || lpad((g % $SCALE_TENANTS)::text, 4, '0')))
                FROM generate_series(1, $SCALE_JOBS) AS g" >/dev/null
        [[ "$state" == fresh ]] && q -c "VACUUM ANALYZE jobloop.job" >/dev/null
        if (( run == 1 )); then
            explain_claim "$dir/claim_explain.txt"
            sizes >"$dir/sizes_before.txt"
        fi

        read -r done0 < <(q -c "SELECT coalesce(sum(jobs_completed + jobs_failed), 0) FROM jobloop.worker_stats()")
        off=$(stat -c %s "$JL_MOCK_LOG")
        t0=$(_jl_now_us)
        deadline=$(( t0 + SCALE_TIMEOUT * 1000000 ))
        q -c "SELECT jobloop.resume()" >/dev/null
        while :; do
            sleep 0.25
            read -r done_n cw < <(q -F ' ' -c "SELECT coalesce(sum(jobs_completed + jobs_failed), 0) - $done0, coalesce(avg(claim_ms), 0) FROM jobloop.worker_stats()")
            claim_sum=$(calc "$claim_sum + $cw"); samples=$(( samples + 1 ))
            now=$(_jl_now_us)
            (( done_n >= SCALE_JOBS )) && break
            if (( now > deadline )); then
                jl_log "rows=$rows state=$state: only $done_n of $SCALE_JOBS jobs done after ${SCALE_TIMEOUT}s"
                break
            fi
        done
        wall_sum=$(calc "$wall_sum + ($now - $t0) / 1e6")

        # steps/s from the mock's log: requests of this run / (last response - first request)
        read -r steps secs < <(tail -c +$(( off + 1 )) "$JL_MOCK_LOG" | awk '
            $8 ~ /^"jobloop-/ { n++; s = $1 - $NF; if (first == "" || s < first) first = s; if ($1 > last) last = $1 }
            END { printf "%d %.3f\n", n, (n > 1 ? last - first : 0) }')
        sps_runs+=("$(calc "($secs > 0) ? int($steps / $secs + 0.5) : 0")")
        steps_sum=$(( steps_sum + steps ))
        jl_log "  $steps steps in ${secs}s = ${sps_runs[-1]} steps/s"
        # the burst's jobs go, so that the next run starts from the filled table alone
        # (the monitoring queries below run before the last run's jobs go)
        (( run < SCALE_RUNS )) && q -c "DELETE FROM jobloop.job WHERE kind = 'bench'" >/dev/null
    done
    steps=$steps_sum
    sps=$(printf '%s\n' "${sps_runs[@]}" | awk '{ s += $1 } END { printf "%d", s / NR + 0.5 }')
    secs=$(printf '%s ' "${sps_runs[@]}")
    secs=${secs% }
    wall=$(calc "int(10 * $wall_sum / $SCALE_RUNS + 0.5) / 10")
    claim_w=$(calc "int(100 * $claim_sum / ($samples > 0 ? $samples : 1) + 0.5) / 100")

    jl_psql -P pager=off -c "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
                              round(mean_exec_time::numeric, 3) AS mean_ms,
                              round(max_exec_time::numeric, 1) AS max_ms, rows,
                              left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS query
                         FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15" >"$dir/pgss.txt"
    pgss=$(q -F ' ' -c "SELECT calls, round(mean_exec_time::numeric, 2), round(max_exec_time::numeric, 1), round(total_exec_time::numeric)
                          FROM pg_stat_statements WHERE query LIKE 'WITH RECURSIVE tenants%' ORDER BY calls DESC LIMIT 1")
    [[ -n "$pgss" ]] || pgss="0 - - -"
    auto_explain_claims "$logoff" >"$dir/auto_explain.txt"
    slow=$(sed -n 's/^==== claims logged by auto_explain.*: //p' "$dir/auto_explain.txt")

    read -r ms buf < <(explain_numbers "$dir/claim_explain.txt" "sixth execution")
    read -r cms _ < <(explain_numbers "$dir/claim_explain.txt" "force_custom_plan")
    read -r gms _ < <(explain_numbers "$dir/claim_explain.txt" "force_generic_plan")
    plan=$(plan_choice "$dir/claim_explain.txt")
    read -r tb ix < <(sizes)
    jl_psql -P pager=off -c "SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)) AS size,
                              pg_relation_size(c.oid) / 8192 AS pages, c.reltuples::bigint AS reltuples
                         FROM pg_class c WHERE c.oid = 'jobloop.job'::regclass
                            OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'jobloop.job'::regclass)
                         ORDER BY pg_relation_size(c.oid) DESC" \
            -c "SELECT round(avg(pg_column_size(j.*))) AS avg_row_bytes, round(avg(pg_column_size(j.state))) AS avg_state_bytes
                  FROM jobloop.job j TABLESAMPLE SYSTEM (5)" >"$dir/sizes.txt"

    time_monitoring "$dir/monitor_times.txt" ""
    time_monitoring "$dir/monitor_times_rls.txt" jl_monitor
    explain_monitoring "$dir/monitor_explain.txt"
    mt() { awk -v n="$2" '$1 == n { print $2 }' "$1"; }
    local m=() name
    for name in "${MONITOR_NAMES[@]}"; do m+=("$(mt "$dir/monitor_times.txt" "$name")"); done
    for name in stats errors retrying; do m+=("$(mt "$dir/monitor_times_rls.txt" "$name")"); done

    local IFS=' '
    read -r -a p <<<"$pgss"
    echo "$rows,$state,$label,$SCALE_JOBS,$steps,$secs,$sps,$wall,${p[0]},${p[1]},${p[2]},${p[3]},$claim_w,$ms,$buf,$plan,$cms,$gms,$slow,$tb,$ix,$(IFS=,; echo "${m[*]}"),$(cut -d' ' -f1 /proc/loadavg)" >>"$csv"
    jl_log "rows=$rows state=$state$label: steps/s $sps (runs: $secs); claims ${p[0]} x ${p[1]} ms (max ${p[2]}); EXPLAIN ${ms} ms ($plan); stats ${m[0]} ms"

    q -c "DELETE FROM jobloop.job WHERE kind = 'bench'" >/dev/null
}

# ---------------------------------------------------------------------------------------
# The sizes

have=0
for rows in $BENCH_SCALE_ROWS; do
    if (( rows > have )); then
        jl_log "filling jobloop.job up to $rows finished jobs"
        t=$(_jl_now_us)
        jl_psql -v n=$(( rows - have )) -v days="$SCALE_DAYS" -f "$BENCH/scale_fill.sql" >/dev/null
        jl_log "  $(( rows - have )) rows in $(calc "int(($(_jl_now_us) - $t) / 1e5) / 10") s"
        have=$rows
    fi
    for state in $SCALE_STATES; do
        case $state in
            none) continue ;;
            stale|prequeue|fresh) ;;
            *) jl_die "unknown state '$state'" ;;
        esac
        run_burst "$rows" "$state"
    done
done
largest=$have

# ---------------------------------------------------------------------------------------
# Experiments (SQL only, this cluster only)

if [[ "$SCALE_EXPERIMENTS" == 1 ]]; then
    jl_log "experiments at $largest rows (bench/scale_experiments.sql)"
    # E5: the prequeue burst again without job_runnable_idx: the tenant walk and the
    # tenant probes then have job_tenant_runnable_idx alone to use, whatever the statistics
    # say (store_next_runnable scans job_tenant_runnable_idx instead)
    # (schemas from commit 5962aa8 on have no job_runnable_idx: nothing to try then)
    idxdef=$(q -c "SELECT pg_get_indexdef(to_regclass('jobloop.job_runnable_idx'))")
    if [[ -n "$idxdef" ]] && q -c "DROP INDEX jobloop.job_runnable_idx" >/dev/null; then
        q -c "VACUUM ANALYZE jobloop.job" >/dev/null
        run_burst "$largest" prequeue _no_runnable_idx
        q -c "$idxdef" >/dev/null
    fi
    q -c "VACUUM ANALYZE jobloop.job" >/dev/null
    if jl_psql -P pager=off -v repeat="$SCALE_REPEAT" -f "$BENCH/scale_experiments.sql" >"$OUT/experiments.txt" 2>&1; then
        # the burst again with E1's and E2's partial indexes: what they cost the workers
        run_burst "$largest" fresh _indexes
        jl_log "experiment E4 (bench/scale_counters.sql)"
        if jl_psql -P pager=off -v repeat="$SCALE_REPEAT" -f "$BENCH/scale_counters.sql" >>"$OUT/experiments.txt" 2>&1; then
            # and with the status counters' triggers too
            run_burst "$largest" fresh _counters
            {
                echo "######## E4 after the burst: the counters against count(*)"
                q -P pager=off -c "SELECT status, sum(n) AS counted FROM jobloop_x.status_count GROUP BY 1 ORDER BY 1" \
                    -c "SELECT status, count(*) FROM jobloop.job GROUP BY 1 ORDER BY 1"
            } >>"$OUT/experiments.txt"
        else
            jl_log "E4 failed; see $OUT/experiments.txt"
        fi
    else
        jl_log "the experiments failed; see $OUT/experiments.txt"
    fi
fi

# ---------------------------------------------------------------------------------------
# Summary

{
    cat "$OUT/settings.txt"
    echo
    echo "Per size and state of the statistics; claim = the workers' claim statement (pg_stat_statements); EXPLAIN = the"
    echo "claim as the plan cache runs it after five executions; monitoring times are medians of $SCALE_REPEAT runs, ms (rls: as a"
    echo "member of jobloop_admin, through row-level security)."
    echo
    awk -F, 'BEGIN { f = "%9s %-9s%-17s %7s %-13s %6s %7s %7s %6s | %7s %-7s %7s %7s %5s | %6s %6s | %7s %7s %7s %7s %7s | %7s %7s %7s\n"
                     printf f, "rows", "state", "", "steps/s", "(each run)", "claims", "mean", "max", "w_ms", "EXPL", "cached", "custom", "generic", "slow",
                            "tblMB", "idxMB", "stats", "errors", "retry", "limits", "wstats", "stats/r", "errs/r", "retry/r" }
        NR > 1 { printf f, $1, $2, $3, $7, $6, $9, $10, $11, $13, $14, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29 }' "$csv"
    echo
    echo "took $(( ($(date +%s) - scale_t0) / 60 )) min $(( ($(date +%s) - scale_t0) % 60 )) s"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
rm -f "$OUT/.qerr"
jl_log "wrote $OUT"
