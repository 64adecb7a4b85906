/*-------------------------------------------------------------------------
 *
 * session.c
 *		jobloop-worker's connection to the server: connecting, attaching,
 *		sending a turn, and reading its reply and the notifications.
 *
 * The server keeps this worker's jobs in the backend of this connection,
 * so the connection is the worker's identity: when it ends (PQfinish, a
 * lost network, kill -9) the server frees the jobs, and a new connection
 * is a new worker.  Everything after the attach is non-blocking, so the
 * calls keep running while a turn is on its way (main.c).
 *
 * A turn's reply is checked whole before any of it is applied: a reply
 * that does not decode is the server's bug or someone else's bytes, and
 * the session ends rather than start half of it.
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#include <poll.h>
#include <unistd.h>

#define BYTEAOID	17			/* pg_type.h is backend-only */
#define TURN_SQL	"SELECT jobloop.worker_turn($1::bytea)"
#define ATTACH_SQL	"SELECT jobloop.worker_attach($1::text, $2::int)"
#define MAX_WAIT_MS	(3600 * 1000)

int			session_worker_number = 0;

/* the outstanding turn: has its result come, and what did it say */
static bool turn_result_seen = false;
/*
 * The turn's reply, kept until libpq has seen the end of the query: with
 * the extended protocol the server sends the result before it commits the
 * turn's transaction, and a commit that fails comes as an error after it.
 * The calls in the reply may start only once the step results before them
 * are durable.
 */
static PGresult *turn_reply = NULL;
static int32 turn_wait_ms = 0;

/* Did the server refuse us for good: a role that may not, a login that fails? */
static bool
refusal_is_fatal(const char *sqlstate)
{
	return sqlstate != NULL &&
		(strcmp(sqlstate, "42501") == 0 || strncmp(sqlstate, "28", 2) == 0);
}

/*
 * libpq's message as one log line: without its trailing newline, and its
 * DETAIL and HINT lines joined to it.
 */
static char *
message_of(const char *text)
{
	char	   *m = pstrdup(text ? text : "");
	size_t		n = strlen(m);

	while (n > 0 && (m[n - 1] == '\n' || m[n - 1] == ' '))
		m[--n] = '\0';
	for (char *c = m; *c; c++)
		if (*c == '\n')
			*c = ' ';
	return m;
}

/*
 * A failed connection has no SQLSTATE in libpq 15; a password or pg_hba.conf
 * refusal reads so, and a retry cannot mend it.
 */
static bool
connect_failure_is_fatal(PGconn *conn)
{
	const char *m = PQerrorMessage(conn);

	return PQconnectionNeedsPassword(conn) ||
		strstr(m, "authentication failed") != NULL ||
		strstr(m, "no pg_hba.conf entry") != NULL ||
		strstr(m, "permission denied") != NULL;
}

/* Connect without blocking, so that SIGTERM stops a connect to a host that is gone. */
static PGconn *
connect_async(volatile sig_atomic_t *stop, bool *fatal)
{
	/* ours first: the user's CONNINFO (expanded from dbname) overrides them */
	static const char *const keywords[] = {
		"application_name", "keepalives", "keepalives_idle", "keepalives_interval",
		"keepalives_count", "connect_timeout", "dbname", NULL
	};
	const char *values[] = {
		"jobloop-worker", "1", "10", "5", "3", "10", worker_options.conninfo, NULL
	};
	PGconn	   *conn = PQconnectStartParams(keywords, values, 1);
	PostgresPollingStatusType st = PGRES_POLLING_WRITING;

	if (conn == NULL)
	{
		worker_log(LOG, "could not connect: out of memory");
		return NULL;
	}
	while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED && !*stop)
	{
		struct pollfd pfd;

		if (PQstatus(conn) == CONNECTION_BAD)
		{
			st = PGRES_POLLING_FAILED;
			break;
		}
		pfd.fd = PQsocket(conn);
		pfd.events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
		pfd.revents = 0;
		if (pfd.fd < 0)
		{
			st = PGRES_POLLING_FAILED;
			break;
		}
		/* a bounded wait, to see *stop; connect_timeout bounds the whole */
		if (poll(&pfd, 1, 1000) == 0)
			continue;
		st = PQconnectPoll(conn);
	}
	if (*stop)
	{
		PQfinish(conn);
		return NULL;
	}
	if (st == PGRES_POLLING_FAILED)
	{
		char	   *m = message_of(PQerrorMessage(conn));

		*fatal = connect_failure_is_fatal(conn);
		worker_log(*fatal ? FATAL : LOG, "could not connect to the server: %s", m);
		pfree(m);
		PQfinish(conn);
		return NULL;
	}
	return conn;
}

