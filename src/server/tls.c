/*-------------------------------------------------------------------------
 *
 * tls.c
 *		The settings of the worker's TLS and HTTP/2: jobloop.ca_file,
 *		jobloop.client_cert, jobloop.client_key and
 *		jobloop.http2_prior_knowledge.
 *
 * Their check hooks run in every process that reads postgresql.conf; the
 * lookups (tls_prior_knowledge, tls_settings_signature) in the worker only,
 * from http.c.  The files are read by libcurl when it opens a connection, so
 * a file that becomes unreadable later fails the jobs that need it, with
 * libcurl's reason, and nothing else.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <sys/stat.h>
#include <unistd.h>

#include "miscadmin.h"

#define PK_HOST_MAX		256		/* "[IPv6]" or a DNS name, with its NUL */
#define PK_MAX_ENTRIES	1000	/* jobloop.http2_prior_knowledge entries */

typedef struct PriorKnowledgeEntry
{
	char		host[PK_HOST_MAX];	/* lower case; IPv6 canonical, in brackets */
	int			port;
} PriorKnowledgeEntry;

typedef struct PriorKnowledgeList
{
	int			count;
	PriorKnowledgeEntry entries[FLEXIBLE_ARRAY_MEMBER];
} PriorKnowledgeList;

/* The list in force: the GUC machinery's "extra" of jobloop.http2_prior_knowledge. */
static const PriorKnowledgeList *prior_knowledge = NULL;

/* ---- the certificate files ---- */

/*
 * A file setting must name a file this server's operating-system user can
 * read: checked when it is set (ALTER SYSTEM, a reload), so that a typo is
 * an error at once rather than every HTTPS job failing later.  At server
 * start the value is kept whatever the file's state: refusing it would
 * fall back to the default (no CA file of ours, no client certificate) and
 * the jobs would fail less clearly.
 */
static bool
check_file(char **newval, const char *setting)
{
	const char *path = *newval;

	if (path == NULL || path[0] == '\0')
		return true;
	for (const char *c = path; *c; c++)
		if ((unsigned char) *c < 0x20)
		{
			GUC_check_errdetail("The path contains control characters.");
			return false;
		}
	if (process_shared_preload_libraries_in_progress)
		return true;
	if (access(path, R_OK) != 0)
	{
		GUC_check_errdetail("File \"%s\" cannot be read: %m.", path);
		GUC_check_errhint("Give the path of a PEM file that the server's operating-system user "
						  "can read, absolute or relative to the data directory; '' for none%s.",
						  strcmp(setting, "ca_file") == 0 ? " (the system's CA certificates)" : "");
		return false;
	}
	return true;
}

bool
tls_check_ca_file(char **newval, void **extra, GucSource source)
{
	return check_file(newval, "ca_file");
}

bool
tls_check_client_cert(char **newval, void **extra, GucSource source)
{
	return check_file(newval, "client_cert");
}

bool
tls_check_client_key(char **newval, void **extra, GucSource source)
{
	return check_file(newval, "client_key");
}

/* ---- jobloop.http2_prior_knowledge ---- */

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

/*
 * Check hook of jobloop.http2_prior_knowledge: a comma-separated list of
 * host:port, each entry checked strictly (an entry that does not parse is
 * an error naming it, never ignored), so that a typo cannot send HTTP/2 to
 * a server that speaks HTTP/1.1 only or the reverse.
 */
bool
tls_check_prior_knowledge(char **newval, void **extra, GucSource source)
{
	const char *p = *newval ? *newval : "";
	int			max = 1;
	PriorKnowledgeList *list;
	Size		size;

	for (const char *c = p; *c; c++)
		if (*c == ',' && ++max > PK_MAX_ENTRIES)
		{
			/* also keeps the allocation below small (a check hook may run in the postmaster) */
			GUC_check_errdetail("The list has more than %d entries.", PK_MAX_ENTRIES);
			return false;
		}
	size = offsetof(PriorKnowledgeList, entries) + max * sizeof(PriorKnowledgeEntry);
	list = palloc0(size);
	for (;;)
	{
		const char *end = strchr(p, ',');
		const char *stop = end ? end : p + strlen(p);
		const char *problem;

		while (p < stop && isspace((unsigned char) *p))
			p++;
		while (stop > p && isspace((unsigned char) stop[-1]))
			stop--;
		if (stop > p)
		{
			problem = parse_entry(p, (size_t) (stop - p), &list->entries[list->count]);
			if (problem)
			{
				GUC_check_errdetail("Entry \"%.*s\" %s.", (int) Min(stop - p, 300), p, problem);
				GUC_check_errhint("List the HTTP/2 servers reached over plain http, as host:port "
								  "separated by commas, e.g. 'api.internal:8080, [fd00::1]:80'.");
				pfree(list);
				return false;
			}
			list->count++;
		}
		if (end == NULL)
			break;
		p = end + 1;
	}
	*extra = compat_guc_extra(list, offsetof(PriorKnowledgeList, entries) +
							  list->count * sizeof(PriorKnowledgeEntry));
	pfree(list);
	if (*extra == NULL)
	{
		GUC_check_errdetail("Out of memory.");
		return false;
	}
	return true;
}

void
tls_assign_prior_knowledge(const char *newval, void *extra)
{
	prior_knowledge = extra;
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

/* ---- reloads ---- */

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
 * What the worker's connections were made with: the settings, and which
 * file each names (device, inode, size, modification and change times).
 * http.c compares it after each reload: a certificate replaced at the same
 * path changes it as much as a new path does.  palloc'd.
 */
char *
tls_settings_signature(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	append_file(&buf, jobloop_ca_file[0] != '\0' ? jobloop_ca_file : http_default_ca_file());
	append_file(&buf, jobloop_client_cert);
	append_file(&buf, jobloop_client_key);
	appendStringInfoString(&buf, jobloop_http2_prior_knowledge ? jobloop_http2_prior_knowledge : "");
	return buf.data;
}
