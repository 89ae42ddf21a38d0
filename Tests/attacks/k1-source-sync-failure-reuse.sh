#!/bin/bash
# K1: a discard-source job whose source sync fails (EIO from fdatasync on the source: a failing
# old disk, the very reason to migrate off it; injected here with strace on the source's path
# only) still completes, records its releases as PENDING in the metadata, and lets go of its
# devices. The source is free: a new job may use it as its destination. At the next daemon
# start, the old complete job is not "settled", so it opens its source again -- same inode and
# birth time, confirmed -- and re-releases the pending ranges: it punches holes into the new
# job's complete destination.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 32; cp $W/src.img $W/src.orig; mkdata $W/other.img 32
daemon
strace -f -qq -o $W/strace.log -p $DPID -e trace=fdatasync,fsync -P $W/src.img \
   -e inject=fdatasync,fsync:error=EIO & SPID=$!; PIDS+=($SPID)
sleep 1.5
c start a1 --source $W/src.img --dest $W/dst1.img --discard-source >/dev/null
c wait a1 --timeout 60s -q; sleep 1
kill $SPID; wait $SPID 2>/dev/null
say "a1: $(state a1); strace saw: $(grep -c EIO $W/strace.log) failed source syncs"
say "metadata of a1: $(c status a1 --json | python3 -c 'import json,sys;d=json.load(sys.stdin);print(d["discard"])')"
$BIN/clonectl dump $ST/jobs/a1.meta --json | python3 -c 'import json,sys;d=json.load(sys.stdin);print("   dump: complete:",d["complete"], "pending_release:",d.get("pending_release","(not shown by dump)"))'
say "a1's source (now all holes) is reused as the destination of a new job b2:"
c start b2 --source $W/other.img --dest $W/src.img; echo "rc=$?"
c wait b2 --timeout 60s -q; say "b2: $(state b2)"
cmp -s $W/src.img $W/other.img && say "b2's clone is good before the restart"
stopd; daemon; sleep 3
say "after restart: a1: $(state a1)  b2: $(state b2)"
if cmp -s $W/src.img $W/other.img; then say "HELD"; else
  say "DATA LOSS: b2's complete clone was punched by a1's restart: $(cmp $W/src.img $W/other.img | head -1); allocated $(du -k $W/src.img | cut -f1) KiB of 32768"; fi
