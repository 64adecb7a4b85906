/*-------------------------------------------------------------------------
 *
 * logic.c
 *		Run a kind's request, step and done functions for one job.
 *
 * Each call runs as the role that submitted the job, inside a
 * security-restricted operation (no temp objects, cursors or role changes
 * that could outlive the call and leak into another role's job, which
 * shares this worker's session), under jobloop.function_timeout.  The caller
 * wraps one job's calls (done, request, step) in a subtransaction and in
 * logic_begin_job() / logic_end_job(): the switch to the owner and the GUC
 * level whose changes are undone afterwards are made once per job, not per
 * call (each costs a walk over every GUC in PostgreSQL 15).  On error the
 * subtransaction's abort restores the user, the GUCs and the timeout.
 *
 * jobloop.function_timeout is enforced in two stages.  At the limit the
 * call is cancelled like a statement (an error the job fails with).  A
 * function may catch that cancel and go on -- PL/pgSQL's WHEN
 * query_canceled, any PL's try/except -- so if it is still running a grace
 * period later, the worker stops itself with FATAL, which no function can
 * catch.  Its successor then fails that job with the reason (recorded in
 * shared memory) and frees the others at once, so one role's function can
 * hold every other role's jobs up for seconds, never for good.
 *
 * Session state a function can leave behind beyond settings -- session-level
 * advisory locks -- is released after each job, so that nothing of one job
 * reaches the next one or stays held by the worker.
 *
 * The functions are called through cached FmgrInfo, not SQL: the executor's
 * EXECUTE check is therefore made here, on every call, because the
 * submitter's privileges may have changed since submit.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "miscadmin.h"
#include "catalog/pg_proc.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/guc.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/timeout.h"

/* the job whose owner we run as now, between logic_begin_job and logic_end_job */
static struct
{
	bool		active;			/* switched to the owner */
	Oid			owner;
	Oid			saved_userid;
	int			saved_sec_context;
	int			saved_nestlevel;
}			as_owner;

/* the call running now, for the timeouts and their messages */
static struct
{
	int64		job_id;
	int32		step;
	Oid			fn;
	const char *what;			/* "request", "step" or "done" */
	volatile sig_atomic_t running;
}			current;

/* our two timeouts (not PostgreSQL's statement_timeout: see cancel_handler) */
static TimeoutId cancel_timeout = MAX_TIMEOUTS;
static TimeoutId overrun_timeout = MAX_TIMEOUTS;
static volatile sig_atomic_t cancel_fired = false;

/*
 * jobloop.function_timeout passed: cancel the call, as statement_timeout
 * would.  Our own timeout, because PostgreSQL clears statement_timeout's
 * indicator as it raises the cancel, and the job's reason should name the
 * setting.  A signal handler, like the next one.
 */
static void
cancel_handler(void)
{
	if (!current.running)
		return;
	cancel_fired = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

/*
 * A function ran a grace period past its cancellation.  It only records
 * which job and step it was, where the worker's successor finds them (only
 * this process writes its slot's overrun fields, and only its successor
 * reads them), and asks for FATAL at the next interrupt check.
 */
static void
overrun_handler(void)
{
	WorkerSlot *slot = shared_slot(my_worker_number);

	if (!current.running)
		return;
	if (slot != NULL)
	{
		slot->overrun_job = current.job_id;
		slot->overrun_step = current.step;
		slot->overrun_fn = current.fn;
		slot->overrun_database = MyDatabaseId;
	}
	ProcDiePending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

/* Is a job's function running now?  (For the worker's SIGTERM handler.) */
bool
logic_call_running(void)
{
	return current.running;
}

/* How long after its cancellation a function may still run. */
static int
grace_ms(void)
{
	return Max(100, Min(jobloop_function_timeout, 1000));
}

/* the search_path the database gives sessions, for the business logic */
static char *user_search_path = NULL;

void
logic_capture_search_path(void)
{
	logic_use_search_path(GetConfigOption("search_path", false, false));
}

/* The business logic's search_path, chosen by the caller (remote.c: not by the worker's role). */
void
logic_use_search_path(const char *path)
{
	if (user_search_path)
		pfree(user_search_path);
	user_search_path = MemoryContextStrdup(TopMemoryContext, path);
}

/*
 * "schema.name(argtypes)" for messages, the same whichever search_path is
 * in force (the worker's or the job owner's).
 */
static char *
function_name(Oid fn)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	Form_pg_proc proc;
	StringInfoData buf;

	if (!HeapTupleIsValid(tup))
		return psprintf("%u", fn);
	proc = (Form_pg_proc) GETSTRUCT(tup);
	initStringInfo(&buf);
	appendStringInfo(&buf, "%s(", quote_qualified_identifier(get_namespace_name(proc->pronamespace),
															NameStr(proc->proname)));
	for (int i = 0; i < proc->pronargs; i++)
		appendStringInfo(&buf, "%s%s", i > 0 ? "," : "", format_type_be(proc->proargtypes.values[i]));
	appendStringInfoChar(&buf, ')');
	ReleaseSysCache(tup);
	return buf.data;
}

static void
check_callable(Kind *kind, Oid fn, Oid owner, const char *what)
{
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the role that submitted this job (OID %u) no longer exists", owner)));
	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(fn)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("%s function of job kind \"%s\" no longer exists", what, kind->name),
				 errhint("Redefine the kind with jobloop.create_kind().")));
	if (object_aclcheck(ProcedureRelationId, fn, owner, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", function_name(fn)),
				 errdetail("The job runs as role \"%s\".", GetUserNameFromId(owner, false))));
}

