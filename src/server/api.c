/*-------------------------------------------------------------------------
 *
 * api.c
 *		The SQL API that writes: create_kind, drop_kind, submit, cancel.
 *
 * These functions run as the caller (they are not SECURITY DEFINER), record
 * the caller as the owner of what they create, and then write the tables as
 * the extension's owner with a pinned search_path.  App roles therefore have
 * no write privilege on the tables at all, and no path lets one role create
 * a job that runs as another.
 *
 * Workers are woken when the transaction commits, not before: a job they
 * could not yet see would only cost them a wasted claim.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

PG_FUNCTION_INFO_V1(jobloop_create_kind);
PG_FUNCTION_INFO_V1(jobloop_drop_kind);
PG_FUNCTION_INFO_V1(jobloop_submit);
PG_FUNCTION_INFO_V1(jobloop_cancel);
PG_FUNCTION_INFO_V1(jobloop_check_served);
PG_FUNCTION_INFO_V1(jobloop_retry);
PG_FUNCTION_INFO_V1(jobloop_submitted_in_this_transaction);

#define MAX_TENANT_LEN	200
#define MAX_UNIQUE_KEY_LEN	200
#define NOTIFY_ERROR_BYTES	1000	/* of a failure's reason in its NOTIFY */

/* ---- running as the extension owner ---- */

static Oid
job_table_oid(void)
{
	Oid			nsp = get_namespace_oid("jobloop", false);
	Oid			rel = get_relname_relid("job", nsp);

	if (!OidIsValid(rel))
		elog(ERROR, "jobloop.job does not exist");
	return rel;
}

/* Do finished jobs live in jobloop.finished_job (0.5.0)? */
static bool
has_finished_jobs(void)
{
	return OidIsValid(get_relname_relid("finished_job", get_namespace_oid("jobloop", false)));
}

/*
 * Switch to the owner of the extension's tables with a search_path that no
 * caller can influence.  Errors unwind all of it with the transaction.
 */
void
enter_owner_context(OwnerContext *cxt)
{
	HeapTuple	tp = SearchSysCache1(RELOID, ObjectIdGetDatum(job_table_oid()));
	Oid			owner;

	if (!HeapTupleIsValid(tp))
		elog(ERROR, "cache lookup failed for jobloop.job");
	owner = ((Form_pg_class) GETSTRUCT(tp))->relowner;
	ReleaseSysCache(tp);

	GetUserIdAndSecContext(&cxt->saved_userid, &cxt->saved_sec_context);
	SetUserIdAndSecContext(owner, cxt->saved_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	cxt->saved_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

void
leave_owner_context(OwnerContext *cxt)
{
	SPI_finish();
	AtEOXact_GUC(true, cxt->saved_nestlevel);
	SetUserIdAndSecContext(cxt->saved_userid, cxt->saved_sec_context);
}

/*
 * Jobs are changed on the primary: a standby is read-only, and no worker
 * runs there.  Say so, rather than "cannot execute INSERT in a read-only
 * transaction".
 */
void
require_primary(const char *what)
{
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot %s on a standby server", what),
				 errhint("Connect to the primary; jobs run there, and reach the standby by replication.")));
}

bool
is_jobloop_admin(Oid role)
{
	Oid			admin = get_role_oid("jobloop_admin", true);

	return superuser_arg(role) || (OidIsValid(admin) && has_privs_of_role(role, admin));
}

/* "permission denied to <what>", unless the current user is an admin (who may <may>). */
void
require_jobloop_admin(const char *what, const char *may)
{
	if (!is_jobloop_admin(GetUserId()))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s", what),
				 errhint("Only superusers and members of jobloop_admin may %s.", may)));
}

void
require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/* ---- wake-ups at commit ---- */

typedef struct PendingCancel
{
	int			worker;
	int64		job_id;
} PendingCancel;

