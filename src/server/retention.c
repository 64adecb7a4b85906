/*-------------------------------------------------------------------------
 *
 * retention.c
 *		Retention of finished jobs, at each heartbeat of a worker.
 *
 * From 0.4.0 a job moves to jobloop.finished_job when it finishes, a table
 * partitioned by finished_at; retention drops whole partitions, whatever
 * they hold, instead of deleting rows.  The partitions are made and dropped
 * by jobloop.maintain_finished_partitions() (the 0.4.0 update script), in a
 * short transaction of its own -- never inside a batch, whose transaction
 * runs users' functions and would hold the DDL's locks for as long -- and
 * by one worker of the database at a time; the others skip it.  Every lock
 * it takes is waited for at most 100 ms, so a worker never queues behind a
 * long reader of finished_job and stalls every other worker's finish; what
 * could not be done is tried again at the next heartbeat.  What the
 * partitions do not cover (finished jobs still in jobloop.job from before
 * 0.4.0, rows in the default partition) is deleted row by row, in another
 * transaction (store_delete_expired).
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#define RETENTION_BATCH			1000
#define RETENTION_ROUNDS		20

static void
maintain_partitions(void)
{
	static SPIPlanPtr plan = NULL;
	static bool busy_logged = false;
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(jobloop_retention)};
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	int			created;
	int			dropped;
	int64		dropped_jobs;
	int			busy;

	/* one worker of the database at a time; the others skip it */
	if (!store_has_finished_jobs() || !store_try_worker_lock(JOBLOOP_LOCK_PARTITIONS))
		return;
	store_run_plan(&plan,
				   "SELECT created, dropped, dropped_jobs, busy"
				   "  FROM jobloop.maintain_finished_partitions(make_interval(secs => $1))",
				   1, types, values, NULL, SPI_OK_SELECT);
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	created = DatumGetInt32(SPI_getbinval(row, desc, 1, &isnull));
	dropped = DatumGetInt32(SPI_getbinval(row, desc, 2, &isnull));
	dropped_jobs = DatumGetInt64(SPI_getbinval(row, desc, 3, &isnull));
	busy = DatumGetInt32(SPI_getbinval(row, desc, 4, &isnull));
	if (dropped > 0)
		elog(LOG, "jobloop worker %d dropped %d partitions of finished jobs (" INT64_FORMAT " jobs)",
			 my_worker_number, dropped, dropped_jobs);
	else if (created > 0)
		elog(DEBUG1, "jobloop worker %d made %d partitions of finished jobs", my_worker_number, created);
	/* once per busy spell: a long reader may keep a partition for many heartbeats */
	if (busy > 0 && !busy_logged)
		elog(LOG, "jobloop worker %d could not lock jobloop.finished_job within 100 ms to make or drop "
			 "%d partitions; it tries again at each heartbeat", my_worker_number, busy);
	busy_logged = busy > 0;
}

static void
delete_expired(void)
{
	if (jobloop_retention <= 0)
		return;
	/* keep up with up to RETENTION_ROUNDS batches per heartbeat */
	for (int r = 0; r < RETENTION_ROUNDS; r++)
		if (store_delete_expired(RETENTION_BATCH) < RETENTION_BATCH)
			break;
}

/*
 * Run fn in a transaction of its own.  An error is logged and the worker
 * goes on: retention is tried again at the next heartbeat, and must never
 * take the job loop down with it.
 */
static void
in_own_transaction(void (*fn) (void))
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		PushActiveSnapshot(GetTransactionSnapshot());
		if (store_extension_state(true) == EXTENSION_READY)
			fn();
		PopActiveSnapshot();
		SPI_finish();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("jobloop worker %d could not apply retention: %s", my_worker_number, edata->message),
				 errhint("It tries again at its next heartbeat.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
}

/* At each heartbeat, after the batch has committed. */
void
retention_run(void)
{
	pgstat_report_activity(STATE_RUNNING, "jobloop: retention");
	in_own_transaction(maintain_partitions);
	in_own_transaction(delete_expired);
	pgstat_report_activity(STATE_IDLE, NULL);
}
