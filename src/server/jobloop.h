/*-------------------------------------------------------------------------
 *
 * jobloop.h
 *		Declarations shared by jobloop's source files.
 *
 * Each .c file owns one concern; this header is the only coupling between
 * them.  Functions are grouped by the file that defines them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_H
#define JOBLOOP_H

#include "postgres.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "datatype/timestamp.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "compat.h"
#include "engine.h"

#define JOBLOOP_VERSION		"0.5.0"
#define JOBLOOP_CHANNEL		"jobloop"
#define JOBLOOP_MAX_WORKERS	64
#define ENDPOINT_LEN		128		/* longest endpoint (host:port or rate_key) + 1 */

/* ---- jobloop.c: GUCs ---- */
extern char *jobloop_database;
extern int	jobloop_workers;
extern int	jobloop_max_external_workers;
extern int	jobloop_max_in_flight;
extern int	jobloop_lease_timeout;		/* seconds */
extern char *jobloop_allowed_hosts;
extern int	jobloop_request_timeout;	/* ms */
extern int	jobloop_function_timeout;	/* ms */
extern int	jobloop_hold_delay;			/* ms */
extern int	jobloop_max_endpoints;
extern int	jobloop_tenant_max_concurrency;
extern int	jobloop_retention;			/* seconds; 0 keeps finished jobs forever */
extern int	jobloop_max_state_size;		/* bytes */
extern int	jobloop_max_request_size;	/* bytes */
extern bool jobloop_start_paused;
extern char *jobloop_http2_prior_knowledge;

/* ---- shared.c: shared memory between backends and workers ---- */
#define CANCEL_QUEUE_SIZE	256

#define STATS_SECONDS		60

/* What a worker reports about itself (stats.c); written only by that worker. */
typedef struct WorkerStats
{
	TimestampTz started_at;
	int			held;
	int			in_flight;
	TimestampTz last_turn;		/* end of its last batch */
	int64		steps;
	int64		completed;
	int64		failed;
	int64		retries;
	int64		batches;
	double		claim_ms;		/* moving averages */
	double		commit_ms;
	int64		second[STATS_SECONDS];	/* steps per second, for rates */
	int32		steps_in_second[STATS_SECONDS];
} WorkerStats;

typedef struct WorkerSlot
{
	slock_t		mutex;			/* protects everything below */
	pid_t		pid;			/* 0 when no worker runs in this slot */
	Latch	   *latch;
	Oid			database;		/* the database this slot's worker serves */
	char		database_name[NAMEDATALEN];
	int			ncancels;
	bool		cancel_overflow;	/* queue overflowed: worker must rescan */
	int64		cancels[CANCEL_QUEUE_SIZE];
	WorkerStats stats;
	/* written by the worker's timeout handler only, read by its successor */
	int64		overrun_job;	/* its function ignored the cancel; 0: none */
	int32		overrun_step;	/* ... at this step */
	Oid			overrun_fn;
	Oid			overrun_database;	/* where overrun_job is */
	bool		connect_failed; /* its last start found no database to connect to */
	/* an external worker (jobloop-worker): pid above is its connection's backend */
	bool		external;
	char		host[64];		/* the machine jobloop-worker runs on, as it says */
	int32		remote_pid;		/* jobloop-worker's pid there */
	Oid			start_paused_ext;	/* the extension jobloop.start_paused paused */
} WorkerSlot;

typedef struct JobloopShared
{
	int			nworkers;		/* background workers: slots 1..nworkers */
	int			nslots;			/* then external workers' slots, up to nslots */
	WorkerSlot	workers[FLEXIBLE_ARRAY_MEMBER];
} JobloopShared;

extern void shared_install_hooks(void);
extern bool shared_available(void);
extern void shared_attach_worker(int worker, const char *database_name);
extern int	shared_attach_external(const char *database_name, const char *host, int32 remote_pid);
extern void shared_detach_worker(int worker);
extern int	shared_live_workers_here(void);
extern int	shared_total_workers(void);
extern int	shared_database_workers(const char *database, int *workers, int max);
extern bool shared_serves_database(const char *name);
extern List *shared_database_names(void);
extern WorkerSlot *shared_slot(int worker);
extern void shared_wake_workers(void);
extern void shared_wake_worker(int worker);
extern void shared_post_cancel(int worker, int64 job_id);
extern int	shared_take_cancels(int worker, int64 *ids, int max, bool *overflow);