static bool xact_callback_registered = false;
static bool wake_at_commit = false;
static PendingCancel *pending_cancels = NULL;
static int	npending_cancels = 0;
static int	max_pending_cancels = 0;

static void
jobloop_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			for (int i = 0; i < npending_cancels; i++)
				shared_post_cancel(pending_cancels[i].worker, pending_cancels[i].job_id);
			if (wake_at_commit)
				shared_wake_workers();
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			wake_at_commit = false;
			npending_cancels = 0;
			break;
		default:
			break;
	}
}

void
wake_workers_at_commit(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(jobloop_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}

static void
cancel_at_commit(int worker, int64 job_id)
{
	if (npending_cancels == max_pending_cancels)
	{
		max_pending_cancels = Max(16, max_pending_cancels * 2);
		if (pending_cancels == NULL)
			pending_cancels = MemoryContextAlloc(TopMemoryContext,
												 max_pending_cancels * sizeof(PendingCancel));
		else
			pending_cancels = repalloc(pending_cancels,
									   max_pending_cancels * sizeof(PendingCancel));
	}
	pending_cancels[npending_cancels].worker = worker;
	pending_cancels[npending_cancels].job_id = job_id;
	npending_cancels++;
	wake_workers_at_commit();
}

/* ---- notifications ---- */

void
notify_job(int64 id, const char *status, int32 step, const char *tenant, const char *kind,
		   const char *error)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"id\": " INT64_FORMAT ", \"status\": ", id);
	escape_json(&buf, status);
	appendStringInfo(&buf, ", \"step\": %d, \"tenant\": ", step);
	if (tenant)
		escape_json(&buf, tenant);
	else
		appendStringInfoString(&buf, "null");
	appendStringInfoString(&buf, ", \"kind\": ");
	escape_json(&buf, kind);
	if (error)
	{
		/*
		 * A failure carries its reason, so that a listener needs no round
		 * trip; cut to NOTIFY_ERROR_BYTES (whole characters), which escaping
		 * may at most sextuple.
		 */
		int			len = pg_mbcliplen(error, strlen(error), NOTIFY_ERROR_BYTES);
		char	   *cut = pnstrdup(error, len);

		appendStringInfoString(&buf, ", \"error\": ");
		escape_json(&buf, cut);
		pfree(cut);
	}
	appendStringInfoChar(&buf, '}');
	/* tenant, kind and error are bounded, so this stays below 8000 bytes */
	Async_Notify(JOBLOOP_CHANNEL, buf.data);
	pfree(buf.data);
}

/* ---- create_kind / drop_kind ---- */

int64
interval_ms(Interval *span)
{
	return span->time / 1000 + ((int64) span->day + (int64) span->month * 30) * 86400000;
}

/*
 * A kind's function must exist, have exactly the expected signature, and be
 * executable by the role defining the kind.
 */
static void
check_kind_function(Oid fn, Oid caller, const char *what, int nargs,
					Oid rettype, const char *expected)
{
	HeapTuple	tp = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	Form_pg_proc proc;
	bool		ok;

	if (!HeapTupleIsValid(tp))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("%s function with OID %u does not exist", what, fn)));
	proc = (Form_pg_proc) GETSTRUCT(tp);
	ok = proc->prokind == PROKIND_FUNCTION && !proc->proretset &&
		proc->prorettype == rettype && proc->pronargs == nargs;
	for (int i = 0; ok && i < nargs; i++)
		ok = proc->proargtypes.values[i] == JSONBOID;
	ReleaseSysCache(tp);

	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("%s function %s has the wrong signature", what, format_procedure(fn)),
				 errdetail("A %s function must be declared as %s.", what, expected)));
	if (object_aclcheck(ProcedureRelationId, fn, caller, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(fn))));
}

static char *
kind_name_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *name;

	require_arg(fcinfo, argno, "kind name");
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	if (name[0] == '\0' || strlen(name) > 63)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid job kind name \"%s\"", name),
				 errdetail("A kind name must be 1 to 63 bytes long.")));
	return name;
}

