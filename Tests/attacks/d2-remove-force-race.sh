#!/bin/bash
# D2: control calls are serialized per job NAME, but devices are shared across names.
# `remove j1 --force` closes j1 (its locks on source and destination go) BEFORE it writes the
# kept record that protects the destination. A `start j2 --dest <j1's dest>` arriving in that
# window passes both the lock and the kept-record check. strace delays the metadata rename by
# 3 s to widen the window deterministically (naturally it is a few fsyncs long).
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdata $W/other.img 64
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2; say "j1: $(state j1)"
strace -f -qq -o $W/strace.log -p $DPID -e trace=rename,renameat,renameat2 -P $ST/jobs/j1.meta \
   -e inject=rename,renameat,renameat2:delay_exit=3000000 & SPID=$!; PIDS+=($SPID)
sleep 1
c remove j1 --force > $W/remove.out 2>&1 & RPID=$!
sleep 1
say "start j2 onto j1's destination while remove --force is in progress:"
c start j2 --source $W/other.img --dest $W/dst.img; echo "rc=$?"
wait $RPID; sed 's/^/   remove: /' $W/remove.out | head -2; kill $SPID; wait $SPID 2>/dev/null
c wait j2 --timeout 60s -q; c remove j2 >/dev/null 2>&1
KEPT=$(ls $ST/kept/*.meta 2>/dev/null || echo $ST/jobs/j1.meta); c start j1 --metadata $KEPT --source $W/src.img --dest $W/dst.img >/dev/null; c wait j1 --timeout 60s -q
if cmp -s $W/dst.img $W/src.orig; then say HELD; else say "DATA LOSS: the kept job's destination was overwritten by j2: $(cmp $W/dst.img $W/src.orig | head -1)"; fi
