/*-------------------------------------------------------------------------
 *
 * jobloop.c
 *		Module load: GUCs, shared-memory hooks and worker registration.
 *
 * The library must be in shared_preload_libraries for workers to run.  When
 * it is merely loaded by a backend (to call the SQL API), only the GUCs are
 * defined; submit and cancel then still work, and the jobs wait for a
 * worker.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <limits.h>

#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "postmaster/bgworker.h"
#include "utils/guc.h"

COMPAT_MODULE_MAGIC("jobloop", JOBLOOP_VERSION);

void		_PG_init(void);

char	   *jobloop_database = NULL;
int			jobloop_workers = 1;
int			jobloop_max_external_workers = 8;
int			jobloop_max_in_flight = 1000;
int			jobloop_lease_timeout = 60;
char	   *jobloop_allowed_hosts = NULL;
int			jobloop_max_response_size = 10 * 1024 * 1024;
int			jobloop_request_timeout = 30000;
int			jobloop_function_timeout = 10000;
int			jobloop_hold_delay = 10000;
int			jobloop_max_redirects = 5;
int			jobloop_max_endpoints = 1024;
int			jobloop_tenant_max_concurrency = 0;
int			jobloop_retention = 7 * 86400;
int			jobloop_max_state_size = 1024 * 1024;
int			jobloop_max_request_size = 1024 * 1024;
int			jobloop_idle_connection_timeout = 30;
bool		jobloop_start_paused = false;
char	   *jobloop_ca_file = NULL;
char	   *jobloop_client_cert = NULL;
char	   *jobloop_client_key = NULL;
char	   *jobloop_http2_prior_knowledge = NULL;

static void
define_gucs(void)
{
	DefineCustomStringVariable("jobloop.database",
							   "Databases the jobloop workers serve.",
							   "A comma-separated list; each database gets jobloop.workers workers.",
							   &jobloop_database,
							   "postgres",
							   PGC_POSTMASTER,
							   GUC_LIST_INPUT,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.workers",
							"Number of jobloop background workers per database.",
							NULL,
							&jobloop_workers,
							1, 0, JOBLOOP_MAX_WORKERS,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.max_external_workers",
							"Maximum number of external workers (jobloop-worker) connected at once, in all databases.",
							"Each takes a worker slot in shared memory; all slots together are at most 64.",
							&jobloop_max_external_workers,
							8, 0, JOBLOOP_MAX_WORKERS,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.max_in_flight",
							"Maximum number of jobs one worker holds at once (in flight or waiting a short delay).",
							NULL,
							&jobloop_max_in_flight,
							1000, 1, 100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.lease_timeout",
							"How long a claimed job stays with its worker without a heartbeat.",
							"After that another worker may claim it.",
							&jobloop_lease_timeout,
							60, 5, 86400,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("jobloop.allowed_hosts",
							   "Non-public hosts and networks that jobs may call.",
							   "Comma-separated host names, addresses or CIDR networks; "
							   "loopback, private and link-local addresses are refused unless listed here. "
							   "'*' allows every address.",
							   &jobloop_allowed_hosts,
							   "",
							   PGC_SIGHUP,
							   GUC_LIST_INPUT,
							   guard_check_allowed_hosts, guard_assign_allowed_hosts, NULL);

	DefineCustomIntVariable("jobloop.max_response_size",
							"Largest response body a job may receive.",
							NULL,
							&jobloop_max_response_size,
							/* a response becomes jsonb, which holds < 256 MB */
							10 * 1024 * 1024, 1024, 128 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.request_timeout",
							"Default total timeout of one HTTP request.",
							"A kind's timeout or a request's timeout_ms overrides it.",
							&jobloop_request_timeout,
							30000, 1, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.function_timeout",
							"Longest a request, step or done function may run for one job.",
							"0 disables the limit.",
							&jobloop_function_timeout,
							10000, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.hold_delay",
							"Longest wait (delay or retry backoff) during which a worker keeps a job in memory.",
							"Longer waits release the job to the table; any worker picks it up when it is due.",
							&jobloop_hold_delay,
							10000, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.max_redirects",
							"Maximum number of HTTP redirects a request follows.",
							NULL,
							&jobloop_max_redirects,
							5, 0, 50,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.max_endpoints",
							"Number of endpoints whose limits and pauses the workers can track.",
							NULL,
							&jobloop_max_endpoints,
							1024, 16, 1000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.tenant_max_concurrency",
							"Default maximum number of jobs of one tenant held by workers at once.",
							"0 means no limit; jobloop.set_tenant_limit() overrides it per tenant.",
							&jobloop_tenant_max_concurrency,
							0, 0, INT_MAX,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.retention",
							"How long finished jobs are kept before the workers drop them.",
							"0 keeps them forever.  Also sets the width of their partitions: a day, an hour or a minute.",
							&jobloop_retention,
							7 * 86400, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * A worker holds the state and the request of every job it runs, copies
	 * them several times per step, and writes the state to the table (and
	 * WAL) at each step: one job with a huge state must not take the
	 * worker's memory, so it fails alone instead.
	 */
	DefineCustomIntVariable("jobloop.max_state_size",
							"Largest state a job may have.",
							"A step that returns a larger state fails its job; submit refuses one.",
							&jobloop_max_state_size,
							1024 * 1024, 1024, 128 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.max_request_size",
							"Largest request body a job may send.",
							"A request function that returns a larger body fails its job.",
							&jobloop_max_request_size,
							1024 * 1024, 1024, 128 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("jobloop.idle_connection_timeout",
							"How long a worker keeps connections that no request uses.",
							"After that it closes them and gives their memory back.",
							&jobloop_idle_connection_timeout,
							30, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("jobloop.start_paused",
							 "Start with the jobs of every served database paused.",
							 "The first worker of a database to start after the server does runs "
							 "jobloop.pause() there: for a restored copy that must not call the APIs "
							 "its source called.  jobloop.resume() lets the jobs run.",
							 &jobloop_start_paused,
							 false,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	/*
	 * TLS: one CA bundle and one client identity for all the workers of the
	 * server (see README, "HTTPS and HTTP/2").  A reload that changes them,
	 * or the files they name, takes effect for every new connection.
	 */
	DefineCustomStringVariable("jobloop.ca_file",
							   "CA certificates that HTTPS servers' certificates are verified against.",
							   "A PEM file; empty: the system's CA certificates.",
							   &jobloop_ca_file,
							   "",
							   PGC_SIGHUP,
							   0,
							   tls_check_ca_file, NULL, NULL);

	DefineCustomStringVariable("jobloop.client_cert",
							   "Client certificate the workers present to HTTPS servers that ask for one (mutual TLS).",
							   "A PEM file; empty: none.",
							   &jobloop_client_cert,
							   "",
							   PGC_SIGHUP,
							   0,
							   tls_check_client_cert, NULL, NULL);

	DefineCustomStringVariable("jobloop.client_key",
							   "Private key of jobloop.client_cert.",
							   "A PEM file, not encrypted; empty: the key is in jobloop.client_cert's file.",
							   &jobloop_client_key,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   tls_check_client_key, NULL, NULL);

	DefineCustomStringVariable("jobloop.http2_prior_knowledge",
							   "Servers reached over plain http that are spoken to in HTTP/2 from the start.",
							   "A comma-separated list of host:port.",
							   &jobloop_http2_prior_knowledge,
							   "",
							   PGC_SIGHUP,
							   GUC_LIST_INPUT,
							   tls_check_prior_knowledge, tls_assign_prior_knowledge, NULL);

	MarkGUCPrefixReserved("jobloop");
}

static void
register_workers(void)
{
	List	   *databases = shared_database_names();
	int			total = shared_total_workers();

	if (list_length(databases) * jobloop_workers > JOBLOOP_MAX_WORKERS)
		ereport(WARNING,
				(errmsg("jobloop starts only %d workers", JOBLOOP_MAX_WORKERS),
				 errdetail("jobloop.database lists %d databases with jobloop.workers = %d each.",
						   list_length(databases), jobloop_workers)));
	for (int i = 1; i <= total; i++)
	{
		BackgroundWorker worker;
		const char *database = list_nth(databases, (i - 1) / jobloop_workers);

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		/* restart soon after an error; after a crash the postmaster restarts us at once */
		worker.bgw_restart_time = 5;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "jobloop");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "jobloop_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "jobloop worker %d for %s", i, database);
		snprintf(worker.bgw_type, BGW_MAXLEN, "jobloop worker");
		strlcpy(worker.bgw_extra, database, BGW_EXTRALEN);
		worker.bgw_main_arg = Int32GetDatum(i);
		RegisterBackgroundWorker(&worker);
	}
}

void
_PG_init(void)
{
	define_gucs();

	if (!process_shared_preload_libraries_in_progress)
		return;

	shared_install_hooks();
	register_workers();
}
