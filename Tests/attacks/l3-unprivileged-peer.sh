#!/bin/bash
# L3: a careless admin makes the NBD socket world-accessible (chmod 666, or a shared group); an
# unprivileged peer (setpriv --reuid nobody) tries every way in: LIST, INFO, LIST_META_CONTEXT,
# GO, the default export, a raw EXPORT_NAME followed by a READ, a request without negotiation.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 4; ldaemon
c start secret --source $W/src --dest $W/dst --export --no-hydration >/dev/null
chmod 711 $W; chmod 666 $NSOCK; ls -l $NSOCK
setpriv --reuid nobody --regid nogroup --clear-groups env PATH=/usr/bin:$PATH python3 "$(dirname "$0")/py/unpriv.py" $NSOCK secret 2>&1 | tee $W/out
grep ALLOWED $W/out | grep -vq "OPT_LIST: ALLOWED -> \[\]" && say "LEAK: an unprivileged peer got in" || say "HELD"
say "clients now: $(jst secret | python3 -c 'import json,sys; print(json.load(sys.stdin)["export"])')"
