#!/bin/bash
# L1: a complete exported job; the daemon is stopped, its destination is replaced (a) by another
# file moved over the path (new inode), (b) a loop-device destination's node re-pointed at another
# file (same /dev/loopN), (c) the same file rewritten in place (same inode; not detectable, shown
# for information). After the restart the export must not serve the foreign bytes.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 8; cp $W/src $W/src.orig; mkdata $W/other 8
ldaemon
# (a) file destination replaced by mv
c start a --source $W/src --dest $W/dst --export >/dev/null; c wait a --timeout 30s -q
# (b) loop-device destination
truncate -s 8M $W/dloop.img; L=$(loop $W/dloop.img); cp $W/src.orig $W/srcb
c start b --source $W/srcb --dest $L --export >/dev/null; c wait b --timeout 30s -q
say "a: $(state a)  b: $(state b)"
nbdcopy "$(uri a)" $W/a.before; cmp -s $W/a.before $W/src.orig && say "a serves the clone before restart"
stopd
cp $W/other $W/dst.new; mv $W/dst.new $W/dst            # (a)
losetup -d $L; cp $W/other $W/dloop2.img; L2=$(losetup -f --show $W/dloop2.img); LOOPS+=($L2)
say "b: $L now over dloop2.img as $L2"
ldaemon
say "a: $(state a)  b: $(state b)"
for j in a b; do
  if nbdcopy "$(uri $j)" $W/$j.after 2>$W/$j.err; then
    if cmp -s $W/$j.after $W/other; then say "$j: DATA LEAK/LIE: export serves the foreign file"; 
    elif cmp -s $W/$j.after $W/src.orig; then say "$j: serves the clone (?)"; else say "$j: serves something else"; fi
  else say "$j: HELD not served: $(head -c 200 $W/$j.err)"; fi
  jst $j | python3 -c 'import json,sys; d=json.load(sys.stdin); print("   status:", d["state"], d.get("export"), (d.get("error") or {}).get("code"))'
done
