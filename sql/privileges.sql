--
-- privileges: who may call the API, and who sees and cancels which jobs.
--
-- A role needs USAGE on schema jobloop to use it.  Jobs belong to the role
-- that submitted them: row-level security shows a role only its own jobs
-- (and those of roles whose privileges it has), members of jobloop_admin see
-- all.  Nobody but the extension writes the tables.
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never

-- Roles are global: remove leftovers of an interrupted earlier run.
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_jobloop_app1_member, regress_jobloop_app1, regress_jobloop_app2,
                    regress_jobloop_outsider, regress_jobloop_admin;
RESET client_min_messages;

CREATE ROLE regress_jobloop_app1;
CREATE ROLE regress_jobloop_app2;
CREATE ROLE regress_jobloop_outsider;
CREATE ROLE regress_jobloop_app1_member IN ROLE regress_jobloop_app1;
CREATE ROLE regress_jobloop_admin IN ROLE jobloop_admin;
GRANT USAGE ON SCHEMA jobloop TO regress_jobloop_app1, regress_jobloop_app2;

CREATE FUNCTION priv_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION priv_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
-- A function only the superuser may execute.
CREATE FUNCTION priv_private_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
REVOKE EXECUTE ON FUNCTION priv_private_req(jsonb) FROM PUBLIC;

SELECT jobloop.create_kind('priv_kind', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)');
SELECT jobloop.create_kind('priv_private', 'priv_private_req(jsonb)', 'priv_step(jsonb,jsonb)');

-- The superuser's own job.
-- The warning's DETAIL names the server's jobloop.database: terse, so that this passes
-- whatever database the workers serve (test/suites/upgrade.sh checks the DETAIL).
\set VERBOSITY terse
SELECT jobloop.submit('priv_kind', '{"who": "superuser"}') AS su_job \gset
\set VERBOSITY default

-- Without USAGE on the schema, nothing.
SET ROLE regress_jobloop_outsider;
SELECT jobloop.submit('priv_kind');
SELECT jobloop.cancel(:su_job);
SELECT jobloop.status(:su_job);
SELECT jobloop.wait(:su_job, '0');
SELECT jobloop.create_kind('outsider_kind', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)');
SELECT jobloop.address_allowed('8.8.8.8');
SELECT count(*) FROM jobloop.jobs;
SELECT count(*) FROM jobloop.job;
RESET ROLE;

-- With USAGE, a role submits jobs and sees only its own.
SET ROLE regress_jobloop_app1;
SELECT jobloop.submit('priv_kind', '{"who": "app1"}', 'tenant-1') AS app1_job1 \gset
SELECT jobloop.submit('priv_kind', '{"who": "app1"}', 'tenant-2') AS app1_job2 \gset
SELECT jobloop.submit('priv_kind', '{"who": "app1"}', 'tenant-2') AS app1_job3 \gset
SELECT id, kind, tenant, owner, status, state FROM jobloop.jobs ORDER BY id;
SELECT id, owner FROM jobloop.job ORDER BY id;
SELECT id, owner, status FROM jobloop.status(:app1_job1);
SELECT jobloop.wait(:app1_job1, '0');
-- Not the superuser's job.
SELECT jobloop.status(:su_job);
SELECT jobloop.wait(:su_job, '0');
SELECT jobloop.cancel(:su_job);
-- Kinds are visible to all.
SELECT name, owner FROM jobloop.kind ORDER BY name;
-- A kind whose function the role may not execute.
SELECT jobloop.submit('priv_private');
SELECT jobloop.create_kind('app1_private', 'priv_private_req(jsonb)', 'priv_step(jsonb,jsonb)');

-- Nobody writes the tables directly, not even their own rows.
INSERT INTO jobloop.job (kind, owner, state) VALUES ('priv_kind', 'regress_jobloop_app1', '{}');
UPDATE jobloop.job SET status = 'completed' WHERE id = :app1_job1;
UPDATE jobloop.job SET owner = 'postgres' WHERE id = :app1_job1;
DELETE FROM jobloop.job WHERE id = :app1_job1;
TRUNCATE jobloop.job;
SELECT id FROM jobloop.job WHERE id = :app1_job1 FOR UPDATE;
INSERT INTO jobloop.kind (name, owner, request_fn, step_fn, max_steps, max_attempts, backoff,
                          max_backoff, notify_steps, on_error)
     VALUES ('sneaky', 'postgres', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)', 1, 1, '1s', '1s',
             false, 'fail');
