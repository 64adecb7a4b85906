/*-------------------------------------------------------------------------
 *
 * admin.c
 *		The SQL API for administrators: endpoint and tenant limits.
 *
 * Limits protect third-party APIs and share capacity between tenants, so
 * only superusers and members of jobloop_admin may change them.  Changes are
 * written as the extension owner (see api.c) and reach the workers through
 * a relcache invalidation of the limits table at commit.
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(jobloop_set_limit);
PG_FUNCTION_INFO_V1(jobloop_drop_limit);
PG_FUNCTION_INFO_V1(jobloop_set_tenant_limit);

static void
require_admin(const char *what)
{
	require_primary(what);
	require_jobloop_admin(what, "change limits");
}

static char *
endpoint_arg(FunctionCallInfo fcinfo)
{
	char	   *endpoint;

	require_arg(fcinfo, 0, "endpoint");
	endpoint = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (endpoint[0] == '\0' || strlen(endpoint) >= ENDPOINT_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid endpoint \"%s\"", endpoint),
				 errdetail("An endpoint is 1 to %d bytes long.", ENDPOINT_LEN - 1),
				 errhint("Use a URL's host:port, such as 'api.example.com:443', or a request's rate_key.")));
	return endpoint;
}

/* The workers pick a change up at their next transaction; wake idle ones. */
static void
limits_changed(const char *table)
{
	CacheInvalidateRelcacheByRelid(get_relname_relid(table, get_namespace_oid("jobloop", false)));
	wake_workers_at_commit();
}

Datum
jobloop_set_limit(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	char	   *endpoint;
	Oid			types[4] = {TEXTOID, FLOAT4OID, INT4OID, INTERVALOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	OwnerContext cxt;

	require_admin("set endpoint limits");
	endpoint = endpoint_arg(fcinfo);
	if (!PG_ARGISNULL(1) && !(PG_GETARG_FLOAT4(1) > 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_rate must be greater than zero"),
				 errhint("Use NULL for no rate limit.")));
	if (!PG_ARGISNULL(2) && PG_GETARG_INT32(2) < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_concurrency must be at least 1"),
				 errhint("Use NULL for no concurrency limit.")));
	if (!PG_ARGISNULL(3))
	{
		if (interval_ms(PG_GETARG_INTERVAL_P(3)) < 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("ramp must be positive")));
		if (PG_ARGISNULL(1))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("ramp requires max_rate"),
					 errdetail("The ramp is how long the allowed rate takes to climb to max_rate.")));
	}
	if (PG_ARGISNULL(1) && PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a limit needs max_rate or max_concurrency"),
				 errhint("Use jobloop.drop_limit() to remove an endpoint's limit.")));

	values[0] = CStringGetTextDatum(endpoint);
	for (int i = 1; i < 4; i++)
	{
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	enter_owner_context(&cxt);
	store_run_plan(&plan,
				   "INSERT INTO jobloop.endpoint_limit (endpoint, max_rate, max_concurrency, ramp)"
				   " VALUES ($1, $2, $3, $4)"
				   " ON CONFLICT (endpoint) DO UPDATE SET max_rate = EXCLUDED.max_rate,"
				   " max_concurrency = EXCLUDED.max_concurrency, ramp = EXCLUDED.ramp, updated_at = now()",
				   4, types, values, nulls, SPI_OK_INSERT);
	leave_owner_context(&cxt);
	limits_changed("endpoint_limit");
	PG_RETURN_VOID();
}

Datum
jobloop_drop_limit(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	OwnerContext cxt;
	bool		dropped;

	require_admin("drop endpoint limits");
	values[0] = CStringGetTextDatum(endpoint_arg(fcinfo));
	enter_owner_context(&cxt);
	store_run_plan(&plan, "DELETE FROM jobloop.endpoint_limit WHERE endpoint = $1",
				   1, types, values, NULL, SPI_OK_DELETE);
	dropped = SPI_processed > 0;
	leave_owner_context(&cxt);
	limits_changed("endpoint_limit");
	PG_RETURN_BOOL(dropped);
}

Datum
jobloop_set_tenant_limit(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr upsert_plan = NULL;
	static SPIPlanPtr delete_plan = NULL;
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		values[2];
	OwnerContext cxt;

	require_admin("set tenant limits");
	require_arg(fcinfo, 0, "tenant");
	if (!PG_ARGISNULL(1) && PG_GETARG_INT32(1) < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_concurrency must be at least 1"),
				 errhint("Use NULL to remove the tenant's own limit.")));
	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1);
	enter_owner_context(&cxt);
	if (PG_ARGISNULL(1))
		store_run_plan(&delete_plan, "DELETE FROM jobloop.tenant_limit WHERE tenant = $1",
					   1, types, values, NULL, SPI_OK_DELETE);
	else
		store_run_plan(&upsert_plan,
					   "INSERT INTO jobloop.tenant_limit (tenant, max_concurrency) VALUES ($1, $2)"
					   " ON CONFLICT (tenant) DO UPDATE SET max_concurrency = EXCLUDED.max_concurrency,"
					   " updated_at = now()",
					   2, types, values, NULL, SPI_OK_INSERT);
	leave_owner_context(&cxt);
	/* claims read the table directly; a wake-up applies the new cap at once */
	wake_workers_at_commit();
	PG_RETURN_VOID();
}
