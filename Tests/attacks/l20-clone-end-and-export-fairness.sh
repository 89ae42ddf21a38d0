#!/bin/bash
# L20: the clone's end and the NBD server's limits, from outside (real daemon, real clients).
#  A. A destination larger than the source (a file, and a loop device over a larger file) with
#     its own bytes past the clone's end; source 1 MiB + 1000 bytes, 64 KiB regions, --export
#     --no-hydration. A client trims, zeroes (also NO_HOLE / FAST_ZERO), writes and caches the last
#     partial region and trims everything, with kill -9 of the daemon in between; the job is
#     resumed to completion. Are the destination's own bytes past the clone intact?
#  B. 64 idle libnbd clients of export a (one process): does a client of export b get in?
#  C. 100 raw connections from one process that never finish their handshake, reopened as the
#     server closes them: does a client of another process get in?
#  D. A flood of BLOCK_STATUS (both contexts, 256 MiB each) on a clone with 4 KiB regions whose
#     hydration alternates region by region, replies never read, on 8 connections: the daemon's
#     RSS, and the size of one reply.
#  E. A complete exported job restored after a restart: does it offer x-hydrationd:state?
set -u; . "$(dirname "$0")/lib-live.sh"
PY=/usr/bin/python3
verdict=HELD
fail() { say "DATA LOSS / FAILED: $*"; verdict="FAILED"; }
rss() { awk '/VmRSS/{print $2}' /proc/$DPID/status; }
hwm() { awk '/VmHWM/{print $2}' /proc/$DPID/status; }

ldaemon || exit 1
R=65536; SZ=$((16 * R + 1000)); TAIL=$((256 * 1024))
head -c $SZ /dev/urandom > $W/src

# ---- A: the clone's end
client() { # uri op
  $PY - "$1" "$2" <<'EOF'
import sys, nbd
u, op = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(u)
size = h.get_size(); last = size // 65536 * 65536; n = size - last
{"trim": lambda: h.trim(n, last), "zero": lambda: h.zero(n, last),
 "zero-nohole": lambda: h.zero(n, last, nbd.CMD_FLAG_NO_HOLE),
 "zero-fast": lambda: h.zero(n, last, nbd.CMD_FLAG_FAST_ZERO),
 "write": lambda: h.pwrite(b"\x5a" * 200, last + 100), "cache": lambda: h.cache(n, last),
 "trim-all": lambda: h.trim(size, 0), "unaligned-zero": lambda: h.zero(size - 7, 7)}[op]()
h.flush(); h.shutdown()
EOF
}
for kind in file loop; do
  $PY -c "import sys; open(sys.argv[1],'wb').write(b'\xee' * (($SZ + $TAIL + 511) // 512 * 512))" $W/big.$kind
  cp $W/big.$kind $W/big.$kind.orig
  if [ $kind = loop ]; then D=$(loop $W/big.$kind) || exit 1; else D=$W/big.$kind; fi
  c start e$kind --source $W/src --dest $D --region-size 64K --export --no-hydration >/dev/null || { fail "start e$kind"; continue; }
  for op in trim zero zero-nohole zero-fast write cache trim-all unaligned-zero; do
    client "$(uri e$kind)" $op || say "$kind $op: client error"
    if [ $op = cache ] || [ $op = zero ]; then kill9; ldaemon || exit 1; fi
  done
  c resume e$kind >/dev/null; c wait e$kind --timeout 120s --quiet || fail "e$kind did not complete"
  say "e$kind: $(state e$kind)"
  sync
  if [ $kind = loop ]; then B=$W/big.$kind; else B=$D; fi
  if cmp -s <(tail -c +$((SZ + 1)) $B) <(tail -c +$((SZ + 1)) $W/big.$kind.orig); then
    say "$kind destination: bytes past the clone's end intact"
  else
    fail "$kind destination: $(cmp -l <(tail -c +$((SZ + 1)) $B) <(tail -c +$((SZ + 1)) $W/big.$kind.orig) | wc -l) bytes past the clone's end changed"
  fi
  c remove e$kind >/dev/null
  [ $kind = loop ] && unloop $D
done

# ---- B, C: fairness
head -c $((4 << 20)) /dev/urandom > $W/a.src; head -c $((4 << 20)) /dev/urandom > $W/b.src
c start a --source $W/a.src --dest $W/a.dst --export --no-hydration >/dev/null
c start b --source $W/b.src --dest $W/b.dst --export --no-hydration >/dev/null
$PY - "$(uri a)" > $W/holders.out 2>&1 <<'EOF' &
import sys, time, nbd
hs, refused = [], 0
for i in range(64):
    h = nbd.NBD()
    try:
        h.connect_uri(sys.argv[1]); hs.append(h)
    except nbd.Error as e:
        refused += 1; last = str(e)
