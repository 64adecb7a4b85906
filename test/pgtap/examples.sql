-- examples.sql: the job kinds in examples/ work end to end as their comments say, so
-- the files users copy never rot.  Each example is loaded exactly as a user would (psql
-- \i with api_url set), then its jobs run against the mock API.
\ir lib.psql

SELECT plan(30);

SELECT current_setting('test.mock_url') AS api_url \gset
\o /dev/null
\ir ../../examples/api_poller.sql
\ir ../../examples/paginated_fetch.sql
\ir ../../examples/webhook_delivery.sql
\o
SET client_min_messages = warning;

SELECT is(examples.api_url(), :'api_url', 'the examples call the API given in api_url');
SELECT set_has($$SELECT name FROM jobloop.kind$$,
               $$VALUES ('example_poller'), ('example_pages'), ('example_webhook')$$,
               'the three example kinds exist');

-- The business logic is testable with a SELECT, without a worker.
SELECT is(examples.poller_request('{"resource": "r"}')->>'delay_ms', '0',
          'poller: the first poll is sent at once');
SELECT is(ARRAY(SELECT (examples.poller_request(jsonb_build_object('resource', 'r', 'polls', p))->>'delay_ms')::int
                  FROM generate_series(1, 8) p),
          ARRAY[250, 500, 1000, 2000, 4000, 5000, 5000, 5000],
          'poller: delay_ms doubles from 250 ms up to 5 s');
SELECT is(examples.pages_request('{"page": 3, "max_pages": 2}'), NULL,
          'pages: no request past max_pages');
SELECT is(examples.pages_request('{"page": null}'), NULL,
          'pages: no request when the API named no next page');

-- ---- (a) the poller ----
SELECT jltest.tag() AS tag \gset
SELECT jobloop.submit('example_poller', jsonb_build_object('resource', :'tag' || '-a', 'ready_after', 4),
                      tenant => 'examples-1') AS poll_a \gset
SELECT jobloop.submit('example_poller', jsonb_build_object('resource', :'tag' || '-b', 'ready_after', 1),
                      tenant => 'examples-2') AS poll_b \gset
SELECT jobloop.submit('example_poller', jsonb_build_object('resource', :'tag' || '-c', 'ready_after', 100),
                      tenant => 'examples-2') AS poll_never \gset

SELECT is(jobloop.wait(:poll_a, '30 s'), 'completed', 'poller: a resource ready after 4 polls completes');
SELECT is((SELECT step FROM jobloop.jobs WHERE id = :poll_a), 4, 'poller: ... after exactly 4 steps');
SELECT is((SELECT state->>'status' FROM jobloop.jobs WHERE id = :poll_a), 'ready', 'poller: ... with status ready');
SELECT is(jobloop.wait(:poll_b, '30 s'), 'completed', 'poller: a resource ready at once completes');
SELECT is((SELECT step FROM jobloop.jobs WHERE id = :poll_b), 1, 'poller: ... after one step');

-- The API saw the polls of job a spaced by growing delays: about 250, 500, 1000 ms.
SELECT is(count(*), 4::bigint, 'poller: the API received one request per poll')
  FROM jltest.requests_of(:poll_a);
SELECT ok(bool_and(gap_ms >= want_ms - 5 AND gap_ms < want_ms + 1000),
          'poller: the waits between polls grew: 250, 500, 1000 ms')
  FROM (SELECT 1000 * (at - lag(at) OVER (ORDER BY line_no)) AS gap_ms,
               250 * 2 ^ (row_number() OVER (ORDER BY line_no) - 2) AS want_ms
          FROM jltest.requests_of(:poll_a)) g
 WHERE gap_ms IS NOT NULL;

-- An error marker in the response fails the job at once (HTTP 422 is not retried).
SELECT jobloop.submit('example_poller', '{"url": "/status/422"}', tenant => 'examples-1') AS poll_422 \gset
SELECT is(jobloop.wait(:poll_422, '30 s'), 'failed', 'poller: an HTTP 422 answer fails the job at once');
SELECT is((SELECT last_error || ' / step ' || step FROM jobloop.jobs WHERE id = :poll_422),
          'poll of /status/422 failed: HTTP 422: {"status": 422} / step 0',
          'poller: ... with the error as last_error, after one request');

