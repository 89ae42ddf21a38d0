#!/bin/bash
# L16: --hydrate-on-read --discard-source live clone: 3 readers sweep the clone (queueing
# background hydration), 3 writers (flushstorm) write and flush, the copier runs slowly; kill -9 at
# random moments, ROUNDS times. After each restart: flushed writes present, and every block no
# client wrote equals the original source (a source region released before its hydration was
# durable would read as zeros).
set -u; . "$(dirname "$0")/lib-live.sh"
N=3; ROUNDS=${ROUNDS:-4}; mkdata $W/src 256; cp $W/src $W/src.orig
ldaemon
c start j --source $W/src --dest $W/dst --export --discard-source --hydrate-on-read --rate-limit 2M --commit-interval 200ms >/dev/null
cat > $W/reader.py <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); size = h.get_size(); rnd = random.Random(int(sys.argv[2]))
try:
    while True:
        off = rnd.randrange(0, size // 65536) * 65536; h.pread(65536, off); __import__("time").sleep(0.005)
except Exception as e: pass
PY
verdict=HELD
for r in $(seq $ROUNDS); do
  WP=()
  for i in $(seq 0 $((N-1))); do
    python3 "$(dirname "$0")/py/flushstorm.py" "$(uri j)" $i $N $W/log.$i $r 2>>$W/writers.err & WP+=($!); PIDS+=($!)
    python3 $W/reader.py "$(uri j)" $r$i & WP+=($!); PIDS+=($!)
  done
  sleep $(python3 -c "import random; print(round(random.uniform(0.5, 2.5),2))")
  say "round $r: $(state j); kill -9"; kill9
  for p in "${WP[@]}"; do wait $p 2>/dev/null; done
  ldaemon; say "restarted: $(state j)"
  nbdcopy "$(uri j)" $W/img || { verdict=FAILED; break; }
  python3 "$(dirname "$0")/py/flushcheck.py" $W/img $W/src.orig $N $W/log.0 $W/log.1 $W/log.2 || verdict="DATA LOSS"
  python3 - $W/img $W/src.orig $W/log.* <<'PY' || verdict="DATA LOSS"
import sys
img = open(sys.argv[1],'rb').read(); src = open(sys.argv[2],'rb').read(); touched = set()
for lp in sys.argv[3:]:
    for l in open(lp):
        p = l.split()
        if p[0] == 'W':
            o, n = int(p[2]), int(p[3])
            for b in range(o, o+n, 4096): touched.add(b)
bad = [b for b in range(0, len(src), 4096) if b not in touched and img[b:b+4096] != src[b:b+4096]]
print(f"untouched blocks differing from the source: {len(bad)}", "regions", sorted(set(b//65536 for b in bad))[:8])
sys.exit(1 if bad else 0)
PY
done
say "allocated source: $(du -k $W/src | cut -f1) KiB of $((256*1024))"
say "$verdict"
