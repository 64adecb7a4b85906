/*
 * bench/curl_scaling.c -- how libcurl's CPU cost per request grows with the number of
 * concurrent keep-alive connections to one host, outside jobloop.
 *
 * It drives N transfers the way jobloop's worker does (one multi handle, the
 * curl_multi_socket_action API with an epoll set, every finished transfer removed,
 * reset and added again at once, keep-alive connections reused), for D seconds, and
 * prints requests/s and CPU microseconds per request (getrusage).
 *
 * With MULTIS > 1 the transfers are spread over MULTIS multi handles (transfer i always
 * uses multi i % MULTIS), each with its own connection cache, all driven from the same
 * epoll set.  libcurl 7.88 looks for a reusable connection by walking the list of every
 * connection to the host (ConnectionExists), so one multi handle costs O(N) per
 * request; MULTIS handles cut that to O(N / MULTIS).
 *
 *   cc -O2 -o curl_scaling bench/curl_scaling.c -lcurl
 *   [BUFFERSIZE=bytes] ./curl_scaling URL N SECONDS [MULTIS]   (CURLOPT_BUFFERSIZE)
 *   e.g. ./curl_scaling 'http://127.0.0.1:PORT/delay?s=1' 10000 10 1
 */
#include <curl/curl.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

static CURLM **multis;
static double *deadline;		/* per multi: when curl wants its timer call, or 0 */
static int	nmultis;
static int	epfd;

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double
cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
		ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* epoll data: the multi's index in the high 32 bits, the socket in the low ones */
static int
socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct epoll_event ev = {0};

	if (what == CURL_POLL_REMOVE)
	{
		epoll_ctl(epfd, EPOLL_CTL_DEL, s, NULL);
		return 0;
	}
	ev.data.u64 = ((uint64_t) (uintptr_t) userp << 32) | (uint32_t) s;
	ev.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
		epoll_ctl(epfd, EPOLL_CTL_ADD, s, &ev);
	return 0;
}

static int
timer_cb(CURLM *m, long ms, void *userp)
{
	deadline[(uintptr_t) userp] = ms < 0 ? 0 : now_s() + ms / 1000.0;
	return 0;
}

static size_t
discard(char *p, size_t size, size_t n, void *u)
{
	return size * n;
}

static void
start(CURL *e, const char *url, long i)
{
	curl_easy_reset(e);
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_PRIVATE, (void *) i);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 30000L);
	if (getenv("BUFFERSIZE"))
		curl_easy_setopt(e, CURLOPT_BUFFERSIZE, atol(getenv("BUFFERSIZE")));
	curl_multi_add_handle(multis[i % nmultis], e);
}

static void
collect(int m, const char *url, long *done, long *errors)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multis[m], &left)) != NULL)
	{
		CURL	   *e;
		char	   *priv;

		if (msg->msg != CURLMSG_DONE)
			continue;
		e = msg->easy_handle;
		if (msg->data.result != CURLE_OK)
			(*errors)++;
		(*done)++;
		curl_easy_getinfo(e, CURLINFO_PRIVATE, &priv);
		curl_multi_remove_handle(multis[m], e);
		start(e, url, (long) (intptr_t) priv);
	}
}

int
main(int argc, char **argv)
{
	const char *url;
	int			n;
	double		seconds, t0, t_end, warm_until, tm0 = 0, cm0 = 0;
	long		done = 0, errors = 0, done0 = 0;
	struct rlimit rl;

	if (argc < 4)
	{
		fprintf(stderr, "usage: %s URL N SECONDS [MULTIS]\n", argv[0]);
		return 2;
	}
	url = argv[1];
	n = atoi(argv[2]);
	seconds = atof(argv[3]);
	nmultis = argc > 4 && atoi(argv[4]) > 0 ? atoi(argv[4]) : 1;

	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);

	curl_global_init(CURL_GLOBAL_DEFAULT);
	epfd = epoll_create1(0);
	multis = calloc(nmultis, sizeof(CURLM *));
	deadline = calloc(nmultis, sizeof(double));
	for (int m = 0; m < nmultis; m++)
	{
		multis[m] = curl_multi_init();
		curl_multi_setopt(multis[m], CURLMOPT_SOCKETFUNCTION, socket_cb);
		curl_multi_setopt(multis[m], CURLMOPT_SOCKETDATA, (void *) (uintptr_t) m);
		curl_multi_setopt(multis[m], CURLMOPT_TIMERFUNCTION, timer_cb);
		curl_multi_setopt(multis[m], CURLMOPT_TIMERDATA, (void *) (uintptr_t) m);
		curl_multi_setopt(multis[m], CURLMOPT_MAXCONNECTS, (long) n / nmultis + 16);
	}
	for (long i = 0; i < n; i++)
		start(curl_easy_init(), url, i);

	t0 = now_s();
	/* the first third of the run opens the connections; measure the rest */
	warm_until = t0 + seconds / 3;
	t_end = t0 + seconds;
	while (now_s() < t_end)
	{
		struct epoll_event evs[256];
		double		next = t_end, now;
		int			k, running;

		for (int m = 0; m < nmultis; m++)
			if (deadline[m] > 0 && deadline[m] < next)
				next = deadline[m];
		now = now_s();
		k = epoll_wait(epfd, evs, 256, next <= now ? 0 : (int) ((next - now) * 1000) + 1);
		for (int i = 0; i < k; i++)
		{
			int			m = (int) (evs[i].data.u64 >> 32);
			int			fd = (int) (uint32_t) evs[i].data.u64;
			int			f = ((evs[i].events & EPOLLIN) ? CURL_CSELECT_IN : 0) |
			((evs[i].events & EPOLLOUT) ? CURL_CSELECT_OUT : 0) |
			((evs[i].events & (EPOLLERR | EPOLLHUP)) ? CURL_CSELECT_ERR : 0);

			curl_multi_socket_action(multis[m], fd, f, &running);
			collect(m, url, &done, &errors);
		}
		now = now_s();
		for (int m = 0; m < nmultis; m++)
			if (deadline[m] > 0 && deadline[m] <= now)
			{
				deadline[m] = 0;
				curl_multi_socket_action(multis[m], CURL_SOCKET_TIMEOUT, 0, &running);
				collect(m, url, &done, &errors);
			}
		if (tm0 == 0 && now_s() >= warm_until)
		{
			tm0 = now_s();
			cm0 = cpu_s();
			done0 = done;
		}
	}
	{
		double		wall = now_s() - tm0;
		double		cpu = cpu_s() - cm0;
		long		measured = done - done0;

		struct rusage ru;

		getrusage(RUSAGE_SELF, &ru);
		printf("N=%d multis=%d: %.0f requests/s, %.1f us CPU per request, %.0f%% CPU, %ld errors, peak RSS %ld MB\n",
			   n, nmultis, measured / wall, measured ? 1e6 * cpu / measured : 0.0,
			   100 * cpu / wall, errors, ru.ru_maxrss / 1024);
	}
	return 0;
}
