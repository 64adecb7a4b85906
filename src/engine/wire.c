/*-------------------------------------------------------------------------
 *
 * wire.c
 *		Encoding and decoding the messages of a turn (see wire.h).
 *
 * Both ends run this file: the server (src/server/remote.c) writes replies
 * and reads reports, jobloop-worker the reverse.  Each side reads what the
 * other sent as hostile: every read is checked against the bytes left
 * before it is made, a count is checked against the smallest size its
 * items could have in the bytes left (so that no count makes us allocate
 * for items that are not there), and once anything is wrong the reader is
 * bad and every later read fails at once, leaving nothing of the item it
 * was reading allocated.  Only palloc and StringInfo are
 * used, so the file builds into the backend, into jobloop-worker and into
 * the libFuzzer target test/fuzz/fuzz_wire.c alike.
 *
 *-------------------------------------------------------------------------
 */
#include "wire.h"

#define WIRE_NULL_LEN	0xFFFFFFFFu
#define WIRE_MAX_BYTES	((uint32) 0x3FFFFFFF)	/* 1 GB - 1: what palloc can hold */

/* The smallest encodings, to check counts against the bytes left. */
#define MIN_RESULT_SIZE	(8 + 4 + 1 + 4 + 8 + 4 + 4 + 4)
#define MIN_ACTION_SIZE	(1 + 8)
#define MIN_STRING_SIZE	4

/* ---- writing ---- */

static void
put_u8(StringInfo buf, uint8 v)
{
	appendStringInfoChar(buf, (char) v);
}

static void
put_u32(StringInfo buf, uint32 v)
{
	char		b[4];

	b[0] = (char) (v >> 24);
	b[1] = (char) (v >> 16);
	b[2] = (char) (v >> 8);
	b[3] = (char) v;
	appendBinaryStringInfo(buf, b, 4);
}

static void
put_u64(StringInfo buf, uint64 v)
{
	put_u32(buf, (uint32) (v >> 32));
	put_u32(buf, (uint32) v);
}

/* A byte string of len bytes, or NULL. */
static void
put_bytes(StringInfo buf, const char *data, size_t len)
{
	if (data == NULL)
	{
		put_u32(buf, WIRE_NULL_LEN);
		return;
	}
	Assert(len <= WIRE_MAX_BYTES);
	put_u32(buf, (uint32) len);
	appendBinaryStringInfo(buf, data, (int) len);
}

static void
put_str(StringInfo buf, const char *s)
{
	put_bytes(buf, s, s ? strlen(s) : 0);
}

/* ---- reading ---- */

void
wire_reader_init(WireReader *r, const char *data, size_t len)
{
	r->p = data;
	r->end = data + len;
	r->bad = data == NULL && len > 0;
}

bool
wire_at_end(const WireReader *r)
{
	return !r->bad && r->p == r->end;
}

static size_t
bytes_left(const WireReader *r)
{
	return r->bad ? 0 : (size_t) (r->end - r->p);
}

/* The next n bytes, or NULL (and the reader bad) if there are not that many. */
static const unsigned char *
take(WireReader *r, size_t n)
{
	const unsigned char *at;

	if (r->bad || bytes_left(r) < n)
	{
		r->bad = true;
		return NULL;
	}
	at = (const unsigned char *) r->p;
	r->p += n;
	return at;
}

static uint8
get_u8(WireReader *r)
{
	const unsigned char *b = take(r, 1);

	return b ? b[0] : 0;
}

static uint32
get_u32(WireReader *r)
{
	const unsigned char *b = take(r, 4);

	if (b == NULL)
		return 0;
	return ((uint32) b[0] << 24) | ((uint32) b[1] << 16) | ((uint32) b[2] << 8) | (uint32) b[3];
}

static uint64
get_u64(WireReader *r)
{
	uint64		hi = get_u32(r);

	return (hi << 32) | get_u32(r);
}

static int32
get_i32(WireReader *r)
{
	return (int32) get_u32(r);
}

static int64
get_i64(WireReader *r)
{
	return (int64) get_u64(r);
}

/*
 * A byte string: a palloc'd, NUL-terminated copy in *out (NULL for the
 * NULL string) and its length in *len.  False (reader bad) if its length
 * passes the end or 1 GB.
 */
static bool
get_bytes(WireReader *r, char **out, size_t *len)
{
	uint32		n = get_u32(r);
	const unsigned char *data;

	*out = NULL;
	*len = 0;
	if (r->bad)
		return false;
	if (n == WIRE_NULL_LEN)
		return true;
	if (n > WIRE_MAX_BYTES || (data = take(r, n)) == NULL)
	{
		r->bad = true;
		return false;
	}
	*out = palloc(n + 1);
	memcpy(*out, data, n);
	(*out)[n] = '\0';
	*len = n;
	return true;
}

