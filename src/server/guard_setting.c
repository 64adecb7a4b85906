/*-------------------------------------------------------------------------
 *
 * guard_setting.c
 *		jobloop.allowed_hosts in the server: its GUC hooks, and
 *		jobloop.address_allowed() to ask the guard from SQL.
 *
 * The setting is parsed and checked by its check hook (allowlist.c), so
 * each process holds the parsed list in force, which the assign hook hands
 * to the engine's guard (src/engine/guard.c).
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "utils/builtins.h"
#include "utils/inet.h"
#include "utils/guc.h"

#include "guard.h"

PG_FUNCTION_INFO_V1(jobloop_address_allowed);

/*
 * Check hook of jobloop.allowed_hosts: a bad entry is an error naming it.
 * On a reload, PostgreSQL then logs the error and keeps the previous value,
 * so a typo in postgresql.conf can never open the guard.
 */
bool
guard_check_allowed_hosts(char **newval, void **extra, GucSource source)
{
	char		err[512];
	AllowList  *list = allowlist_parse(*newval, err, sizeof(err));

	if (list == NULL)
	{
		GUC_check_errdetail("%s", err);
		GUC_check_errhint("List host names, IP addresses or networks such as 10.0.0.0/8, "
						  "separated by commas, or '*' for every address.");
		return false;
	}
	/* PostgreSQL frees the extra it replaces: in its memory, not malloc's (16+) */
	*extra = compat_guc_extra(list, offsetof(AllowList, entries) + list->count * sizeof(AllowEntry));
	free(list);
	if (*extra == NULL)
	{
		GUC_check_errdetail("Out of memory.");
		return false;
	}
	return true;
}

/* The GUC machinery keeps the extra alive until it replaces it, then calls us again. */
void
guard_assign_allowed_hosts(const char *newval, void *extra)
{
	guard_use_allow_list(extra);
}

Datum
jobloop_address_allowed(PG_FUNCTION_ARGS)
{
	inet	   *ip;
	struct sockaddr_storage ss;
	const char *reason;
	char	   *host = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	ip = PG_GETARG_INET_PP(0);
	if (!PG_ARGISNULL(1))
		host = text_to_cstring(PG_GETARG_TEXT_PP(1));

	memset(&ss, 0, sizeof(ss));
	if (ip_family(ip) == PGSQL_AF_INET)
	{
		struct sockaddr_in *sin = (struct sockaddr_in *) &ss;

		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, ip_addr(ip), 4);
	}
	else
	{
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) &ss;

		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, ip_addr(ip), 16);
	}
	PG_RETURN_BOOL(guard_address_allowed((struct sockaddr *) &ss, host, &reason));
}
