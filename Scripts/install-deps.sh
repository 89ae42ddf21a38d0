#!/usr/bin/env bash
# Installs what building and testing need, when missing: libsystemd-dev (the CSystemd target),
# util-linux/e2fsprogs (loop devices, mkfs for the full-disk test), and python's varlink and
# pytest for the integration tests; with --test also the NBD clients the NBD server's tests drive
# (libnbd-bin: nbdinfo, nbdcopy, nbdsh, nbdfuse; python3-libnbd for nbdsh; qemu-utils: qemu-img,
# qemu-io).
# Safe to run again.
set -euo pipefail
need_apt=()
packages=(libsystemd-dev pkg-config util-linux e2fsprogs)
if [ "${1:-}" = "--test" ]; then packages+=(libnbd-bin python3-libnbd qemu-utils); fi
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
