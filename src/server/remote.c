/*-------------------------------------------------------------------------
 *
 * remote.c
 *		External workers: the turns of jobloop-worker, run in the backend
 *		of its connection, its calls carried over that connection.
 *
 * jobloop-worker (src/worker) is only the HTTP engine.  It attaches once
 * (jobloop.worker_attach), which makes this backend a worker with a slot
 * of its own in shared memory, and then calls jobloop.worker_turn(report)
 * once per turn.  The backend holds the worker's jobs in memory exactly as
 * a background worker does (held.c) and runs the same turn (turn.c) and
 * batch (batch.c): business logic as each job's owner, fenced writes,
 * claims, limits granted from shared memory, cancels.  Only the transport
 * differs: a call "starts" by being written into the turn's reply, and
 * "finishes" when a later report brings its result.
 *
 * A turn runs inside the transaction of its SELECT: jobloop-worker gets
 * the reply, and starts the calls in it, only once that transaction has
 * committed -- the step results before them are durable, as in a
 * background worker's batch.  If the transaction aborts instead, the jobs
 * in this backend's memory no longer match the table: the session is of
 * no further use, and its next call ends it (FATAL).  Whenever the session
 * ends -- that, a broken connection, jobloop-worker's exit -- the slot is
 * freed, and with no live worker behind them the jobs marked with its
 * number are freed by the next reaper of any worker (store_reap_expired);
 * a stale write from a worker that lost its jobs fails the fence
 * (store_update_jobs), as for a background worker.
 *
 * Security: only members of jobloop_worker may attach and turn.  A turn
 * runs as the bootstrap superuser, as background workers do, and the
 * business logic as each job's owner (logic.c), never as the worker's
 * login role; the logic's search_path is the database's, not one the
 * worker's role could set.  The reply carries the server's
 * jobloop.allowed_hosts, which jobloop-worker applies to every address it
 * connects to: it cannot widen it.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/snapmgr.h"
#include "utils/timeout.h"

#include "wire.h"

PG_FUNCTION_INFO_V1(jobloop_worker_attach);
PG_FUNCTION_INFO_V1(jobloop_worker_turn);
PG_FUNCTION_INFO_V1(jobloop_worker_detach);
PG_FUNCTION_INFO_V1(jobloop_worker_maintain);

#define WORKER_ROLE				"jobloop_worker"
#define MAX_HEADER_BYTES		(256 * 1024)	/* as the engine's limit (http.c) */
#define SLOT_POLL_MS			50	/* see turn_reply_wait */
#define MAX_REPLY_BYTES			(64 * 1024 * 1024)	/* see remote_start */
#define MAX_ERROR_BYTES			1000	/* a reported error text, kept (apply_results) */

typedef enum CallState
{
	CALL_RUNNING,				/* sent to jobloop-worker; no result yet */
	CALL_FINISHED,				/* its result came: on finished_calls */
	CALL_TAKEN					/* the held job has the result, until done */
} CallState;

/* A call carried by jobloop-worker. */
typedef struct RemoteCall
{
	int64		id;				/* hash key: the transfer id on the wire */
	void	   *owner;			/* the held job */
	CallState	state;
	HttpResult	result;			/* strings in remote_cxt */
	dlist_node	finished_node;
} RemoteCall;

static int	my_worker = 0;		/* 0: this session is not a worker */
static bool turn_in_transaction = false;	/* a turn ran in the open transaction */
static bool attach_in_transaction = false;	/* so did our attach (its release of jobs) */
static bool lost = false;		/* a turn's transaction aborted: see above */
static MemoryContext remote_cxt = NULL;
static HTAB *calls = NULL;
static dlist_head finished_calls = DLIST_STATIC_INIT(finished_calls);
static int64 next_call_id = 1;
static int	calls_in_flight = 0;
static StringInfo actions = NULL;	/* the running turn's actions; NULL between turns */
static uint32 nactions = 0;
static char *settings_sent = NULL;	/* the settings the last reply carried */

/* ---- the transport ---- */

