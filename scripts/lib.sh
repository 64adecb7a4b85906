# shellcheck shell=bash
#
# scripts/lib.sh -- shared shell helpers for jobloop's entry points, test suites and bench.
#
# Source it (never execute it):   . "$(dirname "$0")/lib.sh"   (or scripts/lib.sh from the root)
#
# It gives every script the same way to install dependencies, build the extension, run a
# throw-away PostgreSQL cluster and the nginx mock API on loopback, wait for things,
# and clean up.  Written for a fresh Debian 12 run as root, interactively or in CI
# (CI=true, no stdin), and safe under `set -euo pipefail`: every function checks its own
# steps and returns non-zero on failure, so it also behaves when called from `if`/`||`
# (where bash disables errexit inside the function).
#
# Interface (other scripts code against these names):
#   JL_ROOT                          repo root, exported
#   JL_PG_VERSION                    the PostgreSQL major version to build and test against,
#                                    exported; default: the one this Debian release ships
#                                    (15 on Debian 12, 17 on 13, 18 on sid)
#   JL_PGBIN                         its bin directory, /usr/lib/postgresql/$JL_PG_VERSION/bin
#   jl_matrix_wanted                 JL_PG_VERSIONS (default "15 17 18") asks for other or more
#                                    versions than JL_PG_VERSION: scripts/matrix.sh runs them
#   jl_log MSG...                    "==> MSG" on stderr
#   jl_die MSG...                    jl_log, then exit 1
#   jl_install_deps [PKG...]         apt-get install what is missing; stop default services
#   jl_build                         make && make install (PGXS, PostgreSQL $JL_PG_VERSION)
#   jl_free_port                     print a free TCP port on 127.0.0.1 (and 127.0.0.2)
#   jl_cluster_start [CONF_LINE...]  temp cluster; exports JL_PGDATA PGPORT PGHOST PGUSER
#                                    PGDATABASE JL_PGLOG JL_PGDIR
#   jl_cluster_restart_immediate     crash-stop (-m immediate) and start again
#   jl_cluster_stop                  fast stop (keeps the data dir until exit)
#   jl_psql [ARGS...]                psql to the temp cluster, ON_ERROR_STOP, no psqlrc
#   jl_wait_for SECONDS CMD...       poll CMD every 0.1 s until it succeeds or time runs out
#   jl_mock_start / jl_mock_stop     nginx mock API; exports JL_MOCK_PORT JL_MOCK_URL
#                                    JL_MOCK_URL2 JL_MOCK_DIR JL_MOCK_LOG JL_MOCK_LOG2
#   jl_mock_tls                      a second nginx: the mock over HTTPS and HTTP/2, with a
#                                    throw-away CA and certificates made by openssl (good,
#                                    expired, wrong host, unknown CA, client); exports
#                                    JL_TLS_DIR JL_TLS_CERTS JL_TLS_LOG and JL_TLS_PORT_*
#                                    (see the function)
#   jl_on_exit CMD [ARG...]          add a cleanup command (run in reverse order at exit)
#   jl_sanitize_findings [LOG...]    with JL_SANITIZE=address: print the ASan reports and the
#                                    crashes in LOGs; sets JL_SANITIZE_FOUND (0 = clean)
#
# JL_SANITIZE=address (with JL_SANITIZE_DIR, both exported) makes jl_build and the cluster
# functions build and run an AddressSanitizer variant of jobloop instead, so every suite
# built on this file runs under ASan unchanged (see "AddressSanitizer" below).
#
# Cleanup: lib.sh installs ONE exit trap that runs the registered cleanups last-in
# first-out (nginx and the cluster are stopped, temp dirs removed).  A script that needs
# its own cleanup must use jl_on_exit, not `trap ... EXIT` (that would replace ours).
# With JL_KEEP=1 the cluster, the mock and their dirs are left alone and their locations
# printed, for post-mortem debugging.
#
# Start clusters and the mock from the main shell, not inside $(...) or a pipeline: the
# cleanup list lives in the shell that registered it, and a daemon started inside $(...)
# can keep that substitution's pipe open.

# Sourcing twice must not reset the cleanup list of the first load.
if [[ -n "${_JL_LIB_LOADED:-}" ]]; then
    return 0
fi
_JL_LIB_LOADED=1

JL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export JL_ROOT

# The PostgreSQL major version that this Debian release ships (what `postgresql` depends on).
jl_debian_pg_version() {
    local codename
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    case $codename in
        trixie) echo 17 ;;
        forky|sid) echo 18 ;;
        *) echo 15 ;;        # bookworm (Debian 12), and the default elsewhere
    esac
}

JL_PG_VERSION=${JL_PG_VERSION:-$(jl_debian_pg_version)}
[[ "$JL_PG_VERSION" =~ ^[1-9][0-9]$ ]] || {
    echo "==> ERROR: JL_PG_VERSION='$JL_PG_VERSION' is not a PostgreSQL major version" >&2
    exit 1
}
export JL_PG_VERSION

# Debian's server binaries live here; /usr/bin/psql etc. are pg_wrapper shims that pick a
# version by guessing, so we always call the versioned binaries directly.
JL_PGBIN=/usr/lib/postgresql/$JL_PG_VERSION/bin
export JL_PGBIN

# Packages a fresh Debian needs to build, test and demo jobloop (iproute2 and procps: the
# suites' ss and pgrep; a minimal system lacks them; debhelper, dpkg-dev and
# postgresql-server-dev-all (pg_buildext): the package suite's Debian package build;
# openssl: the TLS mock's throw-away certificates, jl_mock_tls).
JL_DEPS=("postgresql-$JL_PG_VERSION" "postgresql-server-dev-$JL_PG_VERSION"
         "postgresql-$JL_PG_VERSION-pgtap"
         libtap-parser-sourcehandler-pgtap-perl libcurl4-openssl-dev
         nginx libnginx-mod-http-echo build-essential curl iproute2 procps
         debhelper dpkg-dev postgresql-server-dev-all openssl)

# The versions the test command runs by default (JL_PG_VERSIONS overrides): each on the
# Debian release that ships it, natively or in a chroot (scripts/matrix.sh).
JL_PG_VERSIONS_TESTED="15 17 18"

# Does the test command run other versions than $JL_PG_VERSION, or more?
jl_matrix_wanted() {
    local wanted
    read -r -a wanted <<<"${JL_PG_VERSIONS:-$JL_PG_VERSIONS_TESTED}"
    [[ "${wanted[*]}" != "$JL_PG_VERSION" ]]
}

# ---------------------------------------------------------------------------------------
# Logging

jl_log() {
    printf '==> %s\n' "$*" >&2
}

