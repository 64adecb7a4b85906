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

/*
 * Finished jobs in a table partitioned by time of finish, so that retention
 * drops whole partitions instead of deleting rows (bench/README.md, "Results:
 * retention by partitions": a day of 714,233 jobs went in 0.3 s and 0.2 MB of
 * WAL, counting it out of jobloop.stats included, against 2.2 s, 342 MB of WAL
 * and a VACUUM for the delete loop, which the workers ran at most 20,000 rows
 * per heartbeat).
 * jobloop.job keeps the unfinished jobs only: its statistics describe the
 * queue, and it stays small whatever the archive holds.
 *
 * A job moves when it finishes: a statement trigger on jobloop.job moves
 * every row its statement finished (the workers' step updates, cancel(), a
 * failed job) in the same transaction, so no writer changes.  Rows that
 * finished before this update stay in jobloop.job (moving millions of rows
 * here would hold the update for minutes) and retention deletes them from
 * there as before.
 *
 * The workers keep partitions for now and two widths ahead and drop those
 * whose rows are all older than jobloop.retention, in short transactions of
 * their own (src/retention.c, jobloop.maintain_finished_partitions below).
 * A row with no partition for its time (the workers were down; a restored
 * old row) lands in the DEFAULT partition, which retention empties row by
 * row.
 */
CREATE TABLE jobloop.finished_job (
    LIKE jobloop.job INCLUDING DEFAULTS,
    CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['completed', 'failed', 'cancelled'])),
    CHECK (finished_at IS NOT NULL)
) PARTITION BY RANGE (finished_at);
CREATE TABLE jobloop.finished_job_default PARTITION OF jobloop.finished_job DEFAULT;

/*
 * Each partition has its own indexes, made with it (maintain_finished_partitions
 * below), and the parent none: pg_restore attaches a dumped partition before it
 * creates the partition's indexes, and an index of the parent would have made
 * one for it at the attach, which the dump's CREATE INDEX would then collide
 * with (tried on 18: "relation ..._id_idx already exists", pg_restore exit
 * status 1).  By id for status(), wait() and cancel() (not unique: a unique index
 * would have to include finished_at; ids come from jobloop.job's identity, and
 * a row moves, never copies); the failed ones by (kind, finished_at), owner
 * included, for jobloop.errors (as job_failed_kind_idx); and in the default
 * partition every row by finished_at, which retention deletes oldest first.
 */
CREATE INDEX finished_job_default_id_idx ON jobloop.finished_job_default (id);
CREATE INDEX finished_job_default_failed_idx ON jobloop.finished_job_default (kind, finished_at)
    INCLUDE (owner) WHERE status OPERATOR(pg_catalog.=) 'failed';
CREATE INDEX finished_job_default_finished_idx ON jobloop.finished_job_default (finished_at);

ALTER TABLE jobloop.finished_job ENABLE ROW LEVEL SECURITY;
CREATE POLICY finished_job_owner ON jobloop.finished_job FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE')
           OR pg_catalog.pg_has_role('jobloop_admin', 'USAGE'));
-- Roles read finished jobs through the parent (and its policy); a partition is read
-- directly only by its owner, and by jobloop_admin's members for pg_dump.
REVOKE ALL ON jobloop.finished_job, jobloop.finished_job_default FROM PUBLIC;
GRANT SELECT ON jobloop.finished_job TO PUBLIC;
GRANT SELECT ON jobloop.finished_job_default TO jobloop_admin;
-- The partitions the workers make are not members of the extension, so pg_dump
-- dumps them (definition, ATTACH and rows) like any table; the default partition is.
SELECT pg_catalog.pg_extension_config_dump('jobloop.finished_job_default', '');