static Transfer *
remote_start(const HttpRequest *req, const char *idempotency_key, int default_timeout_ms,
			 bool fresh_connection, void *owner)
{
	int64		id;
	RemoteCall *call;
	bool		found;

	/*
	 * Not in a turn (cannot happen), or the reply is full: held.c tries
	 * again a second later.  A reply of thousands of 1 MB bodies would
	 * otherwise grow towards PostgreSQL's 1 GB limit (and several copies of
	 * it on the way out), fail the turn, and fail it again after the jobs
	 * were claimed anew.
	 */
	if (actions == NULL || actions->len > MAX_REPLY_BYTES)
		return NULL;
	id = next_call_id++;
	call = hash_search(calls, &id, HASH_ENTER, &found);
	call->owner = owner;
	call->state = CALL_RUNNING;
	memset(&call->result, 0, sizeof(call->result));
	calls_in_flight++;
	wire_put_send(actions, id, req, idempotency_key,
				  req->timeout_ms > 0 ? req->timeout_ms : default_timeout_ms, fresh_connection);
	nactions++;
	return (Transfer *) call;
}

static void
free_result(HttpResult *res)
{
	if (res->error)
		pfree(res->error);
	if (res->headers)
		pfree(res->headers);
	if (res->body)
		pfree(res->body);
	memset(res, 0, sizeof(*res));
}

static void
forget_call(RemoteCall *call)
{
	int64		id = call->id;

	if (call->state == CALL_FINISHED)
		dlist_delete(&call->finished_node);
	else if (call->state == CALL_RUNNING)
		calls_in_flight--;
	free_result(&call->result);
	(void) hash_search(calls, &id, HASH_REMOVE, NULL);
}

/* A job dropped while its call runs (a cancel): jobloop-worker aborts it. */
static void
remote_abort(Transfer *xfer)
{
	RemoteCall *call = (RemoteCall *) xfer;

	if (actions != NULL && call->state == CALL_RUNNING)
	{
		wire_put_abort(actions, call->id);
		nactions++;
	}
	forget_call(call);
}

static Transfer *
remote_next_finished(void **owner, HttpResult *result)
{
	RemoteCall *call;

	if (dlist_is_empty(&finished_calls))
		return NULL;
	call = dlist_container(RemoteCall, finished_node, dlist_pop_head_node(&finished_calls));
	call->state = CALL_TAKEN;	/* off the list; its result stays until done */
	*owner = call->owner;
	*result = call->result;
	return (Transfer *) call;
}

/* The job is done with the result (the strings held.c copied point into ours). */
static void
remote_done(Transfer *xfer)
{
	forget_call((RemoteCall *) xfer);
}

static int
remote_in_flight(void)
{
	return calls_in_flight;
}

const Transport remote_transport = {
	remote_start, remote_abort, remote_next_finished, remote_done, remote_in_flight
};

/* ---- the session ---- */

/* Only members of jobloop_worker drive turns; checked at every call (a REVOKE applies at once). */
static void
require_worker_role(void)
{
	Oid			role = get_role_oid(WORKER_ROLE, true);

	if (!OidIsValid(role) || !has_privs_of_role(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to serve jobloop jobs"),
				 errdetail("Only roles with the privileges of role \"%s\" may run external workers.",
						   WORKER_ROLE),
				 errhint("GRANT %s TO the role jobloop-worker connects as.", WORKER_ROLE)));
}

