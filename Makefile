# jobloop — PGXS build.  `make`, `make install`, `make installcheck`.

MODULE_big = jobloop
OBJS = \
	src/jobloop.o \
	src/shared.o \
	src/api.o \
	src/kinds.o \
	src/logic.o \
	src/request.o \
	src/headers.o \
	src/http.o \
	src/guard.o \
	src/tls.o \
	src/allowlist.o \
	src/store.o \
	src/held.o \
	src/batch.o \
	src/limits.o \
	src/pause.o \
	src/admin.o \
	src/stats.o \
	src/retention.o \
	src/worker.o

EXTENSION = jobloop
DATA = $(wildcard sql/jobloop--*.sql)
REGRESS = kinds submit cancel guard privileges limits ops counts retention upgrade
# Isolation specs: test/isolation/specs/NAME.spec, expected output in test/isolation/expected/.
ISOLATION = claim cancel_step submit_claim
ISOLATION_OPTS = --inputdir=test/isolation --load-extension=jobloop

PG_CPPFLAGS = -I$(srcdir)/src -std=c11
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lcurl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every source file includes src/jobloop.h, whose structs live in shared memory: rebuild
# them all when it changes.  (PGXS tracks no header dependencies; a stale object built
# against an older WorkerSlot once wrote into the next slot's spinlock.)
$(OBJS) $(OBJS:.o=.bc): src/jobloop.h src/compat.h

# make dist: the PGXN release archive, jobloop-<version>.zip, of the committed tree (HEAD;
# commit first), its version the control file's default_version.  test/package/dist.sh
# checks that META.json validates and agrees with jobloop.control and sql/.
EXTVERSION = $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" $(EXTENSION).control)
.PHONY: dist
dist:
	git archive --format=zip --prefix=$(EXTENSION)-$(EXTVERSION)/ -o $(EXTENSION)-$(EXTVERSION).zip HEAD
	@echo "$(EXTENSION)-$(EXTVERSION).zip"
