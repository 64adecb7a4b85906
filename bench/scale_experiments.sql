-- bench/scale_experiments.sql -- changes that need only SQL, tried on bench/scale.sh's
-- throw-away cluster at its largest size (never on the extension's own scripts):
--
--   E0  the monitoring queries as they are (server-side time, median of :repeat runs)
--   E1  a partial index of the unfinished jobs: the retrying-jobs query and the pending /
--       running counts touch only the queue
--   E2  a partial index of the failed jobs by finished_at: jobloop.errors
--   E3  retention: the workers' delete loop (store_delete_expired, 1,000 rows a batch) and
--       the VACUUM it makes necessary, against dropping a daily partition of finished jobs;
--       and what moving a job into such a partition when it finishes costs against the
--       in-place UPDATE done today
-- E4 is bench/scale_counters.sql.  bench/scale.sh runs the burst again after this file
-- (with E1's and E2's indexes in place) and after E4 (with the triggers too).

\set ON_ERROR_STOP 1
\pset pager off
\if :{?repeat}
\else
\set repeat 3
\endif

CREATE SCHEMA jobloop_x;

-- Median server-side time of running a query n times, fetching every row and column.
CREATE FUNCTION jobloop_x.time_ms(q text, n integer DEFAULT 3) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    t  double precision[] := '{}';
    t0 timestamptz;
    r  record;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        FOR r IN EXECUTE q LOOP
            NULL;
        END LOOP;
        t := t || extract(epoch FROM clock_timestamp() - t0) * 1000;
    END LOOP;
    RETURN round((SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY x) FROM unnest(t) x)::numeric, 2);
END
$$;

CREATE TABLE jobloop_x.q (name text PRIMARY KEY, sql text NOT NULL);
INSERT INTO jobloop_x.q VALUES
    ('stats',        'SELECT * FROM jobloop.stats'),
    ('errors',       'SELECT * FROM jobloop.errors'),
    ('retrying',     'SELECT id, kind, tenant, step, last_error, updated_at FROM jobloop.jobs WHERE status = ''running'' AND last_error IS NOT NULL'),
    ('limits',       'SELECT * FROM jobloop.limits'),
    ('worker_stats', 'SELECT * FROM jobloop.worker_stats()');

SELECT count(*) AS rows, pg_size_pretty(pg_table_size('jobloop.job')) AS table,
       pg_size_pretty(pg_indexes_size('jobloop.job')) AS indexes
  FROM jobloop.job;
SELECT status, count(*) FROM jobloop.job GROUP BY 1 ORDER BY 1;

\echo '######## E0: the monitoring queries as they are, ms'
SELECT name, jobloop_x.time_ms(sql, :repeat) AS ms FROM jobloop_x.q ORDER BY name;

\echo '######## E1: CREATE INDEX ... (status) WHERE status IN (pending, running)'
\timing on
CREATE INDEX job_x_unfinished_idx ON jobloop.job (status)
    WHERE status = ANY (ARRAY['pending', 'running']);
\timing off
ANALYZE jobloop.job;
SELECT pg_size_pretty(pg_relation_size('jobloop.job_x_unfinished_idx')) AS index_size;
SELECT name, jobloop_x.time_ms(sql, :repeat) AS ms FROM jobloop_x.q
 WHERE name IN ('retrying', 'stats') ORDER BY name;
EXPLAIN (ANALYZE, BUFFERS) SELECT id, kind, tenant, step, last_error, updated_at FROM jobloop.jobs
 WHERE status = 'running' AND last_error IS NOT NULL;
SELECT jobloop_x.time_ms($$SELECT (SELECT count(*) FROM jobloop.job WHERE status = 'pending'),
                                  (SELECT count(*) FROM jobloop.job WHERE status = 'running')$$, :repeat)
       AS pending_and_running_counts_ms;

\echo '######## E2: CREATE INDEX ... (finished_at) WHERE status = failed'
\timing on
CREATE INDEX job_x_failed_idx ON jobloop.job (finished_at) WHERE status = 'failed';
\timing off
ANALYZE jobloop.job;
SELECT pg_size_pretty(pg_relation_size('jobloop.job_x_failed_idx')) AS index_size;
SELECT name, jobloop_x.time_ms(sql, :repeat) AS ms FROM jobloop_x.q WHERE name = 'errors';
EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM jobloop.errors;
-- the same view with the newest error taken by one index probe per kind instead of
-- sorting every failure of the day
CREATE VIEW jobloop_x.errors AS
    SELECT k.kind, k.failed,
           (SELECT j.last_error FROM jobloop.job j
             WHERE j.status = 'failed' AND j.kind = k.kind
               AND j.finished_at > now() - interval '1 day'
             ORDER BY j.finished_at DESC LIMIT 1) AS last_error,
           k.last_failed_at
      FROM (SELECT j.kind, count(*) AS failed, max(j.finished_at) AS last_failed_at
              FROM jobloop.job j
             WHERE j.status = 'failed' AND j.finished_at > now() - interval '1 day'
             GROUP BY j.kind) k;
SELECT jobloop_x.time_ms('SELECT * FROM jobloop_x.errors', :repeat) AS errors_rewritten_ms;

