#!/usr/bin/env bash
# Which calls consume a writeback error (errseq) on this kernel? (issue 11; docs/reliability.md)
# A loop device over a file that nbdfuse serves from an nbdkit memory export behind the error
# filter: while the trigger file exists every write of the export fails (EIO), so the loop
# device's page-cache writeback fails asynchronously. For each sequence of calls, prints what
# each call returned (0 or -errno). Needs root, nbdkit and libnbd-bin (nbdfuse). Cleans up.
set -u
D=$(mktemp -d /tmp/errseq.XXXXXX); T=$D/trigger; mkdir -p "$D/mnt"
LOOP=""; FPID=""
cleanup() {
  rm -f "$T"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  mountpoint -q "$D/mnt" && umount "$D/mnt"
  [ -n "$FPID" ] && wait "$FPID" 2>/dev/null
  [ -f "$D/nbdkit.pid" ] && kill "$(cat "$D/nbdkit.pid")"
  sleep 0.2; rm -rf "$D"
}
trap cleanup EXIT
nbdkit -U "$D/sock" -P "$D/nbdkit.pid" --filter=error memory 64M \
  error-pwrite-rate=100% error-pwrite-file="$T" error=EIO
for _ in $(seq 50); do [ -S "$D/sock" ] && break; sleep 0.1; done
nbdfuse "$D/mnt/disk" "nbd+unix:///?socket=$D/sock" 2>/dev/null & FPID=$!
for _ in $(seq 50); do [ -e "$D/mnt/disk" ] && break; sleep 0.1; done
LOOP=$(losetup -f --show "$D/mnt/disk")
echo "kernel $(uname -r), loop device $LOOP"
python3 - "$LOOP" "$T" <<'PY'
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4
def sfr(fd, fl):
    r = libc.sync_file_range(fd, ctypes.c_long(0), ctypes.c_long(1 << 20), fl)
    return 0 if r == 0 else -ctypes.get_errno()
def fdatasync(fd):
    try: os.fdatasync(fd); return 0
    except OSError as e: return -e.errno
loop, trig = sys.argv[1], sys.argv[2]
def trial(name, steps):
    fd = os.open(loop, os.O_RDWR | os.O_EXCL)      # the descriptor the commit fdatasyncs
    fd2 = os.open(loop, os.O_RDONLY)               # a second open file description
    os.pwrite(fd, b'x' * (1 << 20), 0); os.fdatasync(fd)
    open(trig, 'w').close()                        # every write of the export fails from now
    os.pwrite(fd, os.urandom(1 << 20), 0)          # dirty pages whose writeback will fail
    res = []
    for s in steps:
        if s == 'W': res.append(('sync_file_range(WRITE)', sfr(fd, WRITE))); time.sleep(0.5)
        if s == 'D': res.append(('fadvise(DONTNEED)', os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_DONTNEED) or 0))
        if s == 'A': res.append(('sync_file_range(WAIT|WRITE|WAIT)', sfr(fd, WAIT_BEFORE | WRITE | WAIT_AFTER)))
        if s == 'S': res.append(('sync_file_range(WAIT|WRITE|WAIT) on 2nd fd', sfr(fd2, WAIT_BEFORE | WRITE | WAIT_AFTER)))
    os.remove(trig)                                # the export heals
    res.append(('fdatasync', fdatasync(fd)))
    res.append(('fdatasync again', fdatasync(fd)))
    os.close(fd); os.close(fd2)
    print(f"{name}:\n  " + "\n  ".join(f"{c} -> {r}" for c, r in res))
trial('start writeback + drop clean pages', 'WD')
trial('twice', 'WDWD')
trial('old evict: wait on the synced descriptor', 'WA')
trial('new evict: wait on a second descriptor', 'WSD')
PY
