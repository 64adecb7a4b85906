#!/usr/bin/env bash
#
# scripts/matrix.sh -- run the test suites once per PostgreSQL major version.
#
# scripts/run-tests.sh hands over to this script when JL_PG_VERSIONS (default: every
# version jobloop is tested on, "15 17 18") names more than this system's version, or
# another one.  For each version, in order:
#
#   - the one this Debian release ships (15 on Debian 12) runs natively:
#       JL_PG_VERSIONS=15 scripts/run-tests.sh SUITE...
#   - each other one runs in a chroot of the Debian release that ships it (17: Debian 13
#     "trixie", 18: sid), made with debootstrap from the Debian mirror this machine's apt
#     uses: minbase plus the packages scripts/lib.sh's jl_install_deps names for that
#     version.  It is created once under JL_CHROOT_DIR and reused while complete (about
#     100 s and 1.8 GB each).  For a run the chroot gets its own /proc, /sys (read-only)
#     and /dev/shm, and a fresh copy of the working tree in /opt/jobloop, where
#     run-tests.sh builds and tests as it does here.  A chroot shares the host's network,
#     so its clusters and mock API listen on free loopback ports like native ones.
#
# Each run prints its suites as usual; then one line per version and, last, the total:
#
#   ==> PostgreSQL 15 (native): 812 passed, 0 failed, 301 s
#   ==> PostgreSQL 17 (chroot trixie): 812 passed, 0 failed, 310 s
#   ==> PostgreSQL 18 (chroot sid): 812 passed, 0 failed, 305 s
#   2436 passed, 0 failed
#
# Exit status: 0 only if every version ran tests and none failed.
# Usage:  scripts/matrix.sh [SUITE...]      (the suites are run-tests.sh's)
# Env:    JL_PG_VERSIONS     versions to run, e.g. "17" or "15 18" (default "15 17 18")
#         JL_CHROOT_DIR      where the chroots live (default /var/cache/jobloop/chroots)
#         JL_DEBIAN_MIRROR   the Debian mirror for debootstrap (default: apt's for this
#                            release, else http://deb.debian.org/debian)
#         JL_KEEP, JL_VERBOSE and the other JL_* settings are passed to every run.
# Needs root (chroot, mount); installs debootstrap if it is missing.

set -uo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$JL_ROOT" || exit 1

JL_CHROOT_DIR=${JL_CHROOT_DIR:-/var/cache/jobloop/chroots}
read -r -a VERSIONS <<<"${JL_PG_VERSIONS:-$JL_PG_VERSIONS_TESTED}"
NATIVE=$(jl_debian_pg_version)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-matrix.XXXXXX") || exit 1
jl_on_exit rm -rf -- "$WORK"
START=$SECONDS
TOTAL_PASSED=0
TOTAL_FAILED=0
SUMMARY=()

# The Debian release whose postgresql-N packages a chroot for version N is made of.
codename_for() {
    case $1 in
        15) echo bookworm ;;
        17) echo trixie ;;
        18) echo sid ;;
        *) return 1 ;;
    esac
}

# The mirror this machine's apt fetches its own release from (debootstrap wants the
# archive root, which the other releases share).
debian_mirror() {
    local codename uri
    if [[ -n "${JL_DEBIAN_MIRROR:-}" ]]; then
        echo "$JL_DEBIAN_MIRROR"
        return
    fi
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    # shellcheck disable=SC2016  # apt's format fields, not shell
    uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
          | awk -v c="$codename" '$2 == c { print $1; exit }')
    echo "${uri:-http://deb.debian.org/debian}"
}

