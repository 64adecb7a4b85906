# shellcheck shell=bash
#
# test/crash/common.sh -- helpers shared by test/crash/crash.sh and test/fault/fault.sh.
#
# Source it after scripts/lib.sh and test/tap.sh (the TAP helpers).  It gives:
#
#   SQL       cr_sql SQL            psql -At; returns psql's status (quietly fails while
#                                   the server restarts)
#             cr_sql_must SQL       the same, but a failure aborts the suite (bail out)
#   workers   cr_worker_pids        the pids of the running jobloop workers, one a line
#             cr_workers_up N [PID...]  true when N workers run and none has a listed pid
#   chaos     cr_kill_worker NAME   kill -9 the worker whose application_name is NAME and
#                                   wait until the postmaster has restarted every worker
#             cr_restart_immediate  pg_ctl stop -m immediate, start, wait for the workers
#             cr_progress           sum(step) over all jobs (empty while the server is down)
#             cr_wait_progress MIN AFTER SECONDS
#                                   wait until sum(step) >= MIN and > AFTER
#   access log  cr_load_access_log SCHEMA.TABLE  parse $JL_MOCK_LOG into a table
#   log       cr_boundaries_sql     when each old generation of processes was gone (SQL array)
#             cr_unexpected_crashes server log lines of crashes other than our kill -9s
#
# Every disruption appends its wall-clock time (epoch seconds, the clock nginx's $msec uses)
# to CR_EVENTS, so a suite can tell a duplicate request caused by a crash from any other.

CR_WORKERS=${CR_WORKERS:-2}
CR_EVENTS=()

# ---------------------------------------------------------------------------------------
# SQL

cr_sql() {
    jl_psql -At -c "$1" 2>/dev/null
}