static void
remote_xact_callback(XactEvent event, void *arg)
{
	if (!turn_in_transaction && !attach_in_transaction)
		return;
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
	{
		lost = true;
		actions = NULL;			/* it was in the aborted call's memory */
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		turn_in_transaction = attach_in_transaction = false;
}

/*
 * The search_path the business logic gets: the database's own setting, or
 * the server's (postgresql.conf, else the built-in default) -- what a
 * background worker of this database starts with, and nothing the worker's
 * login role could set for itself (ALTER ROLE ... SET, SET).
 */
static char *
database_search_path(void)
{
	char	   *path = NULL;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT s FROM ("
					"  SELECT pg_catalog.substr(c, 13) AS s, 1 AS o"
					"    FROM pg_catalog.pg_db_role_setting r, pg_catalog.unnest(r.setconfig) c"
					"   WHERE r.setdatabase = (SELECT oid FROM pg_catalog.pg_database"
					"                           WHERE datname = pg_catalog.current_database())"
					"     AND r.setrole = 0 AND c LIKE 'search_path=%'"
					"  UNION ALL"
					"  SELECT setting, 2 FROM pg_catalog.pg_file_settings"
					"   WHERE name = 'search_path' AND applied"
					"  UNION ALL"
					"  SELECT boot_val, 3 FROM pg_catalog.pg_settings WHERE name = 'search_path'"
					") p ORDER BY o LIMIT 1", true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *value = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (value != NULL)
			path = MemoryContextStrdup(TopMemoryContext, value);
	}
	SPI_finish();
	return path ? path : MemoryContextStrdup(TopMemoryContext, "\"$user\", public");
}

/*
 * Where a worker's session may attach, turn or detach: at the top level of
 * its own transaction, one turn per transaction (an EXCEPTION block would
 * let a failed turn's memory survive its rollback); READ COMMITTED and
 * read-write, as a background worker's batch; and without temporary
 * objects, which come first in name lookup and would let the worker's role
 * slip its own code under a job owner's business logic.
 */
static void
require_worker_session(const char *what)
{
	Oid			temp_namespace;
	Oid			temp_toast_namespace;

	if (IsTransactionBlock())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("%s cannot run inside a transaction block", what),
				 errdetail("The calls a turn starts must leave only after its transaction commits.")));
	if (GetCurrentTransactionNestLevel() != 1 || turn_in_transaction)
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("%s must run alone in its own transaction", what),
				 errdetail("Not inside a subtransaction or an exception block, and one turn per transaction.")));
	if (XactReadOnly || IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("%s needs a read-write READ COMMITTED transaction", what)));
	GetTempNamespaceState(&temp_namespace, &temp_toast_namespace);
	if (OidIsValid(temp_namespace))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("a session that has made temporary objects cannot serve jobloop jobs"),
				 errdetail("Business logic runs in this session as the jobs' owners, and temporary objects come first in name lookup."),
				 errhint("Connect jobloop-worker with a session of its own.")));
}

/* Run as the bootstrap superuser, as background workers do; the caller restores. */
typedef struct TurnContext
{
	Oid			saved_userid;
	int			saved_sec_context;
	int			nestlevel;
} TurnContext;