# Mount points at or under DIR, deepest first.
mounts_under() {
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

chroot_umount() {
    local root=$1 m
    for m in $(mounts_under "$root"); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || jl_log "could not unmount $m"
    done
    [[ -z "$(mounts_under "$root")" ]]
}

# shellcheck disable=SC2015  # the || is for a failure of any of them
chroot_mount() {
    local root=$1
    chroot_umount "$root" || return 1
    mount -t proc proc "$root/proc" \
        && mount -t sysfs -o ro sysfs "$root/sys" \
        && mount -t tmpfs -o mode=1777,size=4g shm "$root/dev/shm" \
        || { jl_log "could not mount /proc, /sys and /dev/shm in $root"; chroot_umount "$root"; return 1; }
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
}

# chroot_create ROOT CODENAME PACKAGE...: debootstrap into ROOT (which must not exist).
chroot_create() {
    local root=$1 codename=$2 mirror t0=$SECONDS
    shift 2
    mirror=$(debian_mirror)
    jl_log "creating the $codename chroot in $root from $mirror (once; about 100 s)"
    mkdir -p "$root.partial" || return 1
    if ! debootstrap --variant=minbase --include="$(IFS=,; echo "$*")" \
            "$codename" "$root.partial" "$mirror" >"$WORK/debootstrap-$codename.log" 2>&1; then
        jl_log "debootstrap $codename failed; the end of its log:"
        tail -n 30 "$WORK/debootstrap-$codename.log" >&2
        tail -n 30 "$root.partial/debootstrap/debootstrap.log" >&2 2>/dev/null
        return 1
    fi
    # Packages installed later (jl_install_deps) must not start their services in here.
    printf '#!/bin/sh\nexit 101\n' >"$root.partial/usr/sbin/policy-rc.d" \
        && chmod 0755 "$root.partial/usr/sbin/policy-rc.d" \
        && printf '%s\n' "$@" >"$root.partial/.jobloop-chroot" \
        && mv "$root.partial" "$root" \
        || return 1
    jl_log "created the $codename chroot in $((SECONDS - t0)) s"
}

# chroot_note_installed ROOT PACKAGE...: add to ROOT's package list those of PACKAGE...
# it lacks that are installed in it.
chroot_note_installed() {
    local root=$1 pkg
    shift
    for pkg in $(printf '%s\n' "$@" | grep -vxFf "$root/.jobloop-chroot"); do
        # shellcheck disable=SC2016  # dpkg-query's format, not shell
        [[ "$(chroot "$root" dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" == ii* ]] \
            && echo "$pkg" >>"$root/.jobloop-chroot"
    done
    return 0
}

# chroot_ready VERSION: the chroot for VERSION, created if missing or incomplete; prints
# its path.  The caller holds the lock.
chroot_ready() {
    local v=$1 codename root pkgs dir
    codename=$(codename_for "$v") || { jl_log "no Debian release ships PostgreSQL $v"; return 1; }
    root=$JL_CHROOT_DIR/$codename
    mapfile -t pkgs < <(JL_PG_VERSION=$v bash -c '. scripts/lib.sh && printf "%s\n" "${JL_DEPS[@]}"')
    (( ${#pkgs[@]} > 0 )) || { jl_log "no package list for PostgreSQL $v"; return 1; }
    # A chroot a run left unfinished (killed during debootstrap) is made again, and so is
    # one made without a package JL_DEPS now names: apt-get update may not work in there
    # (a sid mirror's Release file expires within days), debootstrap's --include does.
    # A package added to JL_DEPS that the chroot has anyway (pulled in by another) only
    # joins the list.
    [[ -f "$root/.jobloop-chroot" ]] && chroot_note_installed "$root" "${pkgs[@]}"
    for dir in "$root.partial" "$root"; do
        [[ -d "$dir" ]] || continue
        [[ "$dir" == "$root" && -f "$root/.jobloop-chroot" ]] \
            && [[ -z "$(printf '%s\n' "${pkgs[@]}" | grep -vxFf "$root/.jobloop-chroot")" ]] \
            && continue
        chroot_umount "$dir" || { jl_log "$dir is still mounted; not removing it"; return 1; }
        jl_log "removing the incomplete or outdated chroot $dir"
        rm -rf --one-file-system -- "$dir" || return 1
    done
    if [[ ! -d "$root" ]]; then
        if ! command -v debootstrap >/dev/null 2>&1; then
            jl_log "installing debootstrap"
            { apt-get -o DPkg::Lock::Timeout=600 -q update \
                && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y \
                       --no-install-recommends debootstrap </dev/null; } >&2 \
                || { jl_log "could not install debootstrap"; return 1; }
        fi
        chroot_create "$root" "$codename" "${pkgs[@]}" >&2 || return 1
    fi
    echo "$root"
}

# The JL_* settings the user gave, as NAME=VALUE, for a run in a chroot (not those that
# name this system's paths and versions).
passed_settings() {
    local name
    while IFS= read -r name; do
        case $name in
            JL_ROOT|JL_PGBIN|JL_PG_VERSION|JL_PG_VERSIONS|JL_CHROOT_DIR|JL_DEBIAN_MIRROR) ;;
            JL_*) printf '%s=%s\n' "$name" "${!name}" ;;
        esac
    done < <(compgen -e)
}

# run_in_chroot VERSION SUITE...: the suites of VERSION in its chroot; output on stdout.
run_in_chroot() {
    local v=$1 root lock fd rc=0 settings=()
    shift
    mkdir -p "$JL_CHROOT_DIR" || return 1
    lock=$JL_CHROOT_DIR/$(codename_for "$v").lock
    exec {fd}>"$lock" || return 1
    # One run at a time per chroot: they share its mounts.
    flock -w 7200 "$fd" || { jl_log "could not lock $lock"; exec {fd}>&-; return 1; }
    root=$(chroot_ready "$v") || { exec {fd}>&-; return 1; }
    if ! chroot_mount "$root"; then
        exec {fd}>&-
        return 1
    fi
    # The working tree as it is (like jl_build builds it), without .git or build products.
    # shellcheck disable=SC2015
    rm -rf -- "$root/opt/jobloop" && mkdir -p "$root/opt/jobloop" \
        && tar -C "$JL_ROOT" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
               --exclude=./results --exclude=./output_iso --exclude='./regression.*' -cf - . \
           | tar -C "$root/opt/jobloop" -xf - \
        || { jl_log "could not copy the tree into $root"; chroot_umount "$root"; exec {fd}>&-; return 1; }
    mapfile -t settings < <(passed_settings)
    chroot "$root" /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb ${CI:+CI="$CI"} "${settings[@]}" \
        JL_PG_VERSION="$v" JL_PG_VERSIONS="$v" JL_IN_CHROOT=1 \
        bash /opt/jobloop/scripts/run-tests.sh "$@" </dev/null {fd}>&- || rc=$?
    chroot_umount "$root" || true
    exec {fd}>&-
    return "$rc"
}

# The last "N passed, N failed" line of a run's output, as "PASSED FAILED".
run_counts() {
    awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { if (p != "") print p, f }' "$1"
}

for v in "${VERSIONS[@]}"; do
    out=$WORK/pg$v.out
    t0=$SECONDS
    echo
    if [[ "$v" == "$NATIVE" ]]; then
        where=native
        echo "################ PostgreSQL $v ($where)"
        JL_PG_VERSION=$v JL_PG_VERSIONS=$v bash "$JL_ROOT/scripts/run-tests.sh" "$@" </dev/null 2>&1 | tee "$out"
    elif ! codename_for "$v" >/dev/null; then
        where="not packaged by Debian"
        echo "################ PostgreSQL $v: no Debian release ships it; not run"
        : >"$out"
    else
        where="chroot $(codename_for "$v")"
        echo "################ PostgreSQL $v ($where)"
        # run_in_chroot unmounts at its end; this is for an interrupted run.
        jl_on_exit chroot_umount "$JL_CHROOT_DIR/${where#chroot }"
        run_in_chroot "$v" "$@" 2>&1 | tee "$out"
    fi
    read -r passed failed <<<"$(run_counts "$out")"
    if [[ -z "${passed:-}" ]]; then
        passed=0 failed=1     # it never got to its summary: setup failed
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    SUMMARY+=("$(printf '==> PostgreSQL %s (%s): %d passed, %d failed, %d s' \
                 "$v" "$where" "$passed" "$failed" "$((SECONDS - t0))")")
done

echo
printf '%s\n' "${SUMMARY[@]}"
echo "==> the matrix ran for $((SECONDS - START)) s"
echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
(( TOTAL_FAILED == 0 && TOTAL_PASSED > 0 ))
