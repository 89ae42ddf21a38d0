#!/bin/bash
# L13: a live clone of a remote source that stops answering (nbdkit delay filter, reads take
# 300 s; the connection stays up). Clients read and partially write unhydrated regions (the write
# must copy from the source first and holds its claim meanwhile). Do status, pause, another
# client's write to a hydrated region, remove --force and SIGTERM still finish? Nothing may hang.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 16

nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=delay file $W/src rdelay=0
sleep 0.3; PIDS+=($(cat $W/nbdkit.pid))
ldaemon
c start j --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/dst --export --no-hydration >/dev/null || exit 1
nbdsh -u "$(uri j)" -c 'h.pwrite(b"H"*65536, 0); h.flush()'   # region 0 hydrated by a client
# stall the source: restart nbdkit with a 300 s read delay (same file, same export)
kill $(cat $W/nbdkit.pid); sleep 0.3; rm -f $W/remote.sock
nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=delay file $W/src rdelay=300; sleep 0.3; PIDS+=($(cat $W/nbdkit.pid))
c resume j >/dev/null
tm() { local t0=$(date +%s.%N); timeout ${T:-30} "$@" >/dev/null 2>&1; local rc=$?; echo "rc=$rc $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5)s"; }
nbdsh -u "$(uri j)" -c 'h.pread(4096, 8<<20)' >/dev/null 2>&1 & PIDS+=($!)
nbdsh -u "$(uri j)" -c 'h.pwrite(b"P"*4096, 4<<20)' >/dev/null 2>&1 & PIDS+=($!)
sleep 2
say "status: $(tm $BIN/clonectl --socket $SOCK status j)"
say "write to hydrated region 0 + flush: $(tm nbdsh -u "$(uri j)" -c 'h.pwrite(b"Q"*4096, 0); h.flush()')"
say "pause: $(tm $BIN/clonectl --socket $SOCK pause j)"
say "state: $(state j)"
say "remove --force: $(T=60 tm $BIN/clonectl --socket $SOCK remove j --force)"
t0=$(date +%s.%N); kill -TERM $DPID; for i in $(seq 600); do kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
if kill -0 $DPID 2>/dev/null; then say "HANG: SIGTERM not done in 60 s"; else wait $DPID; DPID=; say "SIGTERM exit in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"; fi