/* Look up a kind's owner, locking its row; InvalidOid if it does not exist. */
static Oid
lock_kind(const char *name)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};
	bool		isnull;

	store_run_plan(&plan, "SELECT owner::oid FROM jobloop.kind WHERE name = $1 FOR UPDATE",
			 1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return InvalidOid;
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

static void
require_kind_owner(const char *name, Oid owner, Oid caller)
{
	if (!has_privs_of_role(caller, owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("must be owner of job kind \"%s\"", name)));
}

Datum
jobloop_create_kind(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			caller = GetUserId();
	char	   *name = kind_name_arg(fcinfo, 0);
	Oid			request_fn,
				step_fn,
				done_fn = InvalidOid;
	int32		max_steps,
				max_attempts;
	Interval   *backoff,
			   *max_backoff;
	char	   *on_error;
	Oid			types[12] = {TEXTOID, OIDOID, OIDOID, OIDOID, OIDOID, INT4OID, INT4OID,
		INTERVALOID, INTERVALOID, INTERVALOID, BOOLOID, TEXTOID};
	Datum		values[12];
	char		nulls[12];
	OwnerContext cxt;
	Oid			existing_owner;

	require_primary("create job kinds");
	for (int i = 1; i < 11; i++)
		if (i != 3 && i != 8)
			require_arg(fcinfo, i, i == 1 ? "request function" : i == 2 ? "step function" :
						i == 4 ? "max_steps" : i == 5 ? "max_attempts" : i == 6 ? "backoff" :
						i == 7 ? "max_backoff" : i == 9 ? "notify_steps" : "on_error");

	request_fn = PG_GETARG_OID(1);
	step_fn = PG_GETARG_OID(2);
	check_kind_function(request_fn, caller, "request", 1, JSONBOID, "request(state jsonb) RETURNS jsonb");
	check_kind_function(step_fn, caller, "step", 2, JSONBOID, "step(state jsonb, response jsonb) RETURNS jsonb");
	if (!PG_ARGISNULL(3))
	{
		done_fn = PG_GETARG_OID(3);
		check_kind_function(done_fn, caller, "done", 1, BOOLOID, "done(state jsonb) RETURNS boolean");
	}

	max_steps = PG_GETARG_INT32(4);
	if (max_steps < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_steps must be at least 1")));
	max_attempts = PG_GETARG_INT32(5);
	if (max_attempts < 1 || max_attempts > 1000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_attempts must be between 1 and 1000")));
	backoff = PG_GETARG_INTERVAL_P(6);
	max_backoff = PG_GETARG_INTERVAL_P(7);
	if (interval_ms(backoff) < 1 || interval_ms(max_backoff) < interval_ms(backoff))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("backoff must be positive and no longer than max_backoff")));
	if (!PG_ARGISNULL(8) &&
		(interval_ms(PG_GETARG_INTERVAL_P(8)) < 1 || interval_ms(PG_GETARG_INTERVAL_P(8)) > INT_MAX))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout must be between 1 millisecond and 24 days")));
	on_error = text_to_cstring(PG_GETARG_TEXT_PP(10));
	if (strcmp(on_error, "fail") != 0 && strcmp(on_error, "step") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid on_error value \"%s\"", on_error),
				 errhint("Use 'fail' to fail the job, or 'step' to pass the error to the step function.")));

	enter_owner_context(&cxt);
	existing_owner = lock_kind(name);
	if (OidIsValid(existing_owner))
		require_kind_owner(name, existing_owner, caller);

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(name);
	values[1] = ObjectIdGetDatum(OidIsValid(existing_owner) ? existing_owner : caller);
	values[2] = ObjectIdGetDatum(request_fn);
	values[3] = ObjectIdGetDatum(step_fn);
	values[4] = ObjectIdGetDatum(done_fn);
	nulls[4] = OidIsValid(done_fn) ? ' ' : 'n';
	values[5] = Int32GetDatum(max_steps);
	values[6] = Int32GetDatum(max_attempts);
	values[7] = IntervalPGetDatum(backoff);
	values[8] = IntervalPGetDatum(max_backoff);
	values[9] = PG_ARGISNULL(8) ? (Datum) 0 : PG_GETARG_DATUM(8);
	nulls[9] = PG_ARGISNULL(8) ? 'n' : ' ';
	values[10] = BoolGetDatum(PG_GETARG_BOOL(9));
	values[11] = CStringGetTextDatum(on_error);
	store_run_plan(&plan,
			 "INSERT INTO jobloop.kind (name, owner, request_fn, step_fn, done_fn, max_steps,"
			 " max_attempts, backoff, max_backoff, timeout, notify_steps, on_error)"
			 " VALUES ($1, $2::regrole, $3::regprocedure, $4::regprocedure, $5::regprocedure,"
			 " $6, $7, $8, $9, $10, $11, $12)"
			 " ON CONFLICT (name) DO UPDATE SET request_fn = EXCLUDED.request_fn,"
			 " step_fn = EXCLUDED.step_fn, done_fn = EXCLUDED.done_fn,"
			 " max_steps = EXCLUDED.max_steps, max_attempts = EXCLUDED.max_attempts,"
			 " backoff = EXCLUDED.backoff, max_backoff = EXCLUDED.max_backoff,"
			 " timeout = EXCLUDED.timeout, notify_steps = EXCLUDED.notify_steps,"
			 " on_error = EXCLUDED.on_error",
			 12, types, values, nulls, SPI_OK_INSERT);
	leave_owner_context(&cxt);

	/* row changes send no invalidation by themselves; workers cache kinds */
	CacheInvalidateRelcacheByRelid(get_relname_relid("kind", get_namespace_oid("jobloop", false)));
	PG_RETURN_VOID();
}

