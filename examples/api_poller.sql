-- examples/api_poller.sql -- poll an API until the resource reaches a terminal status,
-- waiting longer between polls the longer it takes.
--
-- The job kind "example_poller": a job's state names a resource (an export, a payment, a
-- shipment...), or gives the status URL an API returned for it (such as the Location of
-- a 202 Accepted); the job GETs it until its status is final ('ready' or 'failed'), waiting
-- 0, 250, 500, 1000, 2000, 4000, 5000, 5000 ... ms between polls (delay_ms).  A waiting
-- job holds no connection; a wait longer than jobloop.hold_delay (10 s by default) is
-- not even held in a worker's memory.  An error marker in a response (an HTTP 4xx, or
-- an "error" member in the body) fails the job at once, with last_error saying why;
-- after 30 polls without a final status it fails with
-- "job reached max_steps (30) without finishing".
--
-- Load it as a superuser (or any role with USAGE on schema jobloop and CREATE on the
-- database), with the API's base URL in the psql variable api_url:
--
--   psql -v api_url=http://127.0.0.1:8080 -f examples/api_poller.sql
--
-- and submit:
--
--   SELECT jobloop.submit('example_poller', '{"resource": "export-42"}', tenant => 'acme');
--   SELECT jobloop.submit('example_poller', '{"url": "https://api.example.com/operations/7"}');
--
-- (a "url" that starts with "/" is relative to api_url).  When the status is final the
-- job completes, whatever the status: its state says which.
--
-- It runs unchanged against the mock API of the test harness (test/mock/README.md):
-- GET /json?n=N answers {"ok": true, "n": N}, with N the number of earlier polls, so
-- examples.poller_status() below calls the resource 'ready' at poll number ready_after
-- (from the job's state, 3 by default).  Against a real API, the status is in the body and
-- that function is one line.  Loading the file again replaces everything it defines.

\set ON_ERROR_STOP 1
\if :{?api_url}
\else
\set api_url http://127.0.0.1:8080
\endif

CREATE SCHEMA IF NOT EXISTS examples;

-- The API's base URL, fixed when this file is loaded (a function, not a setting: the
-- workers' sessions would not see an ALTER DATABASE ... SET made after they started).
CREATE OR REPLACE FUNCTION examples.api_url() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN :'api_url';

-- The resource's status in a response body.  A real API:  RETURN body->>'status';
-- The mock API echoes n, the number of polls so far: the resource is ready once it was
-- polled ready_after times (a number the job's state may carry, 3 by default).
CREATE OR REPLACE FUNCTION examples.poller_status(state jsonb, body jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN coalesce(body->>'status',
                    CASE WHEN (body->>'n')::int + 1 >= coalesce((state->>'ready_after')::int, 3)
                         THEN 'ready' ELSE 'processing' END);

-- request(state): GET the resource; the first poll at once, then 250 ms doubling up to 5 s.
CREATE OR REPLACE FUNCTION examples.poller_request(state jsonb) RETURNS jsonb
    LANGUAGE sql STABLE
    RETURN jsonb_build_object(
        'url',      CASE WHEN state->>'url' LIKE '/%' THEN examples.api_url() || (state->>'url')
                             WHEN state ? 'url' THEN state->>'url'
                             ELSE format('%s/json?n=%s&resource=%s', examples.api_url(),
                                         coalesce(state->>'polls', '0'), state->>'resource')
                        END,
        'headers',  jsonb_build_object('Accept', 'application/json'),
        'delay_ms', CASE WHEN coalesce((state->>'polls')::int, 0) = 0 THEN 0
                         ELSE least(5000, 250 * 2 ^ ((state->>'polls')::int - 1))::int END,
        'timeout_ms', 10000);

-- step(state, response): record the poll.  Retryable failures (408, 425, 429, 5xx,
-- timeouts, resets) never reach this function: jobloop retries them with backoff first.
CREATE OR REPLACE FUNCTION examples.poller_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    body jsonb := response->'body';
BEGIN
    -- An error marker: stop now.  The exception fails this job alone, with this message
    -- as its last_error; the state keeps what the previous step committed.
    IF (response->>'status')::int >= 400
       OR (jsonb_typeof(body) = 'object' AND body ? 'error') THEN
        RAISE EXCEPTION 'poll of % failed: HTTP %: %',
            coalesce(state->>'resource', state->>'url'), response->>'status', body;
    END IF;
    RETURN state || jsonb_build_object(
        'polls',      coalesce((state->>'polls')::int, 0) + 1,
        'status',     examples.poller_status(state, body),
        'checked_ms', response->'elapsed_ms');
END
$$;

-- done(state): is the status final?
CREATE OR REPLACE FUNCTION examples.poller_done(state jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    RETURN state->>'status' IN ('ready', 'failed');

SELECT jobloop.create_kind(
    name         => 'example_poller',
    request      => 'examples.poller_request(jsonb)',
    step         => 'examples.poller_step(jsonb,jsonb)',
    done         => 'examples.poller_done(jsonb)',
    max_steps    => 30,           -- 30 polls, then the job fails
    max_attempts => 5,            -- per poll, for retryable failures
    backoff      => '1 second',
    max_backoff  => '1 minute');

-- Roles that submit these jobs need (the jobs run their functions as the submitter):
--   GRANT USAGE ON SCHEMA jobloop, examples TO app;
-- and EXECUTE on the functions, which PUBLIC has unless you revoke it.
