#!/bin/bash
# V1: `clonectl digest` against a hostile world. (a) the NBD server is killed (kill -9) while the
# digest reads through a slow filter; (b) the server is frozen (SIGSTOP) mid-digest; (c) a file
# is truncated and rewritten while it is being digested; (d) a server that accepts and never
# greets. Expected each time: either the digest of bytes that really were the image (checked
# against an independent hashlib implementation) or a named error and a non-zero exit, within
# a deadline; never a digest of something that was not the image.
set -u; . "$(dirname "$0")/lib.sh"
REF=$W/ref.py
cat > $REF <<'PY'
import hashlib, struct, sys
L = 4096
def digest(data):
    n = max(1, -(-len(data) // L))
    lv = [hashlib.sha256(b"\0" + data[i*L:(i+1)*L]).digest() for i in range(n)]
    def t(a, b):
        if b - a == 1: return lv[a]
        p = 1
        while p * 2 < b - a: p *= 2
        return hashlib.sha256(b"\1" + t(a, a+p) + t(a+p, b)).digest()
    return "hyd1:" + hashlib.sha256(b"\2" + struct.pack("<Q", len(data)) + t(0, n)).hexdigest()
for f in sys.argv[1:]: print(digest(open(f, "rb").read()))
PY
verdict=HELD
judge() { # name, exit code, printed digest, allowed digests...
  local name=$1 rc=$2 got=$3; shift 3
  if [ "$rc" -ne 0 ] && [ -z "$got" ]; then say "$name: HELD (exit $rc, no digest)"; return; fi
  for ok in "$@"; do [ "$got" = "$ok" ] && { say "$name: HELD (exit $rc, a true digest)"; return; }; done
  say "$name: DATA LOSS (exit $rc, digest '$got' is of no state the image was in)"; verdict="DATA LOSS"
}
mkdata $W/src 32; truncate -s +1000 $W/src
want=$(python3 $REF $W/src)

# (a) kill -9 of the server mid-digest.
nbdkit -U $W/a.sock -P $W/a.pid --filter=delay file $W/src rdelay=300ms; sleep 0.3
NP=$(cat $W/a.pid); PIDS+=($NP)
"$BIN/clonectl" digest "nbd+unix:///?socket=$W/a.sock" >$W/a.out 2>$W/a.err & CP=$!; PIDS+=($CP)
sleep 1; kill -9 $NP
timeout 120 tail --pid=$CP -f /dev/null; wait $CP; rc=$?
judge "(a) server killed" $rc "$(cut -d' ' -f1 $W/a.out)" "$want"; cat $W/a.err

# (b) the server frozen mid-digest (request deadline 3 s).
nbdkit -U $W/b.sock -P $W/b.pid --filter=delay file $W/src rdelay=300ms; sleep 0.3
NP=$(cat $W/b.pid); PIDS+=($NP)
HYDRATION_NBD_TIMEOUT_MS=3000 "$BIN/clonectl" digest "nbd+unix:///?socket=$W/b.sock" >$W/b.out 2>$W/b.err & CP=$!; PIDS+=($CP)
sleep 1; kill -STOP $NP; t0=$(date +%s)
timeout 120 tail --pid=$CP -f /dev/null; wait $CP; rc=$?
kill -CONT $NP; kill -9 $NP
judge "(b) server frozen, ended after $(( $(date +%s) - t0 )) s" $rc "$(cut -d' ' -f1 $W/b.out)" "$want"; cat $W/b.err

# (c) a file truncated and rewritten while it is digested (one thread, so it takes a while).
cp $W/src $W/c.img; mkdata $W/other 8
"$BIN/clonectl" digest --threads 1 $W/c.img >$W/c.out 2>$W/c.err & CP=$!; PIDS+=($CP)
truncate -s 8M $W/c.img; dd if=$W/other of=$W/c.img conv=notrunc status=none
wait $CP; rc=$?
judge "(c) file rewritten" $rc "$(cut -d' ' -f1 $W/c.out)" "$want" "$(python3 $REF $W/c.img)"; cat $W/c.err

# (d) a listener that never greets (connection deadline 2 s).
python3 -c "import socket,time,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(9); time.sleep(300)" $W/d.sock & PIDS+=($!)
sleep 0.3; t0=$(date +%s)
HYDRATION_NBD_CONNECT_TIMEOUT_MS=2000 timeout 120 "$BIN/clonectl" digest "nbd+unix:///?socket=$W/d.sock" >$W/d.out 2>$W/d.err; rc=$?
judge "(d) mute server, ended after $(( $(date +%s) - t0 )) s" $rc "$(cut -d' ' -f1 $W/d.out)"; cat $W/d.err
echo "$verdict"
