-- examples/demo_kind.sql -- the job kind that scripts/run-demo.sh runs.
--
-- A web shop wants to know when each order has shipped.  The carrier's order-status API
-- is slow (~50 ms) and an order takes a few polls before it ships, so every order gets
-- one jobloop job: poll the API, record what it said, stop when the order is shipped
-- (or a human has to look at it).  The business logic is three small SQL functions:
--
--   request(state)           -> the next HTTP request (jsonb)
--   step(state, response)    -> the new state
--   done(state)              -> is the order's status final?
--
-- They are plain functions: try them with a SELECT, no worker or network needed, e.g.
--   SELECT shop.order_status_step('{"order_id": 7, "polls": 0}',
--                                 '{"status": 200, "body": {"ok": true, "n": 0}}');
--
-- Run with psql as a superuser, with the API's base URL in the variable `api`:
--   psql -v api=http://127.0.0.1:8080 -f examples/demo_kind.sql
--
-- Roles (the security model): the job's functions run as the role that submitted it,
-- and a role sees only its own jobs.
--   shop_owner   NOLOGIN  owns the schema, the functions and the kind (the deployer)
--   shop_web     LOGIN    the web front end: submits and watches its own jobs
--   shop_mobile  LOGIN    the mobile back end: same, sees only its own jobs
--   shop_ops     LOGIN    operations: member of jobloop_admin, sees every job

\set ON_ERROR_STOP 1

CREATE ROLE shop_owner NOLOGIN;
CREATE ROLE shop_web LOGIN;
CREATE ROLE shop_mobile LOGIN;
CREATE ROLE shop_ops LOGIN IN ROLE jobloop_admin;

-- Everyone who submits or creates kinds needs the jobloop schema.
GRANT USAGE ON SCHEMA jobloop TO shop_owner, shop_web, shop_mobile, shop_ops;

CREATE SCHEMA shop AUTHORIZATION shop_owner;
SET ROLE shop_owner;

-- Where the carrier's API lives (the mock API on loopback in the demo).
CREATE FUNCTION shop.api_base() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN :'api';

-- request(state): ask the order-status API about this order.  The API takes ~50 ms
-- (/delay?s=0.05); n= carries the poll count so the access log shows each poll.  After
-- the second poll we back off: every other request waits 100 ms first (delay_ms), like
-- a polite polling interval.  A waiting job holds no connection.
CREATE FUNCTION shop.order_status_request(state jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    polls integer := coalesce((state->>'polls')::integer, 0);
BEGIN
    RETURN jsonb_build_object(
        'url',      format('%s/delay?s=0.05&n=%s', shop.api_base(), polls),
        'headers',  jsonb_build_object('Accept', 'application/json'),
        'delay_ms', CASE WHEN polls >= 2 AND polls % 2 = 0 THEN 100 ELSE 0 END);
END
$$;

-- step(state, response): record the poll and decide the order's status.  The mock API
-- cannot know our orders, so the "carrier" is simulated here, deterministically from the
-- order id: an order ships after 2..12 polls, and 1 order in 40 needs a human review.
-- Retryable errors (429, 5xx, timeouts) never reach step: jobloop retries them first.
CREATE FUNCTION shop.order_status_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    order_id bigint  := (state->>'order_id')::bigint;
    polls    integer := coalesce((state->>'polls')::integer, 0) + 1;
    status   text;
BEGIN
    IF (response->>'status')::integer <> 200 THEN
        -- an error here fails this job alone, with this message as last_error
        RAISE EXCEPTION 'order API answered HTTP % for order %', response->>'status', order_id;
    END IF;
    status := CASE
        WHEN order_id % 40 = 0 AND polls >= 3  THEN 'needs_review'
        WHEN polls >= 2 + order_id % 11        THEN 'shipped'
        WHEN polls >= 2                        THEN 'packed'
        ELSE 'processing'
    END;
    RETURN state || jsonb_build_object(
        'polls',  polls,
        'status', status,
        'api_ms', response->'elapsed_ms');
END
$$;

-- done(state): stop polling once the status is final.
CREATE FUNCTION shop.order_status_done(state jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    RETURN state->>'status' IN ('shipped', 'needs_review');

-- EXECUTE is granted deliberately: only the apps may run (and so submit) these jobs.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shop FROM PUBLIC;
GRANT USAGE ON SCHEMA shop TO shop_web, shop_mobile;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA shop TO shop_web, shop_mobile;

-- The kind: its business logic and its limits.  An order never needs more than 50 polls.
SELECT jobloop.create_kind(
    name      => 'order_status',
    request   => 'shop.order_status_request(jsonb)',
    step      => 'shop.order_status_step(jsonb,jsonb)',
    done      => 'shop.order_status_done(jsonb)',
    max_steps => 50);

RESET ROLE;
