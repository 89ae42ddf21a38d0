#!/bin/bash
# L6: a live clone of a remote source (nbdkit, reads delayed 1 s); the nbdkit server is killed -9
# while client reads of unhydrated regions are in flight. What does the clone's client see, and
# how fast? Do writes go on? Then the server comes back (same file): the job must resume by itself
# and the clone must equal the source plus the client's writes.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 64; cp $W/src $W/src.orig
rk() { rm -f $W/remote.sock; nbdkit -U $W/remote.sock -e vm1 -P $W/nbdkit.pid --filter=delay file $W/src rdelay=${1}ms; sleep 0.3; NK=$(cat $W/nbdkit.pid); PIDS+=($NK); }
rk 1000
ldaemon
c start j --source "nbd+unix:///vm1?socket=$W/remote.sock" --dest $W/dst --export --rate-limit 2M >/dev/null
sleep 2
cat > $W/cl.py <<'PY'
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1]); size = h.get_size()
def t(label, f):
    t0 = time.time()
    try: f(); r = "ok"
    except nbd.Error as e: r = f"error {e.errnum} {str(e)[:90]}"
    print(f"{label}: {r} after {time.time()-t0:.2f}s", flush=True)
import threading
ths = [threading.Thread(target=t, args=(f"read @{o>>20}M", lambda o=o: h.pread(65536, o))) for o in (40<<20, 50<<20, 60<<20)]
for x in ths: x.start()
for x in ths: x.join()
t("whole-region write @45M", lambda: h.pwrite(b"W" * 65536, 45 << 20))
t("partial write @55M", lambda: h.pwrite(b"P" * 4096, 55 << 20))
t("flush", lambda: h.flush())
t("read @61M", lambda: h.pread(65536, 61 << 20))
PY
python3 $W/cl.py "$(uri j)" > $W/cl.out 2>&1 & CL=$!; PIDS+=($CL)
sleep 0.4; kill -9 $NK; say "nbdkit killed"
for i in $(seq 60); do kill -0 $CL 2>/dev/null || break; sleep 1; done
kill -0 $CL 2>/dev/null && say "HANG: client still waiting after 60 s"
cat $W/cl.out
say "status: $(jst j | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["state"], (d.get("error") or {}).get("code"), (d.get("error") or {}).get("message","")[:150])')"
rk 0; say "nbdkit back"
c set j --rate-limit 0 >/dev/null
c wait j --timeout 120s -q; say "job: $(state j)"
python3 - "$(uri j)" $W/src.orig <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); s = open(sys.argv[2], 'rb').read(); bad = 0
for o in range(0, len(s), 1 << 20):
    d = h.pread(1 << 20, o); e = bytearray(s[o:o+(1<<20)])
    if o == 45 << 20: e[0:65536] = b"W" * 65536
    if d != bytes(e):
        w = 55 << 20
        if o == w and d[4096:] == bytes(e[4096:]) and d[:4096] in (b"P"*4096, bytes(e[:4096])): continue
        bad += 1; print("MISMATCH at MiB", o >> 20)
print("DATA LOSS" if bad else "HELD")
PY
