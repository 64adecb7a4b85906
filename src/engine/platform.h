/*-------------------------------------------------------------------------
 *
 * platform.h
 *		What the engine takes from its host: the backend, or jobloop-worker.
 *
 * The engine's files are compiled twice: into the extension, where elog,
 * TopMemoryContext and GetCurrentTimestamp are the backend's, and with
 * FRONTEND defined into jobloop-worker, which links libpgcommon and
 * libpgport (palloc, psprintf, StringInfo, pg_strncasecmp) and supplies
 * the rest here: elog becomes engine_log, which the program defines
 * (src/worker/log.c; ERROR and FATAL exit), and the process-lifetime
 * allocations of the backend are plain palloc, which never frees behind
 * the engine's back in a frontend.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_PLATFORM_H
#define JOBLOOP_PLATFORM_H

#include "engine.h"

#ifdef FRONTEND

#include <sys/time.h>

/* the backend's levels, same numbers (utils/elog.h is backend-only) */
#define DEBUG1		14
#define LOG			15
#define WARNING		19
#define ERROR		21
#define FATAL		22

/* Log one line to stderr; ERROR and FATAL then exit(1).  %m works (pg's printf). */
extern void engine_log(int level, const char *fmt,...) pg_attribute_printf(2, 3);

#define elog(level, ...)	engine_log(level, __VA_ARGS__)

#define TopMemoryContext	NULL
#define MemoryContextAlloc(cxt, size)	palloc(size)
#define MemoryContextStrdup(cxt, s)		pstrdup(s)

/* Microseconds since 2000-01-01, the backend's TimestampTz. */
static inline TimestampTz
GetCurrentTimestamp(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return (TimestampTz) (tv.tv_sec -
						  ((POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY)) * USECS_PER_SEC +
		tv.tv_usec;
}

#else							/* the backend */

#include "utils/memutils.h"
#include "utils/timestamp.h"

#endif							/* FRONTEND */

#endif							/* JOBLOOP_PLATFORM_H */
