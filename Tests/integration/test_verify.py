"""Verified release (`clonectl start --verify`, docs/design.md "Verified release") against a
destination that acknowledges every write and keeps nothing, built from real tools: nbdkit's
null plugin (writes are discarded, reads return zeros) exposed as a regular file by nbdfuse.

Without --verify the job completes and releases its whole source: the data exists nowhere.
With --verify it fails with DestinationMismatch and the source keeps every byte.
Every nbdkit and nbdfuse started here is stopped by PID (the FUSE mount is unmounted first)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hydtest import CLONECTL, HYDRATIOND, Daemon, make_image, sha256_of  # noqa: E402

MiB = 1 << 20
SIZE = 8 * MiB
REGION = 64 << 10

pytestmark = [
    pytest.mark.skipif(not (os.path.exists(CLONECTL) and os.path.exists(HYDRATIOND)), reason="not built"),
    pytest.mark.skipif(not (shutil.which("nbdkit") and shutil.which("nbdfuse")), reason="nbdkit/nbdfuse missing"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"),
]


def _wait_for(pred, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen within {timeout}s")


@pytest.fixture
def lying_dest(tmp_path):
    """A regular file (on FUSE) of SIZE bytes whose writes succeed and are kept nowhere."""
    sock = str(tmp_path / "null.sock")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "nbd.log", "ab")
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "null", f"size={SIZE}"], stdout=log, stderr=log)
    fuse = None
    try:
        _wait_for(lambda: os.path.exists(sock), f"nbdkit socket {sock}")
        fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), "--unix", sock], stdout=log, stderr=log)
        _wait_for(lambda: os.path.exists(mnt / "disk") and os.path.getsize(mnt / "disk") == SIZE,
                  "nbdfuse file mnt/disk of the export's size")
        yield str(mnt / "disk")
    finally:
        if fuse is not None:
            # The daemon fixture is torn down first (tests take lying_dest before daemon), so
            # nothing holds the file; a lazy unmount still ends the mount if something does.
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            try:
                fuse.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        nbdkit.terminate()
        try:
            nbdkit.wait(timeout=60)
        except subprocess.TimeoutExpired:
            nbdkit.kill()
            nbdkit.wait()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def clonectl(daemon, *args, timeout=180):
    env = dict(os.environ)
    env["HYDRATION_SOCKET"] = daemon.sock
    return subprocess.run([CLONECTL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def source(tmp_path):
    src = str(tmp_path / "src.img")
    digest = make_image(src, SIZE, seed=26)  # 1 MiB chunks: data, hole, data, zeros, ...
    keep = str(tmp_path / "src.copy")
    shutil.copyfile(src, keep)
    return src, keep, digest


def test_without_verify_a_destination_that_keeps_nothing_costs_the_source(lying_dest, daemon, tmp_path):
    """The data loss verify exists for: complete, exit 0, the source released, nothing anywhere."""
    src, keep, digest = source(tmp_path)
    r = clonectl(daemon, "start", "lost", "--source", src, "--dest", lying_dest, "--discard-source", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    st = daemon.status("lost")
    assert st["state"] == "complete", st
    assert st["verify"]["enabled"] is False
    assert st["bytes"]["discarded"] > 0
    daemon.stop()
    # The source is released (its data reads as zeros now) and the destination holds nothing.
    assert sha256_of(src) != digest
    assert sha256_of(src) == hashlib.sha256(b"\0" * SIZE).hexdigest()
    assert sha256_of(lying_dest) == hashlib.sha256(b"\0" * SIZE).hexdigest()
    assert sha256_of(keep) == digest  # (the test's own copy: the user would have none)


def test_verify_fails_with_destination_mismatch_and_the_source_keeps_its_data(lying_dest, daemon, tmp_path):
    src, keep, digest = source(tmp_path)
    r = clonectl(daemon, "start", "v", "--source", src, "--dest", lying_dest, "--discard-source", "--verify",
                 "--wait")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DestinationMismatch" in r.stdout + r.stderr, r.stdout + r.stderr
    st = daemon.status("v")
    assert st["state"] == "failed", st
    e = st["error"]
    assert e["code"] == "DestinationMismatch", e
    region, offset = e["region"], e["offset"]
    assert region * REGION <= offset < (region + 1) * REGION, e
    with open(keep, "rb") as f:
        f.seek(region * REGION)
        want = f.read(REGION)
    assert e["expected_digest"] == hashlib.sha256(want).hexdigest(), e
    assert e["found_digest"] == hashlib.sha256(b"\0" * REGION).hexdigest(), e
    # Batches in flight may each find their own mismatch.
    assert st["verify"]["enabled"] is True and st["verify"]["mismatches"] >= 1, st["verify"]
    assert st["verify"]["read_back"] in ("direct", "evicted"), st["verify"]
    # The human status names it too.
    human = clonectl(daemon, "status", "v")
    assert "DestinationMismatch" in human.stdout and "verify" in human.stdout, human.stdout
    # The job's record keeps the option (a restart resumes with verify on).
    with open(os.path.join(daemon.state, "jobs", "v.json")) as f:
        assert json.load(f)["verify"] is True
    # Nothing of the source was lost: every byte still there. Read once the daemon has let go
    # of it: the job keeps its write lease on the source, and an open would wait for it.
    daemon.stop()
    assert sha256_of(src) == digest
