--
-- upgrade: a database on jobloop 0.1.0 updates to the current version and
-- keeps its kinds and jobs.  (Runs last: it drops and recreates the extension.)
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never

SELECT source, target, path FROM pg_extension_update_paths('jobloop')
 WHERE path IS NOT NULL ORDER BY source, target;

DROP EXTENSION jobloop;
CREATE EXTENSION jobloop VERSION '0.1.0';
SELECT extversion FROM pg_extension WHERE extname = 'jobloop';

CREATE FUNCTION upgrade_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION upgrade_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('upgrade_kind', 'upgrade_req(jsonb)', 'upgrade_step(jsonb,jsonb)', max_steps => 9);
-- The warning's DETAIL names the server's jobloop.database: terse, so that this passes
-- whatever database the workers serve (test/suites/upgrade.sh checks the DETAIL).
\set VERBOSITY terse
SELECT jobloop.submit('upgrade_kind', '{"v": 1}', 'tenant-u') AS job1 \gset
\set VERBOSITY default
SELECT jobloop.submit('upgrade_kind', '{"v": 2}', 'tenant-u') AS job2 \gset
SELECT jobloop.cancel(:job2);

ALTER EXTENSION jobloop UPDATE;
SELECT extversion = (SELECT default_version FROM pg_available_extensions WHERE name = 'jobloop') AS is_default_version
  FROM pg_extension WHERE extname = 'jobloop';

-- Kinds and jobs survived, and the API works on them.
SELECT name, request_fn, step_fn, max_steps FROM jobloop.kind;
SELECT id, kind, tenant, status, state FROM jobloop.jobs ORDER BY id;
SELECT id, status FROM jobloop.status(:job1);
SELECT jobloop.cancel(:job1);
SELECT jobloop.submit('upgrade_kind', '{"v": 3}') AS job3 \gset
SELECT id, status, state FROM jobloop.status(:job3);
SELECT pending, cancelled FROM jobloop.stats;
-- A job that finished before the update stays in jobloop.job (the update moves no rows;
-- retention deletes it from there); one that finishes after it moves to finished_job.
SELECT (SELECT count(*) FROM jobloop.job WHERE id = :job2) AS job2_in_job,
       (SELECT count(*) FROM jobloop.finished_job WHERE id = :job1) AS job1_in_finished_job;

-- 0.4.0 -> 0.5.0 (released 0.4.0, the finished jobs' move and partitions): the update
-- makes the partitions for now and two widths ahead itself, so that what finishes before
-- a worker's first heartbeat does not go to the default partition; they are not members
-- of the extension (pg_dump dumps them like the workers' partitions).
DROP EXTENSION jobloop;
CREATE EXTENSION jobloop VERSION '0.4.0';
SELECT jobloop.create_kind('upgrade_kind', 'upgrade_req(jsonb)', 'upgrade_step(jsonb,jsonb)') IS NOT NULL AS created;
SELECT jobloop.submit('upgrade_kind', '{"v": 4}') AS job4 \gset
SELECT jobloop.cancel(:job4);
ALTER EXTENSION jobloop UPDATE TO '0.5.0';
SELECT count(*) AS partitions,
       bool_or(lower_bound <= now() AND upper_bound > now()) AS now_covered,
       min(lower_bound) <= now() AND max(upper_bound) >= now() + 2 * jobloop.finished_job_width('7 days') AS ahead
  FROM jobloop.finished_job_partitions();
SELECT count(*) AS partitions_in_extension
  FROM pg_depend d JOIN jobloop.finished_job_partitions() p ON d.objid = p.partition
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e';
SELECT jobloop.submit('upgrade_kind', '{"v": 5}') AS job5 \gset
SELECT jobloop.cancel(:job5);
SELECT (SELECT count(*) FROM jobloop.job WHERE id = :job4) AS job4_in_job,
       (SELECT count(*) FROM jobloop.finished_job_default) AS in_default,
       (SELECT count(*) FROM jobloop.finished_job WHERE id = :job5) AS job5_in_partition;
SELECT pending, cancelled FROM jobloop.stats;

-- A fresh install is at the default version too, and makes no partition (its workers
-- do, at their first heartbeat; pg_restore brings the dump's).

DROP EXTENSION jobloop;
CREATE EXTENSION jobloop;
SELECT extversion = (SELECT default_version FROM pg_available_extensions WHERE name = 'jobloop') AS is_default_version
  FROM pg_extension WHERE extname = 'jobloop';
SELECT count(*) AS partitions FROM jobloop.finished_job_partitions();
