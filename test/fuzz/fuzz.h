/*-------------------------------------------------------------------------
 *
 * fuzz.h
 *		What the libFuzzer targets of test/fuzz share.
 *
 * A broken invariant must be a crash, or libFuzzer would not keep the
 * input: CHECK prints what failed and aborts.  (assert() would vanish
 * under -DNDEBUG.)
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_FUZZ_H
#define JOBLOOP_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "fuzz: %s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
			abort(); \
		} \
	} while (0)

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * A malloc'd, NUL-terminated copy of the first len bytes of data, cut at
 * the first NUL: what a C string built from these bytes would hold.
 */
static inline char *
fuzz_cstring(const uint8_t *data, size_t len)
{
	size_t		n = strnlen((const char *) data, len);
	char	   *s = malloc(n + 1);

	CHECK(s != NULL);
	memcpy(s, data, n);
	s[n] = '\0';
	return s;
}

#endif							/* JOBLOOP_FUZZ_H */
