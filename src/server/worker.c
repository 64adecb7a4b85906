/*-------------------------------------------------------------------------
 *
 * worker.c
 *		A jobloop background worker: its lifecycle and its one wait loop.
 *
 * The worker waits in exactly one place, a WaitEventSet holding its latch
 * (set by submit and cancel at commit, and by signals), postmaster death,
 * and the epoll fd of all its HTTP sockets; the timeout is the earliest of
 * curl's timer, the next due job, the next heartbeat and the next claim.
 * Each turn of the loop collects what happened and hands it to one batch
 * transaction (batch.c), which commits before any next request is sent.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <malloc.h>
#include <signal.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#define EXTENSION_POLL_MS			1000

static int	my_worker;
static char my_database[NAMEDATALEN];
static bool trimmed = false;	/* memory given back since the last job left */
static TimestampTz stats_due = 0;	/* table statistics still to report then; 0: none */
static TimestampTz next_trim = 0;	/* give back free memory then at the latest */
static TimestampTz next_retention = 0;	/* at the heartbeat's pace: lease_timeout / 3 */
static volatile sig_atomic_t stop_by_postmaster = false;	/* see handle_sigterm() */

/* What pg_stat_activity shows while the worker waits (17+; "Extension" before) */
static uint32 wait_extension;	/* for CREATE EXTENSION jobloop */
static uint32 wait_idle;		/* holding no job: for submits, cancels, the next claim */
static uint32 wait_delay;		/* its jobs wait for their delay_ms or backoff */
static uint32 wait_http;		/* for responses to calls in flight */
static uint32 wait_limit;		/* jobs are due but an endpoint's limit holds them back */

/*
 * Table statistics (rows inserted, updated, deleted; dead tuples) are
 * counted per backend and must be reported, as every backend does when it
 * goes idle -- else autovacuum and autoanalyze never see the updates and
 * deletes the workers make, nearly all of jobloop.job's churn, and the
 * table bloats.  pgstat_report_stat(false) reports at most once a second;
 * what it holds back is reported by a later turn (wait_timeout wakes us).
 */
static void
report_stats(TimestampTz now)
{
	long		retry_ms = pgstat_report_stat(false);

	stats_due = retry_ms > 0 ? now + (TimestampTz) retry_ms * 1000 : 0;
}

/* Run fn in a transaction of its own, with SPI connected. */
static void
in_transaction(void (*fn) (void *), void *arg)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	fn(arg);
	PopActiveSnapshot();
	SPI_finish();
	CommitTransactionCommand();
	report_stats(GetCurrentTimestamp());
}

static void
check_extension(void *arg)
{
	*(ExtensionState *) arg = store_extension_state(false);
}

static void
release_all(void *arg)
{
	int			siblings[JOBLOOP_MAX_WORKERS];
	int			n = shared_database_workers(my_database, siblings, JOBLOOP_MAX_WORKERS);
	int64		overrun_job;
	int32		overrun_step;
	char	   *reason = logic_take_overrun(&overrun_job, &overrun_step);

	if (reason)
		store_fail_job(overrun_job, overrun_step, reason);

	/*
	 * jobloop.start_paused: pause each incarnation of the extension in our
	 * database once per server start -- by whichever of its workers comes
	 * first; marked in every sibling's slot once committed (release_all's
	 * caller), so a sibling starting after a resume() does not pause again.
	 */
	*(Oid *) arg = InvalidOid;
	if (jobloop_start_paused)
	{
		Oid			ext = get_extension_oid("jobloop", true);

		if (OidIsValid(ext) && shared_slot(my_worker)->start_paused_ext != ext)
		{
			pause_at_start(my_database);
			*(Oid *) arg = ext;
		}
	}
	store_release_all(siblings, n);
}

