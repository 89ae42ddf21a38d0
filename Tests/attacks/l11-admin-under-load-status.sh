#!/bin/bash
# L11: 4 writers (flushstorm) while an admin pauses, resumes, changes tunables and polls status;
# status must stay consistent (hydrated <= total, counters monotonic, clients = connections);
# then `remove` (refused: ExportInUse) and `remove --force` while they write: every write replied
# to before a replied FLUSH must be in the destination left behind; no reply after the job is gone.
set -u; . "$(dirname "$0")/lib-live.sh"
N=4; mkdata $W/src 64; cp $W/src $W/src.orig
ldaemon
c start j --source $W/src --dest $W/dst --export --rate-limit 4M >/dev/null
for i in $(seq 0 $((N-1))); do python3 "$(dirname "$0")/py/flushstorm.py" "$(uri j)" $i $N $W/log.$i 1 2>>$W/writers.err & PIDS+=($!); done
python3 - "$BIN/clonectl" $SOCK $N > $W/status.out 2>&1 <<'PY' &
import json, subprocess, sys, time
cl, sock, n = sys.argv[1], sys.argv[2], int(sys.argv[3]); prev = None; issues = 0
for k in range(60):
    if k == 10: subprocess.run([cl, "--socket", sock, "pause", "j"], capture_output=True)
    if k == 20: subprocess.run([cl, "--socket", sock, "resume", "j"], capture_output=True)
    if k == 25: subprocess.run([cl, "--socket", sock, "set", "j", "--rate-limit", "1M", "--batch-size", "3", "--threshold", "5"], capture_output=True)
    if k == 35: subprocess.run([cl, "--socket", sock, "set", "j", "--commit-interval", "50ms", "--rate-limit", "0"], capture_output=True)
    r = subprocess.run([cl, "--socket", sock, "status", "j", "--json"], capture_output=True, text=True)
    if r.returncode: print("status rc", r.returncode, r.stderr[:100]); time.sleep(0.1); continue
    d = json.loads(r.stdout); e = d.get("export") or {}; io = e.get("io") or {}; rg = d["regions"]
    cur = (rg["hydrated"], io.get("written_bytes", 0), io.get("read_bytes", 0), io.get("hydrated_regions", 0))
    if rg["hydrated"] > rg["total"]: issues += 1; print("hydrated > total", rg)
    if prev and any(c < p for c, p in zip(cur, prev)): issues += 1; print("counter went back", prev, "->", cur)
    if d["state"] == "complete" and rg["hydrated"] != rg["total"]: issues += 1; print("complete but", rg)
    if e.get("clients") not in (n, None) and k < 50: print("clients", e.get("clients"))
    prev = cur; time.sleep(0.1)
print("status issues:", issues, "last", d["state"], rg, e.get("clients"), io)
PY
SP=$!; PIDS+=($SP); wait $SP; cat $W/status.out
c remove j >/dev/null 2>&1; say "remove with clients: rc=$? (65 = ExportInUse expected)"
c remove j --force >/dev/null 2>&1; say "remove --force: rc=$?"
sleep 2; tail -4 $W/writers.err
python3 "$(dirname "$0")/py/flushcheck.py" $W/dst $W/src.orig $N $(for i in $(seq 0 $((N-1))); do echo $W/log.$i; done) && say "HELD (for regions written by clients; the destination of a removed incomplete job is itself incomplete)" || say "DATA LOSS"
