-- errors.sql: business logic and requests that go wrong fail their own job,
-- with a last_error that says why, and leave every other job alone.
\ir lib.psql

SELECT plan(46);

-- Request: state.req, with a relative url made absolute (unless state.raw).
CREATE OR REPLACE FUNCTION errors_request(state jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF state->>'raise_in' = 'request' THEN
        RAISE EXCEPTION 'request went wrong for %', state->>'who';
    END IF;
    IF state ? 'raw' THEN
        RETURN state->'raw';
    END IF;
    RETURN jsonb_build_object('url', (state->>'base') || '/json?n=1&tag=' || (state->>'tag'));
END
$$;
CREATE OR REPLACE FUNCTION errors_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF state->>'raise_in' = 'step' THEN
        RAISE EXCEPTION 'step went wrong for %', state->>'who' USING DETAIL = 'Some detail.';
    END IF;
    IF state->>'raise_in' = 'step_division' THEN
        RETURN jsonb_build_object('x', 1 / 0);
    END IF;
    IF state->>'step_returns' = 'null' THEN
        RETURN NULL;
    END IF;
    IF state->>'step_returns' = 'array' THEN
        RETURN '[1, 2]'::jsonb;
    END IF;
    IF state->>'step_returns' = 'scalar' THEN
        RETURN '"done"'::jsonb;
    END IF;
    RETURN state || jsonb_build_object('n', coalesce((state->>'n')::integer, 0) + 1, 'status', response->'status');
END
$$;
CREATE OR REPLACE FUNCTION errors_done(state jsonb) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF state->>'raise_in' = 'done' THEN
        RAISE EXCEPTION 'done went wrong for %', state->>'who';
    END IF;
    RETURN coalesce((state->>'n')::integer, 0) >= 2;
END
$$;

\o /dev/null
SELECT jobloop.create_kind('errors_kind', 'errors_request(jsonb)', 'errors_step(jsonb,jsonb)', 'errors_done(jsonb)');
\o

SELECT jltest.tag() AS tag \gset

-- One batch of jobs: most are fine, a few raise.  They are submitted
-- together, so a worker runs them side by side.
CREATE TEMP TABLE errors_jobs AS
SELECT who, raise_in,
       jobloop.submit('errors_kind', jsonb_strip_nulls(jsonb_build_object(
           'base', jltest.url(), 'tag', :'tag', 'who', who, 'raise_in', raise_in)), 'errors-' || who) AS id
  FROM (VALUES ('a', NULL), ('b', 'step'), ('c', NULL), ('d', 'request'), ('e', NULL),
               ('f', 'done'), ('g', NULL), ('h', 'step_division'), ('i', NULL)) v(who, raise_in);

SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') IN ('completed', 'failed')), 9::bigint,
          'all 9 jobs finish')
  FROM errors_jobs;
SELECT results_eq(
    $$SELECT j.status, j.step FROM errors_jobs e JOIN jobloop.jobs j USING (id) WHERE e.raise_in IS NULL ORDER BY e.who$$,
    $$VALUES ('completed', 2), ('completed', 2), ('completed', 2), ('completed', 2), ('completed', 2)$$,
    'the jobs whose logic does not raise complete, with all their steps');
SELECT is_empty($$SELECT 1 FROM errors_jobs e JOIN jobloop.jobs j USING (id)
                   WHERE e.raise_in IS NULL AND (j.last_error IS NOT NULL OR j.state->>'n' <> '2')$$,
                'untouched by the others'' errors');
SELECT is(status, 'failed', 'a step that raises fails its job') FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'b');
SELECT is(last_error, 'step went wrong for b (Some detail.)', 'last_error is the error message, with its detail')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'b');
SELECT is(step, 0, 'the failed step is not counted') FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'b');
SELECT is(state, jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'who', 'b', 'raise_in', 'step'),
          'and the state is the last committed one')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'b');