/*
 * Counting finished jobs (jobloop.stats).  The moves are counted by the
 * statement triggers of both tables: the DELETE from jobloop.job appends -n,
 * the INSERT into finished_job +n, and the fold nets them out.  But a
 * statement that names a partition rather than the parent -- pg_restore's
 * COPY of each partition, a DBA's DELETE from one -- fires no statement
 * trigger of the parent, only its row triggers (cloned to every partition,
 * also when pg_restore attaches one, before it loads the rows).  So writes
 * made directly by a session (trigger depth 0) are counted row by row, and
 * writes made from inside a trigger (the moves) by the statement triggers.
 */
CREATE OR REPLACE FUNCTION jobloop.count_job_changes()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- on finished_job, the statement triggers count what other triggers write
    IF TG_NARGS > 0 AND TG_ARGV[0] = 'nested' AND pg_trigger_depth() < 2 THEN
        RETURN NULL;
    END IF;
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
        -- TRUNCATE of either table: count what the other one holds
        DELETE FROM jobloop.job_count;
        DELETE FROM jobloop.job_count_change;
        INSERT INTO jobloop.job_count (owner, status, n)
        SELECT owner, status, count(*)
          FROM (SELECT owner, status FROM jobloop.job
                UNION ALL
                SELECT owner, status FROM jobloop.finished_job) j
         GROUP BY owner, status;
    END IF;
    RETURN NULL;
END
$$;

