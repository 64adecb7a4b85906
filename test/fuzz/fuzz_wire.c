/*-------------------------------------------------------------------------
 *
 * fuzz_wire.c
 *		libFuzzer target: the messages of a turn (src/engine/wire.c).
 *
 * Input: any bytes, decoded both as a report (what the server reads from
 * jobloop-worker, whose login role need be no more than jobloop_worker) and
 * as a reply (what jobloop-worker reads from the server).  The input is
 * copied into a buffer of exactly its size, so ASan catches a read past
 * the end; a count that promises more items than the bytes left must fail
 * at once, not allocate.
 *
 * Round trip: whatever decodes is encoded again and decoded from that, and
 * the two decodings must be equal field by field -- so encoder and decoder
 * agree on the format, whatever the input.  Every decoded string must be
 * NUL-terminated at its length.
 *
 * Built with -DFRONTEND against libpgcommon and libpgport (palloc,
 * StringInfo), as jobloop-worker is.
 *
 *-------------------------------------------------------------------------
 */
#include "wire.h"

#include "fuzz.h"

#define MAX_ITEMS	64			/* decoded per input: enough to cover the loops */

typedef struct Result
{
	int64		transfer;
	HttpResult	res;
} Result;

static void
check_bytes(const char *s, size_t len)
{
	if (s != NULL)
		CHECK(s[len] == '\0');
	else
		CHECK(len == 0);
}

static bool
same_bytes(const char *a, size_t alen, const char *b, size_t blen)
{
	if (a == NULL || b == NULL)
		return a == b && alen == blen;
	return alen == blen && memcmp(a, b, alen) == 0;
}