/*
 * A failed command's error as one line: the server's message, its DETAIL
 * and HINT, and the SQLSTATE (without the query's text and caret).
 */
static char *
result_error(PGconn *conn, const PGresult *res)
{
	const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
	const char *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
	const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	char	   *m;

	if (primary == NULL)
		return message_of(res && PQresultErrorMessage(res)[0] ? PQresultErrorMessage(res)
						  : PQerrorMessage(conn));
	m = psprintf("%s%s%s%s%s (SQLSTATE %s)", primary,
				 detail ? " DETAIL: " : "", detail ? detail : "",
				 hint ? " HINT: " : "", hint ? hint : "", sqlstate ? sqlstate : "?");
	for (char *c = m; *c; c++)
		if (*c == '\n')
			*c = ' ';
	return m;
}

/* Did a command succeed?  If not, say why (and whether retrying is pointless). */
static bool
exec_ok(PGconn *conn, const char *what, PGresult *res, ExecStatusType want, bool *fatal)
{
	const char *sqlstate;
	char	   *m;

	if (res != NULL && PQresultStatus(res) == want)
		return true;
	sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	*fatal = refusal_is_fatal(sqlstate);
	m = result_error(conn, res);
	worker_log(*fatal ? FATAL : LOG, "%s failed: %s", what, m[0] ? m : "no result");
	/* the server refuses a non-member before jobloop's own check, at the schema */
	if (sqlstate && strcmp(sqlstate, "42501") == 0)
		worker_log(FATAL, "role \"%s\" may not run jobloop's workers: "
				   "it must be a member of jobloop_worker (GRANT jobloop_worker TO \"%s\")",
				   PQuser(conn), PQuser(conn));
	pfree(m);
	return false;
}

/*
 * Connect, LISTEN (before attaching, so no notification falls between) and
 * attach: the connection, or NULL (*fatal: do not retry).
 */
PGconn *
session_connect(volatile sig_atomic_t *stop, bool *fatal)
{
	PGconn	   *conn;
	PGresult   *res;
	char		pid[16];
	const char *params[2];
	bool		ok;

	*fatal = false;
	if ((conn = connect_async(stop, fatal)) == NULL)
		return NULL;
	/* two short blocking commands: a SIGTERM meanwhile exits at once (main.c) */
	exit_on_stop = 1;
	if (*stop)
		_exit(0);
	res = PQexec(conn, "LISTEN " "jobloop");
	ok = exec_ok(conn, "LISTEN jobloop", res, PGRES_COMMAND_OK, fatal);
	PQclear(res);
	if (ok)
	{
		snprintf(pid, sizeof(pid), "%d", (int) getpid());
		params[0] = worker_options.name;
		params[1] = pid;
		res = PQexecParams(conn, ATTACH_SQL, 2, NULL, params, NULL, NULL, 0);
		ok = exec_ok(conn, "jobloop.worker_attach()", res, PGRES_TUPLES_OK, fatal);
	}
	else
		res = NULL;
	exit_on_stop = 0;
	if (ok && (PQntuples(res) != 1 || PQnfields(res) != 1 || PQgetisnull(res, 0, 0)))
	{
		worker_log(LOG, "jobloop.worker_attach() returned no worker number");
		ok = false;
	}
	if (ok)
		session_worker_number = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	if (!ok)
	{
		PQfinish(conn);
		return NULL;
	}
	if (PQsetnonblocking(conn, 1) != 0)
	{
		char	   *m = message_of(PQerrorMessage(conn));

		worker_log(LOG, "could not make the connection non-blocking: %s", m);
		pfree(m);
		PQfinish(conn);
		return NULL;
	}
	return conn;
}

