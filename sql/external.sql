--
-- external: the protocol between jobloop-worker and the server, at the SQL
-- level (test/suites/external.sh runs the real program).
--
-- Only members of jobloop_worker attach and turn; a session attaches once,
-- outside a transaction block; a turn takes a binary report and answers
-- with a binary reply (src/engine/wire.h); results of calls the session
-- does not have are dropped; a malformed report is refused before it
-- changes anything.
--
\set SHOW_CONTEXT never

SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_jobloop_worker, regress_jobloop_notworker;
RESET client_min_messages;
CREATE ROLE regress_jobloop_worker IN ROLE jobloop_worker;
CREATE ROLE regress_jobloop_notworker;
GRANT USAGE ON SCHEMA jobloop TO regress_jobloop_notworker;

-- The functions are not for everyone.
SELECT has_function_privilege('regress_jobloop_notworker', 'jobloop.worker_attach(text, integer)', 'EXECUTE') AS outsider_may_attach,
       has_function_privilege('regress_jobloop_notworker', 'jobloop.worker_turn(bytea)', 'EXECUTE') AS outsider_may_turn,
       has_function_privilege('regress_jobloop_worker', 'jobloop.worker_turn(bytea)', 'EXECUTE') AS worker_may_turn;

-- EXECUTE granted by mistake is not enough: the functions check membership.
GRANT EXECUTE ON FUNCTION jobloop.worker_attach(text, integer), jobloop.worker_turn(bytea)
    TO regress_jobloop_notworker;
SET ROLE regress_jobloop_notworker;
SELECT jobloop.worker_attach('regress-host', 4242);
SELECT jobloop.worker_turn('\x4a4c52310000000000');
RESET ROLE;
REVOKE EXECUTE ON FUNCTION jobloop.worker_attach(text, integer), jobloop.worker_turn(bytea)
    FROM regress_jobloop_notworker;

-- The earlier tests' jobs stay where they are: this session's turns claim nothing.
SELECT jobloop.pause() IS NOT NULL AS paused;

SET ROLE regress_jobloop_worker;
-- No turn before attaching.
SELECT jobloop.worker_turn('\x4a4c52310000000000');
-- Bad arguments.
SELECT jobloop.worker_attach('', 4242);
SELECT jobloop.worker_attach(repeat('h', 64), 4242);
SELECT jobloop.worker_attach(NULL, 4242);
-- Not inside a transaction block.
BEGIN;
SELECT jobloop.worker_attach('regress-host', 4242);
ROLLBACK;

SELECT jobloop.worker_attach('regress-host', 4242) > 0 AS attached;
SELECT jobloop.worker_attach('regress-host', 4242);

-- worker_stats() shows where it runs; pid is this session's backend.
SELECT host, remote_pid, pid = pg_backend_pid() AS backend_is_ours
  FROM jobloop.worker_stats() WHERE host IS NOT NULL;

-- An empty report: a reply with this worker's number and the engine's settings.
SELECT substr(r, 1, 4) = '\x4a4c4131'::bytea AS reply,
       get_byte(r, 12) = 1 AS first_reply_has_settings
  FROM (SELECT jobloop.worker_turn('\x4a4c52310000000000') AS r) t;
-- ... and the settings only when they changed.
SELECT get_byte(r, 12) = 0 AS settings_unchanged
  FROM (SELECT jobloop.worker_turn('\x4a4c52310000000000') AS r) t;

-- The result of a call this session never started (a worker that lost its
-- jobs, or made it up) is dropped: the turn goes on.
SELECT substr(jobloop.worker_turn(
    '\x4a4c52310000000001'::bytea || '\x00000000000003e700000000'::bytea
    || '\x00000000c80000000000000005'::bytea || '\xffffffffffffffff000000026f6b'::bytea), 1, 4) = '\x4a4c4131'::bytea AS reply;

-- A turn inside a transaction block is refused, and costs the session nothing.
BEGIN;
SELECT jobloop.worker_turn('\x4a4c52310000000000');
ROLLBACK;
-- ... and so is a turn inside an exception block (a failed turn's memory
-- would outlive its rollback).
DO $$ BEGIN PERFORM jobloop.worker_turn('\x4a4c52310000000000'); EXCEPTION WHEN division_by_zero THEN NULL; END $$;
-- Malformed reports: refused before anything changed.
SELECT jobloop.worker_turn('\x4a4c52');
SELECT jobloop.worker_turn('\x4a4c52320000000000');
SELECT jobloop.worker_turn('\x4a4c5231000000000a');
-- (a body longer than the report)
SELECT jobloop.worker_turn('\x4a4c52310000000001'::bytea || '\x00000000000003e700000000'::bytea
                           || '\x00000000c80000000000000005'::bytea || '\xffffffffffffffff7fffffff'::bytea);
SELECT jobloop.worker_turn('\x4a4c52310000000000ff');
SELECT jobloop.worker_turn(NULL);
-- The session is still a worker.
SELECT substr(jobloop.worker_turn('\x4a4c52310000000000'), 1, 4) = '\x4a4c4131'::bytea AS reply;
RESET ROLE;

-- Retention's actions, one per call (for databases only external workers serve).
SET ROLE regress_jobloop_worker;
SELECT jobloop.worker_maintain() IS NOT NULL AS maintained;
RESET ROLE;

-- Stopping: the worker gives its jobs back and its slot, and serves no more turns.
SET ROLE regress_jobloop_worker;
SELECT jobloop.worker_detach() >= 0 AS detached;
SELECT jobloop.worker_detach();
RESET ROLE;
SELECT count(*) AS external_workers FROM jobloop.worker_stats() WHERE host IS NOT NULL;

-- A session with temporary objects is no worker: they come first in name
-- lookup, under the business logic of the jobs' owners.
\c
SET ROLE regress_jobloop_worker;
CREATE TEMP TABLE orders (id int);
SELECT jobloop.worker_attach('regress-host', 4242);
RESET ROLE;
DROP TABLE orders;
SELECT jobloop.resume() IS NOT NULL AS resumed;
REVOKE USAGE ON SCHEMA jobloop FROM regress_jobloop_notworker;
DROP ROLE regress_jobloop_worker, regress_jobloop_notworker;
