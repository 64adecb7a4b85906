/*-------------------------------------------------------------------------
 *
 * http.c
 *		All of the worker's HTTP traffic: one libcurl multi handle.
 *
 * curl tells us which sockets to watch (socket callback) and when to call
 * it back (timer callback); we keep those sockets in one epoll set whose fd
 * sits in the worker's WaitEventSet beside its latch, so the worker waits in
 * exactly one place and still answers SIGTERM, SIGHUP and cancels while
 * thousands of calls are in flight.  Connections stay in the multi handle's
 * cache between steps (keep-alive), so a step costs no new connection.
 *
 * Every connection is opened by open_socket, which asks the guard whether
 * the resolved address may be reached: this covers DNS answers, every
 * redirect hop and happy-eyeballs fallbacks alike.  Proxies from the
 * environment are ignored, since they would hide the real address.
 *
 * HTTPS is verified against jobloop.ca_file (or the system's CA
 * certificates), with jobloop.client_cert for servers that ask for one;
 * HTTP/2 is used whenever an HTTPS server offers it (ALPN) and, with prior
 * knowledge, for the plain-http servers jobloop.http2_prior_knowledge
 * lists.  See "TLS and HTTP/2" below.
 *
 * Nothing here raises an error after the worker's commit: failures are
 * reported as transfer results.  Only a worker uses this file: the
 * extension's background worker, or jobloop-worker (built with FRONTEND,
 * see platform.h).
 *
 *-------------------------------------------------------------------------
 */
#include "platform.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <unistd.h>

#include "headers.h"
#include "lib/stringinfo.h"
#include "tls_settings.h"

/* The User-Agent's version: the control file's, given by the Makefile to the engine's objects. */
#ifndef JOBLOOP_ENGINE_VERSION
#error "JOBLOOP_ENGINE_VERSION is set by the Makefile"
#endif

#define MAX_HEADER_BYTES	(256 * 1024)
#define EPOLL_BATCH			256
#define TRANSFERS_PER_SHARD	100		/* see "Shards" below */
#define RECEIVE_BUFFER		4096	/* curl's per-transfer receive buffer (default 16 kB) */

/*
 * Shards: libcurl (7.88) looks for an idle connection to reuse by scanning
 * every cached connection to the same host:port, so one multi handle with
 * 10,000 calls in flight to one API spends most of its time scanning.  The
 * transfers are therefore spread over multi handles of at most
 * TRANSFERS_PER_SHARD each; each keeps its own connection cache (reuse works
 * within it), and all share the one epoll set, whose events carry the
 * shard's index next to the socket.  Removing a finished transfer walks its
 * handle's connection cache too, so smaller shards are cheaper still: at
 * N = 1,000, L ~ 0, curl_multi_remove_handle fell from 2.5% of the worker's
 * CPU with shards of 500 to 0.7% with 100.
 */
/*
 * Idle shards: libcurl watches no socket of an idle cached connection, so a
 * connection the server closes while no transfer uses it stays open (in
 * CLOSE-WAIT) until libcurl next looks for one to reuse -- after a burst,
 * thousands of them, with their buffers, for as long as the worker stays
 * idle.  A shard with no transfer for jobloop.idle_connection_timeout is therefore
 * closed whole (its connections and caches), and when no shard is left the
 * spare easy handles are freed too, so that an idle worker gives its memory
 * and descriptors back.  A new burst opens new connections.
 */
typedef struct Shard
{
	CURLM	   *multi;
	int			index;
	int			in_flight;
	bool		retired;		/* made with TLS settings since changed: no new transfers */
	TimestampTz idle_since;		/* when in_flight fell to 0; 0 while busy */
	bool		has_deadline;
	TimestampTz deadline;		/* when curl wants socket_action(TIMEOUT) */
} Shard;

struct Transfer
{
	CURL	   *easy;
	Shard	   *shard;
	void	   *owner;
	struct curl_slist *headers;
	char	   *body;
	size_t		body_len;
	size_t		body_cap;
	char	   *head;
	size_t		head_len;
	size_t		head_cap;
	bool		too_large;		/* the body passed jobloop.max_response_size */
	bool		headers_too_large;	/* the header block passed MAX_HEADER_BYTES */
	bool		refused;
	char		refused_reason[200];
	CURLSH	   *share;			/* the share its easy handle uses */
	CURLcode	setup_error;	/* an option libcurl refused; see http_start */
	const char *setup_option;
	char		errbuf[CURL_ERROR_SIZE];
	Transfer   *next_free;
};

static Shard **shards = NULL;	/* each allocated apart: transfers point to theirs;
								 * NULL where an idle one was closed */
static int	nshards = 0;		/* slots used in shards[] */
static int	live_shards = 0;
static int	max_shards = 0;
static int	epoll_fd = -1;
static int	in_flight = 0;
static Transfer *free_transfers = NULL;
static Transfer *failed_transfers = NULL;	/* could not start; reported as finished */

/*
 * TLS and HTTP/2.
 *
 * Sessions: every transfer uses one share object whose TLS session cache
 * all shards share, so a connection opened in another shard (or after a
 * keep-alive connection was closed) resumes a session instead of making a
 * full handshake.  Keep-alive connections are reused within a shard.
 *
 * Reloads: libcurl caches what it read from files -- the CA store in the
 * multi handle (or its share) for CURLOPT_CA_CACHE_TIMEOUT, 24 h by default,
 * keyed by the file's path only -- and reuses connections and sessions
 * whose settings have the same paths.  A file replaced at the same path
 * would therefore go unnoticed for a day, or for ever on a busy connection.
 * So after each reload the worker compares tls_settings_signature() (the
 * settings, and each file's inode, size and times) with the one its
 * connections were made with; when it changed, every shard is retired (it
 * takes no new transfer and is closed, connections and CA cache with it, as
 * soon as its last transfer ends) and the share is replaced, so no new
 * request uses a connection, a cached CA store or a TLS session of the old
 * settings.
 *
 * HTTP/2: over https, libcurl offers h2 by ALPN and, when the server takes
 * it, multiplexes the shard's transfers to that server over one connection
 * (CURLMOPT_PIPELINING), as many streams as the server's SETTINGS allow
 * and at most MAX_STREAMS; CURLOPT_PIPEWAIT makes a new transfer wait for a
 * connection being opened to the same server rather than open one more.
 * Plain http speaks HTTP/1.1, or HTTP/2 from the first byte to the servers
 * listed in jobloop.http2_prior_knowledge.  A GOAWAY or a reset stream
 * fails only the transfers the server did not process (libcurl retries
 * those it refused by itself); they are retried like any transport error.
 */