SELECT jobloop.cancel(:poll_never) AS cancelled \gset
SELECT ok(:'cancelled'::boolean, 'poller: a job still polling can be cancelled');
SELECT is(jobloop.wait(:poll_never, '5 s'), 'cancelled', 'poller: ... and is cancelled');

SELECT is(examples.poller_done('{"status": "processing"}'), false, 'poller: processing is not final');
SELECT throws_ok($$SELECT examples.poller_step('{"resource": "r"}',
                                               '{"status": 200, "body": {"error": "gone"}}')$$,
                 'P0001', 'poll of r failed: HTTP 200: {"error": "gone"}',
                 'poller: an "error" member in the body is an error marker');

-- ---- (b) the paginated fetch ----
SELECT jobloop.submit('example_pages', jsonb_build_object('collection', :'tag', 'max_pages', 5),
                      tenant => 'examples-1') AS pages \gset
SELECT is(jobloop.wait(:pages, '30 s'), 'completed', 'pages: the fetch completes');
SELECT is((SELECT step FROM jobloop.jobs WHERE id = :pages), 5, 'pages: one step per page, 5 pages');
SELECT is((SELECT jsonb_path_query_array(state->'items', '$[*].n') FROM jobloop.jobs WHERE id = :pages),
          '[1, 2, 3, 4, 5]'::jsonb, 'pages: the items of pages 1..5 were accumulated in order');
SELECT is(ARRAY(SELECT uri FROM jltest.requests_of(:pages)),
          ARRAY(SELECT format('/json?n=%s&collection=%s', p, :'tag') FROM generate_series(1, 5) p),
          'pages: the API received pages 1..5, once each');

-- ---- (c) the webhook delivery ----
SELECT jobloop.submit('example_webhook',
                      jsonb_build_object('url', '/echo', 'event', jsonb_build_object('type', 'order.paid', 'tag', :'tag')),
                      tenant => 'examples-1') AS hook_ok \gset
SELECT jobloop.submit('example_webhook',
                      jsonb_build_object('url', '/status/503', 'event', jsonb_build_object('type', 'order.paid')),
                      tenant => 'examples-1') AS hook_503 \gset
SELECT jobloop.submit('example_webhook',
                      jsonb_build_object('url', '/status/404', 'event', jsonb_build_object('type', 'order.paid')),
                      tenant => 'examples-2') AS hook_404 \gset

SELECT is(jobloop.wait(:hook_ok, '30 s'), 'completed', 'webhook: a delivery to a working receiver completes');
SELECT is((SELECT state - 'event' FROM jobloop.jobs WHERE id = :hook_ok),
          jsonb_build_object('url', '/echo', 'delivered', true, 'http_status', 200, 'attempts', 1, 'error', null,
                             'receiver_said', jsonb_build_object('type', 'order.paid', 'tag', :'tag')),
          'webhook: delivered, and the receiver got exactly the event (the mock echoes the body)');

SELECT is(jobloop.wait(:hook_503, '60 s'), 'completed', 'webhook: a receiver that keeps answering 503 ...');
SELECT is((SELECT state - 'event' - 'receiver_said' FROM jobloop.jobs WHERE id = :hook_503),
          '{"url": "/status/503", "delivered": false, "http_status": 503, "attempts": 5,
            "error": "HTTP 503 Service Unavailable after 5 attempts"}'::jsonb,
          '... gets 5 attempts, then the step function records the failure (on_error => step)');
SELECT is(count(*), 5::bigint, 'webhook: ... 5 requests, all with the same Idempotency-Key')
  FROM jltest.requests_of(:hook_503)
 WHERE idempotency_key = jltest.idempotency_key(:hook_503, 0);

SELECT is(jobloop.wait(:hook_404, '30 s'), 'completed', 'webhook: a 404 ...');
SELECT is((SELECT jsonb_build_array(state->'delivered', state->'attempts', state->'error') FROM jobloop.jobs WHERE id = :hook_404),
          '[false, 1, "HTTP 404"]'::jsonb, '... is recorded at once, not retried');

SELECT * FROM finish();