/*
 * Heavyweight locks of the workers: type "userlock" (LOCKTAG_USERLOCK),
 * which no SQL function can take, keyed (database, JOBLOOP_LOCK_KEY, what).
 */
#define JOBLOOP_LOCK_KEY			0x6A6C6F6F	/* "jloo" */
#define JOBLOOP_LOCK_CLAIM_TURN		1
#define JOBLOOP_LOCK_COUNT_FOLD		2
#define JOBLOOP_LOCK_PARTITIONS		3


/* ---- guard.c: the GUC hooks of jobloop.allowed_hosts (the check itself: engine.h) ---- */
extern bool guard_check_allowed_hosts(char **newval, void **extra, GucSource source);
extern void guard_assign_allowed_hosts(const char *newval, void *extra);

/* ---- tls.c: the settings of TLS and HTTP/2 ---- */
extern bool tls_check_ca_file(char **newval, void **extra, GucSource source);
extern bool tls_check_client_cert(char **newval, void **extra, GucSource source);
extern bool tls_check_client_key(char **newval, void **extra, GucSource source);
extern bool tls_check_prior_knowledge(char **newval, void **extra, GucSource source);
extern void tls_assign_prior_knowledge(const char *newval, void *extra);
extern char *tls_settings_signature(void);

/* ---- request.c: request JSON -> HttpRequest; transfer -> response JSON ---- */

extern HttpRequest *request_parse(Jsonb *request, MemoryContext cxt);
extern HttpRequest *request_copy(const HttpRequest *req, MemoryContext cxt);
extern bool url_origin(const char *url, char **scheme, char **host, char **port);
extern void request_free(HttpRequest *req);
extern Jsonb *response_build(const HttpResult *res);
extern Jsonb *response_build_error(const HttpResult *res, const char *error, int attempts);
extern char *response_header(const HttpResult *res, const char *name);
extern int64 response_retry_after_ms(const HttpResult *res);


/* ---- kinds.c: the worker's cache of jobloop.kind ---- */
typedef struct Kind
{
	char		name[64];		/* hash key */
	bool		present;		/* still in jobloop.kind */
	Oid			request_fn;
	Oid			step_fn;
	Oid			done_fn;		/* InvalidOid: none */
	int			max_steps;
	int			max_attempts;
	int64		backoff_ms;
	int64		max_backoff_ms;
	int			timeout_ms;		/* 0: jobloop.request_timeout */
	bool		notify_steps;
	bool		step_sees_errors;	/* on_error = 'step' */
	bool		fmgr_valid;
	FmgrInfo	request_finfo;
	FmgrInfo	step_finfo;
	FmgrInfo	done_finfo;
} Kind;

extern Kind *kinds_lookup(const char *name);
extern void kinds_invalidate(void);

/* ---- logic.c: business logic, run as the job's owner ---- */
extern Jsonb *logic_request(Kind *kind, Oid owner, Jsonb *state, bool *finished);
extern Jsonb *logic_step(Kind *kind, Oid owner, Jsonb *state, Jsonb *response);
extern bool logic_done(Kind *kind, Oid owner, Jsonb *state);
extern void logic_check_state_size(Jsonb *state);
extern void logic_capture_search_path(void);
extern void logic_use_search_path(const char *path);
extern void logic_begin_job(int64 job_id, int32 step);
extern char *logic_failure_text(ErrorData *edata);
extern char *logic_take_overrun(int64 *job_id, int32 *step);
extern void logic_end_job(bool aborted);
extern void logic_stop_timers(void);
extern bool logic_call_running(void);

/* ---- store.c: every statement the worker runs ---- */
typedef struct ClaimedJob
{
	int64		id;
	char	   *kind;
	Oid			owner;
	char	   *tenant;
	int32		step;
	int32		attempts;
	Jsonb	   *state;
	Jsonb	   *request;		/* NULL: compute from state */
	bool		was_pending;
	char	   *key_token;		/* the Idempotency-Key's; NULL for jobs from before 0.3.0 */
} ClaimedJob;

