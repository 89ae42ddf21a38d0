#!/bin/bash
# P1: the control socket's peers, the descriptor limit, SIGHUP and a late opener, from outside:
#  a) a read-only user (nobody) holds 64 streaming `GetStatus more` calls: does root get in?
#  b) the same user asks CheckMetadata about a path that exists and one that does not: can it tell?
#  c) a socket-group member has the daemon copy a root-only file into a file of its own: the group
#     is documented as root-equivalent, so this is expected (reported, not a finding);
#  d) SIGHUP: the daemon must go on serving, and stop cleanly on SIGTERM afterwards;
#  e) 300 jobs (240 paused, 60 hydrating under a rate limit) under a hard limit of 256 descriptors,
#     kill -9, restart under the same limit: the daemon must come up and list all of them;
#  f) a `dd` and a loop device opening a source released as it is copied, mid-job: releases must
#     stop (allocation unchanged), the job must pause; resumed, the clone must equal the original.
set -u; . "$(dirname "$0")/lib.sh"
chmod 711 $W
verdict=HELD
G=4242

say "a) stream flood by a read-only peer"
daemon --socket-group $G; chmod 666 $SOCK
cat > $W/flood.py <<'PY'
import json, socket, sys
held = []
for i in range(64):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    s.sendall(json.dumps({"method": "org.hydrationd.Control.GetStatus", "parameters": {}, "more": True}).encode() + b"\0")
    b = s.recv(65536)
    if b"continues" in b: held.append(s)
print("streams held:", len(held), flush=True)
sys.stdin.read()
PY
mkfifo $W/hold; (setpriv --reuid 65534 --regid 65534 --clear-groups /usr/bin/python3 -I $W/flood.py $SOCK < $W/hold > $W/flood.out 2>&1) & FL=$!; PIDS+=($FL)
exec 9>$W/hold
for _ in $(seq 100); do grep -q "streams held" $W/flood.out && break; sleep 0.1; done
cat $W/flood.out
if c list >/dev/null 2>&1; then say "root gets in: HELD"; else say "root locked out: FAIL"; verdict=FAIL; fi
exec 9>&-; wait $FL 2>/dev/null

