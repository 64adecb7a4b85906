#!/usr/bin/env bash
#
# test/chaos/chaos.sh -- a seeded chaos suite: hundreds of multi-step jobs in which every
# request draws a fault from the table below, while jobs are cancelled at random moments
# and workers are killed with kill -9.  Whatever the API does, nothing a job meets may
# crash a worker, stall the workers or lose or double a step.
#
# Invariants (each a TAP test):
#   - no process but the workers this suite killed with kill -9 died by a signal (the
#     server log's "terminated by signal" lines), the server restarted only for those
#     kills, no PANIC, no memory-error report (AddressSanitizer, in the log or, under
#     lib.sh's JL_SANITIZE=address, in its report files; glibc heap checks), and no
#     worker exited with an error;
#   - every job ends completed, failed or cancelled, and every failed one has a
#     last_error that names the fault of the step it failed at;
#   - each committed step is counted exactly once: state.seen = [0 .. step-1], in order
#     (step() appends n to seen; a step redone after a crash must not appear twice);
#   - every response reached the job and step that asked for it (bodies that carry n=
#     carry job * 1000 + step, and step() checks it);
#   - every job ends the way its faults say (table below): completed only if none of its
#     steps always fails; failed only at a step whose fault may fail; failed or
#     cancelled no later than its first always-failing step;
#   - the API log agrees: every request has its (job, step) Idempotency-Key, nothing is
#     asked past a job's end, nothing reaches 127.0.0.2, permanent failures are tried
#     once, no step is tried more than max_attempts (4) times, Retry-After is honoured;
#   - the workers are running at the end (pg_stat_activity) and still complete a job.
#
# The faults.  request(state) picks the fault of step n of job j from
# hashtext(seed:j:n) % 1000 (weights in per mille, the FAULTS table below); a retry of a
# step meets the same fault.  The expected end of a job that meets it:
#   ok     the step succeeds and the job goes on;
#   fail   the step fails on every attempt: the job ends failed at this step (or at an
#          earlier one), with a last_error that matches the fault's pattern in FAULTS;
#          "permanent": tried once, never retried;
#   maybe  the job either takes the step or ends failed at it, with such a last_error.
# Settings: jobloop.max_response_size = 1MB, jobloop.max_redirects = 5 (the default),
# allowed_hosts = 127.0.0.1 (lib.sh), 2 workers; kind: max_attempts 4, backoff 50 ms;
# requests time out after 5 s; jobs are submitted by an ordinary role (chaos_app).
#
#   ok    json         /json: a small JSON body
#   ok    delay        /delay: the same after 50 ms
#   ok    big          /chaos/big: 5-64 KiB of JSON, more than libcurl's 4 kB buffer
#   ok    nearlimit    /chaos/big: 1000 KiB of JSON, just under max_response_size
#   ok    gzip         /chaos/gzip: 256 KiB of JSON, gzip-compressed (~1 kB on the wire)
#   ok    chain        /chaos/chain/3: three redirects (301/307/302), then /chaos/big
#   ok    json-cut     /chaos/json-cut: invalid JSON with a JSON content type (reaches
#                      step() as a string)
#   maybe throttle     /chaos/throttle: 429 + Retry-After: 1 for half the tries, else
#                      /json; fails ("429") only if all 4 tries draw the 429
#   maybe unavailable  /chaos/unavailable: the same with 503
#   maybe bigstate     /json, and step() makes the state 4 MB (a limit on state size may
#                      fail the job with a reason that says so; the next step drops it)
#   maybe deep         /chaos/deep: 100,000 '[' (never closed) as application/json
#   maybe deep-closed  /chaos/deep-closed: 100,000 '[' then 100,000 ']'
#   maybe bad-utf8     /chaos/bad-utf8: JSON with invalid UTF-8 bytes in a string
#   fail  gopher       302 to gopher://   (a scheme jobloop must not follow: permanent)
#   fail  ftp          301 to ftp://      (permanent)
#   fail  file         307 to file:///etc/passwd (permanent)
#   fail  chain-gopher a 307 to /chaos/chain/1, then its 302 to gopher:// (permanent)
#   fail  chain-refused a 307 to /chaos/chain/1, then its 302 to 127.0.0.2, which
#                      allowed_hosts does not list (refused by the guard: permanent)
#   fail  refused      a URL on 127.0.0.2 (refused before connecting: permanent)
#   fail  chain-long   eight redirects, more than max_redirects
#   fail  oversized    /big: 2 MiB, more than max_response_size (permanent)
#   fail  gzip-bomb    20 KiB of gzip that inflates to 20 MiB (permanent: too large)
#   fail  gzip-corrupt Content-Encoding: gzip on a body that is not gzip
#   fail  header-flood 2,650 header lines of 106 bytes, ~281 kB: over jobloop's 256 kB
#                      cap on response headers, under libcurl's 300 kB one (permanent)
#   fail  header-long  one header line of 128 KiB, over libcurl's 100 kB (permanent)
#   fail  truncated    /truncated: the body stops midway and the connection closes
#   fail  reset        /reset: the connection closes with no answer
#   fail  drip         /drip: one byte a second, with timeout_ms 1000
#   fail  429          /status/429?retry_after=1 on every try
#   fail  503          /status/503?retry_after=1 on every try
#   fail  json-nul     a JSON body with \u0000, which jsonb cannot hold (permanent)
#   fail  json-overflow a JSON number beyond numeric's range (permanent)
#
# Cancels and kills: the seed also draws CHAOS_CANCELS jobs to cancel and CHAOS_KILLS
# kill -9s of a worker (worker 1 or 2), each at a moment given as a share of the run's
# expected progress (sum of steps); the suite waits for that progress, then acts.  A
# cancel that returns true must leave its job cancelled; one that finds the job finished
# changes nothing.
#
# Replay: the seed is printed first ("# seed N"); SEED=N replays the run's faults and its
# cancel and kill schedule.  Timing is not replayed, nor nginx's coin flips for
# /chaos/throttle and /chaos/unavailable.
#
# Generated at run time: the gzip bomb, the deep-nesting and bad-UTF-8 bodies (in the
# suite's temp dir) and the nginx locations that serve them and the header flood
# ($JL_MOCK_DIR/chaos.d/chaos.conf, which test/mock/nginx.conf.in includes); nginx is
# reloaded to pick them up.
#
# Prints TAP; exits non-zero if a test failed.  Env: SEED; JL_BUILD=1 builds first;
# CHAOS_JOBS (600), CHAOS_STEPS (10), CHAOS_TENANTS (20), CHAOS_CANCELS (jobs / 10),
# CHAOS_KILLS (3), CHAOS_IN_FLIGHT (50, per worker), CHAOS_DEADLINE (120 s: to finish
# after the last disruption).  About 25 s on 2 cores (600 jobs, ~3,000 steps).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../../scripts/lib.sh
. "$HERE/../../scripts/lib.sh"
# shellcheck source=../tap.sh
. "$HERE/../tap.sh"
# shellcheck source=../crash/common.sh
. "$HERE/../crash/common.sh"

