/*-------------------------------------------------------------------------
 *
 * shared.c
 *		Shared memory between the SQL API (any backend) and the workers.
 *
 * One slot per worker holds the worker's latch and a queue of job ids that
 * were cancelled while the worker held them.  Locking: a slot's spinlock
 * protects all of that slot's fields; it is held only to copy a few words,
 * never across a call.  The array itself never changes after startup.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"

static JobloopShared *shared = NULL;

static WorkerSlot *slot_for(int worker);
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* jobloop.database split at commas: the databases served, in order. */
List *
shared_database_names(void)
{
	List	   *names = NIL;
	char	   *copy = pstrdup(jobloop_database ? jobloop_database : "");
	char	   *save;

	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
	{
		char	   *end = tok + strlen(tok);

		while (*tok == ' ' || *tok == '\t')
			tok++;
		while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		if (*tok)
			names = lappend(names, pstrdup(tok));
	}
	return names;
}

/* Worker slots: jobloop.workers for each database, at most JOBLOOP_MAX_WORKERS. */
int
shared_total_workers(void)
{
	return Min(list_length(shared_database_names()) * jobloop_workers, JOBLOOP_MAX_WORKERS);
}

/*
 * The worker numbers that serve database: its background workers (as
 * _PG_init registered them: jobloop.workers consecutive numbers per listed
 * database), then the external workers connected to it right now.
 */
int
shared_database_workers(const char *database, int *workers, int max)
{
	List	   *names = shared_database_names();
	int			total = shared_total_workers();
	int			n = 0;

	for (int w = 1; w <= total; w++)
		if (strcmp(list_nth(names, (w - 1) / jobloop_workers), database) == 0 && n < max)
			workers[n++] = w;
	/* and the external workers connected to it now */
	for (int w = total + 1; shared && w <= shared->nslots; w++)
	{
		WorkerSlot *slot = slot_for(w);
		bool		serves;

		SpinLockAcquire(&slot->mutex);
		serves = slot->pid != 0 && slot->external &&
			strcmp(slot->database_name, database) == 0;
		SpinLockRelease(&slot->mutex);
		if (serves && n < max)
			workers[n++] = w;
	}
	return n;
}

bool
shared_serves_database(const char *name)
{
	ListCell   *lc;

	if (jobloop_workers == 0)
		return false;
	foreach(lc, shared_database_names())
		if (strcmp(lfirst(lc), name) == 0)
			return true;
	return false;
}

/*
 * Slots for external workers come after the background workers', within
 * JOBLOOP_MAX_WORKERS in all (limits.c keeps a bit per worker in 64).
 */
static int
external_slots(void)
{
	return Min(jobloop_max_external_workers, JOBLOOP_MAX_WORKERS - shared_total_workers());
}

static Size
shared_size(void)
{
	return add_size(offsetof(JobloopShared, workers),
					mul_size(sizeof(WorkerSlot),
							 Max(shared_total_workers() + external_slots(), 1)));
}

static void
shared_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(shared_size());
	limits_shmem_request();
}

static void
shared_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("jobloop", shared_size(), &found);
	if (!found)
	{
		memset(shared, 0, shared_size());
		shared->nworkers = shared_total_workers();
		shared->nslots = shared->nworkers + external_slots();
		for (int i = 0; i < Max(shared->nslots, 1); i++)
			SpinLockInit(&shared->workers[i].mutex);
	}
	limits_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

void
shared_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shared_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shared_startup;
}

/* False in a backend that did not preload the library: no workers exist. */
bool
shared_available(void)
{
	return shared != NULL;
}

static WorkerSlot *
slot_for(int worker)
{
	Assert(shared && worker >= 1 && worker <= shared->nslots);
	return &shared->workers[worker - 1];
}

/* A worker's slot, or NULL if there is no such worker. */
WorkerSlot *
shared_slot(int worker)
{
	if (!shared || worker < 1 || worker > shared->nslots)
		return NULL;
	return slot_for(worker);
}

static void
detach_worker(int code, Datum arg)
{
	shared_detach_worker(DatumGetInt32(arg));
}

/* Give up our slot (if it is still ours: an external worker may have detached before). */
void
shared_detach_worker(int worker)
{
	WorkerSlot *slot = slot_for(worker);

	SpinLockAcquire(&slot->mutex);
	if (slot->pid == MyProcPid)
	{
		slot->pid = 0;
		slot->latch = NULL;
	}
	SpinLockRelease(&slot->mutex);
}

/*
 * Publish this worker's latch.  Cancels queued for a predecessor are
 * dropped: the new worker starts by releasing everything it held anyway.
 */
