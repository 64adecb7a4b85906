/*-------------------------------------------------------------------------
 *
 * settings.c
 *		The engine's settings in jobloop-worker.
 *
 * In the server these are GUCs (src/server/jobloop.c).  Here the TLS files
 * are the machine's (options.c) and the rest is what the server's replies
 * say, applied as they come: the server sends them with the first reply
 * of a session and whenever they change.  Until the first reply no call is
 * started, so the defaults below (the GUCs' defaults) never decide one;
 * the guard allows public addresses only until the server's
 * jobloop.allowed_hosts arrives, and a worker has no way to widen it.
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#include "guard.h"
#include "tls_settings.h"

/* the variables engine.h declares, with the GUCs' defaults and limits */
int			jobloop_max_response_size = 10 * 1024 * 1024;
int			jobloop_max_redirects = 5;
int			jobloop_idle_connection_timeout = 30;
char	   *jobloop_ca_file = "";
char	   *jobloop_client_cert = "";
char	   *jobloop_client_key = "";

#define MIN_RESPONSE_SIZE	1024
#define MAX_RESPONSE_SIZE	(128 * 1024 * 1024)
#define MAX_REDIRECTS		50
#define MAX_IDLE_TIMEOUT	3600

/* the texts in force, to tell a change from a repetition */
static char *allowed_hosts = NULL;
static char *prior_knowledge = NULL;

void
settings_init(void)
{
	jobloop_ca_file = pstrdup(worker_options.ca_file);
	jobloop_client_cert = pstrdup(worker_options.client_cert);
	jobloop_client_key = pstrdup(worker_options.client_key);
}

static bool
same_text(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") == 0;
}

/* An integer setting, if the server's value is one the GUC could have. */
static bool
apply_int(const char *name, int *var, int32 value, int32 min, int32 max)
{
	if (value < min || value > max)
	{
		worker_log(WARNING, "the server sent %s = %d, outside %d..%d; keeping %d",
				   name, (int) value, (int) min, (int) max, *var);
		return false;
	}
	if (*var == value)
		return false;
	*var = value;
	return true;
}

static void
apply_allowed_hosts(const char *text)
{
	char		err[512];

	if (allowed_hosts != NULL && same_text(allowed_hosts, text))
		return;
	if (!guard_set_allowed_hosts(text, err, sizeof(err)))
	{
		/* the server checked it; should this one not parse, allow the least */
		worker_log(WARNING, "the server's jobloop.allowed_hosts does not parse here (%s); "
				   "only public addresses are allowed", err);
		guard_use_allow_list(NULL);
	}
	if (allowed_hosts)
		pfree(allowed_hosts);
	allowed_hosts = pstrdup(text ? text : "");
	worker_log(DEBUG1, "jobloop.allowed_hosts = '%s'", allowed_hosts);
}

static bool
apply_prior_knowledge(const char *text)
{
	char		err[512];

	if (prior_knowledge != NULL && same_text(prior_knowledge, text))
		return false;
	if (!prior_knowledge_set(text, err, sizeof(err)))
	{
		worker_log(WARNING, "the server's jobloop.http2_prior_knowledge does not parse here (%s); "
				   "plain http uses HTTP/1.1", err);
		prior_knowledge_use(NULL);
	}
	if (prior_knowledge)
		pfree(prior_knowledge);
	prior_knowledge = pstrdup(text ? text : "");
	return true;
}

void
settings_apply(const WireSettings *s)
{
	bool		changed = false;

	apply_allowed_hosts(s->allowed_hosts);
	changed |= apply_int("jobloop.max_response_size", &jobloop_max_response_size,
						 s->max_response_size, MIN_RESPONSE_SIZE, MAX_RESPONSE_SIZE);
	changed |= apply_int("jobloop.max_redirects", &jobloop_max_redirects,
						 s->max_redirects, 0, MAX_REDIRECTS);
	changed |= apply_int("jobloop.idle_connection_timeout", &jobloop_idle_connection_timeout,
						 s->idle_connection_timeout, 1, MAX_IDLE_TIMEOUT);
	changed |= apply_prior_knowledge(s->http2_prior_knowledge);
	/* retires the connections if what they were made with changed (http.c) */
	if (changed)
		http_settings_reloaded();
}
