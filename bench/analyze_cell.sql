-- bench/analyze_cell.sql -- the numbers of one matrix cell, from the mock API's access log.
--
-- bench/run.sh loads the cell's access-log lines into bench_req (one row per request:
-- when its response ended, how long nginx took, its status, and the job and step from
-- its Idempotency-Key) and runs this with psql -At -F, ; it prints one CSV line:
--
--   window_s, all_in_flight, steps_per_s, overall_steps_per_s,
--   ovh_p50_ms, ovh_p99_ms, ovh_max_ms, non200
--
-- Steady-state window: from the moment the last job sent its first request (all N jobs
-- in flight from then on) to the moment the first job received its last response.
-- Inside it, each job's rate is (its responses in the window - 1) / (time between the
-- first and the last of them), and steps/s is the sum over jobs.  This is exact for
-- jobs that move in lock-step waves (high L), where counting responses in a window is
-- off by up to a whole wave, and equals the usual count/time when traffic is smooth.
-- If that window is too short (less than a quarter of the run: the jobs were not all in
-- flight at once), the middle 80% of the run is used instead, counting responses.
--
-- Step overhead: for consecutive steps of one job, the time from the end of a response
-- ($msec of its log line) to the start of the next request ($msec - $request_time of
-- the next line).  nginx logs in milliseconds, so values are multiples of ~1 ms.

WITH r AS (
    SELECT job, step, status, t_end, t_end - rt AS t_start FROM bench_req
),
per_job AS MATERIALIZED (
    SELECT job, min(t_start) AS first_start, max(t_end) AS last_end FROM r GROUP BY job
),
span AS (
    SELECT min(first_start) AS s0, max(last_end) AS s1, (SELECT count(*) FROM r) AS total
      FROM per_job
),
win AS MATERIALIZED (
    SELECT CASE WHEN ok THEN a ELSE s0 + 0.1 * (s1 - s0) END AS a,
           CASE WHEN ok THEN b ELSE s1 - 0.1 * (s1 - s0) END AS b,
           ok
      FROM (SELECT max(first_start) AS a, min(last_end) AS b FROM per_job) w,
           span,
           LATERAL (SELECT (min(last_end) - max(first_start)) >= 0.25 * (s1 - s0) AS ok
                      FROM per_job) o
),
job_rate AS (
    SELECT r.job, (count(*) - 1) / nullif(max(r.t_end) - min(r.t_end), 0) AS rate
      FROM r, win
     WHERE r.t_end >= win.a AND r.t_end <= win.b
     GROUP BY r.job
),
-- Only uncorrelated subqueries here, and materialized: evaluated once, not per row of
-- the final join.
rate AS MATERIALIZED (
    SELECT CASE WHEN (SELECT ok FROM win) THEN (SELECT sum(rate) FROM job_rate)
                ELSE (SELECT count(*) FROM r, win WHERE r.t_end > win.a AND r.t_end <= win.b)
                     / nullif((SELECT b - a FROM win), 0)
           END AS steps_per_s
),
ovh AS (
    SELECT 1000 * (t_start - lag(t_end) OVER (PARTITION BY job ORDER BY step, t_end)) AS ms
      FROM r
)
SELECT round((win.b - win.a)::numeric, 2),
       win.ok,
       round(rate.steps_per_s::numeric),
       round((span.total / nullif(span.s1 - span.s0, 0))::numeric),
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ovh.ms)::numeric, 1),
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ovh.ms)::numeric, 1),
       round(max(ovh.ms)::numeric, 1),
       (SELECT count(*) FROM r WHERE status <> 200)
  FROM ovh, win, rate, span
 WHERE ovh.ms IS NOT NULL
 GROUP BY win.a, win.b, win.ok, rate.steps_per_s, span.total, span.s0, span.s1;
