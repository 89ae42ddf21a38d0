"""Scripts/build-deb.sh: the Debian package builds, lintian finds no error, it holds what
docs/systemd.md and hydrationtab(5) promise, and its binaries run a job.

The test command packages its debug build (--bin-dir); the one lintian error a debug build
has, the RUNPATH to the Swift toolchain, is let through by the script (a release build links
the Swift runtime statically).
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_clonectl import BIN, blank, write_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

missing = [t for t in ("dpkg-deb", "lintian", "help2man") if not shutil.which(t)]
if missing:
    pytest.skip(f"not installed: {', '.join(missing)} (Scripts/install-deps.sh --test)", allow_module_level=True)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(
        [str(REPO / "Scripts" / "build-deb.sh"), "--bin-dir", str(BIN), "--out", str(out), "--version", "1.2.3~test"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.name == f"hydrationd_1.2.3~test_{subprocess.check_output(['dpkg', '--print-architecture'], text=True).strip()}.deb"
    root = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    control = out / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    return deb, root, control


def test_contents_and_control(package):
    deb, root, control = package
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in (
        "./usr/sbin/hydrationd", "./usr/bin/clonectl", "./usr/bin/clonectl-nbd",
        "./usr/lib/systemd/system-generators/hydrationd-generator",
        "./usr/lib/systemd/system/hydrationd.service", "./usr/lib/systemd/system/hydrationd.socket",
        "./usr/lib/systemd/system/hydrationd-nbd.socket",
        "./usr/share/man/man1/clonectl.1.gz", "./usr/share/man/man8/hydrationd.8.gz",
        "./usr/share/man/man5/hydrationtab.5.gz", "./usr/share/bash-completion/completions/clonectl",
        "./usr/share/zsh/vendor-completions/_clonectl", "./usr/share/fish/vendor_completions.d/clonectl.fish",
        "./etc/hydrationtab", "./usr/share/doc/hydrationd/copyright", "./usr/share/doc/hydrationd/changelog.gz",
        "./usr/share/doc/hydrationd/examples/hydrationd-metrics.conf",
        "./usr/share/doc/hydrationd/examples/hydrationd-alerts.yml",
    ):
        assert path in listing, f"{path} missing from the package"
    assert all(" root/root " in l for l in listing.splitlines()), "files not owned by root in the package"
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"], capture_output=True, text=True, check=True
    ).stdout
    assert "Package: hydrationd" in fields and "Version: 1.2.3~test" in fields and "libnbd0" in fields
    assert (control / "conffiles").read_text().split() == ["/etc/hydrationtab"]
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper" in postinst and "hydrationd.socket" in postinst
    assert "start hydrationd.service" not in postinst, "the service must not be started on install"
    service = (root / "usr/lib/systemd/system/hydrationd.service").read_text()
    assert "ExecStart=/usr/sbin/hydrationd " in service and "/usr/local/bin" not in service
    for page in ("man1/clonectl.1.gz", "man8/hydrationd.8.gz", "man5/hydrationtab.5.gz", "man1/clonectl-nbd.1.gz"):
        text = subprocess.run(
            ["man", "-l", str(root / "usr/share/man" / page)], capture_output=True, text=True, check=True,
            env=dict(os.environ, MANWIDTH="100"),
        ).stdout
        assert "NAME" in text and len(text) > 200, page
    # The packaged generator reads the packaged table (comments only: no units) and a real one.
    gen = root / "usr/lib/systemd/system-generators/hydrationd-generator"
    for tab, expect in ((root / "etc/hydrationtab", []), (None, ["hydrationd-job-vm1.service"])):
        if tab is None:
            tab = root.parent / "tab"
            tab.write_text("vm1 /a /b\n")
        outdir = root.parent / f"gen-{len(expect)}"
        outdir.mkdir()
        r = subprocess.run([str(gen), str(outdir)], env=dict(os.environ, HYDRATIONTAB=str(tab)), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        units = sorted(p.name for p in outdir.glob("hydrationd-job-*.service"))
        assert units == expect
        if expect:
            assert "ExecStart=/usr/bin/clonectl " in (outdir / expect[0]).read_text()


def test_the_packaged_binaries_run_a_job(package, tmp_path):
    _, root, _ = package
    src = write_image(tmp_path / "src.img", 3 * MiB)
    dst = tmp_path / "dst.img"
    sock = str(tmp_path / "control.sock")
    daemon = subprocess.Popen(
        [str(root / "usr/sbin/hydrationd"), "--state-dir", str(tmp_path / "state"), "--socket", sock],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "wb"),
    )
    clonectl = str(root / "usr/bin/clonectl")
    try:
        env = dict(os.environ, HYDRATION_SOCKET=sock)
        r = None
        for _ in range(600):
            r = subprocess.run([clonectl, "list"], capture_output=True, text=True, env=env)
            if r.returncode == 0:
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            subprocess.run(["sleep", "0.1"])
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [clonectl, "start", "pkg", "--source", src, "--dest", str(dst), "--wait"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert hashlib.sha256(Path(src).read_bytes()).digest() == hashlib.sha256(dst.read_bytes()).digest()
        digests = subprocess.run([clonectl, "digest", src, str(dst)], capture_output=True, text=True, check=True)
        a, b = [l.split()[0] for l in digests.stdout.splitlines()]
        assert a == b and a.startswith("hyd1:")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