static void
ensure_fmgr(Kind *kind)
{
	if (kind->fmgr_valid)
		return;
	fmgr_info_cxt(kind->request_fn, &kind->request_finfo, TopMemoryContext);
	fmgr_info_cxt(kind->step_fn, &kind->step_finfo, TopMemoryContext);
	if (OidIsValid(kind->done_fn))
		fmgr_info_cxt(kind->done_fn, &kind->done_finfo, TopMemoryContext);
	kind->fmgr_valid = true;
}

/* Run as owner until logic_end_job(); a no-op when we already do. */
static void
switch_to_owner(Oid owner)
{
	if (as_owner.active)
	{
		Assert(as_owner.owner == owner);
		return;
	}
	GetUserIdAndSecContext(&as_owner.saved_userid, &as_owner.saved_sec_context);
	SetUserIdAndSecContext(owner, as_owner.saved_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	as_owner.saved_nestlevel = NewGUCNestLevel();
	/* the worker pins its own search_path; the job gets the database's */
	if (user_search_path)
		(void) set_config_option("search_path", user_search_path, PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	as_owner.owner = owner;
	as_owner.active = true;
}

/* Before a job's calls, inside the subtransaction that wraps them. */
void
logic_begin_job(int64 job_id, int32 step)
{
	as_owner.active = false;
	current.job_id = job_id;
	current.step = step;
	current.running = false;
	cancel_fired = false;		/* a cancel of an earlier job's call says nothing about this one */
}

static void
disable_call_timeouts(void)
{
	if (overrun_timeout != MAX_TIMEOUTS)
	{
		disable_timeout(overrun_timeout, false);
		disable_timeout(cancel_timeout, false);
	}
}

/*
 * After a job's calls: back to the worker's own user and GUCs.  After an
 * error the subtransaction's abort has done that already (aborted = true).
 */
void
logic_end_job(bool aborted)
{
	disable_call_timeouts();
	current.running = false;
	/* a session-level advisory lock would outlive the job, held by us */
	LockReleaseSession(USER_LOCKMETHOD);
	if (as_owner.active && !aborted)
	{
		/*
		 * false: every change is undone, plain SET and set_config(..., false)
		 * too, not only SET LOCAL -- as PostgreSQL does after running
		 * functions in a security-restricted operation.
		 */
		AtEOXact_GUC(false, as_owner.saved_nestlevel);
		SetUserIdAndSecContext(as_owner.saved_userid, as_owner.saved_sec_context);
	}
	as_owner.active = false;
}

static void
begin_call(Kind *kind, Oid fn, Oid owner, const char *what)
{
	check_callable(kind, fn, owner, what);
	ensure_fmgr(kind);
	switch_to_owner(owner);
	current.fn = fn;
	current.what = what;
	cancel_fired = false;
	current.running = true;
	if (jobloop_function_timeout > 0)
	{
		/* in int64: jobloop.function_timeout may be close to INT_MAX */
		int64		overrun_ms = Min((int64) jobloop_function_timeout + grace_ms(), INT_MAX);

		if (overrun_timeout == MAX_TIMEOUTS)
		{
			cancel_timeout = RegisterTimeout(USER_TIMEOUT, cancel_handler);
			overrun_timeout = RegisterTimeout(USER_TIMEOUT, overrun_handler);
		}
		enable_timeout_after(cancel_timeout, jobloop_function_timeout);
		enable_timeout_after(overrun_timeout, (int) overrun_ms);
	}
}

/* In a job's error path, first thing: no timer may fire into what follows. */
void
logic_stop_timers(void)
{
	disable_call_timeouts();
	current.running = false;
	if (cancel_fired)
		QueryCancelPending = false;
}

static void
end_call(void)
{
	/* timers first: a handler acts only while a call is running */
	disable_call_timeouts();
	current.running = false;
	/* a cancel that fired just as the function returned cancels nothing */
	if (cancel_fired)
		QueryCancelPending = false;
}

/*
 * The reason a job's call failed, for last_error.  Our cancellation says
 * which function and which setting, not "canceling statement due to
 * statement timeout".
 */
char *
logic_failure_text(ErrorData *edata)
{
	if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED && current.what != NULL && cancel_fired)
		return psprintf("%s function %s ran longer than jobloop.function_timeout (%d ms)",
						current.what, function_name(current.fn), jobloop_function_timeout);
	if (edata->detail)
		return psprintf("%s (%s)", edata->message, edata->detail);
	return pstrdup(edata->message);
}

/*
 * Our predecessor in this slot stopped itself because a function ignored
 * its cancellation (see overrun_handler): the reason for that job's
 * last_error, or NULL.  Clears the record.
 */
char *
logic_take_overrun(int64 *job_id, int32 *step)
{
	WorkerSlot *slot = shared_slot(my_worker_number);
	char	   *reason;

	/* an external worker's slot may have served another database before */
	if (slot == NULL || slot->overrun_job == 0 || slot->overrun_database != MyDatabaseId)
		return NULL;
	*job_id = slot->overrun_job;
	*step = slot->overrun_step;
	reason = psprintf("%s ran past jobloop.function_timeout (%d ms) and ignored its cancellation; "
					  "the worker running it was restarted",
					  OidIsValid(slot->overrun_fn) ? function_name(slot->overrun_fn) : "a function",
					  jobloop_function_timeout);
	slot->overrun_job = 0;
	slot->overrun_fn = InvalidOid;
	return reason;
}

static Datum
call_function(FmgrInfo *finfo, int nargs, Datum arg0, Datum arg1, bool *isnull)
{
	LOCAL_FCINFO(fcinfo, 2);
	Datum		result;

	InitFunctionCallInfoData(*fcinfo, finfo, nargs, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = arg0;
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = arg1;
	fcinfo->args[1].isnull = false;
	result = FunctionCallInvoke(fcinfo);
	*isnull = fcinfo->isnull;
	return result;
}

static Jsonb *
object_result(Kind *kind, Oid fn, Datum result, bool isnull, const char *what)
{
	Jsonb	   *jb;

	if (isnull)
		return NULL;
	jb = DatumGetJsonbP(result);
	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("%s function %s must return a JSON object", what, function_name(fn))));
	return jb;
}

