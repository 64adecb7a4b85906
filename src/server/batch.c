/*-------------------------------------------------------------------------
 *
 * batch.c
 *		The worker's transaction: advance every job whose call finished,
 *		renew leases, claim new jobs -- then commit, then act.
 *
 * Order matters for the crash model.  Inside the transaction, each job's
 * business logic (step, done, request) runs in its own subtransaction so an
 * error fails that job alone; the results of all jobs are written with one
 * UPDATE; the commit makes them durable; only then are the next requests
 * sent.  A crash at any point therefore leaves each job at its last
 * committed step, and the step is redone (at least once, with the same
 * Idempotency-Key), never counted twice.
 *
 * Subtransactions that write get their own XIDs, and more than 64 of those
 * in one transaction overflow the subxid cache in PGPROC, which slows every
 * snapshot in the cluster.  So the batch commits early whenever it has
 * used MAX_WRITING_SUBXACTS of them (only business logic that writes can
 * make that happen).
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <math.h>

#include "access/xact.h"
#include "common/pg_prng.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/proc.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timeout.h"


#define MAX_WRITING_SUBXACTS	60
/*
 * A turn claims at most its worker's share of MAX_CLAIM jobs, and none while
 * the worker is a whole share ahead of another worker of its database that
 * has room and is turning: the workers, all woken by the same submit, split
 * a burst of new jobs between them instead of the first one awake taking it
 * all (two workers on two cores at L ~ 0: 12,800 steps/s with one holding
 * every job, 26,000 split; and half the memory per worker).  A worker whose
 * peer stops turning (a long business-logic call) stops waiting for it
 * after BALANCE_ACTIVE_MS.
 */
#define MAX_CLAIM				1000
#define BALANCE_ACTIVE_MS		3000	/* 3 x an idle worker's claim interval */
#define BALANCE_RETRY_MS		20	/* 100 paced a 10,000-job batch start at 500 jobs per 100 ms */
#define IDLE_CLAIM_INTERVAL_MS	1000

bool		batch_claim_wanted = true;
int			my_worker_number = 0;
TimestampTz batch_next_claim_at = 0;

/* What to do with a job once the transaction has committed. */
typedef enum AfterCommit
{
	AFTER_SEND,					/* send its request at not_before */
	AFTER_DROP,					/* forget it: finished, released, or lost */
	AFTER_KEEP					/* keep it waiting: its update is deferred */
} AfterCommit;

typedef struct Pending
{
	HeldJob    *job;
	AfterCommit after;
	TimestampTz not_before;
	int			update;			/* index into updates, or -1 */
	const char *notify_status;	/* notify when the update applies */
} Pending;

/*
 * An update that found its row locked, kept to be retried next turn.  Until
 * it applies the job waits: its next request must not leave before its
 * state is durable.
 */
typedef struct Deferred
{
	JobUpdate	update;			/* state and request point into the held job */
	AfterCommit after;
	TimestampTz not_before;
	const char *notify_status;
} Deferred;

static HeldJob **deferred_jobs = NULL;
static int	ndeferred = 0;
static int	max_deferred = 0;

static MemoryContext batch_cxt = NULL;
static Pending *pendings = NULL;
static JobUpdate *updates = NULL;
static int	npendings = 0;
static int	nupdates = 0;
static int	capacity = 0;
static int	writing_subxacts = 0;

/* what this batch did, for stats */
static int	n_steps = 0;
static int	n_completed = 0;
static int	n_failed = 0;
static int	n_retries = 0;
static double claim_ms = -1;
static TimestampTz next_reap = 0;	/* see batch_run */
static TimestampTz next_fold = 0;	/* see batch_run */

#define CLAIM_TURN_RETRY_MS		20

/* ---- transaction scaffolding ---- */

/*
 * An external worker's turn runs inside the transaction of its call to
 * jobloop.worker_turn() (remote.c): then "commit" ends a stretch of the
 * batch without committing, and the calls it starts leave only with the
 * reply, which jobloop-worker sees only once that transaction committed.
 * If it aborts instead, remote.c makes the session unusable, since the
 * held jobs in its memory no longer match the table.
 */
bool		batch_in_caller_transaction = false;