UPDATE jobloop.kind SET request_fn = 'priv_private_req(jsonb)' WHERE name = 'priv_kind';
DELETE FROM jobloop.kind WHERE name = 'priv_kind';
UPDATE jobloop.jobs SET status = 'cancelled' WHERE id = :app1_job1;
DELETE FROM jobloop.jobs WHERE id = :app1_job1;
-- Nor the finished jobs, nor their partitions (read only through finished_job's policy).
INSERT INTO jobloop.finished_job (id, kind, owner, status, state, finished_at)
     VALUES (1000, 'priv_kind', 'regress_jobloop_app1', 'completed', '{}', now());
UPDATE jobloop.finished_job SET status = 'failed';
DELETE FROM jobloop.finished_job;
SELECT count(*) FROM jobloop.finished_job_default;

-- A role may define kinds of its own, but not replace or drop another's.
SELECT jobloop.create_kind('app1_kind', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)');
SELECT jobloop.create_kind('priv_kind', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)', max_steps => 1);
SELECT jobloop.drop_kind('priv_kind');
SELECT jobloop.submit('app1_kind', '{"who": "app1"}') AS app1_job4 \gset
RESET ROLE;

-- Another role sees none of app1's jobs and cannot cancel them.
SET ROLE regress_jobloop_app2;
SELECT count(*) FROM jobloop.jobs;
SELECT count(*) FROM jobloop.job;
SELECT jobloop.status(:app1_job1);
SELECT jobloop.wait(:app1_job1, '0');
SELECT jobloop.cancel(:app1_job1);
SELECT jobloop.create_kind('app1_kind', 'priv_req(jsonb)', 'priv_step(jsonb,jsonb)', max_steps => 1);
SELECT jobloop.drop_kind('app1_kind');
-- It may submit jobs of app1's kind; they are its own.
SELECT jobloop.submit('app1_kind', '{"who": "app2"}') AS app2_job \gset
SELECT id, kind, owner, state FROM jobloop.jobs ORDER BY id;
RESET ROLE;

-- app1 does not see app2's job, even of its own kind.
SET ROLE regress_jobloop_app1;
SELECT id, owner FROM jobloop.jobs ORDER BY id;
SELECT jobloop.cancel(:app2_job);
-- But app1 cannot drop its kind while app2's job is unfinished.
SELECT jobloop.drop_kind('app1_kind');
-- app1 cancels its own jobs.
SELECT jobloop.cancel(:app1_job1);
SELECT id, status FROM jobloop.jobs ORDER BY id;
RESET ROLE;

-- A member of app1 has app1's privileges, so it sees and cancels app1's jobs.
SET ROLE regress_jobloop_app1_member;
SELECT id, owner, status FROM jobloop.jobs ORDER BY id;
SELECT jobloop.cancel(:app1_job2);
-- Its own jobs are its own.
SELECT jobloop.submit('priv_kind', '{"who": "member"}') AS member_job \gset
SELECT id, owner, status FROM jobloop.jobs ORDER BY id;
RESET ROLE;
SET ROLE regress_jobloop_app1;
SELECT id, owner, status FROM jobloop.jobs ORDER BY id;
RESET ROLE;

-- A member of jobloop_admin sees and cancels every job.
SET ROLE regress_jobloop_admin;
SELECT id, owner, status, state FROM jobloop.jobs WHERE kind IN ('priv_kind', 'app1_kind') ORDER BY id;
SELECT (jobloop.status(:su_job)).owner;
SELECT jobloop.wait(:app2_job, '0');
SELECT jobloop.cancel(:app2_job);
SELECT jobloop.cancel(:app1_job3);
-- It still writes nothing directly.
UPDATE jobloop.job SET status = 'pending' WHERE id = :app2_job;
DELETE FROM jobloop.job;
RESET ROLE;

-- The superuser sees everything too.
SELECT id, owner, status FROM jobloop.jobs WHERE kind IN ('priv_kind', 'app1_kind') ORDER BY id;

-- Clean up: the roles' kinds and jobs, then the roles.
SELECT jobloop.cancel(id) FROM jobloop.jobs
 WHERE status = 'pending' AND kind IN ('priv_kind', 'app1_kind') ORDER BY id;
SET ROLE regress_jobloop_app1;
SELECT jobloop.drop_kind('app1_kind');
RESET ROLE;
SELECT jobloop.drop_kind('priv_kind');
SELECT jobloop.drop_kind('priv_private');
SELECT count(*) FROM jobloop.jobs WHERE kind IN ('priv_kind', 'app1_kind', 'priv_private');
DROP OWNED BY regress_jobloop_app1, regress_jobloop_app2;
DROP ROLE regress_jobloop_app1_member, regress_jobloop_app1, regress_jobloop_app2,
          regress_jobloop_outsider, regress_jobloop_admin;
