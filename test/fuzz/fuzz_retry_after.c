/*-------------------------------------------------------------------------
 *
 * fuzz_retry_after.c
 *		libFuzzer target: Retry-After values (retry_after_ms, src/engine/headers.c).
 *
 * Input: the value, up to the first NUL (a header value reaches
 * retry_after_ms as a C string); eight bytes after that NUL, if present, are
 * the current time, so that clocks far from today (and time_t's extremes)
 * are tried too.
 *
 * Invariants: the result is -1 or 0..RETRY_AFTER_MAX_MS; a value of digits
 * only is exactly that many seconds, capped (however many digits); whether
 * a value is valid does not depend on the clock; and a later clock never
 * makes the wait longer.
 *
 *-------------------------------------------------------------------------
 */
#include "fuzz.h"

#include <stdbool.h>

#include "headers.h"

#define CAP_SECONDS (RETRY_AFTER_MAX_MS / 1000)

static bool
blank(char c)
{
	return c == ' ' || c == '\t';
}

/* Delay-seconds, computed another way: -2 if value is not digits only. */
static int64_t
reference_seconds(const char *value)
{
	const char *p = value;
	const char *end = value + strlen(value);
	size_t		significant;

	while (blank(*p))
		p++;
	while (end > p && blank(end[-1]))
		end--;
	if (p == end)
		return -2;
	for (const char *c = p; c < end; c++)
		if (*c < '0' || *c > '9')
			return -2;
	while (p < end - 1 && *p == '0')
		p++;
	significant = end - p;
	if (significant > 4)
		return CAP_SECONDS;
	return (int64_t) atoi(p) < CAP_SECONDS ? atoi(p) : CAP_SECONDS;
}

static int64_t
checked(const char *value, time_t now)
{
	int64_t		ms = retry_after_ms(value, now);

	CHECK(ms == -1 || (ms >= 0 && ms <= RETRY_AFTER_MAX_MS));
	return ms;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const time_t clocks[] = {0, 1700000000, INT64_MAX, INT64_MIN, -1, 253402300799};
	char	   *value = fuzz_cstring(data, size);
	size_t		len = strlen(value);
	int64_t		secs = reference_seconds(value);
	int64_t		first = -1;
	time_t		now = 1700000000;

	if (size >= len + 1 + sizeof(int64_t))
	{
		int64_t		t;

		memcpy(&t, data + len + 1, sizeof(t));
		now = (time_t) t;
	}

	for (size_t i = 0; i <= sizeof(clocks) / sizeof(clocks[0]); i++)
	{
		time_t		t = i < sizeof(clocks) / sizeof(clocks[0]) ? clocks[i] : now;
		int64_t		ms = checked(value, t);

		if (secs != -2)
			CHECK(ms == secs * 1000);
		if (i == 0)
			first = ms;
		CHECK((ms == -1) == (first == -1));
		if (ms != -1 && t < INT64_MAX)
			CHECK(checked(value, t + 1) <= ms);
	}
	CHECK(retry_after_ms(NULL, now) == -1);
	free(value);
	return 0;
}
