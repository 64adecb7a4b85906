/*-------------------------------------------------------------------------
 *
 * limits.c
 *		Per-endpoint limits shared by all workers: rate (token bucket),
 *		ramp, concurrency, and the API's own feedback (429/503, Retry-After).
 *
 * An endpoint is a request's rate_key, or its URL's host:port, within one
 * database (each database configures its own).  Configured limits live in
 * jobloop.endpoint_limit; workers copy them into a shared
 * hash table (limits_sync) when set_limit/drop_limit invalidate that table,
 * so a change takes effect at the workers' next transaction.  Entries with
 * no configuration exist only while an endpoint is paused by Retry-After.
 *
 * The allowed rate moves like TCP's congestion window: after the endpoint
 * has been idle it restarts low (RAMP_START of max_rate) and climbs
 * linearly to max_rate over the ramp interval; a 429 or 503 halves it
 * (never below that floor), and it climbs back at the same slope -- or,
 * without a ramp, over RECOVERY_SECONDS.  Tokens
 * refill at the allowed rate; the bucket holds BURST_SECONDS of it, so
 * requests leave evenly rather than in bursts.
 *
 * Locking: one LWLock protects the whole table; every operation holds it
 * exclusively for a few arithmetic steps and never across I/O.  The table's
 * size is fixed at startup (jobloop.max_endpoints).
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

#define RAMP_START			0.1		/* fraction of max_rate a ramp starts from */
#define BURST_SECONDS		0.05	/* bucket depth, in seconds of allowed rate */
#define IDLE_RESET_SECONDS	1.0		/* idle this long (nothing in flight): ramp again */
#define RECOVERY_SECONDS	5.0		/* without a ramp: climb back from a cut in this long */
#define BUCKET_MS			100		/* "requests in the last second", in 10 slices */
#define NBUCKETS			10

PG_FUNCTION_INFO_V1(jobloop_limit_state);

/* Limits are configured per database: the same endpoint may have one in each. */
typedef struct EndpointKey
{
	Oid			database;
	char		endpoint[ENDPOINT_LEN];
} EndpointKey;

typedef struct EndpointLimit
{
	EndpointKey key;			/* hash key */
	bool		configured;
	double		max_rate;		/* requests/s; 0: unlimited */
	int			max_concurrency;	/* 0: unlimited */
	double		ramp_seconds;	/* 0: no ramp */
	/* live state */
	double		allowed_rate;
	double		tokens;
	TimestampTz refilled_at;
	TimestampTz last_sent_at;
	TimestampTz paused_until;
	int			in_flight;
	uint64		waiting_workers;	/* bit w-1: worker w waits for a free slot */
	int64		bucket_slice[NBUCKETS];	/* which 100 ms slice each bucket counts */
	int			bucket_count[NBUCKETS];
} EndpointLimit;

static HTAB *endpoints = NULL;
static LWLock *endpoints_lock = NULL;
static bool limits_stale = true;
static Oid	limit_table = InvalidOid;

/* ---- shared memory ---- */

Size
limits_shmem_size(void)
{
	return hash_estimate_size(jobloop_max_endpoints, sizeof(EndpointLimit));
}

void
limits_shmem_request(void)
{
	RequestAddinShmemSpace(limits_shmem_size());
	RequestNamedLWLockTranche("jobloop", 1);
}

void
limits_shmem_startup(void)
{
	HASHCTL		info;

	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(EndpointKey);
	info.entrysize = sizeof(EndpointLimit);
	endpoints = ShmemInitHash("jobloop endpoints", jobloop_max_endpoints, jobloop_max_endpoints,
							  &info, HASH_ELEM | HASH_BLOBS);
	endpoints_lock = &(GetNamedLWLockTranche("jobloop"))->lock;
}

static void
make_key(EndpointKey *key, const char *endpoint)
{
	memset(key, 0, sizeof(*key));
	key->database = MyDatabaseId;
	strlcpy(key->endpoint, endpoint, ENDPOINT_LEN);
}

/* Zero everything after the key of a new entry. */
static void
init_entry(EndpointLimit *e, TimestampTz now)
{
	memset((char *) e + sizeof(EndpointKey), 0, sizeof(EndpointLimit) - sizeof(EndpointKey));
	e->refilled_at = now;
}

static double
seconds_between(TimestampTz from, TimestampTz to)
{
	return (double) (to - from) / 1000000.0;
}

/* The lowest allowed rate: where a ramp starts, and the floor of a cut. */
static double
floor_rate(EndpointLimit *e)
{
	return Max(e->max_rate * RAMP_START, Min(1.0, e->max_rate));
}

/* The allowed rate of an endpoint that has just been configured or gone idle. */
static double
start_rate(EndpointLimit *e)
{
	return e->ramp_seconds > 0 ? floor_rate(e) : e->max_rate;
}