typedef struct JobUpdate
{
	int64		id;
	int32		from_step;		/* applies only if the row is still at this step */
	const char *status;
	int32		step;
	Jsonb	   *state;
	Jsonb	   *request;		/* NULL when finished */
	const char *last_error;
	int32		attempts;
	TimestampTz run_after;		/* 0: unchanged */
	bool		release;		/* give up the lease (finished, or long wait) */
} JobUpdate;

#include "executor/spi.h"
extern void store_run_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types,
						   Datum *values, const char *nulls, int expected);
extern void store_prepare(int worker);
extern void store_release_all(int *siblings, int nsiblings);
extern void store_fail_job(int64 id, int32 step, const char *reason);
extern int	store_claim(int limit, ClaimedJob *out, MemoryContext cxt);
extern TimestampTz store_next_runnable(void);
extern int	store_update_jobs(JobUpdate *updates, int n, bool *applied);
extern void store_extend_leases(int64 *ids, int n);
extern int	store_reap_expired(int64 *held_ids, int nheld);
extern void store_release(int64 *ids, int n);
extern int64 *store_held_ids(int *n);
extern int	store_delete_expired(int limit);
extern bool store_has_finished_jobs(void);
extern bool store_try_worker_lock(int what);
extern bool store_fold_counts(void);
extern void store_still_ours(JobUpdate *updates, bool *applied, int n, bool *ours);
extern void store_read_ours(int64 *ids, int32 *steps, int n, bool *ours);
typedef enum ExtensionState
{
	EXTENSION_MISSING,
	EXTENSION_READY
} ExtensionState;
extern ExtensionState store_extension_state(bool lock);

/* ---- api.c: the SQL API that writes, and what admin.c shares of it ---- */
typedef struct OwnerContext
{
	Oid			saved_userid;
	int			saved_sec_context;
	int			saved_nestlevel;
} OwnerContext;

extern void enter_owner_context(OwnerContext *cxt);
extern void leave_owner_context(OwnerContext *cxt);
extern bool is_jobloop_admin(Oid role);
extern void require_jobloop_admin(const char *what, const char *may);
extern void require_primary(const char *what);
extern void require_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern void wake_workers_at_commit(void);
extern int64 interval_ms(Interval *span);
extern void notify_job(int64 id, const char *status, int32 step, const char *tenant,
					   const char *kind, const char *error);

/* ---- pause.c: paused kinds and tenants ---- */
extern void pause_init_worker(void);
extern bool pause_sync(void);
extern bool pause_covers(const char *kind, const char *tenant);
extern bool pause_any(void);
extern void pause_at_start(const char *database);

/* ---- held.c: the jobs a worker holds, in memory ---- */
#include "lib/ilist.h"
#include "lib/pairingheap.h"

typedef enum HeldPhase
{
	HELD_WAITING,				/* due at not_before (delay, backoff) */
	HELD_IN_FLIGHT,				/* its HTTP call is running */
	HELD_RESPONDED,				/* call finished; result awaits the next batch */
	HELD_BLOCKED,				/* due, but its endpoint's limit says not yet */
	HELD_IDLE					/* being advanced by the current batch */
} HeldPhase;

typedef struct HeldJob
{
	int64		id;				/* hash key: must be first */
	HeldPhase	phase;
	Kind	   *kind;
	char	   *kind_name;
	Oid			owner;
	char	   *tenant;
	char	   *key_token;		/* see ClaimedJob */
	int32		step;			/* completed steps */
	int32		committed_step;	/* step as the table has it: fences our updates */
	int32		attempts;		/* failed attempts at the current step */
	bool		transport_failed;	/* the last attempt failed without a response */
	Jsonb	   *state;
	Jsonb	   *request_json;	/* as returned by the request function */
	HttpRequest *request;
	TimestampTz not_before;
	pairingheap_node heap_node;
	Transfer   *transfer;
	bool		limit_tracked;	/* its call counts in its endpoint's in_flight */
	struct EndpointQueue *queue;	/* in HELD_BLOCKED */
	struct Deferred *deferred;	/* its row was locked: the update to retry */
	dlist_node	queue_node;
	HttpResult	result;			/* valid in HELD_RESPONDED */
} HeldJob;

