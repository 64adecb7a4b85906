-- bench/retention.sql -- what retention and finishing cost with finished jobs in
-- jobloop.finished_job, partitioned by finished_at (0.5.0), against rows deleted from
-- jobloop.job (bench/retention.sh runs it on a cluster without workers).
--
--   (a) one day of :n finished jobs (90% completed, 7% failed, 3% cancelled, a ~200-byte
--       state, as bench/scale_fill.sql), in jobloop.job as before 0.5.0: the workers'
--       delete loop (src/store.c, store_delete_expired: 1,000 rows a statement) until
--       the day is gone, then the VACUUM the dead rows need
--   (b) the same day in its partition of jobloop.finished_job: the workers' retention
--       (jobloop.maintain_finished_partitions: count the partition's jobs out of
--       jobloop.stats, then DROP it), and the count alone
--   (c) what finishing costs: :rounds x 1,000 running jobs finished by the workers'
--       UPDATE, with the move trigger (0.5.0) and with it disabled (the row stays, as
--       before 0.5.0); and the same rows moved by one statement (DELETE ... RETURNING
--       into INSERT), as store_update_jobs could do it without the trigger
-- Each phase starts after a CHECKPOINT, so that each pays the same full-page images
-- (and each finishing round after a VACUUM of jobloop.job).

\set ON_ERROR_STOP 1
\pset footer off
\if :{?n}
\else
\set n 714233
\endif
\if :{?rounds}
\else
\set rounds 10
\endif

CREATE EXTENSION IF NOT EXISTS jobloop;
CREATE SCHEMA IF NOT EXISTS bench;
CREATE OR REPLACE FUNCTION bench.request(s jsonb) RETURNS jsonb LANGUAGE sql
    RETURN jsonb_build_object('url', 'http://127.0.0.1:1/');
CREATE OR REPLACE FUNCTION bench.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql RETURN s;
CREATE OR REPLACE FUNCTION bench.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN true;
SELECT jobloop.create_kind('archive', 'bench.request(jsonb)', 'bench.step(jsonb,jsonb)',
                           'bench.done(jsonb)') IS NOT NULL AS kind_created;

-- A day of finished jobs, in time order, the day 2026-01-10 (UTC): long expired.
CREATE OR REPLACE FUNCTION bench.day_of_jobs(n integer, base bigint)
RETURNS TABLE (id bigint, kind text, owner regrole, tenant text, status text, step integer,
               state jsonb, last_error text, attempts integer, run_after timestamptz,
               created_at timestamptz, updated_at timestamptz, started_at timestamptz,
               finished_at timestamptz)
LANGUAGE sql AS $$
    SELECT base + g, 'archive', 'postgres'::regrole, 'tenant-' || lpad((g % 1000)::text, 4, '0'), st,
           1 + g % 20,
           jsonb_build_object('order', 'ord-' || lpad((base + g)::text, 12, '0'), 'n', 1 + g % 20,
                              'k', 20, 'amount', (g % 100000) / 100.0, 'currency', 'EUR',
                              'psp_ref', md5(g::text), 'note', 'a finished job of the retention bench'),
           CASE st WHEN 'failed' THEN 'HTTP 422 from the API at step ' || (1 + g % 20) END,
           CASE st WHEN 'failed' THEN 3 ELSE 0 END,
           fin - interval '40 seconds', fin - interval '40 seconds', fin, fin - interval '39 seconds', fin
      FROM (SELECT g, CASE WHEN r < 0.90 THEN 'completed' WHEN r < 0.97 THEN 'failed'
                           ELSE 'cancelled' END AS st,
                   '2026-01-10 00:00:00+00'::timestamptz + make_interval(secs => 86399.0 * g / n) AS fin
              FROM (SELECT g, random() AS r FROM generate_series(1, n) g) x) y
$$;

\echo '######## (a) the delete loop, on jobloop.job (finished jobs as before 0.5.0)'
SELECT clock_timestamp() AS t0 \gset
INSERT INTO jobloop.job (kind, owner, tenant, status, step, state, last_error, attempts,
                         run_after, created_at, updated_at, started_at, finished_at)
SELECT kind, owner, tenant, status, step, state, last_error, attempts, run_after, created_at,
       updated_at, started_at, finished_at
  FROM bench.day_of_jobs(:n, 0);
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS load_counted_by_statement_ms;
VACUUM ANALYZE jobloop.job;
SELECT pg_size_pretty(pg_table_size('jobloop.job')) AS job_table,
       pg_size_pretty(pg_indexes_size('jobloop.job')) AS job_indexes;
