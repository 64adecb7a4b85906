/*-------------------------------------------------------------------------
 *
 * headers.c
 *		Splitting a response's raw header block, and reading Retry-After.
 *
 * The block is what libcurl handed http.c's header callback, byte for byte:
 * it comes from the API, so nothing is assumed of it.  Every read is bounded
 * by the block's length (never by a NUL, which the API may send), and a
 * number is never allowed to grow past what it is compared with.
 *
 * No PostgreSQL backend calls here (see headers.h); test/fuzz/fuzz_headers.c
 * and fuzz_retry_after.c run this file alone.
 *
 *-------------------------------------------------------------------------
 */
#include "headers.h"

#include <string.h>

#include <curl/curl.h>

#define RETRY_AFTER_MAX_SECONDS (RETRY_AFTER_MAX_MS / 1000)

static bool
is_blank(char c)
{
	return c == ' ' || c == '\t';
}

/*
 * "HTTP/1.1 200 OK", "HTTP/2 302": the first line of a response.  Compared
 * without case, as request.c always did; no header name contains a '/'.
 */
static bool
is_status_line(const char *line, size_t len)
{
	static const char prefix[] = "HTTP/";

	if (len < sizeof(prefix) - 1)
		return false;
	for (size_t i = 0; i < sizeof(prefix) - 1; i++)
	{
		char		c = line[i];

		if (c >= 'a' && c <= 'z')
			c -= 'a' - 'A';
		if (c != prefix[i])
			return false;
	}
	return true;
}

void
header_iter_init(HeaderIter *it, const char *block, size_t len)
{
	const char *line;

	it->in_field = false;
	if (block == NULL)
	{
		it->next = it->end = NULL;
		return;
	}
	it->next = block;
	it->end = block + len;

	/*
	 * Only the last response's fields count.  http.c keeps one response per
	 * block, but a 100 Continue or a redirect followed by libcurl would
	 * otherwise lend the final response headers (a Retry-After, a
	 * Content-Type) that are not its own.
	 */
	for (line = block; line < it->end;)
	{
		const char *eol = memchr(line, '\n', it->end - line);
		const char *after = eol ? eol + 1 : it->end;

		if (is_status_line(line, after - line))
			it->next = after;
		line = after;
	}
}

/* The value part of a line: blanks trimmed, and the CR of a CRLF ending. */
static void
trim_value(const char *v, const char *v_end, HeaderField *field)
{
	while (v < v_end && is_blank(*v))
		v++;
	while (v_end > v && (v_end[-1] == '\r' || is_blank(v_end[-1])))
		v_end--;
	field->value = v;
	field->value_len = v_end - v;
}

bool
header_iter_next(HeaderIter *it, HeaderField *field)
{
	while (it->next < it->end)
	{
		const char *line = it->next;
		const char *eol = memchr(line, '\n', it->end - line);
		const char *line_end = eol ? eol : it->end;
		bool		continues = it->in_field;
		const char *colon;

		it->next = eol ? eol + 1 : it->end;
		it->in_field = false;

		/*
		 * A line that starts with a blank continues the previous field
		 * (obsolete line folding, RFC 9112 section 5.2: the value goes on).
		 * After anything but a field there is nothing to continue.
		 */
		if (is_blank(*line))
		{
			if (!continues)
				continue;
			it->in_field = true;
			trim_value(line, line_end, field);
			if (field->value_len == 0)
				continue;
			field->name = NULL;
			field->name_len = 0;
			field->continuation = true;
			return true;
		}

		/* no colon, or nothing before it: not a field (a blank line, junk) */
		colon = memchr(line, ':', line_end - line);
		if (colon == NULL || colon == line || is_status_line(line, line_end - line))
			continue;

		it->in_field = true;
		field->name = line;
		field->name_len = colon - line;
		field->continuation = false;
		trim_value(colon + 1, line_end, field);
		return true;
	}
	return false;
}

/*
 * RFC 9110 section 10.2.3: Retry-After = HTTP-date / delay-seconds, and
 * delay-seconds = 1*DIGIT.  A sign, a fraction or trailing junk makes the
 * value no number (curl_getdate then rejects it too, or reads a date).  A
 * number of any length counts: its digits are read only until the cap is
 * reached, so "99999999999999999999" is the longest wait, not an overflow.
 */
int64_t
retry_after_ms(const char *value, time_t now)
{
	const char *p;
	const char *end;
	time_t		when;
	uint64_t	wait;

	if (value == NULL)
		return -1;
	p = value;
	end = value + strlen(value);
	while (p < end && is_blank(*p))
		p++;
	while (end > p && is_blank(end[-1]))
		end--;
	if (p < end && strspn(p, "0123456789") == (size_t) (end - p))
	{
		int64_t		secs = 0;

		for (; p < end; p++)
		{
			secs = secs * 10 + (*p - '0');
			if (secs >= RETRY_AFTER_MAX_SECONDS)
				return RETRY_AFTER_MAX_MS;
		}
		return secs * 1000;
	}

	/* -1 is curl_getdate's failure; other times before 1970 have passed */
	when = curl_getdate(value, NULL);
	if (when == -1)
		return -1;
	if (when <= now)
		return 0;

	/* when > now, so the difference fits in 64 unsigned bits whatever now is */
	wait = (uint64_t) when - (uint64_t) now;
	if (wait >= RETRY_AFTER_MAX_SECONDS)
		return RETRY_AFTER_MAX_MS;
	return (int64_t) wait * 1000;
}
