--
-- cancel() and wait() on jobs that stay pending (no worker serves this database).
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never

CREATE FUNCTION cancel_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION cancel_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('cancel_kind', 'cancel_req(jsonb)', 'cancel_step(jsonb,jsonb)');

-- The warning's DETAIL names the server's jobloop.database: terse, so that this passes
-- whatever database the workers serve (test/suites/upgrade.sh checks the DETAIL).
\set VERBOSITY terse
SELECT jobloop.submit('cancel_kind', '{"n": 1}', 'tenant-c') AS job_a \gset
\set VERBOSITY default
SELECT jobloop.submit('cancel_kind', '{"n": 2}', 'tenant-c') AS job_b \gset
SELECT jobloop.submit('cancel_kind', '{"n": 3}', 'tenant-d') AS job_c \gset

-- wait() on a pending job returns its status when the timeout passes; a negative
-- timeout is an error.
SELECT jobloop.wait(:job_a, '100 ms');
SELECT jobloop.wait(:job_a, '0');
SELECT jobloop.wait(:job_a, '-1 s');

-- Cancelling a pending job: true, and the job is finished.
SELECT jobloop.cancel(:job_a);
SELECT status, step, state, last_error, attempts, finished_at IS NOT NULL AS finished,
       finished_at >= created_at AS finished_after_created, updated_at >= created_at AS updated,
       started_at, worker, lease_expires_at, next_request
  FROM jobloop.status(:job_a);

-- Cancelling it again: false, and nothing changes.
SELECT finished_at AS first_finished_at FROM jobloop.status(:job_a) \gset
SELECT jobloop.cancel(:job_a);
SELECT status, finished_at = :'first_finished_at' AS finished_at_kept FROM jobloop.status(:job_a);

-- wait() on a finished job returns at once.
SELECT jobloop.wait(:job_a);
SELECT jobloop.wait(:job_a, '0');

-- The others are untouched.
SELECT id, status, state FROM jobloop.jobs WHERE id IN (:job_b, :job_c) ORDER BY id;

-- A cancel that rolls back never happened.
BEGIN;
SELECT jobloop.cancel(:job_b);
SELECT status FROM jobloop.status(:job_b);
ROLLBACK;
SELECT status, finished_at FROM jobloop.status(:job_b);

-- Cancel, then cancel again in the same transaction.
BEGIN;
SELECT jobloop.cancel(:job_b);
SELECT jobloop.cancel(:job_b);
COMMIT;
SELECT status FROM jobloop.status(:job_b);

-- Jobs that do not exist, and NULL.
SELECT jobloop.cancel(999999);
SELECT jobloop.cancel(-1);
SELECT jobloop.cancel(NULL);
SELECT jobloop.wait(999999, '1 s');
SELECT jobloop.wait(NULL);
SELECT jobloop.wait(:job_c, NULL);

-- Cancel a set of jobs by query.
SELECT jobloop.submit('cancel_kind', jsonb_build_object('batch', g), 'tenant-e') FROM generate_series(1, 3) g;
SELECT count(*) FILTER (WHERE jobloop.cancel(id)) AS cancelled
  FROM jobloop.jobs WHERE tenant = 'tenant-e';
SELECT tenant, status, count(*) FROM jobloop.jobs WHERE kind = 'cancel_kind' GROUP BY tenant, status ORDER BY tenant, status;

-- Cancelled jobs do not hold their kind.
SELECT jobloop.cancel(:job_c);
SELECT jobloop.drop_kind('cancel_kind');
SELECT count(*) FROM jobloop.jobs WHERE kind = 'cancel_kind';
