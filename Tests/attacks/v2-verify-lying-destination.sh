#!/bin/bash
# V2: verified release (`--verify`) against destinations that lie, with real tools (root, /dev/fuse,
# nbdkit, nbdfuse). (a) nbdkit's null plugin through nbdfuse: every write acknowledged, nothing
# kept; `start --discard-source --verify --wait` must fail with DestinationMismatch and leave every
# byte of the source (compared with a copy); the same without --verify is run as the baseline
# (the data loss of issue 26). (b) `--dest-zeroed` on a destination full of garbage: the zero and
# hole regions must be caught (they do not read as zeros). (c) kill -9 of the daemon four times
# while a verifying job with --discard-source copies to a healthy file; each restart must resume
# with verify on (from the job's record) and the end must be a destination equal to the source.
# Ends with HELD when every --verify case held, DATA LOSS otherwise.
set -u; . "$(dirname "$0")/lib.sh"
verdict=HELD
lost() { say "$1: DATA LOSS ($2)"; verdict="DATA LOSS"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# 16 MiB: 1 MiB chunks of data, hole, data, zeros...
mkimg() {
  truncate -s 16M "$1"
  for i in $(seq 0 15); do
    case $((i % 4)) in
      0|2) head -c 1M /dev/urandom | dd of="$1" bs=1M seek=$i conv=notrunc status=none ;;
      3) head -c 1M /dev/zero | dd of="$1" bs=1M seek=$i conv=notrunc status=none ;;
    esac
  done
}
ND=
nulldest() { # name: sets ND to a 16 MiB FUSE file that keeps nothing (not in a subshell: PIDS, MOUNTS)
  mkdir -p $W/$1.mnt
  nbdkit -f -U $W/$1.sock null size=16M >>$W/nbd.log 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do [ -S $W/$1.sock ] && break; sleep 0.1; done
  nbdfuse $W/$1.mnt/disk --unix $W/$1.sock >>$W/nbd.log 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do [ -e $W/$1.mnt/disk ] && break; sleep 0.1; done
  MOUNTS+=($W/$1.mnt)
  ND=$W/$1.mnt/disk
}
# Every 64 KiB region of the original is still somewhere: in the source or in the destination.
held() { # original source dest
  python3 - "$@" <<'PY'
import sys
o, s, d = (open(p, "rb").read() for p in sys.argv[1:4])
R = 65536
lost = [i // R for i in range(0, len(o), R) if s[i:i+R] != o[i:i+R] and d[i:i+R] != o[i:i+R]]
print("all held" if not lost else f"{len(lost)} regions exist nowhere, first {lost[:4]}")
sys.exit(1 if lost else 0)
PY
}
daemon

say "(a) a destination that keeps nothing"
mkimg $W/a.src; cp $W/a.src $W/a.copy
nulldest a
c start a --source $W/a.src --dest $ND --discard-source --verify --wait >$W/a.out 2>&1; rc=$?
st=$(state a); c status a | grep -E "verify|error"
# Read the source only once the daemon let go of it (its write lease would hold the open).
stopd
if [ "$rc" -ne 0 ] && [[ "$st" == failed*DestinationMismatch ]] && h=$(held $W/a.copy $W/a.src $ND); then
  say "(a) --verify: HELD (exit $rc, $st, $h)"
else lost "(a) --verify" "exit $rc, $st, $(held $W/a.copy $W/a.src $ND)"; cat $W/a.out; fi
daemon
mkimg $W/a0.src; cp $W/a0.src $W/a0.copy
nulldest a0
c start a0 --source $W/a0.src --dest $ND --discard-source --wait >$W/a0.out 2>&1; rc=$?
st=$(state a0); stopd
say "(a) baseline without --verify: exit $rc, $st: $(held $W/a0.copy $W/a0.src $ND) (the loss --verify prevents)"
daemon

say "(b) --dest-zeroed on a destination of garbage"
mkimg $W/b.src; cp $W/b.src $W/b.copy
head -c 16M /dev/urandom > $W/b.dst
c start b --source $W/b.src --dest $W/b.dst --dest-zeroed --discard-source --verify --wait >$W/b.out 2>&1; rc=$?
st=$(state b); stopd
if [ "$rc" -ne 0 ] && [[ "$st" == failed*DestinationMismatch ]] && h=$(held $W/b.copy $W/b.src $W/b.dst); then
  say "(b) --verify: HELD (exit $rc, $st, $h)"
else lost "(b) --verify" "exit $rc, $st, $(held $W/b.copy $W/b.src $W/b.dst)"; cat $W/b.out; fi
daemon

say "(c) kill -9 four times during a verifying --discard-source job"
mkimg $W/c.src; want=$(sha $W/c.src)
c start c --source $W/c.src --dest $W/c.dst --discard-source --verify --rate-limit 2M >/dev/null || lost "(c)" "start failed"
for k in 1 2 3 4; do
  sleep 1.$((RANDOM % 9)); kill9; daemon
  v=$(c status c --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["verify"]["enabled"])')
  [ "$v" = "True" ] || lost "(c) restart $k" "verify is $v after the restart"
done
c set c --rate-limit 0 >/dev/null
timeout 300 "$BIN/clonectl" --socket "$SOCK" wait c >/dev/null; rc=$?
st=$(state c)
if [ "$rc" -eq 0 ] && [ "$(sha $W/c.dst)" = "$want" ]; then say "(c) HELD ($st, destination equal to the source)"
else lost "(c)" "exit $rc, $st, destination sha $(sha $W/c.dst)"; fi

c remove a --force >/dev/null 2>&1; c remove a0 --force >/dev/null 2>&1
stopd
say "verdict: $verdict"
