--
-- retention: a job moves from jobloop.job to jobloop.finished_job when it finishes
-- (completed, failed, cancelled) and back when it is retried; finished_job is
-- partitioned by finished_at, and retention drops whole partitions
-- (jobloop.maintain_finished_partitions_step, which the workers run at each heartbeat
-- with jobloop.retention, one step per transaction; here all steps with a fixed clock).
-- The counts of jobloop.stats agree with count(*) throughout.  No worker serves this database.
--
\set SHOW_CONTEXT never
CREATE FUNCTION ret_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION ret_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('ret_kind', 'ret_req(jsonb)', 'ret_step(jsonb,jsonb)') IS NOT NULL AS created;
TRUNCATE jobloop.job, jobloop.finished_job;

-- Where each job of ours is: jobloop.job, a partition, or the default partition.
CREATE VIEW ret_where AS
    SELECT id, 'job' AS place, status FROM jobloop.job
    UNION ALL
    SELECT id, CASE WHEN tableoid = 'jobloop.finished_job_default'::regclass THEN 'default'
                    ELSE 'partition' END, status
      FROM jobloop.finished_job;
-- stats and count(*) in one statement
CREATE VIEW ret_counts AS
    SELECT s.pending = c.pending AND s.running = c.running AND s.completed = c.completed
           AND s.failed = c.failed AND s.cancelled = c.cancelled AS agree,
           s.pending, s.running, s.completed, s.failed, s.cancelled
      FROM jobloop.stats s,
           (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                   count(*) FILTER (WHERE status = 'running') AS running,
                   count(*) FILTER (WHERE status = 'completed') AS completed,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled
              FROM jobloop.jobs) c;

\set VERBOSITY terse
SELECT jobloop.submit('ret_kind', '{"n": 1}', unique_key => 'ret-a') AS a \gset
\set VERBOSITY default
SELECT jobloop.submit('ret_kind', '{"n": 2}', unique_key => 'ret-b') AS b \gset
SELECT jobloop.submit('ret_kind', '{"n": 3}', unique_key => 'ret-c') AS c \gset
SELECT jobloop.submit('ret_kind', '{"n": 4}') AS d \gset
SELECT key_token AS b_token FROM jobloop.job WHERE id = :b \gset

-- As the workers finish jobs (src/store.c, store_update_jobs): one statement, several
-- rows, some finishing; and store_fail_job.  A step that finishes nothing moves nothing.
UPDATE jobloop.job SET status = CASE WHEN id = :a THEN 'completed' ELSE 'running' END,
       step = step + 1, worker = NULL,
       finished_at = CASE WHEN id = :a THEN now() END, updated_at = now()
 WHERE id IN (:a, :d);
UPDATE jobloop.job SET status = 'failed', last_error = 'boom', worker = NULL, request = NULL,
       finished_at = now(), updated_at = now()
 WHERE id = :b;
SELECT jobloop.cancel(:c);
SELECT id = :a AS a, id = :b AS b, id = :c AS c, place, status FROM ret_where ORDER BY id;
-- What finished stays finished: cancel() says so, status() and wait() find it.
SELECT jobloop.cancel(:a) AS cancel_completed, jobloop.cancel(:c) AS cancel_cancelled;
SELECT status, step, last_error, finished_at IS NOT NULL AS finished, paused FROM jobloop.status(:b);
SELECT jobloop.wait(:a, '0');
SELECT failed, last_error FROM jobloop.errors WHERE kind = 'ret_kind';
SELECT * FROM ret_counts;

-- retry() moves a failed or cancelled job back, with its id, step, key token and
-- unique_key; not a completed one, and not while another job holds its unique_key.
SELECT jobloop.retry(:a) AS retry_completed;
SELECT jobloop.retry(:b);
SELECT status, step, attempts, last_error, finished_at, key_token = :'b_token' AS same_token,
       unique_key
  FROM jobloop.job WHERE id = :b;
SELECT jobloop.submit('ret_kind', '{"n": 5}', unique_key => 'ret-c') <> :c AS key_free_again;
SELECT jobloop.retry(:c);
SELECT place, status FROM ret_where WHERE id = :c;
SELECT * FROM ret_counts;

-- Partitions: about ten cover the retention (a lookup by id locks every one), from a
-- minute to 30 days; 30 days when retention is 0 (forever).
SELECT r, jobloop.finished_job_width(r::interval)
  FROM unnest(ARRAY['0', '1 minute', '10 minutes', '11 minutes', '3 hours', '2 days', '7 days',
                    '30 days', '365 days', '3650 days']) r;
