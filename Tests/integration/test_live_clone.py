"""The live clone with a real filesystem on it (issue 12): an ext4 image is moved with
--discard-source while it is mounted from the clone (hydrationd's NBD export -> nbdfuse -> loop
device -> mount). Files are written and synced during hydration, hydrationd is killed with SIGKILL
mid-way and restarted; the filesystem is mounted again from the clone (its journal replays),
written, unmounted cleanly; after completion e2fsck finds the destination clean and every synced
file is intact, and the source's space was given back.

Root only (loop devices, mounts, FUSE). Everything started is stopped by PID, unmounted and
detached, whatever happens. Run:
    python3 -m pytest -x Tests/integration/test_live_clone.py
"""
import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hydtest import CLONECTL, HYDRATIOND, Daemon, allocated  # noqa: E402

MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not os.path.exists(HYDRATIOND), reason=f"{HYDRATIOND} not built"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="no loop devices"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount"]),
                       reason="nbdfuse (libnbd-bin), util-linux or e2fsprogs missing"),
]


def sh(*args, check=True, timeout=120):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {r.returncode}: {r.stdout} {r.stderr}")
    return r


def clonectl(d, *args):
    return subprocess.run([CLONECTL, "--socket", d.sock, *args], capture_output=True, text=True, timeout=60)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_random(path, size, seed):
    data = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(data) < size:
        block = hashlib.sha256(block).digest()
        data += block * 64
    with open(path, "wb") as f:
        f.write(bytes(data[:size]))
        f.flush()
        os.fsync(f.fileno())


