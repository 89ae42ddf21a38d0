#!/bin/bash
# L15: a live clone of a remote source created with --no-hydration (or paused, or hydrating): the
# source's server is restarted the graceful way (SIGTERM to nbdkit, a new nbdkit on the same
# socket path, same file and export). The old nbdkit lingers while the daemon keeps its
# connection, answering every request with ESHUTDOWN. Do the clone's clients get the source's data
# again, now and after 5 s? (docs/remote-source.md: "a read on a dead connection reconnects once
# at once (a blip costs nothing)").
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 16; cp $W/src $W/src.orig
nk() { rm -f $W/remote.sock; nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid file $W/src; sleep 0.3; NK=$(cat $W/nbdkit.pid); PIDS+=($NK); }
nk; ldaemon
for mode in no-hydration paused hydrating; do
  case $mode in
    no-hydration) c start $mode --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/d-$mode --export --no-hydration >/dev/null;;
    paused) c start $mode --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/d-$mode --export --rate-limit 1M >/dev/null; sleep 1; c pause $mode >/dev/null;;
    hydrating) c start $mode --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/d-$mode --export --rate-limit 1M >/dev/null;;
  esac
  nbdsh -u "$(uri $mode)" -c 'h.pread(4096, 12<<20)' >/dev/null && say "$mode: read before the blip ok"
  kill $NK; sleep 0.5; say "$mode: old nbdkit still alive after SIGTERM: $(kill -0 $NK 2>/dev/null && echo yes || echo no)"; nk
  for t in 0 5; do
    sleep $t
    if nbdsh -u "$(uri $mode)" -c "assert h.pread(65536, 12<<20) == open('$W/src.orig','rb').read()[12<<20:(12<<20)+65536]" 2>$W/e; then say "$mode: read ${t}s after the blip: ok"
    else say "$mode: read ${t}s after the blip FAILS: $(tail -1 $W/e)"; fi
  done
  say "$mode: $(state $mode)"
  c remove $mode --force >/dev/null
done
