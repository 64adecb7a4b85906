/*
 * jobloop 0.4.0 -> 0.5.0: external workers (jobloop-worker).
 *
 * CREATE EXTENSION jobloop installs 0.5.0 by running the 0.1.0 script and
 * then the updates, so fresh installs and upgrades are the same schema.
 */
\echo Use "ALTER EXTENSION jobloop UPDATE TO '0.5.0'" to load this file. \quit

/*
 * External workers: jobloop-worker, on any machine, connects as a role that
 * is a member of jobloop_worker, attaches once and then runs its turns
 * through jobloop.worker_turn() (src/server/remote.c).  The role is shared
 * by every database of the cluster, as jobloop_admin is.
 */
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'jobloop_worker') THEN
        CREATE ROLE jobloop_worker NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA jobloop TO jobloop_worker;

-- Make this session an external worker; host and pid say where jobloop-worker runs.
CREATE FUNCTION jobloop.worker_attach(host text, pid integer)
RETURNS integer
AS 'MODULE_PATHNAME', 'jobloop_worker_attach'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- One turn: the results of finished calls in, the calls to start and abort out
-- (both binary; src/engine/wire.h).
CREATE FUNCTION jobloop.worker_turn(report bytea)
RETURNS bytea
AS 'MODULE_PATHNAME', 'jobloop_worker_turn'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- The C functions check membership too; EXECUTE is only the first gate.
REVOKE ALL ON FUNCTION jobloop.worker_attach(text, integer), jobloop.worker_turn(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobloop.worker_attach(text, integer), jobloop.worker_turn(bytea)
    TO jobloop_worker;

/*
 * worker_stats() says where an external worker runs: host and remote_pid
 * (pid stays the server process: for a background worker itself, for an
 * external worker the backend of its connection).  The view that reads it
 * goes and comes back unchanged.
 */
DROP VIEW jobloop.stats;
DROP FUNCTION jobloop.worker_stats();
CREATE FUNCTION jobloop.worker_stats(
    OUT worker integer, OUT pid integer, OUT database text, OUT started_at timestamptz,
    OUT held integer, OUT in_flight integer, OUT steps bigint,
    OUT steps_per_second_10s double precision, OUT steps_per_second_1m double precision,
    OUT jobs_completed bigint, OUT jobs_failed bigint, OUT retries bigint,
    OUT claim_ms double precision, OUT commit_ms double precision,
    OUT host text, OUT remote_pid integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'jobloop_worker_stats'
LANGUAGE C VOLATILE STRICT;

CREATE VIEW jobloop.stats WITH (security_invoker = true) AS
    WITH counts AS (
        SELECT c.status, pg_catalog.sum(c.n) AS n
          FROM (SELECT status, n FROM jobloop.job_count
                UNION ALL
                SELECT status, n FROM jobloop.job_count_change) c
         GROUP BY c.status)
    SELECT COALESCE((SELECT n FROM counts WHERE status OPERATOR(pg_catalog.=) 'pending'), 0)::bigint AS pending,
           COALESCE((SELECT n FROM counts WHERE status OPERATOR(pg_catalog.=) 'running'), 0)::bigint AS running,
           COALESCE((SELECT n FROM counts WHERE status OPERATOR(pg_catalog.=) 'completed'), 0)::bigint AS completed,
           COALESCE((SELECT n FROM counts WHERE status OPERATOR(pg_catalog.=) 'failed'), 0)::bigint AS failed,
           COALESCE((SELECT n FROM counts WHERE status OPERATOR(pg_catalog.=) 'cancelled'), 0)::bigint AS cancelled,
           w.workers, w.held, w.in_flight, w.steps,
           w.steps_per_second_10s, w.steps_per_second_1m, w.claim_ms, w.commit_ms,
           jobloop.paused_jobs() AS paused
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
GRANT SELECT ON jobloop.stats TO PUBLIC;

-- jobloop-worker is stopping: give back the jobs this session's worker holds, now.
CREATE FUNCTION jobloop.worker_detach()
RETURNS integer
AS 'MODULE_PATHNAME', 'jobloop_worker_detach'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION jobloop.worker_detach() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobloop.worker_detach() TO jobloop_worker;
