/*-------------------------------------------------------------------------
 *
 * fuzz_allowlist.c
 *		libFuzzer target: jobloop.allowed_hosts and address classification
 *		(src/engine/allowlist.c).
 *
 * Input: the setting's text, up to the first NUL (a GUC string cannot hold
 * one).  After that NUL, optionally: a byte n, then n (at most 7) probes of
 * 17 bytes (a family byte, odd for IPv6, and 16 address bytes), then a host
 * name, all bytes to the end, to match them with.
 *
 * A typo in this setting must never widen it, so a list that parses is held
 * to a reference reading of the same text: every entry is exactly "*", an
 * IP address, an address and a prefix length of digits only, or a host
 * name; and allowlist_match allows exactly what that reading allows --
 * neither more (an open guard) nor less.  Addresses are passed in buffers of
 * exactly 4 or 16 bytes, so ASan catches a read past them, and the IPv4
 * ranges the guard exists for must never be called public, in any form.
 *
 *-------------------------------------------------------------------------
 */
#include "fuzz.h"

#include <arpa/inet.h>
#include <stdbool.h>
#include <strings.h>
#include <sys/socket.h>

#include "allowlist.h"

#define MAX_PROBES	7
#define PROBE_LEN	17

static bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* ---- the reference reading of one entry ---- */

/* Is e what the text entry [p, p + len) says? */
static bool
entry_says(const AllowEntry *e, const char *p, size_t len)
{
	char		buf[64];
	const char *slash = memchr(p, '/', len);
	size_t		addr_len = slash ? (size_t) (slash - p) : len;
	unsigned char addr[16];
	int			family;
	int			maxbits;
	long		bits;

	for (size_t i = 0; i < len; i++)
		if (is_space(p[i]))
			return false;		/* "192.168.1.10/ 24" */
	if (len == 1 && p[0] == '*')
		return e->kind == ALLOW_ANY;

	if (addr_len < sizeof(buf))
	{
		memcpy(buf, p, addr_len);
		buf[addr_len] = '\0';
		family = inet_pton(AF_INET, buf, addr) == 1 ? AF_INET :
			inet_pton(AF_INET6, buf, addr) == 1 ? AF_INET6 : 0;
	}
	else
		family = 0;

	if (family == 0)
	{
		/* a host name: no '/', the name itself, one trailing dot aside */
		if (slash || e->kind != ALLOW_HOST)
			return false;
		if (len > 1 && p[len - 1] == '.')
			len--;
		return strlen(e->host) == len && strncasecmp(e->host, p, len) == 0;
	}

	maxbits = family == AF_INET ? 32 : 128;
	bits = maxbits;
	if (slash)
	{
		/* digits, at least one ("127.0.0.1/", "10.1.2.3/abc" are errors) */
		const char *d = slash + 1;
		const char *end = p + len;

		if (d == end)
			return false;
		for (bits = 0; d < end; d++)
		{
			if (*d < '0' || *d > '9')
				return false;
			bits = bits * 10 + (*d - '0');
			if (bits > maxbits)
				return false;
		}
	}
	return e->kind == ALLOW_NETWORK && e->family == family && e->bits == bits &&
		memcmp(e->addr, addr, family == AF_INET ? 4 : 16) == 0;
}