Datum
jobloop_drop_kind(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr count_plan = NULL;
	static SPIPlanPtr delete_plan = NULL;
	static SPIPlanPtr delete_finished_plan = NULL;
	Oid			caller = GetUserId();
	char	   *name = kind_name_arg(fcinfo, 0);
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};
	OwnerContext cxt;
	Oid			owner;
	bool		isnull;
	int64		unfinished;

	require_primary("drop job kinds");
	enter_owner_context(&cxt);
	owner = lock_kind(name);
	if (!OidIsValid(owner))
	{
		leave_owner_context(&cxt);
		PG_RETURN_BOOL(false);
	}
	require_kind_owner(name, owner, caller);
	store_run_plan(&count_plan,
			 "SELECT count(*) FROM jobloop.job WHERE kind = $1 AND status IN ('pending', 'running')",
			 1, types, values, NULL, SPI_OK_SELECT);
	unfinished = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (unfinished > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg_plural("job kind \"%s\" has " INT64_FORMAT " unfinished job",
							   "job kind \"%s\" has " INT64_FORMAT " unfinished jobs",
							   unfinished, name, unfinished),
				 errhint("Wait for them to finish or cancel them first.")));
	if (has_finished_jobs())
		store_run_plan(&delete_finished_plan,
				 "WITH j AS (DELETE FROM jobloop.job WHERE kind = $1),"
				 " f AS (DELETE FROM jobloop.finished_job WHERE kind = $1)"
				 " DELETE FROM jobloop.kind WHERE name = $1",
				 1, types, values, NULL, SPI_OK_DELETE);
	else
		store_run_plan(&delete_plan,
				 "WITH j AS (DELETE FROM jobloop.job WHERE kind = $1)"
				 " DELETE FROM jobloop.kind WHERE name = $1",
				 1, types, values, NULL, SPI_OK_DELETE);
	leave_owner_context(&cxt);
	CacheInvalidateRelcacheByRelid(get_relname_relid("kind", get_namespace_oid("jobloop", false)));
	PG_RETURN_BOOL(true);
}

