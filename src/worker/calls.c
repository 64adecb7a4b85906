/*-------------------------------------------------------------------------
 *
 * calls.c
 *		The calls in flight, by the server's transfer id, and the results
 *		waiting for the next report.
 *
 * The server names each call it asks for with a transfer id; that id is the
 * owner the engine reports the call's result with, and the key of the map
 * an abort looks the call up in.  A finished call's result is encoded into
 * the next report at once and its buffers are given back (http_done), so
 * what waits for a turn is bytes, not transfers.
 *
 * A report holds at most worker_options.max_results results and about
 * REPORT_SOFT_BYTES: the rest stay in libcurl's queue for the next turn,
 * which main.c then takes at once (calls_more_finished).
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#define REPORT_SOFT_BYTES	(64 * 1024 * 1024)
#define REPORT_HEADER_SIZE	(4 + 1 + 4)	/* magic, flags, count: see wire.h */
#define KEEP_BUFFER_BYTES	(1024 * 1024)	/* a bigger report buffer is freed once sent */

typedef struct CallEntry
{
	int64		transfer;
	Transfer   *xfer;
	struct CallEntry *next;
} CallEntry;

static CallEntry **buckets = NULL;
static uint32 nbuckets = 0;
static uint32 ncalls = 0;

static StringInfoData pending;	/* header space, then the encoded results */
static int	npending = 0;
static bool more_finished = false;

static uint32
bucket_of(int64 transfer)
{
	uint64		h = (uint64) transfer * UINT64CONST(0x9E3779B97F4A7C15);

	return (uint32) (h >> 32) & (nbuckets - 1);
}

static void
grow_map(void)
{
	uint32		old_n = nbuckets;
	CallEntry **old = buckets;

	nbuckets = old_n ? old_n * 2 : 1024;
	buckets = palloc0(nbuckets * sizeof(CallEntry *));
	for (uint32 i = 0; i < old_n; i++)
		while (old[i])
		{
			CallEntry  *e = old[i];
			uint32		b = bucket_of(e->transfer);

			old[i] = e->next;
			e->next = buckets[b];
			buckets[b] = e;
		}
	if (old)
		pfree(old);
}

static CallEntry **
find(int64 transfer)
{
	CallEntry **link = &buckets[bucket_of(transfer)];

	while (*link && (*link)->transfer != transfer)
		link = &(*link)->next;
	return link;
}

/* Take transfer's entry out of the map; its Transfer, or NULL if it had none. */
static Transfer *
forget(int64 transfer)
{
	CallEntry **link = find(transfer);
	CallEntry  *e = *link;
	Transfer   *xfer;

	if (e == NULL)
		return NULL;
	*link = e->next;
	xfer = e->xfer;
	pfree(e);
	ncalls--;
	return xfer;
}

static void
reset_pending(void)
{
	if (pending.data != NULL && pending.maxlen > KEEP_BUFFER_BYTES)
	{
		pfree(pending.data);
		pending.data = NULL;
	}
	if (pending.data == NULL)
		initStringInfo(&pending);
	else
		resetStringInfo(&pending);
	/* room for the header, written when the report is taken */
	appendStringInfoSpaces(&pending, REPORT_HEADER_SIZE);
	npending = 0;
	more_finished = false;
}

void
calls_init(void)
{
	grow_map();
	reset_pending();
}

void
calls_start(const WireAction *action)
{
	Transfer   *xfer;
	CallEntry **link;
	CallEntry  *e;

	if (*(link = find(action->transfer)) != NULL)
	{
		/* the server never reuses an id in a session; should it, the first call stands */
		worker_log(WARNING, "the server asked again for transfer " INT64_FORMAT
				   ", which is in flight; ignored", action->transfer);
		return;
	}
	xfer = http_start(&action->request, action->idempotency_key, action->timeout_ms,
					  action->fresh_connection, (void *) (intptr_t) action->transfer);
	if (xfer == NULL)
	{
		/* out of memory in libcurl or here: the server retries it as a transport error */
		HttpResult	res;

		memset(&res, 0, sizeof(res));
		res.curl_code = 2;		/* CURLE_FAILED_INIT */
		res.error = "jobloop-worker could not start the request";
		wire_put_result(&pending, action->transfer, &res);
		npending++;
		return;
	}
	if (ncalls >= nbuckets)
		grow_map();
	e = palloc(sizeof(CallEntry));
	e->transfer = action->transfer;
	e->xfer = xfer;
	link = &buckets[bucket_of(e->transfer)];
	e->next = *link;
	*link = e;
	ncalls++;
}

void
calls_abort(int64 transfer)
{
	Transfer   *xfer = forget(transfer);

	/* an id we do not know finished already: its result is in a report */
	if (xfer != NULL)
		http_abort(xfer);
}

void
calls_abort_all(void)
{
	for (uint32 i = 0; i < nbuckets; i++)
		while (buckets[i])
		{
			CallEntry  *e = buckets[i];

			buckets[i] = e->next;
			http_abort(e->xfer);
			pfree(e);
		}
	ncalls = 0;
	reset_pending();
}

/* Move finished calls' results into the next report, up to its caps. */
void
calls_collect(void)
{
	void	   *owner;
	HttpResult	res;
	Transfer   *xfer;

	while (npending < worker_options.max_results && pending.len < REPORT_SOFT_BYTES)
	{
		int64		transfer;

		if ((xfer = http_next_finished(&owner, &res)) == NULL)
		{
			more_finished = false;
			return;
		}
		transfer = (int64) (intptr_t) owner;
		if (forget(transfer) != xfer)
			engine_log(FATAL, "a finished call is not the one started as transfer " INT64_FORMAT,
					   transfer);
		wire_put_result(&pending, transfer, &res);
		npending++;
		if (res.error)
			pfree(res.error);
		http_done(xfer);
	}
	more_finished = true;
}

bool
calls_more_finished(void)
{
	return more_finished;
}

int
calls_pending(void)
{
	return npending;
}

/* The report to send: its header written over the space kept for it. */
StringInfo
calls_take_report(uint8 flags)
{
	StringInfoData header;

	initStringInfo(&header);
	wire_put_report_header(&header, flags, (uint32) npending);
	Assert(header.len == REPORT_HEADER_SIZE);
	memcpy(pending.data, header.data, REPORT_HEADER_SIZE);
	pfree(header.data);
	return &pending;
}

/* libpq has its own copy of the report: start the next one. */
void
calls_report_sent(void)
{
	reset_pending();
}
