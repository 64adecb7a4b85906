-- security.sql: a job's functions run as the role that submitted it, with
-- that role's privileges, inside a security-restricted operation.
\ir lib.psql

SELECT plan(20);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobloop_tap_app') THEN
        CREATE ROLE jobloop_tap_app;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA jobloop TO jobloop_tap_app;

-- A table the app role may not read.
CREATE TABLE IF NOT EXISTS security_secret (v text);
REVOKE ALL ON security_secret FROM PUBLIC;
TRUNCATE security_secret;
INSERT INTO security_secret VALUES ('s1'), ('s2');

-- The request puts current_user in the URL; the step records current_user
-- and session_user, and (if asked) reads the secret table or tries to
-- escape the role.
CREATE OR REPLACE FUNCTION security_request(state jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN state ? 'user_in_step' THEN NULL
                ELSE jsonb_build_object('url', format('%s/json?n=1&tag=%s&user=%s', state->>'base', state->>'tag', current_user))
           END
$$;
CREATE OR REPLACE FUNCTION security_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    secret bigint;
BEGIN
    IF state->>'do' = 'read_secret' THEN
        SELECT count(*) INTO secret FROM public.security_secret;
    ELSIF state->>'do' = 'set_role' THEN
        SET ROLE postgres;
    ELSIF state->>'do' = 'temp_table' THEN
        CREATE TEMP TABLE security_escape (x int);
    END IF;
    RETURN state || jsonb_build_object('user_in_step', current_user, 'secret', secret);
END
$$;

\o /dev/null
SELECT jobloop.create_kind('security_kind', 'security_request(jsonb)', 'security_step(jsonb,jsonb)');
\o

SELECT jltest.tag() AS tag \gset

-- The superuser's jobs.
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag')) AS su_plain \gset
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'do', 'read_secret')) AS su_secret \gset

-- The app role's jobs.
SET ROLE jobloop_tap_app;
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag')) AS app_plain \gset
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'do', 'read_secret')) AS app_secret \gset
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'do', 'set_role')) AS app_set_role \gset
SELECT jobloop.submit('security_kind', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'do', 'temp_table')) AS app_temp \gset
RESET ROLE;

SELECT is(jobloop.wait(:su_plain, '30 s'), 'completed', 'superuser''s job completes');
SELECT is(state->>'user_in_step', 'postgres', 'its step ran as postgres') FROM jobloop.jobs WHERE id = :su_plain;
SELECT is((SELECT uri FROM jltest.requests_of(:su_plain)), format('/json?n=1&tag=%s&user=postgres', :'tag'),
          'its request function ran as postgres');

SELECT is(jobloop.wait(:app_plain, '30 s'), 'completed', 'app role''s job completes');
SELECT is(state->>'user_in_step', 'jobloop_tap_app', 'its step ran as the submitting role, not the worker''s')
  FROM jobloop.jobs WHERE id = :app_plain;
SELECT is((SELECT uri FROM jltest.requests_of(:app_plain)), format('/json?n=1&tag=%s&user=jobloop_tap_app', :'tag'),
          'its request function ran as the submitting role');
SELECT is(owner::text, 'jobloop_tap_app', 'the job is owned by the submitting role') FROM jobloop.jobs WHERE id = :app_plain;

SELECT is(jobloop.wait(:su_secret, '30 s'), 'completed', 'the superuser''s step may read the secret table');
SELECT is(state->'secret', '2', 'and does') FROM jobloop.jobs WHERE id = :su_secret;
SELECT is(jobloop.wait(:app_secret, '30 s'), 'failed', 'the app role''s step may not');
SELECT is(last_error, 'permission denied for table security_secret', 'permission denied')
  FROM jobloop.jobs WHERE id = :app_secret;
SELECT is(state, jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'do', 'read_secret'),
          'and the state is unchanged') FROM jobloop.jobs WHERE id = :app_secret;

SELECT is(jobloop.wait(:app_set_role, '30 s'), 'failed', 'a step cannot SET ROLE to escape its role');
SELECT matches(last_error, '^cannot set parameter "role" within ', 'refused: cannot set parameter "role"')
  FROM jobloop.jobs WHERE id = :app_set_role;
SELECT is(jobloop.wait(:app_temp, '30 s'), 'failed', 'a step cannot create temporary objects that outlive it');
SELECT matches(last_error, 'cannot create temporary table within security-restricted operation', 'security-restricted')
  FROM jobloop.jobs WHERE id = :app_temp;

-- Settings a job's functions change -- with plain SET semantics (set_config(..., false)),
-- not only SET LOCAL -- are undone when its turn ends: the next turn of the same job and
-- other jobs never see them, and the worker's own statements keep their search_path.
CREATE OR REPLACE FUNCTION security_guc_request(state jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('url', format('%s/json?n=1&tag=%s', state->>'base', state->>'tag'))
$$;
CREATE OR REPLACE FUNCTION security_guc_step(state jsonb, response jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    seen jsonb := jsonb_build_object('work_mem', current_setting('work_mem'),
                                     'search_path', current_setting('search_path'));
BEGIN
    IF state ? 'poison' THEN
        PERFORM set_config('work_mem', '77MB', false);
        PERFORM set_config('search_path', 'security_evil, pg_catalog', false);
    END IF;
    RETURN state || jsonb_build_object('n', coalesce((state->>'n')::int, 0) + 1,
                                       'seen', coalesce(state->'seen', '[]') || jsonb_build_array(seen));
END
$$;
CREATE OR REPLACE FUNCTION security_guc_done(state jsonb) RETURNS boolean LANGUAGE sql AS $$
    SELECT coalesce((state->>'n')::int, 0) >= 2
$$;
\o /dev/null
SELECT jobloop.create_kind('security_guc', 'security_guc_request(jsonb)', 'security_guc_step(jsonb,jsonb)',
                           'security_guc_done(jsonb)');
\o
SELECT jobloop.submit('security_guc', jsonb_build_object('base', jltest.url(), 'tag', :'tag', 'poison', true)) AS guc_poison \gset
SELECT is(jobloop.wait(:guc_poison, '30 s'), 'completed', 'a job that changes settings with set_config(..., false) completes');
SELECT jobloop.submit('security_guc', jsonb_build_object('base', jltest.url(), 'tag', :'tag')) AS guc_other \gset
SELECT is(jobloop.wait(:guc_other, '30 s'), 'completed', 'and so does a job that runs after it');
SELECT is_empty(format($$SELECT 1 FROM jobloop.jobs j, jsonb_array_elements(j.state->'seen') s
                          WHERE j.id IN (%s, %s)
                            AND (s->>'work_mem' = '77MB' OR s->>'search_path' LIKE '%%security_evil%%')$$,
                       :guc_poison, :guc_other),
                'neither its own next turn nor the other job sees the changed settings');
SELECT is(jsonb_array_length(state->'seen'), 2, 'the job that changed them ran both its steps')
  FROM jobloop.jobs WHERE id = :guc_poison;

SELECT * FROM finish();
