/*-------------------------------------------------------------------------
 *
 * log.c
 *		jobloop-worker's log: one line per message on stderr,
 *
 *   2026-11-30 18:00:00.123 UTC jobloop-worker[4242] LOG:  message
 *
 * the way PostgreSQL's own log lines read, so that one grep reads both.
 * The engine's elog lands here too (engine_log, see platform.h).
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#include <stdarg.h>
#include <time.h>
#include <unistd.h>

bool		worker_log_debug = false;

static const char *
level_name(int level)
{
	switch (level)
	{
		case DEBUG1:
			return "DEBUG";
		case LOG:
			return "LOG";
		case WARNING:
			return "WARNING";
		case ERROR:
			return "ERROR";
		case FATAL:
			return "FATAL";
	}
	return "LOG";
}

static void write_line(int level, const char *fmt, va_list args) pg_attribute_printf(2, 0);

static void
write_line(int level, const char *fmt, va_list args)
{
	struct timespec ts;
	struct tm	tm;
	char		when[32];
	char		msg[2048];

	/* the message first: %m reads errno, which the clock calls may change */
	vsnprintf(msg, sizeof(msg), fmt, args);
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
	/* one fprintf per line: lines of concurrent workers sharing a file do not interleave */
	fprintf(stderr, "%s.%03d UTC jobloop-worker[%d] %s:  %s\n",
			when, (int) (ts.tv_nsec / 1000000), (int) getpid(), level_name(level), msg);
}

void
worker_log(int level, const char *fmt,...)
{
	va_list		args;

	if (level == DEBUG1 && !worker_log_debug)
		return;
	va_start(args, fmt);
	write_line(level, fmt, args);
	va_end(args);
}

/* The engine's elog: ERROR and FATAL end the program, as they end a backend's work. */
void
engine_log(int level, const char *fmt,...)
{
	va_list		args;

	if (level == DEBUG1 && !worker_log_debug)
		return;
	va_start(args, fmt);
	write_line(level, fmt, args);
	va_end(args);
	if (level >= ERROR)
		exit(1);
}
