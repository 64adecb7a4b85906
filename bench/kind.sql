-- bench/kind.sql -- the job kind the benchmark runs (loaded by bench/run.sh).
--
-- The smallest realistic business logic: GET the URL in the state, count the step,
-- stop after k steps -- or once the clock passes "until" (epoch seconds), so a cell whose
-- throughput falls far short of the guess that chose k still ends in bounded time, with
-- every job completed rather than cancelled.  The URL (and so the API latency) travels in
-- the job's state:
--   {"url": "http://127.0.0.1:PORT/delay?s=0.1&n=", "n": 0, "k": 20, "until": 1795316400}
-- and n is appended, so each request of a job has its own URL in the access log.
--
-- PL/pgSQL by default; psql -v lang=sql loads the same logic as SQL functions
-- (BENCH_LANG=sql), to compare what the language costs per step.

\set ON_ERROR_STOP 1

CREATE SCHEMA bench;

\if :{?lang}
\else
\set lang plpgsql
\endif

SELECT :'lang' = 'sql' AS use_sql \gset
\if :use_sql
CREATE FUNCTION bench.request(state jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    RETURN jsonb_build_object('url', (state->>'url') || (state->>'n'));

CREATE FUNCTION bench.step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    RETURN state || jsonb_build_object('n', (state->>'n')::integer + 1);

CREATE FUNCTION bench.done(state jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    RETURN (state->>'n')::integer >= (state->>'k')::integer
        OR extract(epoch FROM clock_timestamp()) >= (state->>'until')::float8;
\else
CREATE FUNCTION bench.request(state jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    RETURN jsonb_build_object('url', (state->>'url') || (state->>'n'));
END
$$;

CREATE FUNCTION bench.step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF (response->>'status')::integer <> 200 THEN
        RAISE EXCEPTION 'HTTP %', response->>'status';
    END IF;
    RETURN state || jsonb_build_object('n', (state->>'n')::integer + 1);
END
$$;

CREATE FUNCTION bench.done(state jsonb) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN (state->>'n')::integer >= (state->>'k')::integer
        OR extract(epoch FROM clock_timestamp()) >= (state->>'until')::float8;
END
$$;
\endif

SELECT jobloop.create_kind('bench', 'bench.request(jsonb)', 'bench.step(jsonb,jsonb)',
                           'bench.done(jsonb)', max_steps => 1000000, max_attempts => 3);