/*
 * Bring allowed_rate and tokens up to now.  The rate climbs linearly from
 * the floor to max_rate over the ramp (or, without one, over
 * RECOVERY_SECONDS after a cut).
 */
static void
refill(EndpointLimit *e, TimestampTz now)
{
	double		dt = Max(seconds_between(e->refilled_at, now), 0);
	double		climb = e->ramp_seconds > 0 ? e->ramp_seconds : RECOVERY_SECONDS;

	if (e->max_rate <= 0)
		return;
	if (e->ramp_seconds > 0 && e->in_flight == 0 &&
		seconds_between(e->last_sent_at, now) >= IDLE_RESET_SECONDS)
		e->allowed_rate = start_rate(e);
	else
		e->allowed_rate = Min(e->max_rate,
							  e->allowed_rate + dt * (e->max_rate - floor_rate(e)) / climb);
	e->tokens = Min(Max(1.0, e->allowed_rate * BURST_SECONDS), e->tokens + dt * e->allowed_rate);
	e->refilled_at = now;
}

static void
count_sent(EndpointLimit *e, TimestampTz now)
{
	int64		slice = now / (BUCKET_MS * 1000);
	int			b = (int) (slice % NBUCKETS);

	if (e->bucket_slice[b] != slice)
	{
		e->bucket_slice[b] = slice;
		e->bucket_count[b] = 0;
	}
	e->bucket_count[b]++;
}

static int
sent_last_second(EndpointLimit *e, TimestampTz now)
{
	int64		slice = now / (BUCKET_MS * 1000);
	int			total = 0;

	for (int b = 0; b < NBUCKETS; b++)
		if (e->bucket_slice[b] > slice - NBUCKETS)
			total += e->bucket_count[b];
	return total;
}

/*
 * May a request to endpoint leave now?  If so, it counts as in flight until
 * limits_release (v->tracked tells whether that call is needed).  If not,
 * v->retry_at says when to ask again, or 0 for "when a slot frees" (this
 * worker's latch is then set by whoever frees it).
 */
void
limits_acquire(const char *endpoint, int worker, TimestampTz now, LimitVerdict *v)
{
	EndpointLimit *e;
	EndpointKey key;

	memset(v, 0, sizeof(*v));
	v->granted = true;
	if (endpoints == NULL)
		return;
	make_key(&key, endpoint);
	LWLockAcquire(endpoints_lock, LW_EXCLUSIVE);
	e = hash_search(endpoints, &key, HASH_FIND, NULL);
	if (e == NULL)
	{
		LWLockRelease(endpoints_lock);
		return;
	}
	refill(e, now);
	v->rate = e->max_rate > 0 ? e->allowed_rate : 0;
	v->max_rate = e->max_rate;
	v->max_concurrency = e->max_concurrency;
	if (e->paused_until > now)
	{
		v->retry_at = e->paused_until;
		v->granted = false;
	}
	else if (e->max_concurrency > 0 && e->in_flight >= e->max_concurrency)
	{
		e->waiting_workers |= UINT64CONST(1) << (worker - 1);
		v->granted = false;
	}
	else if (e->max_rate > 0 && e->tokens < 1.0)
	{
		v->retry_at = now + (TimestampTz) ((1.0 - e->tokens) / e->allowed_rate * 1000000.0) + 1;
		v->granted = false;
	}
	if (v->granted)
	{
		if (e->max_rate > 0)
			e->tokens -= 1.0;
		e->in_flight++;
		e->last_sent_at = now;
		count_sent(e, now);
		v->tracked = true;
	}
	LWLockRelease(endpoints_lock);
}

/*
 * A tracked request finished.  feedback_status 429/503 cuts the rate;
 * retry_after_ms > 0 pauses the endpoint (for every worker) until then.
 */
void
limits_release(const char *endpoint, bool tracked, long status, int64 retry_after_ms, TimestampTz now)
{
	EndpointLimit *e;
	EndpointKey key;
	uint64		wake = 0;
	bool		found = true;
	bool		pause = retry_after_ms > 0 && (status == 429 || status == 503);

	if (endpoints == NULL || (!tracked && !pause))
		return;
	make_key(&key, endpoint);
	LWLockAcquire(endpoints_lock, LW_EXCLUSIVE);
	e = hash_search(endpoints, &key, pause ? HASH_ENTER_NULL : HASH_FIND, &found);
	if (e && !found)
		init_entry(e, now);		/* unconfigured: it exists only to hold the pause */
	if (e)
	{
		if (tracked && e->in_flight > 0)
			e->in_flight--;
		if ((status == 429 || status == 503) && e->max_rate > 0)
		{
			refill(e, now);
			e->allowed_rate = Max(floor_rate(e), e->allowed_rate / 2);
			e->tokens = Min(e->tokens, 0);
		}
		if (pause)
			e->paused_until = Max(e->paused_until, now + retry_after_ms * 1000);
		wake = e->waiting_workers;
		e->waiting_workers = 0;
	}
	LWLockRelease(endpoints_lock);
	for (int w = 1; wake != 0; w++, wake >>= 1)
		if (wake & 1)
			shared_wake_worker(w);
}