/* ---- submit / cancel ---- */

/*
 * A job submitted where no worker runs would wait forever; say so once per
 * session instead of failing, so jobs can be queued before workers start.
 */
static void
warn_if_unserved(void)
{
	static bool warned = false;
	const char *why = NULL;
	int			workers[JOBLOOP_MAX_WORKERS];

	if (warned)
		return;
	if (!shared_available())
		why = "jobloop is not in shared_preload_libraries";
	else if (shared_database_workers(get_database_name(MyDatabaseId), workers,
									 JOBLOOP_MAX_WORKERS) > 0)
		why = NULL;				/* background workers, or a jobloop-worker connected now */
	else if (jobloop_workers == 0)
		why = "jobloop.workers is 0 and no jobloop-worker is connected";
	else
		why = psprintf("jobloop.database is \"%s\" and no jobloop-worker is connected",
					   jobloop_database);
	if (why)
	{
		ereport(WARNING,
				(errmsg("no jobloop worker serves database \"%s\"", get_database_name(MyDatabaseId)),
				 errdetail("Jobs submitted here stay pending because %s.", why),
				 errhint("Set jobloop.database and shared_preload_libraries and restart the server, "
						 "or run jobloop-worker against this database.")));
		warned = true;
	}
}

/*
 * Called at CREATE EXTENSION: say so if no worker will run jobs here.  A
 * warning, not an error, so that restoring a dump never fails on it.
 */
Datum
jobloop_check_served(PG_FUNCTION_ARGS)
{
	warn_if_unserved();
	PG_RETURN_VOID();
}

