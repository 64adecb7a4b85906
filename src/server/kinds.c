/*-------------------------------------------------------------------------
 *
 * kinds.c
 *		The worker's cache of jobloop.kind.
 *
 * Kinds change rarely and are read on every step, so a worker keeps them in
 * a hash table.  create_kind and drop_kind send a relcache invalidation for
 * jobloop.kind at commit; the callback here marks every entry stale, and the
 * next lookup reloads it.  Entries are never freed, so a Kind pointer held
 * by a job stays valid; a dropped kind is only marked not present.
 *
 * Only the worker uses this file, and only inside a transaction.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

static HTAB *kinds = NULL;
static MemoryContext kinds_context = NULL;
static bool kinds_stale = true;
static Oid	kind_table = InvalidOid;

static void
kinds_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == kind_table)
		kinds_stale = true;
}

void
kinds_invalidate(void)
{
	kinds_stale = true;
}

static void
kinds_init(void)
{
	HASHCTL		ctl;

	kinds_context = AllocSetContextCreate(TopMemoryContext, "jobloop kinds",
										  ALLOCSET_SMALL_SIZES);
	ctl.keysize = sizeof(((Kind *) NULL)->name);
	ctl.entrysize = sizeof(Kind);
	ctl.hcxt = kinds_context;
	kinds = hash_create("jobloop kinds", 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	CacheRegisterRelcacheCallback(kinds_relcache_callback, (Datum) 0);
}

/* Reload every kind from the table; kinds no longer there stay, not present. */
static void
kinds_reload(void)
{
	static SPIPlanPtr plan = NULL;
	HASH_SEQ_STATUS seq;
	Kind	   *kind;

	kind_table = get_relname_relid("kind", get_namespace_oid("jobloop", false));
	hash_seq_init(&seq, kinds);
	while ((kind = hash_seq_search(&seq)) != NULL)
		kind->present = false;

	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT name, request_fn::oid, step_fn::oid, done_fn::oid, max_steps,"
						   " max_attempts,"
						   " (extract(epoch FROM backoff) * 1000)::bigint,"
						   " (extract(epoch FROM max_backoff) * 1000)::bigint,"
						   " (extract(epoch FROM timeout) * 1000)::integer,"
						   " notify_steps, on_error = 'step'"
						   " FROM jobloop.kind", 0, NULL);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
	}
	if (SPI_execute_plan(plan, NULL, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read jobloop.kind");

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = TextDatumGetCString(SPI_getbinval(row, desc, 1, &(bool){0}));
		bool		found;
		bool		isnull;
		Oid			request_fn,
					step_fn,
					done_fn;

		if (strlen(name) >= sizeof(kind->name))
			continue;			/* the table's CHECK forbids it */
		kind = hash_search(kinds, name, HASH_ENTER, &found);
		request_fn = DatumGetObjectId(SPI_getbinval(row, desc, 2, &isnull));
		step_fn = DatumGetObjectId(SPI_getbinval(row, desc, 3, &isnull));
		done_fn = DatumGetObjectId(SPI_getbinval(row, desc, 4, &isnull));
		if (isnull)
			done_fn = InvalidOid;
		if (!found || kind->request_fn != request_fn || kind->step_fn != step_fn ||
			kind->done_fn != done_fn)
			kind->fmgr_valid = false;
		kind->request_fn = request_fn;
		kind->step_fn = step_fn;
		kind->done_fn = done_fn;
		kind->max_steps = DatumGetInt32(SPI_getbinval(row, desc, 5, &isnull));
		kind->max_attempts = DatumGetInt32(SPI_getbinval(row, desc, 6, &isnull));
		kind->backoff_ms = DatumGetInt64(SPI_getbinval(row, desc, 7, &isnull));
		kind->max_backoff_ms = DatumGetInt64(SPI_getbinval(row, desc, 8, &isnull));
		kind->timeout_ms = DatumGetInt32(SPI_getbinval(row, desc, 9, &isnull));
		if (isnull)
			kind->timeout_ms = 0;
		kind->notify_steps = DatumGetBool(SPI_getbinval(row, desc, 10, &isnull));
		kind->step_sees_errors = DatumGetBool(SPI_getbinval(row, desc, 11, &isnull));
		kind->present = true;
	}
	kinds_stale = false;
}

/*
 * The kind named so, or NULL if it no longer exists.  Must be called inside
 * a transaction, with SPI connected.
 */
Kind *
kinds_lookup(const char *name)
{
	Kind	   *kind;

	if (kinds == NULL)
		kinds_init();
	if (kinds_stale)
		kinds_reload();
	kind = hash_search(kinds, name, HASH_FIND, NULL);
	if (kind == NULL)
	{
		/* created after our last reload, in a transaction we have not seen invalidated yet */
		kinds_reload();
		kind = hash_search(kinds, name, HASH_FIND, NULL);
	}
	return (kind && kind->present) ? kind : NULL;
}
