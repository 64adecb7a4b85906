/*-------------------------------------------------------------------------
 *
 * guard.c
 *		Which addresses outbound HTTP may connect to.
 *
 * A job's URL is chosen by business logic that may be fed by users, so the
 * worker must not become a way into the database's own network: every
 * address curl is about to connect to (after DNS, on every redirect hop) is
 * classified here, and loopback, private, link-local (cloud metadata at
 * 169.254.169.254), unspecified, multicast and reserved addresses, in IPv4,
 * IPv6 and IPv4-embedding IPv6 forms, are refused unless a superuser lists
 * them, or the host name used, in jobloop.allowed_hosts.
 *
 * State: the parsed allow list, private to each process, re-parsed after
 * the GUC changes.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "utils/builtins.h"
#include "utils/inet.h"

PG_FUNCTION_INFO_V1(jobloop_address_allowed);

typedef enum AllowKind
{
	ALLOW_ANY,
	ALLOW_NETWORK,
	ALLOW_HOST
} AllowKind;

typedef struct AllowEntry
{
	AllowKind	kind;
	int			family;			/* AF_INET or AF_INET6 */
	unsigned char addr[16];
	int			bits;
	char	   *host;
} AllowEntry;

static AllowEntry *allow_list = NULL;
static int	allow_count = 0;
static bool allow_parsed = false;

void
guard_reload(void)
{
	allow_parsed = false;
}

static void
parse_entry(char *token, AllowEntry *e)
{
	char	   *slash = strchr(token, '/');
	int			maxbits;

	memset(e, 0, sizeof(*e));
	if (strcmp(token, "*") == 0)
	{
		e->kind = ALLOW_ANY;
		return;
	}
	if (slash)
		*slash = '\0';
	if (inet_pton(AF_INET, token, e->addr) == 1)
		e->family = AF_INET;
	else if (inet_pton(AF_INET6, token, e->addr) == 1)
		e->family = AF_INET6;
	if (e->family == 0)
	{
		e->kind = ALLOW_HOST;
		e->host = MemoryContextStrdup(TopMemoryContext, token);
		return;
	}
	e->kind = ALLOW_NETWORK;
	maxbits = e->family == AF_INET ? 32 : 128;
	e->bits = slash ? atoi(slash + 1) : maxbits;
	if (e->bits < 0 || e->bits > maxbits)
		e->bits = maxbits;
}

static void
parse_allow_list(void)
{
	char	   *copy;
	char	   *tok;
	char	   *save;

	for (int i = 0; i < allow_count; i++)
		if (allow_list[i].host)
			pfree(allow_list[i].host);
	if (allow_list)
		pfree(allow_list);
	allow_list = NULL;
	allow_count = 0;

	copy = pstrdup(jobloop_allowed_hosts ? jobloop_allowed_hosts : "");
	allow_list = MemoryContextAllocZero(TopMemoryContext, sizeof(AllowEntry) * (strlen(copy) / 2 + 1));
	for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save))
	{
		for (char *c = tok; *c; c++)
			*c = pg_tolower((unsigned char) *c);
		parse_entry(tok, &allow_list[allow_count++]);
	}
	pfree(copy);
	allow_parsed = true;
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

/* Why an IPv4 address is not public, or NULL if it is. */
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
 * Why an IPv6 address is not public, or NULL if it is.  Forms that embed an
 * IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that address;
 * *v4 points at it then.
 */
static const char *
classify_v6(const unsigned char *a, const unsigned char **v4)
{
	static const unsigned char zero[16] = {0};
	static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
	static const unsigned char nat64[12] = {0, 0x64, 0xFF, 0x9B, 0, 0, 0, 0, 0, 0, 0, 0};

	*v4 = NULL;
	if (memcmp(a, zero, 15) == 0 && (a[15] == 0 || a[15] == 1))
		return a[15] == 0 ? "unspecified" : "loopback";
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

static bool
listed(int family, const unsigned char *addr, const unsigned char *v4, const char *host)
{
	if (!allow_parsed)
		parse_allow_list();
	for (int i = 0; i < allow_count; i++)
	{
		AllowEntry *e = &allow_list[i];

		switch (e->kind)
		{
			case ALLOW_ANY:
				return true;
			case ALLOW_HOST:
				if (host && pg_strcasecmp(host, e->host) == 0)
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

/*
 * May outbound HTTP connect to addr (reached through host name host, or
 * NULL)?  If not, *reason says what kind of address it is.
 */
bool
guard_address_allowed(const struct sockaddr *addr, const char *host, const char **reason)
{
	const unsigned char *bytes;
	const unsigned char *v4 = NULL;
	const char *why;

	if (addr->sa_family == AF_INET)
	{
		bytes = (const unsigned char *) &((const struct sockaddr_in *) addr)->sin_addr;
		why = classify_v4(bytes);
	}
	else if (addr->sa_family == AF_INET6)
	{
		bytes = (const unsigned char *) &((const struct sockaddr_in6 *) addr)->sin6_addr;
		why = classify_v6(bytes, &v4);
	}
	else
	{
		*reason = "not an IP address";
		return false;
	}
	*reason = why;
	if (why == NULL)
		return true;
	return listed(addr->sa_family, bytes, v4, host);
}

Datum
jobloop_address_allowed(PG_FUNCTION_ARGS)
{
	inet	   *ip;
	struct sockaddr_storage ss;
	const char *reason;
	char	   *host = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	ip = PG_GETARG_INET_PP(0);
	if (!PG_ARGISNULL(1))
		host = text_to_cstring(PG_GETARG_TEXT_PP(1));

	memset(&ss, 0, sizeof(ss));
	if (ip_family(ip) == PGSQL_AF_INET)
	{
		struct sockaddr_in *sin = (struct sockaddr_in *) &ss;

		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, ip_addr(ip), 4);
	}
	else
	{
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) &ss;

		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, ip_addr(ip), 16);
	}
	PG_RETURN_BOOL(guard_address_allowed((struct sockaddr *) &ss, host, &reason));
}
