/*-------------------------------------------------------------------------
 *
 * store.c
 *		Every statement the worker runs against the job table.
 *
 * Each statement is prepared once per process and kept; all are set-based,
 * so a batch of a thousand steps is one UPDATE, not a thousand.  The worker
 * calls these inside its transaction with SPI connected.  Statements that
 * touch held jobs are fenced by "worker = <this worker>": a job whose lease
 * was lost (reaped, cancelled) is simply not updated, and the caller drops
 * it.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

static int	my_worker = 0;

static void
run_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types,
		 Datum *values, const char *nulls, int expected, int cursor_options)
{
	int			rc;

	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, types, cursor_options);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		*cache = plan;
	}
	rc = SPI_execute_plan(*cache, values, nulls, false, 0);
	if (rc != expected)
		elog(ERROR, "SPI_execute_plan failed for \"%s\": %s", sql, SPI_result_code_string(rc));
}

/* Run a statement, prepared on first use and kept for the life of the process. */
void
store_run_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types,
			   Datum *values, const char *nulls, int expected)
{
	run_plan(cache, sql, nargs, types, values, nulls, expected, 0);
}

void
store_prepare(int worker)
{
	my_worker = worker;
}

/* Does jobloop.job have key_token (0.3.0)?  See store_claim. */
static bool has_key_tokens = true;

/* Are jobs counted by status (0.4.0)?  See store_fold_counts. */
static bool has_job_counts = true;

/* Do finished jobs move to jobloop.finished_job (0.5.0)?  See store_delete_expired. */
static bool has_finished_jobs = true;

/*
 * Is the extension installed?  With lock, it stays so until the end of the
 * transaction.  Also notes its schema's version: a worker
 * with this library runs jobs of 0.1.0 and 0.2.0 schemas too, so that jobs
 * keep running across ALTER EXTENSION jobloop UPDATE.
 */
ExtensionState
store_extension_state(bool lock)
{
	Oid			ext = get_extension_oid("jobloop", true);
	Oid			schema;
	Oid			job;

	if (!OidIsValid(ext))
		return EXTENSION_MISSING;
	if (lock)
	{
		/*
		 * DROP EXTENSION locks the extension first: from here on it waits for
		 * our transaction, and if it committed while we took the lock, the
		 * look-up below (after the lock's cache invalidation) sees it gone.
		 */
		LockDatabaseObject(ExtensionRelationId, ext, 0, AccessShareLock);
		if (get_extension_oid("jobloop", true) != ext)
			return EXTENSION_MISSING;	/* dropped (and perhaps created again) */
	}
	schema = get_namespace_oid("jobloop", true);
	job = OidIsValid(schema) ? get_relname_relid("job", schema) : InvalidOid;
	has_key_tokens = OidIsValid(job) && get_attnum(job, "key_token") != InvalidAttrNumber;
	has_job_counts = OidIsValid(schema) && OidIsValid(get_relname_relid("job_count_change", schema));
	has_finished_jobs = OidIsValid(schema) && OidIsValid(get_relname_relid("finished_job", schema));
	return EXTENSION_READY;
}

/* The worker numbers that serve our database, ours included. */
static int	sibling_workers[JOBLOOP_MAX_WORKERS];
static int	nsibling_workers = 0;

static Datum
worker_array(int *workers, int n)
{
	Datum	   *elems = palloc(Max(n, 1) * sizeof(Datum));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
		elems[i] = Int32GetDatum(workers[i]);
	return PointerGetDatum(construct_md_array(elems, NULL, 1, dims, lbs, INT4OID, 4, true, 'i'));
}

/*
 * At start: free every job a previous incarnation of this worker held (it
 * is dead, so there is no point waiting for its leases), and those held by
 * worker numbers that do not serve this database (any more): numbers move
 * when jobloop.database or jobloop.workers change across a restart.
 */