/* A parsed list against the text: one entry per non-empty item, each right. */
static void
check_list(const AllowList *list, const char *text)
{
	const char *p = text;
	int			i = 0;

	CHECK(list->count >= 0);
	for (;;)
	{
		const char *comma = strchr(p, ',');
		const char *stop = comma ? comma : p + strlen(p);

		while (p < stop && is_space(*p))
			p++;
		while (stop > p && is_space(stop[-1]))
			stop--;
		if (stop > p)
		{
			const AllowEntry *e;

			CHECK(i < list->count);
			e = &list->entries[i];
			CHECK(e->kind == ALLOW_ANY || e->kind == ALLOW_NETWORK || e->kind == ALLOW_HOST);
			if (e->kind == ALLOW_NETWORK)
				CHECK((e->family == AF_INET && e->bits >= 0 && e->bits <= 32) ||
					  (e->family == AF_INET6 && e->bits >= 0 && e->bits <= 128));
			if (e->kind == ALLOW_HOST)
				CHECK(memchr(e->host, '\0', sizeof(e->host)) != NULL && e->host[0] != '\0');
			if (!entry_says(e, p, stop - p))
			{
				fprintf(stderr, "fuzz: entry %d parsed from \"%.*s\" is not what it says\n",
						i, (int) (stop - p), p);
				CHECK(!"entry as written");
			}
			i++;
		}
		if (comma == NULL)
			break;
		p = comma + 1;
	}
	CHECK(i == list->count);
}

/* ---- the reference of allowlist_match ---- */

static bool
in_network(const unsigned char *addr, const unsigned char *net, int bits)
{
	for (int b = 0; b < bits; b++)
		if (((addr[b / 8] ^ net[b / 8]) >> (7 - b % 8)) & 1)
			return false;
	return true;
}

/* Host names compare without case; "example.com." is "example.com". */
static bool
same_host(const char *host, const char *entry)
{
	size_t		len = strlen(host);

	if (len > 1 && host[len - 1] == '.')
		len--;
	return strlen(entry) == len && strncasecmp(host, entry, len) == 0;
}

static bool
reference_match(const AllowList *list, int family, const unsigned char *addr,
				const unsigned char *v4, const char *host)
{
	for (int i = 0; list && i < list->count; i++)
	{
		const AllowEntry *e = &list->entries[i];

		if (e->kind == ALLOW_ANY)
			return true;
		if (e->kind == ALLOW_HOST && host && same_host(host, e->host))
			return true;
		if (e->kind == ALLOW_NETWORK && e->family == family && in_network(addr, e->addr, e->bits))
			return true;
		if (e->kind == ALLOW_NETWORK && e->family == AF_INET && v4 && in_network(v4, e->addr, e->bits))
			return true;
	}
	return false;
}

/* ---- classification ---- */

/* IPv4 ranges that are never public: what the guard is for. */
static bool
v4_never_public(const unsigned char *a)
{
	return a[0] == 0 || a[0] == 10 || a[0] == 127 || (a[0] == 169 && a[1] == 254) ||
		(a[0] == 172 && (a[1] & 0xF0) == 16) || (a[0] == 192 && a[1] == 168) ||
		(a[0] == 100 && (a[1] & 0xC0) == 64) || a[0] >= 224;
}

/*
 * Classify addr and match it with the list (and with no list); returns the
 * classification.  addr is copied into a buffer of exactly its length.
 */
static const char *
probe(const AllowList *list, int family, const unsigned char *bytes, const char *host)
{
	size_t		len = family == AF_INET ? 4 : 16;
	unsigned char *addr = malloc(len);
	const unsigned char *v4 = (const unsigned char *) "junk";
	const char *why;

	CHECK(addr != NULL);
	memcpy(addr, bytes, len);
	why = allowlist_classify(family, addr, &v4);
	CHECK(why == NULL || why[0] != '\0');
	if (family == AF_INET)
	{
		CHECK(v4 == NULL);
		if (v4_never_public(addr))
			CHECK(why != NULL);
	}
	else
	{
		static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
		static const unsigned char zero[16] = {0};

		CHECK(v4 == NULL || (v4 >= addr && v4 + 4 <= addr + 16));
		if (memcmp(addr, mapped, 12) == 0)
			CHECK(v4 == addr + 12);
		if (v4 && v4_never_public(v4))
			CHECK(why != NULL);
		if (memcmp(addr, zero, 15) == 0 ||	/* ::, ::1 */
			(addr[0] & 0xFE) == 0xFC ||		/* unique local */
			(addr[0] == 0xFE && (addr[1] & 0xC0) == 0x80) ||	/* link-local */
			addr[0] == 0xFF)	/* multicast */
			CHECK(why != NULL);
	}
	CHECK(allowlist_match(list, family, addr, v4, host) ==
		  reference_match(list, family, addr, v4, host));
	CHECK(!allowlist_match(NULL, family, addr, v4, host));
	free(addr);
	return why;
}

