/*-------------------------------------------------------------------------
 *
 * allowlist.c
 *		Parsing jobloop.allowed_hosts and classifying addresses.
 *
 * The setting is the one thing between a job's URL and the database's own
 * network, so parsing is strict: an entry is "*", an IPv4 or IPv6 address,
 * an address with a prefix length of digits only, or a host name whose last
 * label is not numeric.  Anything else is an error naming the entry -- a
 * typo must never widen the list (an earlier parser read "127.0.0.1/" as
 * "all of IPv4").  Entries are separated by commas; white space around them
 * is ignored, white space inside one is an error.
 *
 * No PostgreSQL backend calls here (see allowlist.h).
 *
 *-------------------------------------------------------------------------
 */
#include "allowlist.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define ENTRY_MAX	(ALLOWLIST_HOST_MAX + 1)

static bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* A prefix length: 1 to 3 digits, at most maxbits.  -1 if it is not one. */
static int
parse_bits(const char *s, int maxbits)
{
	int			bits = 0;
	size_t		len = strlen(s);

	if (len == 0 || len > 3)
		return -1;
	for (size_t i = 0; i < len; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return -1;
		bits = bits * 10 + (s[i] - '0');
	}
	return bits <= maxbits ? bits : -1;
}

/*
 * A host name as DNS and URLs have them: labels of letters, digits, '-' and
 * '_', at most 63 characters each, separated by single dots, and a last
 * label that is not all digits (else it would be an address in disguise,
 * like "24" or "127.1", which libcurl reads as 0.0.0.24 and 127.0.0.1).
 */
static const char *
host_problem(const char *s)
{
	size_t		label = 0;
	bool		numeric = true;

	if (*s == '\0')
		return "is empty";
	if (strlen(s) > ALLOWLIST_HOST_MAX)
		return "is longer than 253 characters";
	for (const char *c = s; *c; c++)
	{
		if (*c == '.')
		{
			if (label == 0)
				return "has an empty label";
			label = 0;
			numeric = true;
			continue;
		}
		if (!(isalnum((unsigned char) *c) || *c == '-' || *c == '_'))
			return "is neither an IP address, a network nor a host name";
		if (!isdigit((unsigned char) *c))
			numeric = false;
		if (++label > 63)
			return "has a label longer than 63 characters";
	}
	if (label == 0)
		return "has an empty label";
	if (numeric)
		return "is neither an IP address nor a host name (its last part is a number)";
	{
		struct in_addr a;

		/* "0x7f.1", "0x7f000001": inet_aton's forms, which libcurl rewrites */
		if (inet_aton(s, &a) != 0)
			return "is an IPv4 address in a form libcurl rewrites: write it as dotted decimal";
	}
	return NULL;
}

/* Parse one trimmed, non-empty entry; false with err set if it is bad. */
static bool
parse_entry(const char *entry, AllowEntry *e, char *err, size_t errlen)
{
	char		buf[ENTRY_MAX + 1];
	char	   *slash;
	const char *problem;
	size_t		len = strlen(entry);

	memset(e, 0, sizeof(*e));
	for (size_t i = 0; i < len; i++)
		if (is_space(entry[i]))
		{
			snprintf(err, errlen, "entry \"%s\" contains white space", entry);
			return false;
		}
	if (strcmp(entry, "*") == 0)
	{
		e->kind = ALLOW_ANY;
		return true;
	}
	if (len > ENTRY_MAX)
	{
		snprintf(err, errlen, "entry \"%.40s...\" is too long", entry);
		return false;
	}
	for (size_t i = 0; i <= len; i++)
		buf[i] = (char) tolower((unsigned char) entry[i]);

	slash = strchr(buf, '/');
	if (slash)
		*slash = '\0';
	if (inet_pton(AF_INET, buf, e->addr) == 1)
		e->family = AF_INET;
	else if (inet_pton(AF_INET6, buf, e->addr) == 1)
		e->family = AF_INET6;

	if (e->family != 0)
	{
		int			maxbits = e->family == AF_INET ? 32 : 128;

		e->kind = ALLOW_NETWORK;
		e->bits = maxbits;
		if (slash)
		{
			if (slash[1] == '\0')
			{
				snprintf(err, errlen, "entry \"%s\" has no prefix length after \"/\"", entry);
				return false;
			}
			e->bits = parse_bits(slash + 1, maxbits);
			if (e->bits < 0)
			{
				snprintf(err, errlen,
						 "entry \"%s\": prefix length \"%s\" is not a number from 0 to %d",
						 entry, slash + 1, maxbits);
				return false;
			}
		}
		return true;
	}
	if (slash)
	{
		snprintf(err, errlen, "entry \"%s\": \"%s\" before \"/\" is not an IP address",
				 entry, buf);
		return false;
	}

	/* a host name; "example.com." is the same host as "example.com" */
	if (len > 1 && buf[len - 1] == '.')
		buf[--len] = '\0';
	problem = host_problem(buf);
	if (problem)
	{
		snprintf(err, errlen, "entry \"%s\" %s", entry, problem);
		return false;
	}
	e->kind = ALLOW_HOST;
	memcpy(e->host, buf, len + 1);
	return true;
}

