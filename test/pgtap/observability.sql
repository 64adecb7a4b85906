-- observability.sql: jobloop.worker_stats(), jobloop.stats and jobloop.errors
-- on a database a worker serves.
\ir lib.psql

SELECT plan(19);

-- A kind of its own for each run, so that a re-run counts afresh.
SELECT 'observability_fail_' || left(jltest.tag(), 12) AS fail_kind \gset
\o /dev/null
SELECT jobloop.create_kind('observability_ok', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)');
SELECT jobloop.create_kind(:'fail_kind', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)',
                           max_attempts => 1);
\o

-- Make sure the worker is up (it polls for the extension once a second).
SELECT jltest.submit_script('observability_ok', '[{"url": "/json?n=0"}]') AS warmup \gset
SELECT is(jobloop.wait(:warmup, '30 s'), 'completed', 'a first job completes');

SELECT is((SELECT count(*) FROM jobloop.worker_stats() WHERE database = current_database()),
          current_setting('jobloop.workers')::bigint, 'worker_stats(): one row per worker of this database');
SELECT ok((SELECT bool_and(a.backend_type = 'jobloop worker')
             FROM jobloop.worker_stats() w JOIN pg_stat_activity a USING (pid)
            WHERE w.database = current_database()), 'whose pids are jobloop workers');
SELECT sum(steps) AS steps_before, sum(jobs_completed) AS completed_before, sum(jobs_failed) AS failed_before
  FROM jobloop.worker_stats() WHERE database = current_database() \gset

SELECT jltest.submit_script('observability_ok', '[{"url": "/json?n=1"}, {"url": "/json?n=2"}, {"url": "/json?n=3"}]') AS ok_job \gset
SELECT jltest.submit_script(:'fail_kind', '[{"url": "/status/503"}]') AS fail_job \gset
SELECT is(jobloop.wait(:ok_job, '30 s'), 'completed', 'a 3-step job completes');
SELECT is(jobloop.wait(:fail_job, '30 s'), 'failed', 'another job fails');
SELECT jltest.submit_script('observability_ok', '[{"url": "/delay?s=5&n=1"}]') AS cancel_job \gset
SELECT ok(jobloop.cancel(:cancel_job), 'a third job is cancelled');

-- Each left jobloop.job for jobloop.finished_job when it finished, whoever finished it.
SELECT is((SELECT string_agg(status, ',' ORDER BY id) FROM jobloop.finished_job
            WHERE id IN (:ok_job, :fail_job, :cancel_job)),
          'completed,failed,cancelled',
          'finished jobs are in jobloop.finished_job: completed and failed by the worker, cancelled by cancel()');
SELECT is((SELECT count(*) FROM jobloop.job WHERE id IN (:ok_job, :fail_job, :cancel_job)), 0::bigint,
          '... and no longer in jobloop.job');

-- The counters are updated by the worker after its commit: wait for them.
SELECT ok(jltest.eventually(format($$SELECT sum(steps) >= %s + 3 AND sum(jobs_completed) >= %s + 1 AND sum(jobs_failed) >= %s + 1
                                      FROM jobloop.worker_stats() WHERE database = current_database()$$,
                                   :steps_before, :completed_before, :failed_before), '10 s'),
          'worker_stats() counted the 3 steps, the completed and the failed job');

SELECT is(workers, current_setting('jobloop.workers')::bigint, 'stats: the workers of this database') FROM jobloop.stats;
SELECT ok(completed >= 2 AND failed >= 1, 'stats: jobs by status') FROM jobloop.stats;
SELECT is(completed, (SELECT count(*) FROM jobloop.jobs WHERE status = 'completed'), 'stats.completed counts completed jobs')
  FROM jobloop.stats;

-- stats counts by status from counters the workers keep (jobloop.job_count): the same
-- as counting, in one snapshot, and the workers fold the changes into job_count.
SELECT ok(s.pending = c.pending AND s.running = c.running AND s.completed = c.completed
          AND s.failed = c.failed AND s.cancelled = c.cancelled,
          'stats: every status counted as count(*) counts it')
  FROM jobloop.stats s,
       (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'running') AS running,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled
          FROM jobloop.jobs) c;
SELECT ok(jltest.eventually($$SELECT NOT EXISTS (SELECT FROM jobloop.job_count_change)$$, '45 s'),
          'the workers fold the changes of the counts (at the latest at their next heartbeat)');

SELECT results_eq(format($$SELECT failed, last_error FROM jobloop.errors WHERE kind = %L$$, :'fail_kind'),
                  $$VALUES (1::bigint, 'HTTP 503 Service Unavailable after 1 attempts')$$,
                  'errors: failures of the last day by kind, with the latest reason');
SELECT is_empty($$SELECT 1 FROM jobloop.errors WHERE kind = 'observability_ok'$$, 'a kind without failures is not listed');

-- retry() moves a failed job back to jobloop.job (seen before the commit lets a worker
-- at it); it fails again and moves again.
BEGIN;
SELECT ok(jobloop.retry(:fail_job), 'retry() of the failed job');
SELECT is((SELECT status FROM jobloop.job WHERE id = :fail_job), 'pending',
          '... moves it back to jobloop.job, pending');
COMMIT;
SELECT jobloop.wait(:fail_job, '30 s') AS refailed \gset
SELECT is(:'refailed' || ' ' || (SELECT count(*) FROM jobloop.finished_job WHERE id = :fail_job),
          'failed 1', '... it fails again and is in jobloop.finished_job again');

SELECT * FROM finish();
