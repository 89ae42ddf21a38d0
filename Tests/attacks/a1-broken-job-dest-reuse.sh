#!/bin/bash
# A1: a discard-source job that cannot be reopened after a restart (source missing /
# DeviceUnconfirmed) holds no lock on its destination, and JobManager.create only checks
# *kept* records: a new job writing over that destination is accepted, destroying the only
# copy of the regions already released from the first job's source.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
mkdata $W/other.img 64
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M --region-size 64K >/dev/null
sleep 2.5; c commit j1 >/dev/null; sleep 0.3
say "j1 before crash: $(state j1)"
kill9
# the source is away for a moment (renumbered disk, moved image, unplugged USB...)
mv $W/src.img $W/src.away
daemon
say "j1 after restart: $(state j1)"
say "new job j2 onto j1's destination (j1 is failed, not removed):"
c start j2 --source $W/other.img --dest $W/dst.img; echo "rc=$?"
c wait j2 --timeout 60s -q; say "j2: $(state j2)"
mv $W/src.away $W/src.img
c remove j2 >/dev/null
c resume j1; echo "resume rc=$?"; c wait j1 --timeout 60s -q; say "j1: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD: dst == original source"; else
  say "DATA LOSS: j1's destination differs from the original source: $(cmp $W/dst.img $W/src.orig | head -1)"; fi
