#!/bin/bash
# C1: the metadata file is rolled back to an older copy (restore of a backup / VM snapshot of
# the state directory, `cp` of an earlier metadata) while the daemon is down. Regions committed
# and released after that copy are "not hydrated" again: the copier re-reads them from the
# released source (holes / zeros) and, on a block-device destination (dest_zeroed false),
# zeroes the destination range -- the only copy of those regions.
# DEST_KIND=file: a destination file the job creates (dest_zeroed): holes are skipped, not written.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
if [ "${DEST_KIND:-block}" = file ]; then DST=$W/dst.img; else truncate -s 64M $W/dst.back; DST=$(loop $W/dst.back); fi
daemon
c start j1 --source $W/src.img --dest $DST --discard-source --rate-limit 16M >/dev/null
sleep 1.2; c commit j1 >/dev/null
cp $ST/jobs/j1.meta $W/meta.backup            # "backup" of the state directory
say "at backup: $(state j1)"
sleep 2.5; c commit j1 >/dev/null; sleep 0.5
say "before stop: $(state j1)"
stopd
cp $W/meta.backup $ST/jobs/j1.meta            # rollback
daemon
say "after restart on rolled-back metadata: $(state j1)"
c wait j1 --timeout 60s -q; say "j1: $(state j1)"
if cmp -s $DST $W/src.orig; then say "HELD"; else say "DATA LOSS: dest differs from original source: $(cmp $DST $W/src.orig | head -1); zero MiB in dest: $(python3 - $DST <<'P'
import sys
f=open(sys.argv[1],'rb'); z=0
while True:
    b=f.read(1<<20)
    if not b: break
    z+= b.count(0)==len(b)
print(z)
P
)"; fi
