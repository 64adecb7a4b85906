-- hostile.sql: what a hostile API or hostile business logic sends fails its own
-- job, at once and with a reason that says what happened, and never reaches the
-- worker's memory, locks or later jobs (issue 10).  The cases that need their
-- own cluster or settings are in test/suites/hostile.sh and test/suites/guard.sh.
--
-- The mock's /hostile/... endpoints are in test/mock/nginx.conf.in (the block
-- "hostile inputs").
\ir lib.psql

SELECT plan(37);

\o /dev/null
-- Scripted jobs (lib.psql) with 5 attempts: a failure that is wrongly retried
-- shows up as attempts > 1 and as several requests in the mock's log.
SELECT jobloop.create_kind('hostile_script', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 5, backoff => '20 ms', max_backoff => '50 ms');
\o

SELECT jltest.tag() AS tag \gset
-- The workers now: none of them may die or be replaced by what follows.
SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') AS workers0
  FROM pg_stat_activity WHERE backend_type = 'jobloop worker' \gset
SELECT count(*) AS log2_lines0 FROM jltest.access_log('test.mock_log2') \gset

-- ==== 1. Redirects to a scheme that is not http(s), and the heap they corrupted ========
-- A 302 to gopher:, ftp: or file: fails the job at once (not retried as a transport
-- error); the redirect is never followed.
CREATE TEMP TABLE hostile_redirects AS
SELECT target, i, jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/hostile/redirect/%s?tag=%s&i=%s', target, :'tag', i)))) AS id
  FROM (VALUES ('gopher'), ('ftp'), ('file')) v(target), generate_series(1, 3) i;

SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') = 'failed'), 9::bigint,
          'redirects to gopher:, ftp: and file: fail their jobs')
  FROM hostile_redirects;
SELECT is_empty($$SELECT r.target, j.attempts FROM hostile_redirects r JOIN jobloop.jobs j USING (id)
                   WHERE j.attempts IS DISTINCT FROM 1$$,
                'at once: attempts = 1, not retried as a transport error');
SELECT is_empty($$SELECT r.target, j.last_error FROM hostile_redirects r JOIN jobloop.jobs j USING (id)
                   WHERE j.last_error IS NULL OR j.last_error NOT LIKE '%redirect%'
                      OR j.last_error NOT LIKE '%only http and https%'$$,
                'last_error says the redirect was refused: only http and https are allowed');
SELECT is_empty($$SELECT r.target, count(a.*) FROM hostile_redirects r LEFT JOIN jltest.access_log() a ON a.key_job = r.id
                   GROUP BY r.target, r.i HAVING count(a.*) <> 1$$,
                'the API received exactly one request per job');

-- A redirect to an address jobloop.allowed_hosts does not list (127.0.0.2).
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/hostile/redirect/refused?tag=%s', :'tag')))) AS redirect_refused \gset
SELECT is(jobloop.wait(:redirect_refused, '30 s'), 'failed', 'a redirect to a refused address fails the job');
SELECT ok(attempts = 1 AND last_error LIKE '%not in jobloop.allowed_hosts%',
          'at once, as a refused address: ' || coalesce(last_error, 'no error') || ', attempts ' || attempts)
  FROM jobloop.jobs WHERE id = :redirect_refused;
SELECT is((SELECT count(*) FROM jltest.access_log('test.mock_log2')), :log2_lines0::bigint,
          'and 127.0.0.2 received nothing');

-- The easy handles those transfers used are reused: responses much larger than 4 kB
-- (libcurl's receive buffer was 4 kB and then written as if 16 kB) must arrive whole,
-- also mixed with more bad redirects in the same turns.
CREATE TEMP TABLE hostile_big AS
SELECT round, i, jltest.submit_script('hostile_script', jsonb_build_array(
           jsonb_build_object('url', format('/big?kb=64&tag=%s&i=%s', :'tag', i)),
           jsonb_build_object('url', format('/big?kb=17&tag=%s&i=%s', :'tag', i)),
           jsonb_build_object('url', format('/big?kb=200&tag=%s&i=%s', :'tag', i)))) AS id
  FROM generate_series(1, 8) i, (VALUES (1)) r(round);
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') = 'completed'), 8::bigint,
          'after those redirects, 8 jobs fetching 64, 17 and 200 KiB bodies complete')
  FROM hostile_big WHERE round = 1;

INSERT INTO hostile_redirects
SELECT target, 10 + i, jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/hostile/redirect/%s?tag=%s&i=%s', target, :'tag', 10 + i))))
  FROM (VALUES ('gopher'), ('ftp'), ('file')) v(target), generate_series(1, 4) i;
INSERT INTO hostile_big
SELECT 2, i, jltest.submit_script('hostile_script', jsonb_build_array(
           jsonb_build_object('url', format('/big?kb=64&tag=%s&i=%s', :'tag', i)),
           jsonb_build_object('url', format('/big?kb=17&tag=%s&i=%s', :'tag', i)),
           jsonb_build_object('url', format('/big?kb=200&tag=%s&i=%s', :'tag', i))))
  FROM generate_series(1, 8) i;
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '30 s') IN ('completed', 'failed')), 20::bigint,
          'another 12 bad redirects and 8 big-body jobs submitted together all finish')
  FROM (SELECT id FROM hostile_redirects WHERE i > 10 UNION ALL SELECT id FROM hostile_big WHERE round = 2) x;
