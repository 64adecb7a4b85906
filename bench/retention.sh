#!/usr/bin/env bash
#
# bench/retention.sh -- what retention and finishing a job cost with finished jobs in
# jobloop.finished_job, partitioned by finished_at (0.5.0): dropping one day of
# BENCH_RETENTION_ROWS finished jobs (714,233 by default, bench/scale.sh's 5M rows over 7
# days) against deleting it row by row from jobloop.job as before 0.5.0, and finishing
# jobs with the move trigger against finishing them in place (bench/retention.sql).
#
# A throw-away cluster without workers (jobloop.workers = 0: nothing else writes), fsync
# on, autovacuum off; about a minute on 2 cores.
#
#   bench/retention.sh
#   BENCH_RETENTION_ROWS=100000 BENCH_BUILD=0 bench/retention.sh    quick, installed build
#
# Output: bench/results/retention-<UTC timestamp>.txt (and on stdout).

set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
BENCH=$JL_ROOT/bench
BENCH_BUILD=${BENCH_BUILD:-1}
ROWS=${BENCH_RETENTION_ROWS:-714233}
ROUNDS=${BENCH_RETENTION_ROUNDS:-10}
OUT_ROOT=${BENCH_OUT:-$BENCH/results}
mkdir -p "$OUT_ROOT"
out=$OUT_ROOT/retention-$(date -u +%Y%m%d-%H%M%S).txt

jl_install_deps
[[ "$BENCH_BUILD" == 1 ]] && jl_build
jl_cluster_start "jobloop.workers = 0" "fsync = on" "synchronous_commit = on" \
    "shared_buffers = 256MB" "max_wal_size = 8GB" "checkpoint_timeout = 30min" "autovacuum = off"

{
    echo "# bench/retention.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${BENCH_COMMIT:-$(git -C "$JL_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')},"
    echo "# PostgreSQL $("$JL_PGBIN/postgres" -V | awk '{print $3}'), $ROWS finished jobs a day, $ROUNDS x 1,000 jobs per finish round"
    jl_psql -v n="$ROWS" -v rounds="$ROUNDS" -f "$BENCH/retention.sql" 2>&1
} | tee "$out"
jl_log "written to $out"
