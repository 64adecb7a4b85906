/*
 * jobloop 0.1.0 — install script.
 *
 * The job row is the single source of truth: a worker holds a job only under
 * a lease (worker, lease_expires_at), and every step commits the new state,
 * the step counter and the next request together.  Every identifier here is
 * schema-qualified, and functions that run SQL pin their search_path.
 */
\echo Use "CREATE EXTENSION jobloop" to load this file. \quit

-- Members of jobloop_admin see and cancel every job (superusers always do).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'jobloop_admin') THEN
        CREATE ROLE jobloop_admin NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA jobloop TO jobloop_admin;

-- A kind: the business logic of a type of job, and its defaults.
CREATE TABLE jobloop.kind (
    name         text PRIMARY KEY
                 CHECK (pg_catalog.length(name) OPERATOR(pg_catalog.>) 0
                        AND pg_catalog.length(name) OPERATOR(pg_catalog.<=) 63),
    owner        regrole NOT NULL,
    request_fn   regprocedure NOT NULL,
    step_fn      regprocedure NOT NULL,
    done_fn      regprocedure,
    max_steps    integer NOT NULL CHECK (max_steps OPERATOR(pg_catalog.>) 0),
    max_attempts integer NOT NULL CHECK (max_attempts OPERATOR(pg_catalog.>) 0),
    backoff      interval NOT NULL,
    max_backoff  interval NOT NULL,
    timeout      interval,
    notify_steps boolean NOT NULL,
    on_error     text NOT NULL CHECK (on_error OPERATOR(pg_catalog.=) ANY (ARRAY['fail', 'step'])),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- A job.  step counts completed steps; request is the next HTTP request,
-- computed in the same transaction as state, so a reclaimed job resends
-- exactly what its last committed step asked for.
CREATE TABLE jobloop.job (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text NOT NULL REFERENCES jobloop.kind (name),
    owner            regrole NOT NULL,
    tenant           text CHECK (pg_catalog.length(tenant) OPERATOR(pg_catalog.<=) 200),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status OPERATOR(pg_catalog.=) ANY
                            (ARRAY['pending', 'running', 'completed', 'failed', 'cancelled'])),
    step             integer NOT NULL DEFAULT 0,
    state            jsonb NOT NULL,
    request          jsonb,
    last_error       text,
    attempts         integer NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    worker           integer,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    started_at       timestamptz,
    finished_at      timestamptz
) WITH (fillfactor = 80);	-- room for HOT updates: a step touches no indexed column

-- What a worker claims: unheld, unfinished jobs whose time has come.
CREATE INDEX job_runnable_idx ON jobloop.job (run_after, id)
    WHERE worker IS NULL AND status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running']);
-- Fair claiming walks the tenants that have runnable jobs, then each one's oldest.
CREATE INDEX job_tenant_runnable_idx ON jobloop.job ((COALESCE(tenant, '')), run_after, id)
    WHERE worker IS NULL AND status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running']);
-- A tenant's held jobs, counted against its concurrency cap.
CREATE INDEX job_tenant_held_idx ON jobloop.job ((COALESCE(tenant, '')))
    WHERE worker IS NOT NULL;
-- What a worker holds: lease renewal, release, and the reaper.
CREATE INDEX job_worker_idx ON jobloop.job (worker) WHERE worker IS NOT NULL;
CREATE INDEX job_kind_idx ON jobloop.job (kind);

-- Row-level security: a role sees the jobs of the roles whose privileges it
-- has (its own, as for any PostgreSQL object), admins see all.  App roles
-- never write these tables; the C functions below do it for them.
ALTER TABLE jobloop.job ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_owner ON jobloop.job FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE')
           OR pg_catalog.pg_has_role('jobloop_admin', 'USAGE'));