/* A string: as get_bytes, but one with a NUL inside is garbage. */
static bool
get_str(WireReader *r, char **out)
{
	size_t		len;

	if (!get_bytes(r, out, &len))
		return false;
	if (*out != NULL && strlen(*out) != len)
	{
		pfree(*out);
		*out = NULL;
		r->bad = true;
		return false;
	}
	return true;
}

/* A string that must be there: NULL is garbage. */
static bool
get_str_not_null(WireReader *r, char **out)
{
	if (!get_str(r, out))
		return false;
	if (*out == NULL)
		r->bad = true;
	return !r->bad;
}

static bool
get_magic(WireReader *r, const char *magic)
{
	const unsigned char *b = take(r, 4);

	if (b == NULL || memcmp(b, magic, 4) != 0)
		r->bad = true;
	return !r->bad;
}

static void
free_str(char **s)
{
	if (*s != NULL)
		pfree(*s);
	*s = NULL;
}

/* ---- the report ---- */

void
wire_put_report_header(StringInfo buf, uint8 flags, uint32 nresults)
{
	appendBinaryStringInfo(buf, WIRE_REPORT_MAGIC, 4);
	put_u8(buf, flags);
	put_u32(buf, nresults);
}

void
wire_put_result(StringInfo buf, int64 transfer, const HttpResult *res)
{
	uint8		flags = (res->timed_out ? RESULT_TIMED_OUT : 0) |
		(res->too_large ? RESULT_TOO_LARGE : 0) |
		(res->refused ? RESULT_REFUSED : 0) |
		(res->permanent ? RESULT_PERMANENT : 0);

	put_u64(buf, (uint64) transfer);
	put_u32(buf, (uint32) res->curl_code);
	put_u8(buf, flags);
	put_u32(buf, (uint32) (int32) res->status);
	put_u64(buf, (uint64) res->elapsed_ms);
	put_str(buf, res->error);
	put_bytes(buf, res->headers, res->headers ? res->headers_len : 0);
	put_bytes(buf, res->body, res->body ? res->body_len : 0);
}

bool
wire_get_report_header(WireReader *r, uint8 *flags, uint32 *nresults)
{
	if (!get_magic(r, WIRE_REPORT_MAGIC))
		return false;
	*flags = get_u8(r);
	*nresults = get_u32(r);
	if (!r->bad && *nresults > bytes_left(r) / MIN_RESULT_SIZE)
		r->bad = true;
	return !r->bad;
}

bool
wire_get_result(WireReader *r, int64 *transfer, HttpResult *res)
{
	uint8		flags;

	memset(res, 0, sizeof(*res));
	*transfer = get_i64(r);
	res->curl_code = get_i32(r);
	flags = get_u8(r);
	res->timed_out = (flags & RESULT_TIMED_OUT) != 0;
	res->too_large = (flags & RESULT_TOO_LARGE) != 0;
	res->refused = (flags & RESULT_REFUSED) != 0;
	res->permanent = (flags & RESULT_PERMANENT) != 0;
	res->status = get_i32(r);
	res->elapsed_ms = get_i64(r);
	if (r->bad ||
		!get_str(r, &res->error) ||
		!get_bytes(r, &res->headers, &res->headers_len) ||
		!get_bytes(r, &res->body, &res->body_len))
	{
		/* nothing of a result that failed is left allocated */
		r->bad = true;
		free_str(&res->error);
		free_str(&res->headers);
		free_str(&res->body);
		res->headers_len = res->body_len = 0;
		return false;
	}
	return true;
}

/* ---- the reply ---- */

int
wire_put_reply_header(StringInfo buf, int32 worker, int32 wait_ms,
					  const WireSettings *settings, uint32 nactions)
{
	int			count_offset;

	appendBinaryStringInfo(buf, WIRE_REPLY_MAGIC, 4);
	put_u32(buf, (uint32) worker);
	put_u32(buf, (uint32) wait_ms);
	put_u8(buf, settings != NULL);
	if (settings != NULL)
	{
		put_str(buf, settings->allowed_hosts);
		put_u32(buf, (uint32) settings->max_response_size);
		put_u32(buf, (uint32) settings->max_redirects);
		put_u32(buf, (uint32) settings->idle_connection_timeout);
		put_str(buf, settings->http2_prior_knowledge);
	}
	count_offset = buf->len;
	put_u32(buf, nactions);
	return count_offset;
}

void
wire_set_reply_count(StringInfo buf, int count_offset, uint32 nactions)
{
	unsigned char *b = (unsigned char *) buf->data + count_offset;

	Assert(count_offset >= 0 && count_offset + 4 <= buf->len);
	b[0] = (unsigned char) (nactions >> 24);
	b[1] = (unsigned char) (nactions >> 16);
	b[2] = (unsigned char) (nactions >> 8);
	b[3] = (unsigned char) nactions;
}

