"""Nothing past the clone's end is the job's: on a destination larger than the source (a
pre-allocated image, a reused file, a bigger block device), no writer may touch the bytes past
the source's size. A real hydrationd serves the clone (--export), a real client (libnbd through
Debian's python) trims, zeroes, writes and caches the last, partial region, the copier then
finishes the job, and the destination's own bytes past the clone's end must be intact.

(A TRIM of the last region used to punch through the whole region on a file destination:
region size - 1000 bytes of the destination's own data past the clone were zeroed.)

Every test starts its own hydrationd and stops it by PID; loop devices are detached. Run:
    python3 -m pytest -x Tests/integration/test_clone_end.py
"""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hydtest import HYDRATIOND, Daemon, make_image  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
DEBIAN_PYTHON = "/usr/bin/python3"
REGION = 64 * KiB
SIZE = 16 * REGION + 1000          # the last region holds 1000 bytes
TAIL = 256 * KiB                   # the destination's own bytes past the clone

pytestmark = [
    pytest.mark.skipif(not os.path.exists(HYDRATIOND), reason=f"{HYDRATIOND} not built"),
    pytest.mark.skipif(not os.path.exists(DEBIAN_PYTHON) or subprocess.run(
        [DEBIAN_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0,
        reason="python3-libnbd (import nbd with /usr/bin/python3) is not installed"),
]

# argv: uri, operation, offset of the last region. Prints "ok" or the error.
CLIENT = r"""
import sys, nbd
uri, op, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
n = size - last
if op == "trim":
    h.trim(n, last)
elif op == "zero":
    h.zero(n, last)
elif op == "zero-nohole":
    h.zero(n, last, nbd.CMD_FLAG_NO_HOLE)
elif op == "zero-fast":
    h.zero(n, last, nbd.CMD_FLAG_FAST_ZERO)
elif op == "write":
    h.pwrite(b"\x5a" * 200, last + 100)
elif op == "cache":
    h.cache(n, last)
elif op == "trim-all":
    h.trim(size, 0)
h.flush()
h.shutdown()
print("ok")
"""


def sha(data):
    return hashlib.sha256(data).hexdigest()


def own_tail(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(TAIL)


def run_case(tmp_path, dest, dest_tail_path, dest_tail_offset, op):
    src = str(tmp_path / "src.img")
    make_image(src, SIZE, seed=21)
    last = 16 * REGION
    if op == "copier-hole":
        # The last region reads as zeros: the copier zeroes it on a destination not known zero
        # (punch, or BLKZEROOUT, which refuses a range ending inside a sector: zeros written).
        with open(src, "r+b") as f:
            f.seek(last)
            f.write(bytes(SIZE - last))
        subprocess.run(["fallocate", "-p", "-o", str(last), "-l", str(SIZE - last), src], capture_output=True)
    with open(src, "rb") as f:
        expected = bytearray(f.read())
    if op in ("trim", "zero", "zero-nohole", "zero-fast"):
        expected[last:] = bytes(SIZE - last)
    elif op == "write":
        expected[last + 100:last + 300] = b"\x5a" * 200
    elif op == "trim-all":
        expected[:] = bytes(SIZE)
    d = Daemon(tmp_path).start()
    try:
        d.call("Start", {"name": "c", "source": src, "dest": dest, "region_size": REGION,
                         "export": True, "no_hydration": True})
        uri = d.status("c")["export"]["uri"]
        if not op.startswith("copier"):
            r = subprocess.run([DEBIAN_PYTHON, "-c", CLIENT, uri, op, str(last)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and r.stdout.strip() == "ok", (r.stdout, r.stderr)
        d.call("Resume", {"name": "c"})
        d.wait_state("c", ["complete"], timeout=120)
        with open(dest, "rb") as f:
            got = f.read(SIZE)
        # A trimmed range may read as anything (a hint the device may not take: BLKDISCARD refuses
        # a range that ends inside a sector); everything else is exact.
        upto = {"trim": last, "trim-all": 0}.get(op, SIZE)
        assert got[:upto] == bytes(expected[:upto]), "the clone is the source with the client's changes"
    finally:
        d.kill()
    tail = own_tail(dest_tail_path, dest_tail_offset)
    assert len(tail) == TAIL
    first_bad = next((i for i, b in enumerate(tail) if b != 0xEE), None)
    assert first_bad is None, (
        f"{op}: the destination's own bytes past the clone's end were changed "
        f"({sum(1 for b in tail if b != 0xEE)} bytes, the first at clone end + {first_bad})")


OPS = ["trim", "zero", "zero-nohole", "zero-fast", "write", "cache", "trim-all", "copier", "copier-hole"]


@pytest.mark.parametrize("op", OPS)
def test_a_larger_file_destination_keeps_its_bytes_past_the_clone(tmp_path, op):
    dest = str(tmp_path / "dest.img")
    with open(dest, "wb") as f:
        f.write(b"\xee" * (SIZE + TAIL))
    run_case(tmp_path, dest, dest, SIZE, op)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("losetup"),
                    reason="needs root and loop devices")
@pytest.mark.parametrize("op", OPS)
def test_a_larger_block_device_destination_keeps_its_bytes_past_the_clone(tmp_path, op):
    backing = str(tmp_path / "backing.img")
    # The device is a whole number of sectors; the clone ends inside one.
    dev_size = (SIZE + TAIL + 511) // 512 * 512
    with open(backing, "wb") as f:
        f.write(b"\xee" * dev_size)
    loop = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True, check=True).stdout.strip()
    try:
        run_case(tmp_path, loop, backing, SIZE, op)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
