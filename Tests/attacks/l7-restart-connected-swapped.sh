#!/bin/bash
# L7: (1) a client stays connected across a graceful restart and a kill -9 and keeps writing: what
# does it see, does anything land after the restart? (2) an exported job still hydrating, whose
# destination is a loop device: across a restart the loop devices are swapped (dest node now over
# another file, which is also another job's clone) — the export must not be served over the wrong
# file, and nothing may be written there.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 32; cp $W/src $W/src.orig
truncate -s 32M $W/d1.img $W/d2.img; mkdata $W/d2.img 32; cp $W/d2.img $W/d2.orig
L1=$(loop $W/d1.img)
ldaemon
c start j --source $W/src --dest $L1 --export --rate-limit 2M >/dev/null
cat > $W/w.py <<'PY'
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1]); i = 0
while True:
    i += 1
    try: h.pwrite(bytes([i % 250 + 1]) * 4096, (i % 64) * 4096); h.flush()
    except Exception as e:
        print(f"write {i}: {e}", flush=True)
        try: h.pread(4096, 0); print("read after error ok", flush=True)
        except Exception as e2: print(f"read after error: {e2}", flush=True)
        break
    time.sleep(0.01)
print(f"client ended after {i} writes", flush=True)
PY
python3 $W/w.py "$(uri j)" > $W/w1.out 2>&1 & WP=$!; PIDS+=($WP)
sleep 1; stopd; say "graceful stop done"; sleep 1; cat $W/w1.out
ldaemon; sleep 1
python3 $W/w.py "$(uri j)" > $W/w2.out 2>&1 & WP=$!; PIDS+=($WP)
sleep 1; kill9; say "kill -9 done"; sleep 1; cat $W/w2.out
# (2) swap: d1's loop now over d2.img (a foreign disk with its own data), and nobody over d1
losetup -d $L1; L1b=$(losetup -f --show $W/d2.img); LOOPS+=($L1b); say "now $L1b over d2.img (was $L1 over d1.img)"
ldaemon
say "status: $(jst j | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["state"], d["export"] and d["export"]["uri"], (d.get("error") or {}).get("code"))')"
if nbdinfo --size "$(uri j)" >/dev/null 2>&1; then
  say "served!"; nbdsh -u "$(uri j)" -c 'h.pwrite(b"Z"*65536, 0); h.flush()' 2>&1 | tail -1
else say "export not served"; fi
sleep 2
cmp -s $W/d2.img $W/d2.orig && say "HELD: the foreign file is untouched" || say "DATA LOSS: the foreign file d2.img was written: $(cmp $W/d2.img $W/d2.orig | head -1)"