void
store_release_all(int *siblings, int nsiblings)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT4OID, INT4ARRAYOID};
	Datum		values[2];

	/* the reaper needs them too */
	nsibling_workers = Min(nsiblings, JOBLOOP_MAX_WORKERS);
	memcpy(sibling_workers, siblings, nsibling_workers * sizeof(int));
	values[0] = Int32GetDatum(my_worker);
	values[1] = worker_array(siblings, nsiblings);
	store_run_plan(&plan,
				   "UPDATE jobloop.job SET worker = NULL, lease_expires_at = NULL"
				   " WHERE id IN (SELECT id FROM jobloop.job"
				   "   WHERE worker IS NOT NULL AND (worker = $1 OR worker <> ALL ($2))"
				   "   FOR NO KEY UPDATE SKIP LOCKED)",
				   2, types, values, NULL, SPI_OK_UPDATE);
	if (SPI_processed > 0)
		elog(LOG, "jobloop worker %d released " UINT64_FORMAT " jobs held before it started",
			 my_worker, SPI_processed);
}

/*
 * Fail one job, at start, before anything is released: its function ignored
 * jobloop.function_timeout and stopped our predecessor (logic.c), so
 * running it again would only stop us too.  The job may be marked ours, or
 * no one's if the function ran in the transaction that claimed it (which
 * never committed); either way it is still at the step it was at.
 */
void
store_fail_job(int64 id, int32 step, const char *reason)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT8OID, TEXTOID, INT4OID, INT4OID};
	Datum		values[4] = {Int64GetDatum(id), CStringGetTextDatum(reason), Int32GetDatum(my_worker),
	Int32GetDatum(step)};
	bool		isnull;

	store_run_plan(&plan,
				   "UPDATE jobloop.job SET status = 'failed', last_error = $2, worker = NULL,"
				   "   lease_expires_at = NULL, request = NULL, finished_at = now(), updated_at = now()"
				   " WHERE id = $1 AND (worker = $3 OR worker IS NULL) AND step = $4"
				   "   AND status = ANY (ARRAY['pending', 'running'])"
				   " RETURNING step, tenant, kind",
				   4, types, values, NULL, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 0)
		return;
	elog(LOG, "jobloop worker %d failed job " INT64_FORMAT ": %s", my_worker, id, reason);
	notify_job(id, "failed",
			   DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)),
			   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
			   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3), reason);
}

static char *
copy_text(HeapTuple row, TupleDesc desc, int col, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(row, desc, col, &isnull);

	return isnull ? NULL : MemoryContextStrdup(cxt, TextDatumGetCString(d));
}

static Jsonb *
copy_jsonb(HeapTuple row, TupleDesc desc, int col, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(row, desc, col, &isnull);
	Jsonb	   *jb;
	Jsonb	   *copy;

	if (isnull)
		return NULL;
	jb = DatumGetJsonbP(d);
	copy = MemoryContextAlloc(cxt, VARSIZE(jb));
	memcpy(copy, jb, VARSIZE(jb));
	return copy;
}

/*
 * Take one of the workers' locks (JOBLOOP_LOCK_*) of this database until the
 * end of the transaction, if no other session holds it; never wait.  Type
 * "userlock", which no SQL function can take: an advisory lock could be
 * taken, and held for ever, by any role.
 */
bool
store_try_worker_lock(int what)
{
	LOCKTAG		tag;

	memset(&tag, 0, sizeof(tag));
	tag.locktag_field1 = MyDatabaseId;
	tag.locktag_field2 = JOBLOOP_LOCK_KEY;
	tag.locktag_field3 = what;
	tag.locktag_type = LOCKTAG_USERLOCK;
	tag.locktag_lockmethodid = DEFAULT_LOCKMETHOD;
	return LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL;
}

/*
 * A tenant's room is counted from the claim's snapshot, so two workers
 * claiming at once would each fill it.  When any tenant cap exists, claims
 * take turns (until the claiming transaction ends), and the claim statement
 * that follows sees the other worker's committed claims.
 *
 * The turn is a heavyweight lock of type "userlock", which no SQL function
 * can take (an advisory lock could be taken, and held for ever, by any
 * role, and every worker would wait behind it).  And it is never waited
 * for: the claiming transaction goes on to run the claimed jobs' first
 * request functions, which may take up to jobloop.function_timeout, so a
 * worker that finds the turn taken claims nothing now and tries again
 * shortly (false).
 */
static bool
take_turns_if_capped(void)
{
	static SPIPlanPtr plan = NULL;

	if (jobloop_tenant_max_concurrency <= 0)
	{
		store_run_plan(&plan, "SELECT FROM jobloop.tenant_limit LIMIT 1",
					   0, NULL, NULL, NULL, SPI_OK_SELECT);
		if (SPI_processed == 0)
			return true;
	}
	return store_try_worker_lock(JOBLOOP_LOCK_CLAIM_TURN);
}

