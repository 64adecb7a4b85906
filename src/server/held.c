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
 * The worker process uses this file, and the backend of an external
 * worker's connection (remote.c): where the calls run is the transport's
 * business (turn.c).
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "access/xlog.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "utils/hsearch.h"

static HTAB *held = NULL;
static MemoryContext held_cxt = NULL;
static pairingheap *waiting = NULL;
static int	my_worker = 0;

/*
 * Jobs that are due but held back by their endpoint's limit wait in a queue
 * per endpoint, in order; only a queue's head asks the limit again, so a
 * thousand blocked jobs cost one check, not a thousand.
 */
typedef struct EndpointQueue
{
	char		endpoint[ENDPOINT_LEN]; /* hash key */
	dlist_head	jobs;
	int			n;
	TimestampTz retry_at;		/* 0: when a slot frees (our latch is set) */
	double		latency_s;		/* recent call latency, to estimate waits */
	TimestampTz horizon;		/* when the last job sent back to the table is due */
} EndpointQueue;

static HTAB *queues = NULL;

/*
 * Jobs whose wait for a limit is too long to hold go back to the table.
 * Kept by id: a cancel may drop one before the next batch takes it.
 */
static int64 *to_release = NULL;
static int	nto_release = 0;
static int	max_to_release = 64;

static int
due_compare(const pairingheap_node *a, const pairingheap_node *b, void *arg)
{
	const HeldJob *x = pairingheap_const_container(HeldJob, heap_node, a);
	const HeldJob *y = pairingheap_const_container(HeldJob, heap_node, b);

	/* pairingheap keeps the greatest first; we want the earliest */
	return (x->not_before < y->not_before) - (x->not_before > y->not_before);
}

/*
 * When the worker exits (SIGTERM, a FATAL such as a function that ignored
 * jobloop.function_timeout, an ERROR outside any job), its calls die with
 * it: give their endpoints' concurrency slots back, or they would count as
 * in flight in shared memory until the server restarts.
 */
static void
give_back_limits(int code, Datum arg)
{
	HASH_SEQ_STATUS seq;
	HeldJob    *job;
	TimestampTz now = GetCurrentTimestamp();

	if (held == NULL)
		return;
	/* an error may have left one held (ShutdownPostgres, which frees them, runs after us) */
	LWLockReleaseAll();
	hash_seq_init(&seq, held);
	while ((job = hash_seq_search(&seq)) != NULL)
		if (job->phase == HELD_IN_FLIGHT && job->limit_tracked && job->request)
		{
			limits_release(job->request->endpoint, true, 0, 0, now);
			job->limit_tracked = false;
		}
}

