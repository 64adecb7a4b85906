# bench/plot.gp -- draws bench/run.sh's matrix.csv:
#   gnuplot -e "csv='matrix.csv'; out='steps_vs_limit.png'" bench/plot.gp
# Left: steps/s against the N/L limit, one line per N, with the ideal (100% of N/L) and
# the 90% target.  Right: the L=0 cells (no limit but the worker), against N.
# matrix.csv columns used: 1 n, 2 l_ms, 8 steps_per_s, 10 limit (N/L).

set terminal pngcairo size 1400,620 font ',11'
set output out
if (!exists("workers")) workers = 1
set multiplot layout 1,2 title sprintf('jobloop bench: %d worker(s), N jobs in flight, API latency L', workers)

# Rows of one N with L > 0 ("limit steps/s L"), or the L = 0 rows ("N steps/s"), via awk,
# so that each series is contiguous and gnuplot draws its line.
series(n) = sprintf("< awk -F, 'NR > 1 && $1 == %s && $2 > 0 { print $10, $8, $2 }' '%s'", n, csv)
l0 = sprintf("< awk -F, 'NR > 1 && $2 == 0 { print $1, $8 }' '%s'", csv)

set logscale xy
set grid
set key top left
set xlabel 'N/L (steps/s the API latency allows)'
set ylabel 'steps/s achieved'
set xrange [50:2000000]
set yrange [50:2000000]
set format x '%.0s%c'
set format y '%.0s%c'
plot x title 'N/L (ideal)' with lines dt 2 lc 'gray', \
     0.9 * x title '90% of N/L (target)' with lines dt 3 lc 'black', \
     for [n in '100 1000 10000'] series(n) using 1:2 title 'N='.n with linespoints pt 7 ps 1.3 lw 2, \
     for [i = 1:3] series(word('100 1000 10000', i)) using 1:2:(sprintf('L=%g ms', $3)) notitle \
         with labels offset 0, (i == 1 ? -1.2 : 1) font ',9'

unset logscale y
set logscale x
set xrange [50:20000]
set yrange [0:25000]
set format y '%.0f'
set xlabel 'N (jobs in flight)'
set ylabel 'steps/s'
set title 'L = 0 (the worker is the limit)'
plot 20000 title 'target: 20,000 steps/s' with lines dt 3 lw 2 lc 'black', \
     l0 using 1:2 title 'steps/s at L = 0' with linespoints pt 7 ps 1.3 lw 2
unset multiplot
