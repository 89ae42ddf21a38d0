#!/bin/bash
# I1: errors as a script sees them on the wire and as clonectl prints them: a create over a
# metadata file that is already there, a paused job whose destination shrank, a remote source
# that does not answer, a remote job whose server is down across a restart. Expected: each
# error names its file (MetadataExists with the metadata path, MetadataCorrupt with the
# metadata path, IOError with the URI), the taken metadata file is untouched, and the remote job
# is reopened by itself once its server is back (the decision reads the error's fields).
set -u; . "$(dirname "$0")/lib.sh"
call() { PYTHONPATH="$(dirname "$0")/../integration" python3 -c '
import json, sys
from hydtest import call, VarlinkError
try:
    call(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])); print("ok")
except VarlinkError as e:
    print(e.name.rsplit(".", 1)[1], json.dumps(e.parameters.get("path")))' "$SOCK" "$@"; }
fail=0
mkdata $W/src.img 16; truncate -s 16M $W/dst.img
printf 'somebody else%.0s' $(seq 300) > $W/taken.meta; sum=$(md5sum < $W/taken.meta)
daemon
r=$(call Start "{\"name\":\"a\",\"source\":\"$W/src.img\",\"dest\":\"$W/dst.img\",\"metadata\":\"$W/taken.meta\"}")
say "metadata taken: $r | $(c start a --source $W/src.img --dest $W/dst.img --metadata $W/taken.meta 2>&1)"
[ "$r" = "MetadataExists \"$W/taken.meta\"" ] && [ "$(md5sum < $W/taken.meta)" = "$sum" ] || fail=1
c start b --source $W/src.img --dest $W/dst.img --metadata $W/b.meta --no-hydration >/dev/null
truncate -s 1M $W/dst.img
r=$(call Resume '{"name":"b"}')
say "destination shrank: $r | $(c resume b 2>&1 | cut -c1-160)"
[ "$r" = "MetadataCorrupt \"$W/b.meta\"" ] || fail=1
c remove b --force >/dev/null; truncate -s 16M $W/dst.img
URI="nbd+unix:///?socket=$W/src-nbd.sock"
r=$(call Start "{\"name\":\"c\",\"source\":\"$URI\",\"dest\":\"$W/dst.img\"}")
say "nobody at the socket: $r"
[ "$r" = "IOError \"$URI\"" ] || fail=1
srv() { rm -f $W/nbd.pid; nbdkit -f --exit-with-parent -U $W/src-nbd.sock -P $W/nbd.pid file $W/src.img >>$W/nbdkit.log 2>&1 & NB=$!; PIDS+=($NB)
  for _ in $(seq 100); do [ -s $W/nbd.pid ] && return 0; sleep 0.05; done; echo "nbdkit did not start: $(cat $W/nbdkit.log)"; exit 1; }
srv
rm -f $W/dst.img; truncate -s 16M $W/dst.img
c start r --source "$URI" --dest $W/dst.img --metadata $W/r.meta --rate-limit 1M >/dev/null || fail=1
kill9; kill -9 $NB; wait $NB 2>/dev/null; rm -f $W/src-nbd.sock
daemon; say "server down at restart: $(state r)"
srv
for _ in $(seq 600); do [ "$(state r | cut -d' ' -f1)" = hydrating ] && break; sleep 0.1; done
say "server back: $(state r)"; [ "$(state r | cut -d' ' -f1)" = hydrating ] || fail=1
c set r --rate-limit 0 >/dev/null; c wait r --timeout 120s -q
cmp -s $W/dst.img $W/src.img || { say "clone differs"; fail=1; }
if [ $fail = 0 ]; then say "HELD: every error named its file; the remote job reopened by itself"; else say "FIELD LOST (see above)"; fi
