-- examples/webhook_delivery.sql -- deliver a webhook, retrying until the receiver takes
-- it, and record the outcome either way.
--
-- The job kind "example_webhook": a job POSTs one event (JSON) to one receiver URL.
-- jobloop retries 408, 425, 429, 500, 502, 503, 504 and transport errors (timeouts,
-- resets, refused connections) with exponential backoff and jitter, honouring
-- Retry-After, up to max_attempts; every attempt carries the same Idempotency-Key
-- (jobloop-<system id>-<database oid>-<job id>-<step>), so a receiver can drop repeats.
-- The kind uses on_error => 'step': when the attempts run out, the step function still
-- runs, with {"error": ..., "attempts": n, "status": ..., "headers": ..., "body": ...},
-- and records the failure in the state; the job completes either way and its state says
-- what happened ("delivered": true/false).  Any other answer (2xx, or a 4xx such as 404
-- or 410, which retrying will not fix) reaches the step function at once.
--
-- Load it with the API's base URL in the psql variable api_url:
--
--   psql -v api_url=http://127.0.0.1:8080 -f examples/webhook_delivery.sql
--
-- and submit one job per (event, receiver):
--
--   SELECT jobloop.submit('example_webhook',
--              jsonb_build_object('url', 'https://hooks.example.com/orders',
--                                 'event', jsonb_build_object('type', 'order.paid', 'order_id', 42)),
--              tenant => 'acme');
--
-- A "url" that starts with "/" is relative to api_url (so the tests can use the mock
-- API's /echo and /status/503).  Receiver URLs usually come from your users: jobloop's
-- outbound guard refuses loopback, private and link-local addresses (also after DNS and
-- on redirects) unless jobloop.allowed_hosts lists them; such a refusal is final (not
-- retried) and reaches the step function as {"error": "refused to connect to ..."}.  The body is signed: X-Signature is the hex SHA-256 of
-- secret || body.  That shows the one rule that matters, sign the exact bytes sent, so
-- the body is sent as a string (a JSON value would be re-serialised by jobloop).  Use
-- pgcrypto's hmac() in production, and keep the secret in a table only the kind's
-- owner can read (a SECURITY DEFINER function with a pinned search_path can return it).
--
-- Retries: 5 attempts, 500 ms doubling up to 1 min apart (plus jitter).  For real
-- receivers, raise them (e.g. max_attempts => 15, max_backoff => '1 hour'): waits longer
-- than jobloop.hold_delay go back to the table and cost no worker memory meanwhile.

\set ON_ERROR_STOP 1
\if :{?api_url}
\else
\set api_url http://127.0.0.1:8080
\endif

CREATE SCHEMA IF NOT EXISTS examples;

CREATE OR REPLACE FUNCTION examples.api_url() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN :'api_url';

-- The signing secret (illustration only: see above).
CREATE OR REPLACE FUNCTION examples.webhook_secret() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN 'whsec_example';

-- request(state): POST the event.
CREATE OR REPLACE FUNCTION examples.webhook_request(state jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    body text := (state->'event')::text;
BEGIN
    RETURN jsonb_build_object(
        'method',  'POST',
        'url',     CASE WHEN state->>'url' LIKE '/%' THEN examples.api_url() || (state->>'url')
                        ELSE state->>'url' END,
        'headers', jsonb_build_object(
                       'Content-Type', 'application/json',
                       'X-Signature',  encode(sha256(convert_to(examples.webhook_secret() || body,
                                                                'UTF8')), 'hex')),
        'body',    body,
        'timeout_ms', 10000);
END
$$;

-- step(state, response): record the outcome.  2xx: delivered.  Anything else is final
-- too: a 4xx, or {"error": ...} when jobloop's retries ran out (on_error => 'step').
CREATE OR REPLACE FUNCTION examples.webhook_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    http      int     := (response->>'status')::int;     -- null after a transport error
    delivered boolean := http BETWEEN 200 AND 299 AND NOT response ? 'error';
BEGIN
    RETURN state || jsonb_build_object(
        'delivered',     coalesce(delivered, false),
        'http_status',   http,
        'attempts',      coalesce((response->>'attempts')::int, 1),
        'error',         CASE WHEN delivered THEN NULL
                              ELSE coalesce(response->>'error', 'HTTP ' || http) END,
        'receiver_said', response->'body');
END
$$;

-- done(state): an outcome is recorded.
CREATE OR REPLACE FUNCTION examples.webhook_done(state jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    RETURN state ? 'delivered';

SELECT jobloop.create_kind(
    name         => 'example_webhook',
    request      => 'examples.webhook_request(jsonb)',
    step         => 'examples.webhook_step(jsonb,jsonb)',
    done         => 'examples.webhook_done(jsonb)',
    max_steps    => 1,            -- one delivery per job
    max_attempts => 5,
    backoff      => '500 ms',
    max_backoff  => '1 minute',
    on_error     => 'step');

-- Roles that submit these jobs need:  GRANT USAGE ON SCHEMA jobloop, examples TO app;