CREATE VIEW ret_partitions AS
    SELECT partition, lower_bound AT TIME ZONE 'UTC' AS lower_utc, upper_bound AT TIME ZONE 'UTC' AS upper_utc
      FROM jobloop.finished_job_partitions();
-- the partitions leave no gap between the first and the last
CREATE VIEW ret_contiguous AS
    SELECT count(*) AS partitions,
           count(*) FILTER (WHERE next_lower IS NOT NULL AND next_lower <> upper_bound) AS gaps
      FROM (SELECT upper_bound, lead(lower_bound) OVER (ORDER BY lower_bound) AS next_lower
              FROM jobloop.finished_job_partitions()) p;
CREATE FUNCTION ret_maintain(retention interval, at timestamptz)
RETURNS TABLE (action text, status text, part text, lower_utc timestamp, upper_utc timestamp, jobs bigint)
LANGUAGE sql AS $$
    SELECT m.action, m.status, m.partition, m.lower_bound AT TIME ZONE 'UTC', m.upper_bound AT TIME ZONE 'UTC', m.jobs
      FROM jobloop.maintain_finished_partitions(retention, at) m
$$;
-- now and two widths ahead, aligned in UTC, named after their lower bound in UTC,
-- whatever the session's DateStyle and TimeZone
SET DateStyle = 'SQL, DMY';
SET TimeZone = 'Asia/Kathmandu';
SELECT * FROM ret_maintain('7 days', '2026-01-15 10:20:30+00');
SELECT * FROM ret_maintain('7 days', '2026-01-15 10:20:30+00') AS again;
SELECT * FROM ret_partitions;
RESET DateStyle;
RESET TimeZone;
-- A partition has finished_job's columns, constraints and indexes, and its owner; app
-- roles read it only through finished_job.
SELECT c.relowner = p.relowner AS same_owner, c.relrowsecurity,
       (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid) AS indexes,
       (SELECT count(*) FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'c') AS checks,
       has_table_privilege('jobloop_admin', c.oid, 'SELECT') AS admin_reads,
       has_table_privilege('public', c.oid, 'SELECT') AS public_reads
  FROM pg_class c, pg_class p
 WHERE c.oid = 'jobloop.finished_job_20260115_000000'::regclass AND p.oid = 'jobloop.finished_job'::regclass;

-- Rows go to the partition of their finished_at, or to the default partition.  Rows
-- written straight into a partition (as pg_restore's COPY does) are counted too.
INSERT INTO jobloop.finished_job (id, kind, owner, status, state, finished_at)
SELECT 900000 + i, 'ret_kind', current_user::regrole, CASE WHEN i % 2 = 0 THEN 'completed' ELSE 'failed' END,
       '{}', '2026-01-15 12:00:00+00'::timestamptz + i * interval '1 minute'
  FROM generate_series(1, 3) i;
INSERT INTO jobloop.finished_job_20260116_000000 (id, kind, owner, status, state, finished_at)
VALUES (900004, 'ret_kind', current_user::regrole, 'cancelled', '{}', '2026-01-16 01:00:00+00');
INSERT INTO jobloop.finished_job (id, kind, owner, status, state, finished_at)
VALUES (900005, 'ret_kind', current_user::regrole, 'completed', '{}', '2026-01-10 00:00:00+00'),
       (900006, 'ret_kind', current_user::regrole, 'completed', '{}', '2026-05-01 10:00:00+00');
SELECT id, place, status FROM ret_where WHERE id > 900000 ORDER BY id;
SELECT * FROM ret_counts;

-- Retention detaches every partition whose upper bound is retention ago (a catalog
-- change under finished_job's lock), then counts its jobs out of jobloop.stats (a DROP
-- fires no trigger) and drops it: one lock of finished_job per action.  A partition that
-- cannot be dropped (here a view depends on it) says why in a WARNING and the others go
-- on; it is dropped once it can be.
CREATE VIEW ret_blocker AS SELECT count(*) FROM jobloop.finished_job_20260116_000000;
SELECT * FROM ret_maintain('7 days', '2026-01-24 00:00:01+00');
SELECT * FROM ret_partitions;
SELECT relname, obj_description(oid, 'pg_class') FROM pg_class WHERE relname = 'finished_job_20260116_000000';
SELECT id, place, status FROM ret_where WHERE id > 900000 ORDER BY id;
-- (until it is dropped, jobloop.stats still counts the jobs of the detached one)
SELECT * FROM ret_counts;
DROP VIEW ret_blocker;
SELECT * FROM ret_maintain('7 days', '2026-01-24 00:00:01+00');
SELECT * FROM ret_counts;
-- With retention 0, nothing is dropped.
SELECT count(*) AS dropped FROM ret_maintain('0', '2026-02-10 00:00:00+00') WHERE action <> 'make';

-- Where the default partition already holds rows of a range (they finished while no
-- partition covered it), the partition covers what comes after the last of them, so
-- that it can be attached: those rows stay in the default partition.
SELECT * FROM ret_maintain('7 days', '2026-05-01 10:20:30+00');
SELECT * FROM ret_partitions WHERE lower_utc >= '2026-05-01';
SELECT * FROM ret_counts;

-- A narrower width (retention changed) where wider partitions exist: only what they do
-- not cover; then minutes.
SELECT * FROM ret_maintain('3 hours', '2026-05-03 22:20:30+00');
SELECT * FROM ret_maintain('10 minutes', '2026-05-04 01:20:30+00');
-- A wider width again: the gaps between the narrow partitions are filled, cut at its
-- boundaries, so no finished job falls to the default partition.
SELECT * FROM ret_maintain('7 days', '2026-05-04 01:21:30+00');
SELECT * FROM ret_contiguous;
-- A table in the way of a partition (a name taken by hand): a WARNING, and the other
-- partitions are made.
CREATE TABLE jobloop.finished_job_20260601_000000 (x int);
SELECT * FROM ret_maintain('7 days', '2026-06-01 12:00:00+00');
DROP TABLE jobloop.finished_job_20260601_000000;
SELECT * FROM ret_maintain('7 days', '2026-06-01 12:00:00+00');
SELECT * FROM ret_partitions WHERE lower_utc >= '2026-05-04';

-- What no partition covers is deleted row by row by the workers (store_delete_expired):
-- the default partition's expired rows, and finished jobs still in jobloop.job (they
-- finished before 0.5.0, when jobs did not move; made here with the move switched off).
ALTER TABLE jobloop.job DISABLE TRIGGER job_move_finished;
UPDATE jobloop.job SET status = 'completed', finished_at = now() - interval '8 days' WHERE id = :d;
ALTER TABLE jobloop.job ENABLE TRIGGER job_move_finished;
SELECT place, status FROM ret_where WHERE id = :d;
SELECT jobloop.cancel(:d) AS cancel_old_finished;
DELETE FROM jobloop.job WHERE id IN (
  SELECT id FROM jobloop.job
   WHERE finished_at < now() - make_interval(secs => 7 * 86400)
   ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED);
