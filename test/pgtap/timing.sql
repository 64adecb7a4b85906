-- timing.sql: delay_ms and start_at hold a job back (lower bounds read from
-- the mock's access log, never an assertion on speed); cancel aborts a
-- running job's call.
\ir lib.psql

SELECT plan(26);

\o /dev/null
SELECT jobloop.create_kind('timing_script', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)');
SELECT jobloop.create_kind('timing_timeout', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           timeout => '300 ms', max_attempts => 1);
SELECT jobloop.create_kind('timing_retry', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 2, backoff => '50 ms', max_backoff => '50 ms');
\o

-- delay_ms between steps: step 1's request is sent at least 1.5 s after step 0's.
SELECT jltest.submit_script('timing_script', '[{"url": "/json?n=0"}, {"url": "/json?n=1", "delay_ms": 1500}]') AS delayed \gset
-- delay_ms on the first request: sent at least 1 s after submit.
SELECT clock_timestamp() AS submitted_at \gset
SELECT jltest.submit_script('timing_script', '[{"url": "/json?n=0", "delay_ms": 1000}]') AS first_delayed \gset
-- start_at: the job does not start before it.
SELECT clock_timestamp() + interval '1.5 s' AS start_at \gset
SELECT jobloop.submit('timing_script', jsonb_build_object('base', jltest.url(), 'reqs', '[{"url": "/json?n=0"}]'::jsonb),
                      NULL, :'start_at') AS scheduled \gset

SELECT is(jobloop.wait(:delayed, '30 s'), 'completed', 'a job with delay_ms completes');
SELECT is((SELECT count(*) FROM jltest.requests_of(:delayed)), 2::bigint, 'after 2 requests');
SELECT cmp_ok((SELECT max(at) - min(at) FROM jltest.requests_of(:delayed)), '>=', 1.5 - 0.002,
              'the second request came at least delay_ms (1.5 s) after the first');

SELECT is(jobloop.wait(:first_delayed, '30 s'), 'completed', 'a job whose first request has delay_ms completes');
SELECT cmp_ok((SELECT min(at) FROM jltest.requests_of(:first_delayed)) - extract(epoch FROM :'submitted_at'::timestamptz),
              '>=', 1.0 - 0.002, 'its request was sent at least 1 s after submit');

SELECT is((SELECT run_after FROM jobloop.jobs WHERE id = :scheduled), :'start_at'::timestamptz,
          'a job submitted with start_at runs after it');
SELECT is(jobloop.wait(:scheduled, '30 s'), 'completed', 'and completes after start_at');
SELECT cmp_ok((SELECT min(at) FROM jltest.requests_of(:scheduled)) - extract(epoch FROM :'start_at'::timestamptz),
              '>=', -0.002, 'its request was not sent before start_at');
SELECT cmp_ok(started_at, '>=', :'start_at'::timestamptz, 'started_at is not before start_at')
  FROM jobloop.jobs WHERE id = :scheduled;

-- Cancel a running job whose call hangs (/slow answers after 30 s).
SELECT jltest.submit_script('timing_script', '[{"url": "/slow"}]') AS slow \gset
SELECT ok(jltest.eventually(format($$SELECT status = 'running' FROM jobloop.jobs WHERE id = %s$$, :slow)),
          'a job calling /slow is running');
SELECT ok(jobloop.cancel(:slow), 'cancel() of a running job returns true');
SELECT is(jobloop.wait(:slow, '5 s'), 'cancelled', 'the job is cancelled');

-- Cancel a running job in the middle of a response (/drip sends a byte per
-- second for 60 s): the worker drops the connection, which the mock logs
-- when it notices the client left.
SELECT jltest.tag() AS tag \gset
SELECT jltest.submit_script('timing_script', jsonb_build_array(jsonb_build_object('url', '/drip?tag=' || :'tag'))) AS drip \gset
SELECT ok(jltest.eventually(format($$SELECT status = 'running' FROM jobloop.jobs WHERE id = %s$$, :drip)),
          'a job calling /drip is running');
-- The worker sends a request right after it commits the claim.  To be sure
-- the /drip call is under way before cancelling, run another job through
-- the same worker and wait for it: it was claimed and sent later.
SELECT jltest.submit_script('timing_script', '[{"url": "/json?n=1"}]') AS barrier \gset
SELECT is(jobloop.wait(:barrier, '30 s'), 'completed', 'a job started after it completes meanwhile');
SELECT ok(jobloop.cancel(:drip), 'cancel() returns true');
SELECT ok(jltest.eventually(format($$SELECT EXISTS (SELECT 1 FROM jltest.requests_tagged(%L))$$, :'tag'), '30 s'),
          'the mock saw the /drip request end');
SELECT cmp_ok((SELECT max(request_time) FROM jltest.requests_tagged(:'tag')), '<', 30.0,
              'long before its 60 s: the call was aborted');
SELECT ok(status = 'cancelled' AND step = 0 AND finished_at IS NOT NULL AND worker IS NULL,
          'the job stays cancelled, at step 0, released')
  FROM jobloop.jobs WHERE id = :drip;

-- Timeouts: the kind's timeout, a request's timeout_ms (which wins).
SELECT jltest.submit_script('timing_timeout', '[{"url": "/delay?s=3"}]') AS kind_timeout \gset
SELECT jltest.submit_script('timing_timeout', '[{"url": "/delay?s=1", "timeout_ms": 5000}]') AS request_timeout_longer \gset
SELECT jltest.submit_script('timing_retry', '[{"url": "/drip", "timeout_ms": 200}]') AS request_timeout \gset
SELECT jltest.submit_script('timing_script', '[{"url": "/delay?s=0.3"}]') AS elapsed \gset
SELECT is(jobloop.wait(:kind_timeout, '30 s'), 'failed', 'a call longer than the kind''s timeout fails');
SELECT matches(last_error, '^Operation timed out after \d+ milliseconds.* after 1 attempts$', 'timed out, after 1 attempt')
  FROM jobloop.jobs WHERE id = :kind_timeout;
SELECT is(jobloop.wait(:request_timeout_longer, '30 s'), 'completed', 'a request''s longer timeout_ms overrides the kind''s');
SELECT is(jobloop.wait(:request_timeout, '30 s'), 'failed', 'a request''s own timeout_ms applies too');
SELECT matches(last_error, '^Operation timed out after \d+ milliseconds.* after 2 attempts$',
               'a timeout is a transport error: retried, then failed')
  FROM jobloop.jobs WHERE id = :request_timeout;
SELECT is((SELECT count(*) FROM jltest.requests_of(:request_timeout)), 2::bigint, 'the API got 2 requests')
  FROM (SELECT jltest.eventually(format('SELECT count(*) = 2 FROM jltest.requests_of(%s)', :request_timeout), '10 s')) e;
SELECT is(jobloop.wait(:elapsed, '30 s'), 'completed', 'a 0.3 s call completes');
-- nginx keeps its clock in whole milliseconds, so its 300 ms sleep can end up to 1 ms
-- early; libcurl's time is truncated to the millisecond too.
SELECT cmp_ok((state->'responses'->0->>'elapsed_ms')::numeric, '>=', 298::numeric, 'elapsed_ms counts its 300 ms')
  FROM jobloop.jobs WHERE id = :elapsed;

SELECT * FROM finish();