/* Release our predecessor's jobs (and more: see release_all) in a transaction of its own. */
static void
release_all_at_start(void)
{
	Oid			paused_ext;

	in_transaction(release_all, &paused_ext);
	if (OidIsValid(paused_ext))
	{
		int			siblings[JOBLOOP_MAX_WORKERS];
		int			n = shared_database_workers(my_database, siblings, JOBLOOP_MAX_WORKERS);

		for (int i = 0; i < n; i++)
			shared_slot(siblings[i])->start_paused_ext = paused_ext;
	}
}

static void
reload_config_if_asked(void)
{
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		/* certificates replaced, at the same path or not: new connections */
		http_settings_reloaded();
	}
}

/*
 * SIGTERM: stop at the next turn of the loop, between transactions, with
 * no FATAL in the log (die() would log one per worker at every shutdown).
 * Who sent it decides the exit code (stop_if_asked).  A job's function
 * running now is interrupted at once, as die() does -- a function in
 * pg_sleep() must not hold up a shutdown for jobloop.function_timeout --
 * and that worker, only, logs the FATAL.
 */
static void
handle_sigterm(int signo, siginfo_t *info, void *context)
{
	int			save_errno = errno;

	if (info != NULL && info->si_pid == PostmasterPid)
		stop_by_postmaster = true;
	ShutdownRequestPending = true;
	if (logic_call_running())
		die(signo);
	SetLatch(MyLatch);
	errno = save_errno;
}

/* Like pqsignal(), but the handler learns the sender (SA_SIGINFO). */
static void
install_sigterm_handler(void)
{
	struct sigaction act;

	memset(&act, 0, sizeof(act));
	act.sa_sigaction = handle_sigterm;
	sigemptyset(&act.sa_mask);
	act.sa_flags = SA_SIGINFO | SA_RESTART;
	if (sigaction(SIGTERM, &act, NULL) < 0)
		elog(FATAL, "could not set the SIGTERM handler: %m");
}

/*
 * Exit if SIGTERM came.  From the postmaster (a shutdown, or the worker
 * being unregistered) with 0: a background worker that exits with 0 is not
 * restarted.  From anyone else (pg_terminate_backend) with 1: restarted
 * after bgw_restart_time, as after die().  The jobs we hold keep their
 * leases; our successor frees them when it starts.
 */
static void
stop_if_asked(void)
{
	if (!ShutdownRequestPending)
		return;
	if (stop_by_postmaster)
	{
		elog(DEBUG1, "jobloop worker %d stopping", my_worker);
		proc_exit(0);
	}
	elog(LOG, "jobloop worker %d terminated; it restarts in a few seconds", my_worker);
	proc_exit(1);
}

static void
register_wait_events(void)
{
	wait_extension = compat_wait_event("JobloopExtension");
	wait_idle = compat_wait_event("JobloopIdle");
	wait_delay = compat_wait_event("JobloopDelay");
	wait_http = compat_wait_event("JobloopHTTP");
	wait_limit = compat_wait_event("JobloopLimit");
}

/* What the main loop waits for now: the most telling of what holds jobs up. */
static uint32
wait_event_now(void)
{
	if (held_next_blocked() != 0)
		return wait_limit;
	if (http_in_flight() > 0)
		return wait_http;
	if (held_count() > 0)
		return wait_delay;
	return wait_idle;
}

/* Sleep until CREATE EXTENSION jobloop has run in our database. */
static void
wait_for_extension(void)
{
	bool		logged = false;

	for (;;)
	{
		ExtensionState state = EXTENSION_MISSING;

		in_transaction(check_extension, &state);
		if (state == EXTENSION_READY)
			return;
		if (!logged)
		{
			elog(LOG, "jobloop worker %d waiting for CREATE EXTENSION jobloop in database \"%s\"",
				 my_worker, my_database);
			logged = true;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 EXTENSION_POLL_MS, wait_extension);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		stop_if_asked();
		reload_config_if_asked();
	}
}

/*
 * DROP EXTENSION jobloop ran: the jobs we hold are gone with their table.
 * Let go of them and of their calls, wait for the extension to come back,
 * and start as a new worker would -- without a restart or an error.
 */