CREATE OR REPLACE PROCEDURE bench.delete_loop(INOUT deleted bigint, INOUT statements integer)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    deleted := 0; statements := 0;
    LOOP
        DELETE FROM jobloop.job WHERE id IN (
            SELECT id FROM jobloop.job
             WHERE finished_at < now() - make_interval(secs => 7 * 86400)
             ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS k = ROW_COUNT;
        deleted := deleted + k; statements := statements + 1;
        COMMIT;
        EXIT WHEN k < 1000;
    END LOOP;
END
$$;
CHECKPOINT;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
CALL bench.delete_loop(0, 0);
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS delete_loop_ms,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0')) AS delete_loop_wal,
       round(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0') / :n) AS wal_bytes_per_job;
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
VACUUM jobloop.job;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS vacuum_after_ms,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0')) AS vacuum_wal;

\echo '######## (b) dropping the day''s partition of jobloop.finished_job'
SELECT count(*) AS made FROM jobloop.maintain_finished_partitions('7 days', '2026-01-10 12:00:00+00') WHERE status = 'made';
-- Written by a session, not by the move trigger, so counted row by row (as pg_restore's
-- COPY into a partition is): what that costs, against the same rows through the parent
-- with the row trigger off and the jobs counted once (the statement trigger).
SELECT clock_timestamp() AS t0 \gset
INSERT INTO jobloop.finished_job (id, kind, owner, tenant, status, step, state, last_error, attempts,
                                  run_after, created_at, updated_at, started_at, finished_at)
SELECT * FROM bench.day_of_jobs(:n, 100000000);
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS load_counted_by_row_ms,
       (SELECT count(*) FROM jobloop.job_count_change) AS count_change_rows;
-- ... which the workers' fold (src/store.c, store_fold_counts) sums into job_count; here
-- all of them in one statement (the workers take at most 500 a turn since 40499b0)
SELECT clock_timestamp() AS t0 \gset
WITH moved AS (
    DELETE FROM jobloop.job_count_change
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM jobloop.job_count_change FOR UPDATE SKIP LOCKED))
    RETURNING owner, status, n)
INSERT INTO jobloop.job_count AS c (owner, status, n)
SELECT owner, status, sum(n) FROM moved GROUP BY owner, status ORDER BY owner, status
ON CONFLICT (owner, status) DO UPDATE SET n = c.n + excluded.n;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000) AS fold_of_those_rows_ms;
VACUUM ANALYZE jobloop.finished_job_20260110_000000;
SELECT (SELECT count(*) FROM jobloop.finished_job_20260110_000000) AS partition_rows,
       pg_size_pretty(pg_total_relation_size('jobloop.finished_job_20260110_000000')) AS partition_size;
-- the partitions retention makes at that time, made first: only the drop is measured
SELECT count(*) AS made FROM jobloop.maintain_finished_partitions('0', '2026-01-18 00:00:01+00') WHERE status = 'made';
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) FROM (SELECT owner, status, count(*) FROM jobloop.finished_job_20260110_000000
                       GROUP BY owner, status) c;
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS count_out_alone_ms;
CHECKPOINT;
-- the workers' two steps, each a transaction of its own (as src/server/retention.c runs
-- them): the detach, the only one that locks finished_job (ACCESS EXCLUSIVE), then the
-- count-out and DROP of the detached table
SELECT pg_current_wal_lsn() AS lsn0, clock_timestamp() AS t0 \gset
SELECT action, status, partition, jobs
  FROM jobloop.maintain_finished_partitions_step('7 days', '2026-01-18 00:00:01+00');
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS detach_ms_finished_job_locked \gset
SELECT action, status, partition, jobs
  FROM jobloop.maintain_finished_partitions_step('7 days', '2026-01-18 00:00:01+00');
SELECT :detach_ms_finished_job_locked AS detach_ms_finished_job_locked,
       round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS retention_drop_ms,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), :'lsn0')) AS retention_drop_wal;
SELECT completed, failed, cancelled FROM jobloop.stats \gset
SELECT :completed + :failed + :cancelled AS finished_jobs_counted,
       (SELECT count(*) FROM jobloop.finished_job) + (SELECT count(*) FROM jobloop.job) AS jobs_there;