static void
enter_worker_context(TurnContext *cxt)
{
	/*
	 * The session's own settings must not weaken the batch: step results
	 * durable before the reply (until the commit, hence LOCAL and outside
	 * our nesting level), and no timeout of the session's cancelling a job's
	 * call as if it were the job's fault.
	 */
	if (synchronous_commit < SYNCHRONOUS_COMMIT_ON)
		(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
	disable_timeout(STATEMENT_TIMEOUT, false);
	GetUserIdAndSecContext(&cxt->saved_userid, &cxt->saved_sec_context);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID,
						   cxt->saved_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	/* our own statements must not resolve names through the session's path; no JIT */
	cxt->nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("jit", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("statement_timeout", "0", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("lock_timeout", "0", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

static void
leave_worker_context(TurnContext *cxt)
{
	AtEOXact_GUC(true, cxt->nestlevel);
	SetUserIdAndSecContext(cxt->saved_userid, cxt->saved_sec_context);
}

/*
 * Free the jobs our slot's predecessor held (its session ended, so they
 * have no worker), and fail the job whose function made it exit by
 * ignoring jobloop.function_timeout -- as a background worker does at start.
 */
static void
release_predecessors_jobs(const char *database)
{
	int			siblings[JOBLOOP_MAX_WORKERS];
	int			n = shared_database_workers(database, siblings, JOBLOOP_MAX_WORKERS);
	int64		overrun_job;
	int32		overrun_step;
	char	   *reason;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	reason = logic_take_overrun(&overrun_job, &overrun_step);
	if (reason)
		store_fail_job(overrun_job, overrun_step, reason);
	store_release_all(siblings, n);
	SPI_finish();
}

/*
 * jobloop.worker_attach(host text, pid integer) RETURNS integer: make this
 * session an external worker of its database; host and pid say where
 * jobloop-worker runs (shown by jobloop.worker_stats()).  Returns the
 * worker's number.
 */
Datum
jobloop_worker_attach(PG_FUNCTION_ARGS)
{
	text	   *host_text;
	char	   *host;
	char	   *database;
	int			worker;
	TurnContext cxt;
	HASHCTL		ctl;

	require_worker_role();
	require_arg(fcinfo, 0, "host");
	require_arg(fcinfo, 1, "pid");
	host_text = PG_GETARG_TEXT_PP(0);
	host = text_to_cstring(host_text);
	if (my_worker != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this session is already jobloop worker %d", my_worker)));
	if (!shared_available())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("jobloop is not loaded by shared_preload_libraries"),
				 errhint("Add jobloop to shared_preload_libraries and restart the server.")));
	if (strlen(host) == 0 || strlen(host) >= sizeof(((WorkerSlot *) NULL)->host))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("host must have 1 to %d characters",
						(int) sizeof(((WorkerSlot *) NULL)->host) - 1)));
	require_worker_session("jobloop.worker_attach()");
	require_primary("attach a worker");

	database = get_database_name(MyDatabaseId);
	worker = shared_attach_external(database, host, PG_GETARG_INT32(1));
	if (worker < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("all %d slots for external workers are taken",
						jobloop_max_external_workers),
				 errhint("Raise jobloop.max_external_workers (it takes a restart).")));

	/*
	 * The slot is ours until the session ends: if anything below fails, the
	 * session is of no use as a worker (its next turn ends it).
	 */
	my_worker = worker;
	my_worker_number = worker;
	PG_TRY();
	{
		/* what the workers' init functions allocate lives as long as the session */
		MemoryContext call_cxt = MemoryContextSwitchTo(TopMemoryContext);

		remote_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop remote calls",
										   ALLOCSET_DEFAULT_SIZES);
		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(RemoteCall);
		ctl.hcxt = remote_cxt;
		calls = hash_create("jobloop remote calls", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		held_init(worker);
		limits_init_worker();
		pause_init_worker();
		turn_init(worker);
		store_prepare(worker);
		MemoryContextSwitchTo(call_cxt);

		enter_worker_context(&cxt);
		logic_use_search_path(database_search_path());
		release_predecessors_jobs(database);
		leave_worker_context(&cxt);
	}
	PG_CATCH();
	{
		lost = true;
		PG_RE_THROW();
	}
	PG_END_TRY();
	transport = &remote_transport;
	batch_in_caller_transaction = true;
	batch_claim_wanted = true;
	/* if the attach's transaction aborts, its release of our predecessor's jobs goes too */
	RegisterXactCallback(remote_xact_callback, NULL);
	attach_in_transaction = true;
	ereport(LOG,
			(errmsg("jobloop worker %d attached: jobloop-worker on \"%s\" (pid %d) serves database \"%s\"",
					worker, host, PG_GETARG_INT32(1), database)));
	PG_RETURN_INT32(worker);
}

/* The engine's settings as the server has them, when they differ from the last reply's. */
static bool
settings_changed(WireSettings *settings)
{
	char	   *now;

	settings->allowed_hosts = jobloop_allowed_hosts ? jobloop_allowed_hosts : "";
	settings->max_response_size = jobloop_max_response_size;
	settings->max_redirects = jobloop_max_redirects;
	settings->idle_connection_timeout = jobloop_idle_connection_timeout;
	settings->http2_prior_knowledge = jobloop_http2_prior_knowledge ? jobloop_http2_prior_knowledge : "";
	now = psprintf("%s\n%d\n%d\n%d\n%s", settings->allowed_hosts, settings->max_response_size,
				   settings->max_redirects, settings->idle_connection_timeout,
				   settings->http2_prior_knowledge);
	if (settings_sent != NULL && strcmp(now, settings_sent) == 0)
		return false;
	if (settings_sent)
		pfree(settings_sent);
	settings_sent = MemoryContextStrdup(TopMemoryContext, now);
	return true;
}

/* A report's results, decoded before anything is changed. */
typedef struct Reported
{
	int64		transfer;
	HttpResult	result;
} Reported;

static Reported *
decode_report(bytea *report, uint8 *flags, uint32 *n)
{
	WireReader	r;
	Reported   *results;

	/* in the call's memory: what is kept is copied (apply_results) */
	wire_reader_init(&r, VARDATA_ANY(report), VARSIZE_ANY_EXHDR(report));
	if (!wire_get_report_header(&r, flags, n))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("malformed jobloop-worker report"),
				 errdetail("The report does not begin with a valid header.")));
	results = palloc(Max(*n, 1) * sizeof(Reported));
	for (uint32 i = 0; i < *n; i++)
		if (!wire_get_result(&r, &results[i].transfer, &results[i].result))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("malformed jobloop-worker report"),
					 errdetail("Result %u of %u cannot be read.", i + 1, *n)));
	if (!wire_at_end(&r))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("malformed jobloop-worker report"),
				 errdetail("There are bytes after the last result.")));
	return results;
}

