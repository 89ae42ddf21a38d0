#!/bin/bash
# R1: while the daemon is down the source is replaced at its path: (a) deleted and re-created
# with the same bytes/size, (b) a copy renamed onto the path. Expected: DeviceUnconfirmed, no
# writes, no releases; the error text as clonectl prints it. Then the original file is put back
# (renamed to the path: same inode) and `resume` must go on and produce an exact clone.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 64; cp $W/src.img $W/src.orig
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 16M >/dev/null
sleep 2; kill9
mv $W/src.img $W/src.saved
cp $W/src.orig $W/src.img                      # (a) re-created, same size
daemon; say "(a) after restart: $(state j1)"
c resume j1; echo "   resume rc=$?"
kill9; rm $W/src.img; cp $W/src.orig $W/tmp.img; mv $W/tmp.img $W/src.img   # (b) renamed copy
daemon; say "(b) after restart: $(state j1)"; a=$(stat -c %b $W/src.img)
sleep 1; [ "$(stat -c %b $W/src.img)" = "$a" ] && say "   nothing released on the impostor"
mv $W/src.saved $W/src.img
c resume j1; echo "   resume rc=$?"; c wait j1 --timeout 60s -q; say "final: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD clone ok"; else say "DATA LOSS $(cmp $W/dst.img $W/src.orig|head -1)"; fi
