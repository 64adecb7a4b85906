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
 * jobloop.stats from the counts.  Its columns are unchanged.  The paused
 * count stays a count (pauses are rare and short) but reads only
 * unfinished jobs, through the indexes of unheld and of held jobs.
 */
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
           (SELECT pg_catalog.count(*) FROM jobloop.job j
             WHERE EXISTS (SELECT FROM jobloop.pause)
               AND j.worker IS NULL
               AND j.status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running'])
               AND EXISTS (SELECT FROM jobloop.pause p
                            WHERE (p.kind IS NULL OR p.kind OPERATOR(pg_catalog.=) j.kind)
                              AND (p.tenant IS NULL
                                   OR p.tenant OPERATOR(pg_catalog.=) COALESCE(j.tenant, ''))))
           OPERATOR(pg_catalog.+)
           (SELECT pg_catalog.count(*) FROM jobloop.job j
             WHERE EXISTS (SELECT FROM jobloop.pause)
               AND j.worker IS NOT NULL
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
