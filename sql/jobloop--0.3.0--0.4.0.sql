/*
 * jobloop 0.3.0 -> 0.4.0: monitoring that costs the same at any table size.
 *
 * CREATE EXTENSION jobloop installs 0.4.0 by running the 0.1.0 script and
 * then the updates, so fresh installs and upgrades are the same schema.
 */
\echo Use "ALTER EXTENSION jobloop UPDATE TO '0.4.0'" to load this file. \quit

/*
 * Jobs by owner and status, kept as jobs change status, so that
 * jobloop.stats reads a few rows instead of counting millions (five
 * count(*)s took 2.7-3.6 s at 5,000,000 finished jobs; bench/README.md,
 * "Scale and soak").
 *
 * Every statement that changes jobloop.job appends its net change per
 * (owner, status) to job_count_change: an append, so two sessions never
 * wait for each other (counters updated in place would serialize every
 * commit that finishes a job, and could deadlock two workers that touch
 * the same counters in another order).  A step's UPDATE changes no status
 * and appends nothing.  The workers fold the changes into job_count about
 * once a second, skipping any row another fold has locked; readers add
 * both tables up, which is exact at any moment: a fold moves counts from
 * one table to the other in one transaction.
 *
 * Owners are kept so that row-level security works as on jobloop.job:
 * a role sees the counts of the jobs it may see.
 */
CREATE TABLE jobloop.job_count (
    owner  regrole NOT NULL,
    status text NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (owner, status)
);
CREATE TABLE jobloop.job_count_change (
    owner  regrole NOT NULL,
    status text NOT NULL,
    n      bigint NOT NULL
);
ALTER TABLE jobloop.job_count ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobloop.job_count_change ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_count_owner ON jobloop.job_count FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE')
           OR pg_catalog.pg_has_role('jobloop_admin', 'USAGE'));
CREATE POLICY job_count_change_owner ON jobloop.job_count_change FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE')
           OR pg_catalog.pg_has_role('jobloop_admin', 'USAGE'));
REVOKE ALL ON jobloop.job_count, jobloop.job_count_change FROM PUBLIC;
GRANT SELECT ON jobloop.job_count, jobloop.job_count_change TO PUBLIC;

-- Net change per (owner, status) of one statement.  Only jobloop's own
-- functions and workers write jobloop.job, as the extension's owner.
CREATE FUNCTION jobloop.count_job_changes()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO jobloop.job_count_change (owner, status, n)
        SELECT owner, status, count(*) FROM new_jobs GROUP BY owner, status;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO jobloop.job_count_change (owner, status, n)
        SELECT owner, status, sum(d)
          FROM (SELECT owner, status, -1 AS d FROM old_jobs
                UNION ALL
                SELECT owner, status, 1 FROM new_jobs) c
         GROUP BY owner, status
        HAVING sum(d) <> 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO jobloop.job_count_change (owner, status, n)
        SELECT owner, status, -count(*) FROM old_jobs GROUP BY owner, status;
    ELSE
        -- TRUNCATE
        DELETE FROM jobloop.job_count;
        DELETE FROM jobloop.job_count_change;
    END IF;
    RETURN NULL;
END
$$;

-- Count what is there now, with no job changing meanwhile, then keep count.
LOCK TABLE jobloop.job IN SHARE ROW EXCLUSIVE MODE;
CREATE TRIGGER job_count_insert AFTER INSERT ON jobloop.job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes();
CREATE TRIGGER job_count_update AFTER UPDATE ON jobloop.job
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes();
CREATE TRIGGER job_count_delete AFTER DELETE ON jobloop.job
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes();
CREATE TRIGGER job_count_truncate AFTER TRUNCATE ON jobloop.job
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes();
INSERT INTO jobloop.job_count (owner, status, n)
SELECT owner, status, pg_catalog.count(*) FROM jobloop.job GROUP BY owner, status;