if [[ -z "${SEED:-}" ]]; then
    SEED=$(( SRANDOM % 1000000 ))
fi
[[ "$SEED" =~ ^[0-9]{1,9}$ ]] || tap_bail "SEED must be a number of at most 9 digits, not '$SEED'"
SEED=$((10#$SEED))
JOBS=${CHAOS_JOBS:-600}
K=${CHAOS_STEPS:-10}
TENANTS=${CHAOS_TENANTS:-20}
CANCELS=${CHAOS_CANCELS:-$((JOBS / 10))}
KILLS=${CHAOS_KILLS:-3}
IN_FLIGHT=${CHAOS_IN_FLIGHT:-50}
DEADLINE=${CHAOS_DEADLINE:-120}
MAX_ATTEMPTS=4
CR_WORKERS=2
(( JOBS >= 1 && K >= 1 && K <= 999 && CANCELS <= JOBS )) \
    || tap_bail "need CHAOS_JOBS >= 1, 1 <= CHAOS_STEPS <= 999, CHAOS_CANCELS <= CHAOS_JOBS"

# name, weight (per mille), outcome, body carries n (t/f), permanent (t/f), timeout_ms,
# URL ({mock} 127.0.0.1, {mock2} 127.0.0.2, {n} job * 1000 + step, {kb} 5-64), and the
# regular expression (case-insensitive) a failed job's last_error must match.
FAULTS=$(cat <<'EOF'
json          498 ok    t f 5000 {mock}/json?n={n}                         -
delay          60 ok    t f 5000 {mock}/delay?s=0.05&n={n}                 -
big            90 ok    t f 5000 {mock}/chaos/big?kb={kb}&n={n}            -
nearlimit      12 ok    t f 5000 {mock}/chaos/big?kb=1000&n={n}            -
gzip           45 ok    t f 5000 {mock}/chaos/gzip?kb=256&n={n}            -
chain          40 ok    t f 5000 {mock}/chaos/chain/3?n={n}&to=big         -
json-cut       25 ok    f f 5000 {mock}/chaos/json-cut?n={n}               -
throttle       35 maybe t f 5000 {mock}/chaos/throttle?n={n}               429
unavailable    35 maybe t f 5000 {mock}/chaos/unavailable?n={n}            503
bigstate       20 maybe t f 5000 {mock}/json?n={n}                         state
deep           10 maybe f f 5000 {mock}/chaos/deep?n={n}                   invalid response body|nest|depth
deep-closed    10 maybe f f 5000 {mock}/chaos/deep-closed?n={n}            invalid response body|nest|depth
bad-utf8       10 maybe f f 5000 {mock}/chaos/bad-utf8?n={n}               invalid response body|utf|encoding
gopher          8 fail  f t 5000 {mock}/chaos/redirect/gopher?n={n}        gopher|scheme|protocol
ftp             8 fail  f t 5000 {mock}/chaos/redirect/ftp?n={n}           ftp|scheme|protocol
file            8 fail  f t 5000 {mock}/chaos/redirect/file?n={n}          file|scheme|protocol
chain-gopher    6 fail  f t 5000 {mock}/chaos/chain/2?n={n}&to=gopher      gopher|scheme|protocol
chain-refused   6 fail  f t 5000 {mock}/chaos/chain/2?n={n}&to=refused     refused to connect to 127\.0\.0\.2
refused         5 fail  f t 5000 {mock2}/json?n={n}                        refused to connect to 127\.0\.0\.2
chain-long      5 fail  f f 5000 {mock}/chaos/chain/8?n={n}                redirect
oversized       6 fail  f t 5000 {mock}/big?kb=2048&n={n}                  max_response_size
gzip-bomb       6 fail  f t 5000 {mock}/chaos/gzip-bomb?n={n}              max_response_size
gzip-corrupt    5 fail  f f 5000 {mock}/chaos/gzip-corrupt?n={n}           encoding|gzip|inflate|decompress
header-flood    6 fail  f t 5000 {mock}/chaos/header-flood?n={n}           header
header-long     6 fail  f t 5000 {mock}/chaos/header-long?n={n}            header
truncated       5 fail  f f 5000 {mock}/truncated?n={n}                    closed|truncat|partial|outstanding
reset           5 fail  f f 5000 {mock}/reset?n={n}                        empty reply|reset|closed|connection died
drip            5 fail  f f 1000 {mock}/drip?n={n}                         timed out|timeout
429             5 fail  f f 5000 {mock}/status/429?retry_after=1&n={n}     429
503             5 fail  f f 5000 {mock}/status/503?retry_after=1&n={n}     503
json-nul        5 fail  f t 5000 {mock}/chaos/json-nul?n={n}               invalid response body
json-overflow   5 fail  f t 5000 {mock}/chaos/json-overflow?n={n}          invalid response body
EOF
)

if [[ "${JL_BUILD:-}" == 1 ]]; then
    jl_build >&2
fi

tap_plan $((22 + KILLS))
replay="SEED=$SEED"
for v in CHAOS_JOBS CHAOS_STEPS CHAOS_TENANTS CHAOS_CANCELS CHAOS_KILLS CHAOS_IN_FLIGHT; do
    [[ -z "${!v:-}" ]] || replay+=" $v=${!v}"
done
replay+=" $0"
tap_diag "seed $SEED (replay: $replay)"
t_start=$SECONDS

# ---- the schedule: drawn from the seed before anything else uses $RANDOM ---------------
# Each event is "PERMILLE cancel J" or "PERMILLE kill W": act once progress reaches
# PERMILLE / 1000 of the expected total.
RANDOM=$SEED
events=()
declare -A picked=()
for (( i = 0; i < CANCELS; i++ )); do
    while :; do
        j=$(( (RANDOM * 32768 + RANDOM) % JOBS + 1 ))
        [[ -z "${picked[$j]:-}" ]] && break
    done
    picked[$j]=1
    events+=("$(( RANDOM % 600 )) cancel $j")
done
for (( i = 0; i < KILLS; i++ )); do
    events+=("$(( 150 + RANDOM % 350 )) kill $(( 1 + RANDOM % CR_WORKERS ))")
done
mapfile -t events < <(printf '%s\n' "${events[@]}" | sort -n -k1,1 -s)
RANDOM=$SRANDOM     # ports and anything else random from here on are not the seed's
tap_diag "schedule: $(printf '%s\n' "${events[@]}" | awk '
    $2 == "cancel" { c++ } $2 == "kill" { k = k sprintf(", kill -9 of worker %d at %.1f%%", $3, $1 / 10) }
    END { printf "%d cancels between 0 and 60%% of the expected progress%s", c, k }')"

# ---- cluster, mock, generated content ----------------------------------------------------
CHAOS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-chaos.XXXXXX")
chmod 0755 "$CHAOS_DIR"
jl_on_exit _jl_rm_dir "$CHAOS_DIR"

jl_cluster_start "jobloop.workers = $CR_WORKERS" "jobloop.lease_timeout = '600s'" \
    "jobloop.max_in_flight = $IN_FLIGHT" "jobloop.max_response_size = '1MB'" >&2
jl_mock_start >&2

# The bodies nginx.conf.in cannot hold, and the locations that serve them.
head -c $((20 * 1024 * 1024)) /dev/zero | tr '\0' x | gzip -9 >"$CHAOS_DIR/gzip-bomb.gz"
printf '%100000s' '' | tr ' ' '[' >"$CHAOS_DIR/deep.json"
{ printf '%100000s' '' | tr ' ' '['; printf '%100000s' '' | tr ' ' ']'; } >"$CHAOS_DIR/deep-closed.json"
printf '{"ok":true,"s":"\xff\xfe\xc3\x28 \xed\xa0\x80"}' >"$CHAOS_DIR/bad-utf8.json"
mkdir -p "$JL_MOCK_DIR/chaos.d"
x90=$(printf '%90s' '' | tr ' ' x)
x2k=$(printf '%2048s' '' | tr ' ' x)
{
    echo "# Generated by test/chaos/chaos.sh for one run (see its header)."
    echo "location = /chaos/ready { access_log off; return 200 '{\"chaos\":true}'; }"
    echo "location = /chaos/gzip-bomb { default_type text/plain; add_header Content-Encoding gzip; alias $CHAOS_DIR/gzip-bomb.gz; }"
    echo "location = /chaos/deep { alias $CHAOS_DIR/deep.json; }"
    echo "location = /chaos/deep-closed { alias $CHAOS_DIR/deep-closed.json; }"
    echo "location = /chaos/bad-utf8 { alias $CHAOS_DIR/bad-utf8.json; }"
    echo "location = /chaos/header-flood {"
    for (( i = 1; i <= 2650; i++ )); do
        printf '    add_header X-Chaos-%04d %s;\n' "$i" "$x90"
    done
    echo "    return 200 '{\"ok\":true,\"n\":\$jl_n}';"
    echo "}"
    echo "location = /chaos/header-long {"
    echo "    set \$jl_chaos_2k '$x2k';"
    # shellcheck disable=SC2016  # nginx variables, not the shell's
    echo "    set \$jl_chaos_16k '$(printf '$jl_chaos_2k%.0s' {1..8})';"
    # shellcheck disable=SC2016
    echo "    set \$jl_chaos_128k '$(printf '$jl_chaos_16k%.0s' {1..8})';"
    echo "    add_header X-Chaos-Long \$jl_chaos_128k;"
    echo "    return 200 '{\"ok\":true,\"n\":\$jl_n}';"
    echo "}"
} >"$JL_MOCK_DIR/chaos.d/chaos.conf"
# Reload: the master starts workers with the new configuration and tells the old ones to
# finish; until they are gone they may still accept connections, so wait for that too.
_chaos_children() {      # PID: the pids of its children, one a line (no procps needed)
    local f stat ppid
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        stat=${stat##*) }                   # after the command name, which may hold spaces
        read -r _ ppid _ <<<"$stat"
        [[ "$ppid" == "$1" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
    return 0
}
nginx_master=$(cat "$JL_MOCK_DIR/nginx.pid")
nginx_old_workers=$(_chaos_children "$nginx_master" | tr '\n' ' ')
# shellcheck disable=SC2317  # run through jl_wait_for
_chaos_nginx_reloaded() {
    local pid stat
    for pid in $nginx_old_workers; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        [[ "${stat:0:1}" == Z ]] || return 1      # alive (a zombie is gone but not yet reaped)
    done
    [[ -n "$(_chaos_children "$nginx_master")" ]] \
        && curl -sf -o /dev/null --max-time 2 "$JL_MOCK_URL/chaos/ready"
}
nginx_args=(-p "$JL_MOCK_DIR/" -c "$JL_MOCK_DIR/nginx.conf" -e "$JL_MOCK_DIR/error.log")
if ! out=$(nginx -t "${nginx_args[@]}" 2>&1) || ! out=$(nginx -s reload "${nginx_args[@]}" 2>&1); then
    tap_diag "$out"
    tap_bail "nginx rejected the generated chaos locations"
fi
jl_wait_for 15 _chaos_nginx_reloaded \
    || tap_bail "nginx did not load the chaos locations: $(tail -n 5 "$JL_MOCK_DIR/error.log")"

# ---- the mock serves what the header says ------------------------------------------------
# Each line: what, then the measured value; compared below.
probe() {
    local u=$JL_MOCK_URL
    echo "gopher $(curl -s -o /dev/null -w '%{redirect_url}' "$u/chaos/redirect/gopher")"
    echo "file $(curl -s -o /dev/null -w '%{redirect_url}' "$u/chaos/redirect/file")"
    echo "chain-long $(curl -s -L --max-redirs 20 -o /dev/null -w '%{num_redirects}' "$u/chaos/chain/8?n=1")"
    echo "chain $(curl -s -L -w ' %{num_redirects}' "$u/chaos/chain/3?n=7&to=big" | sed 's/.*"} / /' | tr -d ' ')"
    echo "bomb $(curl -s -o /dev/null -w '%{size_download}' "$u/chaos/gzip-bomb") $(curl -s "$u/chaos/gzip-bomb" | gzip -dc | wc -c)"
    echo "gzip $(curl -s -H 'Accept-Encoding: gzip' -o /dev/null -w '%{size_download}' "$u/chaos/gzip?kb=256&n=1")"
    echo "deep $(curl -s "$u/chaos/deep" | wc -c)"
    echo "flood $(curl -s -o /dev/null -w '%{size_header}' "$u/chaos/header-flood?n=1")"
    # (curl itself refuses a header line over 100 kB: ask over a plain socket)
    echo "long $( (exec 3<>"/dev/tcp/127.0.0.1/$JL_MOCK_PORT" &&
                   printf 'GET /chaos/header-long?n=1 HTTP/1.0\r\n\r\n' >&3 && timeout 5 cat <&3) |
                 awk '{ if (length($0) > m) m = length($0) } END { print m }')"
    echo "nearlimit $(curl -s "$u/chaos/big?kb=1000&n=1" | wc -c)"
}
probes=$(probe 2>&1)
rc=0
awk -v bomb_min=$((1024 * 1024)) '
    $1 == "gopher" && $2 !~ /^gopher:/ { bad = 1 }
    $1 == "file" && $2 != "file:///etc/passwd" { bad = 1 }
    $1 == "chain-long" && $2 != 8 { bad = 1 }
    $1 == "chain" && $2 != 3 { bad = 1 }
    $1 == "bomb" && !($2 < 65536 && $3 > bomb_min) { bad = 1 }
    $1 == "gzip" && !($2 < 4096) { bad = 1 }
    $1 == "deep" && $2 != 100000 { bad = 1 }
    $1 == "flood" && !($2 > 262144 && $2 < 307200) { bad = 1 }
    $1 == "long" && !($2 > 102400) { bad = 1 }
    $1 == "nearlimit" && !($2 > 1000000 && $2 < bomb_min) { bad = 1 }
    END { exit bad }' <<<"$probes" || rc=1
tap_ok $rc "the mock serves the chaos faults as described (redirects, bomb, flood, long line, nesting)" "$probes"
: >"$JL_MOCK_LOG"    # the probes are not the jobs' requests

# ---- setup -------------------------------------------------------------------------------
fault_rows=$(awk -v m1="$JL_MOCK_URL" -v m2="$JL_MOCK_URL2" '
    NF >= 8 {
        url = $7; gsub(/\{mock\}/, m1, url); gsub(/\{mock2\}/, m2, url)
        re = $8; for (i = 9; i <= NF; i++) re = re " " $i
        gsub(/\x27/, "\x27\x27", re)
        printf "%s(\x27%s\x27, %d, \x27%s\x27, %s, %s, %d, \x27%s\x27, %s)", sep, $1, $2, $3,
               ($4 == "t" ? "true" : "false"), ($5 == "t" ? "true" : "false"), $6, url,
               (re == "-" ? "NULL" : "\x27" re "\x27")
        sep = ",\n"
    }' <<<"$FAULTS")
setup_out=$(jl_psql -At 2>&1 <<SQL
CREATE EXTENSION jobloop;
CREATE SCHEMA chaos;
CREATE TABLE chaos.fault (name text PRIMARY KEY, weight int, outcome text, tagged bool,
                          permanent bool, timeout_ms int, url text, reason text,
                          lo int, hi int);
INSERT INTO chaos.fault (name, weight, outcome, tagged, permanent, timeout_ms, url, reason)
VALUES $fault_rows;
UPDATE chaos.fault f SET lo = c.hi - f.weight, hi = c.hi
  FROM (SELECT name, sum(weight) OVER (ORDER BY weight DESC, name) AS hi FROM chaos.fault) c
 WHERE c.name = f.name;
DO \$\$ BEGIN
    IF (SELECT sum(weight) FROM chaos.fault) <> 1000 THEN
        RAISE EXCEPTION 'fault weights sum to %, not 1000', (SELECT sum(weight) FROM chaos.fault);
    END IF;
END \$\$;
-- The fault of step n of job j in this run.
CREATE FUNCTION chaos.fault_of(j int, n int) RETURNS text LANGUAGE sql STABLE AS \$\$
    SELECT name FROM chaos.fault
     WHERE abs(hashtext('$SEED:' || j || ':' || n)::bigint) % 1000 >= lo
       AND abs(hashtext('$SEED:' || j || ':' || n)::bigint) % 1000 < hi
\$\$;
CREATE FUNCTION chaos.request(s jsonb) RETURNS jsonb LANGUAGE sql STABLE AS \$\$
    SELECT jsonb_build_object(
               'url', replace(replace(f.url, '{n}', x.tag::text), '{kb}', (5 + x.tag % 60)::text),
               'timeout_ms', f.timeout_ms,
               'rate_key', 'chaos-tenant-' || (x.j % $TENANTS))
      FROM (SELECT (s->>'j')::int AS j, (s->>'j')::bigint * 1000 + (s->>'n')::int AS tag,
                   chaos.fault_of((s->>'j')::int, (s->>'n')::int) AS fault) x
      JOIN chaos.fault f ON f.name = x.fault
\$\$;
-- Append n to seen; check that a body meant to carry this job's and step's tag does.
CREATE FUNCTION chaos.step(s jsonb, r jsonb) RETURNS jsonb LANGUAGE plpgsql AS \$\$
DECLARE
    j   int := (s->>'j')::int;
    n   int := (s->>'n')::int;
    tag bigint := j::bigint * 1000 + n;
    f   chaos.fault;
    res jsonb;
BEGIN
    SELECT * INTO STRICT f FROM chaos.fault WHERE name = chaos.fault_of(j, n);
    res := (s - 'blob') || jsonb_build_object('n', n + 1, 'seen', (s->'seen') || to_jsonb(n));
    IF f.tagged AND NOT (r->>'status' = '200' AND jsonb_typeof(r->'body') = 'object'
                         AND r->'body'->>'n' = tag::text) THEN
        res := res || jsonb_build_object('wrong', coalesce(s->'wrong', '[]') || jsonb_build_object(
                   'step', n, 'fault', f.name, 'status', r->'status',
                   'body', left(coalesce(r->'body'->>'n', r->>'body'), 100)));
    END IF;
    IF f.name = 'bigstate' THEN
        res := res || jsonb_build_object('blob', repeat(md5(tag::text), 131072));   -- 4 MiB
    END IF;
    RETURN res;
END
\$\$;
CREATE FUNCTION chaos.done(s jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS \$\$
    SELECT (s->>'n')::int >= $K
\$\$;
SELECT jobloop.create_kind('chaos', 'chaos.request(jsonb)', 'chaos.step(jsonb,jsonb)',
                           'chaos.done(jsonb)', max_steps => 100, max_attempts => $MAX_ATTEMPTS,
                           backoff => '50ms', max_backoff => '1s');
-- The jobs belong to an ordinary role: their functions run as it.
CREATE ROLE chaos_app NOLOGIN;
GRANT USAGE ON SCHEMA jobloop, chaos TO chaos_app;
GRANT SELECT ON chaos.fault TO chaos_app;
-- What each job meets: its plan, and the first step that can never succeed.
CREATE TABLE chaos.plan AS
    SELECT j, n, chaos.fault_of(j, n) AS fault
      FROM generate_series(1, $JOBS) j, generate_series(0, $K - 1) n;
CREATE TABLE chaos.expect AS
    SELECT j, min(n) FILTER (WHERE f.outcome = 'fail') AS doomed_at,
           bool_and(f.outcome = 'ok') AS fault_free
      FROM chaos.plan p JOIN chaos.fault f ON f.name = p.fault GROUP BY j;
CREATE TABLE chaos.cancel_log (j int PRIMARY KEY, id bigint, cancelled boolean,
                               progress bigint, at timestamptz DEFAULT clock_timestamp());
SET ROLE chaos_app;
SELECT count(jobloop.submit('chaos', jsonb_build_object('j', g, 'n', 0, 'seen', '[]'::jsonb),
                            'tenant-' || (g % $TENANTS)))
  FROM generate_series(1, $JOBS) g;
RESET ROLE;
CREATE TABLE chaos.job_of AS SELECT id, (state->>'j')::int AS j FROM jobloop.jobs;
SELECT count(*) FILTER (WHERE doomed_at IS NOT NULL) || ' doomed, '
       || count(*) FILTER (WHERE fault_free) || ' fault-free; expected progress '
       || sum(coalesce(doomed_at, $K)) FROM chaos.expect;
SQL
) && setup_ok=1 || setup_ok=0
if [[ $setup_ok == 1 && "$setup_out" == *"$JOBS"* ]]; then
    tap_ok 0 "setup: kind created, $JOBS jobs of $K steps over $TENANTS tenants submitted"
    tap_diag "of which ${setup_out##*$'\n'}"
else
    tap_ok 1 "setup: kind created, $JOBS jobs of $K steps over $TENANTS tenants submitted" "$setup_out"
    tap_bail "setup failed"
fi
expected_total=$(cr_sql "SELECT sum(coalesce(doomed_at, $K)) FROM chaos.expect")
tap_diag "faults drawn: $(cr_sql "SELECT string_agg(fault || ' ' || c, ', ' ORDER BY c DESC, fault)
                                    FROM (SELECT fault, count(*) c FROM chaos.plan GROUP BY 1) q")"

# The rows a check query finds wrong (empty when all is well); a failing query's error
# text instead, so that it fails its test rather than stopping the suite.
bad_rows() {
    local out
    out=$(jl_psql -At -c "$1" 2>&1) || true
    (( ${#out} <= 3000 )) || out="${out:0:3000} ... (${#out} characters in all)"
    printf '%s\n' "$out"
}

# ---- cancels and kills at their moments --------------------------------------------------
KILLED=()           # pids this suite killed with kill -9
# These three run through jl_wait_for.
# shellcheck disable=SC2317
_chaos_reached() {      # PROGRESS: sum(step) reached it, or no job is left unfinished
    local row p u
    row=$(cr_sql "SELECT coalesce(sum(step), 0) || ' '
                         || count(*) FILTER (WHERE status IN ('pending', 'running'))
                    FROM jobloop.jobs") || return 1
    [[ "$row" =~ ^([0-9]+)\ ([0-9]+)$ ]] || return 1
    p=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    (( p >= $1 || u == 0 ))
}
# shellcheck disable=SC2317
_chaos_cancel() {       # J: cancel job j once, recording what cancel() returned
    cr_sql "INSERT INTO chaos.cancel_log (j, id, cancelled, progress)
            SELECT j, id, jobloop.cancel(id), (SELECT sum(step) FROM jobloop.jobs)
              FROM chaos.job_of WHERE j = $1
               AND NOT EXISTS (SELECT FROM chaos.cancel_log WHERE j = $1)" >/dev/null || true
    [[ "$(cr_sql "SELECT count(*) FROM chaos.cancel_log WHERE j = $1")" == 1 ]]
}
# shellcheck disable=SC2317
_chaos_kill() {         # W: kill -9 worker W; sets KILL_PID, KILL_OLD (all workers' pids), KILL_AT
    KILL_OLD=$(cr_worker_pids) || return 1
    KILL_PID=$(cr_sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'jobloop worker'
                        AND application_name = 'jobloop worker $1'") || return 1
    [[ "$KILL_PID" =~ ^[0-9]+$ ]] || return 1
    KILL_AT=$(cr_progress) || return 1
    CR_EVENTS+=("${EPOCHREALTIME/,/.}")
    kill -9 "$KILL_PID" 2>/dev/null || return 1    # gone meanwhile (it crashed): try again
    KILLED+=("$KILL_PID")
}
cancel_failures=0
for ev in "${events[@]}"; do
    [[ -n "$ev" ]] || continue
    read -r permille what arg <<<"$ev"
    at=$(( expected_total * permille / 1000 ))
    if ! jl_wait_for 60 _chaos_reached "$at" 2>/dev/null; then
        tap_diag "no progress to $at of $expected_total steps within 60 s (for: $what $arg)"
    fi
    if [[ $what == cancel ]]; then
        jl_wait_for 30 _chaos_cancel "$arg" || cancel_failures=$((cancel_failures + 1))
        continue
    fi
    desc="kill -9 of jobloop worker $arg at $((permille / 10)).$((permille % 10))% of the expected progress"
    if ! jl_wait_for 60 _chaos_kill "$arg"; then
        tap_ok 1 "$desc" "no worker $arg to kill within 60 s; workers: $(cr_worker_pids | tr '\n' ' ')"
        continue
    fi
    # shellcheck disable=SC2086  # one pid a word
    if jl_wait_for 60 cr_workers_up "$CR_WORKERS" $KILL_OLD; then
        tap_ok 0 "$desc (pid $KILL_PID, at $KILL_AT of $expected_total steps): all workers back"
    else
        tap_ok 1 "$desc (pid $KILL_PID)" "workers running after 60 s: $(cr_worker_pids | tr '\n' ' ')"
    fi
done
tap_is "$cancel_failures" 0 \
    "$CANCELS cancels sent at their moments ($(cr_sql "SELECT count(*) FILTER (WHERE cancelled) || ' took effect, '
        || count(*) FILTER (WHERE NOT cancelled) || ' found the job finished' FROM chaos.cancel_log"))"

# ---- every job accounted for ---------------------------------------------------------------
t_wait=$SECONDS
if cr_wait_all_finished "$DEADLINE"; then
    tap_ok 0 "every job finished within ${DEADLINE}s of the last disruption"
else
    tap_ok 1 "every job finished within ${DEADLINE}s of the last disruption" \
        "$(cr_sql "SELECT status || ' ' || count(*) || ' (at steps ' || string_agg(DISTINCT step::text, ',')
                           || '; faults ' || string_agg(DISTINCT coalesce(p.fault, '-'), ',') || ')'
                     FROM jobloop.jobs jb JOIN chaos.job_of o USING (id)
                     LEFT JOIN chaos.plan p ON p.j = o.j AND p.n = jb.step
                    WHERE status NOT IN ('completed', 'failed', 'cancelled') GROUP BY status")"
fi
tap_diag "finished $((SECONDS - t_wait)) s after the last disruption"
tap_diag "outcomes: $(cr_sql "SELECT string_agg(status || ' ' || c, ', ') FROM
                               (SELECT status, count(*) c FROM jobloop.jobs GROUP BY 1 ORDER BY 1) s")"

tap_is "$(cr_sql "SELECT count(*) FROM jobloop.jobs WHERE status NOT IN ('completed', 'failed', 'cancelled')")" 0 \
    "every job ended completed, failed or cancelled"
bad=$(bad_rows "SELECT string_agg(id::text, ', ') FROM jobloop.jobs
              WHERE status = 'failed' AND coalesce(btrim(last_error), '') = ''")
tap_is "$bad" "" "every failed job has a last_error"
tap_diag "failures by the fault of the failing step:"
tap_diag "$(cr_sql "SELECT count(*) || ' x ' || coalesce(p.fault, '?') || ': ' || e
                      FROM (SELECT jb.step, o.j, regexp_replace(left(last_error, 160), '[0-9]+', 'N', 'g') e
                              FROM jobloop.jobs jb JOIN chaos.job_of o USING (id) WHERE status = 'failed') f
                      LEFT JOIN chaos.plan p ON p.j = f.j AND p.n = f.step
                     GROUP BY p.fault, e ORDER BY p.fault, count(*) DESC")"

bad=$(bad_rows "SELECT string_agg(id || ' (' || status || ', step ' || step || '): n ' || coalesce(state->>'n', 'NULL')
                                || ' seen ' || coalesce((state->'seen')::text, 'NULL'), '; ')
                FROM jobloop.jobs j
               WHERE NOT ((state->>'n')::int = step
                          AND state->'seen' = (SELECT coalesce(jsonb_agg(g ORDER BY g), '[]')
                                                 FROM generate_series(0, j.step - 1) g))")
tap_is "$bad" "" "each committed step counted exactly once: n = step and seen = [0 .. step-1] in every job"
bad=$(bad_rows "SELECT string_agg(id || ': ' || (state->'wrong')::text, '; ') FROM jobloop.jobs WHERE state ? 'wrong'")
tap_is "$bad" "" "every response reached the job and step that asked for it (n = job * 1000 + step)"
bad=$(bad_rows "SELECT string_agg(id || ': step ' || step, '; ') FROM jobloop.jobs
               WHERE status = 'completed' AND step <> $K")
tap_is "$bad" "" "every completed job ran exactly $K steps"

bad=$(bad_rows "SELECT string_agg(x, '; ') FROM (
        SELECT 'job ' || jb.id || ' (j ' || c.j || '): cancel() said ' || c.cancelled || ', status ' || jb.status AS x
          FROM chaos.cancel_log c JOIN jobloop.jobs jb ON jb.id = c.id
         WHERE c.cancelled AND jb.status <> 'cancelled'
        UNION ALL
        SELECT 'job ' || jb.id || ' cancelled, but not by this suite'
          FROM jobloop.jobs jb JOIN chaos.job_of o USING (id)
         WHERE jb.status = 'cancelled' AND NOT EXISTS (SELECT FROM chaos.cancel_log c WHERE c.j = o.j AND c.cancelled)) q")
tap_is "$bad" "" "every cancel that returned true left its job cancelled, and no other job is cancelled"

# How each job had to end: completed only without a failing fault; failed only at a step
# whose fault may fail; failed or cancelled no later than its first always-failing step.
bad=$(bad_rows "SELECT string_agg(jb.id || ' (j ' || o.j || ', plan ' || pl.faults || '): ' || jb.status
                                || ' at step ' || jb.step || coalesce(' (' || left(jb.last_error, 100) || ')', ''), '; ')
                FROM jobloop.jobs jb JOIN chaos.job_of o USING (id) JOIN chaos.expect e USING (j)
                JOIN (SELECT j, string_agg(fault, ',' ORDER BY n) faults FROM chaos.plan GROUP BY j) pl USING (j)
                LEFT JOIN chaos.plan p ON p.j = o.j AND p.n = jb.step
                LEFT JOIN chaos.fault f ON f.name = p.fault
               WHERE NOT CASE jb.status
                         WHEN 'completed' THEN e.doomed_at IS NULL
                         WHEN 'failed' THEN jb.step <= coalesce(e.doomed_at, $K) AND f.outcome IN ('fail', 'maybe')
                         WHEN 'cancelled' THEN jb.step <= coalesce(e.doomed_at, $K)
                         ELSE false END")
tap_is "$bad" "" "every job ended as its faults say: completed only without a failing fault, failed only at a step that may fail, none past its first always-failing step"
bad=$(bad_rows "SELECT string_agg(c || ' x ' || fault || ' (wants /' || reason || '/): ' || e
                                || ' (jobs ' || ids || ')', E'\n' ORDER BY fault, c DESC)
                FROM (SELECT p.fault, f.reason, regexp_replace(left(jb.last_error, 200), '[0-9]+', 'N', 'g') e,
                             count(*) c, array_to_string((array_agg(jb.id ORDER BY jb.id))[1:5], ', ')
                                         || CASE WHEN count(*) > 5 THEN ', ...' ELSE '' END AS ids
                        FROM jobloop.jobs jb JOIN chaos.job_of o USING (id)
                        JOIN chaos.plan p ON p.j = o.j AND p.n = jb.step
                        JOIN chaos.fault f ON f.name = p.fault
                       WHERE jb.status = 'failed' AND NOT coalesce(jb.last_error ~* f.reason, false)
                       GROUP BY 1, 2, 3) q")
tap_is "$bad" "" "every failed job's last_error names the fault of its step"

# ---- what the API saw ------------------------------------------------------------------------
if cr_load_access_log chaos.access; then
    boundaries=$(cr_boundaries_sql)
    cr_sql_must "CREATE VIEW chaos.tries AS
        SELECT a.*, o.j, p.fault, (SELECT count(*) FROM unnest($boundaries) b WHERE b < a.started) AS generation
          FROM chaos.access a LEFT JOIN chaos.job_of o ON o.id = a.job
          LEFT JOIN chaos.plan p ON p.j = o.j AND p.n = a.step" >/dev/null
    tap_diag "API answers: $(cr_sql "SELECT string_agg(c || ' x ' || status, ', ' ORDER BY status)
                                       FROM (SELECT status, count(*) c FROM chaos.access GROUP BY 1) s")"
    bad=$(bad_rows "SELECT string_agg(x, '; ') FROM (
          SELECT 'unparsed log lines: ' || ((SELECT count(*) FROM chaos.access_raw)
                                            - (SELECT count(*) FROM chaos.access)) AS x
           WHERE (SELECT count(*) FROM chaos.access_raw) <> (SELECT count(*) FROM chaos.access)
          UNION ALL
          SELECT 'requests without a jobloop key: ' || count(*) || ', e.g. ' || min(uri) FROM chaos.tries
           WHERE job IS NULL OR j IS NULL HAVING count(*) > 0
          UNION ALL
          SELECT 'n= is not job * 1000 + the key''s step: ' || min(key) || ' ' || min(uri) FROM chaos.tries
           WHERE n IS DISTINCT FROM j::bigint * 1000 + step HAVING count(*) > 0
          UNION ALL
          SELECT 'a request for step ' || t.step || ' of job ' || t.job || ', which ended ' || jb.status
                 || ' at step ' || jb.step
            FROM chaos.tries t JOIN jobloop.jobs jb ON jb.id = t.job
           WHERE t.step > jb.step OR (t.step = jb.step AND jb.status = 'completed')) q")
    tap_is "$bad" "" "every request carried its (job, step) key and tag, and none asked past its job's end"
    bad=$(bad_rows "SELECT string_agg(line, E'\n' ORDER BY fault) FROM (
                      SELECT fault, fault || ': ' || count(*) || ' steps tried up to ' || max(c)
                                    || ' times, e.g. ' || min(key || ' ' || uri) AS line
                        FROM (SELECT key, fault, uri, generation, count(*) c FROM chaos.tries t
                                JOIN chaos.fault f ON f.name = t.fault
                               WHERE f.permanent GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) q
                       GROUP BY fault) r")
    tap_is "$bad" "" "permanent failures were not retried (scheme and refused redirects, oversized, bomb, header floods, bad JSON)"
    bad=$(bad_rows "SELECT string_agg(key || ' ' || uri || ' x' || c || ' in generation ' || generation, '; ')
                    FROM (SELECT key, uri, generation, count(*) c FROM chaos.tries WHERE status <> 444
                           GROUP BY 1, 2, 3 HAVING count(*) > $MAX_ATTEMPTS) q")
    tap_is "$bad" "" "no step got more than max_attempts ($MAX_ATTEMPTS) answers in one generation (resets not counted)"
    bad=$(bad_rows "SELECT string_agg(key || ' retried after ' || round(started - prev, 3) || ' s', ', ') FROM (
            SELECT key, started, lag(started) OVER (PARTITION BY key, uri ORDER BY started) prev
              FROM chaos.tries WHERE status IN (429, 503)) a
           WHERE prev IS NOT NULL AND started - prev < 0.95
             AND NOT EXISTS (SELECT FROM unnest($boundaries) b WHERE b BETWEEN a.prev - 0.005 AND a.started + 0.005)")
    tap_is "$bad" "" "Retry-After: 1 was honoured between tries of a step answered 429 or 503"
else
    for t in "every request carried its (job, step) key and tag, and none asked past its job's end" \
             "permanent failures were not retried" "no step got more than max_attempts answers" \
             "Retry-After: 1 was honoured"; do
        tap_ok 1 "$t" "could not load $JL_MOCK_LOG"
    done
fi
rc=0
[[ ! -s "$JL_MOCK_LOG2" ]] || rc=1
tap_ok $rc "no request reached 127.0.0.2 (refused by the guard, directly or after a redirect)" \
    "$(head -n 5 -- "$JL_MOCK_LOG2" 2>/dev/null)"

# ---- the server log: nobody died but our victims ---------------------------------------------
signals=$(grep -E 'was terminated by signal|PANIC' "$JL_PGLOG" || true)
unexpected=$(while IFS= read -r line; do
        [[ -n "$line" ]] || continue
        if [[ "$line" =~ \(PID\ ([0-9]+)\)\ was\ terminated\ by\ signal\ 9: ]] \
            && [[ " ${KILLED[*]} " == *" ${BASH_REMATCH[1]} "* ]]; then
            continue
        fi
        echo "$line"
    done <<<"$signals")
restarts=$(grep -c 'all server processes terminated; reinitializing' "$JL_PGLOG" || true)
if [[ -z "$unexpected" && "$restarts" == "${#KILLED[@]}" ]]; then
    tap_ok 0 "no process died by a signal but the ${#KILLED[@]} workers killed with -9 (pids ${KILLED[*]}); no other restart, no PANIC"
else
    tap_ok 1 "no process died by a signal but the ${#KILLED[@]} workers killed with -9 (pids ${KILLED[*]}); no other restart, no PANIC" \
        "server restarts: $restarts for ${#KILLED[@]} kills; $(grep -c . <<<"$unexpected") unexpected lines, the first 20:"$'\n'"$(head -n 20 <<<"$unexpected")"
fi
memerr=$(grep -E -m 20 'ERROR: AddressSanitizer|runtime error:|free\(\): |malloc\(\): |realloc\(\): |double free|corrupted (size|double-linked|top size)|munmap_chunk|stack smashing' \
         "$JL_PGLOG" || true)
# Under scripts/lib.sh's JL_SANITIZE=address, ASan writes its reports to files of its own.
if [[ -n "${JL_SANITIZE_DIR:-}" ]]; then
    for f in "$JL_SANITIZE_DIR"/reports/asan-"${JL_PGDIR##*/}"*; do
        [[ -f "$f" ]] && memerr+=$'\n'"$f: $(grep -m1 '^SUMMARY: ' "$f" || head -n 1 "$f")"
    done
fi
memerr=${memerr#$'\n'}
tap_is "$memerr" "" "no memory-error report (AddressSanitizer, glibc heap checks) in the server log"
exits=$(grep -E 'background worker "jobloop worker" \(PID [0-9]+\) exited with exit code [1-9]' "$JL_PGLOG" || true)
tap_is "$exits" "" "no worker exited with an error"
[[ -z "$exits" ]] || tap_diag "$(grep -E 'jobloop worker.*(ERROR|FATAL)' "$JL_PGLOG" | head -n 10)"

# ---- the workers are alive and still work ----------------------------------------------------
rc=0
cr_workers_up "$CR_WORKERS" || rc=$?
tap_ok $rc "$CR_WORKERS workers are running (pg_stat_activity)" "workers running: $(cr_worker_pids | tr '\n' ' ')"
j=$(cr_sql "SELECT j FROM generate_series(1000000, 1100000) j
             WHERE (SELECT bool_and(chaos.fault_of(j, n) IN ('json', 'delay', 'big', 'gzip'))
                      FROM generate_series(0, $K - 1) n)
             LIMIT 1" || true)
new_id=$(cr_sql "SET ROLE chaos_app;
                 SELECT jobloop.submit('chaos', jsonb_build_object('j', $j, 'n', 0, 'seen', '[]'::jsonb), 'after')" || true)
expected_seen=$(cr_sql "SELECT jsonb_agg(g) FROM generate_series(0, $K - 1) g")
if [[ -n "$j" && "$new_id" =~ ^[0-9]+$ ]]; then
    st=$(cr_sql "SELECT jobloop.wait($new_id, '60s')" || true)
    tap_is "$st $(cr_sql "SELECT step || ' ' || (state->'seen')::text || coalesce(' ' || (state->'wrong')::text, '')
                           FROM jobloop.jobs WHERE id = $new_id")" \
        "completed $K $expected_seen" "a fault-free job submitted afterwards completes with exactly $K steps"
else
    tap_ok 1 "a fault-free job submitted afterwards completes with exactly $K steps" "submit failed (j '$j', id '$new_id')"
fi

tap_diag "chaos suite took $((SECONDS - t_start)) s; seed $SEED (replay: $replay)"
tap_done