-- Limits per endpoint (a URL's host:port, or a request's rate_key), applied by
-- all workers together through shared memory.  Changed with set_limit().
CREATE TABLE jobloop.endpoint_limit (
    endpoint        text PRIMARY KEY
                    CHECK (pg_catalog.length(endpoint) OPERATOR(pg_catalog.>) 0
                           AND pg_catalog.length(endpoint) OPERATOR(pg_catalog.<) 128),
    max_rate        real CHECK (max_rate OPERATOR(pg_catalog.>) 0),
    max_concurrency integer CHECK (max_concurrency OPERATOR(pg_catalog.>) 0),
    ramp            interval CHECK (ramp OPERATOR(pg_catalog.>) '0'::interval),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Per-tenant caps on jobs held at once; jobloop.tenant_max_concurrency is the default.
CREATE TABLE jobloop.tenant_limit (
    tenant          text PRIMARY KEY,
    max_concurrency integer NOT NULL CHECK (max_concurrency OPERATOR(pg_catalog.>) 0),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);

SELECT pg_catalog.pg_extension_config_dump('jobloop.kind', '');
SELECT pg_catalog.pg_extension_config_dump('jobloop.endpoint_limit', '');
SELECT pg_catalog.pg_extension_config_dump('jobloop.tenant_limit', '');
SELECT pg_catalog.pg_extension_config_dump('jobloop.job', '');

CREATE VIEW jobloop.jobs WITH (security_invoker = true) AS
    SELECT j.id, j.kind, j.tenant, j.owner, j.status, j.step, j.state,
           j.last_error, j.attempts, j.created_at, j.updated_at,
           j.started_at, j.finished_at, j.run_after, j.worker,
           j.lease_expires_at, j.request AS next_request
      FROM jobloop.job j;

-- The live state of every endpoint the workers track (configured, or paused
-- by a Retry-After).
CREATE FUNCTION jobloop.limit_state(
    OUT endpoint text, OUT allowed_rate double precision, OUT in_flight integer,
    OUT requests_last_second integer, OUT paused_until timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'jobloop_limit_state'
LANGUAGE C VOLATILE STRICT;

CREATE VIEW jobloop.limits AS
    SELECT COALESCE(l.endpoint, s.endpoint) AS endpoint,
           l.max_rate, l.max_concurrency, l.ramp,
           s.allowed_rate,
           COALESCE(s.in_flight, 0) AS in_flight,
           COALESCE(s.requests_last_second, 0) AS requests_last_second,
           s.paused_until
      FROM jobloop.endpoint_limit l
      FULL JOIN jobloop.limit_state() s ON s.endpoint OPERATOR(pg_catalog.=) l.endpoint;

REVOKE ALL ON jobloop.job, jobloop.kind, jobloop.jobs, jobloop.endpoint_limit,
    jobloop.tenant_limit, jobloop.limits FROM PUBLIC;
GRANT SELECT ON jobloop.job, jobloop.kind, jobloop.jobs, jobloop.endpoint_limit,
    jobloop.tenant_limit, jobloop.limits TO PUBLIC;

CREATE FUNCTION jobloop.create_kind(
    name         text,
    request      regprocedure,
    step         regprocedure,
    done         regprocedure DEFAULT NULL,
    max_steps    integer DEFAULT 1000,
    max_attempts integer DEFAULT 5,
    backoff      interval DEFAULT '1 second',
    max_backoff  interval DEFAULT '5 minutes',
    timeout      interval DEFAULT NULL,
    notify_steps boolean DEFAULT false,
    on_error     text DEFAULT 'fail')
RETURNS void
AS 'MODULE_PATHNAME', 'jobloop_create_kind'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.drop_kind(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_drop_kind'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.submit(
    kind     text,
    state    jsonb DEFAULT '{}',
    tenant   text DEFAULT NULL,
    start_at timestamptz DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'jobloop_submit'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.cancel(job_id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_cancel'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.status(job_id bigint)
RETURNS jobloop.jobs
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jobloop.jobs;
BEGIN
    IF job_id IS NULL THEN
        RAISE EXCEPTION 'job id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO r FROM jobloop.jobs j WHERE j.id OPERATOR(pg_catalog.=) job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = 'undefined_object';
    END IF;
    RETURN r;
END
$$;

-- Blocks until the job has finished or the timeout passed; returns the
-- status.  Each check reads a fresh snapshot, so call it outside an
-- explicit REPEATABLE READ transaction.
CREATE FUNCTION jobloop.wait(job_id bigint, timeout interval DEFAULT '60 seconds')
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz;
    pause    double precision := 0.002;
    s        text;
BEGIN
    IF job_id IS NULL OR timeout IS NULL THEN
        RAISE EXCEPTION 'job id and timeout must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    deadline := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) timeout;
    LOOP
        SELECT j.status INTO s FROM jobloop.jobs j WHERE j.id OPERATOR(pg_catalog.=) job_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = 'undefined_object';
        END IF;
        EXIT WHEN s OPERATOR(pg_catalog.=) ANY (ARRAY['completed', 'failed', 'cancelled'])
               OR pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline;
        PERFORM pg_catalog.pg_sleep(pause);
        pause := LEAST(pause OPERATOR(pg_catalog.*) 2, 0.05);
    END LOOP;
    RETURN s;
END
$$;

-- Limits (superusers and members of jobloop_admin only).
CREATE FUNCTION jobloop.set_limit(
    endpoint        text,
    max_rate        real DEFAULT NULL,
    max_concurrency integer DEFAULT NULL,
    ramp            interval DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'jobloop_set_limit'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.drop_limit(endpoint text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_drop_limit'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

-- NULL max_concurrency removes the tenant's own cap (the GUC default applies).
CREATE FUNCTION jobloop.set_tenant_limit(tenant text, max_concurrency integer)
RETURNS void
AS 'MODULE_PATHNAME', 'jobloop_set_tenant_limit'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

-- The outbound-HTTP guard's verdict on an address, under the current
-- jobloop.allowed_hosts: the same check the worker makes on every
-- resolved address before it connects.
CREATE FUNCTION jobloop.address_allowed(address inet, host text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_address_allowed'
LANGUAGE C STABLE;
