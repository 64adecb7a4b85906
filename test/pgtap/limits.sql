-- limits.sql: endpoint limits (concurrency, rate) and tenant caps hold for
-- real requests.  Each check reads the mock's access log: a request's
-- interval is [logged_at - request_time, logged_at]; bounds are one-sided
-- (never "fast enough"), with a few ms for the log's resolution.
--
-- The endpoints here are rate_keys unique to this run, so the limits touch no
-- other test's requests (a limit on 127.0.0.1:port would).
\ir lib.psql

SELECT plan(14);

\o /dev/null
SELECT jobloop.create_kind('limits_script', 'jltest.script_request(jsonb)', 'jltest.script_step(jsonb,jsonb)');
\o

-- The most requests in flight at once among those whose URL has tag.
CREATE OR REPLACE FUNCTION pg_temp.max_overlap(tag text) RETURNS bigint LANGUAGE sql AS $$
    WITH r AS (SELECT at - request_time AS s, at AS e FROM jltest.requests_tagged(tag))
    SELECT max((SELECT count(*) FROM r r2 WHERE r2.s <= r1.s AND r2.e > r1.s + 0.003)) FROM r r1
$$;

SELECT jltest.tag() AS ctag, jltest.tag() AS rtag, jltest.tag() AS ttag, jltest.tag() AS ftag \gset

-- Concurrency: at most 2 requests at once to the endpoint.
SELECT lives_ok(format($$SELECT jobloop.set_limit(%L, max_concurrency => 2)$$, :'ctag'), 'set_limit(max_concurrency => 2)');
CREATE TEMP TABLE limits_conc AS
SELECT jltest.submit_script('limits_script', jsonb_build_array(jsonb_build_object(
           'url', format('/delay?s=0.3&n=%s&tag=%s', g, :'ctag'), 'rate_key', :'ctag'))) AS id
  FROM generate_series(1, 6) g;
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '60 s') = 'completed'), 6::bigint,
          '6 jobs on an endpoint limited to 2 concurrent requests complete')
  FROM limits_conc;
SELECT is((SELECT count(*) FROM jltest.requests_tagged(:'ctag')), 6::bigint, 'with 6 requests');
SELECT cmp_ok(pg_temp.max_overlap(:'ctag'), '<=', 2::bigint, 'never more than 2 in flight at once');

-- Rate: 5 requests a second.  7 requests need at least (7 - 1) / 5 = 1.2 s,
-- less the bucket's depth (0.05 s of rate).
SELECT lives_ok(format($$SELECT jobloop.set_limit(%L, max_rate => 5)$$, :'rtag'), 'set_limit(max_rate => 5)');
CREATE TEMP TABLE limits_rate AS
SELECT jltest.submit_script('limits_script', jsonb_build_array(jsonb_build_object(
           'url', format('/json?n=%s&tag=%s', g, :'rtag'), 'rate_key', :'rtag'))) AS id
  FROM generate_series(1, 7) g;
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '60 s') = 'completed'), 7::bigint,
          '7 jobs on an endpoint limited to 5 requests/s complete')
  FROM limits_rate;
SELECT cmp_ok((SELECT max(at) - min(at) FROM jltest.requests_tagged(:'rtag')), '>=', 1.2 - 0.05 - 0.003,
              'their requests were spread over at least 1.15 s');

-- Tenant cap: one job of the tenant at a time; another tenant is not held up
-- by it (its job completes while the capped tenant still has work).
SELECT lives_ok(format($$SELECT jobloop.set_tenant_limit(%L, 1)$$, 'limits-' || :'ttag'), 'set_tenant_limit(1)');
CREATE TEMP TABLE limits_tenant AS
SELECT jltest.submit_script('limits_script', jsonb_build_array(jsonb_build_object(
           'url', format('/delay?s=0.3&n=%s&tag=%s', g, :'ttag'))), 'limits-' || :'ttag') AS id
  FROM generate_series(1, 4) g;
SELECT jltest.submit_script('limits_script', jsonb_build_array(jsonb_build_object(
           'url', format('/json?n=1&tag=%s', :'ftag'))), 'limits-other-' || :'ftag') AS other \gset
SELECT is(jobloop.wait(:other, '30 s'), 'completed', 'another tenant''s job completes');
SELECT is(count(*) FILTER (WHERE jobloop.wait(id, '60 s') = 'completed'), 4::bigint,
          '4 jobs of a tenant capped at 1 complete')
  FROM limits_tenant;
SELECT is(pg_temp.max_overlap(:'ttag'), 1::bigint, 'one at a time');
SELECT cmp_ok((SELECT max(at) FROM jltest.requests_tagged(:'ftag')), '<',
              (SELECT max(at) FROM jltest.requests_tagged(:'ttag')),
              'the other tenant did not wait for the capped tenant''s queue');

-- Clean up.
SELECT ok(jobloop.drop_limit(:'ctag') AND jobloop.drop_limit(:'rtag'), 'drop_limit');
SELECT lives_ok(format($$SELECT jobloop.set_tenant_limit(%L, NULL)$$, 'limits-' || :'ttag'), 'set_tenant_limit(NULL)');

SELECT * FROM finish();