SELECT is_empty($$SELECT b.round, b.i, j.status, j.last_error FROM hostile_big b JOIN jobloop.jobs j USING (id)
                   WHERE j.status <> 'completed'$$,
                'every big-body job completed');
SELECT is_empty($$SELECT b.round, b.i, k, length(j.state->'responses'->k->>'body') AS have
                    FROM hostile_big b JOIN jobloop.jobs j USING (id),
                         (VALUES (0, 64), (1, 17), (2, 200)) v(k, kb)
                   WHERE length(j.state->'responses'->k->>'body') IS DISTINCT FROM kb * 1024
                      OR j.state->'responses'->k->>'body' !~ '^x*$'$$,
                'and every body arrived whole: exactly 64, 17 and 200 KiB of x');
SELECT is_empty($$SELECT r.target, r.i, j.status, j.attempts, j.last_error
                    FROM hostile_redirects r JOIN jobloop.jobs j USING (id)
                   WHERE r.i > 10 AND (j.status <> 'failed' OR j.attempts <> 1
                                       OR j.last_error NOT LIKE '%only http and https%')$$,
                'the second round of redirects failed at once too');

-- ==== 8. Response headers that are too big, request headers that make no sense ==========
-- 34 header lines of 8 KiB: over the 256 kB cap on headers (not the body's limit).
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/hostile/headers/flood?tag=%s', :'tag')))) AS flood \gset
SELECT is(jobloop.wait(:flood, '30 s'), 'failed', 'a response with 279 kB of header lines fails the job');
SELECT ok(last_error LIKE '%response headers%256 kB%' AND last_error NOT LIKE '%max_response_size%',
          'last_error names the 256 kB cap on response headers, not max_response_size: ' || coalesce(last_error, 'no error'))
  FROM jobloop.jobs WHERE id = :flood;
SELECT is(attempts, 1, 'it is not retried') FROM jobloop.jobs WHERE id = :flood;

-- One header line of 128 KiB: libcurl refuses lines over 100 kB ("Out of memory").
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/hostile/headers/long?tag=%s', :'tag')))) AS long_line \gset
SELECT is(jobloop.wait(:long_line, '30 s'), 'failed', 'a response with a 128 KiB header line fails the job');
SELECT ok(last_error LIKE '%header line%' AND last_error NOT ILIKE '%out of memory%',
          'last_error says a header line was too long, not "Out of memory": ' || coalesce(last_error, 'no error'))
  FROM jobloop.jobs WHERE id = :long_line;
SELECT is(attempts, 1, 'it is not retried') FROM jobloop.jobs WHERE id = :long_line;
SELECT is((SELECT count(*) FROM jltest.requests_of(:long_line)), 1::bigint, 'the API received one request');

-- An empty Idempotency-Key would make libcurl drop the header: an error, not silence.
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/echo_headers?tag=%s&case=empty_key', :'tag'),
           'headers', jsonb_build_object('Idempotency-Key', '')))) AS empty_key \gset
SELECT is(jobloop.wait(:empty_key, '30 s'), 'failed', 'a request with "Idempotency-Key": "" fails the job');
SELECT ok(last_error LIKE '%Idempotency-Key%empty%',
          'last_error says the Idempotency-Key is empty: ' || coalesce(last_error, 'no error'))
  FROM jobloop.jobs WHERE id = :empty_key;
SELECT is_empty(format($$SELECT 1 FROM jltest.access_log() WHERE uri = '/echo_headers?tag=%s&case=empty_key'$$, :'tag'),
                'and nothing was sent');

-- DELETE with "body": null has no body, so no Content-Type (libcurl's default for a
-- custom request with fields would be application/x-www-form-urlencoded).
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/echo_headers?tag=%s&case=delete_null', :'tag'), 'method', 'DELETE', 'body', 'null'::jsonb)))
       AS delete_null \gset
SELECT is(jobloop.wait(:delete_null, '30 s'), 'completed', 'a DELETE with "body": null completes');
SELECT is(state->'responses'->0->'body'->>'method', 'DELETE', 'it was sent as DELETE')
  FROM jobloop.jobs WHERE id = :delete_null;
SELECT is(state->'responses'->0->'body'->>'content_type', '', 'with no Content-Type header')
  FROM jobloop.jobs WHERE id = :delete_null;