void
wire_put_send(StringInfo buf, int64 transfer, const HttpRequest *req,
			  const char *idempotency_key, int32 timeout_ms, bool fresh_connection)
{
	uint8		flags = (fresh_connection ? SEND_FRESH_CONNECTION : 0) |
		(req->has_idempotency_key ? SEND_HAS_IDEMPOTENCY_KEY : 0) |
		(req->has_content_type ? SEND_HAS_CONTENT_TYPE : 0) |
		(req->body_is_json ? SEND_BODY_IS_JSON : 0);

	put_u8(buf, WIRE_ACTION_SEND);
	put_u64(buf, (uint64) transfer);
	put_u32(buf, (uint32) timeout_ms);
	put_u8(buf, flags);
	put_str(buf, req->method);
	put_str(buf, req->url);
	put_str(buf, idempotency_key);
	put_u32(buf, (uint32) req->nheaders);
	for (int i = 0; i < req->nheaders; i++)
		put_str(buf, req->headers[i]);
	put_bytes(buf, req->body, req->body ? req->body_len : 0);
}

void
wire_put_abort(StringInfo buf, int64 transfer)
{
	put_u8(buf, WIRE_ACTION_ABORT);
	put_u64(buf, (uint64) transfer);
}

bool
wire_get_reply_header(WireReader *r, int32 *worker, int32 *wait_ms,
					  bool *has_settings, WireSettings *settings, uint32 *nactions)
{
	uint8		has;

	memset(settings, 0, sizeof(*settings));
	*has_settings = false;
	if (!get_magic(r, WIRE_REPLY_MAGIC))
		return false;
	*worker = get_i32(r);
	*wait_ms = get_i32(r);
	has = get_u8(r);
	if (has > 1)
		r->bad = true;
	if (!r->bad && has)
	{
		*has_settings = true;
		if (get_str(r, &settings->allowed_hosts))
		{
			settings->max_response_size = get_i32(r);
			settings->max_redirects = get_i32(r);
			settings->idle_connection_timeout = get_i32(r);
			(void) get_str(r, &settings->http2_prior_knowledge);
		}
	}
	*nactions = get_u32(r);
	if (!r->bad && *nactions > bytes_left(r) / MIN_ACTION_SIZE)
		r->bad = true;
	if (r->bad)
	{
		free_str(&settings->allowed_hosts);
		free_str(&settings->http2_prior_knowledge);
		*has_settings = false;
	}
	return !r->bad;
}

/* The request of a send action, after its transfer id. */
static bool
get_send(WireReader *r, WireAction *action)
{
	HttpRequest *req = &action->request;
	uint8		flags;
	uint32		nheaders;

	action->timeout_ms = get_i32(r);
	flags = get_u8(r);
	action->fresh_connection = (flags & SEND_FRESH_CONNECTION) != 0;
	req->has_idempotency_key = (flags & SEND_HAS_IDEMPOTENCY_KEY) != 0;
	req->has_content_type = (flags & SEND_HAS_CONTENT_TYPE) != 0;
	req->body_is_json = (flags & SEND_BODY_IS_JSON) != 0;
	if (r->bad ||
		!get_str_not_null(r, &req->method) ||
		!get_str_not_null(r, &req->url) ||
		!get_str(r, &action->idempotency_key))
		return false;
	/* http_start writes an Idempotency-Key header of its own unless the request has one */
	if (action->idempotency_key == NULL && !req->has_idempotency_key)
	{
		r->bad = true;
		return false;
	}
	nheaders = get_u32(r);
	if (r->bad || nheaders > bytes_left(r) / MIN_STRING_SIZE)
	{
		r->bad = true;
		return false;
	}
	req->nheaders = (int) nheaders;
	req->headers = nheaders > 0 ? palloc(nheaders * sizeof(char *)) : NULL;
	for (uint32 i = 0; i < nheaders; i++)
		if (!get_str_not_null(r, &req->headers[i]))
		{
			req->nheaders = (int) i;
			return false;
		}
	return get_bytes(r, &req->body, &req->body_len);
}

void
wire_free_action(WireAction *action)
{
	HttpRequest *req = &action->request;

	for (int i = 0; i < req->nheaders; i++)
		free_str(&req->headers[i]);
	if (req->headers != NULL)
		pfree(req->headers);
	req->headers = NULL;
	req->nheaders = 0;
	free_str(&req->method);
	free_str(&req->url);
	free_str(&req->body);
	req->body_len = 0;
	free_str(&action->idempotency_key);
}

bool
wire_get_action(WireReader *r, WireAction *action)
{
	memset(action, 0, sizeof(*action));
	action->kind = (char) get_u8(r);
	action->transfer = get_i64(r);
	if (r->bad)
		return false;
	if (action->kind == WIRE_ACTION_ABORT)
		return true;
	if (action->kind != WIRE_ACTION_SEND)
	{
		r->bad = true;
		return false;
	}
	if (!get_send(r, action))
	{
		/* nothing of an action that failed is left allocated */
		r->bad = true;
		wire_free_action(action);
		return false;
	}
	return true;
}
