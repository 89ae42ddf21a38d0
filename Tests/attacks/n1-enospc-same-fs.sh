#!/bin/bash
# N1: source and destination files on one small filesystem (ext4, then btrfs), discard-source:
# the filesystem fills up (a filler file takes the budget's room), the job pauses with NoSpace;
# the filler is deleted, `resume`, and the clone must equal the source.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.orig 48
for fs in ${FSS:-ext4 btrfs}; do
  truncate -s 200M $W/fs-$fs.img; mkdir -p $W/m-$fs
  if [ $fs = ext4 ]; then mkfs.ext4 -q -F $W/fs-$fs.img; else mkfs.btrfs -q -f --mixed $W/fs-$fs.img >/dev/null 2>&1; fi
  L=$(loop $W/fs-$fs.img); mount $L $W/m-$fs; MOUNTS+=($W/m-$fs); M=$W/m-$fs
  cp $W/src.orig $M/src.img || exit 1; sync
  avail=$(df -B1M --output=avail $M | tail -1); fill=$((avail - ${FREE:-3})); [ $fill -lt 1 ] && fill=1
  head -c $((fill<<20)) /dev/urandom > $M/filler; sync
  say "$fs: free $(df -B1M --output=avail $M | tail -1) MiB with filler, source 48 MiB"
  [ -z "$DPID" ] && daemon
  c start $fs --source $M/src.img --dest $M/dst.img --discard-source --space-budget 4M --region-size 64K >/dev/null
  for i in $(seq 60); do case "$(state $fs)" in hydrating*) sleep 0.5;; *) break;; esac; done; say "$fs: $(state $fs)"
  rm $M/filler; sync
  c resume $fs >/dev/null; echo "resume rc=$?"; c wait $fs --timeout 60s -q; say "$fs: $(state $fs)"
  if cmp -s $M/dst.img $W/src.orig; then say "$fs: HELD clone ok; source still allocated: $(du -k $M/src.img | cut -f1) KiB"; else say "$fs: DATA LOSS $(cmp $M/dst.img $W/src.orig|head -1)"; fi
  c remove $fs >/dev/null
done
