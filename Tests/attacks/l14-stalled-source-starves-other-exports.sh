#!/bin/bash
# L14: job r is a live clone of a remote source that stalls (nbdkit delay filter: reads take
# 120 s, the connection stays up); job o is an ordinary local live clone. K clients read
# unhydrated regions of r (each read blocks in libnbd). Is job o's export still served? (Client
# requests of every export share LiveCloneExport's I/O threads, 4 per docs/live-clone.md.)
set -u; . "$(dirname "$0")/lib-live.sh"
K=${K:-6}
mkdata $W/rsrc 16; mkdata $W/osrc 16
nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=delay file $W/rsrc rdelay=${DELAY:-120}; sleep 0.3; NK=$(cat $W/nbdkit.pid); PIDS+=($NK)
ldaemon
# creation reads the fingerprint through the delay: start with a short delay server first
kill -9 $NK; sleep 0.3; rm -f $W/remote.sock
nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid file $W/rsrc; sleep 0.3; NK=$(cat $W/nbdkit.pid); PIDS+=($NK)
c start r --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/rdst --export --no-hydration >/dev/null || exit 1
c start o --source $W/osrc --dest $W/odst --export --no-hydration >/dev/null || exit 1
kill -9 $NK; sleep 0.3; rm -f $W/remote.sock
nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=delay file $W/rsrc rdelay=${DELAY:-120}; sleep 0.3; PIDS+=($(cat $W/nbdkit.pid))
# let r's source connection come back (the watcher reconnects)
sleep 3; say "r: $(state r)"
for k in $(seq $K); do nbdsh -u "$(uri r)" -c "h.pread(4096, $k<<20)" >/dev/null 2>&1 & PIDS+=($!); done
sleep 2
timeout 5 nbdsh -u "$(uri r)" -c "h.pread(4096, 15<<20)" >/dev/null 2>&1; say "a read of r's unhydrated region: rc=$? (124 = still waiting after 5 s: the source is stalled)"
t0=$(date +%s.%N)
if timeout 20 nbdsh -u "$(uri o)" -c 'h.pread(4096, 0); h.pwrite(b"x"*4096, 0); h.flush()'; then say "HELD: job o served in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
else say "STARVED: job o (a local clone) not served within 20 s while $K reads of job r's stalled source are pending"; fi
t0=$(date +%s.%N)
timeout 20 nbdsh -u "$(uri o)" -c 'h.pread(4096, 0)' && say "o read again in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s" || say "o still starved"
t0=$(date +%s.%N); timeout 20 $BIN/clonectl --socket $SOCK status o >/dev/null; say "status o: rc=$? in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
t0=$(date +%s.%N); timeout 30 $BIN/clonectl --socket $SOCK remove r --force >/dev/null; say "remove r --force: rc=$? in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
timeout 20 nbdsh -u "$(uri o)" -c 'h.pread(4096, 0)' && say "o served after removing r" || say "o still starved after removing r"
