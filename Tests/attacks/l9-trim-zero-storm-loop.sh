#!/bin/bash
# L9: a live clone onto a loop device (block-device destination: BLKDISCARD / BLKZEROOUT paths)
# while the copier runs: 6 connections, each owning every 6th region, do random partial/whole
# writes, whole and unaligned TRIMs, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO partial), CACHE and
# reads checked against a model. At the end the clone must equal the models (outside trimmed
# blocks), after a kill -9 and restart too.
set -u; . "$(dirname "$0")/lib-live.sh"
N=6; mkdata $W/src 48; cp $W/src $W/src.orig
truncate -s 48M $W/d.img; DL=$(loop $W/d.img)
ldaemon
c start j --source $W/src --dest $DL --export --discard-source --rate-limit ${RATE:-6M} >/dev/null
WP=()
for i in $(seq 0 $((N-1))); do python3 "$(dirname "$0")/py/mixops.py" "$(uri j)" $i $N $W/src.orig ${OPS:-1500} $W/model & WP+=($!); PIDS+=($!); done
for p in "${WP[@]}"; do wait $p; done
say "job: $(state j)"
check() {
python3 - $1 $N $W/model <<'PY'
import sys
img = open(sys.argv[1],'rb').read(); n = int(sys.argv[2]); R = 65536; bad = 0
for i in range(n):
    m = open(f"{sys.argv[3]}.{i}",'rb').read(); u = open(f"{sys.argv[3]}.{i}.unk",'rb').read()
    for r in range(i, len(img)//R, n):
        for b in range(r*16, r*16+16):
            if u[b]: continue
            if img[b*4096:(b+1)*4096] != m[b*4096:(b+1)*4096]:
                bad += 1
                if bad < 8: print("MISMATCH block", b, "region", r)
print("DATA LOSS" if bad else "HELD", bad, "blocks")
PY
}
nbdcopy "$(uri j)" $W/img; check $W/img
kill9; ldaemon; say "after kill -9 (everything was flushed): $(state j)"
nbdcopy "$(uri j)" $W/img2; check $W/img2
c set j --rate-limit 0 >/dev/null 2>&1; c wait j --timeout 60s -q; say "job: $(state j)"
cmp -s $DL $W/img2 && say "destination equals what was served" || { say "destination differs from what was served:"; check $DL; }
