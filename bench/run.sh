#!/usr/bin/env bash
#
# bench/run.sh -- jobloop's benchmark: one command, a throw-away cluster, the nginx mock
# API on loopback, a matrix of N jobs in flight x API latency L, and two latencies.
#
#   bench/run.sh                 the full matrix (N 100 1000 10000 x L 0 10ms 100ms 1s)
#   BENCH_QUICK=1 bench/run.sh   a tiny matrix, to check that the bench itself works
#
# It prints a table and writes bench/results/<timestamp>/ (results/latest points at the
# newest): matrix.csv, latency.csv, summary.txt, steps_vs_limit.png, and the cluster's
# settings.  bench/README.md says what every column means.  Never part of the tests.
#
# Environment (all optional):
#   BENCH_N="100 1000 10000"   jobs in flight per cell
#   BENCH_L="0 0.01 0.1 1"     API latency per cell, in seconds (0: the /json endpoint)
#   BENCH_SECONDS=12           aimed-for length of one cell; K (steps per job) follows
#   BENCH_K=                   steps per job in every cell, instead of what BENCH_SECONDS
#                              implies (the end-to-end targets: K=20 at N=1000, K=10 at 10000)
#   BENCH_SAMPLES=50           samples for each of the two latency measurements (0: none)
#   BENCH_LANG=plpgsql         business logic in plpgsql or sql (bench/kind.sql)
#   BENCH_WORKERS=2            jobloop.workers (one per core of the 2-core target machine)
#   BENCH_PGSS=1               also load pg_stat_statements and save the worker's top
#                              statements per cell (costs a little throughput)
#   BENCH_CELL_TIMEOUT=60      seconds past a cell's hard end (2 x BENCH_SECONDS + 10 s, when
#                              its jobs stop stepping) after which the rest is cancelled
#   BENCH_OUT=bench/results    where results go
#   BENCH_SCHEME=http          https: the calls go to the TLS mock (scripts/lib.sh's
#                              jl_mock_tls) over HTTPS, verified against its throw-away CA
#                              (jobloop.ca_file), HTTP/1.1 with keep-alive ...
#   BENCH_HTTP2=0              ... or, with 1, HTTP/2 (ALPN), multiplexed
#   BENCH_PEER=auto            the reference peer (bench/peer_asyncio.py, two processes)
#                              runs the same batch after jobloop's cell: auto = the L=0
#                              cells and N=1000 at L=100 ms; 1 = every cell; 0 = never
#                              (plain HTTP only)
#   PEER_POOL=8                the peer's asyncpg pool size per process (8 did best at
#                              N=1000, L=0 on 2 cores: 4 -> 1,946, 8 -> 2,044, 20 -> 1,612,
#                              60 -> 1,363 steps/s: more backends only contend for the CPU)
#   JL_KEEP=1                  keep the cluster and the mock running afterwards

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench

if [[ "${BENCH_QUICK:-}" == 1 ]]; then
    BENCH_N=${BENCH_N:-"100 1000"}
    BENCH_L=${BENCH_L:-"0 0.1"}
    BENCH_SECONDS=${BENCH_SECONDS:-4}
    BENCH_SAMPLES=${BENCH_SAMPLES:-20}
fi
BENCH_N=${BENCH_N:-"100 1000 10000"}
BENCH_L=${BENCH_L:-"0 0.01 0.1 1"}
BENCH_SECONDS=${BENCH_SECONDS:-12}
BENCH_SAMPLES=${BENCH_SAMPLES:-50}
BENCH_LANG=${BENCH_LANG:-plpgsql}
BENCH_WORKERS=${BENCH_WORKERS:-2}
BENCH_PGSS=${BENCH_PGSS:-0}
BENCH_CELL_TIMEOUT=${BENCH_CELL_TIMEOUT:-60}
BENCH_SCHEME=${BENCH_SCHEME:-http}
BENCH_HTTP2=${BENCH_HTTP2:-0}
BENCH_K=${BENCH_K:-}
BENCH_PEER=${BENCH_PEER:-auto}
PEER_POOL=${PEER_POOL:-8}
[[ "$BENCH_PEER" == 0 || "$BENCH_PEER" == 1 || "$BENCH_PEER" == auto ]] || jl_die "BENCH_PEER is 0, 1 or auto"
if [[ "$BENCH_SCHEME" == https && "$BENCH_PEER" != 0 ]]; then
    [[ "$BENCH_PEER" == 1 ]] && jl_die "BENCH_PEER=1 needs BENCH_SCHEME=http"
    BENCH_PEER=0
fi
[[ "$BENCH_SCHEME" == http || "$BENCH_SCHEME" == https ]] || jl_die "BENCH_SCHEME is http or https"
[[ "$BENCH_HTTP2" == 0 || "$BENCH_SCHEME" == https ]] || jl_die "BENCH_HTTP2=1 needs BENCH_SCHEME=https"
TENANTS=50            # jobs are spread over this many tenants (fair claiming is on the path)
K_MIN=10              # at least this many steps per job, to reach a steady state

stamp=$(date -u +%Y%m%d-%H%M%S)
OUT_ROOT=${BENCH_OUT:-$BENCH/results}
OUT=$OUT_ROOT/$stamp
mkdir -p "$OUT"
ln -sfn "$stamp" "$OUT_ROOT/latest"