cr_sql_must() {
    local out
    if ! out=$(jl_psql -At -c "$1" 2>&1); then
        tap_diag "$out"
        tap_bail "SQL failed: $1"
    fi
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------
# Workers

cr_worker_pids() {
    cr_sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker' ORDER BY pid"
}

# cr_workers_up N [OLD_PID...]: N workers run, none of them one of OLD_PID.
cr_workers_up() {
    local want=$1 pids pid old n=0
    shift
    pids=$(cr_worker_pids) || return 1
    for pid in $pids; do
        for old in "$@"; do
            [[ "$pid" == "$old" ]] && return 1
        done
        n=$((n + 1))
    done
    (( n == want ))
}

# kill -9 one worker.  A backend that dies of a signal makes the postmaster reset shared
# memory and restart every backend, so afterwards all workers are new processes.
# Sets CR_KILLED_PID.  Returns non-zero if no such worker or the workers did not come back.
cr_kill_worker() {
    local name=$1 old pid
    old=$(cr_worker_pids) || return 1
    pid=$(cr_sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker'
                  AND application_name = '$name'") || return 1
    [[ -n "$pid" ]] || { jl_log "no worker named '$name'"; return 1; }
    CR_EVENTS+=("${EPOCHREALTIME/,/.}")
    kill -9 "$pid" || return 1
    # shellcheck disable=SC2034  # read by the suites
    CR_KILLED_PID=$pid
    # shellcheck disable=SC2086
    jl_wait_for 60 cr_workers_up "$CR_WORKERS" $old
}

cr_restart_immediate() {
    local old
    old=$(cr_worker_pids) || return 1
    CR_EVENTS+=("${EPOCHREALTIME/,/.}")
    jl_cluster_restart_immediate || return 1
    # shellcheck disable=SC2086
    jl_wait_for 60 cr_workers_up "$CR_WORKERS" $old
}

cr_progress() {
    cr_sql "SELECT coalesce(sum(step), 0) FROM jobloop.jobs"
}

_cr_progressed() {
    local min=$1 after=$2 p
    p=$(cr_progress) || return 1
    [[ -n "$p" ]] && (( p >= min && p > after ))
}

cr_wait_progress() {
    jl_wait_for "$3" _cr_progressed "$1" "$2"
}

_cr_unfinished() {
    local n
    n=$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE status IN ('pending', 'running')") || return 1
    [[ "$n" == 0 ]]
}

# cr_wait_all_finished SECONDS
cr_wait_all_finished() {
    jl_wait_for "$1" _cr_unfinished
}

# ---------------------------------------------------------------------------------------
# Access log -> table (one row per request), for SQL checks.
#   t        when the request finished (nginx $msec)
#   started  when it started (t - $request_time)
#   uri, status, key (NULL when no Idempotency-Key), job, step (from the key), n (?n=)
cr_load_access_log() {
    local table=$1
    cr_sql_must "CREATE TABLE ${table}_raw (line text);
                 CREATE TABLE $table (t numeric, started numeric, uri text, status int,
                    key text, job bigint, step int, n int)" >/dev/null
    jl_psql -c "COPY ${table}_raw FROM STDIN WITH (FORMAT text, DELIMITER E'\\x01')" \
        <"$JL_MOCK_LOG" >/dev/null || return 1
    cr_sql_must "INSERT INTO $table
        SELECT m[1]::numeric, m[1]::numeric - m[6]::numeric, m[3], m[4]::int,
               nullif(m[5], '-'), j.id, k[2]::int,
               (regexp_match(m[3], '[?&]n=(-?[0-9]+)'))[1]::int
          FROM ${table}_raw
               CROSS JOIN LATERAL regexp_match(line, '^([0-9.]+) \\S+ \\S+ \"(\\S+) (\\S+)\" ([0-9]+) [0-9]+ \"([^\"]*)\" ([0-9.]+)\$') m
               LEFT JOIN LATERAL regexp_match(m[5], '^jobloop-([0-9a-f-]{36})-([0-9]+)\$') k ON true
               LEFT JOIN (SELECT id, key_token FROM jobloop.job UNION ALL SELECT id, key_token FROM jobloop.finished_job) j ON j.key_token = k[1]::uuid" >/dev/null
}

# The disruption times as a SQL array literal of numerics.
cr_events_sql() {
    local IFS=,
    echo "ARRAY[${CR_EVENTS[*]:-NULL}]::numeric[]"
}

# The generation boundaries: when the server log says every process of the old generation
# is gone ("all server processes terminated; reinitializing" after a backend crash,
# "database system is shut down" after a stop), as epoch seconds, one a line.  Every
# request an old worker started began before its boundary, and every request of the
# workers started after it began later, so a boundary splits the access log exactly,
# where the script's own timestamps (taken just before kill or pg_ctl stop) are only close.
cr_boundaries() {
    local d t z rest
    grep -E 'all server processes terminated; reinitializing|database system is shut down' "$JL_PGLOG" \
        | while read -r d t z rest; do
            date -d "$d $t $z" +%s.%N
        done
}

cr_boundaries_sql() {
    local b
    b=$(cr_boundaries | paste -sd, -)
    echo "ARRAY[${b:-NULL}]::numeric[]"
}

# Crashes we did not cause: a backend killed by any signal but our SIGKILLs, or a PANIC.
cr_unexpected_crashes() {
    grep -E 'terminated by signal|PANIC' "$JL_PGLOG" | grep -v 'terminated by signal 9: Killed' || true
}

# cr_disrupt TOTAL T1 T2 T3 T4: kill -9 worker 1, worker 2, worker 1, then an immediate
# shutdown + start, each once TOTAL-step progress passes its threshold Ti (and there was
# progress since the workers came back from the previous one); one TAP test per
# disruption, and one that every disruption struck while jobs were unfinished.
cr_disrupt() {
    local total=$1 i ev desc before unfinished after=0 mid_run=0
    shift
    local thresholds=("$@")
    local events=("kill:jobloop worker 1" "kill:jobloop worker 2" "kill:jobloop worker 1" "restart")
    for i in "${!events[@]}"; do
        ev=${events[i]}
        desc="${ev/:/ -9 }"
        [[ $ev == restart ]] && desc="pg_ctl stop -m immediate + start"
        if ! cr_wait_progress "${thresholds[i]}" "$after" 60; then
            tap_ok 1 "$desc after progress" "no progress past $after (threshold ${thresholds[i]}) within 60 s"
            continue
        fi
        before=$(cr_progress || true)
        unfinished=$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE status IN ('pending', 'running')" || true)
        [[ -n "$unfinished" && "$unfinished" -gt 0 ]] && mid_run=$((mid_run + 1))
        if [[ $ev == restart ]]; then
            if cr_restart_immediate; then
                tap_ok 0 "$desc at $before/$total steps ($unfinished jobs unfinished); workers back"
            else
                tap_ok 1 "$desc at $before/$total steps" "server or workers did not come back"
            fi
        else
            if cr_kill_worker "${ev#kill:}"; then
                tap_ok 0 "$desc (pid $CR_KILLED_PID) at $before/$total steps ($unfinished jobs unfinished); all workers restarted"
            else
                tap_ok 1 "$desc at $before/$total steps" "workers did not come back within 60 s: $(cr_worker_pids | tr '\n' ' ')"
            fi
        fi
        after=$(cr_progress || echo 0)
        [[ -n "$after" ]] || after=0
    done
    tap_is "$mid_run" "${#events[@]}" "every disruption struck while jobs were unfinished"
}
