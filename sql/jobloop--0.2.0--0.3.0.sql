/*
 * jobloop 0.2.0 -> 0.3.0: jobs that survive a restore, unique jobs, retries.
 *
 * CREATE EXTENSION jobloop installs 0.3.0 by running the 0.1.0 script and
 * then the updates, so fresh installs and upgrades are the same schema.
 */
\echo Use "ALTER EXTENSION jobloop UPDATE TO '0.3.0'" to load this file. \quit

-- The Idempotency-Key of a step is jobloop-<key_token>-<step>: a random token
-- that travels with the row through pg_dump/pg_restore, pg_upgrade and a
-- failover, so a step in flight when the copy was made is re-sent with the
-- same key.  Jobs submitted before 0.3.0 have none and keep their old keys
-- (which named the cluster's system identifier) until they finish.
ALTER TABLE jobloop.job ADD COLUMN key_token uuid;
ALTER TABLE jobloop.job ALTER COLUMN key_token SET DEFAULT pg_catalog.gen_random_uuid();

-- Unique jobs: while a job with a unique_key is unfinished, submitting the
-- same (kind, owner, unique_key) again returns that job.
ALTER TABLE jobloop.job ADD COLUMN unique_key text
    CHECK (pg_catalog.length(unique_key) OPERATOR(pg_catalog.<=) 200);
CREATE UNIQUE INDEX job_unique_key_idx ON jobloop.job (kind, owner, unique_key)
    WHERE unique_key IS NOT NULL
      AND status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running']);

DROP FUNCTION jobloop.submit(text, jsonb, text, timestamptz);
CREATE FUNCTION jobloop.submit(
    kind       text,
    state      jsonb DEFAULT '{}',
    tenant     text DEFAULT NULL,
    start_at   timestamptz DEFAULT NULL,
    unique_key text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'jobloop_submit'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

-- Run a failed or cancelled job again from its last committed state and step.
CREATE FUNCTION jobloop.retry(job_id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_retry'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

-- Was this job inserted by the current transaction (or one of its
-- subtransactions)?  Then no worker can see it yet.
CREATE FUNCTION jobloop.submitted_in_this_transaction(job_id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_submitted_in_this_transaction'
LANGUAGE C STRICT VOLATILE;

CREATE OR REPLACE FUNCTION jobloop.wait(job_id bigint, timeout interval DEFAULT '60 seconds')
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
    IF timeout OPERATOR(pg_catalog.<) '0'::interval THEN
        RAISE EXCEPTION 'timeout must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    deadline := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) timeout;
    LOOP
        SELECT j.status INTO s FROM jobloop.jobs j WHERE j.id OPERATOR(pg_catalog.=) job_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = 'undefined_object';
        END IF;
        -- A pending job this transaction submitted (or retried) cannot run
        -- before it commits: waiting would only time out.
        IF s OPERATOR(pg_catalog.=) 'pending' AND jobloop.submitted_in_this_transaction(job_id) THEN
            RAISE EXCEPTION 'job % was submitted in this transaction, so no worker can see it yet', job_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Commit the transaction that submitted the job before waiting for it.';
        END IF;
        EXIT WHEN s OPERATOR(pg_catalog.=) ANY (ARRAY['completed', 'failed', 'cancelled'])
               OR pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline;
        PERFORM pg_catalog.pg_sleep(pause);
        pause := LEAST(pause OPERATOR(pg_catalog.*) 2, 0.05);
    END LOOP;
    RETURN s;
END
$$;

-- The view shows the unique key; its columns are appended, so existing
-- queries keep working.
CREATE OR REPLACE VIEW jobloop.jobs WITH (security_invoker = true) AS
    SELECT j.id, j.kind, j.tenant, j.owner, j.status, j.step, j.state,
           j.last_error, j.attempts, j.created_at, j.updated_at,
           j.started_at, j.finished_at, j.run_after, j.worker,
           j.lease_expires_at, j.request AS next_request, j.unique_key
      FROM jobloop.job j;

-- Pauses: jobs of a kind, of a tenant, of both, or all of them (NULL: any),
-- are not claimed, and workers let go of the ones they hold once their call
-- in flight is answered and its step committed.  A restored copy can start
-- with everything paused (jobloop.start_paused).  Jobs without a tenant are
-- tenant ''.
CREATE TABLE jobloop.pause (
    kind      text,
    tenant    text,
    paused_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    paused_by text NOT NULL DEFAULT CURRENT_USER,
    UNIQUE NULLS NOT DISTINCT (kind, tenant)
);
SELECT pg_catalog.pg_extension_config_dump('jobloop.pause', '');
REVOKE ALL ON jobloop.pause FROM PUBLIC;
GRANT SELECT ON jobloop.pause TO PUBLIC;

-- superusers and members of jobloop_admin only
CREATE FUNCTION jobloop.pause(kind text DEFAULT NULL, tenant text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_pause'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

CREATE FUNCTION jobloop.resume(kind text DEFAULT NULL, tenant text DEFAULT NULL)
RETURNS integer
AS 'MODULE_PATHNAME', 'jobloop_resume'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;

-- Is an unfinished job of this kind and tenant paused?
CREATE FUNCTION jobloop.is_paused(kind text, tenant text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT FROM jobloop.pause p
                WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) is_paused.kind)
                  AND (p.tenant IS NULL
                       OR p.tenant OPERATOR(pg_catalog.=) COALESCE(is_paused.tenant, '')));

CREATE OR REPLACE VIEW jobloop.jobs WITH (security_invoker = true) AS
    SELECT j.id, j.kind, j.tenant, j.owner, j.status, j.step, j.state,
           j.last_error, j.attempts, j.created_at, j.updated_at,
           j.started_at, j.finished_at, j.run_after, j.worker,
           j.lease_expires_at, j.request AS next_request, j.unique_key,
           (j.status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running'])
            AND EXISTS (SELECT FROM jobloop.pause p
                         WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) j.kind)
                           AND (p.tenant IS NULL
                                OR p.tenant OPERATOR(pg_catalog.=) COALESCE(j.tenant, '')))) AS paused
      FROM jobloop.job j;

CREATE OR REPLACE VIEW jobloop.stats WITH (security_invoker = true) AS
    SELECT (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'pending') AS pending,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'running') AS running,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'completed') AS completed,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'failed') AS failed,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'cancelled') AS cancelled,
           w.workers, w.held, w.in_flight, w.steps,
           w.steps_per_second_10s, w.steps_per_second_1m, w.claim_ms, w.commit_ms,
           (SELECT pg_catalog.count(*) FROM jobloop.job j
             WHERE EXISTS (SELECT FROM jobloop.pause)
               AND j.status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running'])
               AND EXISTS (SELECT FROM jobloop.pause p
                            WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) j.kind)
                              AND (p.tenant IS NULL
                                   OR p.tenant OPERATOR(pg_catalog.=) COALESCE(j.tenant, '')))) AS paused
      FROM (SELECT pg_catalog.count(*) AS workers,
                   COALESCE(pg_catalog.sum(s.held), 0) AS held,
                   COALESCE(pg_catalog.sum(s.in_flight), 0) AS in_flight,
                   COALESCE(pg_catalog.sum(s.steps), 0) AS steps,
                   COALESCE(pg_catalog.sum(s.steps_per_second_10s), 0) AS steps_per_second_10s,
                   COALESCE(pg_catalog.sum(s.steps_per_second_1m), 0) AS steps_per_second_1m,
                   pg_catalog.avg(s.claim_ms) AS claim_ms,
                   pg_catalog.avg(s.commit_ms) AS commit_ms
              FROM jobloop.worker_stats() s
             WHERE s.database OPERATOR(pg_catalog.=) pg_catalog.current_database()) w;