#define MAX_STREAMS			TRANSFERS_PER_SHARD	/* per connection; one shard's worth */
#define CA_CACHE_SECONDS	(24L * 60 * 60)	/* a changed file retires the cache */

static CURLSH *share = NULL;	/* NULL: not made yet (or could not be) */
static CURLSH **retired_shares = NULL;	/* in TopMemoryContext; grows */
static int	nretired_shares = 0;
static int	max_retired_shares = 0;
static char *tls_signature = NULL;	/* malloc'd; what the shards were made with */

/*
 * libcurl before 8.0.0 fails every transfer that reuses an HTTP/2
 * connection made with prior knowledge (CURLE_HTTP2 at once: it stacks a
 * second HTTP/2 layer on the connection; curl issue 10634, fixed by PR
 * 10643).  Debian 12 ships 7.88.1.  With such a libcurl each request to a
 * jobloop.http2_prior_knowledge server gets a connection of its own, closed
 * after it: HTTP/2 still, but neither reused nor multiplexed.
 */
static bool prior_knowledge_reuse_broken = false;

/* ---- curl callbacks ---- */

static int
socket_callback(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	Shard	   *shard = userp;
	struct epoll_event ev;

	if (what == CURL_POLL_REMOVE)
	{
		/* the socket may be closed already; epoll then dropped it itself */
		(void) epoll_ctl(epoll_fd, EPOLL_CTL_DEL, s, NULL);
		curl_multi_assign(shard->multi, s, NULL);
		return 0;
	}
	memset(&ev, 0, sizeof(ev));
	ev.data.u64 = ((uint64) shard->index << 32) | (uint32) s;
	ev.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
	if (socketp == NULL)
	{
		if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, s, &ev) != 0 && errno == EEXIST)
			(void) epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s, &ev);
		curl_multi_assign(shard->multi, s, (void *) 1);
	}
	else if (epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
		(void) epoll_ctl(epoll_fd, EPOLL_CTL_ADD, s, &ev);
	return 0;
}

static int
timer_callback(CURLM *m, long timeout_ms, void *userp)
{
	Shard	   *shard = userp;

	shard->has_deadline = timeout_ms >= 0;
	if (shard->has_deadline)
		shard->deadline = GetCurrentTimestamp() + (TimestampTz) timeout_ms * 1000;
	return 0;
}

static size_t
write_callback(char *data, size_t size, size_t nmemb, void *userp)
{
	Transfer   *xfer = userp;
	size_t		n = size * nmemb;

	if (xfer->body_len + n > (size_t) jobloop_max_response_size)
	{
		xfer->too_large = true;
		return 0;				/* makes curl fail the transfer */
	}
	if (xfer->body_len + n + 1 > xfer->body_cap)
	{
		size_t		cap = Max(xfer->body_cap * 2, xfer->body_len + n + 1);
		char	   *body = realloc(xfer->body, Max(cap, 1024));

		if (body == NULL)
			return 0;
		xfer->body = body;
		xfer->body_cap = Max(cap, 1024);
	}
	memcpy(xfer->body + xfer->body_len, data, n);
	xfer->body_len += n;
	xfer->body[xfer->body_len] = '\0';
	return n;
}

/* Did the header block end (an empty line)? */
static bool
headers_complete(Transfer *xfer)
{
	const char *h = xfer->head;
	size_t		n = xfer->head_len;

	return (n >= 2 && h[n - 2] == '\n' && h[n - 1] == '\n') ||
		(n >= 3 && h[n - 3] == '\n' && h[n - 2] == '\r' && h[n - 1] == '\n');
}

static size_t
header_callback(char *data, size_t size, size_t nitems, void *userp)
{
	Transfer   *xfer = userp;
	size_t		n = size * nitems;

	/*
	 * A status line after a complete header block starts a new response (a
	 * redirect, 100 Continue); a header line that merely starts with "HTTP/"
	 * does not, or it could reset the 256 kB cap.
	 */
	if (n >= 5 && strncmp(data, "HTTP/", 5) == 0 && (xfer->head_len == 0 || headers_complete(xfer)))
		xfer->head_len = 0;
	if (xfer->head_len + n > MAX_HEADER_BYTES)
	{
		xfer->headers_too_large = true;
		return 0;
	}
	if (xfer->head_len + n + 1 > xfer->head_cap)
	{
		size_t		cap = Max(Max(xfer->head_cap * 2, xfer->head_len + n + 1), 1024);
		char	   *head = realloc(xfer->head, cap);

		if (head == NULL)
			return 0;
		xfer->head = head;
		xfer->head_cap = cap;
	}
	memcpy(xfer->head + xfer->head_len, data, n);
	xfer->head_len += n;
	xfer->head[xfer->head_len] = '\0';
	return n;
}

/*
 * Text from the API (a redirect's URL, libcurl's messages quoting it) goes
 * into last_error, a text column: keep printable ASCII only.
 */
static void
make_printable(char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || (unsigned char) *s >= 0x7F)
			*s = '?';
}

/* The host name of the URL being requested now (it changes on redirects). */
static void
current_host(Transfer *xfer, char *host, size_t size)
{
	char	   *url = NULL;
	CURLU	   *u = curl_url();
	char	   *h = NULL;

	host[0] = '\0';
	if (u && curl_easy_getinfo(xfer->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url &&
		curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK && h[0] != '\0')
	{
		/* IPv6 literals come bracketed */
		if (h[0] == '[')
			strlcpy(host, h + 1, Min(size, strlen(h) - 1));
		else
			strlcpy(host, h, size);
	}
	if (h)
		curl_free(h);
	if (u)
		curl_url_cleanup(u);
}

/* Ask the guard; when it says no, mark the transfer refused and say why. */
static bool
address_allowed(Transfer *xfer, const struct sockaddr *addr)
{
	const char *reason = NULL;
	char		host[256];
	char		text[INET6_ADDRSTRLEN] = "?";

	/* a public address needs no host name: skip the URL parse */
	if (guard_address_allowed(addr, NULL, &reason))
		return true;
	current_host(xfer, host, sizeof(host));
	if (host[0] && guard_address_allowed(addr, host, &reason))
		return true;

	if (addr->sa_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *) addr)->sin_addr, text, sizeof(text));
	else if (addr->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *) addr)->sin6_addr, text, sizeof(text));
	xfer->refused = true;
	snprintf(xfer->refused_reason, sizeof(xfer->refused_reason),
			 "refused to connect to %s (%s address) for host \"%s\": not in jobloop.allowed_hosts",
			 text, reason, host);
	make_printable(xfer->refused_reason);
	return false;
}