max_n=1000
for n in $BENCH_N; do (( n > max_n )) && max_n=$n; done

# Floating-point arithmetic in the shell: calc 'EXPR' (awk syntax).  Parenthesize any
# comparison: a bare '>' in awk's print is an output redirection.
calc() { awk "BEGIN { print $1 }"; }

tty=false
[[ -t 2 ]] && tty=true

# ---------------------------------------------------------------------------------------
# Cluster and mock.  fsync and synchronous_commit stay on: every batch of steps pays a
# real WAL flush, as in production.  BENCH_WORKERS workers (default 2, one per core of
# the 2-core machine the targets are set for): CPU columns add the workers up, memory
# columns show the largest worker.

settings=(
    "jobloop.workers = $BENCH_WORKERS"
    "jobloop.max_in_flight = $max_n"
    "fsync = on"
    "synchronous_commit = on"
    "shared_buffers = 256MB"
    "max_wal_size = 4GB"
    "checkpoint_timeout = 30min"
)
if [[ "$BENCH_PEER" != 0 ]] && (( 2 * PEER_POOL + 50 > 200 )); then
    settings+=("max_connections = $(( 2 * PEER_POOL + 50 ))")     # the peer's two pools
fi
if [[ "$BENCH_PGSS" == 1 ]]; then
    settings+=("shared_preload_libraries = 'jobloop,pg_stat_statements'"
               "pg_stat_statements.track = all")
fi

peer_deps=()
[[ "$BENCH_PEER" != 0 ]] && peer_deps=(python3-aiohttp python3-asyncpg)
jl_install_deps gnuplot-nox python3 "${peer_deps[@]}"
jl_build
if [[ "$BENCH_SCHEME" == https ]]; then
    # The TLS mock first: the cluster's settings name its CA.  Its access log has fields
    # of its own (test/mock/nginx-tls.conf.in): key, request time and status are read
    # from those positions below.
    jl_mock_tls
    settings+=("jobloop.ca_file = '$JL_TLS_CERTS/ca.crt'")
    mock_port=$JL_TLS_PORT_H1
    [[ "$BENCH_HTTP2" == 1 ]] && mock_port=$JL_TLS_PORT_H2
    MOCK_URL=https://127.0.0.1:$mock_port MOCK_LOG=$JL_TLS_LOG MOCK_DIR=$JL_TLS_DIR
    LOG_KEY=11 LOG_RT=12 LOG_STATUS=10
    jl_cluster_start "${settings[@]}"
else
    jl_cluster_start "${settings[@]}"
    jl_mock_start
    mock_port=$JL_MOCK_PORT
    MOCK_URL=$JL_MOCK_URL MOCK_LOG=$JL_MOCK_LOG MOCK_DIR=$JL_MOCK_DIR
    LOG_KEY=8 LOG_RT=9 LOG_STATUS=6
fi

psql_bench() { jl_psql -d bench "$@"; }

jl_psql -c "CREATE EXTENSION jobloop"
jl_psql -v lang="$BENCH_LANG" -f "$BENCH/kind.sql" >/dev/null
[[ "$BENCH_PGSS" == 1 ]] && jl_psql -c "CREATE EXTENSION pg_stat_statements"
# The analysis runs in its own database, between cells, never during one.
jl_psql -d postgres -c "CREATE DATABASE bench"
# job: the Idempotency-Key without its step, "jobloop-<key token>" since 0.3.0.
psql_bench -c "CREATE UNLOGGED TABLE bench_req (t_end float8, rt float8, status int, job text, step int)"

# The reference peer: its own database and table, two processes started once and kept
# running across the matrix (as jobloop's workers are), idle between its cells.
peer_pids=()
peer_backends=()
if [[ "$BENCH_PEER" != 0 ]]; then
    jl_psql -d postgres -c "CREATE DATABASE peer"
    jl_psql -d peer -q <<'SQL'