-- pg_dump by a non-superuser member of jobloop_admin (a database owner, say, with
-- --enable-row-security) reads the id sequence with the rows.
GRANT SELECT ON SEQUENCE jobloop.job_id_seq TO jobloop_admin;

-- Jobs retrying right now (running with a last_error): what a dashboard polls; a
-- small index however many jobs have finished.
CREATE INDEX job_retrying_idx ON jobloop.job (id)
    WHERE status OPERATOR(pg_catalog.=) 'running' AND last_error IS NOT NULL;

-- Claims that cost the same however many jobs have finished (bench/README.md, "Scale
-- and soak").  job_runnable_idx answered the same questions as job_tenant_runnable_idx;
-- when the statistics said the queue was empty, the planner could pick it for the
-- claim's per-tenant probes and walk the whole queue once per tenant (claims of 80 ms
-- mean, 850 ms max, at 5M finished rows).  One index leaves no such choice.
DROP INDEX jobloop.job_runnable_idx;

-- Statistics that follow the queue, not the archive: with the default scale factors a
-- table of 5M finished jobs is analyzed after 500,000 changes, so a burst of new jobs
-- is never seen by the planner.  Fixed thresholds, whatever the table's size.
ALTER TABLE jobloop.job SET (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000,
                             autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000);

-- jobloop.errors reads the last day's failed jobs: an index of failed jobs alone
-- (0.15-0.7 s -> ~26 ms at 5M finished rows).  Its predicate is not implied by the
-- claim's conditions, so the claim cannot pick it.
CREATE INDEX job_failed_idx ON jobloop.job (finished_at)
    WHERE status OPERATOR(pg_catalog.=) 'failed';
