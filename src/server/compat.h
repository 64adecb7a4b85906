/*-------------------------------------------------------------------------
 *
 * compat.h
 *		Every difference between the PostgreSQL major versions jobloop
 *		builds against (15, 16, 17, 18), and nothing else.
 *
 * The code is written against the newest API; where an older version
 * lacks a function, a shim with the newest one's signature is defined
 * here.  Where the newest API cannot be expressed on the older one, a
 * compat_ function says what it does and hides the difference.  No other
 * file tests PG_VERSION_NUM.
 *
 * 15, 17 and 18 are built and tested (scripts/run-tests.sh); 16 is not
 * packaged by Debian and is untested, but its guards are kept right so
 * that it compiles.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_COMPAT_H
#define JOBLOOP_COMPAT_H

#include "postgres.h"

#include "catalog/pg_proc.h"
#include "common/jsonapi.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#if PG_VERSION_NUM < 150000
#error "jobloop needs PostgreSQL 15 or later"
#endif

/*
 * 16 replaced pg_proc_aclcheck() and its siblings by object_aclcheck(),
 * which takes the catalog.  jobloop checks functions only.
 */
#if PG_VERSION_NUM < 160000
static inline AclResult
object_aclcheck(Oid classid, Oid objectid, Oid roleid, AclMode mode)
{
	Assert(classid == ProcedureRelationId);
	return pg_proc_aclcheck(objectid, roleid, mode);
}
#endif

/*
 * A copy of size bytes at data, in the memory a GUC check hook's "extra"
 * must be in: PostgreSQL frees an extra it replaces with free() before 16,
 * and with guc_free() (its own memory context) since.  NULL when out of
 * memory.
 */
static inline void *
compat_guc_extra(const void *data, size_t size)
{
#if PG_VERSION_NUM >= 160000
	void	   *copy = guc_malloc(LOG, size);
#else
	void	   *copy = malloc(size);
#endif

	if (copy != NULL)
		memcpy(copy, data, size);
	return copy;
}

/*
 * A JSON lexer over len bytes at json, palloc'd in the current memory
 * context, without unescaped lexemes.  17 added a first argument, a
 * context to initialise (NULL: allocate one), and took the length as size_t.
 */
static inline JsonLexContext *
compat_json_lexer(const char *json, size_t len, int encoding)
{
#if PG_VERSION_NUM >= 170000
	return makeJsonLexContextCstringLen(NULL, json, len, encoding, false);
#else
	return makeJsonLexContextCstringLen(unconstify(char *, json), (int) len, encoding, false);
#endif
}

/*
 * A WaitEventSet that lives as long as the process.  Since 17 a set is
 * owned by a ResourceOwner (NULL: none, memory in TopMemoryContext) instead
 * of being allocated in a given memory context.
 */
static inline WaitEventSet *
compat_session_wait_event_set(int nevents)
{
#if PG_VERSION_NUM >= 170000
	return CreateWaitEventSet(NULL, nevents);
#else
	return CreateWaitEventSet(TopMemoryContext, nevents);
#endif
}

/*
 * The wait event to report while waiting for what NAME says.  17 lets an
 * extension register its own (pg_stat_activity.wait_event shows NAME, and
 * pg_wait_events lists it); before, every wait of an extension is
 * "Extension".
 */
static inline uint32
compat_wait_event(const char *name)
{
#if PG_VERSION_NUM >= 170000
	return WaitEventExtensionNew(name);
#else
	return PG_WAIT_EXTENSION;
#endif
}

/*
 * 18's module magic carries a name and version, which
 * pg_get_loaded_modules() shows.  For the one file that defines it.
 */
#if PG_VERSION_NUM >= 180000
#define COMPAT_MODULE_MAGIC(module_name, module_version) \
	PG_MODULE_MAGIC_EXT(.name = module_name, .version = module_version)
#else
#define COMPAT_MODULE_MAGIC(module_name, module_version) PG_MODULE_MAGIC
#endif

#endif							/* JOBLOOP_COMPAT_H */
