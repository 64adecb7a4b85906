/*-------------------------------------------------------------------------
 *
 * turn.c
 *		One turn of a worker: the database side of everything that
 *		happened since the last turn, in one batch transaction.
 *
 * A turn takes the cancels posted to the worker's slot, the results of the
 * calls that finished, the jobs whose delay is over and those a limit
 * parked; on a heartbeat it renews leases; when there is room it claims;
 * and it hands all of that to one batch (batch.c), which runs the business
 * logic, writes, commits and then starts the next calls.
 *
 * The same turn serves both kinds of worker.  A background worker runs it
 * after each wait of its loop (worker.c), its calls carried by the engine
 * in its own process (local_transport).  An external worker, jobloop-worker
 * on any machine, runs it through jobloop.worker_turn() in the backend of
 * its connection (remote.c), its calls carried over that connection
 * (remote_transport).  The transport is the only difference.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#define MAX_RESPONSES_PER_BATCH		512

const Transport local_transport = {
	http_start, http_abort, http_next_finished, http_done, http_in_flight
};
const Transport *transport = &local_transport;

static int	my_worker;
static TimestampTz next_heartbeat = 0;
static TimestampTz last_heartbeat = 0;
static HeldJob **responded;
static HeldJob **parked;

void
turn_init(int worker)
{
	my_worker = worker;
	my_worker_number = worker;
	responded = MemoryContextAlloc(TopMemoryContext, MAX_RESPONSES_PER_BATCH * sizeof(HeldJob *));
	parked = MemoryContextAlloc(TopMemoryContext, MAX_RESPONSES_PER_BATCH * sizeof(HeldJob *));
	next_heartbeat = 0;
}

/*
 * Drop the jobs cancelled since the last turn, aborting their calls.  The
 * returned ids are released in the next batch: cancel() already freed the
 * row, unless its transaction rolled back, in which case the job goes back
 * to the table to be resumed.
 */
static int
take_cancels(int64 *ids, int max, bool *rescan)
{
	bool		overflow;
	int			n = shared_take_cancels(my_worker, ids, max, &overflow);

	for (int i = 0; i < n; i++)
	{
		HeldJob    *job = held_find(ids[i]);

		if (job)
			held_drop(job);
	}
	*rescan = *rescan || overflow;
	return n;
}

/*
 * Run a turn.  *batched says whether a batch ran (the caller reports table
 * statistics then).  False if the extension was dropped: the jobs held are
 * gone with their table (see worker.c, start_over).
 */
bool
turn_run(bool *batched)
{
	TimestampTz now = GetCurrentTimestamp();
	int64		cancels[CANCEL_QUEUE_SIZE];
	bool		rescan = false;
	int			ncancels;
	int			nresponded;
	int			nparked;
	bool		heartbeat;
	bool		claim;

	*batched = false;
	ncancels = take_cancels(cancels, lengthof(cancels), &rescan);
	nresponded = held_collect_responses(responded, MAX_RESPONSES_PER_BATCH);

	held_retry_blocked(now);
	held_send_due(now);
	nparked = held_take_releases(parked, MAX_RESPONSES_PER_BATCH);

	heartbeat = now >= next_heartbeat;
	claim = held_count() < jobloop_max_in_flight &&
		(batch_claim_wanted || now >= batch_next_claim_at);
	if (nresponded > 0 || ncancels > 0 || nparked > 0 || rescan || heartbeat || claim ||
		batch_has_deferred())
	{
		if (!batch_run(responded, nresponded, cancels, ncancels, parked, nparked,
					   claim, heartbeat, rescan))
			return false;
		*batched = true;
	}
	if (heartbeat)
	{
		last_heartbeat = now;
		next_heartbeat = now + (TimestampTz) jobloop_lease_timeout * 1000 * 1000 / 3;
	}
	held_send_due(GetCurrentTimestamp());
	return true;
}

/*
 * Milliseconds until the next turn must run even if nothing happens: the
 * next due job, the next heartbeat, the next claim; capped at a minute.
 * (A background worker also wakes for curl's timer, worker.c.)
 */
long
turn_wait_ms(TimestampTz now)
{
	TimestampTz next = next_heartbeat;
	TimestampTz t;

	if ((t = held_next_due()) != 0 && t < next)
		next = t;
	if ((t = held_next_blocked()) != 0 && t < next)
		next = t;
	if (held_count() < jobloop_max_in_flight && batch_next_claim_at < next)
		next = batch_next_claim_at;
	/* an update deferred by a row lock: try again soon, without spinning */
	if (batch_has_deferred() && now + 10 * 1000 < next)
		next = now + 10 * 1000;
	if (next <= now)
		return 0;
	return (long) Min((next - now + 999) / 1000, 60000);
}

/*
 * Could the leases of the jobs we hold have run out?  Every job's lease
 * was renewed (or taken) at the last heartbeat or later, for
 * jobloop.lease_timeout: after that, another worker may have taken it.
 */
bool
turn_leases_may_have_lapsed(TimestampTz now)
{
	return held_count() > 0 && last_heartbeat != 0 &&
		now > last_heartbeat + (TimestampTz) jobloop_lease_timeout * USECS_PER_SEC;
}
