/*-------------------------------------------------------------------------
 *
 * wire.h
 *		The messages of a turn between jobloop-worker and the server.
 *
 * An external worker calls jobloop.worker_turn(report bytea) RETURNS bytea
 * once per turn, both values in binary format.  The report carries the
 * results of the calls that finished since the last turn; the reply carries
 * the calls to start and to abort, and when to come back at the latest.
 * Both sides encode and decode with this file, so the format exists once.
 *
 * Integers are big-endian.  A string or byte string is a uint32 length and
 * the bytes; the length 0xFFFFFFFF stands for NULL.  Decoding treats its
 * input as hostile: a length past the end, a count beyond the bytes left or
 * an unknown record kind makes the reader bad, never an overrun; decoded
 * strings are palloc'd copies with a terminating NUL.
 *
 *   report:  "JLR1"  u8 flags (REPORT_WOKEN)  u32 n  n x result
 *   result:  i64 transfer  i32 curl_code  u8 flags (RESULT_*)  i32 status
 *            i64 elapsed_ms  str error  bytes headers  bytes body
 *   reply:   "JLA1"  i32 worker  i32 wait_ms  u8 has_settings
 *            [str allowed_hosts  i32 max_response_size  i32 max_redirects
 *             i32 idle_connection_timeout  str http2_prior_knowledge]
 *            u32 n  n x action
 *   action:  u8 'S'  i64 transfer  i32 timeout_ms  u8 flags (SEND_*)
 *                    str method  str url  str idempotency_key
 *                    u32 nheaders  nheaders x str  bytes body
 *            u8 'A'  i64 transfer
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_WIRE_H
#define JOBLOOP_WIRE_H

#include "engine.h"
#include "lib/stringinfo.h"

#define WIRE_REPORT_MAGIC	"JLR1"
#define WIRE_REPLY_MAGIC	"JLA1"

#define REPORT_WOKEN		0x01	/* a notification said there may be work or a cancel */

#define RESULT_TIMED_OUT	0x01
#define RESULT_TOO_LARGE	0x02
#define RESULT_REFUSED		0x04
#define RESULT_PERMANENT	0x08

#define SEND_FRESH_CONNECTION	0x01
#define SEND_HAS_IDEMPOTENCY_KEY 0x02
#define SEND_HAS_CONTENT_TYPE	0x04
#define SEND_BODY_IS_JSON		0x08

#define WIRE_ACTION_SEND	'S'
#define WIRE_ACTION_ABORT	'A'

/* The engine's settings that the server decides for every worker. */
typedef struct WireSettings
{
	char	   *allowed_hosts;
	int32		max_response_size;
	int32		max_redirects;
	int32		idle_connection_timeout;
	char	   *http2_prior_knowledge;
} WireSettings;

/* One action of a reply, decoded. */
typedef struct WireAction
{
	char		kind;			/* WIRE_ACTION_SEND or WIRE_ACTION_ABORT */
	int64		transfer;
	/* WIRE_ACTION_SEND only: */
	HttpRequest request;		/* url, method, headers, body, flags; timeout_ms 0 */
	char	   *idempotency_key;	/* NULL: none */
	int32		timeout_ms;
	bool		fresh_connection;
} WireAction;

typedef struct WireReader
{
	const char *p;
	const char *end;
	bool		bad;			/* ran past the end or found garbage: stop */
} WireReader;

extern void wire_reader_init(WireReader *r, const char *data, size_t len);
extern bool wire_at_end(const WireReader *r);

/* report (jobloop-worker writes, the server reads) */
extern void wire_put_report_header(StringInfo buf, uint8 flags, uint32 nresults);
extern void wire_put_result(StringInfo buf, int64 transfer, const HttpResult *res);
extern bool wire_get_report_header(WireReader *r, uint8 *flags, uint32 *nresults);
extern bool wire_get_result(WireReader *r, int64 *transfer, HttpResult *res);

/* reply (the server writes, jobloop-worker reads) */
extern int	wire_put_reply_header(StringInfo buf, int32 worker, int32 wait_ms,
								  const WireSettings *settings /* NULL: unchanged */ ,
								  uint32 nactions);
extern void wire_put_send(StringInfo buf, int64 transfer, const HttpRequest *req,
						  const char *idempotency_key, int32 timeout_ms, bool fresh_connection);
extern void wire_put_abort(StringInfo buf, int64 transfer);
extern bool wire_get_reply_header(WireReader *r, int32 *worker, int32 *wait_ms,
								  bool *has_settings, WireSettings *settings, uint32 *nactions);
extern bool wire_get_action(WireReader *r, WireAction *action);
extern void wire_free_action(WireAction *action);	/* what wire_get_action allocated */

/*
 * The header of a reply is written before its actions are known: the
 * server writes a placeholder count and sets it when the reply is done.
 * count_offset is what wire_put_reply_header returned (where its count is).
 */
extern void wire_set_reply_count(StringInfo buf, int count_offset, uint32 nactions);

#endif							/* JOBLOOP_WIRE_H */
