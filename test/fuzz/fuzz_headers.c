/*-------------------------------------------------------------------------
 *
 * fuzz_headers.c
 *		libFuzzer target: a response's raw header block (src/engine/headers.c).
 *
 * The input is the block, exactly as libcurl could hand it over: any
 * bytes, CRLF or LF lines, NULs, status lines, folded lines.  libFuzzer's
 * buffer is exactly size bytes long, so ASan catches a read one past it.
 *
 * Besides not crashing, the iterator must agree with a reference that reads
 * the block another way -- line by line, starting over at each status line
 * instead of looking for the last one first -- and every field must be
 * inside the block, trimmed, and free of line ends.  Retry-After values
 * found on the way go through retry_after_ms as request.c would pass them.
 *
 *-------------------------------------------------------------------------
 */
#include "fuzz.h"

#include <stdbool.h>
#include <strings.h>

#include "headers.h"

#define MAX_FIELDS	(160 * 1024)

static bool
blank(char c)
{
	return c == ' ' || c == '\t';
}

/* The reference: all fields of the block, restarting at each status line. */
static size_t
reference_fields(const char *block, size_t len, HeaderField *out)
{
	size_t		n = 0;
	size_t		start = 0;
	bool		in_field = false;

	while (start < len)
	{
		size_t		end = start;
		size_t		v,
					v_end,
					colon;

		while (end < len && block[end] != '\n')
			end++;
		if (end - start >= 5 && strncasecmp(block + start, "HTTP/", 5) == 0)
		{
			n = 0;
			in_field = false;
		}
		else if (blank(block[start]))
		{
			if (in_field)
			{
				for (v = start; v < end && blank(block[v]); v++)
					;
				for (v_end = end; v_end > v && (block[v_end - 1] == '\r' || blank(block[v_end - 1])); v_end--)
					;
				if (v_end > v)
					out[n++] = (HeaderField) {NULL, 0, block + v, v_end - v, true};
			}
		}
		else
		{
			for (colon = start; colon < end && block[colon] != ':'; colon++)
				;
			in_field = colon < end && colon > start;
			if (in_field)
			{
				for (v = colon + 1; v < end && blank(block[v]); v++)
					;
				for (v_end = end; v_end > v && (block[v_end - 1] == '\r' || blank(block[v_end - 1])); v_end--)
					;
				out[n++] = (HeaderField) {block + start, colon - start, block + v, v_end - v, false};
			}
		}
		start = end + 1;
	}
	return n;
}

static void
check_retry_after(const HeaderField *f)
{
	char	   *value = malloc(f->value_len + 1);
	int64_t		ms;

	CHECK(value != NULL);
	memcpy(value, f->value, f->value_len);
	value[f->value_len] = '\0';
	ms = retry_after_ms(value, 1700000000);
	CHECK(ms == -1 || (ms >= 0 && ms <= RETRY_AFTER_MAX_MS));
	free(value);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static HeaderField want[MAX_FIELDS];
	const char *block = (const char *) data;
	HeaderIter	it;
	HeaderField f;
	size_t		nwant;
	size_t		n = 0;
	const char *prev_end = block;

	/* a line holds at least one byte and a field comes from one line */
	if (size / 2 + 1 > MAX_FIELDS)
		return -1;
	nwant = reference_fields(block, size, want);

	header_iter_init(&it, block, size);
	while (header_iter_next(&it, &f))
	{
		CHECK(n < nwant);
		CHECK(f.continuation == want[n].continuation);
		CHECK(f.name == want[n].name && f.name_len == want[n].name_len);
		CHECK(f.value == want[n].value && f.value_len == want[n].value_len);

		/* inside the block, in order, on one line, trimmed */
		CHECK(f.value >= prev_end && f.value + f.value_len <= block + size);
		CHECK(memchr(f.value, '\n', f.value_len) == NULL);
		if (f.value_len > 0)
		{
			CHECK(!blank(f.value[0]));
			CHECK(!blank(f.value[f.value_len - 1]) && f.value[f.value_len - 1] != '\r');
		}
		if (f.continuation)
		{
			CHECK(n > 0 && f.name == NULL && f.value_len > 0);
		}
		else
		{
			CHECK(f.name >= prev_end && f.name_len > 0 && f.name + f.name_len < f.value);
			CHECK(f.name[f.name_len] == ':' && !blank(f.name[0]));
			CHECK(memchr(f.name, '\n', f.name_len) == NULL);
			CHECK(memchr(f.name, ':', f.name_len) == NULL);
			if (f.name_len == 11 && strncasecmp(f.name, "retry-after", 11) == 0)
				check_retry_after(&f);
		}
		prev_end = f.value + f.value_len;
		n++;
	}
	CHECK(n == nwant);
	CHECK(!header_iter_next(&it, &f));	/* and it stays at the end */

	/* no block at all: http.c has none when no response arrived */
	header_iter_init(&it, NULL, 0);
	CHECK(!header_iter_next(&it, &f));
	return 0;
}
