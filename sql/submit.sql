--
-- submit, status() and the jobloop.jobs view, for jobs that stay pending
-- (no worker serves this database).
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never

CREATE FUNCTION submit_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION submit_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
SELECT jobloop.create_kind('submit_kind', 'submit_req(jsonb)', 'submit_step(jsonb,jsonb)');

-- Unknown kinds are named.
SELECT jobloop.submit('no_such_kind');
SELECT jobloop.submit('SUBMIT_KIND');

-- NULL arguments.
SELECT jobloop.submit(NULL);
SELECT jobloop.submit(NULL, '{}');
SELECT jobloop.submit('submit_kind', NULL);

-- The state must be a JSON object.
SELECT jobloop.submit('submit_kind', '[]');
SELECT jobloop.submit('submit_kind', '[{"a": 1}]');
SELECT jobloop.submit('submit_kind', '1');
SELECT jobloop.submit('submit_kind', '"text"');
SELECT jobloop.submit('submit_kind', 'true');
SELECT jobloop.submit('submit_kind', 'null');

-- Tenants are at most 200 bytes.
SELECT jobloop.submit('submit_kind', '{}', repeat('t', 201));
SELECT jobloop.submit('submit_kind', '{}', repeat('é', 101));

-- None of that created a job.
SELECT count(*) FROM jobloop.jobs;

-- Jobs that are accepted.  The first submit of a session in a database no
-- worker serves warns once.
-- The warning's DETAIL names the server's jobloop.database: terse, so that this passes
-- whatever database the workers serve (test/suites/upgrade.sh checks the DETAIL).
\set VERBOSITY terse
SELECT jobloop.submit('submit_kind');
\set VERBOSITY default
SELECT jobloop.submit('submit_kind', '{"n": 1, "nested": {"list": [1, 2, 3]}}', 'tenant-a');
SELECT jobloop.submit('submit_kind', '{}', repeat('t', 200));
SELECT jobloop.submit('submit_kind', state => '{"later": true}', tenant => 'tenant-b',
                      start_at => '2100-01-01 00:00:00+00');
SELECT jobloop.submit('submit_kind', '{"past": true}', NULL, '2000-01-01 00:00:00+00');
SELECT jobloop.submit('submit_kind', '{}', '');

-- The view's columns.
SELECT attnum, attname, format_type(atttypid, atttypmod) AS type
  FROM pg_attribute
 WHERE attrelid = 'jobloop.jobs'::regclass AND attnum > 0
 ORDER BY attnum;

-- What a pending job looks like.
SELECT id, kind, left(tenant, 10) AS tenant, owner, status, step, state, last_error, attempts,
       created_at IS NOT NULL AS created, updated_at IS NOT NULL AS updated,
       started_at, finished_at, worker, lease_expires_at, next_request
  FROM jobloop.jobs ORDER BY id;
SELECT id, length(tenant) FROM jobloop.jobs WHERE length(tenant) > 10;

-- Timestamps: a job runs at once unless start_at says later.
SELECT id, run_after = created_at AS runs_at_once,
       run_after = '2100-01-01 00:00:00+00' AS runs_in_2100,
       run_after = '2000-01-01 00:00:00+00' AS runs_in_2000,
       created_at = updated_at AS untouched
  FROM jobloop.jobs ORDER BY id;

-- status() returns the same row as the view.
SELECT to_jsonb(jobloop.status(j.id)) = to_jsonb(j) AS same
  FROM jobloop.jobs j ORDER BY j.id;
SELECT id, kind, tenant, status, step, state FROM jobloop.status(4);
SELECT (jobloop.status(4)).status;
SELECT jobloop.status(999);
SELECT jobloop.status(NULL);
SELECT jobloop.status(-1);

-- Jobs submitted in a transaction that rolls back do not exist.
BEGIN;
SELECT jobloop.submit('submit_kind', '{"rolled": "back"}') AS rolled_back_id \gset
ROLLBACK;
SELECT jobloop.status(:rolled_back_id);
SELECT count(*) FROM jobloop.jobs WHERE state ? 'rolled';

-- The table keeps the kind, the owner and the (not yet computed) request.
SELECT id, kind, owner, request FROM jobloop.job ORDER BY id;