/*
 * Claim up to limit runnable jobs, fairly across tenants, skipping rows
 * another worker is claiming right now.  Results are copied into cxt.
 * -1: another worker has the turn (see take_turns_if_capped).
 *
 * Fairness: walk the tenants that have unheld jobs (a loose index scan,
 * one probe per tenant, however many jobs each has queued), give each an
 * equal share of the free slots within its concurrency cap, and take each
 * tenant's oldest runnable jobs.  So a tenant with 100,000 queued jobs
 * takes one share per claim, and another tenant's single job is claimed in
 * the same round.  When there are more tenants than slots, the round starts
 * after the tenant where the previous one stopped.
 */
/*
 * The claim statement, in parts: schemas from 0.3.0 on have pauses and key
 * tokens, older ones neither (see store_claim).
 */
#define CLAIM_SQL_TENANTS \
	"WITH RECURSIVE tenants(t) AS (" \
	"    (SELECT coalesce(tenant, '') FROM jobloop.job" \
	"      WHERE worker IS NULL AND status = ANY (ARRAY['pending', 'running'])" \
	"      ORDER BY 1 LIMIT 1)" \
	"  UNION ALL" \
	"    SELECT (SELECT coalesce(j.tenant, '') FROM jobloop.job j" \
	"             WHERE j.worker IS NULL AND j.status = ANY (ARRAY['pending', 'running'])" \
	"               AND coalesce(j.tenant, '') > tenants.t" \
	"             ORDER BY 1 LIMIT 1)" \
	"      FROM tenants WHERE tenants.t IS NOT NULL)," \
	" room AS (" \
	"    SELECT t.t, CASE WHEN coalesce(l.max_concurrency, $4) > 0" \
	"      THEN greatest(coalesce(l.max_concurrency, $4) - (SELECT count(*) FROM jobloop.job h" \
	"             WHERE coalesce(h.tenant, '') = t.t AND h.worker IS NOT NULL), 0)" \
	"      ELSE $1 END AS room" \
	"      FROM tenants t LEFT JOIN jobloop.tenant_limit l ON l.tenant = t.t" \
	"     WHERE t.t IS NOT NULL"
/* ... whole tenants paused (with every kind) get no room */
#define CLAIM_SQL_UNPAUSED_TENANTS \
	"       AND NOT EXISTS (SELECT FROM jobloop.pause ps WHERE ps.kind IS NULL" \
	"                         AND (ps.tenant IS NULL OR ps.tenant = t.t))"
#define CLAIM_SQL_JOBS \
	")," \
	" share AS (SELECT greatest(1, $1 / greatest(count(*), 1))::integer AS n" \
	"             FROM room WHERE room > 0)," \
	" c AS (" \
	"    SELECT p.id, p.status, r.t FROM room r CROSS JOIN share s," \
	"      LATERAL (SELECT j.id, j.status FROM jobloop.job j" \
	"                WHERE coalesce(j.tenant, '') = r.t AND j.worker IS NULL" \
	"                  AND j.status = ANY (ARRAY['pending', 'running'])" \
	"                  AND j.run_after <= now()"
/* ... nor jobs of a paused kind */
#define CLAIM_SQL_UNPAUSED_JOBS \
	"                  AND NOT EXISTS (SELECT FROM jobloop.pause ps WHERE ps.kind = j.kind" \
	"                                    AND (ps.tenant IS NULL OR ps.tenant = r.t))"
#define CLAIM_SQL_RETURNING \
	"                ORDER BY j.run_after, j.id" \
	"                LIMIT least(r.room, s.n)" \
	"                FOR NO KEY UPDATE SKIP LOCKED) p" \
	"     WHERE r.room > 0" \
	"     ORDER BY r.t <= $5, r.t" \
	"     LIMIT $1)" \
	" UPDATE jobloop.job j SET worker = $2, status = 'running'," \
	"   lease_expires_at = now() + make_interval(secs => $3)," \
	"   started_at = coalesce(j.started_at, now()), updated_at = now()" \
	"  FROM c WHERE j.id = c.id" \
	" RETURNING j.id, j.kind, j.owner::oid, j.tenant, j.step, j.attempts, j.state," \
	"   j.request, c.status = 'pending', c.t"