/* An entry's own address, and its neighbours just inside and outside its prefix. */
static void
probe_entry(const AllowList *list, const AllowEntry *e)
{
	unsigned char addr[16];
	int			maxbits = e->family == AF_INET ? 32 : 128;

	probe(list, e->family, e->addr, NULL);
	if (e->bits > 0)
	{
		memcpy(addr, e->addr, 16);
		addr[(e->bits - 1) / 8] ^= 0x80 >> ((e->bits - 1) % 8);
		probe(list, e->family, addr, NULL);
	}
	if (e->bits < maxbits)
	{
		memcpy(addr, e->addr, 16);
		addr[e->bits / 8] ^= 0x80 >> (e->bits % 8);
		probe(list, e->family, addr, NULL);
		if (e->family == AF_INET)
		{
			/* the same address as IPv4-mapped IPv6 */
			unsigned char v6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};

			memcpy(v6 + 12, addr, 4);
			probe(list, AF_INET6, v6, NULL);
		}
	}
}

static void
probe_host(const AllowList *list, const char *host)
{
	static const unsigned char public_v4[4] = {93, 184, 216, 34};
	char	   *upper = strdup(host);

	CHECK(upper != NULL);
	for (char *c = upper; *c; c++)
		if (*c >= 'a' && *c <= 'z')
			*c -= 'a' - 'A';
	probe(list, AF_INET, public_v4, host);
	probe(list, AF_INET, public_v4, upper);
	free(upper);
}

/* Parse with an error buffer of exactly errlen bytes; the error must fit. */
static AllowList *
parse(const char *text, size_t errlen)
{
	char	   *err = malloc(errlen);
	AllowList  *list;

	CHECK(err != NULL);
	memset(err, 'X', errlen);
	list = allowlist_parse(text, err, errlen);
	if (list == NULL)
	{
		CHECK(memchr(err, '\0', errlen) != NULL);
		if (errlen > 1)
			CHECK(err[0] != '\0');	/* a message, not nothing */
	}
	free(err);
	return list;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *text = fuzz_cstring(data, size);
	size_t		used = strlen(text) + 1;
	AllowList  *list = parse(text, 512);
	AllowList  *other;
	char	   *host;
	size_t		nprobes;
	size_t		done = 0;

	/* the error buffer's size changes the message only */
	other = parse(text, 1);
	CHECK((other == NULL) == (list == NULL));
	free(other);
	other = parse(text, 24);
	CHECK((other == NULL) == (list == NULL));
	free(other);

	if (list)
	{
		check_list(list, text);
		for (int i = 0; i < list->count; i++)
		{
			if (list->entries[i].kind == ALLOW_NETWORK)
				probe_entry(list, &list->entries[i]);
			else if (list->entries[i].kind == ALLOW_HOST)
				probe_host(list, list->entries[i].host);
		}
	}

	if (used < size)
	{
		nprobes = data[used++] % (MAX_PROBES + 1);
		for (; done < nprobes && used + PROBE_LEN <= size; done++, used += PROBE_LEN)
			probe(list, (data[used] & 1) ? AF_INET6 : AF_INET, data + used + 1, NULL);
		host = fuzz_cstring(data + used, size - used);
		probe_host(list, host);
		/* and every probe again, reached through that host name */
		for (size_t i = 1; i <= done; i++)
		{
			const uint8_t *p = data + used - PROBE_LEN * i;

			probe(list, (p[0] & 1) ? AF_INET6 : AF_INET, p + 1, host);
		}
		free(host);
	}
	free(list);
	free(text);
	return 0;
}
