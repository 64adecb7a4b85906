-- retries.sql: retryable statuses and transport errors are retried with the
-- same Idempotency-Key until max_attempts; then the job fails with a clear
-- last_error, or (on_error => 'step') the step function gets the error.
\ir lib.psql

SELECT plan(40);

\o /dev/null
-- jltest.script_request / script_step, with retry policies of their own.
SELECT jobloop.create_kind('retries_fail', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 3, backoff => '20 ms', max_backoff => '50 ms');
SELECT jobloop.create_kind('retries_once', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 1, backoff => '20 ms', max_backoff => '50 ms');
SELECT jobloop.create_kind('retries_step', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 2, backoff => '20 ms', max_backoff => '50 ms', on_error => 'step');
SELECT jobloop.create_kind('retries_after', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 2, backoff => '1 ms', max_backoff => '1 ms');
\o

-- Every retryable status, and a transport error, with max_attempts = 3.
CREATE TEMP TABLE retries_jobs AS
SELECT path, error, jltest.submit_script('retries_fail', jsonb_build_array(jsonb_build_object('url', path))) AS id
  FROM (VALUES ('/status/408', 'HTTP 408 Request Timeout after 3 attempts'),
               ('/status/429', 'HTTP 429 Too Many Requests after 3 attempts'),
               ('/status/500', 'HTTP 500 Internal Server Error after 3 attempts'),
               ('/status/502', 'HTTP 502 Bad Gateway after 3 attempts'),
               ('/status/503', 'HTTP 503 Service Unavailable after 3 attempts'),
               ('/status/504', 'HTTP 504 Gateway Timeout after 3 attempts'),
               ('/reset',      'Empty reply from server after 3 attempts')) v(path, error);

SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') = 'failed'), 7::bigint,
          'jobs that only ever get retryable errors fail')
  FROM retries_jobs;
SELECT is(j.last_error, r.error, r.path || ': ' || r.error)
  FROM retries_jobs r JOIN jobloop.jobs j USING (id) ORDER BY r.path;
SELECT is_empty($$SELECT r.path, j.attempts, j.step FROM retries_jobs r JOIN jobloop.jobs j USING (id)
                   WHERE j.attempts <> 3 OR j.step <> 0 OR j.state ? 'responses'$$,
                'each after 3 attempts, at step 0, the step function never called');
SELECT is_empty($$SELECT r.path, count(a.*) FROM retries_jobs r LEFT JOIN jltest.access_log() a ON a.key_job = r.id
                   WHERE r.path <> '/reset' GROUP BY r.path HAVING count(a.*) <> 3$$,
                'the API received exactly 3 requests for each status');
-- A connection closed without a reply is special: libcurl itself re-sends a
-- request whose reused keep-alive connection died (up to 5 times, at once).
-- jobloop sends its retries on a fresh connection, so only the first attempt
-- can be multiplied (a documented limitation).
SELECT cmp_ok((SELECT count(*) FROM retries_jobs r JOIN jltest.access_log() a ON a.key_job = r.id WHERE r.path = '/reset'),
              '<=', 3 + 5::bigint, '/reset: at most 3 attempts + 5 re-sends of the first by libcurl');
SELECT is_empty($$SELECT d.gap FROM (
                     SELECT a.at - lag(a.at) OVER (ORDER BY a.line_no) AS gap,
                            row_number() OVER (ORDER BY a.line_no DESC) AS from_end
                       FROM retries_jobs r JOIN jltest.access_log() a ON a.key_job = r.id WHERE r.path = '/reset') d
                   WHERE d.from_end <= 2 AND d.gap < 0.010 - 0.002$$,
                '/reset: attempts 2 and 3 are one request each, after the backoff (>= 10 ms)');
SELECT is_empty($$SELECT r.path, a.idempotency_key FROM retries_jobs r JOIN jltest.access_log() a ON a.key_job = r.id
                   WHERE a.idempotency_key <> jltest.idempotency_key(r.id, 0) OR a.uri <> r.path$$,
                'every request of a job with the same URL and the same Idempotency-Key (that of step 0)');

-- Statuses that are not retried reach the step function at once.
CREATE TEMP TABLE retries_final AS
SELECT status, jltest.submit_script('retries_fail', jsonb_build_array(jsonb_build_object('url', '/status/' || status))) AS id
  FROM unnest(ARRAY[400, 401, 404, 409, 422]) status;
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') = 'completed'), 5::bigint,
          '400, 401, 404, 409 and 422 are not errors: the jobs complete')
  FROM retries_final;
