/*-------------------------------------------------------------------------
 *
 * allowlist.h
 *		Parsing jobloop.allowed_hosts and classifying addresses.
 *
 * Plain C with no PostgreSQL backend calls, so that the same code runs in
 * the GUC check hook, in the worker's connect callback and in a libFuzzer
 * target (test/fuzz).  Memory comes from malloc; the GUC check hook copies
 * its result into the memory PostgreSQL keeps GUC extras in (compat.h).
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_ALLOWLIST_H
#define JOBLOOP_ALLOWLIST_H

#include <stdbool.h>
#include <stddef.h>

#define ALLOWLIST_HOST_MAX	253		/* longest DNS name */

typedef enum AllowKind
{
	ALLOW_ANY,					/* "*" */
	ALLOW_NETWORK,				/* an address, or an address/prefix length */
	ALLOW_HOST					/* a host name, compared without case */
} AllowKind;

typedef struct AllowEntry
{
	AllowKind	kind;
	int			family;			/* AF_INET or AF_INET6, for ALLOW_NETWORK */
	unsigned char addr[16];
	int			bits;
	char		host[ALLOWLIST_HOST_MAX + 1];
} AllowEntry;

/* One malloc'd block: the header and its entries. */
typedef struct AllowList
{
	int			count;
	AllowEntry	entries[];
} AllowList;

/*
 * Parse a comma-separated list.  Returns the list (malloc'd, free() it), or
 * NULL with a message naming the bad entry in err.
 */
extern AllowList *allowlist_parse(const char *text, char *err, size_t errlen);

/*
 * Why an address is not public ("loopback", "private", ...), or NULL if it
 * is.  addr holds 4 (AF_INET) or 16 (AF_INET6) bytes.  For IPv6 forms that
 * embed an IPv4 address, *v4 points at it (else NULL).
 */
extern const char *allowlist_classify(int family, const unsigned char *addr,
									  const unsigned char **v4);

/* Does the list allow addr (reached through host, or NULL)? */
extern bool allowlist_match(const AllowList *list, int family, const unsigned char *addr,
							const unsigned char *v4, const char *host);

#endif							/* JOBLOOP_ALLOWLIST_H */