/* Every new connection: DNS answers, redirect hops, happy-eyeballs fallbacks. */
static curl_socket_t
open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	Transfer   *xfer = clientp;

	if (!address_allowed(xfer, &address->addr))
		return CURL_SOCKET_BAD;
	return socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
}

/*
 * Every request, just before it is sent, also over a reused keep-alive
 * connection: open_socket saw that address when jobloop.allowed_hosts may
 * have been wider, so the guard is asked again.  After the setting
 * changes, no request reaches an address it no longer allows.
 */
static int
before_request(void *clientp, char *primary_ip, char *local_ip, int primary_port, int local_port)
{
	Transfer   *xfer = clientp;
	struct sockaddr_storage ss;

	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, primary_ip, &((struct sockaddr_in *) &ss)->sin_addr) == 1)
		ss.ss_family = AF_INET;
	else if (inet_pton(AF_INET6, primary_ip, &((struct sockaddr_in6 *) &ss)->sin6_addr) == 1)
		ss.ss_family = AF_INET6;
	return address_allowed(xfer, (struct sockaddr *) &ss) ? CURL_PREREQFUNC_OK : CURL_PREREQFUNC_ABORT;
}

/*
 * A URL's scheme, host and port (the scheme's default port if it names
 * none), as libcurl parses it, palloc'd; false if it cannot.  scheme may be
 * NULL when not wanted.
 */
bool
url_origin(const char *url, char **scheme, char **host, char **port)
{
	CURLU	   *u = curl_url();
	char	   *s = NULL;
	char	   *h = NULL;
	char	   *p = NULL;
	bool		ok;

	ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		(scheme == NULL || curl_url_get(u, CURLUPART_SCHEME, &s, 0) == CURLUE_OK) &&
		curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_PORT, &p, CURLU_DEFAULT_PORT) == CURLUE_OK;
	if (ok)
	{
		if (scheme)
			*scheme = pstrdup(s);
		*host = pstrdup(h);
		*port = pstrdup(p);
	}
	if (s)
		curl_free(s);
	if (h)
		curl_free(h);
	if (p)
		curl_free(p);
	if (u)
		curl_url_cleanup(u);
	return ok;
}

/*
 * The Location of a response, as a step function would see it in its
 * headers (request.c): every Location field's value joined by ", ", a
 * folded line joined to its field by a space.  palloc'd; NULL if none.
 */
static char *
location_header(const HttpResult *res)
{
	HeaderIter	it;
	HeaderField field;
	StringInfoData value;
	bool		found = false;
	bool		in_location = false;	/* a folded line continues a Location */

	initStringInfo(&value);
	header_iter_init(&it, res->headers, res->headers_len);
	while (header_iter_next(&it, &field))
	{
		if (field.continuation)
		{
			if (in_location)
			{
				if (value.len > 0)
					appendStringInfoChar(&value, ' ');
				appendBinaryStringInfo(&value, field.value, (int) field.value_len);
			}
			continue;
		}
		in_location = field.name_len == 8 && pg_strncasecmp(field.name, "location", 8) == 0;
		if (!in_location)
			continue;
		if (found)
			appendStringInfoString(&value, ", ");
		appendBinaryStringInfo(&value, field.value, (int) field.value_len);
		found = true;
	}
	if (!found)
	{
		pfree(value.data);
		return NULL;
	}
	return value.data;
}

/* ---- setup ---- */

/*
 * Thousands of connections need thousands of descriptors, and a worker
 * inherits the postmaster's soft limit (often 1024): raise it to the hard
 * limit.
 */
static void
raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max)
	{
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
			elog(LOG, "jobloop could not raise its open-files limit: %m");
	}
}

void
http_init(void)
{
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		elog(ERROR, "could not initialize libcurl");
	raise_fd_limit();
	epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (epoll_fd < 0)
		elog(ERROR, "epoll_create1 failed: %m");
	http_settings_reloaded();	/* what the first connections are made with */
	prior_knowledge_reuse_broken = curl_version_info(CURLVERSION_NOW)->version_num < 0x080000;
}

static bool
setup_multi(Shard *shard)
{
	CURLM	   *m = shard->multi;

	return curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, socket_callback) == CURLM_OK &&
		curl_multi_setopt(m, CURLMOPT_SOCKETDATA, shard) == CURLM_OK &&
		curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, timer_callback) == CURLM_OK &&
		curl_multi_setopt(m, CURLMOPT_TIMERDATA, shard) == CURLM_OK &&
		curl_multi_setopt(m, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX) == CURLM_OK &&
		curl_multi_setopt(m, CURLMOPT_MAX_CONCURRENT_STREAMS, (long) MAX_STREAMS) == CURLM_OK &&
	/* keep a connection per call slot, so that keep-alive survives between steps */
		curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, (long) TRANSFERS_PER_SHARD + 16) == CURLM_OK;
}

/* The least busy shard with room, or a new one; NULL if none can be made. */
static Shard *
pick_shard(void)
{
	Shard	   *best = NULL;
	Shard	   *shard;

	int			slot = -1;

	for (int i = 0; i < nshards; i++)
	{
		if (shards[i] == NULL)
		{
			if (slot < 0)
				slot = i;
		}
		else if (!shards[i]->retired && shards[i]->in_flight < TRANSFERS_PER_SHARD &&
				 (best == NULL || shards[i]->in_flight < best->in_flight))
			best = shards[i];
	}
	if (best)
		return best;
	if (slot < 0 && nshards == max_shards)
	{
		int			n = Max(4, max_shards * 2);
		Shard	  **grown = realloc(shards, n * sizeof(Shard *));

		if (grown == NULL)
			return NULL;
		shards = grown;
		max_shards = n;
	}
	shard = calloc(1, sizeof(Shard));
	if (shard == NULL)
		return NULL;
	shard->multi = curl_multi_init();
	if (shard->multi == NULL || !setup_multi(shard))
	{
		elog(LOG, "jobloop could not set up a libcurl multi handle");
		if (shard->multi)
			curl_multi_cleanup(shard->multi);
		free(shard);
		return NULL;
	}
	if (slot < 0)
		slot = nshards++;
	shard->index = slot;
	shards[slot] = shard;
	live_shards++;
	return shard;
}

/*
 * libcurl's default CA bundle ("" if it has none, or cannot say): what
 * https requests trust while jobloop.ca_file is empty, so tls.c's reload
 * signature follows that file too (update-ca-certificates, then a reload).
 */
