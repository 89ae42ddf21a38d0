#!/bin/bash
# E1: aliases and in-use sources/destinations that must be refused (SameDevice / DeviceInUse).
# Prints REFUSED (good) or ACCEPTED (bad) per case; every accepted job is removed at once.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/f.img 64; mkdir -p $W/mnt $W/bind $W/fuse
daemon
try() { local name=$1; shift; local out; out=$(c start $name "$@" --no-hydration 2>&1); local rc=$?
  if [ $rc = 0 ]; then echo "ACCEPTED  $name: $*"; c remove $name --force >/dev/null 2>&1; else echo "REFUSED   $name: $(echo "$out" | head -1 | cut -c1-200)"; fi; }
ln -s $W/f.img $W/link.img
try sym --source $W/f.img --dest $W/link.img
ln $W/f.img $W/hard.img
try hard --source $W/f.img --dest $W/hard.img
touch $W/bind/b.img; mount --bind $W/f.img $W/bind/b.img; MOUNTS+=($W/bind/b.img)
try bindm --source $W/f.img --dest $W/bind/b.img
umount $W/bind/b.img; MOUNTS=()
L1=$(loop --offset 0 --sizelimit $((48<<20)) $W/f.img); L2=$(loop --offset $((16<<20)) $W/f.img)
try loops-overlap --source $L1 --dest $L2
unloop $L1; unloop $L2
L1=$(loop --offset 0 --sizelimit $((32<<20)) $W/f.img); L2=$(loop --offset $((32<<20)) $W/f.img)
try loops-disjoint-should-accept --source $L1 --dest $L2
unloop $L1; unloop $L2
truncate -s 64M $W/d.img
try metadata-is-dest-symlink --source $W/f.img --dest $W/d.img --metadata $W/link.img
# FUSE alias: nbdkit file plugin + nbdfuse exposes f.img's bytes as $W/fuse/nbd
nbdkit -f -U $W/nbd.sock file $W/f.img >/dev/null 2>&1 & PIDS+=($!)
for i in $(seq 50); do [ -S $W/nbd.sock ] && break; sleep 0.1; done
nbdfuse $W/fuse/nbd "nbd+unix:///?socket=$W/nbd.sock" >/dev/null 2>&1 & PIDS+=($!); MOUNTS+=($W/fuse)
for i in $(seq 50); do [ -e $W/fuse/nbd ] && break; sleep 0.1; done
try fuse-alias-dest --source $W/f.img --dest $W/fuse/nbd --discard-source
try fuse-alias-src --source $W/fuse/nbd --dest $W/f.img
umount $W/fuse; MOUNTS=()
# a filesystem inside the source file, mounted through a loop device; dest file inside it
mkfs.ext4 -q -F $W/d.img; L3=$(loop $W/d.img); mount $L3 $W/mnt; MOUNTS+=($W/mnt)
try file-on-fs-in-dest --source $W/f.img --dest $W/d.img
try dest-on-fs-over-source --source $W/d.img --dest $W/mnt/x.img
try meta-on-fs-over-dest --source $W/f.img --dest $L3 --metadata $W/mnt/m.meta
umount $W/mnt; MOUNTS=(); unloop $L3
# relative paths and .. via clonectl
(cd $W && try rel-dotdot --source ./f.img --dest ../$(basename $W)/f.img)
# process holding the source with only an mmap (documented as not detected)
python3 -c "import mmap,os,time,sys; f=open('$W/f.img','r+b'); m=mmap.mmap(f.fileno(),0); f.close(); sys.stdout.write('x'); sys.stdout.flush(); time.sleep(60)" > $W/mm.out & PIDS+=($!)
sleep 1; try mmap-only-holder --source $W/f.img --dest $W/d2.img --discard-source
