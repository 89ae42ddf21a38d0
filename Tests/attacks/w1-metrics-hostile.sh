#!/usr/bin/env bash
# The metrics endpoint against hostile local clients (docs/operations.md): a slot flood of silent
# connections, a request with an oversized header, a scrape storm while a job hydrates and a
# kill -9 mid-scrape; the job's data is compared with its source at the end.
# HELD: the daemon stays up and answers, the flood is cut at the deadline, the clone is intact.
set -u
source "$(dirname "$0")/lib.sh"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
verdict=HELD
scrape() { python3 - "$PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=60) as r:
        print(r.status, len(r.read()))
except Exception as e:
    print("ERR", e)
PY
}
mkdata "$W/src.img" 64; truncate -s 64M "$W/dst.img"
daemon --metrics-listen "127.0.0.1:$PORT" || exit 1
c start j --source "$W/src.img" --dest "$W/dst.img" --rate-limit 8M --region-size 64K >/dev/null

say "(a) 8 silent connections hold every slot; a 9th scrape is refused; after the 30 s deadline a scrape works"
python3 - "$PORT" <<'PY' &
import socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(8)]
start = time.monotonic()
closed = 0
for s in socks:
    s.settimeout(120)
    if s.recv(1) == b"": closed += 1
print(f"   silent connections closed by the server: {closed}/8 after {time.monotonic()-start:.1f} s")
PY
FLOOD=$!; PIDS+=("$FLOOD")
sleep 1
echo "   during the flood: $(scrape)"
wait "$FLOOD"
r=$(scrape); echo "   after the deadline: $r"; [[ $r == 200* ]] || verdict="BROKEN (no scrape after the flood)"

say "(b) a 200 KB header"
python3 - "$PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.settimeout(60)
try:
    s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 200000 + b"\r\n\r\n")
    print("   reply:", s.recv(100).split(b"\r\n")[0])
except OSError as e:
    print("   connection cut:", e)
PY
r=$(scrape); echo "   then: $r"; [[ $r == 200* ]] || verdict="BROKEN (no scrape after a huge header)"

say "(c) 200 scrapes while the job hydrates, then kill -9 during a scrape storm, restart"
for _ in $(seq 200); do scrape >/dev/null; done
( for _ in $(seq 50); do scrape >/dev/null; done ) & PIDS+=($!)
sleep 0.5; kill9
daemon --metrics-listen "127.0.0.1:$PORT" || { verdict="BROKEN (no restart)"; }
c set j --rate-limit 0 >/dev/null 2>&1 || true
c wait j --timeout 300s >/dev/null || verdict="BROKEN (job did not complete)"
r=$(scrape); echo "   after restart: $r"; [[ $r == 200* ]] || verdict="BROKEN (no scrape after restart)"
if cmp -s "$W/src.img" "$W/dst.img"; then echo "   clone identical to the source"; else verdict="DATA LOSS (clone differs)"; fi
stopd
echo "$verdict"
