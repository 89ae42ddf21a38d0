# Helpers for the live-clone attack scripts (l*.sh), on top of lib.sh (BIN defaults to the
# repository's debug build): the daemon's NBD socket is $W/nbd.sock.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NSOCK=$W/nbd.sock
export PATH=/usr/bin:$PATH     # nbdsh / python nbd
ldaemon() { daemon --nbd-socket "$NSOCK" "$@"; }
uri() { echo "nbd+unix:///$1?socket=$NSOCK"; }
jst() { c status "$1" --json 2>/dev/null; }
# bg PID tracking for anything we start
bg() { "$@" & PIDS+=($!); }
