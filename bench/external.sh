#!/usr/bin/env bash
#
# bench/external.sh -- two external workers (jobloop-worker, jobloop.workers = 0) against
# two in-server workers (jobloop.workers = 2) on the same workload, on this machine.
#
#   bench/external.sh                       5,000 jobs x 10 steps, API latency 50 ms,
#                                           each mode 3 times, alternating
#   EXT_RUNS=1 EXT_JOBS=1000 bench/external.sh    a quick check of the bench itself
#
# Per run: a fresh cluster (fsync and synchronous_commit on, as bench/run.sh), the kind of
# bench/kind.sql (GET /delay?s=L&n=<step>, count the step, done after K steps), all jobs
# submitted in one statement, then a wait until every job has finished.  It measures
#
#   e2e        submit's commit -> the last job's finished_at, and steps / that time
#   steady     steps/s while the total step count went from 20 % to 80 % of the run's
#              (the ramp-up of claiming and the tail of the last jobs excluded)
#   server CPU utime + stime (/proc/PID/stat) of the postmaster and its children over
#              the run: in-server workers, or the backends that run the external
#              workers' turns, plus the checkpointer, WAL writer, ...  The bench's own
#              polling backends are short-lived and not counted.
#   worker CPU the same for the jobloop-worker processes (0 for in-server workers)
#   steps/xact steps per committed transaction of the database (pg_stat_database; the
#              bench's polls subtracted): a turn is one, so this is what one turn carries
#              (over libpq: one round trip)
#
# and prints both per 1,000 steps.  Results go to bench/results/external-<time>/
# (results.csv, summary.txt, one samples file per run, the workers' logs); bench/README.md
# ("External workers") has the numbers of a run and what they mean.  Never part of the
# tests.  The external workers connect over loopback here; on a real network each turn
# also pays a round trip.
#
# Environment (all optional):
#   EXT_JOBS=5000        jobs per run
#   EXT_STEPS=10         steps per job (K)
#   EXT_L=0.05           API latency in seconds (the mock's /delay)
#   EXT_RUNS=3           runs per mode; modes alternate, so drift from other load on the
#                        machine hits both alike
#   EXT_MODES="inserver external"
#   EXT_IN_FLIGHT=2500   jobloop.max_in_flight: jobs each worker holds, in both modes (two
#                        workers hold all 5,000 jobs at once)
#   EXT_TIMEOUT=600      seconds a run may take before the bench gives up on it
#   BENCH_OUT=bench/results

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench

EXT_JOBS=${EXT_JOBS:-5000}
EXT_STEPS=${EXT_STEPS:-10}
EXT_L=${EXT_L:-0.05}
EXT_RUNS=${EXT_RUNS:-3}
EXT_MODES=${EXT_MODES:-"inserver external"}
EXT_IN_FLIGHT=${EXT_IN_FLIGHT:-2500}
EXT_TIMEOUT=${EXT_TIMEOUT:-600}
TENANTS=50

stamp=$(date -u +%Y%m%d-%H%M%S)
OUT=${BENCH_OUT:-$BENCH/results}/external-$stamp
mkdir -p "$OUT"

calc() { awk "BEGIN { print $1 }"; }
CLK_TCK=$(getconf CLK_TCK)

# shellcheck disable=SC2119  # no extra packages
jl_install_deps
jl_build
WORKER_BIN=
for b in "$JL_PGBIN/jobloop-worker" "$JL_ROOT/jobloop-worker"; do
    [[ -x "$b" ]] && { WORKER_BIN=$b; break; }
done
[[ " $EXT_MODES " != *" external "* || -n "$WORKER_BIN" ]] \
    || jl_die "jobloop-worker is not built (make; make install)"

# What jl_build installed, to notice another run's `make install` replacing it (the
# system's PostgreSQL is shared by every test run on this machine).
installed_sum() {
    sha256sum "$("$JL_PGBIN/pg_config" --pkglibdir)/jobloop.so" \
        "$("$JL_PGBIN/pg_config" --sharedir)/extension/jobloop.control" ${WORKER_BIN:+"$WORKER_BIN"} \
        2>/dev/null | sha256sum | cut -c1-16
}
INSTALLED=$(installed_sum)