print("held", len(hs), "refused", refused, flush=True)
time.sleep(600)
EOF
PIDS+=($!); HP=$!
for _ in $(seq 200); do grep -q held $W/holders.out && break; sleep 0.1; done
say "B: 64 clients of a: $(cat $W/holders.out | head -1); clients shown: $(jst a | $PY -c 'import json,sys; print(json.load(sys.stdin)["export"]["clients"])')"
if timeout 30 nbdinfo --size "$(uri b)" >/dev/null 2>&1; then say "B: a client of b gets in"; else fail "B: b refused while a's idle clients hold the server"; fi
kill -9 $HP
$PY - "$NSOCK" > $W/raw.out 2>&1 <<'EOF' &
import socket, sys, time, select
socks = []
def opened():
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18); s.sendall(b"\0\0\0\3"); return s
for i in range(100): socks.append(opened())
print("open", len(socks), flush=True)
while True:  # reopen what the server closes, keep 100 handshakes pending
    r, _, _ = select.select(socks, [], [], 1)
    for s in r:
        if not s.recv(4096):
            socks.remove(s); s.close(); socks.append(opened())
EOF
PIDS+=($!); RP=$!
for _ in $(seq 200); do grep -q open $W/raw.out && break; sleep 0.1; done
sleep 1
ok=0; for i in 1 2 3 4 5; do timeout 30 nbdinfo --size "$(uri b)" >/dev/null 2>&1 && ok=$((ok + 1)); sleep 2; done
if [ $ok = 5 ]; then say "C: 100 pending handshakes of one process: nbdinfo on b got in 5/5 (over 10 s)"; else fail "C: nbdinfo on b got in $ok/5 against 100 pending handshakes"; fi
kill -9 $RP
c remove a --force >/dev/null; c remove b --force >/dev/null

# ---- D: block status flood
truncate -s 256M $W/bs.src
c start bs --source $W/bs.src --dest $W/bs.dst --region-size 4K --export --no-hydration >/dev/null
$PY - "$(uri bs)" <<'EOF'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
buf = b"\x01" * 4096
for r in range(0, 65536, 2):
    h.aio_pwrite(buf, r * 4096)
    if h.aio_in_flight() > 32: h.poll(-1)
while h.aio_in_flight() > 0: h.poll(-1)
h.flush(); h.shutdown()
EOF
one=$($PY - "$(uri bs)" <<'EOF'
import sys, nbd
h = nbd.NBD(); h.add_meta_context("x-hydrationd:state"); h.connect_uri(sys.argv[1])
n = [0]
def cb(ctx, off, ents, err): n[0] += len(ents) // 2
h.block_status(256 << 20, 0, cb)
print(n[0])
EOF
)
say "D: one x-hydrationd:state reply for 256 MiB of alternating 4 KiB regions: $one extents ($((one * 8 + 24)) bytes)"
head -c $((4 << 20)) /dev/urandom > $W/o.src
c start o --source $W/o.src --dest $W/o.dst --export --no-hydration >/dev/null
r0=$(rss)
$PY "$(dirname "$0")/py/bsflood.py" "$NSOCK" 8 > $W/flood.out 2>&1 &
PIDS+=($!); FP=$!
for _ in $(seq 300); do grep -q flooding $W/flood.out && break; sleep 0.1; done
t0=$(date +%s.%N)
timeout 60 nbdsh -u "$(uri o)" -c 'h.pread(4096, 0)' && say "D: another export (o) served during the flood in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s" || fail "D: export o not served within 60 s during the flood"
t0=$(date +%s.%N)
timeout 60 nbdsh -u "$(uri bs)" -c 'h.pread(4096, 0)' && say "D: the flooded export (bs) served another client in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s (its I/O threads run the queued block status calls first)" || fail "D: export bs not served within 60 s during the flood"
sleep 5
say "D: daemon RSS before the flood $((r0 / 1024)) MiB, with 8 connections x 256 unread BLOCK_STATUS: $(( $(rss) / 1024 )) MiB (peak $(( $(hwm) / 1024 )) MiB)"
kill -9 $FP
c remove bs --force >/dev/null; c remove o --force >/dev/null

# ---- E: a complete exported job after a restart
head -c $((3 << 20)) /dev/urandom > $W/done.src
c start done --source $W/done.src --dest $W/done.dst --export --wait >/dev/null
stopd; ldaemon || exit 1
for _ in $(seq 100); do [ "$(state done | cut -d' ' -f1)" = complete ] && break; sleep 0.1; done
if nbdinfo --map=x-hydrationd:state "$(uri done)" > $W/map.out 2>&1; then say "E: restored complete job: x-hydrationd:state $(tr -s ' ' < $W/map.out | head -1)"
else fail "E: restored complete job does not offer x-hydrationd:state: $(head -1 $W/map.out)"; fi

say "$verdict"
