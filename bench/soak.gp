# bench/soak.gp -- draws bench/soak.sh's soak.csv:
#   gnuplot -e "csv='soak.csv'; out='soak.png'; workers=2; kills='300 600'; title='...'" bench/soak.gp
# Six panels against minutes: each worker's private memory; each worker's open file
# descriptors; steps/s; jobloop.job's heap and index size; dead and live tuples; autovacuums
# of jobloop.job and the jobs by status.  Dotted red lines: a kill -9 of a worker (each
# restarts the whole server).

set terminal pngcairo size 1500,1250 font ',11'
set output out
if (!exists("workers")) workers = 2
if (!exists("kills")) kills = ''
if (!exists("title")) title = ''
set datafile separator ','
set key top left opaque box
set y2range [0:*]
set grid
set xlabel 'minutes'
set multiplot layout 3,2 title 'jobloop soak: '.title

do for [k in kills] {
    set arrow from (k / 60.0), graph 0 to (k / 60.0), graph 1 nohead dt 3 lc 'red'
}

# per worker w: columns wN_pid, wN_private_kb, wN_anon_kb, wN_fds
wcol(w, name) = sprintf('w%d_%s', w, name)

set title 'worker private memory (smaps\_rollup Private\_*), MB'
set yrange [0:*]
plot for [w = 1:workers] csv using ($1 / 60.0):(column(wcol(w, 'private_kb')) / 1024.0) \
        title sprintf('worker %d', w) with lines lw 2

set title 'worker open file descriptors'
plot for [w = 1:workers] csv using ($1 / 60.0):(column(wcol(w, 'fds'))) \
        title sprintf('worker %d', w) with lines lw 2

set title 'steps/s'
plot csv using ($1 / 60.0):'req_s' title 'requests answered by the mock' with lines lw 2, \
     csv using ($1 / 60.0):'steps_s' title 'worker\_stats() steps/s (10 s)' with lines lw 1 dt 2

set title 'jobloop.job size, MB'
plot csv using ($1 / 60.0):(column('table_kb') / 1024.0) title 'table (heap + TOAST)' with lines lw 2, \
     csv using ($1 / 60.0):(column('index_kb') / 1024.0) title 'indexes' with lines lw 2, \
     csv using ($1 / 60.0):((column('table_kb') + column('index_kb')) / 1024.0) title 'total' with lines lw 1 dt 2

set title 'tuples of jobloop.job'
plot csv using ($1 / 60.0):'pst_dead' title 'dead (pgstattuple)' with lines lw 2, \
     csv using ($1 / 60.0):'pst_live' title 'live (pgstattuple)' with lines lw 2, \
     csv using ($1 / 60.0):'n_dead_tup' title 'n\_dead\_tup (statistics)' with lines lw 1 dt 2

set title 'autovacuum of jobloop.job (cumulative, server log) and jobs by status'
set y2tics
set ytics nomirror
set y2label 'autovacuums'
set ylabel 'jobs'
plot csv using ($1 / 60.0):'finished' title 'finished rows' with lines lw 2, \
     csv using ($1 / 60.0):(column('pending') + column('running')) title 'pending + running' with lines lw 2, \
     csv using ($1 / 60.0):'av_log' axes x1y2 title 'autovacuums (right axis)' with steps lw 2, \
     csv using ($1 / 60.0):'aa_log' axes x1y2 title 'autoanalyzes (right axis)' with steps lw 1 dt 2
unset multiplot
