/*-------------------------------------------------------------------------
 *
 * guard.h
 *		Setting the outbound guard's list of allowed hosts.
 *
 * guard_address_allowed (engine.h) consults one list, the one in force.
 * The server sets it from jobloop.allowed_hosts' GUC hooks (the GUC
 * machinery owns the list); jobloop-worker sets it from the text the
 * server sends in a turn's reply (the guard owns its copy).  Either way
 * the list is the server's: a worker has no setting of its own to widen it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_GUARD_H
#define JOBLOOP_GUARD_H

#include "allowlist.h"

/* Use list (or NULL: nothing beyond public addresses); the caller keeps it alive. */
extern void guard_use_allow_list(const AllowList *list);

/*
 * Parse text as jobloop.allowed_hosts and use it, the guard keeping its own
 * copy.  False, with the reason in err and the list in force unchanged, if
 * it does not parse.
 */
extern bool guard_set_allowed_hosts(const char *text, char *err, size_t errlen);

#endif							/* JOBLOOP_GUARD_H */
