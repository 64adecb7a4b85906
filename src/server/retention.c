/*-------------------------------------------------------------------------
 *
 * retention.c
 *		Retention of finished jobs, at each heartbeat of a worker.
 *
 * From 0.5.0 a job moves to jobloop.finished_job when it finishes, a table
 * partitioned by finished_at; retention drops whole partitions, whatever
 * they hold, instead of deleting rows.  The partitions are made, detached
 * and dropped by jobloop.maintain_finished_partitions_step() (the 0.5.0
 * update script), one action per short transaction of its own -- never
 * inside a batch, whose transaction runs users' functions and would hold
 * the DDL's locks for as long, and never two actions in one, since each may
 * take an ACCESS EXCLUSIVE lock on finished_job -- and by one worker of the
 * database at a time; the others skip it.  Every lock it takes is waited
 * for at most 100 ms, so a worker never queues behind a long reader of
 * finished_job and stalls every other worker's finish; what could not be
 * done is tried again at the next heartbeat.  What the
 * partitions do not cover (finished jobs still in jobloop.job from before
 * 0.5.0, rows in the default partition) is deleted row by row, in another
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

/* at most this many partition actions per heartbeat (one transaction each) */
#define PARTITION_ACTIONS		16

/* Log what one partition action did; false if it did nothing (busy, failed, nothing to do). */
static bool
report_partition_action(const char *action, const char *status, const char *partition, int64 jobs)
{
	if (strcmp(status, "made") == 0)
		elog(DEBUG1, "jobloop worker %d made partition %s of finished jobs", my_worker_number, partition);
	else if (strcmp(status, "detached") == 0)
		elog(DEBUG1, "jobloop worker %d detached expired partition %s of finished jobs",
			 my_worker_number, partition);
	else if (strcmp(status, "dropped") == 0)
		elog(LOG, "jobloop worker %d dropped expired partition %s of finished jobs (" INT64_FORMAT " jobs)",
			 my_worker_number, partition, jobs);
	else
		return false;
	return true;
}

/*
 * One step of partition maintenance, in the caller's transaction: the
 * action after the first *skip due, or none (false).  A step that did
 * nothing (a lock not free within 100 ms, an error it logged as a WARNING,
 * nothing left to do) is skipped by the next steps of this heartbeat, so
 * one stuck partition does not hold up the others.
 */
static bool partition_step_more;
static int	partition_step_skip;
static bool partition_busy_logged;

static void
partition_step(void)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(jobloop_retention), Int32GetDatum(partition_step_skip)};
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	char	   *action;
	char	   *status;
	char	   *partition;
	int64		jobs;

	partition_step_more = false;
	/* one worker of the database at a time (until this transaction ends); the others skip it */
	if (!store_has_finished_jobs() || !store_try_worker_lock(JOBLOOP_LOCK_PARTITIONS))
		return;
	store_run_plan(&plan,
				   "SELECT action, status, partition::text, jobs"
				   "  FROM jobloop.maintain_finished_partitions_step(make_interval(secs => $1), now(), $2)",
				   2, types, values, NULL, SPI_OK_SELECT);
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	(void) SPI_getbinval(row, desc, 1, &isnull);
	if (isnull)
	{
		partition_busy_logged = false;	/* nothing due: whatever was busy is done */
		return;
	}
	action = SPI_getvalue(row, desc, 1);
	status = SPI_getvalue(row, desc, 2);
	partition = SPI_getvalue(row, desc, 3);
	jobs = DatumGetInt64(SPI_getbinval(row, desc, 4, &isnull));
	partition_step_more = true;
	if (!report_partition_action(action, status, partition ? partition : "(none)", isnull ? 0 : jobs))
	{
		partition_step_skip++;
		/* once per busy spell: a long reader may hold finished_job for many heartbeats */
		if (strcmp(status, "busy") == 0 && !partition_busy_logged)
		{
			/* make and detach lock finished_job; drop only the detached table */
			if (strcmp(action, "drop") == 0)
				elog(LOG, "jobloop worker %d could not lock expired partition %s within 100 ms to drop it; "
					 "it tries again at each heartbeat", my_worker_number, partition ? partition : "(none)");
			else
				elog(LOG, "jobloop worker %d could not lock jobloop.finished_job within 100 ms to %s a partition; "
					 "it tries again at each heartbeat", my_worker_number, action);
			partition_busy_logged = true;
		}
	}
	else
		partition_busy_logged = false;
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

	/*
	 * One partition action per transaction: each may take an ACCESS
	 * EXCLUSIVE lock on finished_job, held until its transaction ends, and
	 * the next must not run under it.
	 */
	partition_step_skip = 0;
	for (int i = 0; i < PARTITION_ACTIONS; i++)
	{
		in_own_transaction(partition_step);
		if (!partition_step_more)
			break;
	}
	in_own_transaction(delete_expired);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * An external worker's share of retention (jobloop.worker_maintain(),
 * remote.c): the same actions, one per call, in the caller's transaction
 * with SPI connected -- jobloop-worker calls again while this says there
 * is more, so that each ACCESS EXCLUSIVE lock is its own transaction's.  A
 * round runs at most every lease_timeout / 3, as a background worker's at
 * its heartbeat; a call between rounds does nothing.
 */
bool
retention_step_in_caller(void)
{
	static TimestampTz next_round = 0;
	static bool in_round = false;
	static int	actions = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (!in_round)
	{
		if (now < next_round)
			return false;
		in_round = true;
		actions = 0;
		partition_step_skip = 0;
		next_round = now + (TimestampTz) jobloop_lease_timeout * 1000 * 1000 / 3;
	}
	if (store_extension_state(true) != EXTENSION_READY)
	{
		in_round = false;
		return false;
	}
	if (actions < PARTITION_ACTIONS)
	{
		partition_step();
		actions = partition_step_more ? actions + 1 : PARTITION_ACTIONS;
		return true;
	}
	delete_expired();
	in_round = false;
	return false;
}
