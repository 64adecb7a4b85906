-- examples/paginated_fetch.sql -- fetch every page of a paginated API into one job's
-- state.
--
-- The job kind "example_pages": a job GETs page 1, 2, 3 ... of a collection and appends
-- each page's items to its state, until the API says there is no next page (or, for
-- APIs that do not say, until the page limit in the state).  The request function
-- returns NULL when there is nothing left to fetch: that completes the job.  Each page
-- is one step, committed before the next request is sent, so a crash resumes at the
-- first page not yet committed.
--
-- Load it with the API's base URL in the psql variable api_url:
--
--   psql -v api_url=http://127.0.0.1:8080 -f examples/paginated_fetch.sql
--
-- and submit (max_pages is optional, 100 by default):
--
--   SELECT jobloop.submit('example_pages', '{"collection": "invoices", "max_pages": 5}');
--
-- The items end up in the job's state:  SELECT state->'items' FROM jobloop.status(<id>);
--
-- Against the mock API of the test harness, GET /json?n=N answers {"ok": true, "n": N}
-- with no "items" and no "next_page": each page then contributes its whole body as
-- one item, and max_pages decides where it stops.
--
-- State size: the state is rewritten at every step, so keep it small (a few hundred kB
-- at most).  For big collections, let the step function INSERT each page into a table
-- of yours instead (INSERT ... ON CONFLICT (job, page) DO NOTHING: a step may run
-- twice after a crash), and keep only the cursor in the state.

\set ON_ERROR_STOP 1
\if :{?api_url}
\else
\set api_url http://127.0.0.1:8080
\endif

CREATE SCHEMA IF NOT EXISTS examples;

CREATE OR REPLACE FUNCTION examples.api_url() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN :'api_url';

-- request(state): the next page, or NULL when there is none (the job then completes).
CREATE OR REPLACE FUNCTION examples.pages_request(state jsonb) RETURNS jsonb
    LANGUAGE sql STABLE
    RETURN CASE
        WHEN coalesce((state->>'page')::int, 1) > coalesce((state->>'max_pages')::int, 100)
            THEN NULL
        WHEN state ? 'page' AND jsonb_typeof(state->'page') = 'null'
            THEN NULL                       -- the API said: no next page
        ELSE jsonb_build_object(
            'url', format('%s/json?n=%s&collection=%s', examples.api_url(),
                          coalesce(state->>'page', '1'), state->>'collection'),
            'headers', jsonb_build_object('Accept', 'application/json'))
    END;

-- step(state, response): append the page's items, move to the next page.
CREATE OR REPLACE FUNCTION examples.pages_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    body jsonb := response->'body';
    page int := coalesce((state->>'page')::int, 1);
BEGIN
    IF (response->>'status')::int <> 200 THEN
        RAISE EXCEPTION 'page % of % answered HTTP %', page, state->>'collection',
            response->>'status';
    END IF;
    RETURN state || jsonb_build_object(
        'items', coalesce(state->'items', '[]') ||
                 CASE WHEN jsonb_typeof(body->'items') = 'array' THEN body->'items'
                      ELSE jsonb_build_array(body) END,
        'pages', page,
        -- the API's next page if it names one (null: no more), else simply page + 1
        'page',  CASE WHEN jsonb_typeof(body) = 'object' AND body ? 'next_page'
                      THEN body->'next_page' ELSE to_jsonb(page + 1) END);
END
$$;

SELECT jobloop.create_kind(
    name      => 'example_pages',
    request   => 'examples.pages_request(jsonb)',
    step      => 'examples.pages_step(jsonb,jsonb)',
    max_steps => 1000);           -- a safety net: no collection has more pages than that

-- Roles that submit these jobs need:  GRANT USAGE ON SCHEMA jobloop, examples TO app;
