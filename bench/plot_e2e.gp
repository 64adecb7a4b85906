# bench/plot_e2e.gp -- the end-to-end view of bench/run.sh's matrix.csv:
#   gnuplot -e "csv='matrix.csv'; out='end_to_end.png'; workers=2" bench/plot_e2e.gp
# Left: end to end against the ideal (ideal K x L / measured, %) per N, one line per L,
# with the 90% target.  Middle: batch start per N: ms from the submit's commit until the
# LAST job's first request reached the API (solid) and the median job's (dashed), one
# colour per L, with the 1 s target.  Right: the L = 0 cells, end-to-end steps/s of
# jobloop and of the asyncio peer (bench/peer_asyncio.py) against N.
# matrix.csv columns used: 1 n, 2 l_ms, 33 e2e_ratio, 34 e2e_steps_per_s,
# 37 start_p50_ms, 38 start_last_ms, 42 peer_e2e_steps_per_s.

set terminal pngcairo size 1800,620 font ',11'
set output out
if (!exists("workers")) workers = 1
set multiplot layout 1,3 title sprintf('jobloop bench, end to end: %d worker(s), one statement submits N jobs of K steps at API latency L', workers)

ls = system(sprintf("awk -F, 'NR > 1 { print $2 }' '%s' | sort -n -u | tr '\\n' ' '", csv))
lpos = system(sprintf("awk -F, 'NR > 1 && $2 > 0 { print $2 }' '%s' | sort -n -u | tr '\\n' ' '", csv))
ratio(l) = sprintf("< awk -F, 'NR > 1 && $2 == %s && $33 != \"\" { print $1, 100 * $33 }' '%s'", l, csv)
start(l) = sprintf("< awk -F, 'NR > 1 && $2 == %s && $38 != \"\" { print $1, $38, $37 }' '%s'", l, csv)
l0 = sprintf("< awk -F, 'NR > 1 && $2 == 0 { print $1, $34, $42 }' '%s'", csv)

set logscale x
set grid
set key bottom left
set xrange [50:20000]
set xlabel 'N (jobs in the batch)'

set title 'end to end vs ideal (K x L)'
set ylabel 'ideal / measured, %'
set yrange [0:105]
plot 90 title '90% (target)' with lines dt 3 lw 2 lc 'black', \
     for [l in lpos] ratio(l) using 1:2 title 'L = '.l.' ms' with linespoints pt 7 ps 1.3 lw 2

set title 'batch start: commit -> first requests out'
set ylabel 'ms after the commit'
set logscale y
set yrange [1:*]
set key top left
plot 1000 title 'target: last within 1 s' with lines dt 3 lw 2 lc 'black', \
     for [i = 1:words(ls)] start(word(ls, i)) using 1:2 title 'last job, L = '.word(ls, i).' ms' \
         with linespoints pt 7 ps 1.3 lw 2 lc i, \
     for [i = 1:words(ls)] start(word(ls, i)) using 1:3 title 'median job, L = '.word(ls, i).' ms' \
         with linespoints pt 6 ps 1 dt 2 lc i

unset logscale y
set title 'L = 0: end-to-end steps/s'
set ylabel 'steps/s (all steps / (commit -> last finished))'
set yrange [0:*]
set key top right
n_l0 = int(system(sprintf("awk -F, 'NR > 1 && $2 == 0' '%s' | wc -l", csv)))
if (n_l0 > 0) {
    plot l0 using 1:2 title 'jobloop' with linespoints pt 7 ps 1.3 lw 2, \
         l0 using 1:3 title 'asyncio peer (2 processes)' with linespoints pt 5 ps 1.3 lw 2
} else {
    set yrange [0:1]
    set label 1 'no L = 0 cell in this run' at graph 0.5, 0.5 center
    plot NaN notitle
    unset label 1
}
unset multiplot
