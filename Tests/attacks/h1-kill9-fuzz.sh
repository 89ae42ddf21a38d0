#!/bin/bash
# H1: kill -9 the daemon at random moments (copy, commits every 20 ms, discards, completion,
# the settling of a complete job), restart, repeat until complete; the clone must equal the
# source. Block-device destination (dest_zeroed false) and a file source with discard.
set -u; . "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
for r in $(seq $ROUNDS); do
  mkdata $W/src.img 96; cp $W/src.img $W/src.orig; truncate -s 96M $W/dst.back; rm -rf $ST
  DST=$(loop $W/dst.back)
  daemon
  c start j1 --source $W/src.img --dest $DST --discard-source --commit-interval 20ms --region-size 16K --batch-size 8 --space-budget 4M --rate-limit 24M >/dev/null
  n=0
  while :; do
    sleep 0.$((RANDOM % 9 + 1)); n=$((n+1)); kill9; daemon
    s=$(state j1); case "$s" in complete*) break;; failed*) say "round $r: FAILED $s"; break;; esac
    [ $n -gt 60 ] && break
  done
  c wait j1 --timeout 60s -q
  if cmp -s $DST $W/src.orig; then say "round $r: $n kills, clone ok, $(state j1), src allocated $(du -k $W/src.img|cut -f1)K"
  else say "round $r: DATA LOSS after $n kills: $(cmp $DST $W/src.orig | head -1)"; KEEP=1; fi
  kill9; unloop $DST
done
