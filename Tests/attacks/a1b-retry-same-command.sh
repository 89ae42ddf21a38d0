#!/bin/bash
# A1b: the most natural operator reaction to A1's failed job: run the same command again under a
# new name (the old job shows "failed"). Accepted: the new job re-copies from the partly
# released source; released regions read as holes, and because the destination already exists
# (not a fresh file) their destination ranges are punched: j1's only copy is zeroed.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2.5; kill9
mv $W/src.img $W/src.away          # source briefly unavailable at restart
daemon; say "j1 after restart: $(state j1)"
mv $W/src.away $W/src.img
say "retry: same source, same destination, new name"
c start j1-retry --source $W/src.img --dest $W/dst.img --discard-source; echo "rc=$?"
c wait j1-retry --timeout 60s -q; say "j1-retry: $(state j1-retry)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD"; else say "DATA LOSS: $(python3 -c "
import sys
a=open('$W/dst.img','rb').read(); b=open('$W/src.orig','rb').read()
print(sum(1 for i in range(0,len(a),1<<20) if a[i:i+(1<<20)]!=b[i:i+(1<<20)]),'MiB of the clone differ from the original source')")"; fi
