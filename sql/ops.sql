--
-- ops: what an application developer and a DBA rely on beyond submit and cancel --
-- wait() in the submitting transaction, unique jobs, retry().  (No worker serves this
-- database, so jobs stay where these statements put them.)
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never
CREATE FUNCTION ops_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION ops_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('submit_kind', 'ops_req(jsonb)', 'ops_step(jsonb,jsonb)')
 WHERE NOT EXISTS (SELECT FROM jobloop.kind WHERE name = 'submit_kind');
-- (terse: the warning's DETAIL names the server's jobloop.database)
\set VERBOSITY terse
SELECT jobloop.submit('submit_kind', '{"earlier": true}') AS earlier_id \gset
\set VERBOSITY default
-- wait() in the transaction that submitted the job: an error, since no worker can see
-- the job before the commit; a job submitted earlier is waited for as usual.
BEGIN;
SELECT jobloop.submit('submit_kind', '{"waited": "here"}') AS waited_id \gset
SELECT jobloop.wait(:waited_id, '1 s');
ROLLBACK;
BEGIN;
SELECT jobloop.wait(:earlier_id, '0');
COMMIT;

-- Unique jobs: the same (kind, owner, unique_key) while unfinished is the same job.
SELECT jobloop.submit('submit_kind', '{"u": 1}', unique_key => 'order-42') AS u1 \gset
SELECT jobloop.submit('submit_kind', '{"u": 2}', unique_key => 'order-42') = :u1 AS same_job;
SELECT state FROM jobloop.jobs WHERE unique_key = 'order-42';
SELECT jobloop.submit('submit_kind', '{"u": 3}', unique_key => 'order-43') <> :u1 AS other_key_new_job;
SELECT jobloop.submit('submit_kind', '{"u": 4}', unique_key => '') AS empty_key;
-- Once the job is finished, the key is free again.
SELECT jobloop.cancel(:u1);
SELECT jobloop.submit('submit_kind', '{"u": 5}', unique_key => 'order-42') <> :u1 AS new_job_after_finish;
SELECT count(*) FROM jobloop.jobs WHERE unique_key = 'order-42';

-- retry(): a cancelled (or failed) job runs again from its state and step, keeping its
-- key_token (so its Idempotency-Keys); not while another job holds its unique_key, and
-- not a job that is unfinished (false).
-- (a finished job lives in jobloop.finished_job; retry() moves it back)
SELECT key_token AS u1_token FROM jobloop.finished_job WHERE id = :u1 \gset
SELECT jobloop.retry(:u1);
SELECT jobloop.cancel(id) FROM jobloop.job WHERE unique_key = 'order-42' AND status = 'pending';
SELECT jobloop.retry(:u1);
SELECT jobloop.retry(:u1) AS retry_unfinished;
SELECT jobloop.retry(999);
SELECT jobloop.retry(NULL);
SELECT id, status, state, attempts, last_error, finished_at IS NULL AS unfinished,
       key_token = :'u1_token' AS same_token
  FROM jobloop.job WHERE id = :u1;
SELECT count(*) AS still_in_finished_job FROM jobloop.finished_job WHERE id = :u1;

-- Pauses: admins only; pause() is idempotent, resume() removes the pauses it covers.
CREATE ROLE regress_jobloop_ops_app;
GRANT USAGE ON SCHEMA jobloop TO regress_jobloop_ops_app;
SET ROLE regress_jobloop_ops_app;
SELECT jobloop.pause();
SELECT jobloop.resume();
RESET ROLE;
REVOKE USAGE ON SCHEMA jobloop FROM regress_jobloop_ops_app;
DROP ROLE regress_jobloop_ops_app;
SELECT jobloop.pause(kind => 'submit_kind');
SELECT jobloop.pause(kind => 'submit_kind');
SELECT jobloop.pause(tenant => 'shop-1');
SELECT jobloop.pause(kind => 'submit_kind', tenant => 'shop-2');
SELECT kind, tenant, paused_by = session_user AS by_me FROM jobloop.pause ORDER BY kind NULLS FIRST, tenant NULLS FIRST;
SELECT jobloop.is_paused('submit_kind', NULL) AS kind_paused,
       jobloop.is_paused('other', 'shop-1') AS tenant_paused,
       jobloop.is_paused('other', 'shop-2') AS other_not_paused;
SELECT count(*) > 0 AS some_paused, bool_and(paused) AS all_of_kind_paused
  FROM jobloop.jobs WHERE kind = 'submit_kind' AND status IN ('pending', 'running');
SELECT paused > 0 AS stats_count_paused FROM jobloop.stats;
SELECT jobloop.resume(kind => 'submit_kind');
SELECT kind, tenant FROM jobloop.pause ORDER BY kind NULLS FIRST, tenant NULLS FIRST;
SELECT jobloop.resume();
SELECT count(*) FROM jobloop.pause;