class Attached:
    """The clone as a mounted filesystem: nbdfuse (the export as a file), a loop device over it,
    ext4 mounted from the loop device. `detach` undoes everything, even after the daemon died."""

    def __init__(self, tmp, uri, tag):
        self.fuse_dir = os.path.join(tmp, f"fuse-{tag}")
        self.mnt = os.path.join(tmp, f"mnt-{tag}")
        os.makedirs(self.fuse_dir)
        os.makedirs(self.mnt)
        self.disk = os.path.join(self.fuse_dir, "disk")
        self.fuse = subprocess.Popen(["nbdfuse", self.disk, uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.loop = None
        self.mounted = False
        deadline = time.time() + 15
        while not os.path.exists(self.disk):
            if time.time() > deadline or self.fuse.poll() is not None:
                err = self.fuse.stderr.read().decode() if self.fuse.poll() is not None else ""
                self.detach()
                raise AssertionError(f"nbdfuse did not serve {uri}: {err}")
            time.sleep(0.05)
        self.loop = sh("losetup", "-f", "--show", self.disk).stdout.strip()
        sh("mount", "-t", "ext4", self.loop, self.mnt)
        self.mounted = True

    def unmount_cleanly(self):
        sh("umount", self.mnt)
        self.mounted = False

    def detach(self):
        if self.mounted:
            if sh("umount", self.mnt, check=False).returncode != 0:
                sh("umount", "-l", self.mnt, check=False)
            self.mounted = False
        if self.loop:
            sh("losetup", "-d", self.loop, check=False)
            self.loop = None
        sh("umount", self.fuse_dir, check=False)
        if self.fuse.poll() is None:
            self.fuse.terminate()
            try:
                self.fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()


def test_ext4_on_the_live_clone_survives_sigkill(tmp_path):
    tmp = str(tmp_path)
    seed_dir = os.path.join(tmp, "seed")
    os.makedirs(seed_dir)
    expected = {}
    for i in range(16):
        p = os.path.join(seed_dir, f"seed{i}")
        write_random(p, 512 * 1024 + i * 4096, seed=i)
        expected[f"seed{i}"] = sha(p)
    src = os.path.join(tmp, "src.img")
    dst = os.path.join(tmp, "dst.img")
    sh("mkfs.ext4", "-q", "-F", "-d", seed_dir, "-E", "lazy_itable_init=0,lazy_journal_init=0", src, "96M")
    src_allocated = allocated(src)

    d = Daemon(tmp_path).start()
    attached = []
    try:
        r = clonectl(d, "start", "fs", "--source", src, "--dest", dst, "--discard-source", "--export",
                     "--rate-limit", "1M", "--commit-interval", "1h")
        assert r.returncode == 0, r.stderr
        st = d.status("fs")
        uri = st["export"]["uri"]
        # A mostly empty filesystem image: io=auto takes the direct-I/O path (docs/live-clone.md),
        # where the filesystem holding it can do direct I/O.
        assert st["source"]["io_reason"].startswith("io=auto: file source"), st["source"]
        assert st["dest"]["io_reason"].startswith("io=auto: file source"), st["dest"]

        a = Attached(tmp, uri, "1")
        attached.append(a)
        # The seed files read through the clone while most of it still comes from the source.
        for name, digest in expected.items():
            assert sha(os.path.join(a.mnt, name)) == digest, f"{name} differs on the live clone"
        # New files, written and synced (syncfs -> loop flush -> nbdfuse fsync -> NBD FLUSH).
        for i in range(6):
            p = os.path.join(a.mnt, f"new{i}")
            write_random(p, 2 * MiB + i * 512, seed=100 + i)
            expected[f"new{i}"] = sha(p)
        os.remove(os.path.join(a.mnt, "seed3"))
        del expected["seed3"]
        sh("sync", "-f", a.mnt)
        st = d.status("fs")
        assert st["state"] == "hydrating", st
        assert st["regions"]["hydrated"] < st["regions"]["total"], "the copy must still be under way at the kill"
        # Written and unsynced data after the flush may be lost; the kill lands here.
        write_random(os.path.join(a.mnt, "unsynced"), 1 * MiB, seed=999)
        d.kill()
        a.detach()

        d.start()
        st = d.wait_state("fs", ["hydrating", "complete"])
        assert st["export"] is not None, "the export comes back with the restart"
        b = Attached(tmp, st["export"]["uri"], "2")
        attached.append(b)
        for name, digest in expected.items():
            assert sha(os.path.join(b.mnt, name)) == digest, f"{name} (synced before the SIGKILL) differs after the restart"
        p = os.path.join(b.mnt, "after-restart")
        write_random(p, 3 * MiB, seed=7)
        expected["after-restart"] = sha(p)
        b.unmount_cleanly()
        b.detach()

        assert clonectl(d, "set", "fs", "--rate-limit", "0").returncode == 0
        st = d.wait_state("fs", ["complete"], timeout=120)
        assert st["bytes"]["hydrated"] == st["bytes"]["total"]
    finally:
        for a in attached:
            a.detach()
        d.stop()

    # The destination is the filesystem: clean, and every synced file is there.
    fsck = sh("e2fsck", "-fn", dst, check=False)
    assert fsck.returncode == 0, f"e2fsck: {fsck.stdout} {fsck.stderr}"
    mnt = os.path.join(tmp, "mnt-final")
    os.makedirs(mnt)
    sh("mount", "-o", "loop,ro", dst, mnt)
    try:
        for name, digest in expected.items():
            assert sha(os.path.join(mnt, name)) == digest, f"{name} differs on the final destination"
        assert not os.path.exists(os.path.join(mnt, "seed3")), "a synced delete came back"
    finally:
        sh("umount", mnt, check=False)
    # The source's space was given back as it went.
    assert allocated(src) < src_allocated // 10, f"source still holds {allocated(src)} of {src_allocated} bytes"


@pytest.mark.skipif(not shutil.which("nbdcopy"), reason="nbdcopy (libnbd-bin) missing")
def test_a_complete_job_is_served_again_after_a_restart(tmp_path):
    """A complete job is restored from its metadata alone (its source is never opened again);
    its clone, the destination, is still served: reads, writes and flushes go there."""
    from hydtest import make_image
    tmp = str(tmp_path)
    src = os.path.join(tmp, "src.img")
    dst = os.path.join(tmp, "dst.img")
    make_image(src, 8 * MiB + 4096, seed=5)
    want = sha(src)
    d = Daemon(tmp_path).start()
    try:
        assert clonectl(d, "start", "c", "--source", src, "--dest", dst, "--export").returncode == 0
        d.wait_state("c", ["complete"])
        d.stop()
        # The source is gone: a complete job must not need it.
        os.rename(src, src + ".moved")
        d.start()
        st = d.wait_state("c", ["complete"])
        assert st["export"] is not None, st
        uri = st["export"]["uri"]
        out = os.path.join(tmp, "out.img")
        sh("nbdcopy", uri, out)
        assert os.path.getsize(out) == 8 * MiB + 4096, "the export is the job's size, not the destination's"
        assert sha(out) == want
        # Writes go to the destination.
        if shutil.which("qemu-io"):
            sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "flush", uri)
            with open(dst, "rb") as f:
                f.seek(4096)
                assert f.read(65536) == b"\x5a" * 65536, "a write through the export reaches the destination"
        # Its destination replaced while the daemon is down: not served, and the status says why.
        d.stop()
        os.rename(dst, dst + ".real")
        with open(dst, "wb") as f:
            f.write(b"\0" * (8 * MiB + 4096))
        d.start()
        st = d.wait_state("c", ["complete"])
        assert st["export"] is None, "another file at the destination's path must not be served"
        assert st["error"] and st["error"]["code"] == "DeviceUnconfirmed" and "not served" in st["error"]["message"], st["error"]
        # Removing it withdraws the export and closes the destination.
        assert clonectl(d, "remove", "c").returncode == 0
    finally:
        d.stop()
