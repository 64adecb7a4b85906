--
-- limits: endpoint and tenant limits (set_limit, drop_limit, set_tenant_limit),
-- and the observability views, in a database no worker serves.
--
-- CONTEXT lines would only show line numbers inside jobloop's own functions.
\set SHOW_CONTEXT never

-- Endpoint limits.
SELECT jobloop.set_limit('api.example.com:443', max_rate => 50, max_concurrency => 10, ramp => '30 s');
SELECT jobloop.set_limit('api.example.com:80', max_concurrency => 2);
SELECT jobloop.set_limit('billing', max_rate => 0.5);
SELECT endpoint, max_rate, max_concurrency, ramp, updated_at IS NOT NULL AS has_updated_at
  FROM jobloop.endpoint_limit ORDER BY endpoint;
-- Setting a limit again replaces it as a whole.
SELECT jobloop.set_limit('api.example.com:443', max_rate => 100);
SELECT endpoint, max_rate, max_concurrency, ramp FROM jobloop.endpoint_limit WHERE endpoint = 'api.example.com:443';
-- The limits view shows the configured limits.
SELECT endpoint, max_rate, max_concurrency, ramp
  FROM jobloop.limits WHERE endpoint IN ('api.example.com:443', 'api.example.com:80', 'billing') ORDER BY endpoint;

-- Invalid limits.
SELECT jobloop.set_limit(NULL, max_rate => 1);
SELECT jobloop.set_limit('', max_rate => 1);
SELECT jobloop.set_limit(repeat('e', 128), max_rate => 1);
SELECT jobloop.set_limit('api.example.com:443');
SELECT jobloop.set_limit('api.example.com:443', max_rate => 0);
SELECT jobloop.set_limit('api.example.com:443', max_rate => -1);
SELECT jobloop.set_limit('api.example.com:443', max_rate => 'NaN');
SELECT jobloop.set_limit('api.example.com:443', max_concurrency => 0);
SELECT jobloop.set_limit('api.example.com:443', max_rate => 1, ramp => '0');
SELECT jobloop.set_limit('api.example.com:443', max_rate => 1, ramp => '-1 s');
SELECT jobloop.set_limit('api.example.com:443', max_concurrency => 1, ramp => '10 s');
-- 127 bytes is the longest endpoint.
SELECT jobloop.set_limit(repeat('e', 127), max_rate => 1);
SELECT length(endpoint) FROM jobloop.endpoint_limit WHERE endpoint LIKE 'eee%';
-- Nothing else changed.
SELECT endpoint, max_rate, max_concurrency, ramp FROM jobloop.endpoint_limit ORDER BY endpoint;

-- drop_limit.
SELECT jobloop.drop_limit('billing');
SELECT jobloop.drop_limit('billing');
SELECT jobloop.drop_limit(repeat('e', 127));
SELECT jobloop.drop_limit(NULL);
SELECT jobloop.drop_limit('');
SELECT endpoint FROM jobloop.endpoint_limit ORDER BY endpoint;

-- Tenant limits: set, change, remove with NULL.
SELECT jobloop.set_tenant_limit('tenant-a', 5);
SELECT jobloop.set_tenant_limit('tenant-b', 1);
SELECT jobloop.set_tenant_limit('tenant-a', 7);
SELECT tenant, max_concurrency, updated_at IS NOT NULL AS has_updated_at FROM jobloop.tenant_limit ORDER BY tenant;
SELECT jobloop.set_tenant_limit('tenant-b', NULL);
SELECT jobloop.set_tenant_limit('no-such-tenant', NULL);
SELECT tenant, max_concurrency FROM jobloop.tenant_limit ORDER BY tenant;
SELECT jobloop.set_tenant_limit('tenant-a', 0);
SELECT jobloop.set_tenant_limit(NULL, 3);
SELECT tenant, max_concurrency FROM jobloop.tenant_limit ORDER BY tenant;

-- Only superusers and members of jobloop_admin change limits; everyone may read them.
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_jobloop_limits_app, regress_jobloop_limits_admin;
RESET client_min_messages;
CREATE ROLE regress_jobloop_limits_app;
CREATE ROLE regress_jobloop_limits_admin IN ROLE jobloop_admin;
GRANT USAGE ON SCHEMA jobloop TO regress_jobloop_limits_app;
SET ROLE regress_jobloop_limits_app;
SELECT jobloop.set_limit('api.example.com:443', max_rate => 1000);
SELECT jobloop.drop_limit('api.example.com:443');
SELECT jobloop.set_tenant_limit('tenant-a', 1000);
SELECT jobloop.set_tenant_limit('tenant-a', NULL);
INSERT INTO jobloop.endpoint_limit (endpoint, max_rate) VALUES ('sneaky', 1000);
UPDATE jobloop.tenant_limit SET max_concurrency = 1000;
DELETE FROM jobloop.endpoint_limit;
SELECT endpoint, max_rate FROM jobloop.endpoint_limit ORDER BY endpoint;
SELECT tenant, max_concurrency FROM jobloop.tenant_limit ORDER BY tenant;
RESET ROLE;
SET ROLE regress_jobloop_limits_admin;
SELECT jobloop.set_limit('api.example.com:443', max_rate => 20, max_concurrency => 4);
SELECT jobloop.set_tenant_limit('tenant-c', 2);
SELECT jobloop.drop_limit('api.example.com:80');
RESET ROLE;
SELECT endpoint, max_rate, max_concurrency, ramp FROM jobloop.endpoint_limit ORDER BY endpoint;
SELECT tenant, max_concurrency FROM jobloop.tenant_limit ORDER BY tenant;

-- Clean up.
SELECT jobloop.drop_limit('api.example.com:443');
SELECT jobloop.set_tenant_limit(tenant, NULL) FROM jobloop.tenant_limit ORDER BY tenant;
SELECT count(*) FROM jobloop.endpoint_limit;
SELECT count(*) FROM jobloop.tenant_limit;
REVOKE USAGE ON SCHEMA jobloop FROM regress_jobloop_limits_app;
DROP ROLE regress_jobloop_limits_app, regress_jobloop_limits_admin;

-- Observability: no worker serves this database.
SELECT workers, held, in_flight, steps FROM jobloop.stats;
SELECT pending >= 0 AS counts_pending, completed, failed FROM jobloop.stats;
SELECT count(*) FROM jobloop.worker_stats() WHERE database = current_database();
SELECT * FROM jobloop.errors;
