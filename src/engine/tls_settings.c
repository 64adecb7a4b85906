/*-------------------------------------------------------------------------
 *
 * tls_settings.c
 *		HTTP/2 with prior knowledge (which plain-http servers speak HTTP/2
 *		from the first byte) and the signature of the TLS settings.
 *
 * The list is parsed strictly (an entry that does not parse is an error
 * naming it, never ignored), so that a typo cannot send HTTP/2 to a server
 * that speaks HTTP/1.1 only or the reverse.  The list in force is set by
 * the host (tls_settings.h) and read by http.c only.
 *
 *-------------------------------------------------------------------------
 */
#include "platform.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <sys/stat.h>

#include "lib/stringinfo.h"

#include "tls_settings.h"

/* The list in force; NULL: none. */
static const PriorKnowledgeList *prior_knowledge = NULL;

/* The copy prior_knowledge_set made (malloc'd), if it is the one in force. */
static PriorKnowledgeList *owned_list = NULL;

/* "[v6]" or an IPv6 address: its canonical form in brackets; false if it is none. */
static bool
canonical_ipv6(const char *s, size_t len, char *out, size_t outlen)
{
	char		buf[INET6_ADDRSTRLEN + 2];
	unsigned char addr[16];

	if (len >= 2 && s[0] == '[' && s[len - 1] == ']')
	{
		s++;
		len -= 2;
	}
	if (len == 0 || len >= sizeof(buf))
		return false;
	memcpy(buf, s, len);
	buf[len] = '\0';
	if (inet_pton(AF_INET6, buf, addr) != 1 ||
		inet_ntop(AF_INET6, addr, buf, sizeof(buf)) == NULL)
		return false;
	snprintf(out, outlen, "[%s]", buf);
	return true;
}

/*
 * A host as URLs have it: an IPv4 address in dotted decimal, a bracketed
 * IPv6 address, or a DNS name (labels of letters, digits, '-' and '_', at
 * most 63 characters, a last label that is not a number).  NULL if it is
 * one (host then holds its lower-case, canonical form), else the problem.
 */
static const char *
parse_host(const char *s, size_t len, char *host)
{
	size_t		label = 0;
	bool		numeric = true;
	struct in_addr a4;

	if (len == 0)
		return "has no host before the port";
	if (s[0] == '[')
		return canonical_ipv6(s, len, host, PK_HOST_MAX) ? NULL : "has a malformed IPv6 address";
	if (len >= PK_HOST_MAX - 2)
		return "has a host name longer than 253 characters";
	for (size_t i = 0; i < len; i++)
		host[i] = (char) tolower((unsigned char) s[i]);
	host[len] = '\0';
	if (inet_pton(AF_INET, host, &a4) == 1)
		return NULL;
	for (size_t i = 0; i < len; i++)
	{
		char		c = host[i];

		if (c == '.')
		{
			if (label == 0)
				return "has a host name with an empty label";
			label = 0;
			numeric = true;
			continue;
		}
		if (!(isalnum((unsigned char) c) || c == '-' || c == '_'))
			return "is not host:port (an IPv6 address goes in brackets, [::1]:8080)";
		if (!isdigit((unsigned char) c))
			numeric = false;
		if (++label > 63)
			return "has a host name label longer than 63 characters";
	}
	if (label == 0)
		return "has a host name with an empty label";
	if (numeric)
		return "has a host that is neither an IPv4 address in dotted decimal nor a host name";
	return NULL;
}

/* One trimmed entry "host:port"; NULL if it is good, else the problem. */
static const char *
parse_entry(const char *s, size_t len, PriorKnowledgeEntry *e)
{
	const char *colon = NULL;
	const char *problem;
	long		port = 0;
	size_t		digits;

	for (size_t i = 0; i < len; i++)
		if (isspace((unsigned char) s[i]))
			return "contains white space";
	for (size_t i = len; i > 0; i--)
		if (s[i - 1] == ':')
		{
			colon = s + i - 1;
			break;
		}
	if (colon == NULL || (s[0] == '[' && colon < (const char *) memchr(s, ']', len)))
		return "has no port: write host:port";
	digits = len - (size_t) (colon + 1 - s);
	if (digits == 0 || digits > 5)
		return "has a port that is not a number from 1 to 65535";
	for (const char *d = colon + 1; d < s + len; d++)
	{
		if (!isdigit((unsigned char) *d))
			return "has a port that is not a number from 1 to 65535";
		port = port * 10 + (*d - '0');
	}
	if (port < 1 || port > 65535)
		return "has a port that is not a number from 1 to 65535";
	if ((problem = parse_host(s, (size_t) (colon - s), e->host)) != NULL)
		return problem;
	e->port = (int) port;
	return NULL;
}