void
shared_attach_worker(int worker, const char *database_name)
{
	WorkerSlot *slot = slot_for(worker);

	SpinLockAcquire(&slot->mutex);
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->database = MyDatabaseId;
	strlcpy(slot->database_name, database_name, NAMEDATALEN);
	memset(&slot->stats, 0, sizeof(slot->stats));
	slot->stats.started_at = GetCurrentTimestamp();
	slot->ncancels = 0;
	slot->cancel_overflow = false;
	slot->external = false;
	SpinLockRelease(&slot->mutex);
	on_shmem_exit(detach_worker, Int32GetDatum(worker));
}

/*
 * Take a free external worker's slot for this backend, the one at our end
 * of jobloop-worker's connection; -1 if all are taken.  The slot is ours
 * until the backend exits -- the connection closed or broke -- and from
 * then on no live worker stands behind the jobs marked with its number, so
 * any worker's reaper frees them at once (store_reap_expired).
 */
int
shared_attach_external(const char *database_name, const char *host, int32 remote_pid)
{
	if (!shared)
		return -1;
	for (int w = shared->nworkers + 1; w <= shared->nslots; w++)
	{
		WorkerSlot *slot = slot_for(w);

		SpinLockAcquire(&slot->mutex);
		if (slot->pid != 0)
		{
			SpinLockRelease(&slot->mutex);
			continue;
		}
		slot->pid = MyProcPid;
		slot->latch = MyLatch;
		slot->database = MyDatabaseId;
		strlcpy(slot->database_name, database_name, NAMEDATALEN);
		memset(&slot->stats, 0, sizeof(slot->stats));
		slot->stats.started_at = GetCurrentTimestamp();
		slot->ncancels = 0;
		slot->cancel_overflow = false;
		slot->external = true;
		strlcpy(slot->host, host, sizeof(slot->host));
		slot->remote_pid = remote_pid;
		SpinLockRelease(&slot->mutex);
		on_shmem_exit(detach_worker, Int32GetDatum(w));
		return w;
	}
	return -1;
}

static void
wake_slot(WorkerSlot *slot, bool only_our_database)
{
	Latch	   *latch;

	SpinLockAcquire(&slot->mutex);
	latch = (!only_our_database || slot->database == MyDatabaseId) ? slot->latch : NULL;
	SpinLockRelease(&slot->mutex);
	if (latch)
		SetLatch(latch);
}

/* Wake the workers serving this backend's database. */
void
shared_wake_workers(void)
{
	if (!shared)
		return;
	for (int i = 0; i < shared->nslots; i++)
		wake_slot(&shared->workers[i], true);
}

void
shared_wake_worker(int worker)
{
	if (shared && worker >= 1 && worker <= shared->nslots)
		wake_slot(slot_for(worker), false);
}

/* Tell the worker that held job_id to drop it (and abort its call). */
void
shared_post_cancel(int worker, int64 job_id)
{
	WorkerSlot *slot;
	Latch	   *latch;

	if (!shared || worker < 1 || worker > shared->nslots)
		return;
	slot = slot_for(worker);
	SpinLockAcquire(&slot->mutex);
	if (slot->database != MyDatabaseId)
	{
		/* a number left over from another configuration: its lease will lapse */
		SpinLockRelease(&slot->mutex);
		return;
	}
	if (slot->ncancels < CANCEL_QUEUE_SIZE)
		slot->cancels[slot->ncancels++] = job_id;
	else
		slot->cancel_overflow = true;
	latch = slot->latch;
	SpinLockRelease(&slot->mutex);
	if (latch)
		SetLatch(latch);
}

int
shared_take_cancels(int worker, int64 *ids, int max, bool *overflow)
{
	WorkerSlot *slot = slot_for(worker);
	int			n;

	SpinLockAcquire(&slot->mutex);
	n = Min(slot->ncancels, max);
	memcpy(ids, slot->cancels, n * sizeof(int64));
	memmove(slot->cancels, slot->cancels + n, (slot->ncancels - n) * sizeof(int64));
	slot->ncancels -= n;
	*overflow = slot->cancel_overflow;
	slot->cancel_overflow = false;
	SpinLockRelease(&slot->mutex);
	return n;
}

/* How many workers, background or external, run in this backend's database now. */
int
shared_live_workers_here(void)
{
	int			n = 0;

	for (int w = 1; shared && w <= shared->nslots; w++)
	{
		WorkerSlot *slot = slot_for(w);

		SpinLockAcquire(&slot->mutex);
		if (slot->pid != 0 && slot->database == MyDatabaseId)
			n++;
		SpinLockRelease(&slot->mutex);
	}
	return n;
}
