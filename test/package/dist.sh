#!/usr/bin/env bash
# test/package/dist.sh -- the PGXN release: META.json and `make dist`.
#
# Prints TAP.  Needs a git checkout (make dist archives HEAD), so run-tests.sh runs it
# natively only, not again in each version's chroot (which gets a copy without .git).
#
#   meta      META.json is valid JSON with the keys PGXN's meta spec 1.0.0 requires
#             (name, abstract, version, maintainer, license, provides, meta-spec) and
#             the ones it lists as optional that PGXN shows (release_status, tags,
#             resources, prereqs), with values of the right form (semantic versions, a
#             known license, release_status stable/testing/unstable)
#   control   its version and provides.jobloop.version are jobloop.control's
#             default_version; provides.jobloop.file and docfile exist, file is the
#             install script that CREATE EXTENSION starts from, and the update scripts
#             reach default_version from it; the prereq PostgreSQL version is the
#             oldest that the compat header accepts
#   dist      make dist writes jobloop-<version>.zip, every file under one
#             jobloop-<version>/ directory, with META.json, the control file, the
#             Makefile, README.md, every sql/jobloop--*.sql and src/*/*.c, and debian/;
#             its META.json is the tree's
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
# shellcheck source=test/tap.sh
. "$(dirname "$0")/../tap.sh"
shopt -s extglob

cd "$JL_ROOT"
[[ -d .git || -f .git ]] || { echo "1..0 # SKIP not a git checkout (make dist archives HEAD)"; exit 0; }
command -v unzip >/dev/null 2>&1 || jl_install_deps unzip >&2 || tap_bail "could not install unzip"
perl -MJSON::PP -e 1 2>/dev/null || tap_bail "perl's JSON::PP is missing"

tap_plan 6
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobloop-dist.XXXXXX")
jl_on_exit rm -rf -- "$TMP"

control_version=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" jobloop.control)

