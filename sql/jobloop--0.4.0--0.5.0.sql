/*
 * jobloop 0.4.0 -> 0.5.0.
 *
 * CREATE EXTENSION jobloop installs 0.5.0 by running the 0.1.0 script and
 * then the updates, so fresh installs and upgrades are the same schema.
 * Each change has a section of its own below, under its heading.
 */
\echo Use "ALTER EXTENSION jobloop UPDATE TO '0.5.0'" to load this file. \quit

/* ======================================================================
 * Retention by partitions (issue 11): finished jobs move to
 * jobloop.finished_job, partitioned by time of finish, and retention drops
 * whole partitions.
 * ====================================================================== */

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
 * This script makes the partitions for now and two widths ahead (on an
 * update; see the end of this section); from then on the workers keep them
 * ahead and drop those whose rows are all older than jobloop.retention, one
 * action per short transaction of their own (src/server/retention.c,
 * jobloop.maintain_finished_partitions below).  A row with no partition for
 * its time (the workers were down for longer than two widths; a restored
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

-- Every job: the unfinished ones, finished ones from before 0.5.0 (in jobloop.job),
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
 * Partitions.  Their width follows jobloop.retention so that about ten of
 * them cover it: every statement that looks a job up by id through
 * finished_job (status(), wait(), cancel(), retry()) locks each partition
 * and its two indexes, and at a day per partition a retention of 365 days
 * took some 1,100 locks a statement, past what max_locks_per_transaction
 * gives one backend ("out of shared memory").  The widths are round (a
 * minute to 30 days); retention 0 (forever) keeps 30-day partitions, about
 * 12 a year, which it never drops.  Bounds are aligned in UTC; a partition
 * is named after its lower bound in UTC, finished_job_YYYYMMDD_HH24MISS.
 */
CREATE FUNCTION jobloop.finished_job_width(retention interval)
RETURNS interval
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN retention OPERATOR(pg_catalog.<=) '0'::interval THEN '30 days'::interval
            ELSE COALESCE((SELECT w FROM unnest(ARRAY['1 minute', '5 minutes', '15 minutes', '1 hour',
                                                      '3 hours', '6 hours', '12 hours', '1 day',
                                                      '3 days', '7 days', '30 days']::interval[]) w
                            WHERE w OPERATOR(pg_catalog.*) 10 OPERATOR(pg_catalog.>=) retention
                            ORDER BY w LIMIT 1),
                           '30 days'::interval) END;

/*
 * The partitions of finished_job and their bounds (the default partition has
 * none).  The bounds are read back from their text, which is written and read
 * here under a fixed DateStyle and TimeZone, whatever the session's.
 */
CREATE FUNCTION jobloop.finished_job_partitions(
    OUT partition regclass, OUT lower_bound timestamptz, OUT upper_bound timestamptz)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
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
 * What partition maintenance has to do at time at, in the order it does it:
 * 'make' each range of [now's width, two widths ahead) that no partition
 * covers -- cut at the width's boundaries, so that after a change of
 * retention the gaps between partitions of the old width are filled too --;
 * 'detach' each partition whose upper bound is retention ago; 'drop' each
 * table an earlier 'detach' left (its comment says so).
 *
 * Nothing while pg_restore loads this database: its partitions are the
 * dump's, and one made here first would make the dump's CREATE TABLE or
 * ATTACH fail, one dropped here its COPY.  A restore is recognised by
 * another session of this database whose application_name is 'pg_restore'
 * (pg_restore's own, unless PGAPPNAME or the connection string sets
 * another); a restore run under another name, or with psql from a plain
 * dump, is not: README, "Backups with partitions".
 */
CREATE FUNCTION jobloop.finished_partitions_due(
    retention interval, at timestamptz DEFAULT pg_catalog.now(),
    OUT action text, OUT partition regclass, OUT lower_bound timestamptz, OUT upper_bound timestamptz)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
AS $$
DECLARE
    origin constant timestamptz := '2000-01-01 00:00:00+00';
    width  interval := jobloop.finished_job_width(retention);
    w_lo   timestamptz := date_bin(width, at, origin);
    w_hi   timestamptz := date_bin(width, at, origin) + 3 * width;
    cur    timestamptz := w_lo;
    stop   timestamptz;
    p      record;
BEGIN
    IF EXISTS (SELECT FROM pg_stat_activity a
                WHERE a.datname = current_database() AND a.application_name = 'pg_restore'
                  AND a.pid <> pg_backend_pid()) THEN
        RETURN;
    END IF;
    -- the gaps of [w_lo, w_hi) between the partitions that overlap it
    -- (a gap that has passed already is left alone: what finished in it is in the
    -- default partition, which a partition made now could only cover the tail of;
    -- make_finished_partition)
    FOR p IN SELECT e.lower_bound AS lo, e.upper_bound AS hi FROM jobloop.finished_job_partitions() e
              WHERE e.upper_bound > w_lo AND e.lower_bound < w_hi
              ORDER BY e.lower_bound LOOP
        WHILE cur < least(p.lo, w_hi) LOOP
            stop := least(p.lo, date_bin(width, cur, origin) + width);
            IF stop > at THEN
                action := 'make'; partition := NULL; lower_bound := cur; upper_bound := stop;
                RETURN NEXT;
            END IF;
            cur := stop;
        END LOOP;
        cur := greatest(cur, p.hi);
    END LOOP;
    WHILE cur < w_hi LOOP
        stop := least(w_hi, date_bin(width, cur, origin) + width);
        IF stop > at THEN
            action := 'make'; partition := NULL; lower_bound := cur; upper_bound := stop;
            RETURN NEXT;
        END IF;
        cur := stop;
    END LOOP;

    IF retention > '0'::interval THEN
        RETURN QUERY SELECT 'detach', e.partition, e.lower_bound, e.upper_bound
                       FROM jobloop.finished_job_partitions() e
                      WHERE e.upper_bound <= at - retention
                      ORDER BY e.lower_bound;
    END IF;
    RETURN QUERY SELECT 'drop', c.oid::regclass, NULL::timestamptz, NULL::timestamptz
                   FROM pg_class c
                  WHERE c.relnamespace = 'jobloop'::regnamespace AND c.relkind = 'r'
                    AND obj_description(c.oid, 'pg_class') = 'jobloop: an expired partition of finished_job, detached; retention drops it'
                  ORDER BY c.oid;
END
$$;

/*
 * The three actions.  Each takes at most one ACCESS EXCLUSIVE lock, the
 * workers run each in a transaction of its own (src/server/retention.c), and
 * every lock is waited for at most 100 ms: a dashboard's long query must not
 * make a worker queue behind its DDL, and with it every finish of every
 * other worker.  Each returns its status: done ('made', 'detached',
 * 'dropped'), nothing to do any more ('covered', 'gone'), 'busy' (a lock
 * was not free) or 'failed' (any other error: a WARNING says why, and the
 * next action goes on; a hand-made table in the way must not stop
 * maintenance for good).  finished_job is always locked before a partition,
 * as every statement through it does.
 */

-- Make the partition for [lower_bound, upper_bound).
CREATE FUNCTION jobloop.make_finished_partition(
    lower_bound timestamptz, upper_bound timestamptz, at timestamptz DEFAULT pg_catalog.now(),
    OUT status text, OUT partition regclass)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
SET lock_timeout = '100ms'
AS $$
DECLARE
    lo     timestamptz := lower_bound;
    hi     timestamptz := upper_bound;
    last   timestamptz;
    owner  name;
    part   text;
BEGIN
    BEGIN
        -- A range that has begun may have rows routed to the default partition
        -- by a finish in progress, which the ATTACH would then find against
        -- its new constraint: no session may be writing finished jobs
        -- meanwhile.  A future range takes no finished job yet.
        IF lo <= at THEN
            LOCK TABLE jobloop.finished_job IN ACCESS EXCLUSIVE MODE;
        END IF;
        IF EXISTS (SELECT FROM jobloop.finished_job_partitions() e
                    WHERE e.lower_bound < hi AND e.upper_bound > lo) THEN
            status := 'covered';
            RETURN;
        END IF;
        -- Rows that the default partition holds for this range (they finished
        -- while no partition covered it) stay there, and retention deletes them
        -- row by row: the partition covers what comes after the last of them
        -- (found by finished_job_default_finished_idx, not a scan), so that the
        -- ATTACH succeeds the first time and is not retried at every heartbeat.
        SELECT max(d.finished_at) INTO last
          FROM jobloop.finished_job_default d
         WHERE d.finished_at >= lo AND d.finished_at < hi;
        IF last IS NOT NULL THEN
            lo := date_trunc('second', last) + '1 second'::interval;
            IF lo >= hi THEN
                status := 'covered';
                RETURN;
            END IF;
        END IF;

        SELECT pg_get_userbyid(c.relowner) INTO owner
          FROM pg_class c WHERE c.oid = 'jobloop.finished_job'::regclass;
        part := 'finished_job_' || to_char(lo, 'YYYYMMDD_HH24MISS');
        EXECUTE format('CREATE TABLE jobloop.%I (LIKE jobloop.finished_job'
                       ' INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format('CREATE INDEX %I ON jobloop.%I (id)', part || '_id_idx', part);
        EXECUTE format('CREATE INDEX %I ON jobloop.%I (kind, finished_at) INCLUDE (owner)'
                       ' WHERE status = ''failed''', part || '_failed_idx', part);
        EXECUTE format('ALTER TABLE jobloop.%I OWNER TO %I', part, owner);
        EXECUTE format('GRANT SELECT ON jobloop.%I TO jobloop_admin', part);
        -- SHARE UPDATE EXCLUSIVE on finished_job (ACCESS EXCLUSIVE for a begun
        -- range, above); the default partition is scanned for rows of the range
        -- under ACCESS EXCLUSIVE: it holds only what no partition covered.  The
        -- bounds are printed in ISO and UTC (the SET clauses above).
        EXECUTE format('ALTER TABLE jobloop.finished_job ATTACH PARTITION jobloop.%I'
                       ' FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        status := 'made';
        partition := format('jobloop.%I', part)::regclass;
    EXCEPTION
        WHEN lock_not_available THEN
            status := 'busy';
        WHEN OTHERS THEN
            RAISE WARNING 'jobloop could not make the partition of finished jobs for [%, %): %', lo, hi, SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'It is tried again at the next heartbeat; until then those jobs go to jobloop.finished_job_default.';
            status := 'failed';
    END;
END
$$;

-- Detach an expired partition: its jobs leave finished_job at once, and the
-- table waits, marked, for drop_expired_partition.  Detaching first keeps the
-- ACCESS EXCLUSIVE lock on finished_job to a catalog change: counting the jobs
-- out of jobloop.stats scans the table, and does so after, on the detached
-- table alone, once (not again at every heartbeat while a reader holds
-- finished_job).
CREATE FUNCTION jobloop.detach_finished_partition(partition regclass, OUT status text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms'
AS $$
BEGIN
    BEGIN
        LOCK TABLE jobloop.finished_job IN ACCESS EXCLUSIVE MODE;
        IF NOT EXISTS (SELECT FROM pg_inherits i
                        WHERE i.inhrelid = partition AND i.inhparent = 'jobloop.finished_job'::regclass
                          AND partition <> 'jobloop.finished_job_default'::regclass) THEN
            status := 'gone';
            RETURN;
        END IF;
        EXECUTE format('ALTER TABLE jobloop.finished_job DETACH PARTITION %s', partition);
        EXECUTE format('COMMENT ON TABLE %s IS %L', partition,
                       'jobloop: an expired partition of finished_job, detached; retention drops it');
        status := 'detached';
    EXCEPTION
        WHEN lock_not_available THEN
            status := 'busy';
        WHEN OTHERS THEN
            RAISE WARNING 'jobloop could not detach the expired partition %: %', partition, SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'It is tried again at the next heartbeat.';
            status := 'failed';
    END;
END
$$;

-- Count a detached partition's jobs out of jobloop.stats (a DROP fires no
-- trigger) and drop it.
CREATE FUNCTION jobloop.drop_expired_partition(expired regclass, OUT status text, OUT jobs bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms'
AS $$
BEGIN
    jobs := 0;
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = expired) THEN
            status := 'gone';
            RETURN;
        END IF;
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', expired);
        -- only a table that detach_finished_partition left
        IF NOT EXISTS (SELECT FROM pg_class c
                        WHERE c.oid = expired AND c.relnamespace = 'jobloop'::regnamespace
                          AND NOT c.relispartition
                          AND obj_description(c.oid, 'pg_class')
                              = 'jobloop: an expired partition of finished_job, detached; retention drops it') THEN
            status := 'gone';
            RETURN;
        END IF;
        EXECUTE format('WITH c AS (SELECT owner, status, count(*) AS n FROM %s GROUP BY owner, status),'
                       ' i AS (INSERT INTO jobloop.job_count_change (owner, status, n)'
                       '       SELECT owner, status, -n FROM c)'
                       ' SELECT coalesce(sum(n), 0) FROM c', expired) INTO jobs;
        EXECUTE format('DROP TABLE %s', expired);
        status := 'dropped';
    EXCEPTION
        WHEN lock_not_available THEN
            status := 'busy';
            jobs := 0;
        WHEN OTHERS THEN
            RAISE WARNING 'jobloop could not drop the expired partition %: %', expired, SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'It is tried again at the next heartbeat.';
            status := 'failed';
            jobs := 0;
    END;
END
$$;

/*
 * One step of maintenance: the action after the first skip ones due (those a
 * worker found busy or failed earlier in the same heartbeat), or none (action
 * NULL).  The workers call it once per transaction.
 */
CREATE FUNCTION jobloop.maintain_finished_partitions_step(
    retention interval, at timestamptz DEFAULT pg_catalog.now(), skip integer DEFAULT 0,
    OUT action text, OUT status text, OUT partition text,
    OUT lower_bound timestamptz, OUT upper_bound timestamptz, OUT jobs bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
BEGIN
    SELECT * INTO d FROM jobloop.finished_partitions_due(retention, at) OFFSET skip LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- named before the action, which may drop it
    action := d.action; partition := d.partition::text;
    lower_bound := d.lower_bound; upper_bound := d.upper_bound; jobs := 0;
    IF d.action = 'make' THEN
        SELECT m.status, m.partition::text INTO status, partition
          FROM jobloop.make_finished_partition(d.lower_bound, d.upper_bound, at) m;
        -- its lower bound may be later (make_finished_partition); a statement of its
        -- own, whose snapshot sees the new partition
        SELECT coalesce(min(e.lower_bound), d.lower_bound) INTO lower_bound
          FROM jobloop.finished_job_partitions() e
         WHERE e.partition::text = maintain_finished_partitions_step.partition;
    ELSIF d.action = 'detach' THEN
        status := jobloop.detach_finished_partition(d.partition);
    ELSE
        SELECT x.status, x.jobs INTO status, jobs FROM jobloop.drop_expired_partition(d.partition) x;
    END IF;
END
$$;

/*
 * Everything due, in this one transaction (for a DBA or a test: it holds
 * every lock it takes until that transaction ends).
 */
CREATE FUNCTION jobloop.maintain_finished_partitions(
    retention interval, at timestamptz DEFAULT pg_catalog.now(),
    OUT action text, OUT status text, OUT partition text,
    OUT lower_bound timestamptz, OUT upper_bound timestamptz, OUT jobs bigint)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    skip integer := 0;
    s    record;
BEGIN
    -- bounded: each step either does its action or is skipped next time
    FOR k IN 1..1000 LOOP
        SELECT * INTO s FROM jobloop.maintain_finished_partitions_step(retention, at, skip);
        EXIT WHEN s.action IS NULL;
        action := s.action; status := s.status; partition := s.partition;
        lower_bound := s.lower_bound; upper_bound := s.upper_bound; jobs := s.jobs;
        RETURN NEXT;
        IF s.status NOT IN ('made', 'detached', 'dropped') THEN
            skip := skip + 1;
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION jobloop.finished_partitions_due(interval, timestamptz),
                       jobloop.make_finished_partition(timestamptz, timestamptz, timestamptz),
                       jobloop.detach_finished_partition(regclass),
                       jobloop.drop_expired_partition(regclass),
                       jobloop.maintain_finished_partitions_step(interval, timestamptz, integer),
                       jobloop.maintain_finished_partitions(interval, timestamptz)
    FROM PUBLIC;

/*
 * On an update of a running installation, the partitions for now and two
 * widths ahead are made here: from the end of this script jobs move to
 * finished_job as they finish, and what finishes before a worker's first
 * heartbeat would otherwise go to the default partition.  They are made as
 * the workers make theirs, and then left out of the extension, so that
 * pg_dump dumps them like the workers' (definition, ATTACH and rows).
 * Not on CREATE EXTENSION (the schema is made in this very transaction):
 * a fresh installation has no job to finish yet and its workers make the
 * partitions at their first heartbeat, and pg_restore, which runs CREATE
 * EXTENSION first, brings the dump's own partitions, which partitions made
 * here would collide with.
 */
DO $$
DECLARE
    retention interval := COALESCE(pg_catalog.current_setting('jobloop.retention', true), '7d')::interval;
    d record;
    m record;
BEGIN
    IF (SELECT n.xmin OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id()::xid
          FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'jobloop') THEN
        RETURN;
    END IF;
    FOR d IN SELECT * FROM jobloop.finished_partitions_due(retention) f
              WHERE f.action OPERATOR(pg_catalog.=) 'make' LOOP
        SELECT * INTO m FROM jobloop.make_finished_partition(d.lower_bound, d.upper_bound);
        IF m.partition IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER EXTENSION jobloop DROP TABLE %s', m.partition);
        END IF;
    END LOOP;
END
$$;

/* ======================================================================
 * External workers (issue 14): jobloop-worker carries the HTTP calls on
 * any machine; the turns run in the backends of their connections.
 * ====================================================================== */

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

-- Retention's actions for databases that external workers alone serve: one per call.
CREATE FUNCTION jobloop.worker_maintain()
RETURNS boolean
AS 'MODULE_PATHNAME', 'jobloop_worker_maintain'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION jobloop.worker_maintain() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobloop.worker_maintain() TO jobloop_worker;