\echo '######## (c) finishing 1,000 jobs a statement: the move trigger, in place, a direct move'
CREATE OR REPLACE PROCEDURE bench.running(n integer)
LANGUAGE sql AS $$
    INSERT INTO jobloop.job (kind, owner, tenant, status, step, state, worker, started_at, lease_expires_at)
    SELECT 'archive', 'postgres'::regrole, 'tenant-' || (g % 100), 'running', 3,
           jsonb_build_object('order', 'ord-move-' || g, 'n', 3, 'k', 5, 'note', repeat('x', 100)),
           1, now(), now() + interval '1 hour'
      FROM generate_series(1, n) g;
$$;
-- the workers' finish (store_update_jobs), 1,000 rows a statement, a commit each
CREATE OR REPLACE PROCEDURE bench.finish(rounds integer)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    FOR i IN 1..rounds LOOP
        ids := ARRAY(SELECT id FROM jobloop.job WHERE worker = 1 ORDER BY id LIMIT 1000);
        UPDATE jobloop.job j SET status = 'completed', step = j.step + 1, request = NULL,
               worker = NULL, lease_expires_at = NULL, updated_at = now(), finished_at = now()
         WHERE j.id = ANY (ids);
        COMMIT;
    END LOOP;
END
$$;
CREATE OR REPLACE PROCEDURE bench.move(rounds integer)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    FOR i IN 1..rounds LOOP
        ids := ARRAY(SELECT id FROM jobloop.job WHERE worker = 1 ORDER BY id LIMIT 1000);
        WITH moved AS (DELETE FROM jobloop.job j WHERE j.id = ANY (ids) RETURNING j.*)
        INSERT INTO jobloop.finished_job
        SELECT id, kind, owner, tenant, 'completed', step + 1, state, NULL, last_error, attempts,
               run_after, NULL, NULL, created_at, now(), started_at, now(), key_token, unique_key
          FROM moved;
        COMMIT;
    END LOOP;
END
$$;
SELECT count(*) AS made FROM jobloop.maintain_finished_partitions('7 days') WHERE status = 'made';
CALL bench.running(:rounds * 1000 * 9 + 1000);
VACUUM ANALYZE jobloop.job;
CREATE TEMP TABLE finish_cost (round integer, how text, ms numeric, wal_per_job numeric);
-- one measurement: :rounds statements of 1,000 jobs, ms and WAL bytes per 1,000 jobs
CREATE OR REPLACE PROCEDURE bench.measure(r integer, how text, rounds integer)
LANGUAGE plpgsql AS $$
DECLARE
    lsn0 pg_lsn;
    t0   timestamptz;
BEGIN
    IF how = 'UPDATE in place (before 0.5.0)' THEN
        ALTER TABLE jobloop.job DISABLE TRIGGER job_move_finished;
        COMMIT;
    END IF;
    lsn0 := pg_current_wal_lsn();
    t0 := clock_timestamp();
    IF how = 'DELETE ... RETURNING into INSERT' THEN
        CALL bench.move(rounds);
    ELSE
        CALL bench.finish(rounds);
    END IF;
    INSERT INTO finish_cost
    VALUES (r, how, round(extract(epoch FROM clock_timestamp() - t0) * 1000 / rounds, 1),
            round(pg_wal_lsn_diff(pg_current_wal_lsn(), lsn0) / (rounds * 1000.0)));
    ALTER TABLE jobloop.job ENABLE TRIGGER job_move_finished;
    COMMIT;
END
$$;
\echo 'three rounds of each, alternating, each after a VACUUM and a CHECKPOINT'
SELECT s
  FROM generate_series(1, 3) r,
       (VALUES (1, 'UPDATE + move trigger (0.5.0)'), (2, 'UPDATE in place (before 0.5.0)'),
               (3, 'DELETE ... RETURNING into INSERT')) v(o, how),
       LATERAL (VALUES (0, 'VACUUM jobloop.job'), (1, 'CHECKPOINT'),
                       (2, format('CALL bench.measure(%s, %L, %s)', r, how, :rounds))) c(k, s)
 ORDER BY r, o, k \gexec
SELECT how, string_agg(ms::text, ' / ' ORDER BY round) AS ms_per_1000_jobs,
       string_agg(wal_per_job::text, ' / ' ORDER BY round) AS wal_bytes_per_job
  FROM finish_cost GROUP BY how ORDER BY min(ms);