static bool
same_str(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

static void
free_ptr(char *p)
{
	if (p != NULL)
		pfree(p);
}

static void
free_results(Result *r, int n)
{
	for (int i = 0; i < n; i++)
	{
		free_ptr(r[i].res.error);
		free_ptr(r[i].res.headers);
		free_ptr(r[i].res.body);
	}
}

static void
free_actions(WireAction *a, int n)
{
	for (int i = 0; i < n; i++)
		wire_free_action(&a[i]);
}

/* ---- report ---- */

static int
decode_report(const char *data, size_t len, uint8 *flags, Result *out, bool *complete)
{
	WireReader	r;
	uint32		n;
	int			got = 0;

	wire_reader_init(&r, data, len);
	*complete = false;
	if (!wire_get_report_header(&r, flags, &n))
	{
		CHECK(r.bad);
		return -1;
	}
	/* a count beyond the bytes left was refused by the header */
	CHECK((size_t) n * 37 <= len);
	while ((uint32) got < n && got < MAX_ITEMS)
	{
		if (!wire_get_result(&r, &out[got].transfer, &out[got].res))
		{
			/* what failed left nothing allocated; keep none of it */
			CHECK(r.bad);
			CHECK(out[got].res.error == NULL && out[got].res.headers == NULL &&
				  out[got].res.body == NULL);
			free_results(out, got);
			return -1;
		}
		check_bytes(out[got].res.error, out[got].res.error ? strlen(out[got].res.error) : 0);
		check_bytes(out[got].res.headers, out[got].res.headers_len);
		check_bytes(out[got].res.body, out[got].res.body_len);
		got++;
	}
	*complete = (uint32) got == n;
	return got;
}

static void
round_trip_report(uint8 flags, const Result *in, int n)
{
	StringInfoData buf;
	Result		again[MAX_ITEMS];
	uint8		flags2;
	bool		complete;

	initStringInfo(&buf);
	wire_put_report_header(&buf, flags, (uint32) n);
	for (int i = 0; i < n; i++)
		wire_put_result(&buf, in[i].transfer, &in[i].res);
	CHECK(decode_report(buf.data, buf.len, &flags2, again, &complete) == n);
	CHECK(complete && flags2 == flags);
	for (int i = 0; i < n; i++)
	{
		const HttpResult *a = &in[i].res;
		const HttpResult *b = &again[i].res;

		CHECK(again[i].transfer == in[i].transfer);
		CHECK(a->curl_code == b->curl_code && a->status == b->status &&
			  a->elapsed_ms == b->elapsed_ms);
		CHECK(a->timed_out == b->timed_out && a->too_large == b->too_large &&
			  a->refused == b->refused && a->permanent == b->permanent);
		CHECK(same_str(a->error, b->error));
		CHECK(same_bytes(a->headers, a->headers_len, b->headers, b->headers_len));
		CHECK(same_bytes(a->body, a->body_len, b->body, b->body_len));
	}
	free_results(again, n);
	pfree(buf.data);
}

/* ---- reply ---- */

static int
decode_reply(const char *data, size_t len, int32 *worker, int32 *wait_ms, bool *has_settings,
			 WireSettings *settings, WireAction *out, bool *complete)
{
	WireReader	r;
	uint32		n;
	int			got = 0;

	wire_reader_init(&r, data, len);
	*complete = false;
	if (!wire_get_reply_header(&r, worker, wait_ms, has_settings, settings, &n))
	{
		CHECK(r.bad);
		return -1;
	}
	CHECK((size_t) n * 9 <= len);
	while ((uint32) got < n && got < MAX_ITEMS)
	{
		WireAction *a = &out[got];

		if (!wire_get_action(&r, a))
		{
			CHECK(r.bad);
			CHECK(a->request.url == NULL && a->request.method == NULL &&
				  a->request.headers == NULL && a->request.body == NULL &&
				  a->idempotency_key == NULL);
			free_actions(out, got);
			free_ptr(settings->allowed_hosts);
			free_ptr(settings->http2_prior_knowledge);
			return -1;
		}
		CHECK(a->kind == WIRE_ACTION_SEND || a->kind == WIRE_ACTION_ABORT);
		if (a->kind == WIRE_ACTION_SEND)
		{
			CHECK(a->request.url != NULL && a->request.method != NULL);
			CHECK(a->request.nheaders >= 0);
			for (int i = 0; i < a->request.nheaders; i++)
				CHECK(a->request.headers[i] != NULL);
			check_bytes(a->request.body, a->request.body_len);
		}
		got++;
	}
	*complete = (uint32) got == n;
	return got;
}

static void
round_trip_reply(int32 worker, int32 wait_ms, bool has_settings, const WireSettings *settings,
				 const WireAction *in, int n)
{
	StringInfoData buf;
	WireAction	again[MAX_ITEMS];
	WireSettings settings2;
	int32		worker2;
	int32		wait2;
	bool		has2;
	bool		complete;
	int			at;

	initStringInfo(&buf);
	/* as the server writes it: a placeholder count, set at the end */
	at = wire_put_reply_header(&buf, worker, wait_ms, has_settings ? settings : NULL, 0);
	for (int i = 0; i < n; i++)
		if (in[i].kind == WIRE_ACTION_SEND)
			wire_put_send(&buf, in[i].transfer, &in[i].request, in[i].idempotency_key,
						  in[i].timeout_ms, in[i].fresh_connection);
		else
			wire_put_abort(&buf, in[i].transfer);
	wire_set_reply_count(&buf, at, (uint32) n);
	CHECK(decode_reply(buf.data, buf.len, &worker2, &wait2, &has2, &settings2, again, &complete) == n);
	CHECK(complete && worker2 == worker && wait2 == wait_ms && has2 == has_settings);
	if (has_settings)
	{
		CHECK(same_str(settings->allowed_hosts, settings2.allowed_hosts));
		CHECK(same_str(settings->http2_prior_knowledge, settings2.http2_prior_knowledge));
		CHECK(settings->max_response_size == settings2.max_response_size &&
			  settings->max_redirects == settings2.max_redirects &&
			  settings->idle_connection_timeout == settings2.idle_connection_timeout);
	}
	for (int i = 0; i < n; i++)
	{
		const WireAction *a = &in[i];
		const WireAction *b = &again[i];

		CHECK(a->kind == b->kind && a->transfer == b->transfer);
		if (a->kind != WIRE_ACTION_SEND)
			continue;
		CHECK(a->timeout_ms == b->timeout_ms && a->fresh_connection == b->fresh_connection);
		CHECK(a->request.has_idempotency_key == b->request.has_idempotency_key &&
			  a->request.has_content_type == b->request.has_content_type &&
			  a->request.body_is_json == b->request.body_is_json);
		CHECK(same_str(a->request.method, b->request.method));
		CHECK(same_str(a->request.url, b->request.url));
		CHECK(same_str(a->idempotency_key, b->idempotency_key));
		CHECK(a->request.nheaders == b->request.nheaders);
		for (int h = 0; h < a->request.nheaders; h++)
			CHECK(strcmp(a->request.headers[h], b->request.headers[h]) == 0);
		CHECK(same_bytes(a->request.body, a->request.body_len, b->request.body, b->request.body_len));
	}
	free_actions(again, n);
	free_ptr(settings2.allowed_hosts);
	free_ptr(settings2.http2_prior_knowledge);
	pfree(buf.data);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* exactly size bytes: a read past the end is ASan's to see */
	char	   *copy = malloc(size ? size : 1);
	Result		results[MAX_ITEMS];
	WireAction	actions[MAX_ITEMS];
	WireSettings settings;
	uint8		flags;
	int32		worker;
	int32		wait_ms;
	bool		has_settings;
	bool		complete;
	int			n;

	CHECK(copy != NULL);
	if (size)
		memcpy(copy, data, size);

	n = decode_report(copy, size, &flags, results, &complete);
	if (n >= 0)
	{
		round_trip_report(flags, results, n);
		free_results(results, n);
	}

	n = decode_reply(copy, size, &worker, &wait_ms, &has_settings, &settings, actions, &complete);
	if (n >= 0)
	{
		round_trip_reply(worker, wait_ms, has_settings, &settings, actions, n);
		free_actions(actions, n);
		free_ptr(settings.allowed_hosts);
		free_ptr(settings.http2_prior_knowledge);
	}

	free(copy);
	return 0;
}