/* Start a turn: the report goes out as a binary bytea, the reply comes back so. */
bool
session_send_turn(PGconn *conn, StringInfo report)
{
	static const Oid types[1] = {BYTEAOID};
	static const int formats[1] = {1};
	const char *values[1];
	int			lengths[1];

	turn_result_seen = false;
	turn_wait_ms = 0;
	if (turn_reply)
		PQclear(turn_reply);
	turn_reply = NULL;
	values[0] = report->data;
	lengths[0] = report->len;
	if (!PQsendQueryParams(conn, TURN_SQL, 1, types, values, lengths, formats, 1))
	{
		char	   *m = message_of(PQerrorMessage(conn));

		worker_log(LOG, "could not send a turn: %s", m);
		pfree(m);
		return false;
	}
	return true;
}

/* 0: all sent; 1: more to send when the socket is writable; -1: failed (logged). */
int
session_flush(PGconn *conn)
{
	int			rc = PQflush(conn);

	if (rc < 0)
	{
		char	   *m = message_of(PQerrorMessage(conn));

		worker_log(LOG, "could not send a turn: %s", m);
		pfree(m);
	}
	return rc;
}

/* Does a notification's payload say there may be work ("pending") or a cancel? */
static bool
notification_wakes(const char *payload)
{
	const char *s = strstr(payload, "\"status\"");

	if (s == NULL)
		return false;
	s += strlen("\"status\"");
	while (*s == ' ' || *s == ':')
		s++;
	return strncmp(s, "\"pending\"", 9) == 0 || strncmp(s, "\"cancelled\"", 11) == 0;
}

static void
free_settings(WireSettings *settings)
{
	if (settings->allowed_hosts)
		pfree(settings->allowed_hosts);
	if (settings->http2_prior_knowledge)
		pfree(settings->http2_prior_knowledge);
	settings->allowed_hosts = settings->http2_prior_knowledge = NULL;
}

/* Decode a reply's actions, all or none: the count decoded, n if all were. */
static uint32
decode_actions(WireReader *r, WireAction *actions, uint32 n)
{
	uint32		got = 0;

	while (got < n && wire_get_action(r, &actions[got]))
		got++;
	if (got == n && wire_at_end(r))
		return n;
	/* a failed action left nothing allocated; those before it did */
	for (uint32 i = 0; i < got; i++)
		wire_free_action(&actions[i]);
	return got;
}

/* Decode a reply whole, then apply it; false if it does not decode. */
static bool
apply_reply(const char *data, size_t len, int32 *wait_ms)
{
	WireReader	r;
	WireSettings settings;
	bool		has_settings;
	int32		worker;
	uint32		n;
	uint32		got;
	WireAction *actions;

	wire_reader_init(&r, data, len);
	if (!wire_get_reply_header(&r, &worker, wait_ms, &has_settings, &settings, &n))
	{
		worker_log(LOG, "the server's reply to a turn does not decode (its header)");
		return false;
	}
	if (worker != session_worker_number)
	{
		worker_log(LOG, "the server's reply is for worker %d, this is worker %d",
				   (int) worker, session_worker_number);
		free_settings(&settings);
		return false;
	}
	actions = palloc(Max(n, 1) * sizeof(WireAction));
	if ((got = decode_actions(&r, actions, n)) != n)
	{
		worker_log(LOG, "the server's reply to a turn does not decode (action %u of %u, or "
				   "bytes after the last)", got + 1, n);
		pfree(actions);
		free_settings(&settings);
		return false;
	}
	/* the settings first: the calls of this reply start under them */
	if (has_settings)
		settings_apply(&settings);
	free_settings(&settings);
	for (uint32 i = 0; i < n; i++)
	{
		if (actions[i].kind == WIRE_ACTION_SEND)
			calls_start(&actions[i]);
		else
			calls_abort(actions[i].transfer);
		wire_free_action(&actions[i]);
	}
	pfree(actions);
	*wait_ms = Max(0, Min(*wait_ms, MAX_WAIT_MS));
	worker_log(DEBUG1, "turn: %u action(s), back in %d ms", n, (int) *wait_ms);
	return true;
}

