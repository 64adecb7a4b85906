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
 * Nothing here raises an error after the worker's commit: failures are
 * reported as transfer results.  Only the worker process uses this file.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <unistd.h>

#include "miscadmin.h"

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
typedef struct Shard
{
	CURLM	   *multi;
	int			index;
	int			in_flight;
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
	bool		too_large;
	bool		refused;
	char		refused_reason[200];
	char		errbuf[CURL_ERROR_SIZE];
	Transfer   *next_free;
};

static Shard **shards = NULL;	/* each allocated apart: transfers point to theirs */
static int	nshards = 0;
static int	max_shards = 0;
static int	epoll_fd = -1;
static int	in_flight = 0;
static Transfer *free_transfers = NULL;

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

static size_t
header_callback(char *data, size_t size, size_t nitems, void *userp)
{
	Transfer   *xfer = userp;
	size_t		n = size * nitems;

	/* a new status line starts a new response (redirect, 100 Continue) */
	if (n >= 5 && strncmp(data, "HTTP/", 5) == 0)
		xfer->head_len = 0;
	if (xfer->head_len + n > MAX_HEADER_BYTES)
	{
		xfer->too_large = true;
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

/* The host name of the URL being connected to now (it changes on redirects). */
static void
current_host(Transfer *xfer, char *host, size_t size)
{
	char	   *url = NULL;
	CURLU	   *u = curl_url();
	char	   *h = NULL;

	host[0] = '\0';
	if (u && curl_easy_getinfo(xfer->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url &&
		curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK)
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

static curl_socket_t
open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	Transfer   *xfer = clientp;
	const char *reason = NULL;
	char		host[256];

	current_host(xfer, host, sizeof(host));
	if (!guard_address_allowed(&address->addr, host[0] ? host : NULL, &reason))
	{
		char		text[INET6_ADDRSTRLEN] = "?";

		if (address->family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *) &address->addr)->sin_addr, text, sizeof(text));
		else if (address->family == AF_INET6)
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *) &address->addr)->sin6_addr, text, sizeof(text));
		xfer->refused = true;
		snprintf(xfer->refused_reason, sizeof(xfer->refused_reason),
				 "refused to connect to %s (%s address) for host \"%s\": not in jobloop.allowed_hosts",
				 text, reason, host);
		return CURL_SOCKET_BAD;
	}
	return socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
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
}

/* The least busy shard with room, or a new one; NULL if none can be made. */
static Shard *
pick_shard(void)
{
	Shard	   *best = NULL;
	Shard	   *shard;

	for (int i = 0; i < nshards; i++)
		if (shards[i]->in_flight < TRANSFERS_PER_SHARD &&
			(best == NULL || shards[i]->in_flight < best->in_flight))
			best = shards[i];
	if (best)
		return best;
	if (nshards == max_shards)
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
	if (shard->multi == NULL)
	{
		free(shard);
		return NULL;
	}
	shard->index = nshards;
	shards[nshards++] = shard;
	curl_multi_setopt(shard->multi, CURLMOPT_SOCKETFUNCTION, socket_callback);
	curl_multi_setopt(shard->multi, CURLMOPT_SOCKETDATA, shard);
	curl_multi_setopt(shard->multi, CURLMOPT_TIMERFUNCTION, timer_callback);
	curl_multi_setopt(shard->multi, CURLMOPT_TIMERDATA, shard);
	/* keep a connection per call slot, so that keep-alive survives between steps */
	curl_multi_setopt(shard->multi, CURLMOPT_MAXCONNECTS, (long) TRANSFERS_PER_SHARD + 16);
	return shard;
}

