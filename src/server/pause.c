/*-------------------------------------------------------------------------
 *
 * pause.c
 *		Pausing jobs by kind and tenant: jobloop.pause() and resume(), and
 *		the workers' view of the pauses in force.
 *
 * A pause is a row of jobloop.pause: a kind, a tenant, both, or neither (the
 * whole database); NULL matches any, and jobs without a tenant are tenant
 * ''.  Claims skip paused jobs (store.c), and a worker lets go of the jobs
 * it holds once a pause covers them: a job waiting for its next request (a
 * delay, a backoff, a limit) goes back to the table at once, with its place
 * (run_after) kept; a job whose call is in flight waits for the answer,
 * commits its step, and then goes back instead of sending the next request.
 * So a paused job holds no connection and no worker memory, and resuming
 * neither loses nor repeats a step.
 *
 * Workers learn of a change through a relcache invalidation of the pause
 * table (as for limits), and reload the few rows at their next batch.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(jobloop_pause);
PG_FUNCTION_INFO_V1(jobloop_resume);

typedef struct Pause
{
	char	   *kind;			/* NULL: every kind */
	char	   *tenant;			/* NULL: every tenant */
} Pause;

static Pause *pauses = NULL;
static int	npauses = 0;
static MemoryContext pause_cxt = NULL;
static bool pauses_stale = true;
static Oid	pause_table = InvalidOid;

static Oid
pause_table_oid(void)
{
	Oid			schema = get_namespace_oid("jobloop", true);

	return OidIsValid(schema) ? get_relname_relid("pause", schema) : InvalidOid;
}

/* ---- the SQL functions ---- */

static void
require_admin(const char *what)
{
	require_primary(what);
	require_jobloop_admin(what, "pause and resume jobs");
}

/* The workers reload the pauses at their next transaction; wake idle ones. */
static void
pauses_changed(void)
{
	CacheInvalidateRelcacheByRelid(pause_table_oid());
	wake_workers_at_commit();
}

static void
pause_args(FunctionCallInfo fcinfo, Datum *values, char *nulls)
{
	for (int i = 0; i < 2; i++)
	{
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
}

/* pause(kind, tenant): true if this pause is new. */
Datum
jobloop_pause(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	char		nulls[2];
	OwnerContext cxt;
	bool		added;

	require_admin("pause jobs");
	pause_args(fcinfo, values, nulls);
	enter_owner_context(&cxt);
	store_run_plan(&plan,
				   "INSERT INTO jobloop.pause (kind, tenant, paused_by) VALUES ($1, $2, session_user)"
				   " ON CONFLICT (kind, tenant) DO NOTHING",
				   2, types, values, nulls, SPI_OK_INSERT);
	added = SPI_processed > 0;
	leave_owner_context(&cxt);
	pauses_changed();
	PG_RETURN_BOOL(added);
}

/*
 * resume(kind, tenant): remove the pauses that pause() with these arguments
 * or narrower ones made (NULL matches any: resume() removes them all).
 * Returns how many.
 */
Datum
jobloop_resume(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	char		nulls[2];
	OwnerContext cxt;
	int			removed;

	require_admin("resume jobs");
	pause_args(fcinfo, values, nulls);
	enter_owner_context(&cxt);
	store_run_plan(&plan,
				   "DELETE FROM jobloop.pause WHERE ($1::text IS NULL OR kind = $1)"
				   "   AND ($2::text IS NULL OR tenant = $2)",
				   2, types, values, nulls, SPI_OK_DELETE);
	removed = (int) SPI_processed;
	leave_owner_context(&cxt);
	pauses_changed();
	PG_RETURN_INT32(removed);
}

/* ---- the workers' view ---- */

static void
pause_relcache_callback(Datum arg, Oid relid)
{
	/* no table yet (a schema before 0.3.0): ALTER EXTENSION UPDATE may make one */
	if (relid == InvalidOid || relid == pause_table || !OidIsValid(pause_table))
		pauses_stale = true;
}

void
pause_init_worker(void)
{
	pause_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop pauses", ALLOCSET_SMALL_SIZES);
	CacheRegisterRelcacheCallback(pause_relcache_callback, (Datum) 0);
}

/*
 * In a transaction: reload the pauses if they may have changed.  True if
 * the worker should look at the jobs it holds again.
 */
bool
pause_sync(void)
{
	static SPIPlanPtr plan = NULL;

	if (!pauses_stale)
		return false;
	pauses_stale = false;
	MemoryContextReset(pause_cxt);
	pauses = NULL;
	npauses = 0;
	pause_table = pause_table_oid();
	if (!OidIsValid(pause_table))
		return false;			/* a schema from before 0.3.0: no pauses */
	store_run_plan(&plan, "SELECT kind, tenant FROM jobloop.pause", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	pauses = MemoryContextAlloc(pause_cxt, SPI_processed * sizeof(Pause));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		char	   *kind = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		char	   *tenant = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		pauses[i].kind = kind ? MemoryContextStrdup(pause_cxt, kind) : NULL;
		pauses[i].tenant = tenant ? MemoryContextStrdup(pause_cxt, tenant) : NULL;
	}
	npauses = (int) SPI_processed;
	return true;
}

/* Is anything paused? */
bool
pause_any(void)
{
	return npauses > 0;
}

/* Is a job of this kind and tenant (NULL: none) paused? */
bool
pause_covers(const char *kind, const char *tenant)
{
	for (int i = 0; i < npauses; i++)
		if ((pauses[i].kind == NULL || strcmp(pauses[i].kind, kind) == 0) &&
			(pauses[i].tenant == NULL || strcmp(pauses[i].tenant, tenant ? tenant : "") == 0))
			return true;
	return false;
}

/*
 * jobloop.start_paused: the first worker of this database to start since
 * the server did pauses the whole database (a restored copy must not call
 * the APIs its source called).
 */
void
pause_at_start(const char *database)
{
	static SPIPlanPtr plan = NULL;

	if (!OidIsValid(pause_table_oid()))
	{
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("jobloop.start_paused is on, but database \"%s\" has jobloop from before 0.3.0, which cannot pause",
						database),
				 errhint("Run ALTER EXTENSION jobloop UPDATE.")));
		return;
	}
	store_run_plan(&plan,
				   "INSERT INTO jobloop.pause (kind, tenant, paused_by)"
				   " VALUES (NULL, NULL, 'jobloop.start_paused') ON CONFLICT (kind, tenant) DO NOTHING",
				   0, NULL, NULL, NULL, SPI_OK_INSERT);
	ereport(LOG,
			(errmsg("jobloop.start_paused: the jobs of database \"%s\" are paused", database),
			 errhint("Run SELECT jobloop.resume() in that database to let them run.")));
	pauses_stale = true;
}