const char *
http_default_ca_file(void)
{
	static char *path = NULL;

	if (path == NULL)
	{
		CURL	   *e = curl_easy_init();
		char	   *p = NULL;

#if LIBCURL_VERSION_NUM >= 0x075400	/* 7.84.0 */
		if (e == NULL || curl_easy_getinfo(e, CURLINFO_CAINFO, &p) != CURLE_OK)
			p = NULL;
#endif
		path = MemoryContextStrdup(TopMemoryContext, p ? p : "");
		if (e != NULL)
			curl_easy_cleanup(e);
	}
	return path;
}

/* The share of the current TLS settings; NULL if libcurl cannot make one. */
static CURLSH *
current_share(void)
{
	static bool warned = false;

	if (share == NULL)
	{
		share = curl_share_init();
		if (share != NULL &&
			curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK)
		{
			curl_share_cleanup(share);
			share = NULL;
		}
		if (share == NULL && !warned)
		{
			elog(LOG, "jobloop could not set up a shared TLS session cache; "
				 "each connection makes a full TLS handshake");
			warned = true;
		}
	}
	return share;
}

/* Free the shares of old TLS settings that no easy handle uses any more. */
static void
cleanup_retired_shares(void)
{
	for (int i = 0; i < nretired_shares;)
	{
		if (curl_share_cleanup(retired_shares[i]) == CURLSHE_OK)
			retired_shares[i] = retired_shares[--nretired_shares];
		else
			i++;				/* CURLSHE_IN_USE: a transfer still runs with it */
	}
}

/*
 * After a reload: if the TLS settings or their files changed, retire the
 * shards and the share (see "TLS and HTTP/2").
 */
void
http_settings_reloaded(void)
{
	char	   *signature = tls_settings_signature();

	if (tls_signature != NULL && strcmp(signature, tls_signature) == 0)
	{
		pfree(signature);
		return;
	}
	if (tls_signature != NULL)
	{
		int			retired = 0;

		for (int i = 0; i < nshards; i++)
			if (shards[i] != NULL && !shards[i]->retired)
			{
				shards[i]->retired = true;
				retired++;
			}
		if (share != NULL)
		{
			/* spare handles would keep it in use until they run again */
			Transfer  **link = &free_transfers;

			while (*link)
			{
				Transfer   *x = *link;

				if (x->share == NULL || curl_easy_setopt(x->easy, CURLOPT_SHARE, NULL) == CURLE_OK)
				{
					x->share = NULL;
					link = &x->next_free;
				}
				else
				{
					/* a handle that will not let go of the share: do without it */
					*link = x->next_free;
					curl_easy_cleanup(x->easy);
					free(x);
				}
			}
			/*
			 * Every retired share is kept until its last transfer ends, however
			 * many reloads come first: a session of the old settings must not
			 * be resumed (resuming skips the certificate check).
			 */
			if (nretired_shares == max_retired_shares)
			{
				max_retired_shares = Max(16, max_retired_shares * 2);
				retired_shares = retired_shares == NULL
					? MemoryContextAlloc(TopMemoryContext, max_retired_shares * sizeof(CURLSH *))
					: repalloc(retired_shares, max_retired_shares * sizeof(CURLSH *));
			}
			retired_shares[nretired_shares++] = share;
			share = NULL;
		}
		cleanup_retired_shares();
		elog(LOG, "jobloop: TLS or HTTP/2 settings changed; %d shard(s) of connections "
			 "retired, new requests use new connections", retired);
	}
	free(tls_signature);
	tls_signature = strdup(signature);
	pfree(signature);
}

int
http_epoll_fd(void)
{
	return epoll_fd;
}

static Transfer *
new_transfer(void)
{
	Transfer   *xfer = calloc(1, sizeof(Transfer));

	if (xfer == NULL)
		return NULL;
	xfer->easy = curl_easy_init();
	if (xfer->easy == NULL)
	{
		free(xfer);
		return NULL;
	}
	return xfer;
}

static Transfer *
get_transfer(void)
{
	Transfer   *xfer = free_transfers;

	if (xfer)
	{
		free_transfers = xfer->next_free;
		curl_easy_reset(xfer->easy);
	}
	else if ((xfer = new_transfer()) == NULL)
		return NULL;
	xfer->body_len = 0;
	xfer->head_len = 0;
	xfer->too_large = false;
	xfer->headers_too_large = false;
	xfer->refused = false;
	xfer->setup_error = CURLE_OK;
	xfer->setup_option = NULL;
	xfer->errbuf[0] = '\0';
	xfer->headers = NULL;
	xfer->next_free = NULL;
	return xfer;
}

static bool
add_header(Transfer *xfer, const char *line)
{
	struct curl_slist *l = curl_slist_append(xfer->headers, line);

	if (l == NULL)
		return false;
	xfer->headers = l;
	return true;
}

/* Is the URL's host:port in jobloop.http2_prior_knowledge? */
static bool
url_has_prior_knowledge(const char *url)
{
	char	   *host;
	char	   *port;
	bool		listed;

	if (!url_origin(url, NULL, &host, &port))
		return false;
	listed = tls_prior_knowledge(host, atoi(port));
	pfree(host);
	pfree(port);
	return listed;
}

/*
 * Every option of a request, each one checked: an option libcurl refuses
 * is a request sent otherwise than we meant, or worse.  The first refusal
 * is kept in xfer->setup_error / setup_option.
 */
#define SET(opt, value) \
	do { \
		CURLcode	rc_ = curl_easy_setopt(e, opt, value); \
		if (rc_ != CURLE_OK) \
		{ \
			xfer->setup_error = rc_; \
			xfer->setup_option = #opt; \
			return false; \
		} \
	} while (0)

