/*-------------------------------------------------------------------------
 *
 * tls_settings.h
 *		The engine's HTTP/2 prior-knowledge list, and the signature of its
 *		TLS settings.
 *
 * As with the guard (guard.h), the list in force is set by the host: the
 * server's GUC hooks of jobloop.http2_prior_knowledge (src/server/tls.c),
 * or jobloop-worker from the server's reply.  The lookups
 * (tls_prior_knowledge, tls_prior_knowledge_any: engine.h) and the
 * signature are the engine's, from http.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef JOBLOOP_TLS_SETTINGS_H
#define JOBLOOP_TLS_SETTINGS_H

#include <stdbool.h>
#include <stddef.h>

#define PK_HOST_MAX		256		/* "[IPv6]" or a DNS name, with its NUL */
#define PK_MAX_ENTRIES	1000	/* jobloop.http2_prior_knowledge entries */

typedef struct PriorKnowledgeEntry
{
	char		host[PK_HOST_MAX];	/* lower case; IPv6 canonical, in brackets */
	int			port;
} PriorKnowledgeEntry;

/* One malloc'd block: the header and its entries. */
typedef struct PriorKnowledgeList
{
	int			count;
	PriorKnowledgeEntry entries[FLEXIBLE_ARRAY_MEMBER];
} PriorKnowledgeList;

/* Why prior_knowledge_parse refused a list. */
typedef enum PriorKnowledgeProblem
{
	PK_OK,
	PK_TOO_MANY,				/* more than PK_MAX_ENTRIES entries */
	PK_BAD_ENTRY,				/* an entry that is not host:port */
	PK_NO_MEMORY
} PriorKnowledgeProblem;

/*
 * Parse a comma-separated list of host:port.  Returns the list (malloc'd,
 * free() it), or NULL with *problem set and a sentence naming it in err.
 */
extern PriorKnowledgeList *prior_knowledge_parse(const char *text, char *err, size_t errlen,
												 PriorKnowledgeProblem *problem);

/* The size of list's block, to copy it. */
extern size_t prior_knowledge_size(const PriorKnowledgeList *list);

/* Use list (or NULL: none); the caller keeps it alive. */
extern void prior_knowledge_use(const PriorKnowledgeList *list);

/* Parse text and use it, keeping a copy of its own; false (list unchanged) if it does not parse. */
extern bool prior_knowledge_set(const char *text, char *err, size_t errlen);

/*
 * What the worker's connections were made with: the TLS settings, which
 * file each names (device, inode, size, modification and change times) and
 * the prior-knowledge list.  palloc'd; see http_settings_reloaded.
 */
extern char *tls_settings_signature(void);

#endif							/* JOBLOOP_TLS_SETTINGS_H */