jl_die() {
    jl_log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------
# Cleanup registry: one EXIT trap, a list of commands.

_JL_CLEANUPS=()              # each entry is a shell-quoted command line
_JL_OWNER_PID=$BASHPID       # subshells inherit the list but must not run it

jl_on_exit() {
    local cmd
    printf -v cmd '%q ' "$@"
    _JL_CLEANUPS+=("$cmd")
}

_jl_run_cleanups() {
    local rc=$? i
    # A cleanup must never abort the others.
    set +e
    if [[ "$BASHPID" == "$_JL_OWNER_PID" ]]; then
        for (( i = ${#_JL_CLEANUPS[@]} - 1; i >= 0; i-- )); do
            eval "${_JL_CLEANUPS[i]}"
        done
        _JL_CLEANUPS=()
    fi
    return "$rc"
}

trap _jl_run_cleanups EXIT
# Turn Ctrl-C / kill / a hang-up into a normal exit so the EXIT trap runs.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP     # a closed terminal: clean up too

# True if PID exists and is not a zombie (kill -0 succeeds on zombies, which a daemon
# whose adoptive parent has not reaped it yet can be for a moment).
_jl_pid_alive() {
    local pid=$1 stat
    [[ -n "$pid" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # Field 3 is the state; field 2 (comm) may contain spaces, so cut after the last ')'.
    stat=${stat##*) }
    [[ "${stat:0:1}" != Z ]]
}

_jl_pid_gone() {
    ! _jl_pid_alive "$1"
}

# rm -rf with a guard against empty or suspicious paths.
_jl_rm_dir() {
    local dir=$1
    [[ -n "$dir" && "$dir" != / && -d "$dir" ]] || return 0
    if [[ "${JL_KEEP:-}" == 1 ]]; then
        jl_log "JL_KEEP=1: kept $dir"
        return 0
    fi
    rm -rf -- "$dir"
}

# Run a command as root: directly when we are root, else through sudo.
_jl_as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        jl_log "need root (or sudo) to run: $*"
        return 1
    fi
}

# Run a command as the OS user that owns the cluster.  initdb and postgres refuse to run
# as root, so root hands over to `postgres`; anyone else runs it as themselves.
# cd / first: postgres cannot read root's cwd, and initdb/pg_ctl warn about it.
_jl_as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# ---------------------------------------------------------------------------------------
# Waiting: the only way scripts wait for something.

# Seconds (integer or decimal, e.g. 0.5) to microseconds, pure bash.
_jl_seconds_to_us() {
    local s=$1 int frac=
    [[ "$s" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { jl_log "not a number of seconds: '$s'"; return 1; }
    int=${s%%.*}
    [[ "$s" == *.* ]] && frac=${s#*.}
    frac="${frac}000000"
    echo $(( 10#$int * 1000000 + 10#${frac:0:6} ))
}

_jl_now_us() {
    local t=${EPOCHREALTIME/,/.}    # "seconds.micros" (bash >= 5; some locales use ',')
    echo $(( 10#${t%.*} * 1000000 + 10#${t#*.} ))
}

# jl_wait_for DEADLINE_SECONDS CMD [ARG...]
# Re-runs CMD (its output discarded) every 0.1 s until it exits 0 (return 0) or the
# deadline passes (message, return 1).  CMD is a command and arguments, not a string;
# wrap pipelines in a function or `bash -c`.
jl_wait_for() {
    if [[ $# -lt 2 ]]; then
        jl_log "usage: jl_wait_for DEADLINE_SECONDS CMD [ARG...]"
        return 2
    fi
    local timeout=$1 us deadline
    shift
    us=$(_jl_seconds_to_us "$timeout") || return 2
    deadline=$(( $(_jl_now_us) + us ))
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if (( $(_jl_now_us) >= deadline )); then
            jl_log "timed out after ${timeout}s waiting for: $*"
            return 1
        fi
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------------------
# Dependencies and build

_jl_pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == "ii"* ]]
}

jl_install_deps() {
    local pkg missing=()
    for pkg in "${JL_DEPS[@]}" "$@"; do
        _jl_pkg_installed "$pkg" || missing+=("$pkg")
    done
    if (( ${#missing[@]} > 0 )); then
        jl_log "installing: ${missing[*]}"
        # Lock::Timeout: wait for another apt/dpkg (unattended-upgrades, a provisioning
        # step) instead of failing at once on the lock.
        _jl_as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=600 -q update \
            || { jl_log "apt-get update failed"; return 1; }
        _jl_as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends \
            "${missing[@]}" </dev/null \
            || { jl_log "apt-get install failed"; return 1; }
    fi
    _jl_stop_default_services
    return 0
}

# The packages may create and start a cluster N/main on 5432 and an nginx on port 80.
# We never use them (every test runs its own on a free loopback port); stop them so they
# take no memory, CPU or ports.  Best effort: failures are ignored.
_jl_stop_default_services() {
    if command -v pg_lsclusters >/dev/null 2>&1 \
        && pg_lsclusters -h 2>/dev/null | awk -v v="$JL_PG_VERSION" '$1==v && $2=="main" && $4=="online"' | grep -q .; then
        jl_log "stopping the package's default cluster $JL_PG_VERSION/main (jobloop does not use it)"
        _jl_as_root pg_ctlcluster "$JL_PG_VERSION" main stop >/dev/null 2>&1 || true
    fi
    local pid
    pid=$(cat /run/nginx.pid 2>/dev/null || true)
    if _jl_pid_alive "$pid"; then
        jl_log "stopping the package's default nginx service (jobloop does not use it)"
        if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
            _jl_as_root systemctl stop nginx >/dev/null 2>&1 || true
        else
            _jl_as_root kill -QUIT "$pid" >/dev/null 2>&1 || true
        fi
    fi
    return 0
}

jl_build() {
    local make_args=(-C "$JL_ROOT" PG_CONFIG="$JL_PGBIN/pg_config")
    if [[ -n "${JL_SANITIZE:-}" ]]; then
        _jl_build_asan
        return
    fi
    jl_log "building jobloop"
    make -s -j"$(nproc 2>/dev/null || echo 2)" "${make_args[@]}" \
        || { jl_log "build failed"; return 1; }
    jl_log "installing jobloop into $("$JL_PGBIN/pg_config" --pkglibdir)"
    _jl_as_root make -s "${make_args[@]}" install >/dev/null \
        || { jl_log "make install failed"; return 1; }
}

# ---------------------------------------------------------------------------------------
# Ports

# Is PORT in use on this host in any TCP state (listening, bound, TIME_WAIT...)?
# /proc/net/tcp{,6} needs no extra package (ss/netstat may not be installed).
_jl_port_used() {
    local hex
    printf -v hex ':%04X ' "$1"
    grep -qs -- "$hex" /proc/net/tcp /proc/net/tcp6 && return 0
    # Belt and braces: something answers on it (e.g. /proc not mounted as expected).
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    return 1
}

jl_free_port() {
    # Below the kernel's ephemeral range (32768-60999 by default): a test that opens
    # thousands of connections takes ephemeral ports that a listener may want.
    local i port low=32768 range
    range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null) && low=${range%%[[:space:]]*}
    (( low > 12000 )) || low=32768
    for (( i = 0; i < 200; i++ )); do
        port=$(( 10000 + (RANDOM * 32768 + RANDOM) % (low - 10000) ))
        if ! _jl_port_used "$port"; then
            echo "$port"
            return 0
        fi
    done
    jl_log "no free port found in 10000-$((low - 1))"
    return 1
}

# ---------------------------------------------------------------------------------------
# PostgreSQL cluster

jl_cluster_start() {
    local dir data log attempt port
    [[ -x "$JL_PGBIN/initdb" ]] || { jl_log "PostgreSQL $JL_PG_VERSION is not installed (run jl_install_deps)"; return 1; }
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        jl_log "OS user 'postgres' missing (the postgresql-common package creates it)"
        return 1
    fi

    if [[ -n "${JL_SANITIZE:-}" ]]; then
        _jl_asan_ready || return 1
    fi

    dir=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-pg.XXXXXX") || return 1
    jl_on_exit _jl_rm_dir "$dir"
    if [[ -n "${JL_SANITIZE:-}" ]]; then
        # Runs after the cluster's stop (registered below) and before $dir is removed.
        jl_on_exit _jl_asan_save_log "$dir" "$JL_SANITIZE_DIR"
    fi
    data=$dir/data
    log=$dir/server.log
    if [[ $EUID -eq 0 ]]; then
        chown postgres:postgres "$dir" || return 1
        chmod 0755 "$dir"     # root (tests) reads the log; 0700 stays on data/
        _jl_as_pg test -w "$dir" || {
            jl_log "user postgres cannot write $dir (is ${TMPDIR:-/tmp} traversable?)"
            return 1
        }
    fi

    # C.UTF-8 is always present on Debian 12 (libc-bin); fall back to C elsewhere.
    # --no-sync: a throw-away cluster does not need initdb's fsyncs (crash tests crash
    # the server, never the OS).
    if ! _jl_as_pg "$JL_PGBIN/initdb" -D "$data" --auth=trust -E UTF8 --locale=C.UTF-8 \
            --no-sync >"$dir/initdb.log" 2>&1; then
        rm -rf -- "$data"
        _jl_as_pg "$JL_PGBIN/initdb" -D "$data" --auth=trust -E UTF8 --locale=C \
            --no-sync >"$dir/initdb.log" 2>&1 \
            || { jl_log "initdb failed:"; cat "$dir/initdb.log" >&2; return 1; }
    fi

    # Create the workers' database before the first start (single-user mode, no
    # listener), so the workers find it at once instead of failing and restarting.
    echo "CREATE DATABASE jobloop" | _jl_as_pg "$JL_PGBIN/postgres" --single -D "$data" postgres \
        >"$dir/createdb.log" 2>&1 \
        || { jl_log "CREATE DATABASE jobloop failed:"; cat "$dir/createdb.log" >&2; return 1; }

    # Registered before starting: if pg_ctl gives up waiting, the server may still come up.
    jl_on_exit _jl_cluster_cleanup "$data"

    # A free port can be taken between the check and the bind; retry with another one.
    for attempt in 1 2 3; do
        port=$(jl_free_port) || return 1
        # postgresql.conf: later settings win, so the caller's lines go last; and on a
        # retry the new port line overrides the previous attempt's.
        {
            echo ""
            echo "# --- added by scripts/lib.sh (jl_cluster_start) ---"
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $port"
            echo "unix_socket_directories = '$dir'"
            echo "max_connections = 200"
            echo "logging_collector = off"
            echo "log_line_prefix = '%m [%p] %b '"
            echo "shared_preload_libraries = 'jobloop'"
            echo "jobloop.database = 'jobloop'"
            echo "jobloop.workers = 1"
            echo "jobloop.allowed_hosts = '127.0.0.1'"
            if (( $# > 0 )); then
                echo "# --- caller's settings ---"
                printf '%s\n' "$@"
            fi
        } >>"$data/postgresql.conf" || return 1

        if _jl_pg_ctl_start "$data" "$log" >"$dir/pg_ctl.out" 2>&1; then
            break
        fi
        if (( attempt < 3 )) && grep -q 'could not bind\|Address already in use' "$log" 2>/dev/null; then
            jl_log "port $port was taken, retrying with another"
            continue
        fi
        jl_log "PostgreSQL failed to start: $(tail -n 1 "$dir/pg_ctl.out" 2>/dev/null); last lines of $log:"
        tail -n 20 "$log" >&2 2>/dev/null
        return 1
    done

    export JL_PGDIR=$dir JL_PGDATA=$data JL_PGLOG=$log
    export PGPORT=$port PGHOST=127.0.0.1 PGUSER=postgres PGDATABASE=jobloop

    jl_log "PostgreSQL $JL_PG_VERSION up on 127.0.0.1:$PGPORT (data $JL_PGDATA, log $JL_PGLOG)"
    if [[ -n "${JL_SANITIZE:-}" ]]; then
        jl_log "  under AddressSanitizer (jobloop from $JL_SANITIZE_DIR/install, reports to $JL_SANITIZE_DIR/reports)"
    fi
}

# pg_ctl start DATA LOG: the system's postgres, or with JL_SANITIZE=address the private
# installation's, with the ASan runtime preloaded (jobloop.so is instrumented and postgres
# is not, so the runtime must be loaded first) and its options.
_jl_pg_ctl_start() {
    local data=$1 log=$2 runtime
    if [[ -z "${JL_SANITIZE:-}" ]]; then
        _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$data" -l "$log" -w -t 60 start
        return
    fi
    runtime=$(_jl_asan_runtime) || return 1
    _jl_as_pg env LD_PRELOAD="$runtime $(_jl_asan_shim)${LD_PRELOAD:+ $LD_PRELOAD}" \
        ASAN_OPTIONS="$(_jl_asan_options "${data%/data}")" \
        "$JL_PGBIN/pg_ctl" -D "$data" -l "$log" -w -t 60 -p "$(_jl_asan_bindir)/postgres" start
}

# Crash-stop the cluster (no shutdown checkpoint, children get SIGQUIT) and start it
# again; recovery replays WAL.  The log keeps growing in the same file.
jl_cluster_restart_immediate() {
    : "${JL_PGDATA:?jl_cluster_start first}"
    _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$JL_PGDATA" -m immediate -w stop >/dev/null \
        || { jl_log "immediate stop failed"; return 1; }
    _jl_pg_ctl_start "$JL_PGDATA" "$JL_PGLOG" >/dev/null \
        || { jl_log "restart failed; last lines of $JL_PGLOG:"; tail -n 20 "$JL_PGLOG" >&2; return 1; }
}

jl_cluster_stop() {
    : "${JL_PGDATA:?jl_cluster_start first}"
    [[ -f "$JL_PGDATA/postmaster.pid" ]] || return 0
    _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$JL_PGDATA" -m fast -w stop >/dev/null
}

_jl_cluster_cleanup() {
    local data=$1
    [[ -f "$data/postmaster.pid" ]] || return 0
    if [[ "${JL_KEEP:-}" == 1 ]]; then
        local port
        port=$(sed -n 4p "$data/postmaster.pid" 2>/dev/null)
        jl_log "JL_KEEP=1: cluster left running on 127.0.0.1:$port, data $data, log ${data%/data}/server.log"
        jl_log "  stop it with: runuser -u postgres -- $JL_PGBIN/pg_ctl -D $data stop"
        return 0
    fi
    _jl_as_pg "$JL_PGBIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
}

jl_psql() {
    : "${PGPORT:?no cluster: call jl_cluster_start first}"
    "$JL_PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres \
        -d "${PGDATABASE:-jobloop}" "$@"
}

# ---------------------------------------------------------------------------------------
# AddressSanitizer: JL_SANITIZE=address, JL_SANITIZE_DIR=<absolute directory>
#
# With both exported, the functions above build and run jobloop under ASan, so any script
# built on this file (test/suites/*.sh, test/fault/fault.sh, ...) runs under it unchanged:
#
#   jl_build          builds jobloop with -fsanitize=address in a copy of the tree (PGXS
#                     keeps an up-to-date object whatever flags built it, so the two builds
#                     must not share a directory), and installs it with DESTDIR into
#                     $JL_SANITIZE_DIR/install: a private PostgreSQL whose postgres binary
#                     is a copy and whose lib and share entries are links to the system's,
#                     except jobloop's own files.  PostgreSQL finds $libdir and its share
#                     directory relative to its own binary, so a cluster started from the
#                     copy loads the ASan build and the system installation is never
#                     touched: nothing to restore afterwards, even after an interrupted run,
#                     and a normal cluster started meanwhile still loads the normal build.
#   jl_cluster_start  (and jl_cluster_restart_immediate) start the postmaster from the copy
#                     with the ASan runtime preloaded; each report goes to
#                     $JL_SANITIZE_DIR/reports/asan-<cluster>.<pid>, and at exit the server
#                     log is copied to $JL_SANITIZE_DIR/logs/<script>-<cluster>.log.
#   jl_sanitize_findings [LOG...]  judges them (by default every saved log).
#
# After a report ASan ends the process with exit code 1 (abort_on_error=0: no core dump of
# a process with a 20 TB shadow map), so the report files, not exit statuses, are the
# evidence.  (The postmaster still restarts every process, as after a crash: the child
# left without its shared-memory cleanup.)  A fatal signal (SEGV, BUS, FPE, ILL, ABRT,
# so also a PANIC) becomes a report with its stack too, in any process of the cluster.

# The ASan runtime of the compiler that builds jobloop (gcc's libasan.so.N).
_jl_asan_runtime() {
    local cc lib
    cc=$("$JL_PGBIN/pg_config" --cc 2>/dev/null) || cc=gcc
    cc=${cc%% *}
    lib=$("$cc" -print-file-name=libasan.so 2>/dev/null) || lib=
    lib=$(readlink -f "$lib" 2>/dev/null) || lib=
    [[ -f "$lib" ]] || { jl_log "the ASan runtime (libasan.so of $cc) is not installed"; return 1; }
    echo "$lib"
}

# The second library to preload, after the runtime.  A preloaded library's constructor runs
# after those of the libraries the program links, so ASan initialises lazily, in the first
# malloc() of another constructor: p11-kit's (linked through libldap and gnutls) calls it
# from newlocale() with glibc's setlocale lock write-held.  ASan's initialisation looks up
# swift_demangle with dlsym(); when that fails, dlerror() translates the message, which
# takes the same lock as a reader and, being the writer already, corrupts it -- every
# PostgreSQL program then hangs at its next setlocale() or bindtextdomain().  Defining
# swift_demangle (a demangler that demangles nothing: ASan then demangles as before) makes
# the lookup succeed, and the initialisation takes no lock.
_jl_asan_shim() {
    echo "$JL_SANITIZE_DIR/install/libjl_asan_swift_stub.so"
}

_jl_asan_build_shim() {
    local cc out
    cc=$("$JL_PGBIN/pg_config" --cc 2>/dev/null) || cc=gcc
    out=$(_jl_asan_shim)
    "${cc%% *}" -shared -fPIC -O2 -Wall -Werror -x c -o "$out" - <<'EOF' \
        || { jl_log "could not build $out"; return 1; }
#include <stddef.h>
#include <stdint.h>
char *swift_demangle(const char *name, size_t len, char *out, size_t *outlen, uint32_t flags);
char *swift_demangle(const char *name, size_t len, char *out, size_t *outlen, uint32_t flags)
{
    (void) name; (void) len; (void) out; (void) outlen; (void) flags;
    return NULL;
}
EOF
}

# The private installation's bin directory (the system's path, under install/).
_jl_asan_bindir() {
    echo "$JL_SANITIZE_DIR/install$("$JL_PGBIN/pg_config" --bindir)"
}

# ASAN_OPTIONS for the cluster in directory DIR.
#   detect_leaks=0         backends free by resetting memory contexts and by exiting: noise
#   abort_on_error=0       exit(1) after a report, no core
#   log_path               one file per process that reports, named after the cluster
#   handle_*=1             a fatal signal leaves a report with its stack
#   print_cmdline=1        the report names the process ("postgres: jobloop worker 1")
#   quarantine_size_mb=64  use-after-free window per process (256 by default; dozens of
#                          backends run at once)
_jl_asan_options() {
    local dir=$1
    local opts=(detect_leaks=0 abort_on_error=0 disable_coredump=1
                "log_path=$JL_SANITIZE_DIR/reports/asan-${dir##*/}"
                handle_segv=1 handle_sigbus=1 handle_sigfpe=1 handle_sigill=1 handle_abort=1
                print_cmdline=1 quarantine_size_mb=64)
    local IFS=:
    echo "${opts[*]}"
}

# JL_SANITIZE is set: is it usable?
_jl_asan_check_env() {
    if [[ "$JL_SANITIZE" != address ]]; then
        jl_log "JL_SANITIZE='$JL_SANITIZE': only 'address' is supported"
        return 1
    fi
    if [[ "${JL_SANITIZE_DIR:-}" != /* ]]; then
        jl_log "JL_SANITIZE=address needs JL_SANITIZE_DIR, an absolute directory (have '${JL_SANITIZE_DIR:-}')"
        return 1
    fi
}

# Ready to start a cluster under ASan: jl_build has installed into JL_SANITIZE_DIR.
_jl_asan_ready() {
    _jl_asan_check_env || return 1
    [[ -x "$(_jl_asan_bindir)/postgres" && -f "$(_jl_asan_shim)" ]] || {
        jl_log "no ASan build in $JL_SANITIZE_DIR (run jl_build with JL_SANITIZE=address first)"
        return 1
    }
    _jl_asan_runtime >/dev/null
}

# Link each entry of SRC into DST that DST lacks, except jobloop's own files; the
# directories named in DIRS... are created and filled the same way instead of linked.
_jl_asan_link_missing() {
    local src=$1 dst=$2 e name d walk
    shift 2
    mkdir -p "$dst" || return 1
    for e in "$src"/*; do
        [[ -e "$e" ]] || continue
        name=${e##*/}
        [[ "$name" == jobloop* ]] && continue
        walk=
        for d in "$@"; do [[ "$name" == "$d" ]] && walk=1; done
        if [[ -n "$walk" && -d "$e" ]]; then
            _jl_asan_link_missing "$e" "$dst/$name" || return 1
        elif [[ ! -e "$dst/$name" && ! -L "$dst/$name" ]]; then
            ln -s "$e" "$dst/$name" || return 1
        fi
    done
}

_jl_build_asan() {
    local dir src root bindir pkglibdir sharedir make_args
    _jl_asan_check_env || return 1
    _jl_asan_runtime >/dev/null || return 1
    dir=$JL_SANITIZE_DIR
    src=$dir/build
    root=$dir/install
    make_args=(-C "$src" PG_CONFIG="$JL_PGBIN/pg_config" with_llvm=no
               "COPT=-fsanitize=address -fno-omit-frame-pointer")
    jl_log "building jobloop with AddressSanitizer (in $src)"
    mkdir -p "$dir" && chmod 0755 "$dir" || return 1
    rm -rf -- "$src" "$root" && mkdir -p "$src" "$dir/reports" "$dir/logs" || return 1
    # The working tree as it is (like jl_build), without .git; `make clean` drops the normal
    # build's products that came along.
    tar -C "$JL_ROOT" --exclude=./.git -cf - . | tar -C "$src" -xf - \
        || { jl_log "could not copy the tree to $src"; return 1; }
    make -s "${make_args[@]}" clean >/dev/null 2>&1
    make -s -j"$(nproc 2>/dev/null || echo 2)" "${make_args[@]}" \
        || { jl_log "ASan build failed"; return 1; }
    make -s "${make_args[@]}" DESTDIR="$root" install >/dev/null \
        || { jl_log "ASan make install (DESTDIR=$root) failed"; return 1; }

    bindir=$("$JL_PGBIN/pg_config" --bindir)
    pkglibdir=$("$JL_PGBIN/pg_config" --pkglibdir)
    sharedir=$("$JL_PGBIN/pg_config" --sharedir)
    mkdir -p "$root$bindir" || return 1
    # A copy, not a link: PostgreSQL resolves links to find its installation.
    cp "$bindir/postgres" "$root$bindir/postgres" || return 1
    _jl_asan_link_missing "$pkglibdir" "$root$pkglibdir" bitcode || return 1
    _jl_asan_link_missing "$sharedir" "$root$sharedir" extension || return 1
    _jl_asan_build_shim || return 1
    chmod -R a+rX "$root" || return 1
    if [[ $EUID -eq 0 ]]; then
        chown postgres:postgres "$dir/reports" || return 1
    fi
    jl_log "installed the ASan build into $root$pkglibdir (the system's $pkglibdir is untouched)"
}

# At exit (registered by jl_cluster_start): keep the server log of the cluster in DIR.
_jl_asan_save_log() {
    local dir=$1 sdir=$2 script
    [[ -f "$dir/server.log" && -d "$sdir/logs" ]] || return 0
    script=${0##*/}
    cp "$dir/server.log" "$sdir/logs/${script%.sh}-${dir##*/}.log"
}

# jl_sanitize_findings [LOG...]: the ASan reports in $JL_SANITIZE_DIR/reports, and the lines
# of the server LOGs (default: the saved ones) where a process died of a signal other than 9
# or ASan wrote to stderr.  Findings are grouped by what they say (a report by its SUMMARY
# line, a log line without its time and pids: a bug that kills every restarted worker is
# one finding, not thousands); each group is printed once, with how often it occurred and
# its first report in full.  Sets JL_SANITIZE_FOUND to the number of groups; status 0 when
# there are none.  Signal 9 is what the crash, fault and chaos suites send on purpose (kill
# -9 of a worker), and no defect ends a process with it: a wild pointer or abort() is SEGV,
# BUS or ABRT, which ASan also turns into a report.
JL_SANITIZE_FOUND=0
jl_sanitize_findings() {
    local f key line logs=("$@") keys=()
    local -A count=() first=()
    JL_SANITIZE_FOUND=0
    _jl_asan_check_env || { JL_SANITIZE_FOUND=1; return 1; }
    if (( ${#logs[@]} == 0 )); then
        for f in "$JL_SANITIZE_DIR"/logs/*.log; do
            [[ -f "$f" ]] && logs+=("$f")
        done
    fi
    for f in "$JL_SANITIZE_DIR"/reports/*; do
        [[ -f "$f" ]] || continue
        key=$(grep -m1 '^SUMMARY: ' "$f" || true)
        if [[ -z "$key" ]]; then
            # A process stopped while writing its report (the postmaster's SIGQUIT after
            # another process crashed) leaves no SUMMARY line.
            key=$(grep -m1 -o 'ERROR: AddressSanitizer: [A-Za-z-]*' "$f" || echo "an empty report")
            key="$key (report cut short)"
        fi
        [[ -n "${count[$key]:-}" ]] || { keys+=("$key"); first[$key]=$f; }
        count[$key]=$(( ${count[$key]:-0} + 1 ))
    done
    for key in "${keys[@]}"; do
        echo "--- ${count[$key]} AddressSanitizer report(s): $key; the first, ${first[$key]}:"
        sed -n '1,80p' "${first[$key]}"
    done
    JL_SANITIZE_FOUND=${#keys[@]}
    keys=()
    for f in "${logs[@]}"; do
        [[ -f "$f" ]] || continue
        while IFS= read -r line; do
            key=$(sed -E 's/^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] //; s/PID [0-9]+/PID n/g; s/==[0-9]+==/==n==/g; s/0x[0-9a-f]+/0x.../g' <<<"$line")
            [[ -n "${count[$key]:-}" ]] || { keys+=("$key"); first[$key]="$f: $line"; }
            count[$key]=$(( ${count[$key]:-0} + 1 ))
        done < <(grep -E 'terminated by signal [0-9]+|AddressSanitizer' "$f" \
                     | grep -Ev 'terminated by signal 9: ' || true)
    done
    for key in "${keys[@]}"; do
        echo "--- ${count[$key]} server log line(s) like: ${first[$key]}"
    done
    JL_SANITIZE_FOUND=$(( JL_SANITIZE_FOUND + ${#keys[@]} ))
    (( JL_SANITIZE_FOUND == 0 ))
}

# ---------------------------------------------------------------------------------------
# Mock API (nginx + echo module), see test/mock/

_jl_echo_module_path() {
    local p
    p=$(dpkg -L libnginx-mod-http-echo 2>/dev/null | grep '/ngx_http_echo_module\.so$' | head -n 1) || true
    [[ -n "$p" ]] || p=/usr/lib/nginx/modules/ngx_http_echo_module.so
    [[ -f "$p" ]] || { jl_log "nginx echo module not found (libnginx-mod-http-echo)"; return 1; }
    echo "$p"
}

# worker_rlimit_nofile: 65536 if this process may raise its hard limit that far (root with
# CAP_SYS_RESOURCE), else the hard limit -- asking for more only logs an alert and keeps
# the old limit.
_jl_nofile_limit() {
    if (ulimit -Hn 65536) 2>/dev/null; then
        echo 65536
    else
        local hard
        hard=$(ulimit -Hn)
        [[ "$hard" == unlimited ]] && hard=65536
        echo $(( hard < 65536 ? hard : 65536 ))
    fi
}

# Answers on both addresses?
_jl_mock_ready() {
    curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$1/__ready" \
        && curl -sf -o /dev/null --max-time 2 "http://127.0.0.2:$1/__ready"
}

jl_mock_start() {
    local dir module kib nofile attempt port started=
    command -v nginx >/dev/null 2>&1 || { jl_log "nginx is not installed (run jl_install_deps)"; return 1; }
    module=$(_jl_echo_module_path) || return 1
    nofile=$(_jl_nofile_limit)
    printf -v kib '%1024s' ''
    kib=${kib// /x}

    dir=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-mock.XXXXXX") || return 1
    chmod 0755 "$dir"
    jl_on_exit _jl_rm_dir "$dir"
    : >"$dir/access.log"
    : >"$dir/access2.log"
    jl_on_exit _jl_mock_cleanup "$dir"

    for attempt in 1 2 3; do
        port=$(jl_free_port) || return 1
        sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@ECHO_MODULE@|$module|g" \
            -e "s|@KIB@|$kib|g" -e "s|^worker_rlimit_nofile .*|worker_rlimit_nofile $nofile;|" \
            "$JL_ROOT/test/mock/nginx.conf.in" >"$dir/nginx.conf" || return 1
        # -e: the startup error log (before the config is read) also goes to $dir.
        # The soft fd limit is raised in a subshell so the master starts with it.
        if (ulimit -Sn "$(ulimit -Hn)" 2>/dev/null; exec nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log") \
                >"$dir/start.out" 2>&1 </dev/null; then
            started=1
            break
        fi
        if (( attempt < 3 )) && grep -q 'Address already in use' "$dir/start.out" "$dir/error.log" 2>/dev/null; then
            jl_log "port $port was taken, retrying with another"
            continue
        fi
        break
    done
    if [[ -z "$started" ]]; then
        jl_log "nginx failed to start:"
        cat "$dir/start.out" >&2
        return 1
    fi

    export JL_MOCK_PORT=$port JL_MOCK_DIR=$dir
    export JL_MOCK_URL=http://127.0.0.1:$port JL_MOCK_URL2=http://127.0.0.2:$port
    export JL_MOCK_LOG=$dir/access.log JL_MOCK_LOG2=$dir/access2.log

    jl_wait_for 10 _jl_mock_ready "$port" || {
        jl_log "mock API did not answer; $dir/error.log:"
        tail -n 20 "$dir/error.log" >&2
        return 1
    }
    jl_log "mock API up on $JL_MOCK_URL and $JL_MOCK_URL2 (logs in $dir)"
}

# Stop the nginx whose prefix is DIR: graceful quit (in-flight requests get
# worker_shutdown_timeout, 1 s), then TERM, then KILL of its process group (the master
# is a session leader after daemonizing, so its workers share its group).
_jl_nginx_stop() {
    local dir=$1 pid
    pid=$(cat "$dir/nginx.pid" 2>/dev/null) || return 0
    _jl_pid_alive "$pid" || return 0
    kill -QUIT "$pid" 2>/dev/null
    jl_wait_for 10 _jl_pid_gone "$pid" 2>/dev/null && return 0
    kill -TERM "$pid" 2>/dev/null
    jl_wait_for 5 _jl_pid_gone "$pid" 2>/dev/null && return 0
    kill -KILL -- "-$pid" 2>/dev/null
    jl_wait_for 5 _jl_pid_gone "$pid"
}

jl_mock_stop() {
    : "${JL_MOCK_DIR:?jl_mock_start first}"
    _jl_nginx_stop "$JL_MOCK_DIR"
}

_jl_mock_cleanup() {
    local dir=$1 pid
    pid=$(cat "$dir/nginx.pid" 2>/dev/null || true)
    _jl_pid_alive "$pid" || return 0
    if [[ "${JL_KEEP:-}" == 1 ]]; then
        jl_log "JL_KEEP=1: mock API left running (pid $pid), dir $dir"
        jl_log "  stop it with: kill -QUIT $pid"
        return 0
    fi
    _jl_nginx_stop "$dir"
}

# ---------------------------------------------------------------------------------------
# Mock API over TLS and HTTP/2 (test/mock/nginx-tls.conf.in); the plain mock is unchanged.

# _jl_tls_cert DIR NAME CA SAN [DAYS]: NAME.crt (and NAME.key) in DIR, signed by CA (a
# name in DIR), for SAN (an OpenSSL subjectAltName, or "client" for a client
# certificate), valid DAYS (default 2; "expired": it ended yesterday).
_jl_tls_cert() {
    local dir=$1 name=$2 ca=$3 san=$4 days=${5:-2} validity
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=jobloop test $name" \
        >/dev/null 2>&1 || return 1
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
        if [[ "$san" == client ]]; then
            echo "extendedKeyUsage=clientAuth"
        else
            echo "extendedKeyUsage=serverAuth"
            echo "subjectAltName=$san"
        fi
    } >"$dir/$name.ext"
    validity=(-days "$days")
    if [[ "$days" == expired ]]; then
        # OpenSSL 3.4 and later refuse -days -1; they have -not_before/-not_after
        if openssl x509 -help 2>&1 | grep -q -- -not_after; then
            validity=(-not_before "$(date -u -d '-3 days' +%Y%m%d%H%M%SZ)"
                      -not_after "$(date -u -d '-1 day' +%Y%m%d%H%M%SZ)")
        else
            validity=(-days -1)
        fi
    fi
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" \
        -set_serial "$((RANDOM * 32768 + RANDOM))" "${validity[@]}" \
        -extfile "$dir/$name.ext" -out "$dir/$name.crt" >/dev/null 2>&1
}

# _jl_tls_make_certs DIR: the test CA, another CA nobody trusts, and their certificates.
_jl_tls_make_certs() {
    local dir=$1 ca
    command -v openssl >/dev/null 2>&1 || { jl_log "openssl is not installed"; return 1; }
    mkdir -p "$dir" || return 1
    for ca in ca rogue-ca; do
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -keyout "$dir/$ca.key" -out "$dir/$ca.crt" -subj "/CN=jobloop test $ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1 \
            || { jl_log "openssl could not make the $ca certificate"; return 1; }
    done
    # shellcheck disable=SC2015  # the || is for a failure of any of them
    _jl_tls_cert "$dir" server ca "IP:127.0.0.1,IP:127.0.0.2,DNS:localhost" \
        && _jl_tls_cert "$dir" expired ca "IP:127.0.0.1,DNS:localhost" expired \
        && _jl_tls_cert "$dir" wronghost ca "DNS:wrong.example" \
        && _jl_tls_cert "$dir" rogue rogue-ca "IP:127.0.0.1,DNS:localhost" \
        && _jl_tls_cert "$dir" client ca client \
        && _jl_tls_cert "$dir" rogue-client rogue-ca client \
        || { jl_log "openssl could not make the test certificates"; return 1; }
    # The worker (user postgres) reads them; they are throw-away.
    chmod 0755 "$dir" && chmod 0644 "$dir"/*
}

# The "listen" syntax of HTTP/2: nginx 1.25.1 moved it to a directive of its own.
_jl_nginx_h2_syntax() {
    local v
    v=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    if [[ "$(printf '%s\n' "$v" 1.25.1 | sort -V | head -n 1)" == 1.25.1 ]]; then
        echo "on"
    else
        echo "listen"
    fi
}

_jl_tls_ready() {
    curl -sf -o /dev/null --max-time 2 --cacert "$JL_TLS_CERTS/ca.crt" "https://127.0.0.1:$JL_TLS_PORT_H2/__ready" \
        && _jl_port_used "$JL_TLS_PORT_STRICT"
}

# jl_mock_tls: certificates in JL_TLS_CERTS (ca.crt: the CA to trust; client.crt/.key:
# a client certificate it signed; rogue-ca.crt, rogue-client.crt/.key: another CA's), and
#   JL_TLS_PORT_H2 H1 NOKA GOAWAY H2C EXPIRED WRONGHOST ROGUE OLDTLS CIPHER MTLS: nginx, on
#       127.0.0.1 (what each serves: test/mock/nginx-tls.conf.in); access log JL_TLS_LOG
#   JL_TLS_PORT_STRICT  `openssl s_server -www`, which requires a client certificate of
#       the test CA and refuses the handshake without one (nginx answers HTTP 400 instead)
jl_mock_tls() {
    local dir module nofile attempt names=(H2 H1 NOKA GOAWAY H2C EXPIRED WRONGHOST ROGUE OLDTLS CIPHER MTLS STRICT)
    local n p sedargs started='' h2 pid
    local -A ports=()
    command -v nginx >/dev/null 2>&1 || { jl_log "nginx is not installed (run jl_install_deps)"; return 1; }
    module=$(_jl_echo_module_path) || return 1
    nofile=$(_jl_nofile_limit)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-tls.XXXXXX") || return 1
    chmod 0755 "$dir"
    jl_on_exit _jl_rm_dir "$dir"
    _jl_tls_make_certs "$dir/certs" || return 1
    cp "$JL_ROOT/test/mock/nginx-tls-locations.conf" "$dir/locations.conf" || return 1
    : >"$dir/access.log"
    jl_on_exit _jl_mock_cleanup "$dir"
    h2=$(_jl_nginx_h2_syntax)

    for attempt in 1 2 3; do
        ports=()
        sedargs=(-e "s|@DIR@|$dir|g" -e "s|@ECHO_MODULE@|$module|g"
                 -e "s|^worker_rlimit_nofile .*|worker_rlimit_nofile $nofile;|")
        if [[ "$h2" == on ]]; then
            sedargs+=(-e "s|@H2_LISTEN@||g" -e "s|@H2_ON@|http2 on;|g")
        else
            sedargs+=(-e "s|@H2_LISTEN@| http2|g" -e "s|@H2_ON@||g")
        fi
        for n in "${names[@]}"; do
            # distinct ports
            while :; do
                p=$(jl_free_port) || return 1
                [[ " ${ports[*]} " == *" $p "* ]] || break
            done
            ports[$n]=$p
            sedargs+=(-e "s|@P_${n}@|$p|g")
        done
        sed "${sedargs[@]}" "$JL_ROOT/test/mock/nginx-tls.conf.in" >"$dir/nginx.conf" || return 1
        if (ulimit -Sn "$(ulimit -Hn)" 2>/dev/null; exec nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log") \
                >"$dir/start.out" 2>&1 </dev/null; then
            started=1
            break
        fi
        if (( attempt < 3 )) && grep -q 'Address already in use' "$dir/start.out" "$dir/error.log" 2>/dev/null; then
            jl_log "a port was taken, retrying with others"
            continue
        fi
        break
    done
    if [[ -z "$started" ]]; then
        jl_log "nginx (TLS) failed to start:"
        cat "$dir/start.out" >&2
        return 1
    fi
    for n in "${names[@]}"; do
        export "JL_TLS_PORT_$n=${ports[$n]}"
    done
    export JL_TLS_DIR=$dir JL_TLS_CERTS=$dir/certs JL_TLS_LOG=$dir/access.log

    # The strict mutual-TLS server: a handshake without an accepted client certificate fails.
    openssl s_server -accept "127.0.0.1:$JL_TLS_PORT_STRICT" -cert "$dir/certs/server.crt" \
        -key "$dir/certs/server.key" -CAfile "$dir/certs/ca.crt" -Verify 1 -verify_return_error \
        -www -quiet </dev/null >"$dir/s_server.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/s_server.pid"
    jl_on_exit _jl_tls_strict_stop "$pid"

    jl_wait_for 10 _jl_tls_ready || {
        jl_log "TLS mock API did not answer; $dir/error.log, $dir/s_server.log:"
        tail -n 20 "$dir/error.log" "$dir/s_server.log" >&2
        return 1
    }
    jl_log "TLS mock API up on https://127.0.0.1:$JL_TLS_PORT_H2 and more (dir $dir)"
}

_jl_tls_strict_stop() {
    local pid=$1
    _jl_pid_alive "$pid" || return 0
    [[ "${JL_KEEP:-}" == 1 ]] && return 0
    kill "$pid" 2>/dev/null
    jl_wait_for 5 _jl_pid_gone "$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    return 0
}

# ---------------------------------------------------------------------------------------
# Network namespaces: machines on a private LAN, for test/suites/multihost.sh.
#
#   jl_netns_check                     can this process make them? (root, iproute2's ip,
#                                      nsenter, a bridge, a veth pair); else says why, status 1
#   jl_netns_lan PREFIX HOST=ADDR[,ADDR]...
#                                      a switch (namespace PREFIX-sw, bridge br0) and, for each
#                                      HOST, a namespace PREFIX-HOST whose eth0 (ADDR/24, lo up)
#                                      is cabled to the switch's port HOST; exports
#                                      JL_NETNS_PREFIX; the namespaces (and whatever still runs
#                                      in them) go at exit
#   jl_netns_exec HOST CMD [ARG...]    CMD inside HOST's network namespace
#   jl_netns_link HOST down|up         unplug / plug HOST's cable at the switch: HOST sees a
#                                      link without carrier, packets vanish both ways, its
#                                      sockets stay open (a machine that lost its network,
#                                      not one whose sockets were reset)
#   jl_netns_mock_start HOST ADDR1 ADDR2
#                                      the mock API (test/mock/nginx.conf.in, unchanged but
#                                      for its addresses) inside HOST, on ADDR1 and ADDR2 where
#                                      it has 127.0.0.1 and 127.0.0.2; exports what
#                                      jl_mock_start does (JL_MOCK_URL=http://ADDR1:port, ...)
#
# Nothing is added to this machine's own network: the bridge lives in the switch's
# namespace, so the LAN has no path to the host's interfaces and its traffic stays among
# the namespaces.  Subnets may therefore repeat across concurrent runs; only the namespace
# names (PREFIX) must differ.
#
# nsenter --net, never `ip netns exec` or `ip -n`: those also make a mount namespace and
# mark / as a slave mount, which fails where / is not a mount point -- in the chroots of
# scripts/matrix.sh ("mount --make-rslave /" failed: Invalid argument).  Only the network
# namespace is needed (/sys then shows the host's devices; nothing here reads it).

jl_netns_check() {
    local probe=jlnscheck$$ rc=0
    [[ $EUID -eq 0 ]] || { echo "needs root (network namespaces)"; return 1; }
    command -v ip >/dev/null 2>&1 || { echo "iproute2's ip is not installed"; return 1; }
    command -v nsenter >/dev/null 2>&1 || { echo "nsenter (util-linux) is not installed"; return 1; }
    ip netns add "$probe" 2>/dev/null || { echo "ip netns add fails: $(ip netns add "$probe" 2>&1)"; return 1; }
    # shellcheck disable=SC2015  # the || is for a failure of either
    nsenter --net="/run/netns/$probe" -- ip link add br0 type bridge 2>/dev/null \
        && nsenter --net="/run/netns/$probe" -- ip link add name jlcheck0 type veth peer name jlcheck1 2>/dev/null \
        || { echo "no bridge or veth devices in a network namespace (kernel modules bridge, veth)"; rc=1; }
    ip netns del "$probe" 2>/dev/null
    return "$rc"
}

jl_netns_exec() {
    local host=$1
    shift
    : "${JL_NETNS_PREFIX:?jl_netns_lan first}"
    nsenter --net="/run/netns/$JL_NETNS_PREFIX-$host" -- "$@"
}

jl_netns_lan() {
    local prefix=$1 spec host addrs addr sw hosts=()
    shift
    sw=/run/netns/$prefix-sw
    export JL_NETNS_PREFIX=$prefix
    jl_on_exit _jl_netns_cleanup "$prefix"
    ip netns add "$prefix-sw" || return 1
    nsenter --net="$sw" -- ip link add br0 type bridge || return 1
    nsenter --net="$sw" -- ip link set br0 up || return 1
    for spec in "$@"; do
        host=${spec%%=*}
        addrs=${spec#*=}
        [[ -n "$host" && "$host" != sw && ${#host} -le 15 && -n "$addrs" ]] \
            || { jl_log "jl_netns_lan: bad host '$spec' (HOST=ADDR[,ADDR])"; return 1; }
        ip netns add "$prefix-$host" || return 1
        # The switch's end is named after the host (jl_netns_link finds it so), the host's
        # end is eth0, created straight in its namespace.
        nsenter --net="$sw" -- ip link add name "$host" type veth peer name eth0 netns "$prefix-$host" \
            || return 1
        nsenter --net="$sw" -- ip link set "$host" master br0 up || return 1
        for addr in ${addrs//,/ }; do
            jl_netns_exec "$host" ip addr add "$addr/24" dev eth0 || return 1
        done
        jl_netns_exec "$host" ip link set lo up || return 1
        jl_netns_exec "$host" ip link set eth0 up || return 1
        hosts+=("$host")
    done
    jl_log "network namespaces $prefix-sw (the switch) and $prefix-{$(IFS=,; echo "${hosts[*]}")} up"
}

jl_netns_link() {
    local host=$1 state=$2
    [[ "$state" == up || "$state" == down ]] || { jl_log "jl_netns_link HOST up|down"; return 2; }
    nsenter --net="/run/netns/$JL_NETNS_PREFIX-sw" -- ip link set "$host" "$state"
}

# At exit: stop what still runs in the namespaces (the suite stops its own daemons first;
# this is for an interrupted run), then delete them.  A process keeps its namespace alive
# after `ip netns del`, so the order matters.
_jl_netns_cleanup() {
    local prefix=$1 ns pid pids=() rest
    for ns in $(ip netns list 2>/dev/null | awk -v p="$prefix-" 'index($1, p) == 1 { print $1 }'); do
        if [[ "${JL_KEEP:-}" == 1 ]]; then
            jl_log "JL_KEEP=1: kept network namespace $ns (ip netns del $ns)"
            continue
        fi
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            pids+=("$pid")
        done
    done
    [[ "${JL_KEEP:-}" == 1 ]] && return 0
    if (( ${#pids[@]} > 0 )); then
        kill -TERM "${pids[@]}" 2>/dev/null
        for pid in "${pids[@]}"; do
            jl_wait_for 5 _jl_pid_gone "$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        done
    fi
    for ns in $(ip netns list 2>/dev/null | awk -v p="$prefix-" 'index($1, p) == 1 { print $1 }'); do
        ip netns del "$ns" 2>/dev/null || rest+=" $ns"
    done
    [[ -z "${rest:-}" ]] || jl_log "could not delete network namespaces:$rest"
    return 0
}

_jl_netns_mock_ready() {
    jl_netns_exec "$1" curl -sf -o /dev/null --max-time 2 "http://$2:$4/__ready" \
        && jl_netns_exec "$1" curl -sf -o /dev/null --max-time 2 "http://$3:$4/__ready"
}

jl_netns_mock_start() {
    local host=$1 addr1=$2 addr2=$3 dir module kib nofile port
    command -v nginx >/dev/null 2>&1 || { jl_log "nginx is not installed (run jl_install_deps)"; return 1; }
    module=$(_jl_echo_module_path) || return 1
    nofile=$(_jl_nofile_limit)
    printf -v kib '%1024s' ''
    kib=${kib// /x}
    dir=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-mock.XXXXXX") || return 1
    chmod 0755 "$dir"
    jl_on_exit _jl_rm_dir "$dir"
    : >"$dir/access.log"
    : >"$dir/access2.log"
    jl_on_exit _jl_mock_cleanup "$dir"
    # A port of the usual range; the namespace holds nothing else, so it is free there.
    port=$(jl_free_port) || return 1
    # Every 127.0.0.1 / 127.0.0.2 of the template (listen, the per-address logs, redirect
    # targets, the proxied /truncated) becomes the host's address, so all endpoints
    # behave as on loopback.
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@ECHO_MODULE@|$module|g" \
        -e "s|@KIB@|$kib|g" -e "s|^worker_rlimit_nofile .*|worker_rlimit_nofile $nofile;|" \
        -e "s|127\.0\.0\.1|$addr1|g" -e "s|127\.0\.0\.2|$addr2|g" \
        "$JL_ROOT/test/mock/nginx.conf.in" >"$dir/nginx.conf" || return 1
    if ! (ulimit -Sn "$(ulimit -Hn)" 2>/dev/null;
          exec nsenter --net="/run/netns/$JL_NETNS_PREFIX-$host" -- \
              nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log") \
            >"$dir/start.out" 2>&1 </dev/null; then
        jl_log "nginx failed to start in $JL_NETNS_PREFIX-$host:"
        cat "$dir/start.out" >&2
        return 1
    fi
    export JL_MOCK_PORT=$port JL_MOCK_DIR=$dir
    export JL_MOCK_URL=http://$addr1:$port JL_MOCK_URL2=http://$addr2:$port
    export JL_MOCK_LOG=$dir/access.log JL_MOCK_LOG2=$dir/access2.log
    jl_wait_for 10 _jl_netns_mock_ready "$host" "$addr1" "$addr2" "$port" || {
        jl_log "mock API in $JL_NETNS_PREFIX-$host did not answer; $dir/error.log:"
        tail -n 20 "$dir/error.log" >&2
        return 1
    }
    jl_log "mock API up on $JL_MOCK_URL and $JL_MOCK_URL2 in $JL_NETNS_PREFIX-$host (logs in $dir)"
}
