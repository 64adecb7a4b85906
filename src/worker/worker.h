/*-------------------------------------------------------------------------
 *
 * worker.h
 *		jobloop-worker: the HTTP engine outside the server.
 *
 * The server keeps everything about jobs (held jobs, timers, limits,
 * claims, business logic) in the backend of this program's connection;
 * the program runs the engine (src/engine) and, once per turn, calls
 * jobloop.worker_turn() with the results of the calls that finished, and
 * starts and aborts the calls the reply names (src/engine/wire.h).
 *
 *   main.c      the loop: one poll over libcurl's epoll fd and the socket
 *   options.c   the command line
 *   log.c       the log on stderr (and engine_log, the engine's elog)
 *   session.c   the libpq connection: connect, attach, turns, notifications
 *   calls.c     the calls in flight, by the server's transfer id; results
 *   settings.c  the engine's settings, as the server's replies set them
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_WORKER_H
#define JOBLOOP_WORKER_H

#include "platform.h"

#include <signal.h>

#include "lib/stringinfo.h"
#include "libpq-fe.h"
#include "wire.h"

/* ---- options.c ---- */
typedef struct WorkerOptions
{
	const char *conninfo;
	const char *name;			/* the host name the server shows */
	const char *ca_file;		/* "" : libcurl's default bundle */
	const char *client_cert;
	const char *client_key;
	int			turn_timeout_s; /* a turn unanswered this long: the connection is lost */
	int			max_results;	/* per report */
} WorkerOptions;

extern WorkerOptions worker_options;
extern void options_parse(int argc, char **argv);

/* ---- log.c ---- */
extern bool worker_log_debug;	/* --verbose: DEBUG lines too */
extern void worker_log(int level, const char *fmt,...) pg_attribute_printf(2, 3);

/* ---- settings.c ---- */
extern void settings_init(void);
extern void settings_apply(const WireSettings *settings);

/* ---- calls.c ---- */
extern void calls_init(void);
extern void calls_start(const WireAction *action);
extern void calls_abort(int64 transfer);
extern void calls_abort_all(void);
extern void calls_collect(void);
extern bool calls_more_finished(void);
extern int	calls_pending(void);
extern StringInfo calls_take_report(uint8 flags);
extern void calls_report_sent(void);

/* ---- session.c ---- */
typedef enum TurnState
{
	TURN_NONE,					/* no turn outstanding */
	TURN_SENDING,				/* the query is still being written out */
	TURN_WAITING				/* sent; waiting for the reply */
} TurnState;

extern volatile sig_atomic_t exit_on_stop;	/* main.c: SIGTERM exits at once */
extern PGconn *session_connect(volatile sig_atomic_t *stop, bool *fatal);
extern bool session_send_turn(PGconn *conn, StringInfo report);
extern int	session_flush(PGconn *conn);
extern void session_detach(PGconn *conn);
extern bool session_maintain(PGconn *conn, bool *woken);
extern bool session_read(PGconn *conn, bool expecting, bool *woken, bool *replied,
						 int32 *wait_ms);
extern int	session_worker_number;

#endif							/* JOBLOOP_WORKER_H */
