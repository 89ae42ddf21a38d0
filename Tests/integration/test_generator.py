"""hydrationd-generator: /etc/hydrationtab into systemd units (hydrationtab(5)).

Run as systemd runs a generator (three output directories, $HYDRATIONTAB naming the table); the
units it writes pass `systemd-analyze verify`, and the command of a job's unit, run against a real
daemon, brings the declared job up.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_clonectl import BIN, Daemon, blank, write_image  # noqa: E402

GENERATOR = BIN / "hydrationd-generator"
PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
MiB = 1 << 20

if not GENERATOR.exists():
    pytest.skip(f"hydrationd-generator not built in {BIN} (run swift build)", allow_module_level=True)


def generate(tmp_path, tab_text, scope=None):
    out = tmp_path / "gen"
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True)
    tab = tmp_path / "hydrationtab"
    tab.write_text(tab_text)
    env = dict(os.environ, HYDRATIONTAB=str(tab))
    env.pop("SYSTEMD_SCOPE", None)
    if scope:
        env["SYSTEMD_SCOPE"] = scope
    r = subprocess.run([str(GENERATOR), *map(str, dirs)], capture_output=True, text=True, timeout=30, env=env)
    return r, dirs, tab


def escape(name):
    return subprocess.run(["systemd-escape", name], capture_output=True, text=True, check=True).stdout.strip()


def exec_start(unit_file, socket=None):
    """The unit's command; `socket` replaces the control socket the unit names (%t/...)."""
    line = next(l for l in unit_file.read_text().splitlines() if l.startswith("ExecStart="))
    cmd = shlex.split(line[len("ExecStart="):])
    if socket:
        cmd[cmd.index("--socket") + 1] = socket
    return cmd


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_units_per_declared_job_verify(tmp_path):
    r, (normal, early, late), tab = generate(
        tmp_path, "# jobs\nvm-1 /srv/a.img /srv/b.img - export\nweird@x.y nbd://h/e /dev/vg/x /m/x.meta no-hydration\n"
    )
    assert r.returncode == 0, r.stderr
    units = []
    for name in ("vm-1", "weird@x.y"):
        job = normal / f"hydrationd-job-{escape(name)}.service"
        complete = normal / f"hydrationd-complete-{escape(name)}.service"
        assert job.exists() and complete.exists(), sorted(p.name for p in normal.iterdir())
        link = normal / "multi-user.target.wants" / job.name
        assert link.is_symlink() and (link.parent / os.readlink(link)).resolve() == job.resolve()
        clonectl = str((BIN / "clonectl").resolve())
        sock = ["--socket", "%t/hydrationd/control.sock"]
        assert exec_start(job) == [clonectl, *sock, "apply", str(tab), "--only", name]
        assert exec_start(complete) == [clonectl, *sock, "wait", name]
        assert f"After={job.name}" in complete.read_text() and f"Requires={job.name}" in complete.read_text()
        units += [job, complete]
    assert list(early.iterdir()) == [] and list(late.iterdir()) == []
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{normal}:{PACKAGING}:")
    v = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True, timeout=60, env=env
    )
    assert v.returncode == 0 and "ignoring" not in v.stderr, v.stdout + v.stderr

    # Under the user manager (no multi-user.target) the jobs come up with default.target.
    r, (normal, _, _), _ = generate(tmp_path / "user", "vm1 /a /b\n", scope="user")
    assert r.returncode == 0, r.stderr
    assert (normal / "default.target.wants" / "hydrationd-job-vm1.service").is_symlink()


def test_an_invalid_table_generates_nothing_and_says_where(tmp_path):
    r, (normal, _, _), tab = generate(tmp_path, "vm1 /a /b\nvm2 /a /b - compress\n")
    assert r.returncode == 1
    assert f"{tab}:2: unknown option 'compress'" in r.stderr, r.stderr
    assert list(normal.iterdir()) == [], "units generated from a table with an invalid line"


def test_the_job_units_command_brings_the_job_up(tmp_path):
    write_image(tmp_path / "a.src", 2 * MiB)
    blank(tmp_path / "a.dst", 2 * MiB)
    r, (normal, _, _), _ = generate(tmp_path, f"a {tmp_path}/a.src {tmp_path}/a.dst - -\n")
    assert r.returncode == 0, r.stderr
    (tmp_path / "daemon").mkdir()
    d = Daemon(tmp_path / "daemon").start()
    try:
        cmd = exec_start(normal / "hydrationd-job-a.service", socket=d.socket)
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=d.env())
        assert first.returncode == 0 and first.stdout.strip() == "a: created", first.stdout + first.stderr
        done = subprocess.run(
            exec_start(normal / "hydrationd-complete-a.service", socket=d.socket), capture_output=True, text=True, timeout=120, env=d.env()
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / "a.src").read_bytes() == (tmp_path / "a.dst").read_bytes()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=d.env())
        assert again.returncode == 0 and again.stdout.strip() == "a: unchanged", again.stdout + again.stderr
    finally:
        d.stop()