/* TLS and the HTTP version (see "TLS and HTTP/2"). */
static bool
configure_tls(Transfer *xfer, const HttpRequest *req)
{
	CURL	   *e = xfer->easy;
	bool		https = pg_strncasecmp(req->url, "https://", 8) == 0;
	bool		prior_knowledge = !https && tls_prior_knowledge_any() &&
		url_has_prior_knowledge(req->url);

	if (https && jobloop_client_key[0] != '\0' && jobloop_client_cert[0] == '\0')
	{
		/* libcurl would ignore the key and present no certificate */
		xfer->setup_error = CURLE_SSL_CERTPROBLEM;
		xfer->setup_option = "jobloop.client_key is set but jobloop.client_cert is not";
		return false;
	}
	SET(CURLOPT_SSL_VERIFYPEER, 1L);
	SET(CURLOPT_SSL_VERIFYHOST, 2L);

	/*
	 * The CAs are one bundle file: jobloop.ca_file, or libcurl's default
	 * bundle.  No CA directory: Debian's libcurl also names /etc/ssl/certs,
	 * whose CAs OpenSSL would trust beside jobloop.ca_file (a private CA
	 * would not replace the public ones), and with a directory set libcurl
	 * keeps no CA cache, so every new connection parsed the whole bundle
	 * again in the worker (17.7 ms of CPU per connection with Debian's).
	 * The cache lives in the shard's multi handle; a reload that changes the
	 * file retires the shards (see "TLS and HTTP/2").
	 */
	if (jobloop_ca_file[0] != '\0')
		SET(CURLOPT_CAINFO, jobloop_ca_file);
	SET(CURLOPT_CAPATH, NULL);
#if LIBCURL_VERSION_NUM >= 0x075700	/* 7.87.0 */
	SET(CURLOPT_CA_CACHE_TIMEOUT, CA_CACHE_SECONDS);
#endif
	if (jobloop_client_cert[0] != '\0')
	{
		SET(CURLOPT_SSLCERT, jobloop_client_cert);
		SET(CURLOPT_SSLCERTTYPE, "PEM");
		if (jobloop_client_key[0] != '\0')
			SET(CURLOPT_SSLKEY, jobloop_client_key);
		/*
		 * An encrypted key must fail, not make OpenSSL ask for its passphrase
		 * on the server's terminal, which would stop the worker.
		 */
		SET(CURLOPT_KEYPASSWD, "");
	}
	xfer->share = current_share();
	SET(CURLOPT_SHARE, xfer->share);
	SET(CURLOPT_HTTP_VERSION,
		prior_knowledge ? (long) CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE : (long) CURL_HTTP_VERSION_2TLS);
	if (prior_knowledge && prior_knowledge_reuse_broken)
	{
		static bool said = false;

		if (!said)
			elog(LOG, "jobloop: libcurl %s cannot reuse HTTP/2 connections made with prior knowledge "
				 "(fixed in 8.0.0); each request to a server of jobloop.http2_prior_knowledge "
				 "gets a connection of its own", curl_version_info(CURLVERSION_NOW)->version);
		said = true;
		SET(CURLOPT_FRESH_CONNECT, 1L);
		SET(CURLOPT_FORBID_REUSE, 1L);
		return true;
	}

	/*
	 * Wait for a connection being opened to the same server, which may take
	 * this transfer as one more stream, rather than open another.  Not for
	 * plain HTTP/1.1, where no connection can be shared: there it would only
	 * hold each new transfer back behind another's connect.
	 */
	if (https || prior_knowledge)
		SET(CURLOPT_PIPEWAIT, 1L);
	return true;
}

static bool
configure(Transfer *xfer, const HttpRequest *req, int default_timeout_ms, bool fresh_connection)
{
	CURL	   *e = xfer->easy;
	bool		has_body = req->body != NULL;

	/*
	 * First, while it can still be told apart from the rest: libcurl 7.88
	 * keeps a transfer's receive buffer when the transfer ends in a failed
	 * redirect (a Location with a scheme other than http or https), and then
	 * refuses to size it again.  curl_easy_reset has by then set the size
	 * back to 16 kB, so the handle would receive 16 kB at a time into our
	 * 4 kB buffer.  The caller replaces a handle that refuses this.
	 */
	SET(CURLOPT_BUFFERSIZE, (long) RECEIVE_BUFFER);

	SET(CURLOPT_URL, req->url);
	SET(CURLOPT_PRIVATE, xfer);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_ERRORBUFFER, xfer->errbuf);
	SET(CURLOPT_WRITEFUNCTION, write_callback);
	SET(CURLOPT_WRITEDATA, xfer);
	SET(CURLOPT_HEADERFUNCTION, header_callback);
	SET(CURLOPT_HEADERDATA, xfer);
	SET(CURLOPT_OPENSOCKETFUNCTION, open_socket);
	SET(CURLOPT_OPENSOCKETDATA, xfer);
	SET(CURLOPT_PREREQFUNCTION, before_request);
	SET(CURLOPT_PREREQDATA, xfer);
	SET(CURLOPT_HTTPHEADER, xfer->headers);
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_FOLLOWLOCATION, jobloop_max_redirects > 0 ? 1L : 0L);
	SET(CURLOPT_MAXREDIRS, (long) jobloop_max_redirects);
	SET(CURLOPT_PROXY, "");
	SET(CURLOPT_NOPROXY, "*");
	SET(CURLOPT_TIMEOUT_MS, (long) (req->timeout_ms > 0 ? req->timeout_ms : default_timeout_ms));
	SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) jobloop_max_response_size);
	SET(CURLOPT_ACCEPT_ENCODING, "");
	SET(CURLOPT_TCP_KEEPALIVE, 1L);
	SET(CURLOPT_USERAGENT, "jobloop/" JOBLOOP_ENGINE_VERSION);
	if (!configure_tls(xfer, req))
		return false;

	/*
	 * libcurl re-sends a request by itself when a reused connection closes
	 * without a reply (a stale keep-alive), on the next pooled connection.
	 * A retry after a transport error therefore gets a new connection, so
	 * that re-sending cannot repeat on every attempt.
	 */
	if (fresh_connection)
		SET(CURLOPT_FRESH_CONNECT, 1L);

	if (strcmp(req->method, "GET") == 0)
		SET(CURLOPT_HTTPGET, 1L);
	else if (strcmp(req->method, "HEAD") == 0)
		SET(CURLOPT_NOBODY, 1L);
	else if (strcmp(req->method, "POST") == 0 || strcmp(req->method, "PUT") == 0 ||
			 strcmp(req->method, "PATCH") == 0 || has_body)
	{
		/* a body, possibly empty: "Content-Length: 0" rather than none */
		if (strcmp(req->method, "POST") != 0)
			SET(CURLOPT_CUSTOMREQUEST, req->method);
		SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_len);
		SET(CURLOPT_COPYPOSTFIELDS, has_body ? req->body : "");
	}
	else
		SET(CURLOPT_CUSTOMREQUEST, req->method);	/* DELETE, OPTIONS: no body */
	return true;
}

#undef SET

static bool
build_headers(Transfer *xfer, const HttpRequest *req, const char *idempotency_key)
{
	char		line[300];

	for (int i = 0; i < req->nheaders; i++)
		if (!add_header(xfer, req->headers[i]))
			return false;
	if (!req->has_idempotency_key)
	{
		snprintf(line, sizeof(line), "Idempotency-Key: %s", idempotency_key);
		if (!add_header(xfer, line))
			return false;
	}
	if (!req->has_content_type && (req->body_is_json || req->body == NULL))
	{
		/*
		 * A JSON body says so; a request without a body has no Content-Type
		 * (libcurl would call an empty POST body a form).  A string body
		 * keeps libcurl's application/x-www-form-urlencoded, which form APIs
		 * (OAuth token endpoints, say) expect.
		 */
		if (!add_header(xfer, req->body_is_json ? "Content-Type: application/json" : "Content-Type:"))
			return false;
	}
	/* no 100-continue round trip before a body */
	return add_header(xfer, "Expect:");
}