# ---- meta: the keys and their form -----------------------------------------------------
# Prints one problem per line; nothing when META.json is valid.
meta_problems() {
    perl -MJSON::PP -e '
        my $file = shift;
        open my $fh, "<", $file or die "cannot read $file: $!\n";
        my $m = eval { JSON::PP->new->utf8->decode(do { local $/; <$fh> }) };
        if (!$m) { print "not valid JSON: $@"; exit 0 }
        my $semver = qr/^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+)?$/;
        my %licenses = map { $_ => 1 } qw(agpl_3 apache_1_1 apache_2_0 artistic_1 artistic_2
            bsd gpl_1 gpl_2 gpl_3 lgpl_2_1 lgpl_3_0 mit mozilla_1_0 mozilla_1_1 openssl
            perl_5 postgresql qpl_1_0 ssleay sun zlib open_source restricted unrestricted unknown);
        for my $k (qw(name abstract version maintainer license provides meta-spec
                      release_status tags resources prereqs)) {
            print "missing key $k\n" unless exists $m->{$k};
        }
        print "name must be jobloop\n" unless ($m->{name} // "") eq "jobloop";
        print "version is not a semantic version\n" unless ($m->{version} // "") =~ $semver;
        print "abstract must be a non-empty string\n" unless length($m->{abstract} // "");
        my $mt = $m->{maintainer};
        print "maintainer must be a string or a list of strings\n"
            unless defined $mt && (!ref $mt || (ref $mt eq "ARRAY" && @$mt && !grep { ref } @$mt));
        my @lic = ref $m->{license} eq "ARRAY" ? @{$m->{license}} : ($m->{license} // "");
        print "unknown license @lic\n" if grep { !ref && !$licenses{$_} } @lic;
        print "meta-spec.version must be 1.0.0\n" unless (($m->{"meta-spec"} // {})->{version} // "") eq "1.0.0";
        print "release_status must be stable, testing or unstable\n"
            unless ($m->{release_status} // "") =~ /^(stable|testing|unstable)$/;
        print "tags must be a list of strings of 1 to 255 characters\n"
            unless ref $m->{tags} eq "ARRAY" && !grep { ref || !length || length > 255 } @{$m->{tags}};
        my $p = $m->{provides};
        if (ref $p ne "HASH" || !%$p) { print "provides must name at least one extension\n" }
        else {
            for my $e (sort keys %$p) {
                print "provides.$e.file missing\n" unless $p->{$e}{file};
                print "provides.$e.version is not a semantic version\n" unless ($p->{$e}{version} // "") =~ $semver;
            }
        }
        my $pg = (((($m->{prereqs} // {})->{runtime} // {})->{requires} // {})->{PostgreSQL}) // "";
        print "prereqs.runtime.requires.PostgreSQL is not a semantic version\n" unless $pg =~ $semver;
    ' META.json
}
problems=$(meta_problems 2>&1) || problems="perl failed: $problems"
tap_ok "$([[ -z "$problems" ]]; echo $?)" "META.json is valid JSON with PGXN's required keys, well formed" "$problems"

# ---- control: META.json agrees with jobloop.control and sql/ ----------------------------
meta() { perl -MJSON::PP -e 'my $m = JSON::PP->new->decode(do { local $/; <STDIN> });
                              my $v = $m; $v = $v->{$_} for @ARGV; print $v // ""' "$@" <META.json; }
tap_is "$(meta version) $(meta provides jobloop version)" "$control_version $control_version" \
    "META.json's version and provides.jobloop.version are jobloop.control's default_version ($control_version)"

file=$(meta provides jobloop file)
docfile=$(meta provides jobloop docfile)
# The chain of scripts from provides.jobloop.file's version up to default_version.
chain_ok() {
    local from=${file#sql/jobloop--} next
    from=${from%.sql}
    [[ -f "$file" && "$file" == sql/jobloop--+([0-9.]).sql && -f "$docfile" ]] || return 1
    while [[ "$from" != "$control_version" ]]; do
        next=$(find sql -maxdepth 1 -name "jobloop--$from--*.sql" | head -n 1)
        [[ -n "$next" ]] || return 1
        from=${next##*--}
        from=${from%.sql}
    done
}
rc=0; chain_ok || rc=1
tap_ok "$rc" "provides.jobloop.file ($file) is an install script, update scripts lead from it to $control_version, and docfile ($docfile) exists" \
    "$(ls sql/jobloop--*.sql)"

min_major=$(sed -n 's/.*PG_VERSION_NUM < \([0-9]*\)0000.*/\1/p' src/server/compat.h | head -n 1)
tap_is "$(meta prereqs runtime requires PostgreSQL)" "${min_major:-15}.0.0" \
    "META.json requires the oldest PostgreSQL that src/server/compat.h accepts"

# ---- dist: make dist ----------------------------------------------------------------------
zip=jobloop-$control_version.zip
rm -f -- "$zip"
rc=0
out=$(make --no-print-directory -s PG_CONFIG="$JL_PGBIN/pg_config" dist 2>&1) || rc=$?
[[ -f "$zip" ]] && mv -- "$zip" "$TMP/" || rc=1
tap_ok "$rc" "make dist writes $zip" "$out"

listing=$(unzip -Z1 "$TMP/$zip" 2>&1) || listing=
missing=()
for f in META.json jobloop.control Makefile README.md debian/control debian/rules \
         debian/changelog sql/jobloop--*.sql src/*/*.c src/*/*.h; do
    grep -qxF "jobloop-$control_version/$f" <<<"$listing" || missing+=("$f")
done
outside=$(grep -vc "^jobloop-$control_version/" <<<"$listing" || true)
rc=0
(( ${#missing[@]} == 0 && outside == 0 )) || rc=1
[[ -n "$listing" ]] && unzip -p "$TMP/$zip" "jobloop-$control_version/META.json" | cmp -s - META.json || rc=1
tap_ok "$rc" "the archive holds the extension's files under jobloop-$control_version/, and the tree's META.json" \
    "missing: ${missing[*]:-none}; outside the prefix: $outside (META.json differs from HEAD's if not committed)"

tap_done