/* ---- configuration ---- */

static void
limits_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == limit_table)
		limits_stale = true;
}

void
limits_init_worker(void)
{
	CacheRegisterRelcacheCallback(limits_relcache_callback, (Datum) 0);
}

/*
 * Copy jobloop.endpoint_limit into shared memory if it changed.  Inside a
 * transaction with SPI connected.  Live state of endpoints that stay
 * configured is kept, so a change does not reset their ramp.
 */
void
limits_sync(void)
{
	static SPIPlanPtr plan = NULL;
	HASH_SEQ_STATUS seq;
	EndpointLimit *e;
	EndpointKey key;
	TimestampTz now = GetCurrentTimestamp();

	if (!limits_stale || endpoints == NULL)
		return;
	limit_table = get_relname_relid("endpoint_limit", get_namespace_oid("jobloop", false));
	store_run_plan(&plan,
				   "SELECT endpoint, coalesce(max_rate, 0)::float8, coalesce(max_concurrency, 0),"
				   " coalesce(extract(epoch FROM ramp), 0)::float8 FROM jobloop.endpoint_limit",
				   0, NULL, NULL, NULL, SPI_OK_SELECT);

	LWLockAcquire(endpoints_lock, LW_EXCLUSIVE);
	/* every entry of this database loses its limits unless the table still has them */
	hash_seq_init(&seq, endpoints);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		if (e->key.database != MyDatabaseId)
			continue;
		e->configured = false;
		e->max_rate = 0;
		e->max_concurrency = 0;
		e->ramp_seconds = 0;
	}
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		bool		found;
		bool		newly;
		char	   *name = TextDatumGetCString(SPI_getbinval(row, desc, 1, &isnull));

		if (strlen(name) >= ENDPOINT_LEN)
			continue;			/* the table's CHECK forbids it */
		make_key(&key, name);
		e = hash_search(endpoints, &key, HASH_ENTER_NULL, &found);
		if (e == NULL)
		{
			elog(WARNING, "jobloop.max_endpoints (%d) is too small to hold every endpoint limit",
				 jobloop_max_endpoints);
			break;
		}
		if (!found)
			init_entry(e, now);
		newly = !found || e->allowed_rate <= 0;
		e->configured = true;
		e->max_rate = DatumGetFloat8(SPI_getbinval(row, desc, 2, &isnull));
		e->max_concurrency = DatumGetInt32(SPI_getbinval(row, desc, 3, &isnull));
		e->ramp_seconds = DatumGetFloat8(SPI_getbinval(row, desc, 4, &isnull));
		if (newly)
		{
			e->allowed_rate = start_rate(e);
			e->tokens = 1.0;
			e->refilled_at = now;
		}
		e->allowed_rate = Min(e->allowed_rate, e->max_rate);
	}
	/* forget what is neither configured nor paused nor busy */
	hash_seq_init(&seq, endpoints);
	while ((e = hash_seq_search(&seq)) != NULL)
		if (e->key.database == MyDatabaseId && !e->configured && e->paused_until <= now &&
			e->in_flight == 0)
			hash_search(endpoints, &e->key, HASH_REMOVE, NULL);
	LWLockRelease(endpoints_lock);
	limits_stale = false;
}

/*
 * jobloop.limit_state(): the live state of every endpoint the workers track
 * for this database, for the jobloop.limits view.
 */
Datum
jobloop_limit_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HASH_SEQ_STATUS seq;
	EndpointLimit *e;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	if (endpoints == NULL)
		return (Datum) 0;
	LWLockAcquire(endpoints_lock, LW_EXCLUSIVE);
	hash_seq_init(&seq, endpoints);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		if (e->key.database != MyDatabaseId)
			continue;
		refill(e, now);
		values[0] = CStringGetTextDatum(e->key.endpoint);
		values[1] = Float8GetDatum(e->allowed_rate);
		nulls[1] = e->max_rate <= 0;
		values[2] = Int32GetDatum(e->in_flight);
		values[3] = Int32GetDatum(sent_last_second(e, now));
		values[4] = TimestampTzGetDatum(e->paused_until);
		nulls[4] = e->paused_until <= now;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(endpoints_lock);
	return (Datum) 0;
}
