#!/usr/bin/env bash
# The main job, end to end, as a new user would run it (no root or systemd needed):
# build, start a private hydrationd, generate a ~1 GiB sample image (random data with holes),
# clone it with discard_source, read the live clone over NBD while it hydrates (with nbdcopy, when
# installed), show progress with `clonectl status --watch`, verify the copy by
# checksum, show that the source's space was released, and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${DEMO_SIZE_MIB:-1024}
WORK=${DEMO_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/hydration-demo.XXXXXX")}
mkdir -p "$WORK"

Scripts/install-deps.sh
echo "== building (debug)"
swift build --product hydrationd >/dev/null
swift build --product clonectl >/dev/null
BIN=$(swift build --show-bin-path)

SOCK="$WORK/control.sock"
STATE="$WORK/state"
export HYDRATION_SOCKET="$SOCK"
DAEMON_PID=""
cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
  fi
  [ -z "${DEMO_KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

echo "== generating a ${SIZE_MIB} MiB sample image in $WORK (random data with holes and zero runs)"
SRC="$WORK/source.img"
DST="$WORK/clone.img"
truncate -s "${SIZE_MIB}M" "$SRC"
# Every 4 MiB: 2 MiB of random data, then 1 MiB of zeros written out, then a 1 MiB hole.
for ((mib = 0; mib < SIZE_MIB; mib += 4)); do
  dd if=/dev/urandom of="$SRC" bs=1M count=2 seek=$mib conv=notrunc status=none
  dd if=/dev/zero of="$SRC" bs=1M count=1 seek=$((mib + 2)) conv=notrunc status=none
done
sync "$SRC"
SUM=$(sha256sum "$SRC" | cut -d' ' -f1)
alloc() { echo $(( $(stat -c %b "$1") * 512 / 1048576 )); }
echo "   size ${SIZE_MIB} MiB, allocated $(alloc "$SRC") MiB, sha256 ${SUM:0:16}..."

echo "== starting hydrationd (state $STATE, socket $SOCK)"
"$BIN/hydrationd" --state-dir "$STATE" --socket "$SOCK" --log-level warning &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done

echo "== clonectl start demo --discard-source --export"
"$BIN/clonectl" start demo --source "$SRC" --dest "$DST" --discard-source --commit-interval 1s --export
if command -v nbdcopy >/dev/null; then
  # The live clone: served over NBD from its first second (nbd.sock beside the control socket).
  URI="nbd+unix:///demo?socket=$WORK/nbd.sock"
  echo "== reading the live clone while it hydrates: nbdcopy $URI"
  nbdcopy "$URI" "$WORK/live-read.img"
  LIVE=$(sha256sum "$WORK/live-read.img" | cut -d' ' -f1)
  rm -f "$WORK/live-read.img"
  if [ "$LIVE" != "$SUM" ]; then
    echo "FAIL: the live clone read $LIVE, not the source's $SUM" >&2
    exit 1
  fi
  echo "   what the live clone served equals the original: ${SUM:0:16}..."
else
  echo "   (nbdcopy not installed: skipping the live read; apt-get install libnbd-bin)"
fi
"$BIN/clonectl" status demo --watch
"$BIN/clonectl" wait demo --timeout 10m
echo
"$BIN/clonectl" status demo

echo "== verifying"
GOT=$(head -c "$((SIZE_MIB * 1048576))" "$DST" | sha256sum | cut -d' ' -f1)
if [ "$GOT" != "$SUM" ]; then
  echo "FAIL: the clone's checksum $GOT differs from the source's $SUM" >&2
  exit 1
fi
echo "   clone sha256 matches the original: ${SUM:0:16}..."
echo "   source now allocates $(alloc "$SRC") MiB (its space was given back as regions were committed)"
echo "   clone allocates $(alloc "$DST") MiB (holes and zero runs were not written)"
if [ "$(stat -c %b "$SRC")" != 0 ]; then
  echo "FAIL: the source still holds data blocks" >&2
  exit 1
fi

echo "== stopping hydrationd"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID"
DAEMON_PID=""
echo "demo complete"