static void
begin_transaction(void)
{
	if (!batch_in_caller_transaction)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(batch_cxt);
	writing_subxacts = 0;
}

static void
ensure_capacity(int n)
{
	if (npendings + n <= capacity)
		return;
	capacity = Max(capacity * 2, npendings + n);
	pendings = repalloc(pendings, capacity * sizeof(Pending));
	updates = repalloc(updates, capacity * sizeof(JobUpdate));
}

static Pending *
add_pending(HeldJob *job, AfterCommit after, TimestampTz not_before)
{
	Pending    *p;

	ensure_capacity(1);
	p = &pendings[npendings++];
	p->job = job;
	p->after = after;
	p->not_before = not_before;
	p->update = -1;
	p->notify_status = NULL;
	return p;
}

static JobUpdate *
add_update(Pending *p, const char *status)
{
	JobUpdate  *u = &updates[nupdates];
	HeldJob    *job = p->job;

	p->update = nupdates++;
	memset(u, 0, sizeof(*u));
	u->id = job->id;
	u->from_step = job->committed_step;
	u->status = status;
	u->step = job->step;
	u->state = job->state;
	u->request = strcmp(status, "running") == 0 ? job->request_json : NULL;
	u->attempts = job->attempts;
	u->release = strcmp(status, "running") != 0;
	return u;
}

static void
defer(Pending *p, JobUpdate *u)
{
	HeldJob    *job = p->job;
	Deferred   *d = job->deferred;

	if (d == NULL)
		d = job->deferred = MemoryContextAllocZero(held_context(), sizeof(Deferred));
	else if (d->update.last_error)
		pfree((char *) d->update.last_error);
	d->update = *u;
	if (u->last_error)
		d->update.last_error = MemoryContextStrdup(held_context(), u->last_error);
	d->after = p->after;
	d->not_before = p->not_before;
	d->notify_status = p->notify_status;
	if (ndeferred == max_deferred)
	{
		max_deferred = Max(16, max_deferred * 2);
		deferred_jobs = deferred_jobs ?
			repalloc(deferred_jobs, max_deferred * sizeof(HeldJob *)) :
			MemoryContextAlloc(TopMemoryContext, max_deferred * sizeof(HeldJob *));
	}
	deferred_jobs[ndeferred++] = job;
}

bool
batch_has_deferred(void)
{
	return ndeferred > 0;
}

/* Queue again the updates that found their rows locked last time. */
static void
retry_deferred(void)
{
	HeldJob   **jobs;
	int			n = ndeferred;

	if (n == 0)
		return;
	jobs = palloc(n * sizeof(HeldJob *));
	memcpy(jobs, deferred_jobs, n * sizeof(HeldJob *));
	ndeferred = 0;
	for (int i = 0; i < n; i++)
	{
		HeldJob    *job = jobs[i];
		Deferred   *d = job->deferred;
		Pending    *p;

		if (held_find(job->id) != job || d == NULL)
			continue;			/* dropped meanwhile (a cancel) */
		/* a pause that began meanwhile: go back to the table instead of sending */
		if (d->after == AFTER_SEND && pause_covers(job->kind_name, job->tenant))
		{
			d->after = AFTER_DROP;
			d->update.release = true;
			d->update.run_after = Max(d->not_before, GetCurrentTimestamp());
		}
		p = add_pending(job, d->after, d->not_before);
		p->notify_status = d->notify_status;
		p->update = nupdates;
		updates[nupdates++] = d->update;
		if (d->update.last_error)
			updates[p->update].last_error = pstrdup(d->update.last_error);
		job->deferred = NULL;
		if (d->update.last_error)
			pfree((char *) d->update.last_error);
		pfree(d);
	}
}

