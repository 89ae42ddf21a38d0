#!/bin/bash
# S1: the state directory attacked from outside, with a real daemon and clonectl (root: tmpfs).
#  a) a partly released --discard-source job whose record is damaged while the daemon is down, in
#     every way a downgrade, a crash or a hand edit can leave it; after each restart a new job
#     onto its destination, or reading its source, must be refused, the job listed, and nothing of
#     it written or released; the record restored, it must finish byte-exact.
#  b) its kept record (remove --force) cut by one byte, given an unknown value, overwritten with
#     garbage: the destination stays guarded, at once (no restart).
#  c) the state directory on a full tmpfs: a create leaves nothing, a remove --force leaves the
#     job as it was (and resumable), a pause leaves it hydrating.
#  d) creates past RLIMIT_NOFILE (prlimit): no ghost after a restart, no DeviceUnconfirmed.
set -u; . "$(dirname "$0")/lib.sh"
LOSS=0
loss() { say "DATA LOSS: $*"; LOSS=1; }
rc() { "$@" >/dev/null 2>&1; echo $?; }
json() { c status "$1" --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print($2)"; }

mkdata $W/src.img 64; cp $W/src.img $W/src.orig; mkdata $W/other.img 64
daemon
c start j --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 4M --commit-interval 20ms --region-size 64K >/dev/null
for _ in $(seq 600); do [ "$(json j 'd["bytes"]["discarded"]')" -gt 0 ] 2>/dev/null && break; sleep 0.1; done
c pause j >/dev/null
say "a) j paused, partly released: $(state j)"
kill9
REC=$ST/jobs/j.json; cp $REC $W/j.json.orig
SRC_SUM=$(sha256sum < $W/src.img); DST_SUM=$(sha256sum < $W/dst.img)
python3 - "$W" <<'EOF'
import json, os, sys
w = sys.argv[1]
orig = open(f"{w}/j.json.orig", "rb").read()
d = json.loads(orig)
def edit(**kv):
    e = dict(d); e.update(kv); return json.dumps({k: v for k, v in e.items() if v is not None}, indent=2).encode()
variants = {
    "downgrade-desired-draining": edit(desired="draining"),
    "downgrade-io-uring": edit(io="io_uring"),
    "newer-version": edit(version=2),
    "version-string": edit(version="2"),
    "missing-dest": edit(dest=None),
    "region-size-string": edit(regionSize="65536"),
    "other-name": edit(name="someone-else"),
    "cut-by-one": orig[:-1],
    "cut-in-half": orig[: len(orig) // 2],
    "empty": b"",
    "garbage": os.urandom(400),
    "nul-filled": b"\0" * len(orig),
    "array": b"[]",
}
os.makedirs(f"{w}/variants", exist_ok=True)
for k, v in variants.items():
    open(f"{w}/variants/{k}", "wb").write(v)
EOF
for v in $(ls $W/variants) directory; do
  rm -rf $REC
  if [ $v = directory ]; then mkdir $REC; else cp $W/variants/$v $REC; fi
  daemon
  listed=$(c list 2>/dev/null | grep -c '^j ' || true)
  code=$(json j '(d["error"] or {}).get("code")' 2>/dev/null)
  onto=$(rc c start k --source $W/other.img --dest $W/dst.img --no-hydration)
  reads=$(rc c start r --source $W/src.img --dest $W/r.img --no-hydration)
  rmv=$(rc c remove j); res=$(rc c resume j)
  printf '   %-28s listed=%s code=%s start-onto-dest=%s start-reading-source=%s remove=%s resume=%s\n' $v "$listed" "$code" $onto $reads $rmv $res
  [ "$listed" = 1 ] && [ "$code" = JobRecordUnreadable ] || loss "$v: job not listed as JobRecordUnreadable"
  [ $onto != 0 ] || loss "$v: a new job onto j's destination was accepted"
  [ $reads != 0 ] || loss "$v: a new job reading j's released source was accepted"
  c remove k --force >/dev/null 2>&1; c remove r --force >/dev/null 2>&1; rm -f $W/r.img
  kill9
  [ "$(sha256sum < $W/dst.img)" = "$DST_SUM" ] || loss "$v: j's destination changed"
  [ "$(sha256sum < $W/src.img)" = "$SRC_SUM" ] || loss "$v: j's source changed"
done
rm -rf $REC; cp $W/j.json.orig $REC
daemon
c resume j >/dev/null; c set j --rate-limit 0 >/dev/null
c wait j --timeout 120s -q; say "j restored and resumed: $(state j)"
cmp -s $W/dst.img $W/src.orig && say "a) HELD: j's clone exact" || loss "a) j's clone differs: $(cmp $W/dst.img $W/src.orig | head -1)"

say "b) kept record"
mkdata $W/src2.img 64; cp $W/src2.img $W/src2.orig
c start q --source $W/src2.img --dest $W/dst2.img --discard-source --rate-limit 4M --commit-interval 20ms --region-size 64K >/dev/null
for _ in $(seq 600); do [ "$(json q 'd["bytes"]["discarded"]')" -gt 0 ] 2>/dev/null && break; sleep 0.1; done
c pause q >/dev/null
KEPT_META=$(c remove q --force 2>&1 | tail -1); say "   remove --force q: $KEPT_META"
KEPT=$(ls $ST/kept/q-*.json); cp $KEPT $W/kept.orig
for v in baseline cut-by-one unknown-value garbage; do
  case $v in
    baseline) cp $W/kept.orig $KEPT ;;
    cut-by-one) head -c -1 $W/kept.orig > $KEPT ;;
    unknown-value) sed 's/"hydrating"/"draining"/; s/"paused"/"draining"/' $W/kept.orig > $KEPT ;;
    garbage) head -c 300 /dev/urandom > $KEPT ;;
  esac
  out=$(c start k --source $W/other.img --dest $W/dst2.img --no-hydration 2>&1); r=$?
  printf '   %-14s start onto the kept destination: exit %s: %s\n' $v $r "$(echo "$out" | cut -c1-150)"
  [ $r != 0 ] || { loss "kept $v: a new job onto the kept destination was accepted"; c remove k --force >/dev/null 2>&1; }