static void
start_over(void)
{
	HeldJob   **jobs = palloc(Max(held_count(), 1) * sizeof(HeldJob *));
	int			n = held_all(jobs, held_count());

	elog(LOG, "jobloop worker %d: extension jobloop was dropped in database \"%s\"; "
		 "%d jobs in progress are gone with it",
		 my_worker, my_database, n);
	for (int i = 0; i < n; i++)
		held_drop(jobs[i]);
	pfree(jobs);
	/* cancels of the old jobs must not hit new jobs that reuse their ids */
	{
		int64		ids[CANCEL_QUEUE_SIZE];
		bool		overflow;

		while (shared_take_cancels(my_worker, ids, lengthof(ids), &overflow) > 0)
			;
	}
	held_forget_releases();
	kinds_invalidate();
	wait_for_extension();
	release_all_at_start();
	batch_claim_wanted = true;
}

/*
 * A database named in jobloop.database that does not exist (not created
 * yet, or dropped) would make every start of this worker end in FATAL
 * "database ... does not exist", every 5 seconds, for good.  So when the
 * previous start in this slot could not connect (noted in shared memory on
 * its way out), this one connects to no database first and watches
 * pg_database, a shared catalog: it says so once, looks again with a
 * backoff (1 s, doubling, at most a minute), and once the database exists
 * it exits to be started again, connecting to it.
 */
static bool connected = false;

static void
note_connect_failure(int code, Datum arg)
{
	WorkerSlot *slot = shared_slot(my_worker);

	if (slot != NULL)
		slot->connect_failed = !connected;
}

static void
database_exists(void *arg)
{
	*(bool *) arg = OidIsValid(get_database_oid(my_database, true));
}

static void
wait_for_database(void)
{
	long		delay_ms = 1000;

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	for (;;)
	{
		bool		exists = false;

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		database_exists(&exists);
		CommitTransactionCommand();
		if (exists)
		{
			ereport(LOG,
					(errmsg("jobloop worker %d: database \"%s\" exists now; connecting to it",
							my_worker, my_database)));
			connected = true;	/* this start did its job; the next one connects */
			proc_exit(1);
		}
		if (delay_ms == 1000)
			ereport(LOG,
					(errmsg("jobloop worker %d waits for database \"%s\", which does not exist",
							my_worker, my_database),
					 errhint("Create the database, or remove it from jobloop.database.")));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 delay_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		stop_if_asked();
		delay_ms = Min(delay_ms * 2, 60000);
	}
}

static void
connect_to_database(void)
{
	WorkerSlot *slot = shared_slot(my_worker);

	if (slot != NULL && slot->connect_failed)
	{
		slot->connect_failed = false;
		wait_for_database();	/* does not return */
	}
	before_shmem_exit(note_connect_failure, (Datum) 0);
	BackgroundWorkerInitializeConnection(my_database, NULL, 0);
	connected = true;
}

/* Milliseconds until the earliest thing we must do: the turn's next, curl's timer, statistics. */
static long
wait_timeout(TimestampTz now)
{
	long		ms = turn_wait_ms(now);
	TimestampTz t;

	if ((t = http_next_timeout()) != 0)
		ms = Min(ms, t <= now ? 0 : (long) ((t - now + 999) / 1000));
	if (stats_due != 0)
		ms = Min(ms, stats_due <= now ? 0 : (long) ((stats_due - now + 999) / 1000));
	return ms;
}

/*
 * Every turn frees what the last one allocated (memory contexts, libcurl's
 * per-transfer buffers) and allocates it again.  glibc would hand freed
 * memory at the top of the heap, and every block of 128 kB or more (the
 * batch context's big blocks), back to the kernel, so the next turn faults
 * the same pages in again: ~3 page faults per step, ~5% of the worker's
 * CPU.  Keep it instead; the main loop gives back what is free (malloc_trim)
 * at each heartbeat and whenever the worker runs out of jobs, so that a past
 * peak does not stay resident for good.
 */
