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
 * The list in force is set by the host (guard.h): the server's GUC hooks
 * (src/server/guard_setting.c), or jobloop-worker from the server's reply.
 *
 *-------------------------------------------------------------------------
 */
#include "platform.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "guard.h"

/* The list in force; NULL allows public addresses only. */
static const AllowList *allow_list = NULL;

/* The copy guard_set_allowed_hosts made (malloc'd), if it is the one in force. */
static AllowList *owned_list = NULL;

void
guard_use_allow_list(const AllowList *list)
{
	allow_list = list;
	if (owned_list != NULL && owned_list != list)
	{
		free(owned_list);
		owned_list = NULL;
	}
}

bool
guard_set_allowed_hosts(const char *text, char *err, size_t errlen)
{
	AllowList  *list = allowlist_parse(text ? text : "", err, errlen);

	if (list == NULL)
		return false;
	guard_use_allow_list(list);
	owned_list = list;
	return true;
}

/*
 * May outbound HTTP connect to addr (reached through host name host, or
 * NULL)?  If not, *reason says what kind of address it is.
 */
bool
guard_address_allowed(const struct sockaddr *addr, const char *host, const char **reason)
{
	const unsigned char *bytes;
	const unsigned char *v4;

	if (addr->sa_family == AF_INET)
		bytes = (const unsigned char *) &((const struct sockaddr_in *) addr)->sin_addr;
	else if (addr->sa_family == AF_INET6)
		bytes = (const unsigned char *) &((const struct sockaddr_in6 *) addr)->sin6_addr;
	else
	{
		*reason = "not an IP address";
		return false;
	}
	*reason = allowlist_classify(addr->sa_family, bytes, &v4);
	if (*reason == NULL)
		return true;
	return allowlist_match(allow_list, addr->sa_family, bytes, v4, host);
}
