#!/usr/bin/env bash
# Runs every test. Installs what the tests need first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libsystemd-dev util-linux e2fsprogs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c 'import varlink' 2>/dev/null || python3 -m pip install -q varlink
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest

swift build --build-tests
swift test --skip-build 2>&1 | tee /tmp/hydration-test.log
# Integration tests (systemd user manager, ...) against .build/debug binaries (HYDRATION_BIN_DIR overrides).
python3 -m pytest Tests/integration -rs 2>&1 | tee /tmp/hydration-integration.log