static void
keep_freed_memory(void)
{
	(void) mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
	(void) mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
}

void
jobloop_worker_main(Datum main_arg)
{
	WaitEventSet *events;
	MemoryContext loop_cxt;
	char		name[BGW_MAXLEN];

	my_worker = DatumGetInt32(main_arg);
	strlcpy(my_database, MyBgworkerEntry->bgw_extra, NAMEDATALEN);
	my_worker_number = my_worker;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	install_sigterm_handler();
	BackgroundWorkerUnblockSignals();
	connect_to_database();
	register_wait_events();

	snprintf(name, sizeof(name), "jobloop worker %d", my_worker);
	SetConfigOption("application_name", name, PGC_USERSET, PGC_S_SESSION);
	pgstat_report_activity(STATE_IDLE, NULL);
	shared_attach_worker(my_worker, my_database);
	store_prepare(my_worker);

	wait_for_extension();

	/*
	 * No JIT: the worker's statements are short and run thousands of times,
	 * and JIT is paid per execution; a misestimate once put 0.5-1.2 s of
	 * compilation into every claim (bench/README.md, "Scale and soak").
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/* our own statements must not resolve names through a user's path */
	logic_capture_search_path();
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	keep_freed_memory();
	held_init(my_worker);
	limits_init_worker();
	pause_init_worker();
	http_init();
	turn_init(my_worker);
	events = compat_session_wait_event_set(3);
	AddWaitEventToSet(events, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(events, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(events, WL_SOCKET_READABLE, http_epoll_fd(), NULL, NULL);

	/* whatever our predecessor held is ours to redo, now */
	release_all_at_start();
	elog(LOG, "jobloop worker %d started in database \"%s\"", my_worker, my_database);

	/*
	 * Between transactions CurrentMemoryContext would be TopMemoryContext;
	 * everything a turn of the loop allocates goes here instead, and is
	 * freed at the start of the next turn.
	 */
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "jobloop loop", ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		WaitEvent	occurred[3];
		int			nevents;
		TimestampTz now = GetCurrentTimestamp();
		bool		batched;

		MemoryContextSwitchTo(loop_cxt);
		MemoryContextReset(loop_cxt);

		nevents = WaitEventSetWait(events, wait_timeout(now), occurred, lengthof(occurred),
								   wait_event_now());
		for (int i = 0; i < nevents; i++)
		{
			if (occurred[i].events & WL_LATCH_SET)
			{
				ResetLatch(MyLatch);
				/* a submit, a cancel, or a signal: look for work either way */
				batch_claim_wanted = true;
			}
			if (occurred[i].events & WL_SOCKET_READABLE)
				http_socket_ready();
		}
		CHECK_FOR_INTERRUPTS();
		stop_if_asked();
		reload_config_if_asked();

		now = GetCurrentTimestamp();
		http_timer_fired(now);
		if (!turn_run(&batched))
			start_over();
		else if (batched)
		{
			report_stats(GetCurrentTimestamp());
			MemoryContextSwitchTo(loop_cxt);
		}
		if (now >= next_retention)
		{
			/* retention: in transactions of its own, after the batch committed */
			retention_run();
			MemoryContextSwitchTo(loop_cxt);
			next_retention = now + (TimestampTz) jobloop_lease_timeout * 1000 * 1000 / 3;
		}
		if (stats_due != 0 && now >= stats_due)
			report_stats(now);
		/* see keep_freed_memory(); a heartbeat turn comes every lease_timeout / 3 */
		if (http_close_idle(now) || now >= next_trim || (held_count() == 0 && !trimmed))
		{
			(void) malloc_trim(0);
			next_trim = now + (TimestampTz) jobloop_lease_timeout * 1000 * 1000 / 3;
		}
		trimmed = held_count() == 0;
	}
}