int
store_claim(int limit, ClaimedJob *out, MemoryContext cxt)
{
	static SPIPlanPtr plan = NULL;
	static SPIPlanPtr plan_before_0_3 = NULL;
	static char *cursor = NULL;
	Oid			types[5] = {INT4OID, INT4OID, INT4OID, INT4OID, TEXTOID};
	Datum		values[5] = {Int32GetDatum(limit), Int32GetDatum(my_worker),
		Int32GetDatum(jobloop_lease_timeout), Int32GetDatum(jobloop_tenant_max_concurrency),
	CStringGetTextDatum(cursor ? cursor : "")};
	char	   *last_after = NULL;
	char	   *last_any = NULL;

	if (!take_turns_if_capped())
		return -1;
	/*
	 * Planned anew at every claim (a custom plan): a generic plan keeps the
	 * table size and statistics of the moment it was made, e.g. a table
	 * VACUUMed while empty, and then read the whole table in each tenant
	 * probe of the next burst (262-355 ms claims until it was replanned,
	 * bench/README.md).  Planning costs 0.5-1 ms of a claim of up to 500 jobs.
	 * Schemas before 0.3.0 have neither pauses nor Idempotency-Key tokens.
	 */
	if (has_key_tokens)
		run_plan(&plan,
				 CLAIM_SQL_TENANTS CLAIM_SQL_UNPAUSED_TENANTS
				 CLAIM_SQL_JOBS CLAIM_SQL_UNPAUSED_JOBS
				 CLAIM_SQL_RETURNING ", j.key_token::text",
				 5, types, values, NULL, SPI_OK_UPDATE_RETURNING, CURSOR_OPT_CUSTOM_PLAN);
	else
		run_plan(&plan_before_0_3,
				 CLAIM_SQL_TENANTS CLAIM_SQL_JOBS CLAIM_SQL_RETURNING ", NULL::text",
				 5, types, values, NULL, SPI_OK_UPDATE_RETURNING, CURSOR_OPT_CUSTOM_PLAN);

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		ClaimedJob *job = &out[i];
		bool		isnull;
		char	   *t;

		job->id = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
		job->kind = copy_text(row, desc, 2, cxt);
		job->owner = DatumGetObjectId(SPI_getbinval(row, desc, 3, &isnull));
		job->tenant = copy_text(row, desc, 4, cxt);
		job->step = DatumGetInt32(SPI_getbinval(row, desc, 5, &isnull));
		job->attempts = DatumGetInt32(SPI_getbinval(row, desc, 6, &isnull));
		job->state = copy_jsonb(row, desc, 7, cxt);
		job->request = copy_jsonb(row, desc, 8, cxt);
		job->was_pending = DatumGetBool(SPI_getbinval(row, desc, 9, &isnull));
		job->key_token = copy_text(row, desc, 11, cxt);

		/* where this round stopped: the last tenant after the cursor, else the last one */
		t = TextDatumGetCString(SPI_getbinval(row, desc, 10, &isnull));
		if (cursor && strcmp(t, cursor) > 0 && (!last_after || strcmp(t, last_after) > 0))
			last_after = t;
		if (!last_any || strcmp(t, last_any) > 0)
			last_any = t;
	}
	if (SPI_processed > 0)
	{
		char	   *next = last_after ? last_after : last_any;

		if (cursor)
			pfree(cursor);
		cursor = MemoryContextStrdup(TopMemoryContext, next);
	}
	return (int) SPI_processed;
}

/* When the next unheld job becomes runnable; 0 if there is none. */
TimestampTz
store_next_runnable(void)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;
	Datum		d;

	store_run_plan(&plan,
				   "SELECT min(run_after) FROM jobloop.job"
				   " WHERE worker IS NULL AND status = ANY (ARRAY['pending', 'running'])",
				   0, NULL, NULL, NULL, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

static Datum
array_of(Datum *elems, bool *nulls, int n, Oid type)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, type, typlen, typbyval, typalign));
}

static int	compare_int64(const void *a, const void *b);

/* A bigint[] datum of ids. */
static Datum
id_array(int64 *ids, int n)
{
	Datum	   *elems = palloc(Max(n, 1) * sizeof(Datum));

	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	return array_of(elems, NULL, n, INT8OID);
}

