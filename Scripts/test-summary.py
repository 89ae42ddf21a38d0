#!/usr/bin/env python3
"""Sums JUnit/xUnit reports (swift test --xunit-output, pytest --junitxml) into one line:
"total: N passed, N failed, N skipped". A missing or unreadable report counts as one failure,
so a phase that crashed before writing its report never reads as green."""
import sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"{path}: no report ({e})", file=sys.stderr)
        failed += 1
        continue
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