/* A state over jobloop.max_state_size is an error, where it is made. */
void
logic_check_state_size(Jsonb *state)
{
	Size		size = VARSIZE(state);

	if (size > (Size) jobloop_max_state_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("job state is %zu bytes, more than jobloop.max_state_size (%d bytes)",
						size, jobloop_max_state_size),
				 errhint("Keep large data in a table and put its key in the state.")));
}

/* The next request for state; NULL and *finished when the function says the job is done. */
Jsonb *
logic_request(Kind *kind, Oid owner, Jsonb *state, bool *finished)
{
	Datum		result;
	bool		isnull;

	begin_call(kind, kind->request_fn, owner, "request");
	result = call_function(&kind->request_finfo, 1, JsonbPGetDatum(state), (Datum) 0, &isnull);
	end_call();
	*finished = isnull;
	return object_result(kind, kind->request_fn, result, isnull, "request");
}

Jsonb *
logic_step(Kind *kind, Oid owner, Jsonb *state, Jsonb *response)
{
	Datum		result;
	bool		isnull;
	Jsonb	   *new_state;

	begin_call(kind, kind->step_fn, owner, "step");
	result = call_function(&kind->step_finfo, 2, JsonbPGetDatum(state), JsonbPGetDatum(response), &isnull);
	end_call();
	new_state = object_result(kind, kind->step_fn, result, isnull, "step");
	if (new_state == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("step function %s returned NULL", function_name(kind->step_fn)),
				 errhint("A step function returns the job's new state, a JSON object.")));
	logic_check_state_size(new_state);
	return new_state;
}

bool
logic_done(Kind *kind, Oid owner, Jsonb *state)
{
	Datum		result;
	bool		isnull;

	if (!OidIsValid(kind->done_fn))
		return false;
	begin_call(kind, kind->done_fn, owner, "done");
	result = call_function(&kind->done_finfo, 1, JsonbPGetDatum(state), (Datum) 0, &isnull);
	end_call();
	return !isnull && DatumGetBool(result);
}