/*
 * Start a request.  Returns NULL only when memory runs out; the caller then
 * retries later.  A request libcurl refuses to set up is not started: it is
 * reported by http_next_finished as failed, with the option named.
 */
Transfer *
http_start(const HttpRequest *req, const char *idempotency_key, int default_timeout_ms,
		   bool fresh_connection, void *owner)
{
	Shard	   *shard = pick_shard();
	Transfer   *xfer = shard ? get_transfer() : NULL;

	if (xfer == NULL)
		return NULL;
	xfer->shard = shard;
	xfer->owner = owner;
	if (!build_headers(xfer, req, idempotency_key))
	{
		http_done(xfer);
		return NULL;
	}
	if (!configure(xfer, req, default_timeout_ms, fresh_connection) &&
		xfer->setup_option != NULL && strcmp(xfer->setup_option, "CURLOPT_BUFFERSIZE") == 0)
	{
		/* a reused handle that kept its buffer (see configure): use a new one */
		CURL	   *fresh = curl_easy_init();

		if (fresh == NULL)
		{
			http_done(xfer);
			return NULL;
		}
		curl_easy_cleanup(xfer->easy);
		xfer->easy = fresh;
		xfer->setup_error = CURLE_OK;
		xfer->setup_option = NULL;
		(void) configure(xfer, req, default_timeout_ms, fresh_connection);
	}
	if (xfer->setup_error == CURLE_OUT_OF_MEMORY)
	{
		/* like the other allocations above: try again later */
		http_done(xfer);
		return NULL;
	}
	if (xfer->setup_error == CURLE_OK)
	{
		CURLMcode	mc = curl_multi_add_handle(shard->multi, xfer->easy);

		if (mc == CURLM_OK)
		{
			shard->in_flight++;
			shard->idle_since = 0;
			in_flight++;
			return xfer;
		}
		if (mc == CURLM_OUT_OF_MEMORY)
		{
			http_done(xfer);
			return NULL;
		}
		xfer->setup_error = CURLE_FAILED_INIT;
		xfer->setup_option = "curl_multi_add_handle";
	}
	if (strncmp(xfer->setup_option, "jobloop.", 8) != 0)
		elog(LOG, "jobloop could not start a request: libcurl refused %s: %s",
			 xfer->setup_option, curl_easy_strerror(xfer->setup_error));
	else
	{
		/* a setting that cannot work: the job's last_error says it; the log once */
		static bool said = false;

		if (!said)
			elog(LOG, "jobloop cannot make HTTPS requests: %s", xfer->setup_option);
		said = true;
	}
	xfer->next_free = failed_transfers;
	failed_transfers = xfer;
	in_flight++;
	return xfer;
}

/* ---- driving ---- */

static void
shard_transfer_gone(Shard *shard)
{
	if (--shard->in_flight == 0)
		shard->idle_since = GetCurrentTimestamp();
}

/*
 * Close the shards that have been idle for jobloop.idle_connection_timeout, and with the
 * last one the spare easy handles (see "Idle shards").  Returns true if it
 * freed anything.
 */
bool
http_close_idle(TimestampTz now)
{
	bool		closed = false;

	for (int i = 0; i < nshards; i++)
	{
		Shard	   *shard = shards[i];

		if (shard == NULL || shard->in_flight > 0 ||
			(!shard->retired &&
			 (shard->idle_since == 0 ||
			  now - shard->idle_since < (TimestampTz) jobloop_idle_connection_timeout * USECS_PER_SEC)))
			continue;
		/* closes its connections; the socket callback takes them off epoll */
		(void) curl_multi_cleanup(shard->multi);
		free(shard);
		shards[i] = NULL;
		live_shards--;
		closed = true;
	}
	while (nshards > 0 && shards[nshards - 1] == NULL)
		nshards--;
	if (nretired_shares > 0)
		cleanup_retired_shares();
	if (closed && live_shards == 0)
	{
		while (free_transfers)
		{
			Transfer   *xfer = free_transfers;

			free_transfers = xfer->next_free;
			curl_easy_cleanup(xfer->easy);
			free(xfer);
		}
	}
	return closed;
}

void
http_socket_ready(void)
{
	struct epoll_event events[EPOLL_BATCH];
	int			n;
	int			running;

	do
	{
		n = epoll_wait(epoll_fd, events, EPOLL_BATCH, 0);
		for (int i = 0; i < n; i++)
		{
			int			index = (int) (events[i].data.u64 >> 32);
			curl_socket_t fd = (curl_socket_t) (events[i].data.u64 & 0xFFFFFFFF);
			int			flags = 0;

			if (events[i].events & EPOLLIN)
				flags |= CURL_CSELECT_IN;
			if (events[i].events & EPOLLOUT)
				flags |= CURL_CSELECT_OUT;
			if (events[i].events & (EPOLLERR | EPOLLHUP))
				flags |= CURL_CSELECT_ERR;
			/* an error here is the transfer's, and reaches us as its result */
			if (index < nshards && shards[index] != NULL)
				(void) curl_multi_socket_action(shards[index]->multi, fd, flags, &running);
		}
	} while (n == EPOLL_BATCH);
}

void
http_timer_fired(TimestampTz now)
{
	int			running;

	for (int i = 0; i < nshards; i++)
		if (shards[i] != NULL && shards[i]->has_deadline && now >= shards[i]->deadline)
		{
			shards[i]->has_deadline = false;
			(void) curl_multi_socket_action(shards[i]->multi, CURL_SOCKET_TIMEOUT, 0, &running);
		}
}

/* When curl wants to be called back, or 0 if it does not. */
TimestampTz
http_next_timeout(void)
{
	TimestampTz next = 0;

	/* a request that could not start is "finished" now */
	if (failed_transfers)
		return GetCurrentTimestamp();
	for (int i = 0; i < nshards; i++)
	{
		Shard	   *shard = shards[i];
		TimestampTz t;

		if (shard == NULL)
			continue;
		if (shard->retired && shard->in_flight == 0)
			t = GetCurrentTimestamp();	/* to be closed */
		else if (shard->has_deadline)
			t = shard->deadline;
		else if (shard->idle_since != 0)
			t = shard->idle_since + (TimestampTz) jobloop_idle_connection_timeout * USECS_PER_SEC;
		else
			continue;
		if (next == 0 || t < next)
			next = t;
	}
	return next;
}