extern void held_init(int worker);
extern HeldJob *held_add(ClaimedJob *claimed);
extern HeldJob *held_find(int64 id);
extern void held_drop(HeldJob *job);
extern void held_unschedule(HeldJob *job);
extern void held_forget_releases(void);
extern int	held_count(void);
extern void held_set_state(HeldJob *job, Jsonb *state);
extern void held_set_request(HeldJob *job, Jsonb *request_json, HttpRequest *request);
extern void held_schedule(HeldJob *job, TimestampTz not_before);
extern TimestampTz held_next_due(void);
extern void held_send_due(TimestampTz now);
extern int	held_collect_responses(HeldJob **out, int max);
extern int	held_all(HeldJob **out, int max);
extern void held_retry_blocked(TimestampTz now);
extern TimestampTz held_next_blocked(void);
extern int	held_take_releases(HeldJob **out, int max);
extern MemoryContext held_context(void);

/* ---- limits.c: per-endpoint limits in shared memory ---- */
typedef struct LimitVerdict
{
	bool		granted;
	bool		tracked;		/* granted and counted: call limits_release after */
	TimestampTz retry_at;		/* not granted: ask again then; 0 = when a slot frees */
	double		rate;			/* the allowed rate now, 0 if unlimited */
	double		max_rate;		/* where the allowed rate is heading, 0 if unlimited */
	int			max_concurrency;	/* 0 if unlimited */
} LimitVerdict;

extern Size limits_shmem_size(void);
extern void limits_shmem_request(void);
extern void limits_shmem_startup(void);
extern void limits_acquire(const char *endpoint, int worker, TimestampTz now, LimitVerdict *v);
extern void limits_release(const char *endpoint, bool tracked, long status,
						   int64 retry_after_ms, TimestampTz now);
extern void limits_init_worker(void);
extern void limits_sync(void);

/* ---- stats.c: what workers report about themselves ---- */
extern void stats_record_batch(int worker, int steps, int completed, int failed, int retries,
							   double claim_ms, double commit_ms);
extern void stats_record_load(int worker, int held, int in_flight);
extern int	stats_least_held_peer(int worker, int max_held, int64 active_ms);

/* ---- batch.c: the transaction that advances jobs ---- */
extern bool batch_run(HeldJob **responded, int nresponded, int64 *releases, int nreleases,
					  HeldJob **parked, int nparked, bool claim, bool heartbeat, bool rescan);
extern bool batch_has_deferred(void);
extern bool batch_in_caller_transaction;
extern bool batch_claim_wanted;
extern int	my_worker_number;
extern TimestampTz batch_next_claim_at;

/* ---- retention.c: finished jobs' partitions, and what they do not cover ---- */
extern void retention_run(void);
extern bool retention_step_in_caller(void);

/* ---- turn.c: one turn of a worker, whichever transport carries its calls ---- */

/*
 * Where a worker's calls run: the engine in this process (the background
 * worker), or jobloop-worker at the other end of a libpq connection
 * (remote.c, in that connection's backend).  Held jobs and batches use
 * nothing else of the engine.
 */
typedef struct Transport
{
	Transfer   *(*start) (const HttpRequest *req, const char *idempotency_key,
						  int default_timeout_ms, bool fresh_connection, void *owner);
	void		(*abort) (Transfer *xfer);
	Transfer   *(*next_finished) (void **owner, HttpResult *result);
	void		(*done) (Transfer *xfer);
	int			(*in_flight) (void);
} Transport;

extern const Transport *transport;
extern const Transport local_transport;

extern void turn_init(int worker);
extern bool turn_run(bool *batched);
extern long turn_wait_ms(TimestampTz now);
extern bool turn_leases_may_have_lapsed(TimestampTz now);

/* ---- remote.c: the turns of an external worker, over its connection ---- */
extern const Transport remote_transport;

/* ---- worker.c ---- */
PGDLLEXPORT void jobloop_worker_main(Datum main_arg);

#endif							/* JOBLOOP_H */
