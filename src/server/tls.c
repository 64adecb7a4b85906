/*-------------------------------------------------------------------------
 *
 * tls.c
 *		The settings of the worker's TLS and HTTP/2: jobloop.ca_file,
 *		jobloop.client_cert, jobloop.client_key and
 *		jobloop.http2_prior_knowledge.
 *
 * Their check hooks run in every process that reads postgresql.conf; the
 * parsing and the lookups (tls_prior_knowledge, tls_settings_signature) are
 * the engine's (src/engine/tls_settings.c), which jobloop-worker shares.  The files are read by libcurl when it opens a connection, so
 * a file that becomes unreadable later fails the jobs that need it, with
 * libcurl's reason, and nothing else.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <unistd.h>

#include "miscadmin.h"

#include "tls_settings.h"

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

/*
 * Check hook of jobloop.http2_prior_knowledge: a comma-separated list of
 * host:port, parsed by the engine (src/engine/tls_settings.c), each entry
 * checked strictly: an entry that does not parse is an error naming it.
 */
bool
tls_check_prior_knowledge(char **newval, void **extra, GucSource source)
{
	char		err[512];
	PriorKnowledgeProblem problem;
	PriorKnowledgeList *list = prior_knowledge_parse(*newval, err, sizeof(err), &problem);

	if (list == NULL)
	{
		GUC_check_errdetail("%s", err);
		if (problem == PK_BAD_ENTRY)
			GUC_check_errhint("List the HTTP/2 servers reached over plain http, as host:port "
							  "separated by commas, e.g. 'api.internal:8080, [fd00::1]:80'.");
		return false;
	}
	/* PostgreSQL frees the extra it replaces: in its memory, not malloc's (16+) */
	*extra = compat_guc_extra(list, prior_knowledge_size(list));
	free(list);
	if (*extra == NULL)
	{
		GUC_check_errdetail("Out of memory.");
		return false;
	}
	return true;
}

/* The GUC machinery keeps the extra alive until it replaces it, then calls us again. */
void
tls_assign_prior_knowledge(const char *newval, void *extra)
{
	prior_knowledge_use(extra);
}