/* The turn's result: applied if it is a reply; false if the turn failed (logged). */
static bool
take_reply(PGresult *res, int32 *wait_ms)
{
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
	{
		char	   *m = result_error(NULL, res);

		worker_log(LOG, "a turn failed: %s", m[0] ? m : PQresStatus(PQresultStatus(res)));
		pfree(m);
		return false;
	}
	if (PQntuples(res) != 1 || PQnfields(res) != 1 || PQgetisnull(res, 0, 0) ||
		PQfformat(res, 0) != 1)
	{
		worker_log(LOG, "a turn returned no reply");
		return false;
	}
	return apply_reply(PQgetvalue(res, 0, 0), (size_t) PQgetlength(res, 0, 0), wait_ms);
}

/* Notifications libpq has parsed: a submit or a cancel wakes the worker (*woken). */
static void
drain_notifications(PGconn *conn, bool *woken)
{
	PGnotify   *note;

	while ((note = PQnotifies(conn)) != NULL)
	{
		if (notification_wakes(note->extra))
			*woken = true;
		PQfreemem(note);
	}
}

static bool read_results(PGconn *conn, bool expecting, bool *replied, int32 *wait_ms);

/*
 * Read what the socket has: notifications (*woken), and, if a turn is
 * outstanding, its result (read_results).  Notifications are taken again
 * after the results: libpq parses those that came with them while it reads
 * the results, and they must not wait for the socket's next readiness.
 * False if the connection or the turn failed (logged).
 */
bool
session_read(PGconn *conn, bool expecting, bool *woken, bool *replied, int32 *wait_ms)
{
	bool		ok;

	*replied = false;
	if (!PQconsumeInput(conn))
	{
		char	   *m = message_of(PQerrorMessage(conn));

		worker_log(LOG, "lost the connection to the server: %s", m);
		pfree(m);
		return false;
	}
	drain_notifications(conn, woken);
	ok = read_results(conn, expecting, replied, wait_ms);
	drain_notifications(conn, woken);
	return ok;
}

/*
 * The outstanding turn's result, if libpq has it: kept until the end of
 * the query, then applied; the turn is over (*replied, *wait_ms).
 */
static bool
read_results(PGconn *conn, bool expecting, bool *replied, int32 *wait_ms)
{
	PGresult   *res;

	if (!expecting)
		return true;
	/* PQgetResult blocks while libpq is busy: only what has arrived */
	while (!PQisBusy(conn))
	{
		if ((res = PQgetResult(conn)) == NULL)
		{
			bool		ok;

			if (!turn_result_seen)
			{
				worker_log(LOG, "a turn returned no result");
				return false;
			}
			/* the end of the query, no error after the reply: it committed */
			ok = take_reply(turn_reply, &turn_wait_ms);
			PQclear(turn_reply);
			turn_reply = NULL;
			if (!ok)
				return false;
			*replied = true;
			*wait_ms = turn_wait_ms;
			return true;
		}
		/* one result, then the end; anything else (a failed commit) fails the turn */
		if (turn_result_seen)
		{
			if (PQresultStatus(res) != PGRES_TUPLES_OK)
				(void) take_reply(res, &turn_wait_ms);	/* logs why */
			else
				worker_log(LOG, "a turn returned more than one result");
			PQclear(res);
			return false;
		}
		turn_result_seen = true;
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			(void) take_reply(res, &turn_wait_ms);	/* logs why */
			PQclear(res);
			return false;
		}
		turn_reply = res;
	}
	return true;
}

