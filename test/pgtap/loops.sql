-- loops.sql: multi-step job loops across tenants -- exact step counts, state
-- carried from step to step, done functions, request returning NULL, max_steps.
\ir lib.psql

SELECT plan(26);

-- A counter: request /json?n=<n>, step records the n the API echoed back,
-- done when n reaches target.
CREATE OR REPLACE FUNCTION loops_request(state jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('url', format('%s/json?n=%s&tag=%s', state->>'base', state->>'n', state->>'tag'))
$$;
CREATE OR REPLACE FUNCTION loops_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT state || jsonb_build_object('n', (state->>'n')::integer + 1,
                                       'seen', state->'seen' || (response->'body'->'n'))
$$;
CREATE OR REPLACE FUNCTION loops_done(state jsonb) RETURNS boolean LANGUAGE sql AS $$
    SELECT (state->>'n')::integer >= (state->>'target')::integer
$$;
-- The same counter, but the request function ends the job by returning NULL.
CREATE OR REPLACE FUNCTION loops_request_or_null(state jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN (state->>'n')::integer >= (state->>'target')::integer THEN NULL
                ELSE loops_request(state) END
$$;

\o /dev/null
SELECT jobloop.create_kind('loops_counter', 'loops_request(jsonb)', 'loops_step(jsonb,jsonb)', 'loops_done(jsonb)');
SELECT jobloop.create_kind('loops_null_ends', 'loops_request_or_null(jsonb)', 'loops_step(jsonb,jsonb)');
SELECT jobloop.create_kind('loops_forever', 'loops_request(jsonb)', 'loops_step(jsonb,jsonb)', max_steps => 3);
SELECT jobloop.create_kind('loops_capped', 'loops_request(jsonb)', 'loops_step(jsonb,jsonb)', 'loops_done(jsonb)',
                           max_steps => 4);
\o

SELECT jltest.tag() AS tag \gset

-- 12 jobs over 3 tenants (and one without a tenant), needing 1 to 12 steps.
CREATE TEMP TABLE loops_jobs AS
SELECT g AS target,
       jobloop.submit('loops_counter',
                      jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 0, 'target', g, 'seen', '[]'::jsonb),
                      CASE WHEN g % 4 = 0 THEN NULL ELSE 'loops-tenant-' || g % 4 END) AS id
  FROM generate_series(1, 12) g;

SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '60 s') = 'completed'), 12::bigint,
          'all 12 jobs of 4 tenants complete')
  FROM loops_jobs;
SELECT is_empty($$SELECT l.id, l.target, j.step FROM loops_jobs l JOIN jobloop.jobs j USING (id)
                   WHERE j.step <> l.target$$,
                'each job ran exactly as many steps as it needed');
SELECT is_empty($$SELECT l.id, j.state FROM loops_jobs l JOIN jobloop.jobs j USING (id)
                   WHERE j.state->'seen' <> (SELECT jsonb_agg(i ORDER BY i) FROM generate_series(0, l.target - 1) i)
                      OR (j.state->>'n')::integer <> l.target$$,
                'state went from each step to the next: the API saw n = 0, 1, ... in order');
SELECT is_empty($$SELECT l.id FROM loops_jobs l JOIN jobloop.jobs j USING (id)
                   WHERE j.last_error IS NOT NULL OR j.attempts <> 0 OR j.finished_at IS NULL
                      OR j.tenant IS DISTINCT FROM CASE WHEN l.target % 4 = 0 THEN NULL
                                                        ELSE 'loops-tenant-' || l.target % 4 END$$,
                'no errors, finished, tenants kept');
SELECT is((SELECT count(*) FROM jltest.requests_tagged(:'tag')), (SELECT sum(target) FROM loops_jobs)::bigint,
          'the API received one request per step, 78 in all');
SELECT set_eq(format($$SELECT key_job, key_step FROM jltest.access_log() WHERE strpos(uri, %L) > 0$$, :'tag'),
              $$SELECT id, s FROM loops_jobs, generate_series(0, target - 1) s$$,
              'each (job, step) was requested exactly once, with its own key');
