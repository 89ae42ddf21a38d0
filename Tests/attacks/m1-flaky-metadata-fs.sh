#!/bin/bash
# M1: the METADATA lives on an ext4 whose disk starts failing every write (nbdkit error filter
# -> nbdfuse -> loop -> ext4) in the middle of a discard-source job. Expected: the job fails
# (metadata mode fail), releases nothing more; after the disk recovers and the filesystem is
# remounted (journal replay), the restarted job finishes and the clone equals the source.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdir -p $W/nbd $W/mm
nbdkit -f -U $W/nbd.sock --filter=error memory 128M error-pwrite-rate=100% error-pwrite-file=$W/trigger \
  error-zero-rate=100% error-zero-file=$W/trigger error=EIO >/dev/null 2>&1 & PIDS+=($!)
for i in $(seq 50); do [ -S $W/nbd.sock ] && break; sleep 0.1; done
nbdfuse $W/nbd/disk "nbd+unix:///?socket=$W/nbd.sock" >/dev/null 2>&1 & NF=$!; PIDS+=($NF); MOUNTS+=($W/nbd)
for i in $(seq 50); do [ -e $W/nbd/disk ] && break; sleep 0.1; done
L=$(loop $W/nbd/disk); mkfs.ext4 -q -F $L; mount $L $W/mm; MOUNTS+=($W/mm)
daemon
c start j1 --source $W/src.img --dest $W/dst.img --metadata $W/mm/j1.meta --discard-source --rate-limit 16M --commit-interval 100ms >/dev/null
sleep 1.5; touch $W/trigger; say "metadata disk failing now: $(state j1)"
sleep 2; a=$(state j1); sleep 1.5; b=$(state j1)
say "after 2s: $a"; say "after 3.5s: $b"
c status j1 --json | python3 -c 'import json,sys;d=json.load(sys.stdin);print("   metadata mode:",d["metadata"]["mode"],"error:",(d["error"] or {}).get("message","")[:200])'
kill9; rm -f $W/trigger
umount $W/mm; mount $L $W/mm || { fsck.ext4 -fy $L >/dev/null; mount $L $W/mm; }; say "metadata fs remounted: $(findmnt -n -o OPTIONS $W/mm)"
$BIN/clonectl check $W/mm/j1.meta | head -1
daemon; say "restarted: $(state j1)"
c resume j1 >/dev/null 2>&1; c wait j1 --timeout 60s -q; say "final: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD clone ok"; else say "DATA LOSS: $(cmp $W/dst.img $W/src.orig|head -1)"; fi
