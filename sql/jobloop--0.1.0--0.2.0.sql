/*
 * jobloop 0.1.0 -> 0.2.0: observability and retention.
 *
 * CREATE EXTENSION jobloop installs 0.2.0 by running the 0.1.0 script and
 * then this one, so fresh installs and upgrades are the same schema.
 */
\echo Use "ALTER EXTENSION jobloop UPDATE TO '0.2.0'" to load this file. \quit

-- pg_dump must carry the job id sequence along with the rows, or a restored
-- database would hand out ids that already exist.
SELECT pg_catalog.pg_extension_config_dump('jobloop.job_id_seq', '');

-- Retention deletes the oldest finished jobs first.
CREATE INDEX job_finished_idx ON jobloop.job (finished_at) WHERE finished_at IS NOT NULL;

CREATE FUNCTION jobloop.worker_stats(
    OUT worker integer, OUT pid integer, OUT database text, OUT started_at timestamptz,
    OUT held integer, OUT in_flight integer, OUT steps bigint,
    OUT steps_per_second_10s double precision, OUT steps_per_second_1m double precision,
    OUT jobs_completed bigint, OUT jobs_failed bigint, OUT retries bigint,
    OUT claim_ms double precision, OUT commit_ms double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'jobloop_worker_stats'
LANGUAGE C VOLATILE STRICT;

-- One row: the whole system at a glance (jobs by status are those the
-- current role may see).
CREATE VIEW jobloop.stats WITH (security_invoker = true) AS
    SELECT (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'pending') AS pending,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'running') AS running,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'completed') AS completed,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'failed') AS failed,
           (SELECT pg_catalog.count(*) FROM jobloop.job WHERE status OPERATOR(pg_catalog.=) 'cancelled') AS cancelled,
           w.workers, w.held, w.in_flight, w.steps,
           w.steps_per_second_10s, w.steps_per_second_1m, w.claim_ms, w.commit_ms
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

-- Failures by kind over the last day, with the most recent reason.
CREATE VIEW jobloop.errors WITH (security_invoker = true) AS
    SELECT j.kind, pg_catalog.count(*) AS failed,
           (pg_catalog.array_agg(j.last_error ORDER BY j.finished_at DESC))[1] AS last_error,
           pg_catalog.max(j.finished_at) AS last_failed_at
      FROM jobloop.job j
     WHERE j.status OPERATOR(pg_catalog.=) 'failed'
       AND j.finished_at OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::interval)
     GROUP BY j.kind;

GRANT SELECT ON jobloop.stats, jobloop.errors TO PUBLIC;

-- Warns (once per session) when no worker serves this database.
CREATE FUNCTION jobloop.check_served()
RETURNS void
AS 'MODULE_PATHNAME', 'jobloop_check_served'
LANGUAGE C VOLATILE;

SELECT jobloop.check_served();
