/*-------------------------------------------------------------------------
 *
 * headers.h
 *		Splitting a response's raw header block, and reading Retry-After.
 *
 * Plain C with no PostgreSQL backend calls (libc, and libcurl only for
 * curl_getdate), so that request.c and a libFuzzer target (test/fuzz) run
 * the same code on what an API sent.  Nothing here allocates: a field
 * points into the block it came from.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_HEADERS_H
#define JOBLOOP_HEADERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* The longest wait a Retry-After may ask for; a longer one is cut to this. */
#define RETRY_AFTER_MAX_MS	(3600 * 1000)

/*
 * One header line of the block, or the continuation of the previous one.
 * name is what comes before the line's first colon (never empty, case as
 * sent); value is the rest with surrounding blanks and CRs trimmed, and may
 * be empty.  Neither is NUL-terminated, and either may contain NUL bytes.
 */
typedef struct HeaderField
{
	const char *name;			/* NULL for a continuation */
	size_t		name_len;
	const char *value;
	size_t		value_len;
	bool		continuation;	/* more of the previous field's value */
} HeaderField;

typedef struct HeaderIter
{
	const char *next;			/* the next line to read */
	const char *end;			/* the end of the block */
	bool		in_field;		/* the last line was a field: a folded line continues it */
} HeaderIter;

/*
 * Start reading a block of len bytes (block may be NULL when len is 0).
 * The block need not be NUL-terminated.
 */
extern void header_iter_init(HeaderIter *it, const char *block, size_t len);

/* The next field of the block into *field; false at the end. */
extern bool header_iter_next(HeaderIter *it, HeaderField *field);

/*
 * A Retry-After value (NUL-terminated, or NULL for none) as milliseconds
 * from now, at most RETRY_AFTER_MAX_MS; 0 for a date that has passed, -1
 * for a value that is neither delay-seconds nor an HTTP date.
 */
extern int64_t retry_after_ms(const char *value, time_t now);

#endif							/* JOBLOOP_HEADERS_H */