/* The first column of the last statement's rows, as sorted bigints. */
static int64 *
sorted_ids(int *n)
{
	int64	   *ids = palloc(Max(SPI_processed, 1) * sizeof(int64));

	*n = (int) SPI_processed;
	for (int i = 0; i < *n; i++)
	{
		bool		isnull;

		ids[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	}
	qsort(ids, *n, sizeof(int64), compare_int64);
	return ids;
}

static int
compare_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/*
 * Write a batch of step results with one statement.  applied[i] tells
 * whether updates[i] took effect: it does not when the job is no longer
 * ours (cancelled, its lease lost), has moved past the step our copy
 * started from, or is locked by someone else right now (a cancel in
 * progress).  The worker never waits for another session's row lock: that
 * wait could stall every job it holds, or deadlock with a statement that
 * locks many jobs in another order.  Returns the number applied.
 */
int
store_update_jobs(JobUpdate *updates, int n, bool *applied)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[11] = {INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID, JSONBARRAYOID, JSONBARRAYOID,
		TEXTARRAYOID, INT4ARRAYOID, TIMESTAMPTZARRAYOID, BOOLARRAYOID, INT4OID, INT4ARRAYOID};
	Datum		values[11];
	Datum	   *cols[10];
	bool	   *nulls[10];
	int64	   *returned;
	int			nreturned;

	if (n == 0)
		return 0;
	for (int c = 0; c < 10; c++)
	{
		cols[c] = palloc(n * sizeof(Datum));
		nulls[c] = palloc0(n * sizeof(bool));
	}
	for (int i = 0; i < n; i++)
	{
		JobUpdate  *u = &updates[i];

		cols[0][i] = Int64GetDatum(u->id);
		cols[1][i] = CStringGetTextDatum(u->status);
		cols[2][i] = Int32GetDatum(u->step);
		cols[3][i] = JsonbPGetDatum(u->state);
		cols[4][i] = u->request ? JsonbPGetDatum(u->request) : (Datum) 0;
		nulls[4][i] = u->request == NULL;
		cols[5][i] = u->last_error ? CStringGetTextDatum(u->last_error) : (Datum) 0;
		nulls[5][i] = u->last_error == NULL;
		cols[6][i] = Int32GetDatum(u->attempts);
		cols[7][i] = TimestampTzGetDatum(u->run_after);
		nulls[7][i] = u->run_after == 0;
		cols[8][i] = BoolGetDatum(u->release);
		cols[9][i] = Int32GetDatum(u->from_step);
	}
	values[0] = array_of(cols[0], nulls[0], n, INT8OID);
	values[1] = array_of(cols[1], nulls[1], n, TEXTOID);
	values[2] = array_of(cols[2], nulls[2], n, INT4OID);
	values[3] = array_of(cols[3], nulls[3], n, JSONBOID);
	values[4] = array_of(cols[4], nulls[4], n, JSONBOID);
	values[5] = array_of(cols[5], nulls[5], n, TEXTOID);
	values[6] = array_of(cols[6], nulls[6], n, INT4OID);
	values[7] = array_of(cols[7], nulls[7], n, TIMESTAMPTZOID);
	values[8] = array_of(cols[8], nulls[8], n, BOOLOID);
	values[9] = Int32GetDatum(my_worker);
	values[10] = array_of(cols[9], nulls[9], n, INT4OID);

	/*
	 * The shape of this plan matters more than anything else the worker
	 * does, so the statement leaves the planner no choice: each job's row is
	 * fetched by primary key and locked (SKIP LOCKED, see above) one array
	 * element at a time (a LATERAL subquery with a locking clause is never
	 * flattened; OFFSET 0 keeps the ownership test outside, where it cannot
	 * steer the scan to another index), then updated by the ctid the lock
	 * returned.  Joining the arrays to the table instead made the plan
	 * depend on statistics, which lag badly behind a table whose jobs all
	 * just changed hands: with 10,000 held jobs the planner chose a nested
	 * loop over every held job times the batch, 650 ms for 94 rows.  Now it
	 * is ~10 us per row at any size.  Planned anew for every batch all the
	 * same, so the unnest() is estimated at its real length.
	 *
	 * A row that is no longer ours is locked until the batch commits (a few
 * milliseconds) and left alone: testing ownership inside the subquery would
 * let stale statistics steer its scan to the worker index again.
	 * Should a row's locked version be newer than this statement's
	 * snapshot, the TID scan misses it and the update is not applied -- the
	 * same outcome as a locked row, handled the same way.
	 */
	run_plan(&plan,
			 "WITH u AS ("
			 "    SELECT l.tid, u.*"
			 "      FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $11)"
			 "           AS u(id, status, step, state, request, last_error, attempts, run_after, release,"
			 "                from_step)"
			 "     CROSS JOIN LATERAL ("
			 "           SELECT j.ctid AS tid, j.worker, j.status, j.step FROM jobloop.job j"
			 "            WHERE j.id = u.id"
			 "           OFFSET 0 FOR NO KEY UPDATE SKIP LOCKED) l"
			 "     WHERE l.worker = $10 AND l.status = 'running' AND l.step = u.from_step)"
			 " UPDATE jobloop.job j SET status = u.status, step = u.step, state = u.state,"
			 "   request = u.request, last_error = u.last_error, attempts = u.attempts,"
			 "   run_after = coalesce(u.run_after, j.run_after),"
			 "   worker = CASE WHEN u.release THEN NULL ELSE j.worker END,"
			 "   lease_expires_at = CASE WHEN u.release THEN NULL ELSE j.lease_expires_at END,"
			 "   updated_at = now(),"
			 "   finished_at = CASE WHEN u.status = ANY (ARRAY['completed', 'failed', 'cancelled'])"
			 "                 THEN now() END"
			 "  FROM u"
			 " WHERE j.ctid = u.tid"
			 " RETURNING j.id",
			 11, types, values, NULL, SPI_OK_UPDATE_RETURNING, CURSOR_OPT_CUSTOM_PLAN);

	returned = sorted_ids(&nreturned);
	for (int i = 0; i < n; i++)
		applied[i] = bsearch(&updates[i].id, returned, nreturned, sizeof(int64), compare_int64) != NULL;
	return nreturned;
}

