#!/bin/bash
# L8: the destination is a loop device over a sparse file on a small ext4 that runs out of space
# while 4 clients write (partial and whole-region, with flushes) and the copier hydrates. The
# clients must get errors (not silent success on FLUSH); after space is freed and the job resumed,
# every write replied to before a replied FLUSH must be in the clone, and the rest must match.
set -u; . "$(dirname "$0")/lib-live.sh"
N=4; mkdata $W/src 64; cp $W/src $W/src.orig
truncate -s ${FSMB:-200}M $W/fs.img; mkfs.ext4 -q -F $W/fs.img; FL=$(loop $W/fs.img); mkdir $W/m; mount $FL $W/m; MOUNTS+=($W/m)
truncate -s 64M $W/m/dst.img; DL=$(loop $W/m/dst.img)
# the loop over a file inside the mount must go before the unmount (lib.sh unmounts first)
trap '[ -n "${DPID:-}" ] && kill -9 $DPID 2>/dev/null; sleep 0.5; losetup -d $DL 2>/dev/null; cleanup' EXIT
avail=$(df -B1M --output=avail $W/m | tail -1); head -c $(( (avail - ${FREE:-24}) << 20 )) /dev/zero > $W/m/filler; sync
say "free on the destination's fs: $(df -B1M --output=avail $W/m | tail -1) MiB for a 64 MiB clone"
ldaemon
c start j --source $W/src --dest $DL --export --rate-limit 4M >/dev/null
for i in $(seq 0 $((N-1))); do python3 "$(dirname "$0")/py/flushstorm.py" "$(uri j)" $i $N $W/log.$i 1 2>>$W/writers.err & PIDS+=($!); done
for t in $(seq 40); do sleep 1; s=$(state j); case "$s" in hydrating*) ;; *) break;; esac; done
sleep 3
say "job: $s"; say "status error: $(jst j | python3 -c 'import json,sys; d=json.load(sys.stdin); print((d.get("error") or {}).get("message","")[:200])')"
cat $W/writers.err
grep -h "^F " $W/log.* | wc -l | sed 's/^/flushes replied: /'
cat > $W/untouched.py <<'PY'
import sys
img = open(sys.argv[1],'rb').read(); src = open(sys.argv[2],'rb').read(); touched = set()
for lp in sys.argv[3:]:
    for l in open(lp):
        p = l.split()
        if p[0] == 'W':
            o, n = int(p[2]), int(p[3])
            for b in range(o, o+n, 4096): touched.add(b)
bad = [b for b in range(0, len(src), 4096) if b not in touched and img[b:b+4096] != src[b:b+4096]]
print(f"untouched blocks differing from the source: {len(bad)}", "(zeros)" if bad and all(img[b:b+4096]==bytes(4096) for b in bad) else "", "regions", sorted(set(b//65536 for b in bad))[:8])
PY
# what does the export serve while the job is failed, once the page cache is dropped?
[ -z "${NODROP:-}" ] && { sync; echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs $DL 2>/dev/null; }
nbdcopy "$(uri j)" $W/img.failed && { say "served while failed$([ -z "${NODROP:-}" ] && echo ", after dropping the page cache"):"; python3 $W/untouched.py $W/img.failed $W/src.orig $W/log.*; }
rm $W/m/filler; sync
stopd; ldaemon; say "after restart: $(state j)"
say "free now: $(df -B1M --output=avail $W/m | tail -1) MiB"
c resume j >/dev/null; echo "resume rc=$?"; c set j --rate-limit 0 >/dev/null; c wait j --timeout 120s -q; say "job: $(state j)"
if [ "$(state j | cut -d' ' -f1)" = failed ]; then
  say "FAILED AGAIN after the space came back: $(jst j | python3 -c 'import json,sys; print(json.load(sys.stdin)["error"]["message"][:300])')"
  stopd; ldaemon; c resume j >/dev/null; c wait j --timeout 60s -q; say "after a second restart: $(state j)"
fi
nbdcopy "$(uri j)" $W/img
python3 "$(dirname "$0")/py/flushcheck.py" $W/img $W/src.orig $N $(for i in $(seq 0 $((N-1))); do echo $W/log.$i; done) && say HELD || say "DATA LOSS"
# everything not written by a client must equal the source
python3 $W/untouched.py $W/img $W/src.orig $W/log.*
