#!/bin/bash
# A3: the kept-record guard compares the new destination with the kept destination by path,
# identity or stable id -- not by what the bytes live on. A kept job whose destination is the
# FILE D.img is not protected against a new job whose destination is a loop device over D.img
# (and vice versa, once the kept job's loop device is detached).
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdata $W/other.img 64
daemon
c start j1 --source $W/src.img --dest $W/D.img --discard-source --rate-limit 16M >/dev/null
sleep 2; c pause j1 >/dev/null; say "j1: $(state j1)"
c remove j1 --force | head -1
say "same path is refused (expected):"; c start j2 --source $W/other.img --dest $W/D.img --no-hydration; echo "rc=$?"
LD=$(loop $W/D.img)
say "a loop device over the kept destination file:"
c start j2 --source $W/other.img --dest $LD; echo "rc=$?"
c wait j2 --timeout 60s -q; c remove j2 >/dev/null 2>&1; unloop $LD
KEPT=$(ls $ST/kept/*.meta 2>/dev/null || echo $ST/jobs/j1.meta)
c start j1 --metadata "$KEPT" --source $W/src.img --dest $W/D.img >/dev/null; echo "resume kept rc=$?"
c wait j1 --timeout 60s -q; say "j1: $(state j1)"
if cmp -s $W/D.img $W/src.orig; then say "HELD"; else say "DATA LOSS: kept job's destination overwritten through a loop alias: $(cmp $W/D.img $W/src.orig|head -1)"; fi