/*
 * The heartbeat: one statement extends the lease of every job we hold --
 * exactly those, so a row still marked ours that we no longer track runs
 * out of lease and is reaped.
 */
void
store_extend_leases(int64 *ids, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT8ARRAYOID, INT4OID, INT4OID};
	Datum		values[3];

	values[0] = id_array(ids, n);
	values[1] = Int32GetDatum(my_worker);
	values[2] = Int32GetDatum(jobloop_lease_timeout);
	store_run_plan(&plan,
				   "UPDATE jobloop.job SET lease_expires_at = now() + make_interval(secs => $3)"
				   " WHERE id IN (SELECT id FROM jobloop.job WHERE id = ANY ($1) AND worker = $2"
				   "              FOR NO KEY UPDATE SKIP LOCKED)",
				   3, types, values, NULL, SPI_OK_UPDATE);
}

/*
 * The reaper: holds that no live worker of ours stands behind become
 * claimable again --
 *   - a lease that ran out (its worker is stuck or gone, or stopped
 *     tracking the job);
 *   - a row marked with our number that we do not hold: only we hold rows
 *     with our number, so it is a hold of a predecessor, of the worker with
 *     our number in the cluster a dump was taken from, or one we failed to
 *     release;
 *   - a row marked with a number no worker of this database has (a restore
 *     from a cluster with other settings).
 * The last two need no lease to expire: a restore's rows carry the old
 * cluster's holds and leases, and must not wait them out.  Jobs we hold are
 * never reaped.
 * Rows being written right now are skipped, not waited for: a batch that
 * locks many rows in another order would otherwise deadlock with us.
 */
int
store_reap_expired(int64 *held_ids, int nheld)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT4OID, INT8ARRAYOID, INT4ARRAYOID};
	Datum		values[3];

	/*
	 * Who serves our database right now: external workers come and go (a
	 * worker whose connection ended stands behind its jobs no more).
	 */
	{
		char	   *database = get_database_name(MyDatabaseId);

		if (database != NULL)
			nsibling_workers = shared_database_workers(database, sibling_workers,
													   JOBLOOP_MAX_WORKERS);
	}
	values[0] = Int32GetDatum(my_worker);
	values[1] = id_array(held_ids, nheld);
	/* siblings unknown (cannot happen after store_release_all): free no peer's jobs */
	values[2] = nsibling_workers > 0 ? worker_array(sibling_workers, nsibling_workers) : (Datum) 0;

	store_run_plan(&plan,
				   "UPDATE jobloop.job SET worker = NULL, lease_expires_at = NULL"
				   " WHERE id IN (SELECT id FROM jobloop.job"
				   "   WHERE worker IS NOT NULL"
				   "     AND (lease_expires_at < now() OR worker = $1 OR worker <> ALL ($3))"
				   "     AND NOT (worker = $1 AND id = ANY ($2))"
				   "   FOR NO KEY UPDATE SKIP LOCKED)",
				   3, types, values, nsibling_workers > 0 ? NULL : "  n", SPI_OK_UPDATE);
	if (SPI_processed > 0)
		elog(LOG, "jobloop worker %d freed " UINT64_FORMAT " jobs that no live worker holds",
			 my_worker, SPI_processed);
	return (int) SPI_processed;
}

