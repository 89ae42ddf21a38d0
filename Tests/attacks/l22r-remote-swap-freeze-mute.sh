#!/bin/bash
# L22r: a remote source (nbdkit) attacked at its reconnections and its deadlines.
#  A  kill -9 of the server mid-copy (--discard-source) and another disk of the same size at the
#     same socket at once (racing the copier's in-call reconnection): the clone must hold no byte
#     of the other disk and the other disk must not be released on or changed.
#  B  the same with a disk equal to the source at the fingerprint's blocks (a copy that differs
#     elsewhere), found by the watcher's probe (no discard).
#  C  a unique export description (nbdkit exportname filter): another disk with another
#     description; then the right disk back, resume, clone equal.
#  D  kill -STOP of the server under a live clone at the default deadlines (30 s request, 10 s
#     connect): client reads of unhydrated / hydrated regions, pause, remove --force, SIGTERM.
#  E  nine starts against a listener that accepts and never greets, another job hydrating.
# Ends with HELD or DATA LOSS.
set -u; . "$(dirname "$0")/lib-live.sh"
LOSS=0
loss() { say "DATA LOSS: $*"; LOSS=1; }
C="$BIN/clonectl --socket $SOCK"
tm() { local t0=$(date +%s.%N); timeout ${T:-90} "$@" >/dev/null 2>&1; local rc=$?; echo "rc=$rc $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5)s"; }
srv() { # socket file [plugin/filter params...]: nbdkit in the background, PID in $SPID ($PRE: options before the plugin)
  local sock=$1 file=$2; shift 2
  rm -f "$sock" "$sock.pid"
  nbdkit -f --exit-with-parent -U "$sock" -P "$sock.pid" ${PRE:-} file "$file" "$@" >/dev/null 2>&1 & SPID=$!; PIDS+=($SPID)
  for _ in $(seq 100); do [ -s "$sock.pid" ] && return 0; sleep 0.05; done; echo "nbdkit did not start"; return 1
}
wait_code() { # job code [secs]
  for _ in $(seq $(( ${3:-60} * 10 ))); do [ "$(state "$1" | awk '{print $5}')" = "$2" ] && return 0; sleep 0.1; done; return 1
}
foreign_regions() { # clone src other: regions of the clone equal to other's and not src's (64 KiB)
  python3 - "$@" <<'PY'
import sys
d, s, o = (open(p, "rb").read() for p in sys.argv[1:4])
n = 0
for off in range(0, len(s), 65536):
    r = d[off:off + 65536]
    if r != s[off:off + 65536] and r == o[off:off + 65536]:
        n += 1
print(n)
PY
}
matching_copy() { # src out: xor 0x5a everywhere but the fingerprint's eight 4 KiB blocks
  python3 - "$1" "$2" <<'PY'
import sys
s = open(sys.argv[1], "rb").read()
o = bytearray(b ^ 0x5A for b in s)
for k in range(8):
    off = (len(s) * k // 8) // 4096 * 4096
    o[off:off + 4096] = s[off:off + 4096]
open(sys.argv[2], "wb").write(o)
PY
}

ldaemon || exit 1

say "A: kill -9 + another disk at once, --discard-source"
mkdata $W/a.src 32; cp $W/a.src $W/a.pristine; mkdata $W/a.other 32; cp $W/a.other $W/a.other0
srv $W/a.sock $W/a.src
c start a --source "nbd+unix:///?socket=$W/a.sock" --dest $W/a.dst --discard-source --region-size 64K --rate-limit 8M >/dev/null || exit 1
while [ "$(state a | awk '{print $2}')" -lt 64 ]; do sleep 0.05; done
kill -9 $SPID; wait $SPID 2>/dev/null; srv $W/a.sock $W/a.other
wait_code a DeviceUnconfirmed 60 && say "A: $(state a)" || say "A: job did not stop: $(state a)"
n=$(foreign_regions $W/a.dst $W/a.pristine $W/a.other0)
cmp -s $W/a.other $W/a.other0 && say "A: other disk unchanged ($(du -k $W/a.other | cut -f1) KiB allocated)" || loss "A: the other disk changed"
[ "$n" = 0 ] && say "A: no region of the other disk in the clone" || loss "A: $n regions of the other disk in the clone"
kill -9 $SPID; wait $SPID 2>/dev/null; srv $W/a.sock $W/a.src
c resume a >/dev/null; c wait a >/dev/null 2>&1
cmp -s $W/a.dst $W/a.pristine && say "A: right disk back, resumed, clone equal; source allocated $(du -k $W/a.src | cut -f1) KiB" || loss "A: clone differs after resume ($(state a))"

say "B: a disk matching the fingerprint, found by the watcher"
mkdata $W/b.src 32; cp $W/b.src $W/b.pristine; matching_copy $W/b.src $W/b.other; cp $W/b.other $W/b.other0
srv $W/b.sock $W/b.src
c start b --source "nbd+unix:///?socket=$W/b.sock" --dest $W/b.dst --region-size 64K --rate-limit 8M >/dev/null || exit 1
while [ "$(state b | awk '{print $2}')" -lt 64 ]; do sleep 0.05; done
kill -9 $SPID
wait_code b SourceUnavailable 60 || say "B: never SourceUnavailable: $(state b)"
srv $W/b.sock $W/b.other
wait_code b DeviceUnconfirmed 60 && say "B: $(state b): $(c status b --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["error"]["message"][:160])')" || say "B: job did not stop: $(state b)"
n=$(foreign_regions $W/b.dst $W/b.pristine $W/b.other0)
[ "$n" = 0 ] && say "B: no region of the other disk in the clone" || loss "B: $n regions of the other disk in the clone"
kill -9 $SPID

say "C: unique descriptions"
mkdata $W/c.src 16; cp $W/c.src $W/c.pristine
PRE=--filter=exportname srv $W/c.sock $W/c.src exportdesc=fixed:disk-c-1111
c start cc --source "nbd+unix:///?socket=$W/c.sock" --dest $W/c.dst --discard-source --region-size 64K --rate-limit 4M >/dev/null || exit 1
while [ "$(state cc | awk '{print $2}')" -lt 16 ]; do sleep 0.05; done
kill -9 $SPID; cp $W/c.pristine $W/c.copy   # the very same bytes, another description
PRE=--filter=exportname srv $W/c.sock $W/c.copy exportdesc=fixed:disk-c-2222
wait_code cc DeviceUnconfirmed 60 && say "C: identical bytes, other description: $(state cc)" || say "C: not stopped: $(state cc)"
cmp -s $W/c.copy $W/c.pristine && say "C: the copy was not released on" || loss "C: the copy changed"
kill -9 $SPID; PRE=--filter=exportname srv $W/c.sock $W/c.src exportdesc=fixed:disk-c-1111
c set cc --rate-limit 0 >/dev/null; c resume cc >/dev/null; c wait cc >/dev/null 2>&1
cmp -s $W/c.dst $W/c.pristine && say "C: right disk back: clone equal" || loss "C: clone differs ($(state cc))"
kill -9 $SPID

say "D: kill -STOP under a live clone (default deadlines)"
mkdata $W/d.src 64
srv $W/d.sock $W/d.src
c start d --source "nbd+unix:///?socket=$W/d.sock" --dest $W/d.dst --export --region-size 64K --rate-limit 2M >/dev/null || exit 1
while [ "$(state d | awk '{print $2}')" -lt 16 ]; do sleep 0.05; done
kill -STOP $SPID
READERS=()
for i in 1 2 3 4; do ( t0=$(date +%s.%N); nbdsh -u "$(uri d)" -c "h.pread(4096, $(( (32 + i) << 20 )))" >/dev/null 2>&1; echo "   unhydrated read $i: rc=$? $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5)s" ) & READERS+=($!); PIDS+=($!); done
sleep 1
say "D: hydrated read: $(tm nbdsh -u "$(uri d)" -c 'h.pread(4096, 0)')"
say "D: status: $(tm $C status d)"
say "D: pause: $(tm $C pause d)"
wait "${READERS[@]}"
say "D: $(state d)"
say "D: resume: $(tm $C resume d)"
say "D: remove --force: $(tm $C remove d --force)"
say "D: start against the frozen server: $(tm $C start d2 --source "nbd+unix:///?socket=$W/d.sock" --dest $W/d2.dst)"
t0=$(date +%s.%N); kill -TERM $DPID; for i in $(seq 900); do kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
if kill -0 $DPID 2>/dev/null; then say "D: HANG: SIGTERM not done in 90 s"; else wait $DPID; DPID=; say "D: SIGTERM exit in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"; fi
kill -CONT $SPID; kill -9 $SPID
ldaemon || exit 1

say "E: nine starts against a listener that never greets"
python3 -c '
import socket, time, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64); print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept(); held.append(c)
' > $W/mute.port & PIDS+=($!)
for _ in $(seq 50); do [ -s $W/mute.port ] && break; sleep 0.1; done
PORT=$(head -1 $W/mute.port)
mkdata $W/e.src 64
c start busy --source $W/e.src --dest $W/e.dst --region-size 64K --rate-limit 4M >/dev/null || exit 1
STARTS=()
for i in $(seq 9); do ( t0=$(date +%s.%N); out=$(c start m$i --source nbd://127.0.0.1:$PORT/ --dest $W/m$i.dst 2>&1); echo "   start m$i: rc=$? $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5)s ${out:0:90}" ) & STARTS+=($!); PIDS+=($!); done
sleep 2
h0=$(state busy | awk '{print $2}'); sleep 1; h1=$(state busy | awk '{print $2}')
say "E: other job hydrated $h0 -> $h1 regions while the starts wait"
say "E: pause of the other job: $(tm $C pause busy)"
say "E: list: $(tm $C list)"
wait "${STARTS[@]}"
say "E: jobs now: $(c list 2>/dev/null | wc -l) lines"

[ $LOSS = 0 ] && say "HELD" || say "DATA LOSS"
