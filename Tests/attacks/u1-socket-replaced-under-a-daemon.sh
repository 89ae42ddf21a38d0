#!/bin/bash
# U1: the control and NBD socket files of a running daemon A are deleted (an admin's rm, a
# tmpfiles clean-up); daemon B (another state directory) starts on the same paths and serves;
# then A stops (SIGTERM). A must not take B's socket files with it: B must still be reachable at
# both paths afterwards, and remove its own files when it stops.
set -u; . "$(dirname "$0")/lib.sh"
NS=$W/nbd.sock
daemon --nbd-socket "$NS"
A=$DPID
rm -f "$SOCK" "$NS"
"$BIN/hydrationd" --state-dir "$W/state-b" --socket "$SOCK" --nbd-socket "$NS" >>"$W/daemon-b.log" 2>&1 &
B=$!; PIDS+=("$B")
for _ in $(seq 100); do [ -S "$SOCK" ] && [ -S "$NS" ] && c list >/dev/null 2>&1 && break; sleep 0.1; done
ia=$(stat -c %i "$SOCK"); ib=$(stat -c %i "$NS")
say "B listens: control inode $ia, NBD inode $ib"
stopd   # A, gracefully
say "A stopped (rc of wait ignored)"
ok=1
if [ -S "$SOCK" ] && [ "$(stat -c %i "$SOCK")" = "$ia" ] && c list >/dev/null 2>&1; then
  say "control socket of B still there and answering"
else
  say "BROKEN: B's control socket file is gone or dead after A stopped"; ok=0
fi
if [ -S "$NS" ] && [ "$(stat -c %i "$NS")" = "$ib" ] && nbdinfo --list "nbd+unix://?socket=$NS" >/dev/null 2>&1; then
  say "NBD socket of B still there and answering"
else
  say "BROKEN: B's NBD socket file is gone or dead after A stopped"; ok=0
fi
kill -TERM "$B"; wait "$B" 2>/dev/null
[ -e "$SOCK" ] && { say "BROKEN: B left its control socket file"; ok=0; }
[ -e "$NS" ] && { say "BROKEN: B left its NBD socket file"; ok=0; }
[ $ok = 1 ] && say "HELD" || say "BROKEN (no data at stake: B is unreachable until restarted)"