SELECT is_empty(format($$SELECT 1 FROM jltest.access_log() a JOIN loops_jobs l ON l.id = a.key_job
                          WHERE strpos(a.uri, %L) > 0 AND a.uri <> format('/json?n=%%s&tag=%%s', a.key_step, %L)$$,
                       :'tag', :'tag'),
                'step s of a job requested /json?n=s: the request was computed from the committed state');

-- done() is asked before every request, including the first.
SELECT jobloop.submit('loops_counter', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 5,
                                                          'target', 5, 'seen', '[]'::jsonb)) AS done_at_once \gset
SELECT is(jobloop.wait(:done_at_once, '30 s'), 'completed', 'a job that is done from the start completes');
SELECT is(step, 0, 'after 0 steps') FROM jobloop.jobs WHERE id = :done_at_once;
SELECT is_empty(format('SELECT 1 FROM jltest.requests_of(%s)', :done_at_once), 'without calling the API');

-- A request function that returns NULL ends the job.
SELECT jobloop.submit('loops_null_ends', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 0,
                                                            'target', 3, 'seen', '[]'::jsonb)) AS null_ends \gset
SELECT is(jobloop.wait(:null_ends, '30 s'), 'completed', 'request returning NULL completes the job');
SELECT is(step, 3, 'after exactly 3 steps') FROM jobloop.jobs WHERE id = :null_ends;
SELECT is(state->'seen', '[0, 1, 2]', 'with every step''s state') FROM jobloop.jobs WHERE id = :null_ends;
SELECT is((SELECT count(*) FROM jltest.requests_of(:null_ends)), 3::bigint, 'and 3 requests');

-- max_steps stops a job that never finishes.
SELECT jobloop.submit('loops_forever', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 0,
                                                          'target', 1000, 'seen', '[]'::jsonb)) AS forever \gset
SELECT is(jobloop.wait(:forever, '30 s'), 'failed', 'a job that never finishes fails');
SELECT is(last_error, 'job reached max_steps (3) without finishing', 'last_error names max_steps')
  FROM jobloop.jobs WHERE id = :forever;
SELECT is(step, 3, 'after exactly max_steps steps') FROM jobloop.jobs WHERE id = :forever;
SELECT is(state->'seen', '[0, 1, 2]', 'its state is that of the last step') FROM jobloop.jobs WHERE id = :forever;
SELECT is((SELECT count(*) FROM jltest.requests_of(:forever)), 3::bigint, 'and it sent exactly 3 requests');
SELECT ok(finished_at IS NOT NULL, 'a failed job is finished') FROM jobloop.jobs WHERE id = :forever;

-- A job whose last allowed step finishes it completes.
SELECT jobloop.submit('loops_capped', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 0,
                                                         'target', 4, 'seen', '[]'::jsonb)) AS capped_ok \gset
SELECT jobloop.submit('loops_capped', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'n', 0,
                                                         'target', 5, 'seen', '[]'::jsonb)) AS capped_fail \gset
SELECT is(jobloop.wait(:capped_ok, '30 s'), 'completed', 'done at step max_steps: completed, not failed');
SELECT is(step, 4, 'after 4 steps') FROM jobloop.jobs WHERE id = :capped_ok;
SELECT is(jobloop.wait(:capped_fail, '30 s'), 'failed', 'needing max_steps + 1 steps: failed');
SELECT is(last_error, 'job reached max_steps (4) without finishing', 'with the max_steps error')
  FROM jobloop.jobs WHERE id = :capped_fail;
SELECT is(step, 4, 'after 4 steps') FROM jobloop.jobs WHERE id = :capped_fail;
SELECT is(state->'seen', '[0, 1, 2, 3]', 'keeping the state of its 4th step') FROM jobloop.jobs WHERE id = :capped_fail;

SELECT * FROM finish();