Datum
jobloop_submit(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr kind_plan = NULL;
	static SPIPlanPtr insert_plan = NULL;
	Oid			caller = GetUserId();
	char	   *kind;
	Jsonb	   *state;
	char	   *tenant = NULL;
	OwnerContext cxt;
	Oid			kind_types[1] = {TEXTOID};
	Datum		kind_values[1];
	static SPIPlanPtr existing_plan = NULL;
	Oid			types[6] = {TEXTOID, OIDOID, TEXTOID, JSONBOID, TIMESTAMPTZOID, TEXTOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	char	   *unique_key = NULL;
	bool		isnull;
	int64		id = 0;

	require_primary("submit jobs");
	require_arg(fcinfo, 0, "kind");
	require_arg(fcinfo, 1, "state");
	kind = text_to_cstring(PG_GETARG_TEXT_PP(0));
	state = PG_GETARG_JSONB_P(1);
	if (!JB_ROOT_IS_OBJECT(state) || JB_ROOT_IS_SCALAR(state))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("job state must be a JSON object")));
	logic_check_state_size(state);
	if (!PG_ARGISNULL(2))
	{
		tenant = text_to_cstring(PG_GETARG_TEXT_PP(2));
		if (strlen(tenant) > MAX_TENANT_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
					 errmsg("tenant name is too long"),
					 errdetail("A tenant name is at most %d bytes.", MAX_TENANT_LEN)));
	}
	if (PG_NARGS() > 4 && !PG_ARGISNULL(4))
	{
		unique_key = text_to_cstring(PG_GETARG_TEXT_PP(4));
		if (unique_key[0] == '\0' || strlen(unique_key) > MAX_UNIQUE_KEY_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unique_key must be 1 to %d bytes long", MAX_UNIQUE_KEY_LEN)));
	}

	enter_owner_context(&cxt);

	kind_values[0] = CStringGetTextDatum(kind);
	store_run_plan(&kind_plan,
			 "SELECT request_fn::oid, step_fn::oid, done_fn::oid FROM jobloop.kind WHERE name = $1 FOR KEY SHARE",
			 1, kind_types, kind_values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("job kind \"%s\" does not exist", kind),
				 errhint("Create it with jobloop.create_kind().")));
	/* the job will run these as the caller: refuse now rather than fail later */
	for (int i = 1; i <= 3; i++)
	{
		Oid			fn = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, i, &isnull));

		if (!isnull &&
			object_aclcheck(ProcedureRelationId, fn, caller, ACL_EXECUTE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for function %s", format_procedure(fn)),
					 errdetail("Jobs of kind \"%s\" run their functions as the submitting role.", kind)));
	}

	values[0] = CStringGetTextDatum(kind);
	values[1] = ObjectIdGetDatum(caller);
	values[2] = tenant ? CStringGetTextDatum(tenant) : (Datum) 0;
	nulls[2] = tenant ? ' ' : 'n';
	values[3] = JsonbPGetDatum(state);
	values[4] = PG_ARGISNULL(3) ? (Datum) 0 : PG_GETARG_DATUM(3);
	nulls[4] = PG_ARGISNULL(3) ? 'n' : ' ';
	values[5] = unique_key ? CStringGetTextDatum(unique_key) : (Datum) 0;
	nulls[5] = unique_key ? ' ' : 'n';

	/*
	 * With a unique_key, an unfinished job of this kind and owner with the
	 * same key wins: ON CONFLICT waits for a concurrent submit of that key
	 * to commit or abort, so two submits never both insert.  The job may
	 * finish between our conflict and our look-up (it then no longer
	 * blocks the key): try again.
	 */
	for (int attempt = 0; id == 0; attempt++)
	{
		if (PG_NARGS() < 5)
		{
			/* called through the 0.2.0 definition, before ALTER EXTENSION UPDATE */
			static SPIPlanPtr legacy_plan = NULL;

			store_run_plan(&legacy_plan,
					 "INSERT INTO jobloop.job (kind, owner, tenant, state, run_after)"
					 " VALUES ($1, $2::regrole, $3, $4, coalesce($5, now())) RETURNING id",
					 5, types, values, nulls, SPI_OK_INSERT_RETURNING);
			id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			break;
		}
		if (attempt == 10)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not submit job with unique_key \"%s\": jobs with that key keep finishing",
							unique_key)));
		store_run_plan(&insert_plan,
				 "INSERT INTO jobloop.job (kind, owner, tenant, state, run_after, unique_key)"
				 " VALUES ($1, $2::regrole, $3, $4, coalesce($5, now()), $6)"
				 " ON CONFLICT (kind, owner, unique_key) WHERE unique_key IS NOT NULL"
				 "   AND status = ANY (ARRAY['pending', 'running']) DO NOTHING"
				 " RETURNING id",
				 6, types, values, nulls, SPI_OK_INSERT_RETURNING);
		if (SPI_processed > 0)
		{
			id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			break;
		}
		store_run_plan(&existing_plan,
				 "SELECT id FROM jobloop.job WHERE kind = $1 AND owner = $2::regrole"
				 "   AND unique_key = $6 AND status = ANY (ARRAY['pending', 'running'])",
				 6, types, values, nulls, SPI_OK_SELECT);
		if (SPI_processed > 0)
		{
			/* the existing job: no new row, nothing to announce */
			id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			leave_owner_context(&cxt);
			PG_RETURN_INT64(id);
		}
	}

	leave_owner_context(&cxt);

	notify_job(id, "pending", 0, tenant, kind, NULL);
	wake_workers_at_commit();
	warn_if_unserved();
	PG_RETURN_INT64(id);
}

/*
 * Lock job id with sql (whose first column is the job's owner) for a change
 * by caller: the owner, a role with its privileges, or an admin.  A job the
 * caller may not see does not exist, as far as the caller can tell.  The
 * row is in SPI_tuptable.  A job not in jobloop.job has finished, and is
 * looked for with finished_sql in jobloop.finished_job (0.5.0).  Returns
 * whether the job is in finished_job.
 */
