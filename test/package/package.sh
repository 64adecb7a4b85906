#!/usr/bin/env bash
# test/package/package.sh -- the Debian package postgresql-$JL_PG_VERSION-jobloop: build it,
# install it, run a job loop from it.
#
# Prints TAP.  Run by run-tests.sh's "package" suite once per PostgreSQL version: natively
# for 15, and in the trixie (17) and sid (18) chroots of scripts/matrix.sh, so each .deb
# is built on the Debian release that ships its PostgreSQL, as Debian builds pg_cron's.
# Needs root (apt, dpkg).  About 30 s once the build dependencies are installed.
#
#   build     a clean copy of the tree (no build products, no .git), `pg_buildext
#             updatecontrol` (debian/control lists the versions of debian/pgversions that
#             this system supports: just its own), `dpkg-buildpackage -us -uc -b`:
#             exactly one postgresql-N-jobloop .deb, for this version
#   contents  the .deb holds jobloop.so in /usr/lib/postgresql/N/lib, jobloop.control and
#             every sql/jobloop--*.sql in /usr/share/postgresql/N/extension, and depends
#             on postgresql-N and libcurl
#   install   the files `make install` put there are removed first (`make uninstall`),
#             so only the package provides jobloop; `apt-get install ./the.deb`
#   run       a cluster with jobloop preloaded (the package's library: dpkg -S names the
#             package for the file the worker has mapped), CREATE EXTENSION gives
#             default_version, and 20 jobs of 3 steps against the mock API complete,
#             each (job, step) requested once
#   remove    `dpkg --purge` removes the files again
# At exit the package is purged and, if `make install` had installed jobloop before, it
# is installed again the same way, so the suites that follow find what they expect.
# shellcheck disable=SC2317  # functions run through jl_wait_for look unreachable
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"

[[ $EUID -eq 0 ]] || { echo "1..0 # SKIP needs root (apt-get, dpkg)"; exit 0; }
V=$JL_PG_VERSION
PKG=postgresql-$V-jobloop
PG_CONFIG_PATH=$JL_PGBIN/pg_config
cd "$JL_ROOT"

jl_install_deps debhelper dpkg-dev postgresql-server-dev-all >&2 \
    || tap_bail "could not install the build dependencies"
tap_plan 10

TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-package.XXXXXX")
jl_on_exit rm -rf -- "$TMP"
chmod 0755 "$TMP"
pkglibdir=$("$PG_CONFIG_PATH" --pkglibdir)
sharedir=$("$PG_CONFIG_PATH" --sharedir)
control_version=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" jobloop.control)

# A package left behind by an interrupted run would own the files; start without it.
if dpkg-query -W -f='${db:Status-Abbrev}' "$PKG" 2>/dev/null | grep -q '^[ih]'; then
    dpkg --purge "$PKG" >&2 || tap_bail "could not purge the $PKG left by an earlier run"
fi
made_install=
[[ -f "$pkglibdir/jobloop.so" ]] && made_install=1

restore() {
    dpkg --purge "$PKG" >/dev/null 2>&1 || true
    if [[ -n "$made_install" ]]; then
        make -s -C "$JL_ROOT" PG_CONFIG="$PG_CONFIG_PATH" install >/dev/null 2>&1 \
            || jl_log "could not make install jobloop again"
    fi
}
jl_on_exit restore

# ---- build ------------------------------------------------------------------------------
t0=$SECONDS
mkdir -p "$TMP/src/jobloop"
tar -C "$JL_ROOT" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
    --exclude='*.zip' --exclude=./results --exclude=./output_iso --exclude=./log \
    --exclude=./tmp_check --exclude='./regression.*' --exclude=./bench/results -cf - . \
    | tar -C "$TMP/src/jobloop" -xf -
rc=0
( cd "$TMP/src/jobloop" && pg_buildext updatecontrol && dpkg-buildpackage -us -uc -b ) \
    >"$TMP/build.log" 2>&1 || rc=$?