static char *
copy_bytes(const char *p, size_t len)
{
	char	   *copy;

	if (p == NULL)
		return NULL;
	copy = MemoryContextAlloc(remote_cxt, len + 1);
	memcpy(copy, p, len);
	copy[len] = '\0';
	return copy;
}

/*
 * Hand the results to their calls.  A result for a call we do not know --
 * aborted meanwhile, or made up -- is dropped; so is a second one.  The
 * engine enforces jobloop.max_response_size, but we do not trust it to.
 */
static void
apply_results(Reported *results, uint32 n)
{
	for (uint32 i = 0; i < n; i++)
	{
		HttpResult *res = &results[i].result;
		RemoteCall *call = hash_search(calls, &results[i].transfer, HASH_FIND, NULL);

		if (call == NULL || call->state != CALL_RUNNING)
			continue;
		if (res->body_len > (size_t) jobloop_max_response_size || res->headers_len > MAX_HEADER_BYTES)
		{
			res->body = NULL;
			res->body_len = 0;
			res->headers = NULL;
			res->headers_len = 0;
			res->too_large = true;
		}
		/* it becomes last_error and a NOTIFY payload: printable ASCII of a bounded length */
		if (res->error)
		{
			size_t		len = Min(strlen(res->error), (size_t) MAX_ERROR_BYTES);

			for (size_t k = 0; k < len; k++)
				if ((unsigned char) res->error[k] < 0x20 || (unsigned char) res->error[k] > 0x7e)
					res->error[k] = '?';
			res->error[len] = '\0';	/* in the decoded report's memory */
		}
		if ((res->curl_code != 0 || res->refused) && res->error == NULL)
			res->error = "jobloop-worker reported a failed call without a reason";
		/* it feeds the endpoint's latency estimate (held.c) */
		res->elapsed_ms = Max(0, Min(res->elapsed_ms, (int64) 24 * 3600 * 1000));
		call->result = *res;
		call->result.error = res->error ? copy_bytes(res->error, strlen(res->error)) : NULL;
		call->result.headers = copy_bytes(res->headers, res->headers_len);
		call->result.body = copy_bytes(res->body, res->body_len);
		call->state = CALL_FINISHED;
		calls_in_flight--;
		dlist_push_tail(&finished_calls, &call->finished_node);
	}
}

/*
 * When jobloop-worker must come back even with nothing to report.  A job
 * waiting for a concurrency slot that another worker frees would be woken
 * by our latch in a background worker; jobloop-worker cannot see that, so
 * it looks again soon.
 */
static int32
turn_reply_wait(void)
{
	long		ms = turn_wait_ms(GetCurrentTimestamp());

	if (!dlist_is_empty(&finished_calls))
		return 0;				/* more results than one batch takes: at once */
	if (held_next_blocked() != 0)
		ms = Min(ms, SLOT_POLL_MS);
	return (int32) ms;
}

/*
 * jobloop.worker_turn(report bytea) RETURNS bytea: one turn of this
 * session's worker (src/engine/wire.h has both formats).
 */
