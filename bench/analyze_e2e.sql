-- bench/analyze_e2e.sql -- the start of a batch, from the mock API's access log.
--
-- bench/run.sh runs this after analyze_cell.sql, on the same bench_req rows (one per
-- request: response end, nginx request time, status, job, step), with
--   psql -At -F, -v t_commit=<epoch seconds of the submit's commit>
-- and prints one CSV line:
--
--   jobs_started, start_first_ms, start_p50_ms, start_last_ms, last_response_end
--
-- A job's first request arrived at $msec - $request_time of its step-0 line (the first
-- attempt, if step 0 was retried); start_*_ms are the earliest, the median and the latest
-- of those arrivals over the jobs, in ms after the commit: start_last_ms is when all N
-- first requests were out.  nginx logs whole milliseconds, so each is +-1 ms.
-- last_response_end: when the last response of the cell ended (epoch seconds).

WITH s0 AS MATERIALIZED (
    SELECT job, min(t_end - rt) AS t FROM bench_req WHERE step = 0 GROUP BY job
)
SELECT count(*),
       round((1000 * (min(t) - :t_commit))::numeric, 1),
       round((1000 * (percentile_cont(0.5) WITHIN GROUP (ORDER BY t) - :t_commit))::numeric, 1),
       round((1000 * (max(t) - :t_commit))::numeric, 1),
       (SELECT max(t_end) FROM bench_req)
  FROM s0;