CREATE TABLE peer_job (
    id          bigserial PRIMARY KEY,
    status      text NOT NULL DEFAULT 'pending',
    state       jsonb NOT NULL,
    step        integer NOT NULL DEFAULT 0,
    worker      integer,
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    updated_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX peer_job_pending_idx ON peer_job (id) WHERE status = 'pending';
SQL
    for i in 1 2; do
        # /usr/bin/python3: Debian's aiohttp and asyncpg are installed for it (a python3
        # earlier in PATH, e.g. pyenv's, would not see them).
        /usr/bin/python3 "$BENCH/peer_asyncio.py" --dsn "postgresql://postgres@127.0.0.1:$PGPORT/peer" \
            --worker "$i" --pool "$PEER_POOL" >"$OUT/peer_$i.log" 2>&1 </dev/null &
        peer_pids+=("$!")
        jl_on_exit kill "$!"
    done
    jl_wait_for 30 bash -c "grep -q '^ready' '$OUT/peer_1.log' && grep -q '^ready' '$OUT/peer_2.log'" \
        || { cat "$OUT"/peer_*.log >&2; jl_die "the peer did not start"; }
    mapfile -t peer_backends < <(jl_psql -Atc "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'peer worker %'")
fi

mapfile -t worker_pids < <(jl_psql -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker' ORDER BY pid")
(( ${#worker_pids[@]} == BENCH_WORKERS )) \
    || jl_die "expected $BENCH_WORKERS jobloop workers, found: '${worker_pids[*]}'"

{
    echo "jobloop bench, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$JL_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$JL_ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "$("$JL_PGBIN/postgres" --version); business logic in $BENCH_LANG; $TENANTS tenants"
    echo "settings: ${settings[*]}"
    echo "API: $MOCK_URL ($BENCH_SCHEME$([[ "$BENCH_HTTP2" == 1 ]] && echo ", HTTP/2"))"
    [[ "$BENCH_PEER" != 0 ]] && echo "peer: bench/peer_asyncio.py, 2 processes, asyncpg pool $PEER_POOL each, API ${JL_MOCK_URL2:-}, cells: $BENCH_PEER"
    jl_psql -Atc "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name)
                    FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method',
                         'shared_buffers', 'jobloop.max_in_flight', 'jobloop.workers',
                         'jobloop.function_timeout')"
} >"$OUT/settings.txt"
cat "$OUT/settings.txt"

# ---------------------------------------------------------------------------------------
# Helpers for one cell

# CPU seconds (user + system) the process has used so far, in clock ticks.
cpu_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat") || return 1
    stat=${stat##*) }               # after the command name, which may contain spaces
    # shellcheck disable=SC2086
    set -- $stat                    # $1 is field 3 (state), so utime (14) is $12
    echo $(( ${12} + ${13} ))
}
CLK_TCK=$(getconf CLK_TCK)

# Nanoseconds the process has run on a CPU, and waited for one while runnable
# (/proc/PID/schedstat): the second shows how much other load took the CPU from it.
sched_ns() { cat "/proc/$1/schedstat"; }

# The mock's nginx worker processes (the children of its master).
mock_pids() {
    local master f stat
    master=$(cat "$MOCK_DIR/nginx.pid")
    for f in /proc/[0-9]*/stat; do
        stat=$(cat "$f" 2>/dev/null) || continue
        stat=${stat##*) }
        # shellcheck disable=SC2086
        set -- $stat
        [[ "$2" == "$master" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}

# Total CPU ticks of the given processes.
sum_ticks() {
    local p t=0
    for p in "$@"; do t=$(( t + $(cpu_ticks "$p" || echo 0) )); done
    echo "$t"
}

# A /proc/PID/status field in kB.
proc_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# The largest of that field over the workers.
workers_max_kb() {
    local p v m=0
    for p in "${worker_pids[@]}"; do
        v=$(proc_kb "$p" "$1")
        (( v > m )) && m=$v
    done
    echo "$m"
}

# Nanoseconds the workers together waited for a CPU while runnable.
workers_runq_ns() {
    local p t=0 run wait rest
    for p in "${worker_pids[@]}"; do
        read -r run wait rest < <(sched_ns "$p")
        t=$(( t + wait ))
    done
    echo "$t"
}

# Established connections from the workers to the mock.
# The peer talks to the mock's second address, 127.0.0.2: not counted.
mock_connections() { ss -Htn state established "( dport = :$mock_port and dst 127.0.0.1 )" | wc -l; }

# Steps/s a cell can hope for: N/L, or for L=0 a guess that the previous L=0 cell refines.
rate_guess_l0=15000

csv=$OUT/matrix.csv
echo "n,l_ms,k,jobs,steps,window_s,all_in_flight,steps_per_s,overall_steps_per_s,limit,ratio,ovh_p50_ms,ovh_p99_ms,ovh_max_ms,cpu_s,cpu_s_per_1k,cpu_pct,rss_peak_mb,anon_peak_mb,failed,retries,non200,unfinished,wall_s,runq_pct,mock_cpu_pct,load1,cpu_ceiling,conn_peak,submit_ms,e2e_s,ideal_s,e2e_ratio,e2e_steps_per_s,jobs_started,start_first_ms,start_p50_ms,start_last_ms,tail_ms,peer_steps,peer_e2e_s,peer_e2e_steps_per_s,peer_steps_per_s,peer_start_last_ms,peer_cpu_s_per_1k,peer_cpu_pct,peer_failed,jl_over_peer" >"$csv"

# Does the peer run the cell (N, L)?  auto: the L=0 cells and N=1000 at L=100 ms.
peer_wanted() {
    [[ "$BENCH_PEER" == 1 ]] && return 0
    [[ "$BENCH_PEER" == auto ]] || return 1
    [[ "$2" == 0 ]] && return 0
    [[ "$1" == 1000 && "$(calc "($2 == 0.1)")" == 1 ]]
}

# The same batch (N jobs of K steps at latency L, one INSERT statement) for the reference
# peer; sets peer_part to its CSV fields (empty when it does not run the cell).
run_peer_cell() {
    local n=$1 l=$2 k=$3 url t0 until_s t_begin t_commit t_done off unfinished steps now
    local deadline cpu0 cpu1 wall failed metrics e2e e2e_s pids label
    peer_part=",,,,,,,,"
    peer_wanted "$n" "$l" || return 0
    if [[ "$l" == 0 ]]; then url="$JL_MOCK_URL2/json?n="; else url="$JL_MOCK_URL2/delay?s=$l&n="; fi
    label=$(printf 'peer N=%s L=%sms K=%s' "$n" "$(calc "$l * 1000")" "$k")
    jl_psql -d peer -q -c "TRUNCATE peer_job" -c "CHECKPOINT"
    off=$(stat -c %s "$JL_MOCK_LOG2")
    pids=("${peer_pids[@]}" "${peer_backends[@]}")
    cpu0=$(sum_ticks "${pids[@]}")
    t0=$(_jl_now_us)
    until_s=$(( t0 / 1000000 + 2 * BENCH_SECONDS + 10 ))
    read -r t_begin t_commit < <(jl_psql -d peer -At -v n="$n" -v k="$k" -v url="$url" -v until="$until_s" <<'SQL'
SELECT extract(epoch FROM clock_timestamp()) AS t_begin \gset
WITH ins AS (
    INSERT INTO peer_job (state)
    SELECT jsonb_build_object('url', :'url', 'n', 0, 'k', :k, 'until', :until)
      FROM generate_series(1, :n)
    RETURNING 1)
SELECT count(*) AS submitted, pg_notify('peer_job', '') FROM ins \gset
SELECT extract(epoch FROM clock_timestamp()) AS t_commit \gset
\echo :t_begin :t_commit
SQL
)
    deadline=$(( (until_s + BENCH_CELL_TIMEOUT) * 1000000 ))
    while :; do
        sleep 1
        IFS='|' read -r unfinished steps < <(jl_psql -d peer -Atc "
            SELECT count(*) FILTER (WHERE status IN ('pending', 'running')), coalesce(sum(step), 0)
              FROM peer_job")
        now=$(_jl_now_us)
        $tty && printf '\r  %-33s %6.1fs  %8d steps  %6d jobs to go' "$label" \
            "$(calc "($now - $t0) / 1e6")" "$steps" "$unfinished" >&2
        (( unfinished == 0 )) && break
        if (( now > deadline )); then
            jl_log "$label: still $unfinished jobs unfinished ${BENCH_CELL_TIMEOUT}s after their end; left as they are"
            break
        fi
    done
    $tty && printf '\n' >&2
    cpu1=$(sum_ticks "${pids[@]}")
    wall=$(calc "($(_jl_now_us) - $t0) / 1e6")
    IFS='|' read -r steps failed t_done < <(jl_psql -d peer -Atc "
        SELECT coalesce(sum(step), 0), count(*) FILTER (WHERE status = 'failed'),
               extract(epoch FROM max(finished_at)) FROM peer_job")
    if (( failed > 0 )); then
        jl_log "$label: $failed failed jobs; the most common reasons:"
        jl_psql -d peer -c "SELECT last_error, count(*) FROM peer_job WHERE status = 'failed'
                             GROUP BY 1 ORDER BY 2 DESC LIMIT 5" >&2
    fi
    tail -c +$(( off + 1 )) "$JL_MOCK_LOG2" | awk -v k="$LOG_KEY" -v rt="$LOG_RT" -v st="$LOG_STATUS" '
        $k ~ /^"peer-/ {
            key = $k; gsub(/"/, "", key); m = split(key, p, "-")
            printf "%s\t%s\t%s\t%s\t%s\n", $1, $rt, $st, substr(key, 1, length(key) - length(p[m]) - 1), p[m]
        }' >"$OUT/cell.tsv"
    psql_bench -q -c "TRUNCATE bench_req" -c "\\copy bench_req FROM '$OUT/cell.tsv'"
    gzip -c "$OUT/cell.tsv" >"$OUT/peer_requests_n${n}_l${l}.tsv.gz"
    rm -f "$OUT/cell.tsv"
    metrics=$(psql_bench -At -F, -f "$BENCH/analyze_cell.sql")
    e2e=$(psql_bench -At -F, -v t_commit="$t_commit" -f "$BENCH/analyze_e2e.sql")
    e2e_s=$(calc "$t_done - $t_commit")
    peer_part="$steps,$(calc "int(1000 * $e2e_s + 0.5) / 1000"),$(calc "int($steps / $e2e_s + 0.5)"),$(cut -d, -f3 <<<"$metrics"),$(cut -d, -f4 <<<"$e2e"),$(calc "int(1e6 * ($cpu1 - $cpu0) / $CLK_TCK / ($steps > 0 ? $steps : 1) + 0.5) / 1000"),$(calc "int(100 * ($cpu1 - $cpu0) / $CLK_TCK / $wall + 0.5)"),$failed"
}

run_cell() {
    local n=$1 l=$2 url guess k cpu0 cpu1 off t0 t1 now deadline unfinished steps
    local anon_max=0 anon hwm failed retries0 retries1 wall metrics limit ratio line
    local rq0 rq1 mock mock0 mock1 load1
    local last_print=0 label conn conn_max=0 poll

    if [[ "$l" == 0 ]]; then
        url="$MOCK_URL/json?n="
        guess=$rate_guess_l0
    else
        url="$MOCK_URL/delay?s=$l&n="
        guess=$(calc "($n / $l < $rate_guess_l0) ? $n / $l : $rate_guess_l0")
    fi
    # K steps per job so that the cell lasts about BENCH_SECONDS at the guessed rate.
    k=$(calc "int($BENCH_SECONDS * $guess / $n + 0.999)")
    (( k < K_MIN )) && k=$K_MIN
    [[ -n "$BENCH_K" ]] && k=$BENCH_K
    label=$(printf 'N=%s L=%sms K=%s' "$n" "$(calc "$l * 1000")" "$k")

    # A clean start: no rows, a fresh checkpoint, the worker's peak RSS reset.
    jl_psql -q -c "TRUNCATE jobloop.job" -c "CHECKPOINT"
    [[ "$BENCH_PGSS" == 1 ]] && jl_psql -Atc "SELECT pg_stat_statements_reset()" >/dev/null
    for p in "${worker_pids[@]}"; do
        echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true        # VmHWM := VmRSS
    done
    off=$(stat -c %s "$MOCK_LOG")
    cpu0=$(sum_ticks "${worker_pids[@]}")
    rq0=$(workers_runq_ns)
    mapfile -t mock < <(mock_pids)
    mock0=$(sum_ticks "${mock[@]}")
    retries0=$(jl_psql -Atc "SELECT coalesce(sum(retries), 0) FROM jobloop.worker_stats()")

    # Every job stops after k steps, or at the latest at "until": a cell far slower than
    # the guess still ends in bounded time (bench/kind.sql).
    t0=$(_jl_now_us)
    until_s=$(( t0 / 1000000 + 2 * BENCH_SECONDS + 10 ))
    # All N jobs in ONE statement (one transaction).  t_begin: just before it; t_commit:
    # the session's next statement, i.e. just after the commit returned (the end-to-end
    # and batch-start clocks start there).
    read -r t_begin t_commit < <(jl_psql -At -v n="$n" -v k="$k" -v url="$url" -v until="$until_s" -v tenants="$TENANTS" <<'SQL'
SELECT extract(epoch FROM clock_timestamp()) AS t_begin \gset
SELECT count(jobloop.submit('bench',
                            jsonb_build_object('url', :'url', 'n', 0, 'k', :k, 'until', :until),
                            'tenant-' || (g % :tenants))) AS submitted
  FROM generate_series(1, :n) AS g \gset
SELECT extract(epoch FROM clock_timestamp()) AS t_commit \gset
\echo :t_begin :t_commit
SQL
)
    deadline=$(( (until_s + BENCH_CELL_TIMEOUT) * 1000000 ))

    # Wait for the cell to finish, sampling the worker's private memory once a second.  The
    # table is counted every n/20,000 seconds only (every second below N = 20,000): with
    # 100,000 jobs (a million dead rows by the end) each count takes much of a core.
    poll=0
    while :; do
        sleep 1
        anon=$(workers_max_kb RssAnon)
        (( anon > anon_max )) && anon_max=$anon
        conn=$(mock_connections)
        (( conn > conn_max )) && conn_max=$conn
        (( poll++ % (n / 20000 + 1) == 0 )) || continue
        IFS='|' read -r unfinished steps < <(jl_psql -Atc "
            SELECT (SELECT count(*) FROM jobloop.job WHERE status IN ('pending', 'running')),
                   (SELECT coalesce(sum(step), 0) FROM jobloop.job)")
        now=$(_jl_now_us)
        line=$(printf '  %-28s %6.1fs  %8d steps  %6d jobs to go' "$label" \
            "$(calc "($now - $t0) / 1e6")" "$steps" "$unfinished")
        if $tty; then
            printf '\r%s' "$line" >&2
        elif (( now - last_print >= 5000000 )); then
            printf '%s\n' "$line" >&2
            last_print=$now
        fi
        (( unfinished == 0 )) && break
        if (( now > deadline )); then
            jl_log "$label: still $unfinished jobs unfinished ${BENCH_CELL_TIMEOUT}s after their end; cancelling them"
            # One cancel per statement and transaction: a multi-row cancel can deadlock
            # with the worker's batch UPDATE, and more than 256 cancels between two turns
            # of the worker's loop overflow its cancel queue (see /work/notes/bugs.md).
            jl_psql -At >/dev/null <<'SQL'
SELECT format('SELECT jobloop.cancel(%s), pg_sleep(0.001)', id)
  FROM jobloop.job WHERE status IN ('pending', 'running') ORDER BY id \gexec
SQL
            break
        fi
    done
    $tty && printf '\n' >&2
    t1=$(_jl_now_us)
    cpu1=$(sum_ticks "${worker_pids[@]}")
    rq1=$(workers_runq_ns)
    mock1=$(sum_ticks "${mock[@]}")
    load1=$(cut -d' ' -f1 /proc/loadavg)
    hwm=$(workers_max_kb VmHWM)
    retries1=$(jl_psql -Atc "SELECT coalesce(sum(retries), 0) FROM jobloop.worker_stats()")
    failed=$(jl_psql -Atc "SELECT count(*) FROM jobloop.job WHERE status = 'failed'")
    if (( failed > 0 )); then
        jl_log "$label: $failed failed jobs; the most common reasons:"
        jl_psql -c "SELECT last_error, count(*) FROM jobloop.job WHERE status = 'failed'
                     GROUP BY 1 ORDER BY 2 DESC LIMIT 5" >&2
    fi
    steps=$(jl_psql -Atc "SELECT coalesce(sum(step), 0) FROM jobloop.job")
    # The batch's end: the last job's finished_at (now() of the worker transaction that
    # recorded its last step, which commits a few ms later at most).
    t_done=$(jl_psql -Atc "SELECT extract(epoch FROM max(finished_at)) FROM jobloop.job")
    if [[ "$BENCH_PGSS" == 1 ]]; then
        jl_psql -P pager=off -c "
            SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
                   round(mean_exec_time::numeric, 3) AS mean_ms, rows, left(query, 110) AS query
              FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12" \
            >"$OUT/pgss_n${n}_l${l}.txt"
    fi

    # This cell's access-log lines -> bench_req (time, request time, status, job, step).
    tail -c +$(( off + 1 )) "$MOCK_LOG" | awk -v k="$LOG_KEY" -v rt="$LOG_RT" -v st="$LOG_STATUS" '
        $k ~ /^"(jobloop|peer)-/ {
            key = $k; gsub(/"/, "", key); m = split(key, p, "-")
            printf "%s\t%s\t%s\t%s\t%s\n", $1, $rt, $st, substr(key, 1, length(key) - length(p[m]) - 1), p[m]
        }' >"$OUT/cell.tsv"
    psql_bench -q -c "TRUNCATE bench_req" -c "\\copy bench_req FROM '$OUT/cell.tsv'"
    # Kept for a closer look: one line per request (t_end, request_time, status, job, step).
    gzip -c "$OUT/cell.tsv" >"$OUT/requests_n${n}_l${l}.tsv.gz"
    rm -f "$OUT/cell.tsv"
    metrics=$(psql_bench -At -F, -f "$BENCH/analyze_cell.sql")
    [[ -n "$metrics" ]] || metrics=",,,,,,,"
    e2e=$(psql_bench -At -F, -v t_commit="$t_commit" -f "$BENCH/analyze_e2e.sql")
    [[ -n "$e2e" ]] || e2e=",,,,"

    wall=$(calc "($t1 - $t0) / 1e6")
    if [[ "$l" == 0 ]]; then
        limit=""
        ratio=""
    else
        limit=$(calc "$n / $l")
        ratio=$(calc "int(1000 * $(cut -d, -f3 <<<"$metrics") / $limit + 0.5) / 1000")
    fi
    IFS=, read -r window ok sps overall p50 p99 pmax non200 <<<"$metrics"
    # End to end: commit -> the last job's finish; ideal K x L (when every job ran K steps).
    local e2e_s ideal e2e_ratio started s_first s_p50 s_last last_resp jl_over_peer=""
    IFS=, read -r started s_first s_p50 s_last last_resp <<<"$e2e"
    e2e_s=$(calc "$t_done - $t_commit")
    ideal=""
    e2e_ratio=""
    if [[ "$l" != 0 ]] && (( steps == n * k )); then
        ideal=$(calc "$k * $l")
        e2e_ratio=$(calc "int(1000 * $ideal / $e2e_s + 0.5) / 1000")
    fi
    e2e_part="$(calc "int(10 * 1000 * ($t_commit - $t_begin) + 0.5) / 10"),$(calc "int(1000 * $e2e_s + 0.5) / 1000"),$ideal,$e2e_ratio,$(calc "int($steps / $e2e_s + 0.5)"),$started,$s_first,$s_p50,$s_last,$( [[ -n "$last_resp" ]] && calc "int(1000 * ($t_done - $last_resp) + 0.5)")"
    run_peer_cell "$n" "$l" "$k"
    if [[ -n "${peer_part%%,*}" ]]; then
        jl_over_peer=$(calc "int(100 * ($steps / $e2e_s) / $(cut -d, -f3 <<<"$peer_part") + 0.5) / 100")
    fi
    # The L=0 rate is the worker's own ceiling: aim the next L=0 cell's K at it.
    if [[ "$l" == 0 && -n "$sps" ]]; then
        rate_guess_l0=$sps
    fi
    echo "$n,$(calc "$l * 1000"),$k,$n,$steps,$window,$ok,$sps,$overall,$limit,$ratio,$p50,$p99,$pmax,$(calc "($cpu1 - $cpu0) / $CLK_TCK"),$(calc "int(1e6 * ($cpu1 - $cpu0) / $CLK_TCK / ($steps > 0 ? $steps : 1) + 0.5) / 1000"),$(calc "int(100 * ($cpu1 - $cpu0) / $CLK_TCK / $wall + 0.5)"),$(calc "int($hwm / 1024 + 0.5)"),$(calc "int($anon_max / 1024 + 0.5)"),$failed,$(( retries1 - retries0 )),$non200,$unfinished,$wall,$(calc "int(($rq1 - $rq0) / 1e7 / $wall + 0.5)"),$(calc "int(100 * ($mock1 - $mock0) / $CLK_TCK / $wall + 0.5)"),$load1,$(calc "(($cpu1 - $cpu0) > 0) ? int($steps * $CLK_TCK / ($cpu1 - $cpu0) + 0.5) : 0"),$conn_max,$e2e_part,$peer_part,$jl_over_peer" >>"$csv"
}

# ---------------------------------------------------------------------------------------
# The matrix

jl_log "matrix: N in {$BENCH_N} x L in {$BENCH_L} s, ~${BENCH_SECONDS}s per cell"
for n in $BENCH_N; do
    for l in $BENCH_L; do
        run_cell "$n" "$l"
    done
done

# ---------------------------------------------------------------------------------------
# Latencies, on an idle system, against bench/latency_server.py (microsecond timestamps)

lat_port=$(jl_free_port)
lat_log=$OUT/latency_server.log
: >"$lat_log"
python3 "$BENCH/latency_server.py" "$lat_port" "$lat_log" </dev/null >/dev/null 2>"$OUT/latency_server.err" &
lat_pid=$!
jl_on_exit kill "$lat_pid"
jl_wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$lat_port" || jl_die "latency server did not start"
lat_url=http://127.0.0.1:$lat_port
lat_csv=$OUT/latency.csv
echo "test,sample,job,ms" >"$lat_csv"

# Time (epoch seconds) of the first "EVENT" line of the first request of the job whose
# key token is TOKEN (its Idempotency-Key is jobloop-<token>-0 since 0.3.0), or fail.
lat_event_time() {
    awk -v ev="$1" -v suffix="-$2-0" '$2 == ev && substr($3, length($3) - length(suffix) + 1) == suffix { print $1; exit }' "$lat_log" | grep .
}

jl_psql -q -c "TRUNCATE jobloop.job"
i_sub=0
i_can=0

# Both measurements run in ONE psql session, like an application's pooled connection (a
# new connection per sample would also time the backend's cold caches).

# submit -> first request: the time from just before submit() (clock_timestamp() in the
# same statement, so the commit is included) until the request reaches the API.
jl_log "submit -> first request: $BENCH_SAMPLES jobs, one at a time, on an idle worker"
for (( i = 1; i <= BENCH_SAMPLES; i++ )); do
    cat <<'SQL'
SELECT pg_sleep(0.2) \g /dev/null
SELECT extract(epoch FROM clock_timestamp()) AS t0,
       jobloop.submit('bench', jsonb_build_object('url', :'url', 'n', 0, 'k', 1)) AS id \gset
SELECT key_token AS tok FROM jobloop.job WHERE id = :id \gset
\echo :id :t0 :tok
SELECT jobloop.wait(:id, '10 s') \g /dev/null
SQL
done | jl_psql -At -v url="$lat_url/fast?n=" >"$OUT/submit_times.txt"
while read -r id t_sub tok; do
    jl_wait_for 10 lat_event_time request "$tok" || jl_die "job $id never sent its request"
    t_req=$(lat_event_time request "$tok")
    echo "submit_to_first_request,$(( ++i_sub )),$id,$(calc "($t_req - $t_sub) * 1000")" >>"$lat_csv"
done <"$OUT/submit_times.txt"

# cancel -> aborted: a job waits on a request the API never answers; the time from just
# before cancel() until the API sees its connection closed.  Each job gets 0.3 s to send
# its request first; a sample whose request had not arrived by the cancel is left out.
jl_log "cancel -> aborted: $BENCH_SAMPLES jobs, one at a time"
for (( i = 1; i <= BENCH_SAMPLES; i++ )); do
    cat <<'SQL'
SELECT jobloop.submit('bench', jsonb_build_object('url', :'url', 'n', 0, 'k', 1)) AS id \gset
SELECT pg_sleep(0.3) \g /dev/null
SELECT key_token AS tok FROM jobloop.job WHERE id = :id \gset
SELECT extract(epoch FROM clock_timestamp()) AS t0, jobloop.cancel(:id) AS ok \gset
\echo :id :t0 :ok :tok
SQL
done | jl_psql -At -v url="$lat_url/hold?n=" >"$OUT/cancel_times.txt"
while read -r id t_cancel ok tok; do
    [[ "$ok" == t ]] || { jl_log "job $id: cancel() returned $ok"; continue; }
    t_req=$(lat_event_time request "$tok") || { jl_log "job $id: no request before the cancel; sample left out"; continue; }
    if [[ "$(calc "($t_req < $t_cancel)")" != 1 ]]; then
        jl_log "job $id: request arrived after the cancel; sample left out"
        continue
    fi
    jl_wait_for 10 lat_event_time close "$tok" || jl_die "job $id: the API never saw its connection close"
    t_close=$(lat_event_time close "$tok")
    echo "cancel_to_aborted,$(( ++i_can )),$id,$(calc "($t_close - $t_cancel) * 1000")" >>"$lat_csv"
done <"$OUT/cancel_times.txt"

# ---------------------------------------------------------------------------------------
# Report: the table, the latencies, the plot

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
report() {
    echo
    cat "$OUT/settings.txt"
    echo "load average at the end: $load_end (other work on the machine shows here and in runq%)"
    echo
    awk -F, 'NR == 1 { next }
        function f(v, fmt) { return v == "" ? "-" : sprintf(fmt, v) }
        BEGIN {
            printf "%6s %5s %5s %7s %8s %7s %6s %7s %7s %7s %7s %5s %5s %5s %6s %6s %6s %7s %6s\n",
                "N", "L ms", "K", "steps", "steps/s", "N/L", "ratio", "ovh p50", "ovh p99",
                "CPU/1k", "ceil/s", "CPU%", "runq%", "mock%", "RSS MB", "anonMB", "failed", "retries",
                "conns"
        }
        {
            printf "%6s %5s %5s %7s %8s %7s %6s %7s %7s %7s %7s %5s %5s %5s %6s %6s %6s %7s %6s%s\n",
                $1, $2, $3, $5, $8, f($10, "%.0f"), f($11, "%.2f"), f($12, "%.0f"), f($13, "%.0f"),
                f($16, "%.3f"), $28, $17, $25, $26, $18, $19, $20, $21, $29,
                ($23 > 0 ? "  (" $23 " unfinished)" : "") ($7 == "f" ? "  *" : "")
        }' "$csv"
    echo "steps/s: steady state, all N jobs in flight (bench/analyze_cell.sql); ratio = steps/s / (N/L);"
    echo "ovh: ms from a response's end to the job's next request (p50/p99, nginx log, 1 ms resolution);"
    echo "CPU/1k: the $BENCH_WORKERS worker(s)' CPU s per 1,000 steps; ceil/s: steps/s one core could do at that"
    echo "cost (1000 / CPU/1k); CPU%: workers on a CPU (added up); runq%: workers runnable but waiting"
    echo "for a CPU (other load); mock%: nginx's CPU; RSS: largest worker's peak resident (VmHWM, includes the"
    echo "shared buffers it touched); anonMB: largest worker's peak private memory; failed jobs; retries:"
    echo "transport/5xx retries; conns: peak established connections from the workers to the API."
    if grep -q ',f,' "$csv"; then
        echo "* the jobs were never all in flight at once: steps/s over the middle 80% of the run"
    fi
    echo
    echo "End to end: one statement submits the batch; from its commit to the last job finished."
    awk -F, 'NR == 1 { next }
        function f(v, fmt) { return v == "" ? "-" : sprintf(fmt, v) }
        BEGIN {
            printf "%6s %5s %5s %7s %9s %7s %7s %6s %8s %8s %8s %8s %7s | %8s %8s %8s %7s %7s\n",
                "N", "L ms", "K", "steps", "submit ms", "e2e s", "ideal s", "ideal%", "e2e st/s",
                "start1ms", "start50", "startall", "tail ms",
                "peer e2e", "peer s/s", "peerCPU1k", "jl/peer", "pfailed"
        }
        {
            printf "%6s %5s %5s %7s %9s %7s %7s %6s %8s %8s %8s %8s %7s | %8s %8s %8s %7s %7s\n",
                $1, $2, $3, $5, f($30, "%.0f"), f($31, "%.2f"), f($32, "%.1f"),
                f($33 == "" ? "" : 100 * $33, "%.0f"), $34, f($36, "%.0f"), f($37, "%.0f"),
                f($38, "%.0f"), f($39, "%.0f"),
                f($41, "%.2f"), f($42, "%.0f"), f($45, "%.3f"), f($48, "%.2f"), f($47, "%s")
        }' "$csv"
    echo "submit ms: the submit statement itself; e2e s: commit -> last job's finished_at; ideal s: K x L;"
    echo "ideal%: ideal / e2e; e2e st/s: steps / e2e s; start1ms/start50/startall: ms from the commit until"
    echo "the first job's, the median job's and the LAST job's first request reached the API (nginx log,"
    echo "+-1 ms); tail ms: last response -> last job's finished_at.  peer: bench/peer_asyncio.py on the"
    echo "same batch (2 processes): its e2e s and steps/s, CPU s per 1,000 steps (processes + their"
    echo "backends), jl/peer = jobloop's e2e steps/s / the peer's."
    echo
    awk -F, 'NR > 1 { v[$1] = v[$1] " " $4 }
        END {
            for (t in v) {
                n = split(substr(v[t], 2), a, " ")
                # insertion sort: n is small
                for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
                p50 = a[int(0.5 * n + 0.5) > 0 ? int(0.5 * n + 0.5) : 1]
                i99 = int(0.99 * n + 0.999); if (i99 > n) i99 = n
                printf "%-26s %3d samples   p50 %7.2f ms   p99 %7.2f ms   max %7.2f ms\n", t, n, p50, a[i99], a[n]
            }
        }' "$lat_csv" | sort
}
report | tee "$OUT/summary.txt"

if gnuplot -e "csv='$csv'; out='$OUT/steps_vs_limit.png'; workers=$BENCH_WORKERS" "$BENCH/plot.gp" 2>"$OUT/gnuplot.err"; then
    jl_log "plot: $OUT/steps_vs_limit.png"
else
    jl_log "gnuplot failed (see $OUT/gnuplot.err)"
fi
if gnuplot -e "csv='$csv'; out='$OUT/end_to_end.png'; workers=$BENCH_WORKERS" "$BENCH/plot_e2e.gp" 2>>"$OUT/gnuplot.err"; then
    jl_log "plot: $OUT/end_to_end.png"
else
    jl_log "gnuplot failed on the end-to-end plot (see $OUT/gnuplot.err)"
fi
jl_log "results in $OUT (matrix.csv, latency.csv, summary.txt, steps_vs_limit.png, end_to_end.png)"