PriorKnowledgeList *
prior_knowledge_parse(const char *text, char *err, size_t errlen, PriorKnowledgeProblem *problem)
{
	const char *p = text ? text : "";
	int			max = 1;
	PriorKnowledgeList *list;

	for (const char *c = p; *c; c++)
		if (*c == ',' && ++max > PK_MAX_ENTRIES)
		{
			/* also keeps the allocation below small (a check hook may run in the postmaster) */
			snprintf(err, errlen, "The list has more than %d entries.", PK_MAX_ENTRIES);
			*problem = PK_TOO_MANY;
			return NULL;
		}
	list = calloc(1, offsetof(PriorKnowledgeList, entries) + max * sizeof(PriorKnowledgeEntry));
	if (list == NULL)
	{
		snprintf(err, errlen, "Out of memory.");
		*problem = PK_NO_MEMORY;
		return NULL;
	}
	for (;;)
	{
		const char *end = strchr(p, ',');
		const char *stop = end ? end : p + strlen(p);
		const char *why;

		while (p < stop && isspace((unsigned char) *p))
			p++;
		while (stop > p && isspace((unsigned char) stop[-1]))
			stop--;
		if (stop > p)
		{
			why = parse_entry(p, (size_t) (stop - p), &list->entries[list->count]);
			if (why)
			{
				snprintf(err, errlen, "Entry \"%.*s\" %s.", (int) Min(stop - p, 300), p, why);
				*problem = PK_BAD_ENTRY;
				free(list);
				return NULL;
			}
			list->count++;
		}
		if (end == NULL)
			break;
		p = end + 1;
	}
	*problem = PK_OK;
	return list;
}

size_t
prior_knowledge_size(const PriorKnowledgeList *list)
{
	return offsetof(PriorKnowledgeList, entries) + list->count * sizeof(PriorKnowledgeEntry);
}

void
prior_knowledge_use(const PriorKnowledgeList *list)
{
	prior_knowledge = list;
	if (owned_list != NULL && owned_list != list)
	{
		free(owned_list);
		owned_list = NULL;
	}
}

bool
prior_knowledge_set(const char *text, char *err, size_t errlen)
{
	PriorKnowledgeProblem problem;
	PriorKnowledgeList *list = prior_knowledge_parse(text, err, errlen, &problem);

	if (list == NULL)
		return false;
	prior_knowledge_use(list);
	owned_list = list;
	return true;
}

bool
tls_prior_knowledge_any(void)
{
	return prior_knowledge != NULL && prior_knowledge->count > 0;
}

/*
 * Is host:port (a URL's host as libcurl gives it: lower or upper case,
 * IPv6 in brackets) listed in jobloop.http2_prior_knowledge?
 */
bool
tls_prior_knowledge(const char *host, int port)
{
	char		canon[PK_HOST_MAX];
	size_t		len = strlen(host);

	if (!tls_prior_knowledge_any() || len >= PK_HOST_MAX - 2)
		return false;
	if (host[0] != '[' || !canonical_ipv6(host, len, canon, sizeof(canon)))
	{
		for (size_t i = 0; i <= len; i++)
			canon[i] = (char) tolower((unsigned char) host[i]);
		/* "example.com." is the same host */
		if (len > 1 && canon[len - 1] == '.')
			canon[len - 1] = '\0';
	}
	for (int i = 0; i < prior_knowledge->count; i++)
		if (prior_knowledge->entries[i].port == port &&
			strcmp(prior_knowledge->entries[i].host, canon) == 0)
			return true;
	return false;
}

/* ---- the signature ---- */

static void
append_file(StringInfo buf, const char *path)
{
	struct stat st;

	appendStringInfo(buf, "%s|", path ? path : "");
	if (path && path[0] && stat(path, &st) == 0)
		appendStringInfo(buf, "%lu:%lu:%lld:%lld.%09ld:%lld.%09ld|",
						 (unsigned long) st.st_dev, (unsigned long) st.st_ino,
						 (long long) st.st_size,
						 (long long) st.st_mtim.tv_sec, st.st_mtim.tv_nsec,
						 (long long) st.st_ctim.tv_sec, st.st_ctim.tv_nsec);
	else
		appendStringInfoString(buf, "-|");
}

/*
 * A certificate replaced at the same path changes the signature as much as
 * a new path does; the prior-knowledge list goes in as parsed, so that the
 * same list written otherwise is the same.
 */
char *
tls_settings_signature(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	append_file(&buf, jobloop_ca_file[0] != '\0' ? jobloop_ca_file : http_default_ca_file());
	append_file(&buf, jobloop_client_cert);
	append_file(&buf, jobloop_client_key);
	if (prior_knowledge != NULL)
		for (int i = 0; i < prior_knowledge->count; i++)
			appendStringInfo(&buf, "%s:%d,", prior_knowledge->entries[i].host,
							 prior_knowledge->entries[i].port);
	return buf.data;
}
