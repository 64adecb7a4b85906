-- http.sql: what a step function receives -- status, lower-cased headers,
-- JSON or text bodies, request bodies and headers as the API got them.
\ir lib.psql

SELECT plan(44);

SELECT jltest.submit_script('jltest_script', jsonb_build_array(
    jsonb_build_object('url', '/text'),                                                    -- 0
    jsonb_build_object('url', '/json?n=7'),                                                -- 1
    jsonb_build_object('url', '/status/404'),                                              -- 2
    jsonb_build_object('url', '/echo', 'method', 'POST',
                       'body', '{"a": [1, 2, {"b": null}], "s": "x\"y", "u": "é"}'::jsonb),   -- 3
    jsonb_build_object('url', '/echo', 'method', 'PUT', 'body', 'plain text, not JSON'),   -- 4
    jsonb_build_object('url', '/echo', 'method', 'POST', 'body', '[1, 2, 3]'::jsonb),      -- 5
    jsonb_build_object('url', '/echo_headers', 'headers', jsonb_build_object('X-Test', 'abc 123')), -- 6
    jsonb_build_object('url', '/echo_headers', 'method', 'POST', 'body', '{"k": 1}'::jsonb), -- 7
    jsonb_build_object('url', '/echo_headers', 'method', 'PATCH', 'body', '{"k": 1}'::jsonb,
                       'headers', jsonb_build_object('content-type', 'application/vnd.api+json')), -- 8
    jsonb_build_object('url', '/echo_headers', 'method', 'delete'),                        -- 9
    jsonb_build_object('url', '/status/204'),                                              -- 10
    jsonb_build_object('url', '/status/201', 'method', 'POST', 'body', 'x'),               -- 11
    jsonb_build_object('url', '/echo_headers', 'headers', jsonb_build_object('X-Test', 42)) -- 12
), 'http-tenant') AS job \gset

SELECT is(jobloop.wait(:job, '30 s'), 'completed', 'a job of 13 scripted requests completes');
SELECT is(step, 13, 'it ran exactly 13 steps') FROM jobloop.jobs WHERE id = :job;
SELECT is(jsonb_array_length(state->'responses'), 13, 'the step function got 13 responses')
  FROM jobloop.jobs WHERE id = :job;
SELECT ok(last_error IS NULL AND attempts = 0, 'no error, no retry') FROM jobloop.jobs WHERE id = :job;

-- A response for the step function, by index.
CREATE OR REPLACE FUNCTION pg_temp.resp(job bigint, i integer) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state->'responses'->i FROM jobloop.jobs WHERE id = job $$;

-- Shape of every response.
SELECT is_empty(format($$
    SELECT r FROM jsonb_array_elements((SELECT state->'responses' FROM jobloop.jobs WHERE id = %s)) r
     WHERE (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(r) k)
           IS DISTINCT FROM ARRAY['body', 'elapsed_ms', 'headers', 'status']
        OR jsonb_typeof(r->'status') <> 'number' OR jsonb_typeof(r->'headers') <> 'object'
        OR jsonb_typeof(r->'elapsed_ms') <> 'number' OR (r->>'elapsed_ms')::numeric < 0
    $$, :job), 'every response is {"status", "headers", "body", "elapsed_ms"}');
SELECT is_empty(format($$
    SELECT k FROM jsonb_array_elements((SELECT state->'responses' FROM jobloop.jobs WHERE id = %s)) r,
                  jsonb_object_keys(r->'headers') k
     WHERE k <> lower(k)
    $$, :job), 'header names are lower-cased');

-- 0: text body.
SELECT is(pg_temp.resp(:job, 0)->'status', '200', 'text: status 200');
SELECT is(pg_temp.resp(:job, 0)->'body', '"hello world"', 'text: the body is a JSON string');
SELECT is(pg_temp.resp(:job, 0)->'headers'->>'content-type', 'text/plain', 'text: content-type header');
SELECT is(pg_temp.resp(:job, 0)->'headers'->>'server', 'nginx', 'text: other headers are there too');

-- 1: JSON body.
SELECT is(pg_temp.resp(:job, 1)->'body', '{"ok": true, "n": 7}', 'json: the body is parsed JSON');
SELECT is(pg_temp.resp(:job, 1)->'headers'->>'content-type', 'application/json', 'json: content-type header');

-- 2: a 404 reaches the step function, it is not an error.
SELECT is(pg_temp.resp(:job, 2)->'status', '404', '404: the step function sees status 404');
SELECT is(pg_temp.resp(:job, 2)->'body', '{"status": 404}', '404: and its body');

-- 3..5: request bodies round-trip through /echo.
SELECT is(pg_temp.resp(:job, 3)->'body', '{"a": [1, 2, {"b": null}], "s": "x\"y", "u": "é"}',
          'POST JSON body arrives intact');
SELECT is(pg_temp.resp(:job, 4)->'body', '"plain text, not JSON"',
          'PUT string body arrives as is; a body that is not JSON reaches step as text');
SELECT is(pg_temp.resp(:job, 5)->'body', '[1, 2, 3]', 'a JSON array body round-trips');

