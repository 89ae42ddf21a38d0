#!/bin/bash
# G1: source and destination are loop devices; while the daemon is down they are re-attached in
# the other order, so /dev/loopA (recorded source) now serves the destination's backing file
# and vice versa. Restart: DeviceUnconfirmed (good). The message tells the operator to put the
# right device back or use --accept-devices; `resume --accept-devices` does not notice that
# the device at the source path is the job's own recorded DESTINATION (and the reverse): it
# re-releases pending regions on the clone and copies the clone over the source.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/a.img 64; cp $W/a.img $W/a.orig; truncate -s 64M $W/b.img
LA=$(loop $W/a.img); LB=$(loop $W/b.img)
daemon
c start j1 --source $LA --dest $LB --discard-source --rate-limit 16M >/dev/null
sleep 2; c commit j1 >/dev/null; say "j1: $(state j1)"
kill9
unloop $LA; unloop $LB
L1=$(loop $W/b.img); L2=$(loop $W/a.img)
say "reattached: $L1 -> b.img (was the dest), $L2 -> a.img (was the source); recorded source $LA dest $LB"
daemon
say "after restart: $(state j1)"
c status j1 --json | python3 -c 'import json,sys; print("   ", json.load(sys.stdin)["error"]["message"][:300])'
if [ "$L1" = "$LA" ] && [ "$L2" = "$LB" ]; then
  say "resume --accept-devices:"; c resume j1 --accept-devices; echo "rc=$?"
  c wait j1 --timeout 60s -q; say "j1: $(state j1)"
  if cmp -s $W/b.img $W/a.orig; then say "HELD"; else say "DATA LOSS: clone b.img != original a.img; a.img == original: $(cmp -s $W/a.img $W/a.orig && echo yes || echo no)"; fi
else say "loop numbers not swapped (in use by others?), inconclusive"; fi
