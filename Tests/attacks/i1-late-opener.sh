#!/bin/bash
# I1: the in-use check runs once, at start/open. A process (a VM started too early, a backup
# tool) that opens the source image AFTER the discard-source job started is never noticed: its
# writes to already-hydrated regions are silently lost (the clone keeps the old bytes) and the
# regions it reads are punched under it (reads as zeros).
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 1
python3 - $W/src.img <<'P' &
import os,sys,time
fd=os.open(sys.argv[1],os.O_RDWR)
os.pwrite(fd,b"WRITTEN-BY-VM"*100,4096)          # region 0: already hydrated and released
before=os.pread(fd,16,40<<20)                   # region at 40 MiB: not yet hydrated
time.sleep(4)
after=os.pread(fd,16,40<<20)
print("   late opener: 40MiB before", before[:8].hex(), "after", after[:8].hex())
time.sleep(1)
P
PIDS+=($!)
sleep 2; say "j1 while the late opener holds the source: $(state j1)"
c wait j1 --timeout 60s -q; sleep 3; say "j1: $(state j1)"
grep -c WRITTEN-BY-VM $W/dst.img >/dev/null && say "the opener's write reached the clone" || say "LOST: the late opener's write to the source is not in the clone (and the source range is punched)"
