/*-------------------------------------------------------------------------
 *
 * stats.c
 *		What each worker reports about itself, for jobloop.worker_stats.
 *
 * Each worker writes only its own slot's stats, under the slot's spinlock,
 * once per batch; readers take the same spinlock to copy a consistent
 * snapshot.  Step rates come from a ring of per-second step counts.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(jobloop_worker_stats);

static void
add_steps(WorkerStats *s, int steps, TimestampTz now)
{
	int64		second = now / USECS_PER_SEC;
	int			b = (int) (second % STATS_SECONDS);

	if (s->second[b] != second)
	{
		s->second[b] = second;
		s->steps_in_second[b] = 0;
	}
	s->steps_in_second[b] += steps;
}

/* Steps per second over the last `seconds` complete seconds. */
static double
step_rate(WorkerStats *s, int seconds, TimestampTz now)
{
	int64		current = now / USECS_PER_SEC;
	int64		total = 0;

	for (int b = 0; b < STATS_SECONDS; b++)
		if (s->second[b] < current && s->second[b] >= current - seconds)
			total += s->steps_in_second[b];
	return (double) total / seconds;
}

void
stats_record_batch(int worker, int steps, int completed, int failed, int retries,
				   double claim_ms, double commit_ms)
{
	WorkerSlot *slot = shared_slot(worker);
	TimestampTz now = GetCurrentTimestamp();

	if (slot == NULL)
		return;
	SpinLockAcquire(&slot->mutex);
	slot->stats.steps += steps;
	slot->stats.completed += completed;
	slot->stats.failed += failed;
	slot->stats.retries += retries;
	slot->stats.batches++;
	if (claim_ms >= 0)
		slot->stats.claim_ms = slot->stats.claim_ms == 0 ? claim_ms : 0.9 * slot->stats.claim_ms + 0.1 * claim_ms;
	slot->stats.commit_ms = slot->stats.commit_ms == 0 ? commit_ms : 0.9 * slot->stats.commit_ms + 0.1 * commit_ms;
	add_steps(&slot->stats, steps, now);
	SpinLockRelease(&slot->mutex);
}

void
stats_record_load(int worker, int held, int in_flight)
{
	WorkerSlot *slot = shared_slot(worker);
	TimestampTz now = GetCurrentTimestamp();

	if (slot == NULL)
		return;
	SpinLockAcquire(&slot->mutex);
	slot->stats.held = held;
	slot->stats.in_flight = in_flight;
	slot->stats.last_turn = now;
	SpinLockRelease(&slot->mutex);
}

/*
 * The fewest jobs another worker of this database holds, among those that
 * have room for more (fewer than max_held) and finished a turn within the
 * last active_ms; -1 if there is no such worker.
 */
int
stats_least_held_peer(int worker, int max_held, int64 active_ms)
{
	TimestampTz since = GetCurrentTimestamp() - active_ms * 1000;
	int			least = -1;

	/* background and external workers alike: they share the same jobs */
	for (int w = 1; shared_slot(w) != NULL; w++)
	{
		WorkerSlot *slot = shared_slot(w);
		int			held;
		bool		candidate;

		if (w == worker || slot == NULL)
			continue;
		SpinLockAcquire(&slot->mutex);
		held = slot->stats.held;
		candidate = slot->pid != 0 && slot->database == MyDatabaseId &&
			slot->stats.last_turn >= since && held < max_held;
		SpinLockRelease(&slot->mutex);
		if (candidate && (least < 0 || held < least))
			least = held;
	}
	return least;
}

/* jobloop.worker_stats(): one row per running worker, in any database. */
Datum
jobloop_worker_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	for (int w = 1; shared_slot(w) != NULL; w++)
	{
		WorkerSlot *slot = shared_slot(w);
		WorkerStats s;
		pid_t		pid;
		char		database[NAMEDATALEN];
		bool		external;
		char		host[sizeof(slot->host)];
		int32		remote_pid;
		Datum		values[16];
		bool		nulls[16] = {0};

		SpinLockAcquire(&slot->mutex);
		pid = slot->pid;
		s = slot->stats;
		strlcpy(database, slot->database_name, NAMEDATALEN);
		external = slot->external;
		strlcpy(host, slot->host, sizeof(host));
		remote_pid = slot->remote_pid;
		SpinLockRelease(&slot->mutex);
		if (pid == 0)
			continue;

		values[0] = Int32GetDatum(w);
		values[1] = Int32GetDatum(pid);
		values[2] = CStringGetTextDatum(database);
		values[3] = TimestampTzGetDatum(s.started_at);
		values[4] = Int32GetDatum(s.held);
		values[5] = Int32GetDatum(s.in_flight);
		values[6] = Int64GetDatum(s.steps);
		values[7] = Float8GetDatum(step_rate(&s, 10, now));
		values[8] = Float8GetDatum(step_rate(&s, 60, now));
		values[9] = Int64GetDatum(s.completed);
		values[10] = Int64GetDatum(s.failed);
		values[11] = Int64GetDatum(s.retries);
		values[12] = Float8GetDatum(s.claim_ms);
		values[13] = Float8GetDatum(s.commit_ms);
		/* 0.5.0 added where an external worker runs; a 0.4.0 schema has 14 columns */
		values[14] = external ? CStringGetTextDatum(host) : (Datum) 0;
		nulls[14] = !external;
		values[15] = Int32GetDatum(remote_pid);
		nulls[15] = !external;
		Assert(rsinfo->setDesc->natts == 14 || rsinfo->setDesc->natts == 16);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