/* Write, commit, then act: send what is due, forget what is gone. */
static void
commit_and_act(void)
{
	bool	   *applied = palloc(Max(nupdates, 1) * sizeof(bool));
	TimestampTz now;

	bool	   *ours = palloc(Max(nupdates, 1) * sizeof(bool));
	int64	   *lost = palloc(Max(nupdates, 1) * sizeof(int64));
	int			nlost = 0;

	if (store_update_jobs(updates, nupdates, applied) < nupdates)
		store_still_ours(updates, applied, nupdates, ours);
	for (int i = 0; i < npendings; i++)
	{
		Pending    *p = &pendings[i];

		if (p->update < 0)
			continue;
		if (!applied[p->update] && ours[p->update])
		{
			defer(p, &updates[p->update]);
			p->after = AFTER_KEEP;
			continue;
		}
		if (!applied[p->update])
		{
			/* cancelled, or moved on without us: forget our copy */
			p->after = AFTER_DROP;
			lost[nlost++] = p->job->id;
			continue;
		}
		p->job->committed_step = p->job->step;
		if (p->notify_status)
			notify_job(p->job->id, p->notify_status, p->job->step, p->job->tenant, p->job->kind_name,
					   strcmp(p->notify_status, "failed") == 0 ? updates[p->update].last_error : NULL);
	}
	/* a row still marked ours that we no longer track must not stay held forever */
	if (nlost > 0)
		store_release(lost, nlost);

	/*
	 * Step results must be durable before the next requests leave.  A batch
	 * without any (claims, lease renewals) need not wait for the WAL flush:
	 * if a crash loses it, its jobs are simply claimed again.
	 */
	if (nupdates == 0 && !batch_in_caller_transaction)	/* there: one commit for all */
		(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);

	PopActiveSnapshot();
	SPI_finish();
	if (!batch_in_caller_transaction)
		CommitTransactionCommand();

	now = GetCurrentTimestamp();
	for (int i = 0; i < npendings; i++)
	{
		Pending    *p = &pendings[i];

		if (p->after == AFTER_DROP)
			held_drop(p->job);
		else if (p->after == AFTER_SEND)
			held_schedule(p->job, p->not_before);
	}
	held_send_due(now);
	npendings = 0;
	nupdates = 0;
}

/* ---- isolation of one job's business logic ---- */

typedef struct Advance
{
	HeldJob    *job;
	/* the call's result, made into the response inside the job's subtransaction */
	const HttpResult *result;	/* NULL: no step, only the next request */
	const char *error;			/* with on_error = 'step': why the call failed */
	int			attempts;
	Jsonb	   *response;
	/* results, applied to the job by settle() only if the subtransaction commits */
	Jsonb	   *new_state;		/* set when a step ran */
	bool		completed;
	const char *failure;
	Jsonb	   *request_json;
	HttpRequest *request;
	bool		resumed;		/* resending a stored request: its wait is over */
} Advance;

/* done(state)?  request(state)?  max_steps?  Sets the outcome in a. */
static void
next_request(Advance *a)
{
	HeldJob    *job = a->job;
	Jsonb	   *state = a->new_state ? a->new_state : job->state;
	int32		step = job->step + (a->new_state ? 1 : 0);
	bool		finished;

	if (logic_done(job->kind, job->owner, state))
	{
		a->completed = true;
		return;
	}
	a->request_json = logic_request(job->kind, job->owner, state, &finished);
	if (finished)
	{
		a->completed = true;
		return;
	}
	/* max_steps refuses only a request that would really be sent */
	if (step >= job->kind->max_steps)
	{
		a->request_json = NULL;
		a->failure = psprintf("job reached max_steps (%d) without finishing", job->kind->max_steps);
		return;
	}
	a->request = request_parse(a->request_json, batch_cxt);
}

/*
 * The response as jsonb.  Only the API's body can fail here -- JSON that
 * jsonb cannot hold, such as a number beyond numeric's range -- and then
 * only this job fails.
 */
static Jsonb *
build_response(Advance *a)
{
	MemoryContext cxt = CurrentMemoryContext;
	Jsonb	   *response = NULL;

	PG_TRY();
	{
		response = a->error ? response_build_error(a->result, a->error, a->attempts) :
			response_build(a->result);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		ereport(ERROR,
				(errcode(edata->sqlerrcode),
				 errmsg("invalid response body: %s", edata->message)));
	}
	PG_END_TRY();
	return response;
}

