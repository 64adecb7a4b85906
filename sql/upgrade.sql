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

-- A fresh install is at the default version too.
DROP EXTENSION jobloop;
CREATE EXTENSION jobloop;
SELECT extversion = (SELECT default_version FROM pg_available_extensions WHERE name = 'jobloop') AS is_default_version
  FROM pg_extension WHERE extname = 'jobloop';
