#!/bin/bash
# L5: a live clone (--hydrate-on-read, --no-hydration at first) of a REMOTE source served by
# nbdkit through the error filter (30% of reads fail with EIO while $W/err exists). A client does
# partial 4 KiB writes (each needs a copy from the source first), reads and flushes. Then the errors
# stop, hydration runs to the end. Expected: every write that succeeded is in the clone; every
# region equals the source elsewhere (a failed copy-before-write must not leave zeros); reads that
# succeeded returned the right bytes (checked on the fly against the model).
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 16; cp $W/src $W/src.orig
touch $W/err
nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=error file $W/src error-pread=EIO error-pread-rate=30% error-pread-file=$W/err error-extents=EIO error-extents-rate=20% error-extents-file=$W/err
sleep 0.5; PIDS+=($(cat $W/nbdkit.pid))
ldaemon
rm -f $W/err   # identity fingerprint reads at creation must work
c start j --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/dst --export --hydrate-on-read --no-hydration >/dev/null || { say "start failed"; cat $W/daemon.log | tail; exit 1; }
touch $W/err
python3 "$(dirname "$0")/py/eiowrites.py" "$(uri j)" $W/ops 600 $W/src.orig
say "ops: $(grep -c '^S' $W/ops) writes ok, $(grep -c '^X' $W/ops) failed, $(grep -c '^R ' $W/ops) reads ok, $(grep -c '^RX' $W/ops) failed; job $(state j)"
rm -f $W/err
c resume j >/dev/null; c wait j --timeout 120s -q; say "job: $(state j)"
nbdcopy "$(uri j)" $W/img
python3 - $W/img $W/src.orig $W/ops <<'PY'
import sys
img = bytearray(open(sys.argv[1],'rb').read()); src = bytearray(open(sys.argv[2],'rb').read())
exp = bytearray(src); maybe = {}
for l in open(sys.argv[3]):
    p = l.split()
    if p[0] == 'S': o=int(p[1]); exp[o:o+4096] = bytes([int(p[2])])*4096; maybe.pop(o, None)
    elif p[0] == 'X': maybe.setdefault(int(p[1]), set()).add(int(p[2]))
bad = 0
for o in range(0, len(img), 4096):
    if img[o:o+4096] == exp[o:o+4096]: continue
    if o in maybe and img[o:o+4096] in [bytes([v])*4096 for v in maybe[o]]: continue
    bad += 1
    if bad < 10: print("CORRUPT block", o, "region", o // 65536, "zeros" if img[o:o+4096] == bytes(4096) else "other")
print("DATA LOSS" if bad else "HELD", bad, "bad blocks")
PY
