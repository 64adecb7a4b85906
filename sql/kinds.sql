--
-- kinds: create_kind / drop_kind and the jobloop.kind table.
--
-- pg_regress runs in database contrib_regression, which no jobloop worker
-- serves, so every job submitted here stays pending.
--
-- The warning's DETAIL names the server's jobloop.database: terse, so that this passes
-- whatever database the workers serve (test/suites/upgrade.sh checks the DETAIL).
\set VERBOSITY terse
CREATE EXTENSION jobloop;
\set VERBOSITY default

-- Business logic of the right shape.
CREATE FUNCTION kinds_req(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('url', 'http://127.0.0.1:1/') $$;
CREATE FUNCTION kinds_step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
CREATE FUNCTION kinds_done(state jsonb) RETURNS boolean
    LANGUAGE sql AS $$ SELECT true $$;

-- And of the wrong shapes.
CREATE FUNCTION kinds_req_text(state text) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
CREATE FUNCTION kinds_req_json(state json) RETURNS json
    LANGUAGE sql AS $$ SELECT NULL::json $$;
CREATE FUNCTION kinds_req_returns_text(state jsonb) RETURNS text
    LANGUAGE sql AS $$ SELECT NULL::text $$;
CREATE FUNCTION kinds_req_setof(state jsonb) RETURNS SETOF jsonb
    LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
CREATE PROCEDURE kinds_req_proc(state jsonb)
    LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION kinds_step_one_arg(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
CREATE FUNCTION kinds_step_three_args(state jsonb, response jsonb, extra jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
CREATE FUNCTION kinds_done_jsonb(state jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT state $$;
CREATE FUNCTION kinds_done_two_args(state jsonb, response jsonb) RETURNS boolean
    LANGUAGE sql AS $$ SELECT true $$;

-- A kind with every default.
SELECT jobloop.create_kind('basic', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT name, owner, request_fn, step_fn, done_fn, max_steps, max_attempts, backoff,
       max_backoff, timeout, notify_steps, on_error, created_at IS NOT NULL AS has_created_at
  FROM jobloop.kind ORDER BY name;

-- Every option, by name.
SELECT jobloop.create_kind('full', request => 'kinds_req(jsonb)', step => 'kinds_step(jsonb,jsonb)',
                           done => 'kinds_done(jsonb)', max_steps => 7, max_attempts => 3,
                           backoff => '250 ms', max_backoff => '10 s', timeout => '2 s',
                           notify_steps => true, on_error => 'step');
SELECT name, owner, request_fn, step_fn, done_fn, max_steps, max_attempts, backoff,
       max_backoff, timeout, notify_steps, on_error
  FROM jobloop.kind WHERE name = 'full';

-- Wrong signatures name the function and the signature it must have.
SELECT jobloop.create_kind('bad', 'kinds_req_text(text)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req_json(json)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req_returns_text(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req_setof(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req_proc(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_step(jsonb,jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step_one_arg(jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step_three_args(jsonb,jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_req(jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', 'kinds_done_jsonb(jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', 'kinds_done_two_args(jsonb,jsonb)');

-- Functions that do not exist.
SELECT jobloop.create_kind('bad', 'no_such_function(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'no_such_function(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 4000000000::oid::regprocedure, 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 4000000000::oid::regprocedure);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', 4000000000::oid::regprocedure);

-- NULL where a value is required.
SELECT jobloop.create_kind(NULL, 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', NULL, 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_steps => NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_attempts => NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', backoff => NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_backoff => NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', notify_steps => NULL);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', on_error => NULL);

-- Names: 1 to 63 bytes.
SELECT jobloop.create_kind('', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind(repeat('k', 64), 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT jobloop.create_kind(repeat('k', 63), 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT length(name) FROM jobloop.kind WHERE name LIKE 'kkk%';

-- Out-of-range options.
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_steps => 0);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_steps => -1);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_attempts => 0);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_attempts => 1001);
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', backoff => '0');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', backoff => '-1 s');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', backoff => '10 min', max_backoff => '1 min');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', timeout => '0');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', timeout => '-5 s');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', timeout => '30 days');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', on_error => 'retry');
SELECT jobloop.create_kind('bad', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', on_error => 'FAIL');

-- None of the failures above left a kind behind.
SELECT count(*) FROM jobloop.kind WHERE name = 'bad';

-- Boundaries that are accepted.
SELECT jobloop.create_kind('edges', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)',
                           max_steps => 1, max_attempts => 1000, backoff => '1 ms',
                           max_backoff => '1 ms', timeout => '1 ms');
SELECT max_steps, max_attempts, backoff, max_backoff, timeout FROM jobloop.kind WHERE name = 'edges';

-- Replacing a kind updates it in place.
SELECT jobloop.create_kind('basic', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', 'kinds_done(jsonb)',
                           max_steps => 5, on_error => 'step');
SELECT name, done_fn, max_steps, on_error FROM jobloop.kind WHERE name = 'basic';
SELECT jobloop.create_kind('basic', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)');
SELECT name, done_fn, max_steps, on_error FROM jobloop.kind WHERE name = 'basic';
-- A failed replacement leaves the kind as it was.
SELECT jobloop.create_kind('basic', 'kinds_req(jsonb)', 'kinds_step(jsonb,jsonb)', max_steps => 0);
SELECT name, done_fn, max_steps, on_error FROM jobloop.kind WHERE name = 'basic';

-- drop_kind.
SELECT jobloop.drop_kind('no_such_kind');
SELECT jobloop.drop_kind(NULL);
SELECT jobloop.drop_kind('');
SELECT jobloop.drop_kind('edges');
SELECT jobloop.drop_kind('edges');
SELECT count(*) FROM jobloop.kind WHERE name = 'edges';

-- A kind with unfinished jobs cannot be dropped; once they are finished it can,
-- and its jobs go with it.
SELECT jobloop.submit('full') AS job1;
SELECT jobloop.submit('full') AS job2;
SELECT jobloop.drop_kind('full');
SELECT jobloop.cancel(1);
SELECT jobloop.drop_kind('full');
SELECT jobloop.cancel(2);
SELECT jobloop.drop_kind('full');
SELECT count(*) FROM jobloop.kind WHERE name = 'full';
SELECT count(*) FROM jobloop.jobs WHERE kind = 'full';

-- A dropped kind no longer takes jobs.
SELECT jobloop.submit('full');

SELECT jobloop.drop_kind(repeat('k', 63));
SELECT name FROM jobloop.kind ORDER BY name;