int
http_epoll_fd(void)
{
	return epoll_fd;
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
	else
	{
		xfer = calloc(1, sizeof(Transfer));
		if (xfer == NULL)
			return NULL;
		xfer->easy = curl_easy_init();
		if (xfer->easy == NULL)
		{
			free(xfer);
			return NULL;
		}
	}
	xfer->body_len = 0;
	xfer->head_len = 0;
	xfer->too_large = false;
	xfer->refused = false;
	xfer->errbuf[0] = '\0';
	xfer->headers = NULL;
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

/*
 * Start a request.  Returns NULL only when memory runs out; the caller then
 * retries later.
 */
Transfer *
http_start(const HttpRequest *req, const char *idempotency_key, int default_timeout_ms,
		   bool fresh_connection, void *owner)
{
	Shard	   *shard = pick_shard();
	Transfer   *xfer = shard ? get_transfer() : NULL;
	CURL	   *e;
	char		line[300];
	bool		ok = true;

	if (xfer == NULL)
		return NULL;
	xfer->shard = shard;
	e = xfer->easy;
	xfer->owner = owner;

	for (int i = 0; i < req->nheaders && ok; i++)
		ok = add_header(xfer, req->headers[i]);
	if (!req->has_idempotency_key)
	{
		snprintf(line, sizeof(line), "Idempotency-Key: %s", idempotency_key);
		ok = ok && add_header(xfer, line);
	}
	if (req->body_is_json && !req->has_content_type)
		ok = ok && add_header(xfer, "Content-Type: application/json");
	/* no 100-continue round trip before a body */
	ok = ok && add_header(xfer, "Expect:");
	if (!ok)
	{
		http_done(xfer);
		return NULL;
	}

	curl_easy_setopt(e, CURLOPT_URL, req->url);
	curl_easy_setopt(e, CURLOPT_PRIVATE, xfer);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, xfer->errbuf);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_callback);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, xfer);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_callback);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, xfer);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, xfer);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, xfer->headers);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, jobloop_max_redirects > 0 ? 1L : 0L);
	curl_easy_setopt(e, CURLOPT_MAXREDIRS, (long) jobloop_max_redirects);
	curl_easy_setopt(e, CURLOPT_PROXY, "");
	curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) (req->timeout_ms > 0 ? req->timeout_ms : default_timeout_ms));
	curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) jobloop_max_response_size);
	curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "jobloop/" JOBLOOP_VERSION);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, (long) RECEIVE_BUFFER);
	/*
	 * libcurl re-sends a request by itself when a reused connection closes
	 * without a reply (a stale keep-alive), on the next pooled connection.
	 * A retry after a transport error therefore gets a new connection, so
	 * that re-sending cannot repeat on every attempt.
	 */
	if (fresh_connection)
		curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);

	if (strcmp(req->method, "GET") == 0)
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	else if (strcmp(req->method, "HEAD") == 0)
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	else
	{
		if (strcmp(req->method, "POST") != 0)
			curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req->method);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_len);
		curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, req->body ? req->body : "");
	}

	if (curl_multi_add_handle(shard->multi, e) != CURLM_OK)
	{
		http_done(xfer);
		return NULL;
	}
	shard->in_flight++;
	in_flight++;
	return xfer;
}

/* ---- driving ---- */

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
			if (index < nshards)
				curl_multi_socket_action(shards[index]->multi, fd, flags, &running);
		}
	} while (n == EPOLL_BATCH);
}

void
http_timer_fired(TimestampTz now)
{
	int			running;

	for (int i = 0; i < nshards; i++)
		if (shards[i]->has_deadline && now >= shards[i]->deadline)
		{
			shards[i]->has_deadline = false;
			curl_multi_socket_action(shards[i]->multi, CURL_SOCKET_TIMEOUT, 0, &running);
		}
}

/* When curl wants to be called back, or 0 if it does not. */
TimestampTz
http_next_timeout(void)
{
	TimestampTz next = 0;

	for (int i = 0; i < nshards; i++)
		if (shards[i]->has_deadline && (next == 0 || shards[i]->deadline < next))
			next = shards[i]->deadline;
	return next;
}

/* Detach a finished transfer from its multi handle and describe its result. */
static Transfer *
take_finished(CURLMsg *msg, void **owner, HttpResult *res)
{
	Transfer   *xfer;
	curl_off_t	total_us = 0;
	CURLcode	code = msg->data.result;	/* msg is gone after the removal */

	curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &xfer);
	curl_multi_remove_handle(xfer->shard->multi, xfer->easy);
	xfer->shard->in_flight--;
	in_flight--;

	memset(res, 0, sizeof(*res));
	res->curl_code = (int) code;
	curl_easy_getinfo(xfer->easy, CURLINFO_RESPONSE_CODE, &res->status);
	curl_easy_getinfo(xfer->easy, CURLINFO_TOTAL_TIME_T, &total_us);
	res->elapsed_ms = total_us / 1000;
	res->headers = xfer->head;
	res->headers_len = xfer->head_len;
	res->body = xfer->body;
	res->body_len = xfer->body_len;
	res->too_large = xfer->too_large || code == CURLE_FILESIZE_EXCEEDED;
	res->refused = xfer->refused;
	if (xfer->refused)
		res->error = pstrdup(xfer->refused_reason);
	else if (code != CURLE_OK)
		res->error = psprintf("%s", xfer->errbuf[0] ? xfer->errbuf : curl_easy_strerror(code));
	*owner = xfer->owner;
	return xfer;
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

	/*
	 * Round robin: a turn takes a bounded number of responses, and always
	 * starting at shard 0 would leave the last shards' responses waiting.
	 */
	for (int i = 0; i < nshards; i++)
	{
		int			s = (next_shard + i) % nshards;

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
	xfer->next_free = free_transfers;
	free_transfers = xfer;
}

void
http_abort(Transfer *xfer)
{
	curl_multi_remove_handle(xfer->shard->multi, xfer->easy);
	xfer->shard->in_flight--;
	in_flight--;
	http_done(xfer);
}

int
http_in_flight(void)
{
	return in_flight;
}