static bool
lock_job_for_caller(SPIPlanPtr *plan, const char *sql, SPIPlanPtr *finished_plan,
					const char *finished_sql, int64 id, Oid caller)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(id)};
	bool		isnull;
	bool		finished = false;

	/*
	 * A job can move while we wait for its row's lock: to finished_job when
	 * it finishes, and back to jobloop.job when another session's retry()
	 * commits first (the finished row we waited for is gone then, too).  Each
	 * statement's snapshot sees where the last move put it, so look again, a
	 * few times: a job that keeps moving is retried and finishing at once.
	 */
	for (int round = 0; round < 3; round++)
	{
		store_run_plan(plan, sql, 1, types, values, NULL, SPI_OK_SELECT);
		finished = false;
		if (SPI_processed > 0 || !has_finished_jobs())
			break;
		store_run_plan(finished_plan, finished_sql, 1, types, values, NULL, SPI_OK_SELECT);
		finished = true;
		if (SPI_processed > 0)
			break;
	}
	if (SPI_processed == 0 ||
		!(has_privs_of_role(caller,
							DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
														   SPI_tuptable->tupdesc, 1, &isnull))) ||
		  is_jobloop_admin(caller)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("job " INT64_FORMAT " does not exist", id)));
	return finished;
}

Datum
jobloop_cancel(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr finished_plan = NULL;
	static SPIPlanPtr cancel_plan = NULL;
	Oid			caller = GetUserId();
	int64		id;
	OwnerContext cxt;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	Oid			owner;
	char	   *status;
	Datum		worker;
	bool		worker_isnull;
	int32		step;
	Datum		tenant;
	bool		tenant_isnull;
	char	   *kind;

	require_primary("cancel jobs");
	require_arg(fcinfo, 0, "job id");
	id = PG_GETARG_INT64(0);
	values[0] = Int64GetDatum(id);

	enter_owner_context(&cxt);
	/* a finished job is not cancelled: only its status is read */
	(void) lock_job_for_caller(&lock_plan,
							   "SELECT owner::oid, status, worker, step, tenant, kind FROM jobloop.job"
							   " WHERE id = $1 FOR NO KEY UPDATE",
							   &finished_plan,
							   "SELECT owner::oid, status, worker, step, tenant, kind"
							   "  FROM jobloop.finished_job WHERE id = $1",
							   id, caller);

	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	owner = DatumGetObjectId(SPI_getbinval(row, desc, 1, &isnull));
	(void) owner;
	status = TextDatumGetCString(SPI_getbinval(row, desc, 2, &isnull));
	if (strcmp(status, "pending") != 0 && strcmp(status, "running") != 0)
	{
		leave_owner_context(&cxt);
		PG_RETURN_BOOL(false);
	}
	worker = SPI_getbinval(row, desc, 3, &worker_isnull);
	step = DatumGetInt32(SPI_getbinval(row, desc, 4, &isnull));
	tenant = SPI_getbinval(row, desc, 5, &tenant_isnull);
	kind = TextDatumGetCString(SPI_getbinval(row, desc, 6, &isnull));
	/* copy out of SPI memory before the next statement frees it */
	{
		MemoryContext old = MemoryContextSwitchTo(CurTransactionContext);
		char	   *tenant_str = tenant_isnull ? NULL : TextDatumGetCString(tenant);

		kind = pstrdup(kind);
		MemoryContextSwitchTo(old);

		store_run_plan(&cancel_plan,
				 "UPDATE jobloop.job SET status = 'cancelled', finished_at = now(), updated_at = now(),"
				 " worker = NULL, lease_expires_at = NULL, request = NULL WHERE id = $1",
				 1, types, values, NULL, SPI_OK_UPDATE);
		leave_owner_context(&cxt);

		notify_job(id, "cancelled", step, tenant_str, kind, NULL);
	}
	if (!worker_isnull)
		cancel_at_commit(DatumGetInt32(worker), id);
	PG_RETURN_BOOL(true);
}

