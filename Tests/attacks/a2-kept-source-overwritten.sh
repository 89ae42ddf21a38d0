#!/bin/bash
# A2: `remove --force` of a partly released discard-source job keeps its metadata and refuses a
# new job onto its DESTINATION, but not onto its SOURCE -- whose unreleased regions are the only
# copy of the data not hydrated yet. A new job writing over the kept job's source is accepted;
# resuming the kept job then hydrates the new job's bytes into the old job's destination.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
mkdata $W/other.img 64
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2; c pause j1 >/dev/null
say "j1: $(state j1)"
c remove j1 --force | sed 's/^/   /'
KEPT=$(ls $ST/kept/*.meta 2>/dev/null || echo $ST/jobs/j1.meta)
say "new job j2 writing over j1's source (kept record, partly released):"
c start j2 --source $W/other.img --dest $W/src.img; echo "rc=$?"
c wait j2 --timeout 60s -q; c remove j2 >/dev/null 2>&1
say "resume the kept job:"
c start j1 --metadata "$KEPT" --source $W/src.img --dest $W/dst.img; echo "rc=$?"
c wait j1 --timeout 60s -q; say "j1: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD"; else say "DATA LOSS: j1's clone differs from its original source: $(cmp $W/dst.img $W/src.orig | head -1)"; fi
