"""clonectl apply: a hydrationtab file against a real hydrationd (hydrationtab(5)).

Jobs are held deterministically: every job is either created paused (no-hydration) or copies at a
rate limit low enough that it is still running when the test looks (paused by the test itself).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_clonectl import Daemon, blank, write_image  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def names(d):
    return sorted(j["name"] for j in json.loads(d.ok("status", "--json").stdout))


def test_apply_creates_once_resumes_paused_and_reports_differences(daemon, tmp_path):
    for n in ("a", "b"):
        write_image(tmp_path / f"{n}.src", 4 * MiB, seed=ord(n))
        blank(tmp_path / f"{n}.dst", 4 * MiB)
    tab = tmp_path / "hydrationtab"
    tab.write_text(
        "# two jobs\n"
        f"a {tmp_path}/a.src {tmp_path}/a.dst - no-hydration,verify\n"
        f"b {tmp_path}/b.src {tmp_path}/b.dst - rate-limit=64K,region-size=128K\n"
    )
    # --dry-run changes nothing.
    r = daemon.ok("apply", str(tab), "--dry-run")
    assert r.stdout.splitlines() == ["a: would create", "b: would create"], r.stdout
    assert names(daemon) == []

    r = daemon.ok("apply", str(tab))
    assert r.stdout.splitlines() == ["a: created", "b: created"], r.stdout
    assert names(daemon) == ["a", "b"]
    assert daemon.status("a")["state"] == "paused"  # no-hydration: created paused
    assert daemon.status("b")["region_size"] == 128 << 10
    assert daemon.status("a")["verify"]["enabled"] and not daemon.status("b")["verify"]["enabled"]

    # Applied again: nothing changes (a stays paused: its line says no-hydration).
    r = daemon.ok("apply", str(tab))
    assert r.stdout.splitlines() == ["a: unchanged", "b: unchanged"], r.stdout
    assert daemon.status("a")["state"] == "paused"

    # A paused job whose line does not say no-hydration is resumed.
    daemon.ok("pause", "b")
    daemon.wait_state("b", {"paused"})
    r = daemon.ok("apply", str(tab), "--dry-run")
    assert "b: would resume" in r.stdout.splitlines(), r.stdout
    assert daemon.status("b")["state"] == "paused"
    r = daemon.ok("apply", str(tab))
    assert "b: resumed" in r.stdout.splitlines(), r.stdout
    assert daemon.status("b")["state"] in ("hydrating", "complete")

    # A line that differs from its job is reported with the option, and nothing is changed.
    tab.write_text(
        f"a {tmp_path}/a.src {tmp_path}/a.dst - region-size=1M\n"
        f"b {tmp_path}/b.src {tmp_path}/b.dst - rate-limit=64K,region-size=128K\n"
    )
    r = daemon.run("apply", str(tab))
    assert r.returncode == 65, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == "a: differs: region-size (job: 65536), verify (job: true)", lines
    assert lines[1] == "b: unchanged", lines
    assert daemon.status("a")["region_size"] == 64 << 10
    daemon.ok("remove", "b", "--force")


def test_an_invalid_table_applies_nothing_and_names_the_line(daemon, tmp_path):
    write_image(tmp_path / "a.src", 1 * MiB)
    blank(tmp_path / "a.dst", 1 * MiB)
    tab = tmp_path / "tab"
    tab.write_text(f"a {tmp_path}/a.src {tmp_path}/a.dst - no-hydration\nb relative.img /x - -\n")
    r = daemon.run("apply", str(tab))
    assert r.returncode == 65
    assert f"{tab}:2: source 'relative.img' must be an absolute path" in r.stderr, r.stderr
    assert names(daemon) == [], "a job was created from a table with an invalid line"
    r = daemon.run("apply", str(tmp_path / "missing"))
    assert r.returncode == 66 and "cannot read" in r.stderr, r.stderr


def test_a_refused_line_is_reported_and_the_others_applied(daemon, tmp_path):
    write_image(tmp_path / "a.src", 1 * MiB)
    blank(tmp_path / "a.dst", 1 * MiB)
    tab = tmp_path / "tab"
    tab.write_text(
        f"gone {tmp_path}/missing.src {tmp_path}/a.dst - no-hydration\n"
        f"a {tmp_path}/a.src {tmp_path}/a.dst - no-hydration\n"
    )
    r = daemon.run("apply", str(tab))
    assert r.returncode == 65, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gone: refused: "), lines
    assert lines[1] == "a: created", lines
    assert names(daemon) == ["a"]
