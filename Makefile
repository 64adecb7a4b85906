# jobloop — PGXS build.  `make`, `make install`, `make installcheck`.

MODULE_big = jobloop
# src/engine: the HTTP side (libcurl multi, the outbound guard), built into the extension
# and into jobloop-worker alike.  src/server: what runs inside PostgreSQL -- the SQL API,
# the workers' turns (claims, business logic, limits, writes) and their transports.
ENGINE_OBJS = \
	src/engine/http.o \
	src/engine/guard.o \
	src/engine/allowlist.o

OBJS = \
	$(ENGINE_OBJS) \
	src/server/jobloop.o \
	src/server/shared.o \
	src/server/api.o \
	src/server/kinds.o \
	src/server/logic.o \
	src/server/request.o \
	src/server/headers.o \
	src/server/tls.o \
	src/server/store.o \
	src/server/held.o \
	src/server/batch.o \
	src/server/limits.o \
	src/server/pause.o \
	src/server/admin.o \
	src/server/stats.o \
	src/server/retention.o \
	src/server/worker.o

EXTENSION = jobloop
DATA = $(wildcard sql/jobloop--*.sql)
REGRESS = kinds submit cancel guard privileges limits ops counts retention upgrade
# Isolation specs: test/isolation/specs/NAME.spec, expected output in test/isolation/expected/.
ISOLATION = claim cancel_step submit_claim retry_race
ISOLATION_OPTS = --inputdir=test/isolation --load-extension=jobloop

PG_CPPFLAGS = -I$(srcdir)/src/server -I$(srcdir)/src/engine -std=c11
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lcurl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every source file includes src/server/jobloop.h, whose structs live in shared memory: rebuild
# them all when it changes.  (PGXS tracks no header dependencies; a stale object built
# against an older WorkerSlot once wrote into the next slot's spinlock.)
$(OBJS) $(OBJS:.o=.bc): src/server/jobloop.h src/server/compat.h

# make dist: the PGXN release archive, jobloop-<version>.zip, of the committed tree (HEAD;
# commit first), its version the control file's default_version.  test/package/dist.sh
# checks that META.json validates and agrees with jobloop.control and sql/.
EXTVERSION = $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" $(EXTENSION).control)
.PHONY: dist
dist:
	git archive --format=zip --prefix=$(EXTENSION)-$(EXTVERSION)/ -o $(EXTENSION)-$(EXTVERSION).zip HEAD
	@echo "$(EXTENSION)-$(EXTVERSION).zip"
