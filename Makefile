# jobloop — PGXS build.  `make`, `make install`, `make installcheck`.

MODULE_big = jobloop
# src/engine: the HTTP side (libcurl multi, the outbound guard), built into the extension
# and into jobloop-worker alike.  src/server: what runs inside PostgreSQL -- the SQL API,
# the workers' turns (claims, business logic, limits, writes) and their transports.
ENGINE_OBJS = \
	src/engine/http.o \
	src/engine/headers.o \
	src/engine/guard.o \
	src/engine/allowlist.o \
	src/engine/tls_settings.o \
	src/engine/wire.o

OBJS = \
	$(ENGINE_OBJS) \
	src/server/jobloop.o \
	src/server/shared.o \
	src/server/api.o \
	src/server/kinds.o \
	src/server/logic.o \
	src/server/request.o \
	src/server/tls.o \
	src/server/guard_setting.o \
	src/server/store.o \
	src/server/held.o \
	src/server/batch.o \
	src/server/limits.o \
	src/server/pause.o \
	src/server/admin.o \
	src/server/stats.o \
	src/server/turn.o \
	src/server/remote.o \
	src/server/retention.o \
	src/server/worker.o

EXTENSION = jobloop
DATA = $(wildcard sql/jobloop--*.sql)
REGRESS = kinds submit cancel guard privileges limits ops counts retention external upgrade
# Isolation specs: test/isolation/specs/NAME.spec, expected output in test/isolation/expected/.
ISOLATION = claim cancel_step submit_claim retry_race
ISOLATION_OPTS = --inputdir=test/isolation --load-extension=jobloop

# The extension's version (the control file's default_version): http.c's User-Agent, and
# the name of `make dist`'s archive.
EXTVERSION = $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" $(EXTENSION).control)

PG_CPPFLAGS = -I$(srcdir)/src/server -I$(srcdir)/src/engine -std=c11 \
	-DJOBLOOP_ENGINE_VERSION='"$(EXTVERSION)"'
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lcurl

# jobloop-worker: the engine again, compiled with FRONTEND (src/engine/platform.h) into
# src/engine/*.fe.o, and the program's own files, linked with libpq, libpgcommon and
# libpgport (palloc, psprintf, StringInfo) and libcurl.  PGXS's PROGRAM cannot share
# sources with MODULE_big, hence these rules.  Installed into `pg_config --bindir`.
# libpgcommon and libpgport are named explicitly: from PostgreSQL 16 on, PGXS's
# libpq_pgport is libpq alone (they come with $(LIBS), which names every library the
# server was built with, most of them absent on a machine without their -dev packages).
WORKER = jobloop-worker
WORKER_OBJS = \
	src/worker/main.o \
	src/worker/options.o \
	src/worker/log.o \
	src/worker/settings.o \
	src/worker/calls.o \
	src/worker/session.o
ENGINE_FE_OBJS = $(ENGINE_OBJS:.o=.fe.o)
# (before PGXS, which reads EXTRA_CLEAN as it is included)
EXTRA_CLEAN = $(WORKER) $(WORKER_OBJS) $(ENGINE_FE_OBJS)

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every source file includes src/server/jobloop.h, whose structs live in shared memory: rebuild
# them all when it changes.  (PGXS tracks no header dependencies; a stale object built
# against an older WorkerSlot once wrote into the next slot's spinlock.)
$(OBJS) $(OBJS:.o=.bc): src/server/jobloop.h src/server/compat.h $(wildcard src/engine/*.h)

FE_CPPFLAGS = -DFRONTEND -I$(srcdir)/src/engine -I$(srcdir)/src/worker -I$(includedir) $(CPPFLAGS)

all: $(WORKER)

src/engine/%.fe.o: src/engine/%.c
	$(CC) $(CFLAGS) $(FE_CPPFLAGS) -c -o $@ $<

src/worker/%.o: src/worker/%.c
	$(CC) $(CFLAGS) $(FE_CPPFLAGS) -c -o $@ $<

$(WORKER): $(WORKER_OBJS) $(ENGINE_FE_OBJS)
	$(CC) $(CFLAGS) $^ $(LDFLAGS) $(LDFLAGS_EX) $(libpq_pgport) -L$(pkglibdir) -lpgcommon -lpgport -lcurl -o $@

$(WORKER_OBJS) $(ENGINE_FE_OBJS): $(wildcard src/engine/*.h src/worker/*.h)

.PHONY: install-worker uninstall-worker
install: install-worker
install-worker: $(WORKER)
	$(MKDIR_P) '$(DESTDIR)$(bindir)'
	$(INSTALL_PROGRAM) $(WORKER) '$(DESTDIR)$(bindir)/$(WORKER)'
uninstall: uninstall-worker
uninstall-worker:
	rm -f '$(DESTDIR)$(bindir)/$(WORKER)'

# make dist: the PGXN release archive, jobloop-<version>.zip, of the committed tree (HEAD;
# commit first), its version the control file's default_version.  test/package/dist.sh
# checks that META.json validates and agrees with jobloop.control and sql/.
.PHONY: dist
dist:
	git archive --format=zip --prefix=$(EXTENSION)-$(EXTVERSION)/ -o $(EXTENSION)-$(EXTVERSION).zip HEAD
	@echo "$(EXTENSION)-$(EXTVERSION).zip"