-- Count again from the jobs themselves: after ALTER TABLE jobloop.job
-- DISABLE TRIGGER, or a restore made with --disable-triggers.  Reads the
-- whole table while no job may change (seconds for millions of jobs).
CREATE FUNCTION jobloop.recount()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE jobloop.job IN SHARE MODE;
    DELETE FROM jobloop.job_count_change;
    DELETE FROM jobloop.job_count;
    INSERT INTO jobloop.job_count (owner, status, n)
    SELECT owner, status, count(*) FROM jobloop.job GROUP BY owner, status;
END
$$;
REVOKE ALL ON FUNCTION jobloop.recount() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobloop.recount() TO jobloop_admin;

/*
 * Unfinished jobs that a pause holds back, for jobloop.stats: a count, since
 * pauses are rare and short, of unfinished jobs only (through the indexes of
 * unheld and of held jobs).  A function of its own so that its estimate, which
 * grows with the queue even while no pause exists and the count is never run,
 * does not make every read of jobloop.stats JIT-compile (17 ms at 20,000
 * queued jobs, for a view that answers in a fraction of a millisecond).
 * SECURITY INVOKER, like the view: a role counts the jobs it may see.
 */
CREATE FUNCTION jobloop.paused_jobs()
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET jit = off
RETURN (SELECT count(*) FROM jobloop.job j
         WHERE EXISTS (SELECT FROM jobloop.pause)
           AND j.worker IS NULL
           AND j.status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running'])
           AND EXISTS (SELECT FROM jobloop.pause p
                        WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) j.kind)
                          AND (p.tenant IS NULL
                               OR p.tenant OPERATOR(pg_catalog.=) COALESCE(j.tenant, ''))))
       OPERATOR(pg_catalog.+)
       (SELECT count(*) FROM jobloop.job j
         WHERE EXISTS (SELECT FROM jobloop.pause)
           AND j.worker IS NOT NULL
           AND j.status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running'])
           AND EXISTS (SELECT FROM jobloop.pause p
                        WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) j.kind)
                          AND (p.tenant IS NULL
                               OR p.tenant OPERATOR(pg_catalog.=) COALESCE(j.tenant, ''))));

-- jobloop.stats from the counts; its columns are unchanged.
CREATE OR REPLACE VIEW jobloop.stats WITH (security_invoker = true) AS
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

/*
 * jobloop.errors without sorting a day of failures: per kind, a count over an
 * index of failed jobs by (kind, finish) -- owner included, so that the
 * row-level security test needs no heap visit -- and the latest failure by a
 * backward scan of the same index.  At 50,000 failures a day beside 5,000,000
 * finished jobs the old view took 64-77 ms (an external sort of every failure's
 * reason).  job_failed_idx (0.3.0) had finished_at alone; this one replaces it.
 */
CREATE INDEX job_failed_kind_idx ON jobloop.job (kind, finished_at) INCLUDE (owner)
    WHERE status OPERATOR(pg_catalog.=) 'failed';
DROP INDEX jobloop.job_failed_idx;
-- A function, SET jit = off, for the reason given at paused_jobs(): the estimate
-- (every kind times a day of failures) made each read JIT-compile, 100 ms for
-- 7 ms of work.
CREATE FUNCTION jobloop.errors_last_day(
    OUT kind text, OUT failed bigint, OUT last_error text, OUT last_failed_at timestamptz)
RETURNS SETOF record
LANGUAGE sql STABLE
ROWS 10
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    SELECT k.name, c.failed, l.last_error, l.finished_at
      FROM jobloop.kind k
     CROSS JOIN LATERAL (
           SELECT count(*) AS failed FROM jobloop.job j
            WHERE j.status = 'failed' AND j.kind = k.name
              AND j.finished_at > now() - '1 day'::interval) c
     CROSS JOIN LATERAL (
           SELECT j.last_error, j.finished_at FROM jobloop.job j
            WHERE j.status = 'failed' AND j.kind = k.name
              AND j.finished_at > now() - '1 day'::interval
            ORDER BY j.finished_at DESC LIMIT 1) l
     WHERE c.failed > 0;
END;
CREATE OR REPLACE VIEW jobloop.errors WITH (security_invoker = true) AS
    SELECT e.kind, e.failed, e.last_error, e.last_failed_at FROM jobloop.errors_last_day() e;