DELETE FROM jobloop.finished_job_default WHERE ctid = ANY (ARRAY(
  SELECT ctid FROM jobloop.finished_job_default
   WHERE finished_at < now() - make_interval(secs => 7 * 86400)
   ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED));
SELECT id = :d AS d, place, status FROM ret_where ORDER BY id;
SELECT * FROM ret_counts;

-- A role sees its own finished jobs, through jobloop.jobs and finished_job; not the
-- partitions themselves.
CREATE ROLE regress_jobloop_ret_app;
GRANT USAGE ON SCHEMA public, jobloop TO regress_jobloop_ret_app;
GRANT EXECUTE ON FUNCTION ret_req(jsonb), ret_step(jsonb, jsonb) TO regress_jobloop_ret_app;
SET ROLE regress_jobloop_ret_app;
\set VERBOSITY terse
SELECT jobloop.submit('ret_kind', '{"app": true}') AS app_job \gset
\set VERBOSITY default
SELECT jobloop.cancel(:app_job);
SELECT count(*) AS my_jobs, count(*) FILTER (WHERE status = 'cancelled') AS my_cancelled FROM jobloop.jobs;
SELECT count(*) AS my_finished FROM jobloop.finished_job;
SELECT count(*) FROM jobloop.finished_job_default;
SELECT count(*) FROM jobloop.finished_job_20260601_000000;
SELECT jobloop.retry(:app_job);
SELECT status FROM jobloop.status(:app_job);
RESET ROLE;

-- drop_kind deletes the kind's jobs from both tables.
SELECT count(jobloop.cancel(id)) AS cancelled FROM jobloop.job WHERE kind = 'ret_kind';
SELECT jobloop.drop_kind('ret_kind');
SELECT count(*) AS jobs_left FROM jobloop.jobs;
SELECT * FROM ret_counts;

DROP VIEW ret_where, ret_counts, ret_partitions, ret_contiguous;
DROP FUNCTION ret_maintain(interval, timestamptz);
REVOKE ALL ON SCHEMA public, jobloop FROM regress_jobloop_ret_app;
REVOKE ALL ON FUNCTION ret_req(jsonb), ret_step(jsonb, jsonb) FROM regress_jobloop_ret_app;
DROP ROLE regress_jobloop_ret_app;
DROP FUNCTION ret_req(jsonb), ret_step(jsonb, jsonb);
