"""`clonectl digest` (docs/digest.md) against an independent implementation of the documented
construction in hashlib, on files with holes, zero runs, random data and unaligned tails; and the
same bytes as a file, a loop block device and NBD exports (nbdkit) giving the same digest.
Every nbdkit started here is stopped by PID; every loop device is detached."""
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hydtest import BIN_DIR, CLONECTL  # noqa: E402

CLONECTL_NBD = os.path.join(BIN_DIR, "clonectl-nbd")
LEAF = 4096
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not os.path.exists(CLONECTL), reason=f"{CLONECTL} not built")


# --- The construction of docs/digest.md, written from the document, in plain hashlib -------------

def reference_digest(data: bytes) -> str:
    """hyd1: SHA-256 Merkle tree over 4 KiB leaves, left-complete split, domain bytes 0/1/2."""
    n = max(1, -(-len(data) // LEAF))
    leaves = [hashlib.sha256(b"\x00" + data[i * LEAF:(i + 1) * LEAF]).digest() for i in range(n)]

    def tree(lo, hi):
        if hi - lo == 1:
            return leaves[lo]
        p = 1
        while p * 2 < hi - lo:
            p *= 2
        return hashlib.sha256(b"\x01" + tree(lo, lo + p) + tree(lo + p, hi)).digest()

    root = tree(0, n)
    return "hyd1:" + hashlib.sha256(b"\x02" + struct.pack("<Q", len(data)) + root).hexdigest()


def digest(*paths, env=None, timeout=120):
    return subprocess.run([CLONECTL, "digest", *paths], capture_output=True, text=True, env=env, timeout=timeout)


def digests_of(*paths):
    r = digest(*paths)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(paths), r.stdout
    out = []
    for line, p in zip(lines, paths):
        d, name = line.split("  ", 1)
        assert name == p
        out.append(d)
    return out


def allocated(path):
    return os.stat(path).st_blocks * 512


def write_image(path, size, pieces):
    """A sparse file of `size` bytes with `pieces` [(offset, bytes)] written; the rest are holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in pieces:
            f.seek(off)
            f.write(b)
    with open(path, "rb") as f:
        return f.read()


def images(tmp, rng):
    """name -> (path, bytes): holes, zero data, random data, unaligned tails, empty."""
    out = {}

    def add(name, size, pieces):
        p = str(tmp / name)
        out[name] = (p, write_image(p, size, pieces))

    rnd = lambda n: rng.randbytes(n)  # noqa: E731
    # Data islands in holes, one ending mid-leaf, the file ending in a hole with an unaligned size.
    add("holes", 6 * MiB + 1000, [(0, rnd(5000)), (2 * MiB + 4096, rnd(3 * 4096 + 17)), (5 * MiB - 100, rnd(200))])
    # Zeros written as data (allocated, not holes) between random data.
    add("zerodata", 3 * MiB + 4096 * 3 + 1, [(0, rnd(MiB)), (MiB, bytes(MiB + 4096)), (2 * MiB + 4096, rnd(MiB + 8193))])
    add("random", 2 * MiB + 12345, [(0, rnd(2 * MiB + 12345))])
    add("tiny", 100, [(0, rnd(100))])
    add("oneleaf", 4096, [(0, rnd(4096))])
    add("leafplus1", 4097, [(0, rnd(4097))])
    add("empty", 0, [])
    add("allhole", 5 * MiB + 3, [])
    return out


def test_digest_matches_independent_reference(tmp_path):
    imgs = images(tmp_path, random.Random(26))
    assert allocated(imgs["holes"][0]) < 2 * MiB, "the holes image must really have holes"
    assert allocated(imgs["zerodata"][0]) >= 3 * MiB, "the zero runs must be data, not holes"
    names = list(imgs)
    got = digests_of(*[imgs[n][0] for n in names])
    for name, d in zip(names, got):
        assert d == reference_digest(imgs[name][1]), name
    # Different content, different digest (the digest is not constant).
    assert len(set(got)) == len(got)


def test_digest_json_and_thread_counts(tmp_path):
    imgs = images(tmp_path, random.Random(7))
    path, data = imgs["holes"]
    want = reference_digest(data)
    for threads in ("1", "2", "5"):
        r = subprocess.run([CLONECTL, "digest", "--threads", threads, "--json", path],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        [entry] = json.loads(r.stdout)
        assert entry["digest"] == want
        assert entry["size_bytes"] == len(data)
        assert entry["threads"] == int(threads)
        # The data map kept the large holes from being read.
        assert entry["bytes_skipped"] >= 2 * MiB, entry


def test_digest_errors_are_named(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(b"x" * 5000)
    r = digest(str(tmp_path / "missing"), str(good))
    assert r.returncode == 66, r
    assert "missing: no such file or block device" in r.stderr
    # The other argument is still digested.
    assert r.stdout.strip() == f"{reference_digest(b'x' * 5000)}  {good}"

    r = digest(str(tmp_path))
    assert r.returncode == 66 and "not a regular file or block device" in r.stderr, r

    r = digest("http://example.invalid/disk.img")
    assert r.returncode == 64 and "not a URI clonectl knows" in r.stderr, r

    r = subprocess.run([CLONECTL, "digest"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 64, r


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed")
def test_digest_unreachable_nbd_servers(tmp_path):
    # No socket at all, and a TCP port nobody listens on: unreachable at once.
    r = digest(f"nbd+unix:///?socket={tmp_path}/nothing.sock")
    assert r.returncode == 69 and "cannot reach the NBD export" in r.stderr, r
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = digest(f"nbd://127.0.0.1:{port}/")
    assert r.returncode == 69, r
    # A URI libnbd cannot parse is the user's to fix: a usage error, not "unreachable".
    r = digest("nbd+unix:///disk")
    assert r.returncode == 64 and "not a valid NBD URI" in r.stderr, r
    # A listener that accepts and never greets: the connection deadline ends it.
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(str(tmp_path / "mute.sock"))
    lst.listen(8)
    try:
        env = dict(os.environ, HYDRATION_NBD_CONNECT_TIMEOUT_MS="1500")
        start = time.monotonic()
        r = digest(f"nbd+unix:///?socket={tmp_path}/mute.sock", env=env, timeout=90)
        took = time.monotonic() - start
        assert r.returncode == 69, r
        assert "cannot reach the NBD export" in r.stderr, r.stderr
        # Liveness guard only: it ended by its own deadline, not by the test's.
        assert took < 60, f"clonectl digest waited {took:.1f} s on a server that never greets"
    finally:
        lst.close()


class NBDKit:
    """nbdkit on a private Unix socket, in the foreground; stopped by PID."""

    def __init__(self, tmp, name, args):
        self.sock = str(tmp / f"{name}.sock")
        self.log = str(tmp / f"{name}.log")
        self.args = args
        self.proc = None

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def __enter__(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", self.sock, *self.args],
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {open(self.log).read()}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.sock)
                s.close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nbdkit did not listen on {self.sock} within 60 s: {open(self.log).read()}")
                time.sleep(0.05)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def loop_device():
    attached = []

    def attach(path):
        dev = subprocess.run(["losetup", "--show", "-f", "-r", str(path)], check=True,
                             capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed")
@pytest.mark.skipif(not os.path.exists(CLONECTL_NBD), reason=f"{CLONECTL_NBD} not built")
def test_file_block_device_and_nbd_exports_agree(tmp_path, loop_device):
    rng = random.Random(99)
    # A size that a loop device keeps (a multiple of 512) but not of 4096: a short last leaf.
    size = 4 * MiB + 1536
    path = str(tmp_path / "img")
    data = write_image(path, size, [(0, rng.randbytes(700_000)), (MiB, bytes(300_000)),
                                    (3 * MiB + 5, rng.randbytes(MiB + 1531 - 5))])
    want = reference_digest(data)
    sources = [path]
    if os.geteuid() == 0 and shutil.which("losetup"):
        sources.append(loop_device(path))
    with NBDKit(tmp_path, "file", ["file", path]) as f:
        sources.append(f.uri)
        got = digests_of(*sources)
    assert got == [want] * len(sources), dict(zip(sources, got))

    # The pattern plugin (each 8 bytes: their offset, big-endian) and the memory plugin (all zeros,
    # reported as holes by BLOCK_STATUS), both of an unaligned size.
    psize = 2 * MiB + 4100
    pattern = b"".join(struct.pack(">Q", o) for o in range(0, psize + 8, 8))[:psize]
    with NBDKit(tmp_path, "pattern", ["pattern", f"size={psize}"]) as p, \
            NBDKit(tmp_path, "memory", ["memory", f"size={3 * MiB + 77}"]) as m:
        got = digests_of(p.uri, m.uri)
        # BLOCK_STATUS told the memory export is all zeros: nothing read, every byte skipped.
        r = subprocess.run([CLONECTL, "digest", "--json", m.uri], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        [entry] = json.loads(r.stdout)
        assert (entry["bytes_read"], entry["bytes_skipped"]) == (0, 3 * MiB + 77), entry
    assert got == [reference_digest(pattern), reference_digest(bytes(3 * MiB + 77))]


def test_nbd_uri_without_the_helper_is_a_named_error(tmp_path):
    """clonectl alone (no clonectl-nbd beside it) refuses NBD URIs with a named error, exit 69,
    and still digests files."""
    lone = tmp_path / "bin"
    lone.mkdir()
    shutil.copy(CLONECTL, lone / "clonectl")
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    r = subprocess.run([str(lone / "clonectl"), "digest", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(reference_digest(b"abc")), r
    r = subprocess.run([str(lone / "clonectl"), "digest", f"nbd+unix:///?socket={tmp_path}/s.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 69, r
    assert "clonectl-nbd, which could not be run at" in r.stderr and str(lone) in r.stderr, r.stderr