/*
 * OpenSSL's reasons for a handshake that failed because one side refuses
 * what the other offers or presents: the peer's alerts (protocol version,
 * handshake failure = no cipher in common, certificate required / bad /
 * unknown CA, ...) and the local refusals (unsupported protocol, no shared
 * cipher).  Every new handshake with the same settings ends the same way.
 */
static const char *const tls_refusals[] = {
	"alert protocol version",
	"alert handshake failure",
	"alert insufficient security",
	"alert certificate required",
	"alert bad certificate",
	"alert unsupported certificate",
	"alert certificate revoked",
	"alert certificate expired",
	"alert certificate unknown",
	"alert unknown ca",
	"alert access denied",
	"unrecognized name",			/* OpenSSL 3: "tlsv1 unrecognized name" */
	"alert no application protocol",
	"unsupported protocol",
	"no protocols available",
	"no shared cipher",
	"no ciphers available",
	"no suitable signature algorithm",
	"legacy sigalg disallowed",
	"wrong version number",
};

/*
 * Is a TLS failure certainly permanent?  Verification failures (unknown
 * CA, expired, host name mismatch), a CA file or client certificate that
 * cannot be loaded, a cipher libcurl cannot use: yes, by their code.
 * CURLE_SSL_CONNECT_ERROR, though, is any failed handshake -- also a
 * connection reset or closed in the middle of it, an overloaded server or
 * a load balancer's backend going away, which a retry mends -- and a TLS
 * 1.3 server's refusal of the client certificate arrives after the
 * client's side of the handshake, at the first read (CURLE_RECV_ERROR).
 * For those only a refusal named in tls_refusals is permanent; anything
 * else (SSL_ERROR_SYSCALL, unexpected EOF, a reset) is retried.  The texts
 * are OpenSSL's, which is the TLS library Debian's libcurl4-openssl-dev
 * builds against; with another, those codes are simply retried.
 */
static bool
tls_failure_permanent(CURLcode code, const char *errbuf)
{
	switch (code)
	{
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_ENGINE_NOTFOUND:
		case CURLE_SSL_ENGINE_SETFAILED:
		case CURLE_SSL_ENGINE_INITFAILED:
		case CURLE_SSL_CRL_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
#if LIBCURL_VERSION_NUM >= 0x074d00
		case CURLE_SSL_CLIENTCERT:
#endif
			return true;
		case CURLE_BAD_FUNCTION_ARGUMENT:
			/* libcurl 8.2x: a client certificate or key it cannot load (CERTPROBLEM before) */
			return strstr(errbuf, "private key") != NULL || strstr(errbuf, "client certificate") != NULL;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_SEND_ERROR:
			for (int i = 0; i < lengthof(tls_refusals); i++)
				if (strstr(errbuf, tls_refusals[i]) != NULL)
					return true;
			return false;
		default:
			return false;
	}
}

/*
 * "TLS: <libcurl's reason> (https://host:port)": the origin only, since a
 * path or query may carry credentials.  libcurl's "SSL certificate
 * problem: X" (7.x) and "SSL certificate OpenSSL verify result: X (n)"
 * (recent 8.x) read "certificate verify failed: X".
 */
