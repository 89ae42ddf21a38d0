#!/bin/bash
# W1: destination = loop device over an image file on a filesystem whose disk fails writes for a
# moment (ext2 over loop over nbdfuse over nbdkit+error filter: data writeback errors are only
# recorded in the image file's errseq). A loop device reports its backing file's writeback error
# through ONE file description (the loop driver's), to the first REQ_PREFLUSH -- i.e. to whoever
# fsyncs the loop device first. A foreign process that fsyncs the destination device (a monitoring
# agent, `blockdev --flushbufs`, a backup tool) consumes it; the job's own fdatasync then returns 0.
# FLUSHER=0 runs the same scenario without the foreign fsyncs (control).
set -u; . "$(dirname "$0")/lib.sh"
FLUSHER=${FLUSHER:-1}
mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdir -p $W/nbd $W/fl
nbdkit -f -U $W/nbd.sock --filter=error memory 256M error-pwrite-rate=100% error-pwrite-file=$W/trigger \
  error-zero-rate=100% error-zero-file=$W/trigger error=EIO >/dev/null 2>&1 & PIDS+=($!)
for i in $(seq 50); do [ -S $W/nbd.sock ] && break; sleep 0.1; done
nbdfuse $W/nbd/disk "nbd+unix:///?socket=$W/nbd.sock" >/dev/null 2>&1 & PIDS+=($!)
for i in $(seq 100); do [ -e $W/nbd/disk ] && break; sleep 0.1; done
LN=$(loop $W/nbd/disk); mkfs.ext2 -q -F $LN; mount -o errors=continue,noatime,lazytime $LN $W/fl
dd if=/dev/zero of=$W/fl/dest.img bs=1M count=64 status=none conv=fsync
LD=$(loop $W/fl/dest.img)
daemon
c start j1 --source $W/src.img --dest $LD --discard-source --rate-limit 16M --commit-interval 200ms >/dev/null
sleep 1
if [ $FLUSHER = 1 ]; then
python3 - $LD <<'P' > $W/flusher.out 2>&1 &
import os,sys,time,errno
eio=0; t=time.time()
while time.time()-t < 4:
    fd=os.open(sys.argv[1],os.O_RDONLY)
    try: os.fsync(fd)
    except OSError as e: eio+=1
    os.close(fd); time.sleep(0.01)
print("foreign fsyncs that got EIO:",eio)
P
PIDS+=($!)
fi
touch $W/trigger; sleep ${WINDOW:-0.15}; rm -f $W/trigger
say "during/after the failing window: $(state j1)"
c wait j1 --timeout 60s -q; sleep 4; FINAL=$(state j1); say "j1: $FINAL"
cat $W/flusher.out 2>/dev/null | sed 's/^/   /'
kill9; losetup -d $LD; umount $W/fl; mount $LN $W/fl   # re-read from the disk, not the page cache
bad=$(python3 -c "
a=open('$W/fl/dest.img','rb').read(); b=open('$W/src.orig','rb').read()
print(sum(1 for i in range(0,len(b),1<<16) if a[i:i+(1<<16)]!=b[i:i+(1<<16)]))")
say "source allocated now: $(du -k $W/src.img|cut -f1) KiB; clone regions differing from the source: $bad"
case "$FINAL" in complete*) if [ "$bad" = 0 ]; then say "HELD (no error lost)"; else say "DATA LOSS: job complete, source released, $bad regions of the clone are not the source's data"; fi;;
  *) say "HELD this time: the job saw the error itself ($FINAL)";; esac
