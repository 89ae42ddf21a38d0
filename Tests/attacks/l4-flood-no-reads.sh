#!/bin/bash
# L4: clients that send thousands of requests and never read a reply (reads of 1 MiB, writes of
# 1 MiB, and many tiny reads), then: does another client still get served, how big does the daemon
# grow, do status / pause / remove --force / SIGTERM still finish?
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 32; cp $W/src $W/src.orig; ldaemon
c start j --source $W/src --dest $W/dst --export --rate-limit 1M >/dev/null
rss() { grep VmRSS /proc/$DPID/status | awk '{print $2" kB"}'; }
say "rss at start $(rss)"
for k in "read 5000 1048576" "write 300 1048576" "read 50000 4096" "read 5000 1048576"; do
  python3 "$(dirname "$0")/py/flood.py" $NSOCK j $k 2>>$W/flood.err & PIDS+=($!)
done
sleep 8; tail -4 $W/flood.err
say "rss with 4 flooders $(rss)"
t0=$(date +%s.%N); timeout 20 nbdsh -u "$(uri j)" -c 'h.pread(65536, 0); h.pwrite(b"x"*4096, 1<<20); h.flush()' && say "another client served in $(echo "$(date +%s.%N) - $t0" | bc) s" || say "STARVED: another client not served in 20 s"
t0=$(date +%s.%N); timeout 20 $BIN/clonectl --socket $SOCK status j --json >/dev/null && say "status in $(echo "$(date +%s.%N) - $t0" | bc) s" || say "HANG: status"
t0=$(date +%s.%N); timeout 20 $BIN/clonectl --socket $SOCK pause j >/dev/null; say "pause rc=$? in $(echo "$(date +%s.%N) - $t0" | bc) s"
t0=$(date +%s.%N); timeout 30 $BIN/clonectl --socket $SOCK remove j --force >/dev/null; say "remove --force rc=$? in $(echo "$(date +%s.%N) - $t0" | bc) s"
say "rss after $(rss)"
t0=$(date +%s.%N); kill -TERM $DPID; for i in $(seq 300); do kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
kill -0 $DPID 2>/dev/null && say "HANG: SIGTERM not done in 30 s" || { wait $DPID; DPID=; say "SIGTERM exit in $(echo "$(date +%s.%N) - $t0" | bc) s"; }