static char *
describe_tls_failure(Transfer *xfer, CURLcode code)
{
	static const char verify_prefix[] = "SSL certificate problem: ";
	static const char verify_prefix_8[] = "SSL certificate OpenSSL verify result: ";	/* 8.x */
	const char *reason = xfer->errbuf[0] ? xfer->errbuf : curl_easy_strerror(code);
	char	   *url = NULL;
	char	   *origin = NULL;
	char	   *scheme;
	char	   *host;
	char	   *port;
	char	   *text;

	char	   *prev;

	/* every piece freed: in jobloop-worker palloc is malloc, with no context to reset */
	if (curl_easy_getinfo(xfer->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url &&
		url_origin(url, &scheme, &host, &port))
	{
		origin = psprintf("%s://%s:%s", scheme, host, port);
		pfree(scheme);
		pfree(host);
		pfree(port);
	}
	if (strncmp(reason, verify_prefix, sizeof(verify_prefix) - 1) == 0)
		text = psprintf("TLS: certificate verify failed: %s", reason + sizeof(verify_prefix) - 1);
	else if (strncmp(reason, verify_prefix_8, sizeof(verify_prefix_8) - 1) == 0)
	{
		/* "... verify result: certificate has expired (10)": without the number */
		const char *what = reason + sizeof(verify_prefix_8) - 1;
		const char *paren = strrchr(what, '(');
		int			len = paren && paren > what ? (int) (paren - what - 1) : (int) strlen(what);

		text = psprintf("TLS: certificate verify failed: %.*s", len, what);
	}
	else
		text = psprintf("TLS: %s", reason);
	prev = text;
	if (code == CURLE_SSL_CACERT_BADFILE)
		text = psprintf("%s (%s)", text, jobloop_ca_file[0] != '\0' ? "jobloop.ca_file" :
						"jobloop.ca_file is empty: the system's CA certificates");
	else if (code == CURLE_SSL_CERTPROBLEM || code == CURLE_BAD_FUNCTION_ARGUMENT)
		text = psprintf("%s (jobloop.client_cert, jobloop.client_key)", text);
	if (text != prev)
		pfree(prev);
	if (origin)
	{
		prev = text;
		text = psprintf("%s (%s)", text, origin);
		pfree(prev);
		pfree(origin);
	}
	return text;
}

/*
 * Why a transfer failed, for last_error, and whether trying again could
 * help (res->permanent).  Failures the server's answer decides -- a
 * redirect to a scheme we do not follow, too many redirects, headers
 * bigger than we accept -- end the job at once: every retry would get the
 * same answer.
 */
static void
describe_failure(Transfer *xfer, CURLcode code, HttpResult *res)
{
	if (xfer->refused)
	{
		res->error = pstrdup(xfer->refused_reason);
		res->permanent = true;
		return;
	}
	if (xfer->headers_too_large)
	{
		res->error = psprintf("response headers exceed %d kB", MAX_HEADER_BYTES / 1024);
		res->permanent = true;
		return;
	}
	if (tls_failure_permanent(code, xfer->errbuf))
	{
		res->error = describe_tls_failure(xfer, code);
		res->permanent = true;
		make_printable(res->error);
		return;
	}
	switch (code)
	{
		case CURLE_UNSUPPORTED_PROTOCOL:
			{
				/*
				 * A redirect to another scheme (the URL itself was checked),
				 * if a 3xx with a Location came; else libcurl could not read
				 * the reply as HTTP (HTTP/0.9, or another protocol), which
				 * is retried like any transport error.
				 */
				char	   *location = location_header(res);

				if (res->status < 300 || res->status > 399 || location == NULL)
				{
					res->error = pstrdup(xfer->errbuf[0] ? xfer->errbuf : curl_easy_strerror(code));
					if (location)
						pfree(location);
					break;
				}
				if (strlen(location) > 200)
					strcpy(location + 197, "...");
				res->error = psprintf("redirect to \"%s\" refused: only http and https are allowed",
									  location);
				res->permanent = true;
				pfree(location);
				break;
			}
		case CURLE_TOO_MANY_REDIRECTS:
			res->error = psprintf("stopped after %d redirects (jobloop.max_redirects)",
								  jobloop_max_redirects);
			res->permanent = true;
			break;
		case CURLE_OUT_OF_MEMORY:
#if LIBCURL_VERSION_NUM >= 0x080600
		case CURLE_TOO_LARGE:
#endif

			/*
			 * libcurl 7.88 says only "out of memory" for a header line it will
			 * not buffer (8.6 and later: "a value or data field grew larger
			 * than allowed"): a response that began (we have its status line)
			 * but whose headers never ended is that.
			 */
			if (xfer->head_len > 0 && !headers_complete(xfer))
			{
				res->error = psprintf("a response header line is longer than libcurl accepts (100 kB)");
				res->permanent = true;
				break;
			}
			/* FALLTHROUGH */
		default:
			res->error = pstrdup(xfer->errbuf[0] ? xfer->errbuf : curl_easy_strerror(code));
			break;
	}
	make_printable(res->error);
}

/* Describe a finished (or never started) transfer's result. */
static Transfer *
take_result(Transfer *xfer, CURLcode code, void **owner, HttpResult *res)
{
	curl_off_t	total_us = 0;

	memset(res, 0, sizeof(*res));
	res->curl_code = (int) code;
	res->timed_out = code == CURLE_OPERATION_TIMEDOUT;
	res->headers = xfer->head;
	res->headers_len = xfer->head_len;
	res->body = xfer->body;
	res->body_len = xfer->body_len;
	if (xfer->setup_error != CURLE_OK)
	{
		if (strncmp(xfer->setup_option, "jobloop.", 8) == 0)
				res->error = psprintf("TLS: %s", xfer->setup_option);
		else
			res->error = psprintf("libcurl refused %s: %s", xfer->setup_option,
								  curl_easy_strerror(xfer->setup_error));
		res->permanent = true;
	}
	else
	{
		if (curl_easy_getinfo(xfer->easy, CURLINFO_RESPONSE_CODE, &res->status) != CURLE_OK)
			res->status = 0;
		if (curl_easy_getinfo(xfer->easy, CURLINFO_TOTAL_TIME_T, &total_us) == CURLE_OK)
			res->elapsed_ms = total_us / 1000;
		res->too_large = xfer->too_large || code == CURLE_FILESIZE_EXCEEDED;
		/*
		 * A refused address is the failure only if the transfer failed: with
		 * happy eyeballs another address of the host may have answered.
		 */
		xfer->refused = xfer->refused && code != CURLE_OK;
		res->refused = xfer->refused;
		if (code != CURLE_OK)
			describe_failure(xfer, code, res);
	}
	*owner = xfer->owner;
	return xfer;
}

/* Detach a finished transfer from its multi handle and describe its result. */
static Transfer *
take_finished(CURLMsg *msg, void **owner, HttpResult *res)
{
	Transfer   *xfer = NULL;
	CURLcode	code = msg->data.result;	/* msg is gone after the removal */

	if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &xfer) != CURLE_OK ||
		xfer == NULL)
		elog(FATAL, "libcurl returned a transfer that is not jobloop's");
	(void) curl_multi_remove_handle(xfer->shard->multi, xfer->easy);
	shard_transfer_gone(xfer->shard);
	in_flight--;
	return take_result(xfer, code, owner, res);
}

/*
 * The next finished transfer, with its result; NULL when there is none.
 * The result's buffers belong to the transfer until http_done().
 */
Transfer *
http_next_finished(void **owner, HttpResult *res)
{
	static int	next_shard = 0;
	CURLMsg    *msg;
	int			left;

	if (failed_transfers)
	{
		Transfer   *xfer = failed_transfers;

		failed_transfers = xfer->next_free;
		xfer->next_free = NULL;
		in_flight--;
		return take_result(xfer, CURLE_FAILED_INIT, owner, res);
	}

	/*
	 * Round robin: a turn takes a bounded number of responses, and always
	 * starting at shard 0 would leave the last shards' responses waiting.
	 */
	for (int i = 0; i < nshards; i++)
	{
		int			s = (next_shard + i) % nshards;

		if (shards[s] == NULL)
			continue;
		while ((msg = curl_multi_info_read(shards[s]->multi, &left)) != NULL)
			if (msg->msg == CURLMSG_DONE)
			{
				next_shard = (s + 1) % nshards;
				return take_finished(msg, owner, res);
			}
	}
	return NULL;
}

/* Give a finished or aborted transfer's resources back. */
void
http_done(Transfer *xfer)
{
	curl_slist_free_all(xfer->headers);
	xfer->headers = NULL;
	/*
	 * Give the response buffers back: a transfer waiting for its response
	 * needs none, and with 10,000 calls in flight keeping them would cost
	 * 20 MB for nothing.  (The worker keeps freed memory, so this costs no
	 * page faults.)
	 */
	free(xfer->body);
	xfer->body = NULL;
	xfer->body_cap = 0;
	free(xfer->head);
	xfer->head = NULL;
	xfer->head_cap = 0;
	xfer->owner = NULL;
	/* a share retired meanwhile: let it go (see "TLS and HTTP/2") */
	if (xfer->share != NULL && xfer->share != share &&
		curl_easy_setopt(xfer->easy, CURLOPT_SHARE, NULL) == CURLE_OK)
		xfer->share = NULL;
	xfer->next_free = free_transfers;
	free_transfers = xfer;
}

void
http_abort(Transfer *xfer)
{
	if (xfer->setup_error != CURLE_OK)
	{
		/* never started: take it off the list of those to report */
		Transfer  **p = &failed_transfers;

		while (*p && *p != xfer)
			p = &(*p)->next_free;
		if (*p)
			*p = xfer->next_free;
	}
	else
	{
		(void) curl_multi_remove_handle(xfer->shard->multi, xfer->easy);
		shard_transfer_gone(xfer->shard);
	}
	in_flight--;
	http_done(xfer);
}

int
http_in_flight(void)
{
	return in_flight;
}
