-- bench/scale_counters.sql -- experiment E4 of bench/scale.sh (after
-- bench/scale_experiments.sql, which creates schema jobloop_x and jobloop_x.time_ms):
-- counters per status kept by statement-level triggers with transition tables, sharded
-- by backend (pg_backend_pid() % 16) so that the two workers do not queue on one row;
-- jobloop_x.stats reads them.  bench/scale.sh then runs the burst again with the triggers
-- in place, to measure what they cost the workers, and compares the counters with a
-- count(*) afterwards.

\set ON_ERROR_STOP 1
\pset pager off
\if :{?repeat}
\else
\set repeat 3
\endif

\echo '######## E4: counters per status kept by statement triggers'
CREATE TABLE jobloop_x.status_count (
    status text NOT NULL,
    shard  integer NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (status, shard)
);
CREATE FUNCTION jobloop_x.count_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- net change per status of this statement; a step's UPDATE (status unchanged) writes nothing
    IF TG_OP = 'INSERT' THEN
        INSERT INTO jobloop_x.status_count AS c
        SELECT status, pg_backend_pid() % 16, count(*) FROM new_rows GROUP BY status
            ON CONFLICT (status, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO jobloop_x.status_count AS c
        SELECT status, pg_backend_pid() % 16, -count(*) FROM old_rows GROUP BY status
            ON CONFLICT (status, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSE
        INSERT INTO jobloop_x.status_count AS c
        SELECT status, pg_backend_pid() % 16, sum(d)
          FROM (SELECT o.status, -1 AS d FROM old_rows o
                UNION ALL SELECT n.status, 1 FROM new_rows n) x
         GROUP BY status HAVING sum(d) <> 0
            ON CONFLICT (status, shard) DO UPDATE SET n = c.n + excluded.n;
    END IF;
    RETURN NULL;
END
$$;
BEGIN;
LOCK TABLE jobloop.job IN SHARE MODE;
INSERT INTO jobloop_x.status_count SELECT status, 0, count(*) FROM jobloop.job GROUP BY status;
CREATE TRIGGER jl_x_count_ins AFTER INSERT ON jobloop.job REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop_x.count_changes();
CREATE TRIGGER jl_x_count_upd AFTER UPDATE ON jobloop.job REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop_x.count_changes();
CREATE TRIGGER jl_x_count_del AFTER DELETE ON jobloop.job REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobloop_x.count_changes();
COMMIT;
CREATE VIEW jobloop_x.stats AS
    WITH c AS (SELECT status, sum(n)::bigint AS n FROM jobloop_x.status_count GROUP BY status)
    SELECT coalesce((SELECT n FROM c WHERE status = 'pending'), 0) AS pending,
           coalesce((SELECT n FROM c WHERE status = 'running'), 0) AS running,
           coalesce((SELECT n FROM c WHERE status = 'completed'), 0) AS completed,
           coalesce((SELECT n FROM c WHERE status = 'failed'), 0) AS failed,
           coalesce((SELECT n FROM c WHERE status = 'cancelled'), 0) AS cancelled,
           s.workers, s.held, s.in_flight, s.steps, s.steps_per_second_10s,
           s.steps_per_second_1m, s.claim_ms, s.commit_ms, s.paused
      FROM (SELECT workers, held, in_flight, steps, steps_per_second_10s, steps_per_second_1m,
                   claim_ms, commit_ms, paused FROM jobloop.stats) s;
-- jobloop.stats without its five counts, to read the rest from (the planner drops the
-- unused count subqueries of the view)
SELECT jobloop_x.time_ms('SELECT * FROM jobloop_x.stats', :repeat) AS stats_from_counters_ms;
EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM jobloop_x.stats;
SELECT * FROM jobloop_x.stats;