/*
 * Run a failed or cancelled job again, from the state and step it had last
 * committed: a new attempt at that step (attempts and errors reset, the
 * same Idempotency-Key as the step's earlier attempts).  For the job's
 * owner and admins, like cancel().  False if the job is not finished, or
 * completed (nothing to redo).
 */
Datum
jobloop_retry(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr finished_lock_plan = NULL;
	static SPIPlanPtr retry_plan = NULL;
	static SPIPlanPtr move_back_plan = NULL;
	bool		finished;
	Oid			caller = GetUserId();
	int64		id;
	OwnerContext cxt;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	bool		isnull;
	char	   *status;
	char	   *tenant;
	char	   *kind;
	int32		step;
	MemoryContext old;

	require_primary("retry jobs");
	require_arg(fcinfo, 0, "job id");
	id = PG_GETARG_INT64(0);
	values[0] = Int64GetDatum(id);

	enter_owner_context(&cxt);
	finished = lock_job_for_caller(&lock_plan,
								   "SELECT owner::oid, status, step, tenant, kind FROM jobloop.job"
								   " WHERE id = $1 FOR NO KEY UPDATE",
								   &finished_lock_plan,
								   "SELECT owner::oid, status, step, tenant, kind FROM jobloop.finished_job"
								   " WHERE id = $1 FOR UPDATE",
								   id, caller);

	old = MemoryContextSwitchTo(CurTransactionContext);
	status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	step = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	tenant = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
	kind = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 5);
	MemoryContextSwitchTo(old);
	if (strcmp(status, "failed") != 0 && strcmp(status, "cancelled") != 0)
	{
		leave_owner_context(&cxt);
		PG_RETURN_BOOL(false);
	}

	PG_TRY();
	{
		/*
		 * Back to jobloop.job, with its id, key token and step (a finished
		 * job from before 0.5.0 is still there: updated in place).
		 */
		if (finished)
			store_run_plan(&move_back_plan,
					 "WITH moved AS (DELETE FROM jobloop.finished_job WHERE id = $1 RETURNING *)"
					 " INSERT INTO jobloop.job"
					 "   (id, kind, owner, tenant, status, step, state, request, last_error, attempts,"
					 "    run_after, worker, lease_expires_at, created_at, updated_at, started_at,"
					 "    finished_at, key_token, unique_key) OVERRIDING SYSTEM VALUE"
					 " SELECT id, kind, owner, tenant, 'pending', step, state, NULL, NULL, 0,"
					 "    now(), NULL, NULL, created_at, now(), started_at,"
					 "    NULL, key_token, unique_key"
					 "   FROM moved",
					 1, types, values, NULL, SPI_OK_INSERT);
		else
			store_run_plan(&retry_plan,
					 "UPDATE jobloop.job SET status = 'pending', attempts = 0, last_error = NULL,"
					 "   finished_at = NULL, run_after = now(), updated_at = now(),"
					 "   worker = NULL, lease_expires_at = NULL, request = NULL"
					 " WHERE id = $1",
					 1, types, values, NULL, SPI_OK_UPDATE);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(old);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("cannot retry job " INT64_FORMAT ": another job with its unique_key is unfinished", id),
				 errhint("Wait for that job to finish, or cancel it.")));
	}
	PG_END_TRY();
	leave_owner_context(&cxt);

	notify_job(id, "pending", step, tenant, kind, NULL);
	wake_workers_at_commit();
	PG_RETURN_BOOL(true);
}

/* Was the job's row inserted by this transaction?  Then no worker sees it. */
Datum
jobloop_submitted_in_this_transaction(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {PG_GETARG_DATUM(0)};
	OwnerContext cxt;
	bool		isnull;
	bool		mine = false;

	enter_owner_context(&cxt);
	store_run_plan(&plan, "SELECT xmin FROM jobloop.job WHERE id = $1",
				   1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
		mine = TransactionIdIsCurrentTransactionId(
			DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)));
	leave_owner_context(&cxt);
	PG_RETURN_BOOL(mine);
}