jl_mock_start

# ---------------------------------------------------------------------------------------
# CPU accounting from /proc

# utime + stime of PID in clock ticks.
cpu_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }               # after the command name, which may contain spaces
    # shellcheck disable=SC2086
    set -- $stat                    # $1 is field 3 (state), so utime (14) is $12
    echo $(( ${12} + ${13} ))
}

# "pid ticks" of the postmaster PM and each of its children.
server_ticks() {
    local pm=$1 f stat pid
    echo "$pm $(cpu_ticks "$pm" || echo 0)"
    for f in /proc/[0-9]*/stat; do
        stat=$(cat "$f" 2>/dev/null) || continue
        stat=${stat##*) }
        # shellcheck disable=SC2086
        set -- $stat
        [[ "$2" == "$pm" ]] || continue
        pid=${f#/proc/}
        pid=${pid%/stat}
        echo "$pid $(( ${12} + ${13} ))"
    done
}

# Ticks used between two "pid ticks" lists (a process new in the second counts from 0).
ticks_between() {
    awk 'NR == FNR { a[$1] = $2; next } { t += $2 - (($1 in a) ? a[$1] : 0) } END { print t + 0 }' "$1" "$2"
}

worker_ticks() {
    local p t=0
    for p in "$@"; do t=$(( t + $(cpu_ticks "$p" || echo 0) )); done
    echo "$t"
}

# ---------------------------------------------------------------------------------------
# One run

csv=$OUT/results.csv
echo "mode,run,jobs,steps,failed,e2e_s,e2e_steps_per_s,steady_steps_per_s,server_cpu_s,worker_cpu_s,server_ms_per_1k,worker_ms_per_1k,total_ms_per_1k,load1_start,xacts,steps_per_xact" >"$csv"

wpids=()
stop_workers() {
    local p
    for p in "${wpids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${wpids[@]}"; do
        jl_wait_for 15 _jl_pid_gone "$p" || kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    wpids=()
}
jl_on_exit stop_workers

workers_attached() { [[ "$(jl_psql -Atc "SELECT count(*) FROM jobloop.worker_stats()")" == 2 ]]; }

run_one() {
    local mode=$1 run=$2 nworkers pm samples t0 until_s t_commit unfinished steps now
    local deadline failed t_done e2e w0 w1 srv wrk load1 steady i x0 x1 samples_n
    if [[ "$mode" == inserver ]]; then nworkers=2; else nworkers=0; fi
    if [[ "$(installed_sum)" != "$INSTALLED" ]]; then
        jl_log "jobloop's installation was replaced (another run's make install): building this tree again"
        jl_build || jl_die "build failed"
        INSTALLED=$(installed_sum)
    fi
    jl_cluster_start "jobloop.workers = $nworkers" "jobloop.max_in_flight = $EXT_IN_FLIGHT" \
        "fsync = on" "synchronous_commit = on" "shared_buffers = 256MB" \
        "max_wal_size = 4GB" "checkpoint_timeout = 30min"
    # (CREATE EXTENSION warns that no worker serves the database yet: the external ones
    # connect below.)
    # shellcheck disable=SC2015  # the || is for a failure of either
    jl_psql -q -c "SET client_min_messages = error" -c "CREATE EXTENSION jobloop" \
        && jl_psql -v lang=plpgsql -f "$BENCH/kind.sql" >/dev/null \
        || { invalid_run "$mode" "$run" "setup failed"; return 1; }
    if [[ "$mode" == external ]]; then
        jl_psql -q -c "CREATE ROLE bench_worker LOGIN IN ROLE jobloop_worker" \
            || { invalid_run "$mode" "$run" "no role jobloop_worker"; return 1; }
        for i in 1 2; do
            "$WORKER_BIN" --name="bench-$i" \
                "host=127.0.0.1 port=$PGPORT dbname=jobloop user=bench_worker" \
                >>"$OUT/worker-$mode-$run-$i.log" 2>&1 </dev/null &
            wpids+=("$!")
        done
    fi
    jl_wait_for 30 workers_attached || { invalid_run "$mode" "$run" "two workers did not start"; return 1; }
    jl_psql -q -c "CHECKPOINT"
    pm=$(head -n 1 "$JL_PGDATA/postmaster.pid")
    load1=$(cut -d' ' -f1 /proc/loadavg)

    samples=$OUT/samples-$mode-$run.csv
    echo "t,steps,unfinished" >"$samples"
    # Committed transactions of the database: a worker's turn (in-server or over libpq) is
    # one, so steps per transaction is the batching a round trip carries.  The bench's
    # own polls (one per sample) are subtracted.
    x0=$(jl_psql -Atc "SELECT xact_commit FROM pg_stat_database WHERE datname = 'jobloop'")
    server_ticks "$pm" >"$OUT/.s0"
    w0=$(worker_ticks "${wpids[@]}")
    t0=$(_jl_now_us)
    until_s=$(( t0 / 1000000 + EXT_TIMEOUT ))
    # All jobs in one statement; t_commit is read by the session's next statement, just
    # after the commit returned.
    read -r _ t_commit < <(jl_psql -At -v n="$EXT_JOBS" -v k="$EXT_STEPS" \
        -v url="$JL_MOCK_URL/delay?s=$EXT_L&n=" -v until="$until_s" -v tenants="$TENANTS" <<'SQL'
SELECT extract(epoch FROM clock_timestamp()) AS t_begin \gset
SELECT count(jobloop.submit('bench',
                            jsonb_build_object('url', :'url', 'n', 0, 'k', :k, 'until', :until),
                            'tenant-' || (g % :tenants))) AS submitted
  FROM generate_series(1, :n) AS g \gset
SELECT extract(epoch FROM clock_timestamp()) AS t_commit \gset
\echo :t_begin :t_commit
SQL
)
    echo "$t_commit,0,$EXT_JOBS" >>"$samples"
    deadline=$(( t0 + (EXT_TIMEOUT + 30) * 1000000 ))
    while :; do
        sleep 0.2
        IFS='|' read -r now steps unfinished < <(jl_psql -Atc "
            SELECT extract(epoch FROM clock_timestamp()), coalesce(sum(step), 0),
                   count(*) FILTER (WHERE status IN ('pending', 'running'))
              FROM jobloop.jobs")
        echo "$now,$steps,$unfinished" >>"$samples"
        (( unfinished == 0 )) && break
        if (( $(_jl_now_us) > deadline )); then
            jl_log "$mode run $run: $unfinished jobs unfinished after ${EXT_TIMEOUT}s; measured as is"
            break
        fi
    done
    server_ticks "$pm" >"$OUT/.s1"
    w1=$(worker_ticks "${wpids[@]}")
    # Backends hand their transaction counts to the shared statistics when idle, at most
    # once a second: give them that (a count a busy worker has not handed over yet is
    # missing, so steps per transaction is an upper bound).
    sleep 1.5
    samples_n=$(( $(wc -l <"$samples") - 2 ))
    x1=$(jl_psql -Atc "SELECT xact_commit FROM pg_stat_database WHERE datname = 'jobloop'")
    srv=$(ticks_between "$OUT/.s0" "$OUT/.s1")
    wrk=$(( w1 - w0 ))
    rm -f "$OUT/.s0" "$OUT/.s1"

    IFS='|' read -r steps failed t_done < <(jl_psql -Atc "
        SELECT coalesce(sum(step), 0), count(*) FILTER (WHERE status <> 'completed'),
               extract(epoch FROM max(finished_at)) FROM jobloop.jobs")
    if [[ "$(installed_sum)" != "$INSTALLED" ]]; then
        invalid_run "$mode" "$run" "jobloop's installation was replaced during the run"
        return 1
    fi
    if (( steps != EXT_JOBS * EXT_STEPS || failed > 0 )); then
        invalid_run "$mode" "$run" "$steps steps of $(( EXT_JOBS * EXT_STEPS )), $failed jobs not completed"
        return 1
    fi
    e2e=$(calc "$t_done - $t_commit")
    # Steady state: the times at which the step count crossed 20 % and 80 % of the total,
    # interpolated between samples (the first is the submit's commit, 0 steps).
    steady=$(awk -F, -v total="$steps" '
        NR == 1 { next }
        { t = $1; s = $2
          if (!a && s >= 0.2 * total) { ta = (ps == s) ? t : pt + (t - pt) * (0.2 * total - ps) / (s - ps); a = 1 }
          if (!b && s >= 0.8 * total) { tb = (ps == s) ? t : pt + (t - pt) * (0.8 * total - ps) / (s - ps); b = 1 }
          pt = t; ps = s }
        END { if (a && b && tb > ta) printf "%.0f", 0.6 * total / (tb - ta) }' "$samples")
    printf '%s,%s,%s,%s,%s,%.3f,%.0f,%s,%.2f,%.2f,%.1f,%.1f,%.1f,%s,%d,%.1f\n' "$mode" "$run" "$EXT_JOBS" \
        "$steps" "$failed" "$e2e" "$(calc "$steps / $e2e")" "$steady" \
        "$(calc "$srv / $CLK_TCK")" "$(calc "$wrk / $CLK_TCK")" \
        "$(calc "1000 * 1000 * $srv / $CLK_TCK / $steps")" "$(calc "1000 * 1000 * $wrk / $CLK_TCK / $steps")" \
        "$(calc "1000 * 1000 * ($srv + $wrk) / $CLK_TCK / $steps")" "$load1" \
        "$(( x1 - x0 - samples_n - 2 ))" "$(calc "$steps / ($x1 - $x0 - $samples_n - 2)")" >>"$csv"
    tail -n 1 "$csv" >&2

    stop_workers
    jl_cluster_stop
}

# A run that did not do all its steps is not measured: recorded in invalid.txt, its cluster
# stopped, and run again (at most twice).  On a machine shared with test runs, another run's
# `make install` can replace jobloop's files in the system's PostgreSQL under a running
# cluster, which breaks the workers or CREATE EXTENSION (seen while writing this bench).
invalid_run() {
    jl_log "$1 run $2 is not measured: $3"
    echo "$(date -u '+%H:%M:%S') $1 run $2: $3" >>"$OUT/invalid.txt"
    stop_workers
    jl_cluster_stop || true
}

{
    echo "jobloop bench/external.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$JL_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$JL_ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')"
    echo "machine: $(nproc) cores (shared with other work), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "$("$JL_PGBIN/postgres" --version); $EXT_JOBS jobs x $EXT_STEPS steps, API latency ${EXT_L}s, $TENANTS tenants, max_in_flight $EXT_IN_FLIGHT, $EXT_RUNS runs per mode"
} >"$OUT/settings.txt"
cat "$OUT/settings.txt" >&2

for (( r = 1; r <= EXT_RUNS; r++ )); do
    for m in $EXT_MODES; do
        for attempt in 1 2 3; do
            jl_log "run $r, $m$( (( attempt > 1 )) && echo " (attempt $attempt)")"
            run_one "$m" "$r" && break
            (( attempt < 3 )) || jl_die "$m run $r failed three times (see $OUT/invalid.txt)"
        done
    done
done

# Medians per mode.
{
    cat "$OUT/settings.txt"
    echo
    awk -F, 'NR > 1 { n[$1]++; e2e[$1, n[$1]] = $7; st[$1, n[$1]] = $8; sv[$1, n[$1]] = $11; wk[$1, n[$1]] = $12; tt[$1, n[$1]] = $13; sx[$1, n[$1]] = $16; fl[$1] += $5 }
        function med(arr, m, k,   i, j, v, t) {
            for (i = 1; i <= k; i++) v[i] = arr[m, i]
            for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
            return (k % 2) ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
        }
        END {
            printf "%-10s %5s %14s %14s %16s %16s %14s %11s %7s\n", "mode", "runs", "e2e steps/s", "steady st/s", "server ms/1k st", "worker ms/1k st", "total ms/1k", "steps/xact", "failed"
            for (m in n)
                printf "%-10s %5d %14.0f %14.0f %16.1f %16.1f %14.1f %11.1f %7d\n", m, n[m], med(e2e, m, n[m]), med(st, m, n[m]), med(sv, m, n[m]), med(wk, m, n[m]), med(tt, m, n[m]), med(sx, m, n[m]), fl[m]
        }' "$csv"
    echo "(medians over the runs; CPU in ms of user + system time per 1,000 steps; every run in results.csv)"
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
echo "results: $OUT"