\echo '######## E3: retention -- the delete loop against dropping a partition'
-- (a) the workers' statement (src/store.c, store_delete_expired), 50 batches of 1,000,
-- with a retention that leaves the newest days: rows/s, WAL per row, and the VACUUM the
-- dead rows then need (it reads every index of the table).
CREATE FUNCTION jobloop_x.delete_loop(batches integer, retention_s integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    total integer := 0;
BEGIN
    FOR i IN 1..batches LOOP
        DELETE FROM jobloop.job WHERE id IN (
            SELECT id FROM jobloop.job
             WHERE finished_at < now() - make_interval(secs => retention_s)
             ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
SELECT jobloop_x.delete_loop(50, 86400 * 5) AS deleted \gset
SELECT :deleted AS deleted,
       round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS delete_ms,
       round(:deleted / extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)) AS rows_per_s,
       round(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0') / greatest(:deleted, 1)) AS wal_bytes_per_row;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
VACUUM (VERBOSE) jobloop.job;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS vacuum_after_the_deletes_ms,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0')) AS vacuum_wal;

-- (b) the same rows in a table partitioned by day of finished_at, with the indexes the
-- finished jobs need (id, kind, finished_at): one day's partition is dropped at once.
CREATE TABLE jobloop_x.finished (LIKE jobloop.job INCLUDING DEFAULTS)
    PARTITION BY RANGE (finished_at);
SELECT format('CREATE TABLE jobloop_x.finished_d%s PARTITION OF jobloop_x.finished
                 FOR VALUES FROM (%L) TO (%L)', d, date_trunc('day', now()) - (d || ' days')::interval,
              date_trunc('day', now()) - ((d - 1) || ' days')::interval)
  FROM generate_series(0, 8) AS d \gexec
CREATE TABLE jobloop_x.finished_old PARTITION OF jobloop_x.finished
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now()) - interval '8 days');
\echo 'copy one day of finished jobs into its partition, and index them:'
\timing on
INSERT INTO jobloop_x.finished SELECT * FROM jobloop.job
 WHERE finished_at >= date_trunc('day', now()) - interval '4 days'
   AND finished_at < date_trunc('day', now()) - interval '3 days';
CREATE INDEX ON jobloop_x.finished (id);
CREATE INDEX ON jobloop_x.finished (kind);
CREATE INDEX ON jobloop_x.finished (finished_at);
\timing off
SELECT c.relname, c.reltuples::bigint, pg_size_pretty(pg_total_relation_size(c.oid)) AS size
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'jobloop_x.finished'::regclass AND pg_total_relation_size(c.oid) > 16384
 ORDER BY 1;
SELECT relname AS oldest_full_day, (SELECT count(*) FROM jobloop_x.finished_d4) AS rows
  FROM pg_class WHERE oid = 'jobloop_x.finished_d4'::regclass;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
ALTER TABLE jobloop_x.finished DETACH PARTITION jobloop_x.finished_d4;
DROP TABLE jobloop_x.finished_d4;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS detach_and_drop_day_ms,
       pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0') AS wal_bytes;

-- (c) what a finish costs: the in-place UPDATE of today, against moving the row into the
-- partitioned table of finished jobs (DELETE ... RETURNING into INSERT), 10 x 1,000 jobs.
-- On a copy of jobloop.job's definition (its indexes too), so that no worker sees these
-- rows.
CREATE TABLE jobloop_x.hot (LIKE jobloop.job INCLUDING ALL) WITH (fillfactor = 80);
INSERT INTO jobloop_x.hot (kind, owner, tenant, status, step, state, worker, started_at, lease_expires_at)
SELECT 'archive', 'postgres'::regrole, 'tenant-' || (g % 100), 'running', 3,
       jsonb_build_object('order', 'ord-move-' || g, 'n', 3, 'k', 5, 'note', repeat('x', 100)),
       1 + g % 2, now(), now() + interval '1 hour'
  FROM generate_series(1, 20000) AS g;
VACUUM ANALYZE jobloop_x.hot;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
DO $$
DECLARE
    base bigint := (SELECT min(id) FROM jobloop_x.hot);
BEGIN
    FOR i IN 0..9 LOOP
        UPDATE jobloop_x.hot SET status = 'completed', worker = NULL, lease_expires_at = NULL,
               request = NULL, finished_at = now(), updated_at = now(), step = step + 1
         WHERE id >= base + i * 1000 AND id < base + (i + 1) * 1000;
        COMMIT;
    END LOOP;
END
$$;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS finish_in_place_10k_ms,
       pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0') / 10000 AS wal_bytes_per_job;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
DO $$
DECLARE
    base bigint := (SELECT min(id) FROM jobloop_x.hot) + 10000;
BEGIN
    FOR i IN 0..9 LOOP
        WITH moved AS (
            DELETE FROM jobloop_x.hot
             WHERE id >= base + i * 1000 AND id < base + (i + 1) * 1000
            RETURNING id, kind, owner, tenant, step, state, last_error, attempts, run_after,
                      created_at, started_at, key_token, unique_key)
        INSERT INTO jobloop_x.finished (id, kind, owner, tenant, status, step, state, last_error,
                                        attempts, run_after, created_at, updated_at, started_at,
                                        finished_at, key_token, unique_key)
        SELECT id, kind, owner, tenant, 'completed', step + 1, state, last_error, attempts,
               run_after, created_at, now(), started_at, now(), key_token, unique_key
          FROM moved;
        COMMIT;
    END LOOP;
END
$$;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS finish_by_move_10k_ms,
       pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0') / 10000 AS wal_bytes_per_job;
DROP TABLE jobloop_x.hot;
