-- bench/soak.sql -- the job kind and the submitter of bench/soak.sh.
--
-- A job GETs <url><n> k times (the mock's /delay?s=L&n=), then completes; a share of the
-- jobs (fail_at set at submit) asks for /status/422 at that step instead, and step()
-- fails them, so the table holds completed, failed and cancelled jobs with realistic
-- states (~200 bytes: an order reference and a note ride along, as business state does).
--
-- soak.run(...) submits `rate` jobs a second in ticks of 100 ms, one transaction per tick,
-- and cancels a share of the jobs submitted three ticks earlier (most are running then),
-- one cancel per transaction, as an application would.  It stops at `end_epoch` (epoch
-- seconds); bench/soak.sh calls it again after a crash restart with the same end, so the
-- counts in soak.progress (a logged table) go on across restarts.

\set ON_ERROR_STOP 1

CREATE SCHEMA soak;

CREATE FUNCTION soak.request(state jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF (state->>'n')::integer >= coalesce((state->>'fail_at')::integer, 1000000) THEN
        RETURN jsonb_build_object('url', (state->>'fail_url') || (state->>'n'));
    END IF;
    RETURN jsonb_build_object('url', (state->>'url') || (state->>'n'));
END
$$;

CREATE FUNCTION soak.step(state jsonb, response jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF (response->>'status')::integer <> 200 THEN
        RAISE EXCEPTION 'HTTP % from the API at step %', response->>'status', state->>'n';
    END IF;
    RETURN state || jsonb_build_object('n', (state->>'n')::integer + 1);
END
$$;

CREATE FUNCTION soak.done(state jsonb) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    RETURN (state->>'n')::integer >= (state->>'k')::integer;
END
$$;

SELECT jobloop.create_kind('soak', 'soak.request(jsonb)', 'soak.step(jsonb,jsonb)',
                           'soak.done(jsonb)', max_steps => 1000000, max_attempts => 3);

CREATE TABLE soak.progress (
    submitted bigint NOT NULL,
    cancelled bigint NOT NULL,
    calls     integer NOT NULL      -- how often soak.run was (re)started
);
INSERT INTO soak.progress VALUES (0, 0, 0);

CREATE PROCEDURE soak.run(rate double precision, end_epoch double precision,
                          cancel_share double precision, fail_share double precision,
                          tenants integer, k integer, url text, fail_url text)
LANGUAGE plpgsql
AS $$
DECLARE
    tick     constant double precision := 0.1;
    t0       double precision := extract(epoch FROM clock_timestamp());
    ticks    bigint := 0;
    carry    double precision := 0;
    m        integer;
    ids      bigint[];
    prev1    bigint[] := '{}';
    prev2    bigint[] := '{}';
    prev3    bigint[] := '{}';
    id       bigint;
    seq      bigint;
    nc       integer;
    wait_s   double precision;
BEGIN
    UPDATE soak.progress SET calls = calls + 1 RETURNING submitted INTO seq;
    COMMIT;
    LOOP
        EXIT WHEN extract(epoch FROM clock_timestamp()) >= end_epoch;
        carry := carry + rate * tick;
        m := floor(carry)::integer;
        carry := carry - m;
        IF m > 0 THEN
            SELECT array_agg(jobloop.submit('soak',
                       jsonb_build_object(
                           'url', url, 'fail_url', fail_url, 'n', 0, 'k', k,
                           'fail_at', CASE WHEN random() < fail_share
                                           THEN 1 + (g % greatest(k - 1, 1)) END,
                           'order', 'ord-' || lpad((seq + g)::text, 12, '0'),
                           'note', 'soak job ' || (seq + g) || ' of tenant ' || (g % tenants)
                                   || ', submitted by bench/soak.sql'),
                       'tenant-' || lpad(((seq + g) % tenants)::text, 3, '0')))
              INTO ids
              FROM generate_series(1, m) AS g;
            seq := seq + m;
            UPDATE soak.progress SET submitted = submitted + m;
        ELSE
            ids := '{}';
        END IF;
        COMMIT;
        -- Cancel a share of the jobs submitted three ticks (~0.3 s) ago, one per
        -- transaction: a multi-row cancel can deadlock with a worker's batch UPDATE.
        nc := 0;
        FOREACH id IN ARRAY prev3 LOOP
            IF random() < cancel_share THEN
                PERFORM jobloop.cancel(id);
                COMMIT;
                nc := nc + 1;
            END IF;
        END LOOP;
        IF nc > 0 THEN
            UPDATE soak.progress SET cancelled = cancelled + nc;
            COMMIT;
        END IF;
        prev3 := prev2;
        prev2 := prev1;
        prev1 := coalesce(ids, '{}');
        ticks := ticks + 1;
        wait_s := t0 + ticks * tick - extract(epoch FROM clock_timestamp());
        IF wait_s > 0 THEN
            PERFORM pg_sleep(wait_s);
        END IF;
    END LOOP;
END
$$;