AllowList *
allowlist_parse(const char *text, char *err, size_t errlen)
{
	size_t		max_entries = 1;
	AllowList  *list;
	const char *p = text ? text : "";

	for (const char *c = p; *c; c++)
		if (*c == ',')
			max_entries++;
	list = malloc(sizeof(AllowList) + max_entries * sizeof(AllowEntry));
	if (list == NULL)
	{
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	list->count = 0;

	for (;;)
	{
		const char *end = strchr(p, ',');
		const char *stop = end ? end : p + strlen(p);
		char		entry[ENTRY_MAX + 2];
		size_t		len;

		while (p < stop && is_space(*p))
			p++;
		while (stop > p && is_space(stop[-1]))
			stop--;
		len = (size_t) (stop - p);
		if (len > 0)
		{
			/* one byte more than any good entry: parse_entry names it too long */
			if (len > ENTRY_MAX + 1)
				len = ENTRY_MAX + 1;
			memcpy(entry, p, len);
			entry[len] = '\0';
			if (!parse_entry(entry, &list->entries[list->count], err, errlen))
			{
				free(list);
				return NULL;
			}
			list->count++;
		}
		if (end == NULL)
			break;
		p = end + 1;
	}
	return list;
}

static bool
prefix_matches(const unsigned char *a, const unsigned char *b, int bits)
{
	int			bytes = bits / 8;
	int			rest = bits % 8;

	if (memcmp(a, b, bytes) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((a[bytes] ^ b[bytes]) & (0xFF << (8 - rest))) == 0;
}

static const char *
classify_v4(const unsigned char *a)
{
	if (a[0] == 0)
		return "unspecified";
	if (a[0] == 127)
		return "loopback";
	if (a[0] == 10 || (a[0] == 172 && (a[1] & 0xF0) == 16) || (a[0] == 192 && a[1] == 168))
		return "private";
	if (a[0] == 169 && a[1] == 254)
		return "link-local";
	if (a[0] == 100 && (a[1] & 0xC0) == 64)
		return "shared address space";
	if ((a[0] == 192 && a[1] == 0 && a[2] == 0) || (a[0] == 198 && (a[1] & 0xFE) == 18))
		return "reserved";
	if ((a[0] == 192 && a[1] == 0 && a[2] == 2) || (a[0] == 198 && a[1] == 51 && a[2] == 100) ||
		(a[0] == 203 && a[1] == 0 && a[2] == 113))
		return "documentation";
	if (a[0] >= 224 && a[0] < 240)
		return "multicast";
	if (a[0] >= 240)
		return "reserved";
	return NULL;
}

/*
 * Forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are
 * judged by that address; NAT64's local-use prefix, whose IPv4 address may
 * sit at several offsets, is not public as a whole.
 */
static const char *
classify_v6(const unsigned char *a, const unsigned char **v4)
{
	static const unsigned char zero[16] = {0};
	static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
	static const unsigned char nat64[12] = {0, 0x64, 0xFF, 0x9B, 0, 0, 0, 0, 0, 0, 0, 0};
	static const unsigned char nat64_local[6] = {0, 0x64, 0xFF, 0x9B, 0, 0x01};	/* RFC 8215 */

	if (memcmp(a, zero, 15) == 0 && (a[15] == 0 || a[15] == 1))
		return a[15] == 0 ? "unspecified" : "loopback";
	/*
	 * 64:ff9b:1::/48 may embed its IPv4 address at any RFC 6052 offset: judge
	 * the whole prefix as not public (list it, or its addresses, to allow).
	 */
	if (memcmp(a, nat64_local, 6) == 0)
		return "NAT64 local-use";
	if (memcmp(a, mapped, 12) == 0 || memcmp(a, zero, 12) == 0 || memcmp(a, nat64, 12) == 0)
		*v4 = a + 12;
	else if (a[0] == 0x20 && a[1] == 0x02)
		*v4 = a + 2;
	if (*v4)
		return classify_v4(*v4);
	if ((a[0] & 0xFE) == 0xFC)
		return "private";
	if (a[0] == 0xFE && (a[1] & 0xC0) == 0x80)
		return "link-local";
	if (a[0] == 0xFE && (a[1] & 0xC0) == 0xC0)
		return "site-local";
	if (a[0] == 0xFF)
		return "multicast";
	if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0x0D && a[3] == 0xB8)
		return "documentation";
	if (a[0] == 0x01 && memcmp(a + 1, zero, 7) == 0)
		return "reserved";
	return NULL;
}

const char *
allowlist_classify(int family, const unsigned char *addr, const unsigned char **v4)
{
	*v4 = NULL;
	if (family == AF_INET)
		return classify_v4(addr);
	if (family == AF_INET6)
		return classify_v6(addr, v4);
	return "not an IP address";
}

/* Host names compare without case and without a trailing dot. */
static bool
same_host(const char *host, const char *entry)
{
	size_t		len = strlen(host);

	if (len > 1 && host[len - 1] == '.')
		len--;
	return len == strlen(entry) && strncasecmp(host, entry, len) == 0;
}

bool
allowlist_match(const AllowList *list, int family, const unsigned char *addr,
				const unsigned char *v4, const char *host)
{
	if (list == NULL)
		return false;
	for (int i = 0; i < list->count; i++)
	{
		const AllowEntry *e = &list->entries[i];

		switch (e->kind)
		{
			case ALLOW_ANY:
				return true;
			case ALLOW_HOST:
				if (host && same_host(host, e->host))
					return true;
				break;
			case ALLOW_NETWORK:
				if (e->family == family && prefix_matches(addr, e->addr, e->bits))
					return true;
				if (e->family == AF_INET && v4 && prefix_matches(v4, e->addr, e->bits))
					return true;
				break;
		}
	}
	return false;
}
