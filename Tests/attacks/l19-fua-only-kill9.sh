#!/bin/bash
# L19: FUA instead of FLUSH: B writes with FUA (partial, whole regions, write-zeroes) and nobody
# flushes; kill -9 right after the last FUA reply; every FUA write must be there after restart.
set -u; . "$(dirname "$0")/lib-live.sh"
ldaemon; verdict=HELD
for r in $(seq ${ROUNDS:-5}); do
  mkdata $W/src$r 64
  c start j$r --source $W/src$r --dest $W/dst$r --export --rate-limit 1M --discard-source --commit-interval 10s >/dev/null
  cp $W/src$r $W/orig$r
  python3 - "$(uri j$r)" $W/orig$r $W/model$r $r <<'PY'
import nbd, random, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1]); b = nbd.NBD(); b.connect_uri(sys.argv[1])
size = a.get_size(); m = bytearray(open(sys.argv[2], 'rb').read()); rnd = random.Random(int(sys.argv[4])); R = 65536
for batch in range(rnd.randint(3, 12)):
    for _ in range(20):
        reg = rnd.randrange(size // R); op = rnd.random()
        if op < 0.5:
            off = reg * R + rnd.randrange(16) * 4096; d = bytes([rnd.randrange(1, 256)]) * 4096; b.pwrite(d, off, flags=nbd.CMD_FLAG_FUA); m[off:off+4096] = d
        elif op < 0.8:
            d = bytes([rnd.randrange(1, 256)]) * R; b.pwrite(d, reg * R, flags=nbd.CMD_FLAG_FUA); m[reg*R:reg*R+R] = d
        else:
            b.zero(R, reg * R, flags=nbd.CMD_FLAG_FUA); m[reg*R:reg*R+R] = bytes(R)
    pass
open(sys.argv[3], 'wb').write(m)
PY
  kill9; ldaemon
  nbdcopy "$(uri j$r)" $W/img$r
  if cmp -s $W/img$r $W/model$r; then say "round $r: HELD"; else say "round $r: DATA LOSS: $(cmp $W/img$r $W/model$r | head -1)"; verdict="DATA LOSS"; fi
  c remove j$r --force >/dev/null 2>&1
done
say "$verdict"
