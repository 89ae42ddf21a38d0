# Common helpers for the attack scripts. Source it; set -u friendly.
BIN=${BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.build/debug}
W=$(mktemp -d /tmp/hyd-attack.XXXXXX)
LOOPS=(); MOUNTS=(); PIDS=()
ST=$W/state; SOCK=$W/s.sock; DPID=
cleanup() {
  set +e
  [ -n "${DPID:-}" ] && kill -9 "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}"; done
  for m in $(findmnt -rn -o TARGET | grep "^$W/" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
  # loop() runs in $(...) subshells, so detach by backing file: every loop device over a file in $W
  for l in $(losetup -a | grep -F "($W/" | cut -d: -f1); do losetup -d "$l" 2>/dev/null; done
  [ -z "${KEEP:-}" ] && rm -rf "$W"
}
trap cleanup EXIT
daemon() { # start daemon (optional extra args)
  "$BIN/hydrationd" --state-dir "$ST" --socket "$SOCK" "$@" >>"$W/daemon.log" 2>&1 &
  DPID=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && "$BIN/clonectl" --socket "$SOCK" list >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "daemon did not come up"; cat "$W/daemon.log"; return 1
}
kill9() { kill -9 "$DPID"; wait "$DPID" 2>/dev/null; DPID=; rm -f "$SOCK"; }
stopd() { kill -TERM "$DPID"; wait "$DPID" 2>/dev/null; DPID=; }
c() { "$BIN/clonectl" --socket "$SOCK" "$@"; }
loop() { local l; l=$(losetup -f --show "$@") || return 1; LOOPS+=("$l"); echo "$l"; }
unloop() { losetup -d "$1"; local n=(); for l in "${LOOPS[@]}"; do [ "$l" != "$1" ] && n+=("$l"); done; LOOPS=("${n[@]}"); }
# random, incompressible, non-zero data, MiB
mkdata() { head -c "$(( $2 * 1024 * 1024 ))" /dev/urandom > "$1"; }
state() { c status "$1" --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["state"], d["regions"]["hydrated"], d["regions"]["total"], d["bytes"]["discarded"], (d["error"] or {}).get("code"))'; }
say() { echo "== $*"; }
