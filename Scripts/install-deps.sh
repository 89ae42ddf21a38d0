#!/usr/bin/env bash
# Installs what building and testing need, when missing: libsystemd-dev (the CSystemd target),
# libnbd-dev (the CNBD target: remote sources over NBD);
# with --test also util-linux/e2fsprogs (loop devices, mkfs for the full-disk test), fdisk and
# btrfs-progs (partitions and a two-device btrfs for the alias tests), dmsetup (a dm-linear stack), nbdkit and libnbd-bin
# (nbdfuse, nbdcopy, nbdinfo, nbdsh: the real writeback-error test serves an nbdkit error-filter
# export as a FUSE file under a loop device; the NBD server's tests drive the clients),
# python3-libnbd (for nbdsh) and qemu-utils (qemu-img, qemu-io), and python's varlink and pytest
# for the integration tests; gnutls-bin (psktool: the remote-source TLS test's PSK file); lintian,
# help2man and man-db (the Debian package's test: Scripts/build-deb.sh).
# prometheus: promtool (checks the metrics exposition and the example alert rules) and a real
# Prometheus server scraping the daemon in the metrics test.
# Safe to run again.
set -euo pipefail
need_apt=()
packages=(libsystemd-dev libnbd-dev pkg-config)
if [ "${1:-}" = "--test" ]; then
  # Tests only: real devices and real peers (loop devices, partitions, filesystems, NBD).
  packages+=(util-linux e2fsprogs fdisk btrfs-progs dmsetup nbdkit libnbd-bin python3-libnbd qemu-utils gnutls-bin
             prometheus lintian help2man man-db)
fi
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "${1:-}" = "--test" ]; then
  python3 -c 'import varlink' 2>/dev/null || python3 -m pip install -q varlink
  python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
fi
exit 0