-- 6..9, 12: what the API received, as /echo_headers reports it.
SELECT is(pg_temp.resp(:job, 6)->'body'->>'method', 'GET', 'method defaults to GET');
SELECT is(pg_temp.resp(:job, 6)->'body'->>'x_test', 'abc 123', 'a custom header is sent');
SELECT is(pg_temp.resp(:job, 6)->'body'->>'content_type', '', 'no content-type without a body');
SELECT is(pg_temp.resp(:job, 6)->'body'->>'idempotency_key', jltest.idempotency_key(:job, 6),
          'the Idempotency-Key is jobloop-<key_token>-<step>');
SELECT is(pg_temp.resp(:job, 7)->'body'->>'method', 'POST', 'POST is sent as POST');
SELECT is(pg_temp.resp(:job, 7)->'body'->>'content_type', 'application/json',
          'a JSON body gets content-type application/json by default');
SELECT is(pg_temp.resp(:job, 8)->'body'->>'method', 'PATCH', 'PATCH is sent as PATCH');
SELECT is(pg_temp.resp(:job, 8)->'body'->>'content_type', 'application/vnd.api+json',
          'an explicit content-type (any case) wins over the default');
SELECT is(pg_temp.resp(:job, 9)->'body'->>'method', 'DELETE', 'methods are case-insensitive: delete is DELETE');
SELECT is(pg_temp.resp(:job, 12)->'body'->>'x_test', '42', 'a numeric header value is sent as its text');

-- 10, 11: other statuses.
SELECT is(pg_temp.resp(:job, 10)->'status', '204', '204 reaches the step function');
SELECT is(pg_temp.resp(:job, 10)->'body', '""', '204: the empty body is an empty string');
SELECT is(pg_temp.resp(:job, 11)->'status', '201', '201 reaches the step function');

-- What the mock logged for this job: one request per step, in order, with
-- the method asked for and the step's own key.
SELECT results_eq(
    format('SELECT step, method, split_part(uri, ''?'', 1), status FROM jltest.requests_of(%s)', :job),
    $$VALUES (0, 'GET', '/text', 200), (1, 'GET', '/json', 200), (2, 'GET', '/status/404', 404),
             (3, 'POST', '/echo', 200), (4, 'PUT', '/echo', 200), (5, 'POST', '/echo', 200),
             (6, 'GET', '/echo_headers', 200), (7, 'POST', '/echo_headers', 200),
             (8, 'PATCH', '/echo_headers', 200), (9, 'DELETE', '/echo_headers', 200),
             (10, 'GET', '/status/204', 204), (11, 'POST', '/status/201', 201),
             (12, 'GET', '/echo_headers', 200)$$,
    'the API received exactly one request per step, in order');
SELECT is_empty(format($$SELECT 1 FROM jltest.requests_of(%s) WHERE idempotency_key <> jltest.idempotency_key(%s, step)$$,
                       :job, :job),
                'every request carried the Idempotency-Key of its step');

-- The job row after completion.
SELECT is(status, 'completed', 'status completed') FROM jobloop.status(:job);
SELECT is(tenant, 'http-tenant', 'tenant kept') FROM jobloop.status(:job);
SELECT ok(started_at IS NOT NULL AND finished_at >= started_at AND updated_at >= started_at,
          'started_at <= finished_at, updated_at set') FROM jobloop.status(:job);
SELECT ok(worker IS NULL AND lease_expires_at IS NULL AND next_request IS NULL,
          'a finished job holds no worker, lease or next request') FROM jobloop.status(:job);

-- A big body that is within jobloop.max_response_size arrives whole.
SELECT jltest.submit_script('jltest_script', '[{"url": "/big?kb=300"}]') AS big \gset
SELECT is(jobloop.wait(:big, '30 s'), 'completed', 'a 300 KiB response is fine');
SELECT is(length(state->'responses'->0->>'body'), 300 * 1024, 'and arrives whole')
  FROM jobloop.jobs WHERE id = :big;

-- An Idempotency-Key the request sets itself replaces jobloop's.
SELECT 'my-own-key-' || jltest.tag() AS own_key \gset
SELECT jltest.submit_script('jltest_script', jsonb_build_array(jsonb_build_object(
    'url', '/echo_headers', 'headers', jsonb_build_object('Idempotency-Key', :'own_key')))) AS own \gset
SELECT is(jobloop.wait(:own, '30 s'), 'completed', 'a job with its own Idempotency-Key completes');
SELECT is(state->'responses'->0->'body'->>'idempotency_key', :'own_key',
          'the API got the request''s own Idempotency-Key')
  FROM jobloop.jobs WHERE id = :own;
SELECT is((SELECT count(*) FROM jltest.access_log() WHERE idempotency_key = :'own_key'
                                                   AND uri = '/echo_headers'), 1::bigint,
          'the access log shows it too');

-- A job whose first request is NULL completes without calling anything.
SELECT jltest.submit_script('jltest_script', '[]') AS empty \gset
SELECT is(jobloop.wait(:empty, '30 s'), 'completed', 'request returning NULL at once: completed');
SELECT is(step, 0, 'after 0 steps') FROM jobloop.jobs WHERE id = :empty;
SELECT is_empty(format('SELECT * FROM jltest.requests_of(%s)', :empty), 'and sent no request');

SELECT * FROM finish();