SELECT is(status || ': ' || last_error, 'failed: request went wrong for d', 'a request function that raises fails its job')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'd');
SELECT is_empty(format('SELECT 1 FROM jltest.requests_of(%s)', (SELECT id FROM errors_jobs WHERE who = 'd')),
                'and nothing was sent for it');
SELECT is(status || ': ' || last_error, 'failed: done went wrong for f', 'a done function that raises fails its job')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'f');
SELECT is(status || ': ' || last_error, 'failed: division by zero', 'a runtime error in step fails its job')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_jobs WHERE who = 'h');
SELECT ok(bool_and(finished_at IS NOT NULL AND worker IS NULL AND next_request IS NULL),
          'failed jobs are finished and released')
  FROM jobloop.jobs WHERE id IN (SELECT id FROM errors_jobs WHERE raise_in IS NOT NULL);

-- Step functions must return a JSON object.
SELECT jobloop.submit('errors_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'step_returns', 'null')) AS step_null \gset
SELECT jobloop.submit('errors_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'step_returns', 'array')) AS step_array \gset
SELECT jobloop.submit('errors_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'step_returns', 'scalar')) AS step_scalar \gset
SELECT is(jobloop.wait(:step_null, '30 s'), 'failed', 'a step returning NULL fails the job');
SELECT matches(last_error, '^step function (public\.)?errors_step\(jsonb,jsonb\) returned NULL$', 'saying so')
  FROM jobloop.jobs WHERE id = :step_null;
SELECT is(jobloop.wait(:step_array, '30 s'), 'failed', 'a step returning an array fails the job');
SELECT matches(last_error, '^step function (public\.)?errors_step\(jsonb,jsonb\) must return a JSON object$', 'saying so')
  FROM jobloop.jobs WHERE id = :step_array;
SELECT is(jobloop.wait(:step_scalar, '30 s'), 'failed', 'a step returning a JSON string fails the job');
SELECT matches(last_error, '^step function (public\.)?errors_step\(jsonb,jsonb\) must return a JSON object$', 'saying so')
  FROM jobloop.jobs WHERE id = :step_scalar;

-- Invalid requests fail the job before anything is sent.
CREATE TEMP TABLE errors_bad_requests (label text, raw jsonb, error text, id bigint);
INSERT INTO errors_bad_requests (label, raw, error) VALUES
    ('not an object', '[1, 2]',
     'request function public.errors_request(jsonb) must return a JSON object'),
    ('missing url', '{"method": "GET"}',
     'invalid request: "url" is missing'),
    ('url not a string', '{"url": 42}',
     'invalid request: "url" must be a string'),
    ('bad method', format('{"url": "%s/json", "method": "FETCH"}', jltest.url())::jsonb,
     'invalid request: unsupported method "FETCH"'),
    ('ftp scheme', '{"url": "ftp://127.0.0.1/file"}',
     'invalid request: unsupported URL "ftp://127.0.0.1/file": only http and https are allowed'),
    ('file scheme', '{"url": "file:///etc/passwd"}',
     'invalid request: unsupported URL "file:///etc/passwd": only http and https are allowed'),
    ('unknown key', format('{"url": "%s/json", "verb": "GET"}', jltest.url())::jsonb,
     'invalid request: unrecognized key "verb"'),
    ('header with newline', format('{"url": "%s/json", "headers": {"X-A": "a\r\nInjected: 1"}}', jltest.url())::jsonb,
     'invalid request: header "X-A" contains control characters'),
    ('bad header name', format('{"url": "%s/json", "headers": {"X A": "a"}}', jltest.url())::jsonb,
     'invalid request: invalid header name "X A"'),
    ('headers not an object', format('{"url": "%s/json", "headers": ["X-A: a"]}', jltest.url())::jsonb,
     'invalid request: "headers" must be an object'),
    ('Host header', format('{"url": "%s/json", "headers": {"Host": "evil"}}', jltest.url())::jsonb,
     'invalid request: header "Host" is set by jobloop'),
    ('GET with a body', format('{"url": "%s/echo", "body": {"a": 1}}', jltest.url())::jsonb,
     'invalid request: a GET request cannot have a body'),
    ('negative delay', format('{"url": "%s/json", "delay_ms": -1}', jltest.url())::jsonb,
     'invalid request: "delay_ms" must be between 0 and 2147483647'),
    ('timeout not a number', format('{"url": "%s/json", "timeout_ms": "5s"}', jltest.url())::jsonb,
     'invalid request: "timeout_ms" must be a number'),
    ('space in url', format('{"url": "%s/json?a=b c"}', jltest.url())::jsonb,
     'invalid request: "url" contains spaces or control characters');
UPDATE errors_bad_requests
   SET id = jobloop.submit('errors_kind', jsonb_build_object('base', jltest.url(), 'raw', raw), 'errors-bad');

SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') = 'failed'), 15::bigint,
          'all 15 jobs with invalid requests fail')
  FROM errors_bad_requests;
SELECT is(j.last_error, b.error, 'invalid request, ' || b.label || ': ' || b.error)
  FROM errors_bad_requests b JOIN jobloop.jobs j USING (id) ORDER BY b.label;
SELECT is_empty($$SELECT 1 FROM errors_bad_requests b JOIN jltest.access_log() a ON a.key_job = b.id$$,
                'none of them sent anything');

-- A response larger than jobloop.max_response_size (10 MB by default).
SELECT jltest.submit_script('jltest_script', '[{"url": "/big?kb=20000"}]') AS too_big \gset
SELECT is(jobloop.wait(:too_big, '30 s'), 'failed', 'a 20 MB response fails the job');
SELECT is(last_error, 'response exceeds jobloop.max_response_size (10485760 bytes)', 'naming the limit')
  FROM jobloop.jobs WHERE id = :too_big;
SELECT is(attempts, 1, 'without retrying') FROM jobloop.jobs WHERE id = :too_big;

-- An address that jobloop.allowed_hosts does not list (127.0.0.2).
SELECT jobloop.submit('errors_kind', jsonb_build_object('raw', jsonb_build_object('url', jltest.url2('/json?n=1&tag=' || :'tag')))) AS refused \gset
SELECT is(jobloop.wait(:refused, '30 s'), 'failed', 'a request to 127.0.0.2 fails the job');
SELECT matches(last_error, '127\.0\.0\.2', 'last_error names the address') FROM jobloop.jobs WHERE id = :refused;
SELECT matches(last_error, 'jobloop\.allowed_hosts', 'and the setting that would allow it') FROM jobloop.jobs WHERE id = :refused;
SELECT is(attempts, 1, 'a refused address is not retried') FROM jobloop.jobs WHERE id = :refused;
SELECT is(pg_read_file(current_setting('test.mock_log2')), '', 'the mock at 127.0.0.2 received nothing at all');

-- A response body that is JSON but that jsonb cannot hold (a number beyond numeric's
-- range) fails its own job, not the worker's batch.
CREATE TEMP TABLE errors_bodies AS
SELECT label, jobloop.submit('errors_kind', jsonb_build_object('raw', jsonb_build_object(
           'url', jltest.url('/echo'), 'method', 'POST', 'body', body)), 'errors-body') AS id
  FROM (VALUES ('huge number', '{"a": 1e999999}'), ('fine', '{"a": 1}')) v(label, body);
SELECT results_eq($$SELECT label, jobloop.wait(id, '30 s')::text FROM errors_bodies ORDER BY label$$,
                  $$VALUES ('fine', 'completed'), ('huge number', 'failed')$$,
                  'a response body jsonb cannot hold fails its job, and only that one');
SELECT is(last_error, 'invalid response body: value overflows numeric format', 'saying why')
  FROM jobloop.jobs WHERE id = (SELECT id FROM errors_bodies WHERE label = 'huge number');
SELECT is(step, 0, 'with no step counted') FROM jobloop.jobs WHERE id = (SELECT id FROM errors_bodies WHERE label = 'huge number');

SELECT * FROM finish();
