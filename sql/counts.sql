--
-- counts: jobloop.stats counts jobs by status from counters kept as jobs change status
-- (jobloop.job_count and job_count_change), not by counting the table: they must agree
-- with count(*) after every kind of change, show a role only the jobs it may see, and
-- survive TRUNCATE and a recount.  (No worker serves this database, so no fold runs
-- unless this file does it.)
--
\set SHOW_CONTEXT never
CREATE FUNCTION counts_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION counts_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('counts_kind', 'counts_req(jsonb)', 'counts_step(jsonb,jsonb)') IS NOT NULL AS created;

-- stats and count(*) in one statement, i.e. one snapshot
CREATE VIEW counts_check AS
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
GRANT SELECT ON counts_check TO PUBLIC;

-- Start from no jobs (earlier files left some, unfinished and finished).
TRUNCATE jobloop.job, jobloop.finished_job;
SELECT * FROM counts_check;
SELECT count(*) AS counters_after_truncate FROM jobloop.job_count_change;

\set VERBOSITY terse
SELECT count(jobloop.submit('counts_kind', jsonb_build_object('i', i))) AS submitted
  FROM generate_series(1, 10) i;
\set VERBOSITY default
SELECT * FROM counts_check;

-- cancel and retry; a statement that changes no status appends nothing
SELECT jobloop.cancel(id) FROM jobloop.job ORDER BY id LIMIT 3;
SELECT jobloop.retry(min(id)) FROM jobloop.jobs WHERE status = 'cancelled';
SELECT count(*) AS changes_before FROM jobloop.job_count_change \gset
UPDATE jobloop.job SET step = step + 1;
SELECT count(*) - :changes_before AS changes_by_a_step_update FROM jobloop.job_count_change;
SELECT * FROM counts_check;

-- what workers do: claim (pending -> running), finish, fail (finished jobs move to
-- jobloop.finished_job); retention deletes
UPDATE jobloop.job SET status = 'running', worker = 1 WHERE id IN (SELECT id FROM jobloop.job WHERE status = 'pending' ORDER BY id LIMIT 4);
UPDATE jobloop.job SET status = 'completed', worker = NULL, finished_at = now() WHERE id IN (SELECT id FROM jobloop.job WHERE status = 'running' ORDER BY id LIMIT 2);
UPDATE jobloop.job SET status = 'failed', worker = NULL, finished_at = now(), last_error = 'x' WHERE id IN (SELECT id FROM jobloop.job WHERE status = 'running' ORDER BY id LIMIT 1);
DELETE FROM jobloop.finished_job WHERE id = (SELECT min(id) FROM jobloop.finished_job WHERE status = 'completed');
SELECT * FROM counts_check;

-- A rolled-back change leaves the counts as they were.
BEGIN;
SELECT count(jobloop.cancel(id)) AS cancelled_in_rollback FROM jobloop.job WHERE status = 'pending';
ROLLBACK;
SELECT * FROM counts_check;

-- The workers' fold (src/store.c, store_fold_counts) moves the changes into job_count;
-- the same statement here.  Then the counts still agree, from job_count alone.
-- (It folds at most 500 rows at a time and says how many it folded.)
WITH moved AS (
    DELETE FROM jobloop.job_count_change
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM jobloop.job_count_change
                             LIMIT 500 FOR UPDATE SKIP LOCKED))
    RETURNING owner, status, n),
 folded AS (SELECT count(*) AS n FROM moved),
 applied AS (
    INSERT INTO jobloop.job_count AS c (owner, status, n)
    SELECT owner, status, sum(n) FROM moved GROUP BY owner, status
     ORDER BY owner, status
    ON CONFLICT (owner, status) DO UPDATE SET n = c.n + excluded.n)
SELECT n > 0 AS folded_some FROM folded;
SELECT count(*) AS changes_after_fold FROM jobloop.job_count_change;
SELECT * FROM counts_check;

-- Row-level security: a role sees the counts of its own jobs only, like the jobs.
CREATE ROLE regress_counts_app;
GRANT USAGE ON SCHEMA public, jobloop TO regress_counts_app;
GRANT EXECUTE ON FUNCTION counts_req(jsonb), counts_step(jsonb, jsonb) TO regress_counts_app;
SET ROLE regress_counts_app;
\set VERBOSITY terse
SELECT count(jobloop.submit('counts_kind', '{}')) AS app_submitted FROM generate_series(1, 2);
\set VERBOSITY default
SELECT * FROM counts_check;
SELECT pending, running, completed, failed, cancelled FROM jobloop.stats;
RESET ROLE;
SELECT * FROM counts_check;

-- Nobody but jobloop's functions and workers writes the counts.
SET ROLE regress_counts_app;
INSERT INTO jobloop.job_count_change VALUES ('regress_counts_app', 'completed', 1000);
SELECT jobloop.recount();
RESET ROLE;

-- Counts gone wrong (triggers disabled while jobs changed) are put right by recount().
ALTER TABLE jobloop.job DISABLE TRIGGER job_count_update;
UPDATE jobloop.job SET status = 'cancelled', finished_at = now() WHERE status = 'pending';
ALTER TABLE jobloop.job ENABLE TRIGGER job_count_update;
SELECT agree AS agree_with_triggers_disabled FROM counts_check;
SELECT jobloop.recount();
SELECT * FROM counts_check;

-- TRUNCATE empties the counts too: of either table, counting what the other holds.
TRUNCATE jobloop.job;
SELECT * FROM counts_check;
TRUNCATE jobloop.finished_job;
SELECT * FROM counts_check;
SELECT (SELECT count(*) FROM jobloop.job_count) + (SELECT count(*) FROM jobloop.job_count_change) AS counter_rows;

DROP VIEW counts_check;
REVOKE ALL ON SCHEMA public, jobloop FROM regress_counts_app;
REVOKE ALL ON FUNCTION counts_req(jsonb), counts_step(jsonb, jsonb) FROM regress_counts_app;
DROP ROLE regress_counts_app;
SELECT jobloop.drop_kind('counts_kind');
DROP FUNCTION counts_req(jsonb), counts_step(jsonb, jsonb);