void
held_init(int worker)
{
	HASHCTL		ctl;
	HASHCTL		qctl;

	my_worker = worker;
	held_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop held jobs", ALLOCSET_DEFAULT_SIZES);
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(HeldJob);
	ctl.hcxt = held_cxt;
	held = hash_create("jobloop held jobs", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	waiting = pairingheap_allocate(due_compare, NULL);

	qctl.keysize = ENDPOINT_LEN;
	qctl.entrysize = sizeof(EndpointQueue);
	qctl.hcxt = held_cxt;
	queues = hash_create("jobloop endpoint queues", 64, &qctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	to_release = MemoryContextAlloc(held_cxt, sizeof(int64) * max_to_release);
	before_shmem_exit(give_back_limits, (Datum) 0);
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
		transport->abort(job->transfer);
	else if (job->phase == HELD_RESPONDED && job->transfer)
		transport->done(job->transfer);
	else if (job->phase == HELD_WAITING)
		pairingheap_remove(waiting, &job->heap_node);
	else if (job->phase == HELD_BLOCKED)
	{
		dlist_delete(&job->queue_node);
		job->queue->n--;
	}
	if (job->phase == HELD_IN_FLIGHT && job->limit_tracked)
		limits_release(job->request->endpoint, true, 0, 0, GetCurrentTimestamp());
	job->limit_tracked = false;
	job->transfer = NULL;
	job->phase = HELD_IDLE;
}

/*
 * Take a freshly claimed job.  Returns NULL if we still hold it (our lease
 * lapsed, it was reaped, and we claimed it back): the copy we have goes on,
 * and if the job moved on meanwhile, its next update fails the step fence.
 */
HeldJob *
held_add(ClaimedJob *c)
{
	HeldJob    *job;
	bool		found;

	job = hash_search(held, &c->id, HASH_ENTER, &found);
	if (found)
		return NULL;			/* our copy goes on; its updates are fenced by step */
	job->kind = NULL;
	job->kind_name = MemoryContextStrdup(held_cxt, c->kind);
	job->owner = c->owner;
	job->tenant = c->tenant ? MemoryContextStrdup(held_cxt, c->tenant) : NULL;
	job->key_token = c->key_token ? MemoryContextStrdup(held_cxt, c->key_token) : NULL;
	job->step = c->step;
	job->committed_step = c->step;
	job->attempts = c->attempts;
	job->state = copy_jsonb(c->state);
	job->request_json = copy_jsonb(c->request);
	job->request = NULL;
	job->transfer = NULL;
	job->limit_tracked = false;
	job->transport_failed = false;
	job->queue = NULL;
	job->deferred = NULL;
	job->not_before = 0;
	job->phase = HELD_IDLE;
	return job;
}

/*
 * Take a waiting or blocked job out of its heap or queue (HELD_IDLE), for a
 * batch that is about to settle it otherwise (a pause lets go of it).
 */
void
held_unschedule(HeldJob *job)
{
	if (job->phase == HELD_WAITING || job->phase == HELD_BLOCKED)
		forget_transfer_and_wait(job);
}

/* Forget the jobs queued for release (DROP EXTENSION: their ids may be reused). */
void
held_forget_releases(void)
{
	nto_release = 0;
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
	if (job->key_token)
		pfree(job->key_token);
	if (job->state)
		pfree(job->state);
	if (job->request_json)
		pfree(job->request_json);
	request_free(job->request);
	if (job->deferred)
		pfree(job->deferred);	/* its pointer in batch.c's list is checked against the table */
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

static void park(HeldJob *job, LimitVerdict *v, TimestampTz now);

/* Start the job's call; the limit (v) has granted it. */
static void
start_call(HeldJob *job, LimitVerdict *v, TimestampTz now)
{
	char		key[128];
	int			timeout = job->kind && job->kind->timeout_ms > 0 ?
		job->kind->timeout_ms : jobloop_request_timeout;

	/*
	 * One key per (job, step), the same for every retry and re-send of the
	 * step, and after a restore, an upgrade or a failover: it is made of the
	 * job's random token, which travels with its row.  Jobs submitted before
	 * 0.3.0 have no token and keep the key they had.
	 */
	if (job->key_token)
		snprintf(key, sizeof(key), "jobloop-%s-%d", job->key_token, job->step);
	else
		snprintf(key, sizeof(key), "jobloop-" UINT64_FORMAT "-%u-" INT64_FORMAT "-%d",
				 GetSystemIdentifier(), MyDatabaseId, job->id, job->step);
	job->transfer = transport->start(job->request, key, timeout, job->transport_failed, job);
	if (job->transfer == NULL)
	{
		/* out of memory or handles: try again shortly, nothing is lost */
		limits_release(job->request->endpoint, v->tracked, 0, 0, now);
		job->not_before = now + 1000 * 1000;
		job->phase = HELD_WAITING;
		pairingheap_add(waiting, &job->heap_node);
		return;
	}
	job->limit_tracked = v->tracked;
	job->phase = HELD_IN_FLIGHT;
}

static void
send(HeldJob *job, TimestampTz now)
{
	LimitVerdict v;

	limits_acquire(job->request->endpoint, my_worker, now, &v);
	if (v.granted)
		start_call(job, &v, now);
	else
		park(job, &v, now);
}

static EndpointQueue *
queue_for(const char *endpoint)
{
	bool		found;
	EndpointQueue *q = hash_search(queues, endpoint, HASH_ENTER, &found);

	if (!found)
	{
		dlist_init(&q->jobs);
		q->n = 0;
		q->retry_at = 0;
		q->latency_s = 1.0;
		q->horizon = 0;
	}
	return q;
}

/*
 * How long the k-th job in an endpoint's queue can expect to wait: until
 * the pause ends, then k requests at the rate limit (where a ramp is
 * heading; this worker's share of it), or k / concurrency calls of the
 * usual latency.
 */
/* Time between two of this worker's requests to the endpoint, at its limit. */
static double
request_interval_s(EndpointQueue *q, LimitVerdict *v)
{
	int			workers = Max(jobloop_workers, 1);

	if (v->max_rate > 0)
		return workers / v->max_rate;
	if (v->max_concurrency > 0)
		return workers * q->latency_s / v->max_concurrency;
	return 0;
}

static double
expected_wait_s(EndpointQueue *q, LimitVerdict *v, int k, TimestampTz now)
{
	double		base = v->retry_at > now ? (double) (v->retry_at - now) / 1000000.0 : 0;

	return base + k * request_interval_s(q, v);
}

/*
 * Hold a due job back for its endpoint.  If its wait would be long, it goes
 * back to the table instead (due when we expect its turn), so jobs blocked
 * on one endpoint never fill the slots other endpoints' jobs need.
 */
static void
park(HeldJob *job, LimitVerdict *v, TimestampTz now)
{
	EndpointQueue *q = queue_for(job->request->endpoint);
	double		wait = expected_wait_s(q, v, q->n + 1, now);

	if (wait * 1000 > jobloop_hold_delay)
	{
		/* due one request-interval after the previous one sent back: they return in turn */
		double		interval_s = request_interval_s(q, v);

		q->horizon = Max(q->horizon, now + (TimestampTz) (wait * 1000000.0)) +
			(TimestampTz) (interval_s * 1000000.0);
		job->phase = HELD_IDLE;
		job->not_before = q->horizon;
		if (nto_release == max_to_release)
		{
			max_to_release *= 2;
			to_release = repalloc(to_release, max_to_release * sizeof(int64));
		}
		to_release[nto_release++] = job->id;
		return;
	}
	dlist_push_tail(&q->jobs, &job->queue_node);
	q->n++;
	if (q->n == 1 || v->retry_at == 0 || v->retry_at > q->retry_at)
		q->retry_at = v->retry_at;
	job->queue = q;
	job->phase = HELD_BLOCKED;
}

/* Let each endpoint queue's head ask its limit again; send what is granted. */
void
held_retry_blocked(TimestampTz now)
{
	HASH_SEQ_STATUS seq;
	EndpointQueue *q;

	hash_seq_init(&seq, queues);
	while ((q = hash_seq_search(&seq)) != NULL)
	{
		while (q->n > 0 && q->retry_at <= now)
		{
			HeldJob    *job = dlist_head_element(HeldJob, queue_node, &q->jobs);
			LimitVerdict v;

			limits_acquire(q->endpoint, my_worker, now, &v);
			if (!v.granted)
			{
				q->retry_at = v.retry_at;
				break;
			}
			dlist_delete(&job->queue_node);
			q->n--;
			job->queue = NULL;
			start_call(job, &v, now);
		}
	}
}

/* The earliest time a blocked endpoint queue wants to ask again; 0 if none. */
TimestampTz
held_next_blocked(void)
{
	HASH_SEQ_STATUS seq;
	EndpointQueue *q;
	TimestampTz next = 0;

	hash_seq_init(&seq, queues);
	while ((q = hash_seq_search(&seq)) != NULL)
	{
		/* waiting for a free slot: the freeing worker sets our latch; re-check each second anyway */
		TimestampTz t = q->retry_at > 0 ? q->retry_at : GetCurrentTimestamp() + 1000 * 1000;

		if (q->n > 0 && (next == 0 || t < next))
			next = t;
	}
	return next;
}

int
held_take_releases(HeldJob **out, int max)
{
	int			taken = Min(nto_release, max);
	int			n = 0;

	for (int i = 0; i < taken; i++)
	{
		HeldJob    *job = held_find(to_release[i]);

		if (job && job->phase == HELD_IDLE)
			out[n++] = job;
	}
	memmove(to_release, to_release + taken, (nto_release - taken) * sizeof(int64));
	nto_release -= taken;
	return n;
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
		Transfer   *xfer = transport->next_finished(&owner, &result);
		HeldJob    *job = owner;

		if (xfer == NULL)
			break;
		job->phase = HELD_RESPONDED;
		job->result = result;
		out[n++] = job;
		limits_release(job->request->endpoint, job->limit_tracked, result.status,
					   (result.status == 429 || result.status == 503) ?
					   response_retry_after_ms(&result) : -1,
					   GetCurrentTimestamp());
		job->limit_tracked = false;
		{
			EndpointQueue *q = hash_search(queues, job->request->endpoint, HASH_FIND, NULL);

			if (q)
				q->latency_s = 0.8 * q->latency_s + 0.2 * (double) result.elapsed_ms / 1000.0;
		}
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

