#!/usr/bin/env bash
# Runs every test. Installs what the tests need first, so it works on a fresh machine.
#
# First the formatting check (`swift format lint --strict`) and the file-length check (no source
# file over 450 lines), counted as one test each, then three phases,
# so that the CPU-bound crash explorers never share the two cooperative threads of a small machine
# with tests that talk to servers: (1) every Swift test but the explorers, (2) the explorers alone,
# (3) the integration tests (pytest) against the built binaries. Each phase runs
# even when an earlier one failed; the exit status is non-zero if any did. Logs and reports go to
# a private directory (HYDRATION_TEST_OUT to choose it), so two runs on one machine don't collide.
# The last line sums all phases: "total: N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.."

Scripts/install-deps.sh --test || exit 1

out=${HYDRATION_TEST_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/hydration-test.XXXXXX")}
mkdir -p "$out"
echo "logs and reports: $out"

# The formatting check: the toolchain's swift-format with the repository's .swift-format.
lint_failure=""
if ! swift format lint --strict -r Sources Tests Package.swift >"$out/lint.log" 2>&1; then
    cat "$out/lint.log"
    lint_failure='<failure message="swift format lint --strict: see lint.log"/>'
fi
# Files of one concern: no source file over 450 lines (split by concern, `Type+Concern.swift`).
long_failure=""
long=$(find Sources -name '*.swift' -exec wc -l {} + | awk '$2 != "total" && $1 > 450 { print $2 " (" $1 " lines)" }')
if [ -n "$long" ]; then
    echo "source files over 450 lines:"; echo "$long"
    long_failure='<failure message="source files over 450 lines: see the log"/>'
fi
printf '<testsuite name="lint"><testcase classname="lint" name="swift-format">%s</testcase>' "$lint_failure" >"$out/lint.xml"
printf '<testcase classname="lint" name="file-length">%s</testcase></testsuite>\n' "$long_failure" >>"$out/lint.xml"

swift build --build-tests 2>&1 | tee "$out/build.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "total: 0 passed, 1 failed, 0 skipped"; exit 1; }

explorers='CrashSafetyExplorerTests|LiveCrashExplorerTests|CrashSafetyMetadataFuzzTests'
rc=0
swift test --skip-build --skip "$explorers" --xunit-output "$out/swift.xml" 2>&1 | tee "$out/swift.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
swift test --skip-build --filter "$explorers" --xunit-output "$out/explorers.xml" 2>&1 | tee "$out/explorers.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
# Integration tests (systemd user manager, ...) against .build/debug binaries (HYDRATION_BIN_DIR overrides).
python3 -m pytest Tests/integration -rs -s --basetemp "$out/pytest" --junitxml "$out/integration.xml" 2>&1 | tee "$out/integration.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1

python3 Scripts/test-summary.py "$out"/lint.xml "$out"/swift-swift-testing.xml "$out"/explorers-swift-testing.xml "$out"/integration.xml || rc=1
exit $rc