/*
 * Give jobs back to the table (still unfinished, claimable by anyone).
 * Rows locked right now are skipped; their lease runs out instead.
 */
void
store_release(int64 *ids, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8ARRAYOID, INT4OID};
	Datum		values[2];

	values[0] = id_array(ids, n);
	values[1] = Int32GetDatum(my_worker);
	store_run_plan(&plan,
				   "UPDATE jobloop.job SET worker = NULL, lease_expires_at = NULL"
				   " WHERE id IN (SELECT id FROM jobloop.job WHERE id = ANY ($1) AND worker = $2"
				   "              FOR NO KEY UPDATE SKIP LOCKED)",
				   2, types, values, NULL, SPI_OK_UPDATE);
}

/* The ids of every job the table says we hold (after a lost cancel), sorted. */
int64 *
store_held_ids(int *n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(my_worker)};

	store_run_plan(&plan, "SELECT id FROM jobloop.job WHERE worker = $1",
				   1, types, values, NULL, SPI_OK_SELECT);
	return sorted_ids(n);
}

/* Are there partitions of finished jobs to maintain (0.5.0)?  See retention.c. */
bool
store_has_finished_jobs(void)
{
	return has_finished_jobs;
}

/*
 * Retention, row by row: delete up to limit jobs that finished longer than
 * jobloop.retention ago, from the two places whole partitions do not cover:
 * jobloop.job (jobs that finished before 0.5.0 moved finished jobs out of
 * it) and the default partition of jobloop.finished_job (jobs that finished
 * while no partition covered their time).  Small batches keep locks and WAL
 * bursts short.  The partitions themselves are dropped whole (retention.c).
 */
int
store_delete_expired(int limit)
{
	static SPIPlanPtr plan = NULL;
	static SPIPlanPtr default_plan = NULL;
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(limit), Int32GetDatum(jobloop_retention)};
	int			n;

	store_run_plan(&plan,
				   "DELETE FROM jobloop.job WHERE id IN ("
				   "  SELECT id FROM jobloop.job"
				   "   WHERE finished_at < now() - make_interval(secs => $2)"
				   "   ORDER BY finished_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
				   2, types, values, NULL, SPI_OK_DELETE);
	n = (int) SPI_processed;
	if (n >= limit || !has_finished_jobs)
		return n;
	values[0] = Int32GetDatum(limit - n);
	store_run_plan(&default_plan,
				   "DELETE FROM jobloop.finished_job_default WHERE ctid = ANY (ARRAY("
				   "  SELECT ctid FROM jobloop.finished_job_default"
				   "   WHERE finished_at < now() - make_interval(secs => $2)"
				   "   ORDER BY finished_at LIMIT $1 FOR UPDATE SKIP LOCKED))",
				   2, types, values, NULL, SPI_OK_DELETE);
	return n + (int) SPI_processed;
}

/*
 * Fold the counts of jobs by status (jobloop.job_count_change, appended to
 * by every statement that changes a job's status) into jobloop.job_count,
 * so that jobloop.stats reads a few rows.  One worker at a time: the others
 * skip it rather than wait (the lock is held until the batch commits), and
 * the rows are locked with SKIP LOCKED, so no fold ever waits for another
 * session.  jobloop.recount() is the only other writer of the counts.
 *
 * At most FOLD_ROWS change rows per call, so that a fold costs a turn a few
 * milliseconds even after a bulk submit (one change row per submit() call:
 * folding the 10,000 of one statement took 190-330 ms, during which this
 * worker claimed nothing).  True if there may be more: fold again next turn.
 */