mapfile -t debs < <(cd "$TMP/src" && ls -- postgresql-*-jobloop_*.deb 2>/dev/null)
if (( ${#debs[@]} != 1 )) || [[ "${debs[0]}" != "${PKG}_"*.deb ]]; then
    (( rc != 0 )) || rc=1
fi
tap_ok "$rc" "dpkg-buildpackage builds one package, $PKG (${debs[*]:-none}), in $((SECONDS - t0)) s" \
    "$(tail -n 40 "$TMP/build.log")"
(( rc == 0 )) || tap_bail "no package to test"
deb=$TMP/src/${debs[0]}

# ---- contents ---------------------------------------------------------------------------
listing=$(dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's#^\./#/#')
missing=()
for f in "$pkglibdir/jobloop.so" "$sharedir/extension/jobloop.control" sql/jobloop--*.sql \
         "$("$PG_CONFIG_PATH" --bindir)/jobloop-worker"; do
    [[ "$f" == sql/* ]] && f=$sharedir/extension/${f#sql/}
    grep -qxF "$f" <<<"$listing" || missing+=("$f")
done
tap_ok "$(( ${#missing[@]} > 0 ))" "the package holds jobloop.so, the control file, every sql/jobloop--*.sql and jobloop-worker for PostgreSQL $V" \
    "missing: ${missing[*]:-}"$'\n'"$listing"
depends=$(dpkg-deb -f "$deb" Depends)
rc=0
grep -qE "(^|, )postgresql-$V( |,|$)" <<<"$depends" && grep -qE '(^|, )libcurl[0-9t64-]* ' <<<"$depends" || rc=1
tap_ok "$rc" "it depends on postgresql-$V and libcurl ($depends)"

# ---- install ----------------------------------------------------------------------------
rc=0
make -s -C "$JL_ROOT" PG_CONFIG="$PG_CONFIG_PATH" uninstall >"$TMP/uninstall.log" 2>&1 || rc=$?
left=$(ls "$pkglibdir"/jobloop* "$sharedir"/extension/jobloop* 2>/dev/null || true)
[[ -z "$left" ]] || rc=1
tap_ok "$rc" "make uninstall leaves no jobloop file in $pkglibdir and $sharedir/extension" \
    "$left$(cat "$TMP/uninstall.log")"

rc=0
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y \
    --no-install-recommends "$deb" </dev/null >"$TMP/install.log" 2>&1 || rc=$?
owner=$(dpkg -S "$pkglibdir/jobloop.so" 2>/dev/null | cut -d: -f1)
[[ "$owner" == "$PKG" ]] || rc=1
tap_ok "$rc" "apt-get install ./${deb##*/} installs it; dpkg -S names $PKG for jobloop.so" \
    "$(tail -n 20 "$TMP/install.log")"

# ---- run: a job loop from the package ----------------------------------------------------
jl_cluster_start "jobloop.workers = 2" >&2 || tap_bail "could not start a cluster with the package's jobloop"
jl_mock_start >&2 || tap_bail "could not start the mock API"
q() { jl_psql -At -c "$1"; }

worker_maps_package_lib() {
    local pid
    for pid in $(pgrep -f 'jobloop worker' || true); do
        grep -qF "$pkglibdir/jobloop.so" "/proc/$pid/maps" 2>/dev/null && return 0
    done
    return 1
}
rc=0
jl_wait_for 30 worker_maps_package_lib || rc=1
tap_ok "$rc" "the workers run the package's $pkglibdir/jobloop.so" "$(pgrep -af 'jobloop worker' || true)"

tap_is "$(q "CREATE EXTENSION jobloop; SELECT extversion FROM pg_extension WHERE extname = 'jobloop'" 2>&1)" \
    "$control_version" "CREATE EXTENSION jobloop installs $control_version from the package's scripts"

jl_psql >/dev/null <<SQL || tap_bail "could not create the job kind"
CREATE SCHEMA pk;
CREATE FUNCTION pk.req(s jsonb) RETURNS jsonb LANGUAGE sql RETURN jsonb_build_object(
    'url', '$JL_MOCK_URL/delay?s=0.02&n=' || coalesce(s->>'n', '0'));
CREATE FUNCTION pk.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE sql
    RETURN s || jsonb_build_object('n', coalesce((s->>'n')::int, 0) + 1);
CREATE FUNCTION pk.done(s jsonb) RETURNS boolean LANGUAGE sql RETURN (s->>'n')::int >= 3;
SELECT jobloop.create_kind('pk', 'pk.req(jsonb)', 'pk.step(jsonb,jsonb)', 'pk.done(jsonb)');
SELECT count(jobloop.submit('pk', '{}', 'shop-' || g % 3)) FROM generate_series(1, 20) g;
SQL
all_done() { [[ "$(q "SELECT count(*) FROM jobloop.jobs WHERE status IN ('completed', 'failed', 'cancelled')")" == 20 ]]; }
jl_wait_for 60 all_done || true
tap_is "$(q "SELECT status || ' ' || count(*) || ' ' || min((state->>'n')::int) || '-' || max((state->>'n')::int)
             FROM jobloop.jobs GROUP BY status ORDER BY status")" "completed 20 3-3" \
    "20 jobs of 3 steps run by the package's workers complete"
idem_keys=$(grep -oE '"jobloop-[0-9a-f-]{36}-[0-9]+"' "$JL_MOCK_LOG" || true)
tap_is "$(wc -l <<<"$idem_keys" | tr -d ' ') $(sort -u <<<"$idem_keys" | wc -l | tr -d ' ')" "60 60" \
    "the mock API got each (job, step) once: 60 requests, 60 Idempotency-Keys"

jl_mock_stop
jl_cluster_stop

# ---- remove -------------------------------------------------------------------------------
rc=0
dpkg --purge "$PKG" >"$TMP/purge.log" 2>&1 || rc=$?
left=$(ls "$pkglibdir"/jobloop* "$sharedir"/extension/jobloop* 2>/dev/null || true)
[[ -z "$left" ]] || rc=1
tap_ok "$rc" "dpkg --purge $PKG removes its files" "$left$(cat "$TMP/purge.log")"

tap_done