Datum
jobloop_worker_turn(PG_FUNCTION_ARGS)
{
	bytea	   *report;
	Reported   *results;
	uint8		flags;
	uint32		nresults;
	TurnContext cxt;
	WireSettings settings;
	bool		has_settings;
	StringInfoData reply;
	StringInfoData turn_actions;
	bool		batched;
	bytea	   *out;

	require_worker_role();
	if (lost)
		ereport(FATAL,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("jobloop worker %d lost its jobs in a turn that failed", my_worker),
				 errdetail("Its jobs are freed when this session ends; jobloop-worker reconnects.")));
	if (my_worker == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this session is not a jobloop worker"),
				 errhint("Call jobloop.worker_attach() first.")));
	require_worker_session("jobloop.worker_turn()");
	if (turn_leases_may_have_lapsed(GetCurrentTimestamp()))
	{
		/*
		 * No turn for longer than jobloop.lease_timeout (a network cut, a
		 * stopped process): other workers may have taken our jobs, and their
		 * business logic must not run here too.
		 */
		lost = true;
		ereport(FATAL,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("jobloop worker %d lost its jobs: no turn for longer than jobloop.lease_timeout (%d s)",
						my_worker, jobloop_lease_timeout),
				 errdetail("Other workers may have taken them; jobloop-worker reconnects.")));
	}
	require_arg(fcinfo, 0, "report");
	report = PG_GETARG_BYTEA_PP(0);
	results = decode_report(report, &flags, &nresults);

	/* from here on, an abort leaves our memory out of step with the table */
	turn_in_transaction = true;
	apply_results(results, nresults);
	if (flags & REPORT_WOKEN)
		batch_claim_wanted = true;

	initStringInfo(&turn_actions);
	actions = &turn_actions;
	nactions = 0;
	enter_worker_context(&cxt);
	if (!turn_run(&batched))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension jobloop is not installed in database \"%s\"",
						get_database_name(MyDatabaseId))));
	leave_worker_context(&cxt);
	actions = NULL;

	has_settings = settings_changed(&settings);
	initStringInfo(&reply);
	(void) wire_put_reply_header(&reply, my_worker, turn_reply_wait(),
								 has_settings ? &settings : NULL, nactions);
	appendBinaryStringInfo(&reply, turn_actions.data, turn_actions.len);

	out = palloc(VARHDRSZ + reply.len);
	SET_VARSIZE(out, VARHDRSZ + reply.len);
	memcpy(VARDATA(out), reply.data, reply.len);
	PG_RETURN_BYTEA_P(out);
}

/*
 * jobloop.worker_detach() RETURNS integer: jobloop-worker is stopping (it
 * has aborted its calls): give back every job this worker holds, now, and
 * end the session's service.  Returns how many jobs went back.  (Without
 * it, they are freed anyway once the session has ended, by the next reaper
 * of any worker of the database.)
 */
Datum
jobloop_worker_detach(PG_FUNCTION_ARGS)
{
	HeldJob   **jobs;
	int64	   *ids;
	int			n;
	TurnContext cxt;

	require_worker_role();
	if (my_worker == 0 || lost)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this session is not a jobloop worker")));
	require_worker_session("jobloop.worker_detach()");
	n = held_count();
	jobs = palloc(Max(n, 1) * sizeof(HeldJob *));
	ids = palloc(Max(n, 1) * sizeof(int64));
	n = held_all(jobs, n);
	for (int i = 0; i < n; i++)
		ids[i] = jobs[i]->id;

	/* whatever happens next, this session serves no more turns */
	lost = true;
	enter_worker_context(&cxt);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	store_release(ids, n);
	SPI_finish();
	leave_worker_context(&cxt);
	for (int i = 0; i < n; i++)
		held_drop(jobs[i]);		/* gives their limits' slots back */
	shared_detach_worker(my_worker);
	ereport(LOG,
			(errmsg("jobloop worker %d detached; %d jobs went back to the table", my_worker, n)));
	PG_RETURN_INT32(n);
}

/*
 * jobloop.worker_maintain() RETURNS boolean: one action of retention
 * (retention.c), for databases that external workers alone serve.  True:
 * call again (in a transaction of its own) for the next action.
 */
Datum
jobloop_worker_maintain(PG_FUNCTION_ARGS)
{
	TurnContext cxt;
	bool		more;

	require_worker_role();
	if (my_worker == 0 || lost)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this session is not a jobloop worker")));
	require_worker_session("jobloop.worker_maintain()");
	enter_worker_context(&cxt);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	more = retention_step_in_caller();
	SPI_finish();
	leave_worker_context(&cxt);
	PG_RETURN_BOOL(more);
}