#define FOLD_ROWS	500
bool
store_fold_counts(void)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(FOLD_ROWS)};
	bool		isnull;

	if (!has_job_counts)
		return false;
	if (!store_try_worker_lock(JOBLOOP_LOCK_COUNT_FOLD))
		return false;
	store_run_plan(&plan,
				   "WITH moved AS ("
				   "    DELETE FROM jobloop.job_count_change"
				   "     WHERE ctid = ANY (ARRAY(SELECT ctid FROM jobloop.job_count_change"
				   "                             LIMIT $1 FOR UPDATE SKIP LOCKED))"
				   "    RETURNING owner, status, n),"
				   " folded AS (SELECT count(*) AS n FROM moved),"
				   " applied AS ("
				   "    INSERT INTO jobloop.job_count AS c (owner, status, n)"
				   "    SELECT owner, status, sum(n) FROM moved GROUP BY owner, status"
				   "     ORDER BY owner, status"
				   "    ON CONFLICT (owner, status) DO UPDATE SET n = c.n + excluded.n)"
				   " SELECT n FROM folded",
				   1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed != 1)
		return false;
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) >= FOLD_ROWS;
}

/*
 * For the updates that did not apply: is the row still ours, at the step
 * our copy started from?  Then it was only locked by someone else (another
 * worker's claim, a cancel in progress) and the update is to be retried.
 * (store_read_ours: a plain read that waits for nobody.)
 */
void
store_still_ours(JobUpdate *updates, bool *applied, int n, bool *ours)
{
	int64	   *ids = palloc(Max(n, 1) * sizeof(int64));
	int32	   *steps = palloc(Max(n, 1) * sizeof(int32));
	int		   *which = palloc(Max(n, 1) * sizeof(int));
	bool	   *found = palloc(Max(n, 1) * sizeof(bool));
	int			m = 0;

	for (int i = 0; i < n; i++)
	{
		ours[i] = false;
		if (!applied[i])
		{
			ids[m] = updates[i].id;
			steps[m] = updates[i].from_step;
			which[m++] = i;
		}
	}
	if (m == 0)
		return;
	store_read_ours(ids, steps, m, found);
	for (int k = 0; k < m; k++)
		ours[which[k]] = found[k];
}

/*
 * Before a batch runs the business logic of jobs whose calls answered:
 * which of them are still ours at the step we hold (ours[i]).  A job that
 * is not -- its lease ran out and it was freed or taken by another worker
 * while we could not renew it (a network cut between jobloop-worker and
 * the server, a stopped process), or it was cancelled -- must not have its
 * step() run here: the fence would refuse the state, but what step() wrote
 * would commit.  A plain read that waits for nobody: a row locked right now
 * (a cancel in progress) reads as it was, and its update is fenced and
 * deferred as before.  Leases run for seconds and a batch for milliseconds,
 * so a lease that lapses between this read and the commit is one that had
 * gone unrenewed for about lease_timeout already.  Row by row by primary
 * key, for the reason given at store_update_jobs.
 */
void
store_read_ours(int64 *ids, int32 *steps, int n, bool *ours)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT8ARRAYOID, INT4ARRAYOID, INT4OID};
	Datum		values[3];
	Datum	   *id_datums = palloc(Max(n, 1) * sizeof(Datum));
	Datum	   *step_datums = palloc(Max(n, 1) * sizeof(Datum));
	int64	   *found;
	int			nfound;

	for (int i = 0; i < n; i++)
	{
		id_datums[i] = Int64GetDatum(ids[i]);
		step_datums[i] = Int32GetDatum(steps[i]);
	}
	values[0] = array_of(id_datums, NULL, n, INT8OID);
	values[1] = array_of(step_datums, NULL, n, INT4OID);
	values[2] = Int32GetDatum(my_worker);
	store_run_plan(&plan,
				   "SELECT u.id FROM unnest($1, $2) AS u(id, from_step)"
				   " CROSS JOIN LATERAL (SELECT j.worker, j.status, j.step FROM jobloop.job j"
				   "                      WHERE j.id = u.id OFFSET 0) j"
				   " WHERE j.worker = $3 AND j.status = 'running' AND j.step = u.from_step",
				   3, types, values, NULL, SPI_OK_SELECT);
	found = sorted_ids(&nfound);
	for (int i = 0; i < n; i++)
		ours[i] = bsearch(&ids[i], found, nfound, sizeof(int64), compare_int64) != NULL;
}