/*
 * Run one command outside the turns and wait for its end, at most
 * timeout_ms (the connection is non-blocking; a turn must not be
 * outstanding).  The last result, or NULL if it failed to come in time or
 * the connection failed (*broken then).
 */
static PGresult *
run_command(PGconn *conn, const char *sql, int timeout_ms, bool *broken)
{
	TimestampTz deadline = GetCurrentTimestamp() + (TimestampTz) timeout_ms * 1000;
	PGresult   *res;
	PGresult   *last = NULL;

	*broken = false;
	if (PQisBusy(conn) || !PQsendQuery(conn, sql))
	{
		*broken = PQstatus(conn) != CONNECTION_OK;
		return NULL;
	}
	for (;;)
	{
		int			flushed = PQflush(conn);
		struct pollfd fd;
		TimestampTz now = GetCurrentTimestamp();

		if (flushed < 0 || (flushed == 0 && !PQconsumeInput(conn)))
		{
			*broken = true;
			return NULL;
		}
		/* PQgetResult only while libpq is not busy: else it would block */
		while (flushed == 0 && !PQisBusy(conn))
		{
			if ((res = PQgetResult(conn)) == NULL)
				return last;
			if (last)
				PQclear(last);
			last = res;
		}
		if (now >= deadline)
		{
			if (last)
				PQclear(last);
			*broken = true;		/* a result may still come: the connection is out of step */
			return NULL;
		}
		fd.fd = PQsocket(conn);
		fd.events = POLLIN | (flushed == 1 ? POLLOUT : 0);
		fd.revents = 0;
		if (fd.fd < 0 || (poll(&fd, 1, (int) ((deadline - now + 999) / 1000)) < 0 && errno != EINTR))
		{
			if (last)
				PQclear(last);
			*broken = true;
			return NULL;
		}
	}
}

/*
 * A clean stop, with the calls aborted: give this worker's jobs back now
 * (jobloop.worker_detach()) rather than when the server notices the
 * session is gone.  Bounded: a server that does not answer within
 * DETACH_TIMEOUT_MS is left to free them that way.
 */
#define DETACH_TIMEOUT_MS	5000

void
session_detach(PGconn *conn)
{
	bool		broken;
	PGresult   *res = run_command(conn, "SELECT jobloop.worker_detach()", DETACH_TIMEOUT_MS, &broken);

	if (res == NULL)
		return;
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
		worker_log(LOG, "gave %s jobs back to the server", PQgetvalue(res, 0, 0));
	else
	{
		char	   *m = result_error(NULL, res);

		worker_log(LOG, "could not give the jobs back: %s", m);
		pfree(m);
	}
	PQclear(res);
}

/*
 * Retention, for databases that external workers alone serve: one action
 * per call of jobloop.worker_maintain() (each in a transaction of its own),
 * while it says there is more.  The server paces the rounds (lease_timeout
 * / 3) and lets one worker at a time act.  False if the connection broke.
 */
#define MAINTAIN_TIMEOUT_MS	10000
#define MAINTAIN_MAX_CALLS	40

bool
session_maintain(PGconn *conn, bool *woken)
{
	for (int i = 0; i < MAINTAIN_MAX_CALLS; i++)
	{
		bool		broken;
		bool		more;
		PGresult   *res = run_command(conn, "SELECT jobloop.worker_maintain()", MAINTAIN_TIMEOUT_MS,
									  &broken);

		if (res == NULL)
		{
			if (broken)
				worker_log(LOG, "retention: no answer from the server");
			drain_notifications(conn, woken);
			return !broken;
		}
		more = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
			!PQgetisnull(res, 0, 0) && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			char	   *m = result_error(NULL, res);

			worker_log(LOG, "retention failed: %s", m);
			pfree(m);
		}
		PQclear(res);
		drain_notifications(conn, woken);
		if (!more)
			break;
	}
	return true;
}