SELECT is_empty($$SELECT f.status FROM retries_final f JOIN jobloop.jobs j USING (id)
                   WHERE (j.state->'responses'->0->>'status')::integer <> f.status OR j.attempts <> 0$$,
                'the step function got each status, on the first attempt');
SELECT is_empty($$SELECT f.status, count(a.*) FROM retries_final f LEFT JOIN jltest.access_log() a ON a.key_job = f.id
                   GROUP BY f.status HAVING count(a.*) <> 1$$,
                'one request each');

-- max_attempts = 1: no retry.
SELECT jltest.submit_script('retries_once', '[{"url": "/status/503"}]') AS once \gset
SELECT is(jobloop.wait(:once, '30 s'), 'failed', 'max_attempts 1: a 503 fails the job');
SELECT is(last_error, 'HTTP 503 Service Unavailable after 1 attempts', 'after 1 attempt')
  FROM jobloop.jobs WHERE id = :once;
SELECT is((SELECT count(*) FROM jltest.requests_of(:once)), 1::bigint, 'one request');

-- Retry-After is honoured: the retry comes no sooner than it says.
SELECT jltest.submit_script('retries_after', '[{"url": "/status/429?retry_after=1"}]') AS after \gset
SELECT is(jobloop.wait(:after, '30 s'), 'failed', '429 with Retry-After: 1, twice: failed');
SELECT is(last_error, 'HTTP 429 Too Many Requests after 2 attempts', 'after 2 attempts') FROM jobloop.jobs WHERE id = :after;
SELECT is((SELECT count(*) FROM jltest.requests_of(:after)), 2::bigint, 'two requests');
SELECT cmp_ok((SELECT max(at) - min(at) FROM jltest.requests_of(:after)), '>=', 0.99,
              'the retry came at least Retry-After (1 s) after the first (backoff alone is 1 ms)');

-- Later steps are retried with their own key.
SELECT jltest.submit_script('retries_fail', '[{"url": "/json?n=1"}, {"url": "/status/502"}]') AS later \gset
SELECT is(jobloop.wait(:later, '30 s'), 'failed', 'a job failing at its second step fails');
SELECT is(step, 1, 'at step 1') FROM jobloop.jobs WHERE id = :later;
SELECT is(jsonb_array_length(state->'responses'), 1, 'with the state of step 1') FROM jobloop.jobs WHERE id = :later;
SELECT results_eq(format('SELECT step, idempotency_key FROM jltest.requests_of(%s)', :later),
                  format($$VALUES (0, %L), (1, %L), (1, %L), (1, %L)$$, jltest.idempotency_key(:later, 0),
                         jltest.idempotency_key(:later, 1), jltest.idempotency_key(:later, 1),
                         jltest.idempotency_key(:later, 1)),
                  'step 0 once, step 1 three times, each with the key of its step');

-- on_error => 'step': the step function decides.
SELECT jltest.submit_script('retries_step', '[{"url": "/status/503"}, {"url": "/reset"}, {"url": "/json?n=3"}]') AS to_step \gset
SELECT is(jobloop.wait(:to_step, '30 s'), 'completed', 'on_error step: the job goes on after errors');
SELECT is(step, 3, 'through all 3 steps') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->0->>'error', 'HTTP 503 Service Unavailable after 2 attempts',
          'the step got the error') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->0->'attempts', '2', 'the number of attempts') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->0->'status', '503', 'the status') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->0->'body', '{"status": 503}', 'the body') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(jsonb_typeof(state->'responses'->0->'headers'), 'object', 'and the headers') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->1->>'error', 'Empty reply from server after 2 attempts',
          'a transport error reaches the step too') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->1->'status', 'null', 'with status null') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->1->'body', 'null', 'and body null') FROM jobloop.jobs WHERE id = :to_step;
SELECT is(state->'responses'->2->'body', '{"ok": true, "n": 3}', 'the next step is a normal response again')
  FROM jobloop.jobs WHERE id = :to_step;
SELECT ok(NOT (state->'responses'->2 ? 'error'), 'without an error key') FROM jobloop.jobs WHERE id = :to_step;
SELECT results_eq(format($$SELECT step, count(*) FILTER (WHERE step <> 1), count(*) FILTER (WHERE step = 1) BETWEEN 2 AND 2 + 5
                            FROM jltest.requests_of(%s) GROUP BY step ORDER BY step$$, :to_step),
                  $$VALUES (0, 2::bigint, false), (1, 0::bigint, true), (2, 1::bigint, false)$$,
                  'requests: 2 for step 0, 2 (+ up to 5 libcurl re-sends) for step 1, 1 for step 2');

SELECT * FROM finish();
