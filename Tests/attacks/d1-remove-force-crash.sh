#!/bin/bash
# D1: kill -9 inside `remove --force` of a partly released discard-source job, after the
# metadata was renamed into kept/ and before the kept record (kept/NAME-UUID.json) was written.
# (strace delays the rename's return so the kill lands in that window deterministically.)
# After the restart: the job is failed (metadata NotFound), nothing refers to the moved metadata,
# nothing protects the destination, and the job cannot be removed.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdata $W/other.img 64
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2; c pause j1 >/dev/null; say "j1: $(state j1)"
strace -f -qq -o $W/strace.log -p $DPID -e trace=rename,renameat,renameat2 -P $ST/jobs/j1.meta \
   -e inject=rename,renameat,renameat2:delay_exit=5000000 & SPID=$!; PIDS+=($SPID)
sleep 1
c remove j1 --force > $W/remove.out 2>&1 & RPID=$!
sleep 2; kill9; kill $SPID 2>/dev/null; wait $RPID; wait $SPID 2>/dev/null
say "after kill -9 in remove --force: kept/: $(ls $ST/kept 2>/dev/null | tr '\n' ' ') jobs/: $(ls $ST/jobs | tr '\n' ' ')"
daemon
say "after restart: $(state j1)  $(c status j1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["error"]["message"])')"
say "remove j1 --force:"; c remove j1 --force; echo "rc=$?"
say "a new job onto j1's destination:"
c start j2 --source $W/other.img --dest $W/dst.img; echo "rc=$?"
c wait j2 --timeout 60s -q
if cmp -s $W/dst.img $W/src.orig; then say "HELD"; else say "DATA LOSS: j1's destination (only copy of the released regions) was overwritten"; fi
