/*-------------------------------------------------------------------------
 *
 * held.c
 *		The jobs a worker holds, in memory, between transactions.
 *
 * A held job is always in one of four phases: waiting for its time (a
 * delay_ms or a retry backoff; kept in a pairing heap by due time), in
 * flight (a curl transfer runs), responded (its result waits for the next
 * batch transaction), or idle while that transaction advances it.  All held jobs count against
 * jobloop.max_in_flight.  Their memory (state, request) lives in one
 * context and is freed when replaced, so it does not grow with history.
 *
 * Only the worker process uses this file.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "access/xlog.h"
#include "miscadmin.h"
#include "utils/hsearch.h"

static HTAB *held = NULL;
static MemoryContext held_cxt = NULL;
static pairingheap *waiting = NULL;

static int
due_compare(const pairingheap_node *a, const pairingheap_node *b, void *arg)
{
	const HeldJob *x = pairingheap_const_container(HeldJob, heap_node, a);
	const HeldJob *y = pairingheap_const_container(HeldJob, heap_node, b);

	/* pairingheap keeps the greatest first; we want the earliest */
	return (x->not_before < y->not_before) - (x->not_before > y->not_before);
}

void
held_init(void)
{
	HASHCTL		ctl;

	held_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop held jobs", ALLOCSET_DEFAULT_SIZES);
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(HeldJob);
	ctl.hcxt = held_cxt;
	held = hash_create("jobloop held jobs", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	waiting = pairingheap_allocate(due_compare, NULL);
}

MemoryContext
held_context(void)
{
	return held_cxt;
}

static Jsonb *
copy_jsonb(Jsonb *jb)
{
	Jsonb	   *copy;

	if (jb == NULL)
		return NULL;
	copy = MemoryContextAlloc(held_cxt, VARSIZE(jb));
	memcpy(copy, jb, VARSIZE(jb));
	return copy;
}

static void
forget_transfer_and_wait(HeldJob *job)
{
	if (job->phase == HELD_IN_FLIGHT && job->transfer)
		http_abort(job->transfer);
	else if (job->phase == HELD_RESPONDED && job->transfer)
		http_done(job->transfer);
	else if (job->phase == HELD_WAITING)
		pairingheap_remove(waiting, &job->heap_node);
	job->transfer = NULL;
}

/*
 * Take a freshly claimed job.  If we still hold a stale copy (our lease
 * lapsed and we reclaimed it), the claim is the truth: drop the copy.
 */
HeldJob *
held_add(ClaimedJob *c)
{
	HeldJob    *job;
	bool		found;

	job = hash_search(held, &c->id, HASH_FIND, NULL);
	if (job)
		held_drop(job);
	job = hash_search(held, &c->id, HASH_ENTER, &found);
	job->kind = NULL;
	job->kind_name = MemoryContextStrdup(held_cxt, c->kind);
	job->owner = c->owner;
	job->tenant = c->tenant ? MemoryContextStrdup(held_cxt, c->tenant) : NULL;
	job->step = c->step;
	job->attempts = c->attempts;
	job->state = copy_jsonb(c->state);
	job->request_json = copy_jsonb(c->request);
	job->request = NULL;
	job->transfer = NULL;
	job->not_before = 0;
	job->phase = HELD_IDLE;
	return job;
}

HeldJob *
held_find(int64 id)
{
	return hash_search(held, &id, HASH_FIND, NULL);
}

void
held_drop(HeldJob *job)
{
	forget_transfer_and_wait(job);
	pfree(job->kind_name);
	if (job->tenant)
		pfree(job->tenant);
	if (job->state)
		pfree(job->state);
	if (job->request_json)
		pfree(job->request_json);
	request_free(job->request);
	hash_search(held, &job->id, HASH_REMOVE, NULL);
}

int
held_count(void)
{
	return (int) hash_get_num_entries(held);
}

void
held_set_state(HeldJob *job, Jsonb *state)
{
	Jsonb	   *copy = copy_jsonb(state);

	if (job->state)
		pfree(job->state);
	job->state = copy;
}

void
held_set_request(HeldJob *job, Jsonb *request_json, HttpRequest *request)
{
	if (job->request_json != request_json)
	{
		Jsonb	   *copy = copy_jsonb(request_json);

		if (job->request_json)
			pfree(job->request_json);
		job->request_json = copy;
	}
	if (job->request != request)
	{
		request_free(job->request);
		job->request = request;
	}
}

/* Wait until not_before, then send the job's request. */
void
held_schedule(HeldJob *job, TimestampTz not_before)
{
	forget_transfer_and_wait(job);
	job->not_before = not_before;
	job->phase = HELD_WAITING;
	pairingheap_add(waiting, &job->heap_node);
}

TimestampTz
held_next_due(void)
{
	if (pairingheap_is_empty(waiting))
		return 0;
	return pairingheap_container(HeldJob, heap_node, pairingheap_first(waiting))->not_before;
}

static void
send(HeldJob *job, TimestampTz now)
{
	char		key[128];
	int			timeout = job->kind && job->kind->timeout_ms > 0 ?
		job->kind->timeout_ms : jobloop_request_timeout;

	/* unique per (cluster, database, job, step); retries of a step reuse it */
	snprintf(key, sizeof(key), "jobloop-" UINT64_FORMAT "-%u-" INT64_FORMAT "-%d",
			 GetSystemIdentifier(), MyDatabaseId, job->id, job->step);
	job->transfer = http_start(job->request, key, timeout, job);
	if (job->transfer == NULL)
	{
		/* out of memory or handles: try again shortly, nothing is lost */
		job->not_before = now + 1000 * 1000;
		pairingheap_add(waiting, &job->heap_node);
		return;
	}
	job->phase = HELD_IN_FLIGHT;
}

/* Send every waiting job whose time has come. */
void
held_send_due(TimestampTz now)
{
	while (!pairingheap_is_empty(waiting))
	{
		HeldJob    *job = pairingheap_container(HeldJob, heap_node, pairingheap_first(waiting));

		if (job->not_before > now)
			break;
		(void) pairingheap_remove_first(waiting);
		send(job, now);
	}
}

/* Move finished transfers to the responded phase; returns how many. */
int
held_collect_responses(HeldJob **out, int max)
{
	int			n = 0;

	while (n < max)
	{
		void	   *owner;
		HttpResult	result;
		Transfer   *xfer = http_next_finished(&owner, &result);
		HeldJob    *job = owner;

		if (xfer == NULL)
			break;
		job->phase = HELD_RESPONDED;
		job->result = result;
		out[n++] = job;
	}
	return n;
}

int
held_all(HeldJob **out, int max)
{
	HASH_SEQ_STATUS seq;
	HeldJob    *job;
	int			n = 0;

	hash_seq_init(&seq, held);
	while ((job = hash_seq_search(&seq)) != NULL)
	{
		if (n < max)
			out[n++] = job;
	}
	return n;
}