-- One finished job written directly (see above).
CREATE FUNCTION jobloop.count_finished_job_row()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO jobloop.job_count_change (owner, status, n) VALUES (OLD.owner, OLD.status, -1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO jobloop.job_count_change (owner, status, n) VALUES (NEW.owner, NEW.status, 1);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER finished_job_count_row AFTER INSERT OR UPDATE OR DELETE ON jobloop.finished_job
    FOR EACH ROW WHEN (pg_catalog.pg_trigger_depth() OPERATOR(pg_catalog.=) 0)
    EXECUTE FUNCTION jobloop.count_finished_job_row();
CREATE TRIGGER finished_job_count_insert AFTER INSERT ON jobloop.finished_job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes('nested');
CREATE TRIGGER finished_job_count_update AFTER UPDATE ON jobloop.finished_job
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes('nested');
CREATE TRIGGER finished_job_count_delete AFTER DELETE ON jobloop.finished_job
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes('nested');
CREATE TRIGGER finished_job_count_truncate AFTER TRUNCATE ON jobloop.finished_job
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.count_job_changes();

CREATE OR REPLACE FUNCTION jobloop.recount()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE jobloop.job, jobloop.finished_job IN SHARE MODE;
    DELETE FROM jobloop.job_count_change;
    DELETE FROM jobloop.job_count;
    INSERT INTO jobloop.job_count (owner, status, n)
    SELECT owner, status, count(*)
      FROM (SELECT owner, status FROM jobloop.job
            UNION ALL
            SELECT owner, status FROM jobloop.finished_job) j
     GROUP BY owner, status;
END
$$;

-- The move: every row the statement finished leaves jobloop.job for finished_job, in
-- the same transaction (the ids through an array, so that the DELETE probes the
-- primary key whatever the statistics say).
CREATE FUNCTION jobloop.move_finished_jobs()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH moved AS (
        DELETE FROM jobloop.job j
         WHERE j.id = ANY (ARRAY(SELECT n.id FROM new_jobs n
                                  WHERE n.finished_at IS NOT NULL
                                    AND n.status = ANY (ARRAY['completed', 'failed', 'cancelled'])))
        RETURNING j.*)
    INSERT INTO jobloop.finished_job SELECT * FROM moved;
    RETURN NULL;
END
$$;
CREATE TRIGGER job_move_finished AFTER UPDATE ON jobloop.job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop.move_finished_jobs();

-- Every job: the unfinished ones, finished ones from before 0.4.0 (in jobloop.job),
-- and the finished ones.  The same columns as before.
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
      FROM jobloop.job j
    UNION ALL
    SELECT f.id, f.kind, f.tenant, f.owner, f.status, f.step, f.state,
           f.last_error, f.attempts, f.created_at, f.updated_at,
           f.started_at, f.finished_at, f.run_after, f.worker,
           f.lease_expires_at, f.request, f.unique_key, false
      FROM jobloop.finished_job f;

-- jobloop.errors over both tables: failed jobs are in finished_job now, and those
-- that failed before this update still in jobloop.job (job_failed_kind_idx); each
-- partition has the same index of failed jobs by (kind, finish).
CREATE OR REPLACE FUNCTION jobloop.errors_last_day(
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
           SELECT (SELECT count(*) FROM jobloop.finished_job j
                    WHERE j.status = 'failed' AND j.kind = k.name
                      AND j.finished_at > now() - '1 day'::interval)
                + (SELECT count(*) FROM jobloop.job j
                    WHERE j.status = 'failed' AND j.kind = k.name
                      AND j.finished_at > now() - '1 day'::interval) AS failed) c
     CROSS JOIN LATERAL (
           SELECT u.last_error, u.finished_at
             FROM ((SELECT j.last_error, j.finished_at FROM jobloop.finished_job j
                     WHERE j.status = 'failed' AND j.kind = k.name
                       AND j.finished_at > now() - '1 day'::interval
                     ORDER BY j.finished_at DESC LIMIT 1)
                   UNION ALL
                   (SELECT j.last_error, j.finished_at FROM jobloop.job j
                     WHERE j.status = 'failed' AND j.kind = k.name
                       AND j.finished_at > now() - '1 day'::interval
                     ORDER BY j.finished_at DESC LIMIT 1)) u
            ORDER BY u.finished_at DESC LIMIT 1) l
     WHERE c.failed > 0;
END;

/*
 * Partitions.  Their width follows jobloop.retention, so that a partition
 * is dropped about one width after retention expires its newest row: a day
 * when retention is 2 days or more (or 0, forever), an hour when it is 2
 * hours or more, else a minute.  Bounds are aligned in UTC; a partition is
 * named after its lower bound, finished_job_YYYYMMDD_HH24MI.
 */
CREATE FUNCTION jobloop.finished_job_width(retention interval)
RETURNS interval
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN retention OPERATOR(pg_catalog.<=) '0'::interval
                 OR retention OPERATOR(pg_catalog.>=) '2 days'::interval THEN '1 day'::interval
            WHEN retention OPERATOR(pg_catalog.>=) '2 hours'::interval THEN '1 hour'::interval
            ELSE '1 minute'::interval END;

-- The partitions of finished_job and their bounds (the default partition has none).
CREATE FUNCTION jobloop.finished_job_partitions(
    OUT partition regclass, OUT lower_bound timestamptz, OUT upper_bound timestamptz)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass, b[1]::timestamptz, b[2]::timestamptz
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                     $re$FOR VALUES FROM \('([^']*)'\) TO \('([^']*)'\)$re$) b
     WHERE i.inhparent = 'jobloop.finished_job'::regclass
       AND b IS NOT NULL
     ORDER BY 2
$$;

/*
 * What the workers do at each heartbeat (one at a time): make the partitions
 * for now and the next two widths, and drop those whose upper bound is at
 * least retention ago.  Every lock is waited for at most 100 ms (a
 * dashboard's long query must not make the workers queue behind a DROP); a
 * partition that could not be made or dropped is tried again next time.
 * Dropping counts the partition's jobs out of jobloop.stats first: a DROP
 * fires no trigger.
 */