say "b) CheckMetadata probing by a read-only peer"
probe() { setpriv --reuid 65534 --regid 65534 --clear-groups /usr/bin/python3 -I -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(json.dumps({"method": "org.hydrationd.Control.CheckMetadata", "parameters": {"path": sys.argv[2]}}).encode() + b"\0")
m = json.loads(s.recv(65536).split(b"\0")[0])
print(m.get("error") or [p.replace(sys.argv[2], "PATH") for p in m["parameters"]["report"]["problems"]])' $SOCK "$1"; }
a=$(probe /etc/shadow); b=$(probe /etc/no-such-file-$$)
echo "existing: $a; missing: $b"
[ "$a" = "$b" ] && say "indistinguishable: HELD" || { say "existence leaks: FAIL"; verdict=FAIL; }

say "c) a group member copies a root-only file (documented: the group is root-equivalent)"
head -c 1M /dev/urandom > $W/rootonly; chmod 600 $W/rootonly
mkdir -m 777 $W/member
setpriv --reuid 65533 --regid 65533 --groups $G "$BIN/clonectl" --socket $SOCK start steal --source $W/rootonly --dest $W/member/copy --metadata $W/member/m >/dev/null 2>&1
for _ in $(seq 100); do [ "$(state steal | cut -d' ' -f1)" = complete ] && break; sleep 0.1; done
cmp -s $W/rootonly $W/member/copy && say "copied, as documented (docs/systemd.md: socket-group members are root-equivalent)" || say "not copied"
c remove steal >/dev/null 2>&1

say "d) SIGHUP"
kill -HUP $DPID; sleep 1
if kill -0 $DPID 2>/dev/null && c list >/dev/null 2>&1; then say "still serving: HELD"; else say "SIGHUP killed it: FAIL"; verdict=FAIL; fi
stopd; [ -S $SOCK ] && { say "socket left behind: FAIL"; verdict=FAIL; }

say "e) 300 jobs, hard limit 256, kill -9, restart"
rm -rf $ST; mkdir $W/many
prlimit --nofile=256:256 "$BIN/hydrationd" --state-dir $ST --socket $SOCK >>$W/daemon.log 2>&1 & DPID=$!
for _ in $(seq 100); do c list >/dev/null 2>&1 && break; sleep 0.1; done
failed=0
for i in $(seq 300); do
  head -c 256K /dev/urandom > $W/many/s$i
  if [ $i -le 240 ]; then c start m$i --source $W/many/s$i --dest $W/many/d$i --no-hydration >/dev/null 2>&1 && c pause m$i >/dev/null 2>&1
  else c start m$i --source $W/many/s$i --dest $W/many/d$i --rate-limit 4K --batch-size 1 --region-size 64K >$W/start.out 2>&1; fi || { failed=$((failed+1)); [ $failed = 1 ] && cat $W/start.out; }
done
before=$(c list 2>/dev/null | grep -c '^m')
echo "jobs listed: $before  descriptors: $(ls /proc/$DPID/fd | wc -l)  failed creates: $failed (hydrating jobs hold ~6 descriptors each: the limit is too low for all 60)"
kill9
t0=$(date +%s.%N)
prlimit --nofile=256:256 "$BIN/hydrationd" --state-dir $ST --socket $SOCK >>$W/daemon.log 2>&1 & DPID=$!
up=
for _ in $(seq 600); do c list >/dev/null 2>&1 && { up=1; break; }; kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
if [ -n "$up" ]; then
  n=$(c list 2>/dev/null | grep -c '^m')
  say "restarted in $(echo "$(date +%s.%N) - $t0" | bc) s, lists $n jobs (as before the kill), $(ls /proc/$DPID/fd | wc -l) descriptors: $([ $n = $before ] && echo HELD || echo FAIL)"
  [ $n = $before ] || verdict=FAIL
else
  say "the daemon did not come up: FAIL"; tail -3 $W/daemon.log; verdict=FAIL
fi
stopd

say "f) late openers: dd, then a loop device"
rm -rf $ST; daemon
mkdata $W/src 8; cp $W/src $W/orig
c start late --source $W/src --dest $W/dst --discard-source --region-size 64K --batch-size 1 --rate-limit 128K >/dev/null
for _ in $(seq 200); do [ "$(state late | cut -d' ' -f4)" -gt 131072 ] && break; sleep 0.1; done
dd if=$W/src of=$W/dd.out bs=1M status=none
for _ in $(seq 200); do [ "$(state late | cut -d' ' -f1)" = paused ] && break; sleep 0.1; done
echo "after dd: $(state late)"
b1=$(stat -c %b $W/src); sleep 3; b2=$(stat -c %b $W/src)
[ "$(state late | cut -d' ' -f5)" = DeviceInUse ] && [ "$b1" = "$b2" ] && say "dd noticed, releases stopped: HELD" || { say "dd not noticed or releases went on ($b1 -> $b2): FAIL"; verdict=FAIL; }
c resume late >/dev/null
l=$(loop -r $W/src)
for _ in $(seq 200); do [ "$(state late | cut -d' ' -f1)" = paused ] && break; sleep 0.1; done
c status late --json | python3 -c 'import json,sys; print("loop:", (json.load(sys.stdin)["error"] or {}).get("message"))'
b1=$(stat -c %b $W/src); sleep 3; b2=$(stat -c %b $W/src)
[ "$(state late | cut -d' ' -f5)" = DeviceInUse ] && [ "$b1" = "$b2" ] && say "loop noticed, releases stopped: HELD" || { say "loop not noticed ($b1 -> $b2): FAIL"; verdict=FAIL; }
c resume late >/dev/null 2>&1 && { say "resumed while the loop device holds the source: FAIL"; verdict=FAIL; }
unloop $l
for _ in $(seq 100); do c resume late >/dev/null 2>&1 && break; sleep 0.2; done
c set late --rate-limit 1G >/dev/null
for _ in $(seq 600); do [ "$(state late | cut -d' ' -f1)" = complete ] && break; sleep 0.1; done
cmp -s $W/orig $W/dst && say "clone equals the original" || { say "clone differs: DATA LOSS"; verdict="DATA LOSS"; }
stopd
say "$verdict"
