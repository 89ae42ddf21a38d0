#!/bin/bash
# A4: the kept-record guard only looks at a new job's destination. A new discard-source job that
# READS the kept job's destination (e.g. "move the half-done clone somewhere else") is accepted and
# punches it: resuming the kept job afterwards completes a clone whose released regions are holes.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2; c pause j1 >/dev/null; c remove j1 --force | head -1
say "new discard-source job reading the kept destination:"
c start j2 --source $W/dst.img --dest $W/elsewhere.img --discard-source; echo "rc=$?"
c wait j2 --timeout 60s -q; c remove j2 >/dev/null 2>&1
KEPT=$(ls $ST/kept/*.meta 2>/dev/null || echo $ST/jobs/j1.meta); c start j1 --metadata $KEPT --source $W/src.img --dest $W/dst.img >/dev/null; echo "resume kept rc=$?"
c wait j1 --timeout 60s -q; say "j1: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say HELD; else say "DATA LOSS (for the kept job): its clone completed with $(python3 -c "
a=open('$W/dst.img','rb').read(); print(sum(1 for i in range(0,len(a),1<<20) if a[i:i+(1<<20)]==bytes(1<<20)))") MiB of zeros"; fi
