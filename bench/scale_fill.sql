-- bench/scale_fill.sql -- adds :n finished jobs to jobloop.job (bench/scale.sh).
--
-- Kind 'archive' (bench/kind.sql's functions), 1,000 tenants; 90% completed, 7% failed
-- (with a last_error), 3% cancelled; a state of ~200 bytes as business state has (an
-- order reference, an amount, a PSP reference, a note); finished_at spread evenly over
-- the last :days days (the ids rise with it, as in a real table, where rows are written
-- in time order), the newest a minute ago.  Commits every 500,000 rows.

\set ON_ERROR_STOP 1

SELECT coalesce(max(id), 0) AS fill_base FROM jobloop.job \gset

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM jobloop.kind WHERE name = 'archive') THEN
        PERFORM jobloop.create_kind('archive', 'bench.request(jsonb)', 'bench.step(jsonb,jsonb)',
                                    'bench.done(jsonb)', max_steps => 1000000, max_attempts => 3);
    END IF;
END
$$;

SELECT format($f$
INSERT INTO jobloop.job (kind, owner, tenant, status, step, state, last_error, attempts,
                         run_after, created_at, updated_at, started_at, finished_at)
SELECT 'archive', 'postgres'::regrole, 'tenant-' || lpad((g %% 1000)::text, 4, '0'), st,
       1 + g %% 20,
       jsonb_build_object('order', 'ord-' || lpad((%1$s + g)::text, 12, '0'), 'n', 1 + g %% 20,
                          'k', 20, 'amount', (g %% 100000) / 100.0, 'currency', 'EUR',
                          'psp_ref', md5(g::text), 'note', 'a finished job of the scale bench'),
       CASE st WHEN 'failed' THEN 'HTTP 422 from the API at step ' || (1 + g %% 20) END,
       CASE st WHEN 'failed' THEN 3 ELSE 0 END,
       fin - interval '40 seconds', fin - interval '40 seconds', fin,
       fin - interval '39 seconds', fin
  FROM (SELECT g,
               CASE WHEN r < 0.90 THEN 'completed' WHEN r < 0.97 THEN 'failed'
                    ELSE 'cancelled' END AS st,
               now() - interval '1 minute'
                     - make_interval(secs => %3$s * 86400.0 * (1 - g::float8 / %2$s)) AS fin
          FROM (SELECT g, random() AS r FROM generate_series(%4$s, %5$s) AS g) x) y
$f$, :fill_base, :n, :days, lo, least(lo + 499999, :n))
  FROM generate_series(1, :n, 500000) AS lo \gexec