done
cp $W/kept.orig $KEPT
c start q --source $W/src2.img --dest $W/dst2.img --metadata $(echo "$KEPT_META" | grep -o '/[^ ]*\.meta' | head -1) >/dev/null 2>&1 || c start q --source $W/src2.img --dest $W/dst2.img --metadata $ST/jobs/q.meta >/dev/null
c set q --rate-limit 0 >/dev/null; c wait q --timeout 120s -q
cmp -s $W/dst2.img $W/src2.orig && say "b) HELD: the kept job resumed and finished exact" || loss "b) q's clone differs"
stopd

say "c) a full state directory (tmpfs)"
ST=$W/fullstate; mkdir -p $ST; mount -t tmpfs -o size=2m tmpfs $ST; MOUNTS+=($ST)
daemon
truncate -s 1G $W/sparse.img
free=$(df -B1 --output=avail $ST | tail -1); head -c $(( free - 16384 )) /dev/zero > $ST/filler 2>/dev/null
out=$(c start big --source $W/sparse.img --dest $W/big.img --region-size 4K --no-hydration 2>&1); r=$?
say "   create with no room for its metadata: exit $r: $(echo "$out" | cut -c1-160)"
left=$(ls $ST/jobs | tr '\n' ' '); [ -z "$left" ] && [ ! -e $W/big.img ] && say "   nothing left behind" || loss "c) a failed create left: $left $(ls $W/big.img 2>/dev/null)"
rm -f $ST/filler
out=$(c start big --source $W/sparse.img --dest $W/big.img --region-size 4K --no-hydration 2>&1); r=$?
say "   the same start with room: exit $r"; [ $r = 0 ] || loss "c) the same start refused: $out"
c remove big >/dev/null
mkdata $W/src3.img 32; cp $W/src3.img $W/src3.orig
c start f --source $W/src3.img --dest $W/dst3.img --discard-source --rate-limit 2M --commit-interval 20ms --region-size 64K >/dev/null
for _ in $(seq 600); do [ "$(json f 'd["bytes"]["discarded"]')" -gt 0 ] 2>/dev/null && break; sleep 0.1; done
head -c 8M /dev/zero > $ST/filler 2>/dev/null
out=$(c pause f 2>&1); r=$?; say "   pause on a full state dir: exit $r, now $(state f): $(echo "$out" | cut -c1-120)"
[ $r = 0 ] && [ "$(json f 'd["state"]')" != paused ] && loss "c) pause said ok but the job is not paused"
[ $r != 0 ] && [ "$(json f 'd["state"]')" != hydrating ] && loss "c) a failed pause changed the job"
rm -f $ST/filler; c pause f >/dev/null; head -c 8M /dev/zero > $ST/filler 2>/dev/null
out=$(c remove f --force 2>&1); r=$?
say "   remove --force on a full state dir: exit $r: $(echo "$out" | cut -c1-140)"
say "   then: $(state f) metadata=$(json f 'd["metadata"]["mode"]')"
rm -f $ST/filler
out=$(c resume f 2>&1); r=$?; say "   resume after freeing space: exit $r $(echo "$out" | cut -c1-120)"
[ $r = 0 ] || loss "c) the job the status called paused/rw could not be resumed: $out"
c set f --rate-limit 0 >/dev/null; c wait f --timeout 120s -q
cmp -s $W/dst3.img $W/src3.orig && say "c) HELD: f exact" || loss "c) f differs"
stopd

say "d) creates past RLIMIT_NOFILE"
ST=$W/limstate
for i in $(seq 0 11); do head -c 1M /dev/urandom > $W/l$i.img; done
prlimit --nofile=47:47 -- "$BIN/hydrationd" --state-dir "$ST" --socket "$SOCK" >>"$W/daemon.log" 2>&1 & DPID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && c list >/dev/null 2>&1 && break; sleep 0.1; done
ok=0; bad=0; unconfirmed=0
for i in $(seq 0 11); do
  if out=$(c start l$i --source $W/l$i.img --dest $W/l$i.out --no-hydration 2>&1); then ok=$((ok+1)); else
    bad=$((bad+1)); echo "$out" | grep -q -i "stable identity\|accept-devices" && unconfirmed=$((unconfirmed+1))
    [ $bad = 1 ] && say "   first refusal: $(echo "$out" | cut -c1-200)"
  fi
done
stopd; daemon
listed=$(c list | grep -c '^l' || true)
failed=$(c list | grep '^l' | grep -c failed || true)
leftovers=$(for i in $(seq 0 11); do c status l$i >/dev/null 2>&1 || ls $W/l$i.out $ST/jobs/l$i.* 2>/dev/null; done | wc -l)
say "   created $ok, refused $bad (DeviceUnconfirmed-like: $unconfirmed); after a restart listed $listed, failed $failed, files of refused creates left $leftovers"
[ $listed = $ok ] && [ $failed = 0 ] && [ $leftovers = 0 ] && [ $unconfirmed = 0 ] || loss "d) ghosts or misnamed errors"
stopd

[ $LOSS = 0 ] && say "HELD" || say "DATA LOSS (see above)"
