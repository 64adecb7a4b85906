/*-------------------------------------------------------------------------
 *
 * main.c
 *		jobloop-worker: connect, attach, and turn until told to stop.
 *
 * One loop, one wait: poll() over libcurl's epoll fd (http_epoll_fd, every
 * socket of every call) and the connection's socket, until the earlier of
 * libcurl's next timer and the next turn's deadline.  A turn goes out
 * whenever none is outstanding and there is something to say (results),
 * something to ask (a notification said a job is pending or cancelled) or
 * the server's wait_ms has passed; the calls keep running while it is on
 * its way.
 *
 * When the session fails (a turn errs, the connection is lost, a turn goes
 * unanswered for --turn-timeout) every call in flight is aborted and its
 * results dropped: the server has freed this worker's jobs, others claim
 * them, and a write of ours would be refused by fencing anyway.  Then we
 * connect again, after 1 s, doubling to 30 s, back to 1 s after an attach.
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#include <limits.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_MIN_MS	1000
#define BACKOFF_MAX_MS	30000

static volatile sig_atomic_t stop_requested = 0;
static volatile sig_atomic_t stop_signal = 0;
volatile sig_atomic_t exit_on_stop = 0;

static void
handle_stop(int signo)
{
	/*
	 * In a blocking libpq call (the attach) there is nothing to abort, and
	 * libpq would retry its wait after the signal: leave at once.  The
	 * server ends the session when the socket closes.
	 */
	if (exit_on_stop)
		_exit(0);
	stop_requested = 1;
	stop_signal = signo;
}

static void
install_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	/* no SA_RESTART: poll() must return at once to see stop_requested */
	sa.sa_handler = handle_stop;
	if (sigaction(SIGTERM, &sa, NULL) != 0 || sigaction(SIGINT, &sa, NULL) != 0)
		engine_log(FATAL, "could not install signal handlers: %m");
	/* nothing to reload: the settings come from the server */
	sa.sa_handler = SIG_IGN;
	if (sigaction(SIGHUP, &sa, NULL) != 0 || sigaction(SIGPIPE, &sa, NULL) != 0)
		engine_log(FATAL, "could not install signal handlers: %m");
}

/* Milliseconds from now until t (a TimestampTz), at least 0, at most max. */
static int
ms_until(TimestampTz t, TimestampTz now, int max)
{
	int64		ms;

	if (t <= now)
		return 0;
	ms = (t - now + 999) / 1000;
	return ms > max ? max : (int) ms;
}

/* Sleep up to ms, waking early for SIGTERM. */
static void
backoff_sleep(int ms)
{
	struct timespec ts;

	ts.tv_sec = ms / 1000;
	ts.tv_nsec = (long) (ms % 1000) * 1000000L;
	while (!stop_requested && nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* How often jobloop-worker asks whether retention is due (the server decides). */
#define MAINTAIN_INTERVAL_US	(10 * USECS_PER_SEC)

/*
 * One session: turn until it fails (false) or a stop is requested (true).
 * The caller aborts what is in flight and closes the connection.
 */
static bool
run_session(PGconn *conn)
{
	TurnState	state = TURN_NONE;
	bool		woken = true;	/* the first turn at once: settings, and work */
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next_turn_at = now;
	TimestampTz sent_at = 0;
	TimestampTz next_maintain = now + MAINTAIN_INTERVAL_US;
	int64		turn_timeout_us = (int64) worker_options.turn_timeout_s * USECS_PER_SEC;

	while (!stop_requested)
	{
		struct pollfd fds[2];
		int			timeout;
		TimestampTz curl_at;
		bool		replied;
		int32		wait_ms;

		calls_collect();
		now = GetCurrentTimestamp();
		/* between turns: retention, which the server paces (see session_maintain) */
		if (state == TURN_NONE && now >= next_maintain)
		{
			if (!session_maintain(conn, &woken))
				return false;
			next_maintain = GetCurrentTimestamp() + MAINTAIN_INTERVAL_US;
			calls_collect();
			now = GetCurrentTimestamp();
		}
		if (state == TURN_NONE &&
			(calls_pending() > 0 || woken || now >= next_turn_at || calls_more_finished()))
		{
			if (!session_send_turn(conn, calls_take_report(woken ? REPORT_WOKEN : 0)))
				return false;
			calls_report_sent();
			woken = false;
			sent_at = now;
			state = TURN_SENDING;
		}
		if (state == TURN_SENDING)
		{
			int			rc = session_flush(conn);

			if (rc < 0)
				return false;
			if (rc == 0)
				state = TURN_WAITING;
		}
		if (state != TURN_NONE && now - sent_at > turn_timeout_us)
		{
			worker_log(LOG, "a turn has had no reply for %d s: taking the connection as lost",
					   worker_options.turn_timeout_s);
			return false;
		}

		/* the wait: until the next turn, or the turn's timeout, or libcurl's timer */
		if (state == TURN_NONE)
			timeout = ms_until(next_turn_at, now, INT_MAX);
		else
			timeout = ms_until(sent_at + turn_timeout_us, now, INT_MAX) + 1;
		curl_at = http_next_timeout();
		if (curl_at != 0)
			timeout = Min(timeout, ms_until(curl_at, now, INT_MAX));
		fds[0].fd = http_epoll_fd();
		fds[0].events = POLLIN;
		fds[1].fd = PQsocket(conn);
		fds[1].events = POLLIN | (state == TURN_SENDING ? POLLOUT : 0);
		fds[0].revents = fds[1].revents = 0;
		if (fds[1].fd < 0)
		{
			worker_log(LOG, "lost the connection to the server");
			return false;
		}
		if (poll(fds, 2, timeout) < 0)
		{
			if (errno == EINTR)
				continue;
			engine_log(FATAL, "poll failed: %m");
		}

		now = GetCurrentTimestamp();
		if (fds[0].revents)
			http_socket_ready();
		http_timer_fired(now);
		(void) http_close_idle(now);
		if (fds[1].revents & (POLLIN | POLLERR | POLLHUP))
		{
			if (!session_read(conn, state != TURN_NONE, &woken, &replied, &wait_ms))
				return false;
			if (replied)
			{
				state = TURN_NONE;
				next_turn_at = now + (TimestampTz) wait_ms * 1000;
			}
		}
	}
	return true;
}

int
main(int argc, char **argv)
{
	int			backoff_ms = BACKOFF_MIN_MS;

	options_parse(argc, argv);
	install_signals();
	settings_init();
	http_init();
	calls_init();
	worker_log(LOG, "jobloop-worker %s starting as \"%s\"", JOBLOOP_ENGINE_VERSION,
			   worker_options.name);

	while (!stop_requested)
	{
		bool		fatal = false;
		PGconn	   *conn = session_connect(&stop_requested, &fatal);

		if (fatal)
			exit(1);
		if (conn != NULL)
		{
			worker_log(LOG, "attached as worker %d (server pid %d)",
					   session_worker_number, PQbackendPID(conn));
			backoff_ms = BACKOFF_MIN_MS;
			(void) run_session(conn);
			calls_abort_all();
			if (stop_requested)
				session_detach(conn);
			PQfinish(conn);
			if (stop_requested)
				break;
		}
		worker_log(LOG, "connecting again in %d s", backoff_ms / 1000);
		backoff_sleep(backoff_ms);
		backoff_ms = Min(backoff_ms * 2, BACKOFF_MAX_MS);
	}
	/* the jobs went back (session_detach), or go when the server sees the session end */
	worker_log(LOG, "stopped by signal %d", (int) stop_signal);
	return 0;
}