static void
advance(Advance *a)
{
	HeldJob    *job = a->job;

	if (a->result)
		a->response = build_response(a);
	if (a->response)
		a->new_state = logic_step(job->kind, job->owner, job->state, a->response);
	else if (job->request_json)
	{
		/*
		 * Reclaimed: resend what the last committed step asked for.  Its
		 * delay (or backoff) was served in the table, as run_after.
		 */
		a->request_json = job->request_json;
		a->request = request_parse(job->request_json, batch_cxt);
		a->resumed = true;
		return;
	}
	next_request(a);
}

/* Run advance() in a subtransaction; on error, a->failure says why. */
static void
advance_isolated(Advance *a)
{
	ResourceOwner owner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(batch_cxt);
	PG_TRY();
	{
		logic_begin_job(a->job->id, a->job->step);
		advance(a);
		logic_end_job(false);
		if (TransactionIdIsValid(GetCurrentTransactionIdIfAny()))
			writing_subxacts++;
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(batch_cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		logic_stop_timers();	/* before anything else: a late cancel must not hit the batch */
		MemoryContextSwitchTo(batch_cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		logic_end_job(true);
		MemoryContextSwitchTo(batch_cxt);
		CurrentResourceOwner = owner;

		/* nothing of this step stands: the job keeps its committed state */
		a->new_state = NULL;
		a->completed = false;
		a->request = NULL;
		a->request_json = NULL;
		a->failure = logic_failure_text(edata);
	}
	PG_END_TRY();
}

/* Apply an advance to the job, and queue its row update and after-commit action. */
static void
settle(Advance *a, TimestampTz now)
{
	HeldJob    *job = a->job;
	Pending    *p;
	JobUpdate  *u;

	/* a step that ran and committed counts, even if the job now ends (max_steps) */
	if (a->new_state)
	{
		held_set_state(job, a->new_state);
		job->step++;
		job->attempts = 0;
		n_steps++;
	}
	if (a->failure)
	{
		n_failed++;
		p = add_pending(job, AFTER_DROP, 0);
		u = add_update(p, "failed");
		u->last_error = a->failure;
		p->notify_status = "failed";
		return;
	}
	if (a->completed)
	{
		n_completed++;
		p = add_pending(job, AFTER_DROP, 0);
		(void) add_update(p, "completed");
		p->notify_status = "completed";
	}
	else
	{
		int			delay_ms = a->resumed ? 0 : a->request->delay_ms;
		TimestampTz due = now + (TimestampTz) delay_ms * 1000;
		bool		release = delay_ms > jobloop_hold_delay ||
			pause_covers(job->kind_name, job->tenant);

		held_set_request(job, a->request_json, request_copy(a->request, held_context()));
		p = add_pending(job, release ? AFTER_DROP : AFTER_SEND, due);
		if (a->new_state || release)
		{
			u = add_update(p, "running");
			u->release = release;
			u->run_after = release ? due : 0;
			if (job->kind->notify_steps && a->new_state)
				p->notify_status = "running";
		}
	}
}

/* ---- responses ---- */

static bool
retryable_status(long status)
{
	return status == 408 || status == 425 || status == 429 || status == 500 ||
		status == 502 || status == 503 || status == 504;
}

static const char *
reason_phrase(long status)
{
	switch (status)
	{
		case 408: return "Request Timeout";
		case 425: return "Too Early";
		case 429: return "Too Many Requests";
		case 500: return "Internal Server Error";
		case 502: return "Bad Gateway";
		case 503: return "Service Unavailable";
		case 504: return "Gateway Timeout";
		default: return "";
	}
}

/* Exponential backoff with equal jitter, never shorter than Retry-After. */
static int64
backoff_ms(Kind *kind, int attempts, int64 retry_after)
{
	double		d = (double) kind->backoff_ms * pow(2.0, attempts - 1);
	int64		delay;

	d = Min(d, (double) kind->max_backoff_ms);
	delay = (int64) (d / 2 + pg_prng_double(&pg_global_prng_state) * d / 2);
	return Max(delay, retry_after);
}

static void
retry_later(HeldJob *job, const char *error, int64 retry_after, TimestampTz now)
{
	int64		delay = backoff_ms(job->kind, job->attempts, retry_after);
	bool		release = delay > jobloop_hold_delay || pause_covers(job->kind_name, job->tenant);
	TimestampTz due = now + delay * 1000;
	Pending    *p = add_pending(job, release ? AFTER_DROP : AFTER_SEND, due);
	JobUpdate  *u = add_update(p, "running");

	n_retries++;
	u->last_error = psprintf("%s (attempt %d of %d)", error, job->attempts, job->kind->max_attempts);
	u->release = release;
	u->run_after = due;
}

static void
process_response(HeldJob *job, TimestampTz now)
{
	HttpResult *res = &job->result;
	Advance		a = {job};
	char	   *error = NULL;
	bool		retryable = false;

	/*
	 * The transport's error text goes when the transfer is done (below), before
	 * the update that records it: copy it into the batch's memory.
	 */
	if (res->refused)
		error = pstrdup(res->error);
	else if (res->too_large)
		error = psprintf("response exceeds jobloop.max_response_size (%d bytes)", jobloop_max_response_size);
	else if (res->curl_code != 0)
	{
		error = pstrdup(res->error);
		retryable = !res->permanent;
	}
	else if (retryable_status(res->status))
	{
		error = psprintf("HTTP %ld %s", res->status, reason_phrase(res->status));
		retryable = true;
	}

	/*
	 * The retry gets a new connection after a connection went wrong, not
	 * after a timeout: libcurl closes an HTTP/1.1 connection whose response
	 * was cut short anyway, and an HTTP/2 stream that timed out leaves its
	 * connection in good order for the other streams -- a new connection per
	 * retry there turned an overloaded moment into thousands of handshakes.
	 */
	job->transport_failed = res->curl_code != 0 && !res->permanent && !res->too_large &&
		!res->timed_out;
	a.result = res;
	if (error != NULL)
	{
		job->attempts++;
		if (retryable && job->attempts < job->kind->max_attempts)
		{
			retry_later(job, error, response_retry_after_ms(res), now);
			goto done;
		}
		if (retryable)
			error = psprintf("%s after %d attempts", error, job->attempts);
		if (!job->kind->step_sees_errors)
		{
			a.failure = error;
			settle(&a, now);
			goto done;
		}
		a.error = error;
		a.attempts = job->attempts;
	}
	advance_isolated(&a);
	settle(&a, now);

done:
	transport->done(job->transfer);
	job->transfer = NULL;
	job->phase = HELD_IDLE;
}

/* ---- claims ---- */

static void
start_claimed(ClaimedJob *c, TimestampTz now)
{
	HeldJob    *job = held_add(c);
	Advance		a = {job};

	if (job == NULL)
		return;
	job->kind = kinds_lookup(c->kind);
	if (c->was_pending)
		notify_job(job->id, "running", job->step, job->tenant, job->kind_name, NULL);
	if (job->kind == NULL)
	{
		a.failure = psprintf("job kind \"%s\" no longer exists", c->kind);
		settle(&a, now);
		return;
	}
	advance_isolated(&a);
	settle(&a, now);
}

static void
claim(TimestampTz now)
{
	int			free_slots = jobloop_max_in_flight - held_count();
	/* background and external workers of this database share a burst alike */
	int			share = Max(MAX_CLAIM / Max(Max(shared_live_workers_here(), jobloop_workers), 1), 100);
	int			limit = Min(free_slots, share);
	int			peer;
	ClaimedJob *claimed;
	int			n;

	if (limit <= 0)
		return;
	peer = stats_least_held_peer(my_worker_number, jobloop_max_in_flight, BALANCE_ACTIVE_MS);
	if (peer >= 0 && held_count() >= peer + share)
	{
		/* leave these jobs to the peer; look again soon in case it does not take them */
		batch_claim_wanted = false;
		batch_next_claim_at = now + BALANCE_RETRY_MS * INT64CONST(1000);
		return;
	}
	claimed = palloc(limit * sizeof(ClaimedJob));
	{
		TimestampTz start = GetCurrentTimestamp();

		n = store_claim(limit, claimed, batch_cxt);
		claim_ms = (double) (GetCurrentTimestamp() - start) / 1000.0;
	}
	if (n < 0)
	{
		/* another worker is claiming under a tenant cap: our turn comes soon */
		batch_claim_wanted = false;
		batch_next_claim_at = now + CLAIM_TURN_RETRY_MS * INT64CONST(1000);
		return;
	}
	for (int i = 0; i < n; i++)
	{
		start_claimed(&claimed[i], now);
		if (writing_subxacts >= MAX_WRITING_SUBXACTS)
		{
			commit_and_act();
			begin_transaction();
		}
	}

	/*
	 * Claimed something: claim again next turn (tenant shares may have left
	 * jobs behind).  Claimed nothing: sleep until the next job is due.
	 */
	batch_claim_wanted = (n > 0);
	if (!batch_claim_wanted)
	{
		TimestampTz next = store_next_runnable();
		TimestampTz idle = now + IDLE_CLAIM_INTERVAL_MS * INT64CONST(1000);

		/* the next runnable job may be a paused one: then poll at the idle pace */
		batch_next_claim_at = (next == 0 || next > idle || pause_any()) ? idle :
			Max(next, now + 50 * INT64CONST(1000));
	}
}

/* ---- cancels lost to a full queue ---- */

static int
compare_id(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

static void
rescan_held(void)
{
	int			n = held_count();
	HeldJob   **jobs = palloc(Max(n, 1) * sizeof(HeldJob *));
	int			nids;
	int64	   *ids = store_held_ids(&nids);

	n = held_all(jobs, n);
	/*
	 * Jobs of this batch (responded, or going back to the table) stay: their
	 * update is fenced and drops them if they are gone.
	 */
	for (int i = 0; i < n; i++)
		if (jobs[i]->phase != HELD_IDLE && jobs[i]->phase != HELD_RESPONDED &&
			!bsearch(&jobs[i]->id, ids, nids, sizeof(int64), compare_id))
			held_drop(jobs[i]);
}

/*
 * The pauses changed: the jobs we hold that a pause now covers and that
 * wait for their next request (a delay, a backoff, a limit) go back to the
 * table now, keeping their place (run_after); those whose call is in flight
 * go back once its step is committed (settle, retry_later).
 */
static void
let_go_of_paused(TimestampTz now)
{
	HeldJob   **jobs;
	int			n = held_count();

	if (n == 0)
		return;
	jobs = palloc(n * sizeof(HeldJob *));
	n = held_all(jobs, n);
	for (int i = 0; i < n; i++)
	{
		HeldJob    *job = jobs[i];
		Pending    *p;
		JobUpdate  *u;

		if ((job->phase != HELD_WAITING && job->phase != HELD_BLOCKED) || job->deferred ||
			!pause_covers(job->kind_name, job->tenant))
			continue;
		held_unschedule(job);	/* settled here now, not sent */
		p = add_pending(job, AFTER_DROP, 0);
		u = add_update(p, "running");
		u->release = true;
		u->run_after = Max(job->not_before, now);
	}
}

/*
 * The jobs whose calls answered that are no longer ours (store_read_ours)
 * are forgotten, their results unread: their step runs where they are now.
 * Sets the entries of the jobs forgotten to NULL.
 */
static void
keep_only_ours(HeldJob **responded, int n)
{
	int64	   *ids = palloc(n * sizeof(int64));
	int32	   *steps = palloc(n * sizeof(int32));
	bool	   *ours = palloc(n * sizeof(bool));
	int			nlost = 0;

	for (int i = 0; i < n; i++)
	{
		ids[i] = responded[i]->id;
		steps[i] = responded[i]->committed_step;
	}
	store_read_ours(ids, steps, n, ours);
	for (int i = 0; i < n; i++)
	{
		if (ours[i])
			continue;
		transport->done(responded[i]->transfer);
		responded[i]->transfer = NULL;
		responded[i]->phase = HELD_IDLE;
		(void) add_pending(responded[i], AFTER_DROP, 0);
		responded[i] = NULL;
		nlost++;
	}
	if (nlost > 0)
		elog(LOG, "jobloop worker %d dropped %d answered jobs that are no longer its own",
			 my_worker_number, nlost);
}

/*
 * One batch: everything the loop found to do since the last one.
 */
bool
batch_run(HeldJob **responded, int nresponded, int64 *releases, int nreleases,
		  HeldJob **parked, int nparked, bool want_claim, bool heartbeat, bool rescan)
{
	TimestampTz now = GetCurrentTimestamp();

	if (batch_cxt == NULL)
	{
		batch_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop batch", ALLOCSET_DEFAULT_SIZES);
		capacity = 1024;
		pendings = MemoryContextAlloc(TopMemoryContext, capacity * sizeof(Pending));
		updates = MemoryContextAlloc(TopMemoryContext, capacity * sizeof(JobUpdate));
	}

	begin_transaction();
	/*
	 * DROP EXTENSION jobloop: its tables are gone, and every statement below
	 * would fail.  Once we have looked, DROP waits for this transaction;
	 * a DROP between the early commits of a long batch still makes the
	 * worker exit with an error (and its successor wait for the extension).
	 */
	if (store_extension_state(true) != EXTENSION_READY)
	{
		PopActiveSnapshot();
		SPI_finish();
		if (!batch_in_caller_transaction)
			CommitTransactionCommand();
		MemoryContextReset(batch_cxt);
		ndeferred = 0;
		return false;
	}
	if (!batch_in_caller_transaction)
		pgstat_report_activity(STATE_RUNNING, "jobloop: advancing jobs");
	limits_sync();
	if (pause_sync())
		let_go_of_paused(now);

	if (nreleases > 0)
		store_release(releases, nreleases);
	retry_deferred();
	if (rescan)
		rescan_held();

	/* jobs that would wait long on a limit: due again when their turn should come */
	for (int i = 0; i < nparked; i++)
	{
		Pending    *p = add_pending(parked[i], AFTER_DROP, 0);
		JobUpdate  *u = add_update(p, "running");

		u->release = true;
		u->run_after = parked[i]->not_before;
	}

	if (nresponded > 0)
		keep_only_ours(responded, nresponded);
	for (int i = 0; i < nresponded; i++)
	{
		if (responded[i] == NULL)
			continue;			/* no longer ours: see keep_only_ours */
		responded[i]->kind = kinds_lookup(responded[i]->kind_name);
		if (responded[i]->kind == NULL)
		{
			Advance		a = {responded[i]};

			a.failure = psprintf("job kind \"%s\" no longer exists", responded[i]->kind_name);
			transport->done(responded[i]->transfer);
			responded[i]->transfer = NULL;
			responded[i]->phase = HELD_IDLE;
			settle(&a, now);
			continue;
		}
		process_response(responded[i], now);
		if (writing_subxacts >= MAX_WRITING_SUBXACTS)
		{
			commit_and_act();
			begin_transaction();
		}
	}

	/*
	 * The reaper runs at every heartbeat, and at most once a second before
	 * a claim: rows that arrive with holds no live worker stands behind (a
	 * restore) are claimable at once, not after their lease.
	 */
	if (heartbeat || (want_claim && now >= next_reap))
	{
		HeldJob   **jobs = palloc(Max(held_count(), 1) * sizeof(HeldJob *));
		int64	   *ids = palloc(Max(held_count(), 1) * sizeof(int64));
		int			nids = held_all(jobs, held_count());

		for (int i = 0; i < nids; i++)
			ids[i] = jobs[i]->id;

		if (store_reap_expired(ids, nids) > 0)
			want_claim = batch_claim_wanted = true;
		next_reap = now + USECS_PER_SEC;
		if (heartbeat)
			store_extend_leases(ids, nids);
	}
	if (want_claim)
		claim(now);
	/* last, so that the counts' rows are locked only while this commits */
	if (now >= next_fold)
		next_fold = store_fold_counts() ? now : now + USECS_PER_SEC;

	{
		TimestampTz start = GetCurrentTimestamp();

		commit_and_act();
		stats_record_batch(my_worker_number, n_steps, n_completed, n_failed, n_retries, claim_ms,
						   (double) (GetCurrentTimestamp() - start) / 1000.0);
		stats_record_load(my_worker_number, held_count(), transport->in_flight());
	}
	n_steps = n_completed = n_failed = n_retries = 0;
	claim_ms = -1;
	MemoryContextReset(batch_cxt);
	if (!batch_in_caller_transaction)
		pgstat_report_activity(STATE_IDLE, NULL);
	return true;
}