-- ==== 6. Session-level advisory locks taken by a job's function ==========================
-- The documented guarantee: nothing a job's function does outlives its call in the
-- worker's session.  A lock taken with pg_advisory_lock() is session state; it must be
-- released (or refused) when the call ends, whatever the job's outcome.
CREATE OR REPLACE FUNCTION hostile_lock_step(state jsonb, response jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_lock(4242);
    PERFORM pg_advisory_lock_shared(4243);
    RETURN jltest.script_step(state, response);
END
$$;
\o /dev/null
SELECT jobloop.create_kind('hostile_lock', 'jltest.script_request(jsonb)', 'hostile_lock_step(jsonb,jsonb)',
                           max_attempts => 1);
\o
SELECT jobloop.submit('hostile_lock', jsonb_build_object('base', jltest.url(), 'reqs', jsonb_build_array(
           jsonb_build_object('url', format('/json?tag=%s&case=lock', :'tag'))))) AS lock_job \gset
SELECT ok(jobloop.wait(:lock_job, '30 s') IN ('completed', 'failed'), 'a job whose step takes session-level advisory locks finishes');
-- Leaked locks stay forever; a claim's transaction-level lock (taken while tenant caps
-- exist) comes and goes, hence "eventually".
SELECT ok(jltest.eventually($$SELECT NOT EXISTS (
              SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid)
               WHERE a.backend_type = 'jobloop worker' AND l.locktype = 'advisory')$$, '5 s'),
          'afterwards no jobloop worker holds an advisory lock');
SELECT ok(pg_try_advisory_lock(4242), 'another session can take the same lock (4242)');
SELECT ok(pg_try_advisory_lock(4243), 'and the one taken in share mode (4243) exclusively');
SELECT pg_advisory_unlock_all();

-- ==== 7. State and request body size limits (jobloop.max_state_size, max_request_size) ====
-- 3 MB of hex (md5 digests do not compress well), over the default 1MB of both.
CREATE OR REPLACE FUNCTION hostile_pad(kb integer) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(md5(i::text), '') FROM generate_series(1, kb * 32) i
$$;
CREATE OR REPLACE FUNCTION hostile_size_request(state jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN state ? 'n' THEN NULL
                WHEN state->>'mode' = 'big_request'
                THEN jsonb_build_object('url', format('%s/echo?tag=%s&case=big_request', state->>'base', state->>'tag'),
                                        'method', 'POST', 'body', hostile_pad(3 * 1024))
                ELSE jsonb_build_object('url', format('%s/json?tag=%s&case=%s', state->>'base', state->>'tag', state->>'mode'))
           END
$$;
CREATE OR REPLACE FUNCTION hostile_size_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT state || jsonb_build_object('n', 1)
                 || CASE WHEN state->>'mode' = 'big_state' THEN jsonb_build_object('pad', hostile_pad(3 * 1024))
                         ELSE '{}' END
$$;
\o /dev/null
SELECT jobloop.create_kind('hostile_size', 'hostile_size_request(jsonb)', 'hostile_size_step(jsonb,jsonb)',
                           max_attempts => 1);
\o
SELECT throws_like($$SELECT jobloop.submit('hostile_size', jsonb_build_object('n', 1, 'pad', hostile_pad(3 * 1024)))$$,
                   '%jobloop.max_state_size%',
                   'submit with a 3 MB initial state is refused, naming jobloop.max_state_size');
CREATE TEMP TABLE hostile_sizes AS
SELECT mode, jobloop.submit('hostile_size', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'mode', mode)) AS id
  FROM (VALUES ('big_state'), ('big_request'), ('plain')) v(mode);
SELECT results_eq($$SELECT mode, jobloop.wait(id, '30 s')::text FROM hostile_sizes ORDER BY mode$$,
                  $$VALUES ('big_request', 'failed'), ('big_state', 'failed'), ('plain', 'completed')$$,
                  'a step returning a 3 MB state and a 3 MB request body fail their jobs; a plain job beside them completes');
SELECT ok(last_error LIKE '%jobloop.max_state_size%', 'the state: ' || coalesce(last_error, 'no error'))
  FROM jobloop.jobs WHERE id = (SELECT id FROM hostile_sizes WHERE mode = 'big_state');
SELECT ok(last_error LIKE '%jobloop.max_request_size%', 'the request body: ' || coalesce(last_error, 'no error'))
  FROM jobloop.jobs WHERE id = (SELECT id FROM hostile_sizes WHERE mode = 'big_request');
SELECT is_empty(format($$SELECT 1 FROM jltest.access_log() WHERE uri = '/echo?tag=%s&case=big_request'$$, :'tag'),
                'the oversized request body was never sent');

-- ==== The workers survived all of it ======================================================
SELECT is((SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity
            WHERE backend_type = 'jobloop worker'), :'workers0',
          'the same jobloop workers (pids ' || :'workers0' || ') are still running');
SELECT jltest.submit_script('hostile_script', jsonb_build_array(jsonb_build_object(
           'url', format('/big?kb=300&tag=%s&case=last', :'tag')))) AS last_job \gset
SELECT is(jobloop.wait(:last_job, '30 s'), 'completed', 'and a last job with a 300 KiB body completes');
SELECT is(length(state->'responses'->0->>'body'), 300 * 1024, 'whole') FROM jobloop.jobs WHERE id = :last_job;

SELECT * FROM finish();
