#!/usr/bin/env bash
# Runs every test. Installs what the tests need first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

Scripts/install-deps.sh --test

swift build --build-tests
swift test --skip-build 2>&1 | tee /tmp/hydration-test.log
# Integration tests (systemd user manager, ...) against .build/debug binaries (HYDRATION_BIN_DIR overrides).
python3 -m pytest Tests/integration -rs -s 2>&1 | tee /tmp/hydration-integration.log
