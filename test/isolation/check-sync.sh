#!/usr/bin/env bash
#
# test/isolation/check-sync.sh -- the isolation specs play the worker with the worker's
# own SQL, copied from src/server/store.c between the markers
#     -- store.c: FUNCTION
#     ...
#     -- end FUNCTION
# This script checks that every such copy still matches the statement that FUNCTION passes
# to store_run_plan() or run_plan() (whitespace-insensitive), so a change to store.c that the specs do not
# follow fails loudly instead of leaving the specs testing yesterday's SQL.
#
# Prints TAP (one test per copy); exits non-zero on a mismatch.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)

exec perl -e '
use strict; use warnings;
my ($store, @specs) = @ARGV;
sub norm { my $s = shift; $s =~ s/\s+/ /g; $s =~ s/^ | $//g; $s =~ s/\( /(/g; $s =~ s/ \)/)/g; return $s; }
open(my $fh, "<", $store) or die "$store: $!"; my $c = do { local $/; <$fh> }; close $fh;
# A statement may be made of macros of string literals (#define NAME \ "..." \ "..."): expand them.
my %macro;
while ($c =~ /^#define (\w+) \\\n((?:[ \t]*"(?:[^"\\]|\\.)*"[ \t]*\\?\n)+)/mg) {
    my ($name, $body) = ($1, $2); $body =~ s/\\\n/\n/g; $macro{$name} = $body;
}
for my $m (keys %macro) { $c =~ s/(?<!#define )\b$m\b/$macro{$m}/g; }
my %sql;
while ($c =~ /^(\w+)\([^\n]*\)\n\{(.*?)^\}/msg) {
    my ($fn, $body) = ($1, $2);
    next unless $body =~ /\w*run_plan\(\s*&\w+,\s*((?:"(?:[^"\\]|\\.)*"\s*)+),/s;
    my $lits = $1; my $s = "";
    while ($lits =~ /"((?:[^"\\]|\\.)*)"/g) { my $l = $1; $l =~ s/\\(.)/$1/g; $s .= $l; }
    $sql{$fn} = norm($s);
}
my ($n, $bad) = (0, 0); my @out;
for my $spec (@specs) {
    open(my $sf, "<", $spec) or die "$spec: $!"; my $t = do { local $/; <$sf> }; close $sf;
    (my $name = $spec) =~ s{.*/}{};
    while ($t =~ /--\s*store\.c:\s*(\w+)[^\n]*\n(.*?)--\s*end\s+\1\b/sg) {
        my ($fn, $copy) = ($1, norm($2)); $n++;
        if (!exists $sql{$fn}) { push @out, "not ok $n - $name: $fn"; push @out, "# no statement found in store.c for $fn"; $bad++; }
        elsif ($sql{$fn} ne $copy) {
            push @out, "not ok $n - $name: $fn matches store.c"; $bad++;
            push @out, "# store.c: $sql{$fn}", "# spec:    $copy";
        } else { push @out, "ok $n - $name: $fn matches store.c"; }
    }
}
print "1..$n\n", map("$_\n", @out);
exit($bad || $n == 0 ? 1 : 0);
' "$root/src/server/store.c" "$root"/test/isolation/specs/*.spec
