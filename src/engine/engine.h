/*-------------------------------------------------------------------------
 *
 * engine.h
 *		The HTTP engine: what a worker needs to make its calls, in the
 *		server (the extension's background workers) and outside it
 *		(jobloop-worker) alike.
 *
 * The engine is libcurl's multi interface (http.c) behind the outbound
 * guard (guard.c, allowlist.c).  It knows nothing of jobs, transactions or
 * SQL: it starts a request for an owner, and reports the owner's result.
 * Built with FRONTEND defined it links against libpgcommon instead of the
 * backend (palloc and psprintf from fe_memutils, StringInfo), and its
 * settings are variables the program fills from the server.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_ENGINE_H
#define JOBLOOP_ENGINE_H

#ifdef FRONTEND
#include "postgres_fe.h"
#else
#include "postgres.h"
#endif

#include "datatype/timestamp.h"

/* ---- the settings the engine reads (GUCs in the server; from the server outside it) ---- */
extern int	jobloop_max_response_size;	/* bytes */
extern int	jobloop_max_redirects;
extern int	jobloop_idle_connection_timeout;	/* seconds */
extern char *jobloop_ca_file;
extern char *jobloop_client_cert;
extern char *jobloop_client_key;

/* ---- one call and its outcome ---- */
typedef struct HttpRequest
{
	char	   *url;
	char	   *method;			/* upper case */
	char	  **headers;		/* "Name: value" */
	int			nheaders;
	bool		has_idempotency_key;
	bool		has_content_type;
	char	   *body;			/* NULL for none */
	size_t		body_len;
	bool		body_is_json;
	int			timeout_ms;		/* 0: the kind's or the GUC default */
	int			delay_ms;
	char	   *rate_key;		/* as given, or NULL */
	char	   *endpoint;		/* rate_key, or the url's host:port: what limits apply to */
} HttpRequest;

typedef struct HttpResult
{
	int			curl_code;		/* CURLcode; 0 = a response arrived */
	bool		timed_out;		/* no (whole) response within the timeout */
	char	   *error;			/* transport error text, palloc'd */
	long		status;
	char	   *headers;		/* raw header block of the final response */
	size_t		headers_len;
	char	   *body;
	size_t		body_len;
	bool		too_large;
	bool		refused;		/* the guard refused the address */
	bool		permanent;		/* a failure no retry can mend; error says why */
	int64		elapsed_ms;
} HttpResult;

/* ---- http.c: libcurl multi, driven from the worker's one wait ---- */
typedef struct Transfer Transfer;

extern void http_init(void);
extern int	http_epoll_fd(void);
extern Transfer *http_start(const HttpRequest *req, const char *idempotency_key,
							int default_timeout_ms, bool fresh_connection, void *owner);
extern void http_abort(Transfer *xfer);
extern void http_socket_ready(void);
extern void http_timer_fired(TimestampTz now);
extern TimestampTz http_next_timeout(void);
extern Transfer *http_next_finished(void **owner, HttpResult *result);
extern void http_done(Transfer *xfer);
extern int	http_in_flight(void);
extern bool http_close_idle(TimestampTz now);
extern void http_settings_reloaded(void);
extern const char *http_default_ca_file(void);
extern bool url_origin(const char *url, char **scheme, char **host, char **port);

/* ---- guard.c: which addresses outbound HTTP may reach ---- */
struct sockaddr;
extern bool guard_address_allowed(const struct sockaddr *addr, const char *host,
								  const char **reason);

/* ---- HTTP/2 with prior knowledge (jobloop.http2_prior_knowledge) ---- */
extern bool tls_prior_knowledge_any(void);
extern bool tls_prior_knowledge(const char *host, int port);

#endif							/* JOBLOOP_ENGINE_H */