CREATE FUNCTION jobloop.maintain_finished_partitions(
    retention interval, at timestamptz DEFAULT pg_catalog.now(),
    OUT created integer, OUT dropped integer, OUT dropped_jobs bigint, OUT busy integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    width  interval := jobloop.finished_job_width(retention);
    owner  name;
    lo     timestamptz;
    hi     timestamptz;
    part   text;
    p      record;
    n      bigint;
BEGIN
    created := 0; dropped := 0; dropped_jobs := 0; busy := 0;
    -- While pg_restore loads this database, its partitions are the dump's: one made
    -- here first would make the dump's CREATE TABLE fail, one dropped here its COPY.
    IF EXISTS (SELECT FROM pg_stat_activity a
                WHERE a.datname = current_database() AND a.application_name = 'pg_restore'
                  AND a.pid <> pg_backend_pid()) THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '100ms', true);
    SELECT pg_get_userbyid(c.relowner) INTO owner
      FROM pg_class c WHERE c.oid = 'jobloop.finished_job'::regclass;

    FOR k IN 0..2 LOOP
        lo := date_bin(width, at, '2000-01-01 00:00:00+00'::timestamptz) + k * width;
        hi := lo + width;
        -- a partition of another width (retention changed) may cover part of it
        CONTINUE WHEN EXISTS (SELECT FROM jobloop.finished_job_partitions() e
                               WHERE e.lower_bound < hi AND e.upper_bound > lo);
        part := 'finished_job_' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MI');
        BEGIN
            -- A partition for now (the workers just started, or fell behind): a finish
            -- that began routing its rows before the attach would find them in the
            -- default partition, against its new constraint, and fail.  No session may
            -- be inserting then; a future partition can take no row yet.
            IF lo <= at THEN
                LOCK TABLE jobloop.finished_job IN ACCESS EXCLUSIVE MODE;
            END IF;
            EXECUTE format('CREATE TABLE jobloop.%I (LIKE jobloop.finished_job'
                           ' INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format('CREATE INDEX %I ON jobloop.%I (id)', part || '_id_idx', part);
            EXECUTE format('CREATE INDEX %I ON jobloop.%I (kind, finished_at) INCLUDE (owner)'
                           ' WHERE status = ''failed''', part || '_failed_idx', part);
            EXECUTE format('ALTER TABLE jobloop.%I OWNER TO %I', part, owner);
            EXECUTE format('GRANT SELECT ON jobloop.%I TO jobloop_admin', part);
            -- (else) SHARE UPDATE EXCLUSIVE on finished_job; the default partition is
            -- scanned (it is empty, or nearly) under ACCESS EXCLUSIVE
            EXECUTE format('ALTER TABLE jobloop.finished_job ATTACH PARTITION jobloop.%I'
                           ' FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
            created := created + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                busy := busy + 1;
            WHEN check_violation OR duplicate_table THEN
                -- the default partition holds rows of that time (made while no worker
                -- ran): they stay there, retention deletes them; or a table of that
                -- name exists and is not a partition: leave it alone
                RAISE LOG 'jobloop: no partition of finished jobs for [%, %): %', lo, hi, SQLERRM;
        END;
    END LOOP;

    IF retention > '0'::interval THEN
        FOR p IN SELECT * FROM jobloop.finished_job_partitions() e
                  WHERE e.upper_bound <= at - retention LOOP
            BEGIN
                -- no job may change in it now, then count its jobs out
                EXECUTE format('LOCK TABLE %s IN SHARE MODE', p.partition);
                EXECUTE format('WITH c AS (SELECT owner, status, count(*) AS n FROM %s GROUP BY owner, status),'
                               ' i AS (INSERT INTO jobloop.job_count_change (owner, status, n)'
                               '       SELECT owner, status, -n FROM c)'
                               ' SELECT coalesce(sum(n), 0) FROM c', p.partition) INTO n;
                LOCK TABLE jobloop.finished_job IN ACCESS EXCLUSIVE MODE;
                EXECUTE format('DROP TABLE %s', p.partition);
                dropped := dropped + 1;
                dropped_jobs := dropped_jobs + n;
            EXCEPTION
                WHEN lock_not_available THEN
                    busy := busy + 1;
            END;
        END LOOP;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION jobloop.maintain_finished_partitions(interval, timestamptz) FROM PUBLIC;
