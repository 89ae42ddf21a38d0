"""The real hydrationd against the kernel's edges (issue 11): devices reused or renumbered across a
restart, a complete job's source reused by another job. Root and loop devices needed; every loop
device is detached and every daemon killed by PID, whatever happens."""
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hydtest import HYDRATIOND, Daemon, VarlinkError, allocated, make_image, sha256_of  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not os.path.exists(HYDRATIOND), reason=f"{HYDRATIOND} not built"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)"),
]

MiB = 1 << 20


@pytest.fixture
def loops():
    """Attach files to loop devices; everything attached is detached at the end."""
    attached = []

    def attach(path, device=None):
        args = ["losetup", "--show"] + ([device] if device else ["-f"]) + [str(path)]
        dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        return dev

    def detach(dev):
        subprocess.run(["losetup", "-d", dev], check=True)
        attached.remove(dev)

    attach.detach = detach
    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


def random_file(path, size, seed):
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rnd.randbytes(size))
    return sha256_of(path)


def wait_bytes(d, name, key, at_least, timeout=20):
    """Waits until the job's status shows `bytes[key] >= at_least` (committed, discarded...)."""
    deadline = time.time() + timeout
    while d.status(name)["bytes"][key] < at_least:
        assert time.time() < deadline, d.status(name)
        time.sleep(0.05)


def test_a_renumbered_destination_is_not_written(tmp_path, loops):
    """kill -9 mid-copy; the destination's /dev/loopN then names another file of the same size (what
    a reboot or a detach/attach does): the restarted job must not write to it, and resumes once the
    right file is back. Before the stable identity, rdev + size matched and the job wrote into the
    other file."""
    size = 48 * MiB
    src_sum = make_image(tmp_path / "src.img", size, seed=3)
    (tmp_path / "d1.img").write_bytes(b"")
    os.truncate(tmp_path / "d1.img", size)
    other_sum = random_file(tmp_path / "d2.img", size, seed=4)
    dev = loops(tmp_path / "d1.img")
    d = Daemon(tmp_path, "ren").start()
    try:
        d.call("Start", {"name": "j", "source": str(tmp_path / "src.img"), "dest": dev,
                         "commit_interval_ms": 50, "rate_limit_bytes_per_second": 8 * MiB})
        wait_bytes(d, "j", "committed", 4 * MiB)
        d.kill(signal.SIGKILL)
        loops.detach(dev)
        assert loops(tmp_path / "d2.img", dev) == dev
        d.start()
        st = d.status("j")
        assert st["state"] == "failed", st
        assert st["error"]["code"] == "DeviceUnconfirmed", st["error"]
        with pytest.raises(VarlinkError) as e:
            d.call("Resume", {"name": "j"})
        assert "not the device" in str(e.value.parameters), e.value.parameters
        d.stop()
        assert sha256_of(tmp_path / "d2.img") == other_sum, "the restarted job wrote to another device"

        # The right file back at the same path: resume opens it and finishes.
        loops.detach(dev)
        loops(tmp_path / "d1.img", dev)
        d.start()
        d.call("Resume", {"name": "j"})
        d.call("Set", {"name": "j", "rate_limit_bytes_per_second": 0})
        d.wait_state("j", ["complete"], timeout=60)
        assert sha256_of(dev, size) == src_sum
    finally:
        d.kill()


def test_a_renumbered_source_is_not_released(tmp_path, loops):
    """The source is a loop device with discard_source; after kill -9 its /dev/loopN names another
    file of the same size. Before the fix the restart re-released every committed region of the
    job on that other file (data loss on a device the job never owned)."""
    size = 32 * MiB
    make_image(tmp_path / "s1.img", size, seed=5)
    other_sum = random_file(tmp_path / "s2.img", size, seed=6)
    src = loops(tmp_path / "s1.img")
    d = Daemon(tmp_path, "rens").start()
    try:
        d.call("Start", {"name": "j", "source": src, "dest": str(tmp_path / "dst.img"), "discard_source": True,
                         "commit_interval_ms": 50, "rate_limit_bytes_per_second": 8 * MiB})
        wait_bytes(d, "j", "discarded", 4 * MiB)
        d.kill(signal.SIGKILL)
        loops.detach(src)
        assert loops(tmp_path / "s2.img", src) == src
        before = allocated(tmp_path / "s2.img")
        d.start()
        st = d.status("j")
        assert st["state"] == "failed" and st["error"]["code"] == "DeviceUnconfirmed", st
        time.sleep(0.5)
        d.stop()
        assert allocated(tmp_path / "s2.img") == before
        assert sha256_of(tmp_path / "s2.img") == other_sum, "a restart released regions of another device"
    finally:
        d.kill()


def test_a_complete_jobs_source_reused_as_a_destination_survives_restarts(tmp_path):
    """Job a copies S to D with discard_source and completes; job b copies X onto S; graceful and
    kill -9 restarts must leave S alone. Before the fix, a's restore punched all of S."""
    size = 16 * MiB
    s_sum = make_image(tmp_path / "S", size, seed=7)
    x_sum = make_image(tmp_path / "X", size, seed=8)
    d = Daemon(tmp_path, "reuse").start()
    try:
        d.call("Start", {"name": "a", "source": str(tmp_path / "S"), "dest": str(tmp_path / "D"), "discard_source": True})
        d.wait_state("a", ["complete"], timeout=60)
        assert sha256_of(tmp_path / "D") == s_sum and allocated(tmp_path / "S") == 0
        d.call("Start", {"name": "b", "source": str(tmp_path / "X"), "dest": str(tmp_path / "S")})
        d.wait_state("b", ["complete"], timeout=60)
        for stop in (d.stop, lambda: d.kill(signal.SIGKILL)):
            stop()
            d.start()
            assert d.status("a")["state"] == "complete"
            time.sleep(0.3)
            assert sha256_of(tmp_path / "S") == x_sum, "a restart released a complete job's source again"
    finally:
        d.kill()


def test_the_operator_accepts_a_moved_destination(tmp_path, loops):
    """The operator moved the partly hydrated destination to another disk (a copy of the file on
    another loop device at the same path): the restart refuses it, `Resume accept_devices` takes
    it, records its identity, and the job finishes on it; the old file is not touched again."""
    size = 32 * MiB
    src_sum = make_image(tmp_path / "src.img", size, seed=9)
    (tmp_path / "d1.img").write_bytes(b"")
    os.truncate(tmp_path / "d1.img", size)
    dev = loops(tmp_path / "d1.img")
    d = Daemon(tmp_path, "acc").start()
    try:
        d.call("Start", {"name": "j", "source": str(tmp_path / "src.img"), "dest": dev,
                         "commit_interval_ms": 50, "rate_limit_bytes_per_second": 8 * MiB})
        wait_bytes(d, "j", "committed", 4 * MiB)
        d.stop()
        loops.detach(dev)
        subprocess.run(["cp", "--sparse=always", str(tmp_path / "d1.img"), str(tmp_path / "d2.img")], check=True)
        d1_sum = sha256_of(tmp_path / "d1.img")
        loops(tmp_path / "d2.img", dev)
        d.start()
        assert d.status("j")["error"]["code"] == "DeviceUnconfirmed"
        d.call("Resume", {"name": "j", "accept_devices": True})
        # Recorded anew: a restart while it still hydrates confirms the new device without help.
        d.stop()
        d.start()
        st = d.status("j")
        assert st["state"] == "hydrating" and st["error"] is None, st
        d.call("Set", {"name": "j", "rate_limit_bytes_per_second": 0})
        d.wait_state("j", ["complete"], timeout=60)
        assert sha256_of(dev, size) == src_sum
        assert sha256_of(tmp_path / "d1.img") == d1_sum
    finally:
        d.kill()


def test_swapped_loop_devices_are_refused_even_when_accepted(tmp_path, loops):
    """The source and destination loop devices come back in the other order: the restart refuses
    them, and `accept_devices` does not take a swap (releasing the "source" would punch the clone)."""
    size = 16 * MiB
    make_image(tmp_path / "s.img", size, seed=10)
    (tmp_path / "d.img").write_bytes(b"")
    os.truncate(tmp_path / "d.img", size)
    src, dst = loops(tmp_path / "s.img"), loops(tmp_path / "d.img")
    d = Daemon(tmp_path, "swap").start()
    try:
        d.call("Start", {"name": "j", "source": src, "dest": dst, "discard_source": True,
                         "commit_interval_ms": 50, "rate_limit_bytes_per_second": 4 * MiB})
        wait_bytes(d, "j", "committed", 2 * MiB)
        d.kill(signal.SIGKILL)
        loops.detach(src)
        loops.detach(dst)
        loops(tmp_path / "d.img", src)
        loops(tmp_path / "s.img", dst)
        d_before = sha256_of(tmp_path / "d.img")
        s_before = sha256_of(tmp_path / "s.img")
        d.start()
        assert d.status("j")["error"]["code"] == "DeviceUnconfirmed"
        with pytest.raises(VarlinkError) as e:
            d.call("Resume", {"name": "j", "accept_devices": True})
        assert e.value.name.endswith("DeviceUnconfirmed") and "swapped" in e.value.parameters["message"]
        d.stop()
        assert sha256_of(tmp_path / "d.img") == d_before and sha256_of(tmp_path / "s.img") == s_before
    finally:
        d.kill()


def test_a_loop_alias_of_a_kept_destination_is_refused(tmp_path, loops):
    """A removed, partly released job's destination is reserved under every name: a loop device
    over that file is refused as a new destination, and as a discard_source source."""
    size = 16 * MiB
    make_image(tmp_path / "s.img", size, seed=11)
    d = Daemon(tmp_path, "alias").start()
    try:
        d.call("Start", {"name": "j", "source": str(tmp_path / "s.img"), "dest": str(tmp_path / "d.img"),
                         "discard_source": True, "commit_interval_ms": 50, "rate_limit_bytes_per_second": 4 * MiB})
        wait_bytes(d, "j", "discarded", 2 * MiB)
        d.call("Pause", {"name": "j"})
        kept = d.call("Remove", {"name": "j", "force": True})["kept_metadata"]
        assert kept
        before = sha256_of(tmp_path / "d.img")
        alias = loops(tmp_path / "d.img")
        make_image(tmp_path / "x.img", size, seed=12)
        for params in ({"name": "w", "source": str(tmp_path / "x.img"), "dest": alias},
                       {"name": "r", "source": alias, "dest": str(tmp_path / "y.img"), "discard_source": True}):
            with pytest.raises(VarlinkError) as e:
                d.call("Start", params)
            assert e.value.name.endswith("DataAtRisk"), e.value
            assert kept in e.value.parameters["message"]
        loops.detach(alias)
        assert sha256_of(tmp_path / "d.img") == before
    finally:
        d.kill()


@pytest.mark.parametrize("kind", ["file", "loop"])
def test_a_source_shrunk_under_the_job_fails_it(tmp_path, loops, kind):
    """The source is truncated (a file) or its loop device resized (`losetup -c` after truncating
    the backing file) while the job copies it. Before the fix the copier read the missing end as
    zeros (and SEEK_DATA's "no more data" as a hole) and the job completed without it (round 3's
    attack 6a). Now the job fails with SourceReadFailed naming the change, and is not complete."""
    size = 64 * MiB
    backing = tmp_path / "src.img"
    make_image(backing, size, seed=9)
    src = str(backing) if kind == "file" else loops(backing)
    d = Daemon(tmp_path, f"shrink-{kind}").start()
    try:
        d.call("Start", {"name": "j", "source": src, "dest": str(tmp_path / "dst.img"),
                         "commit_interval_ms": 50, "rate_limit_bytes_per_second": 8 * MiB})
        wait_bytes(d, "j", "committed", 4 * MiB)
        os.truncate(backing, 16 * MiB)
        if kind == "loop":
            subprocess.run(["losetup", "-c", src], check=True)
        d.call("Set", {"name": "j", "rate_limit_bytes_per_second": 0})
        st = d.wait_state("j", {"failed", "complete"})
        assert st["state"] == "failed", st
        assert st["error"]["code"] == "SourceReadFailed", st["error"]
        assert "truncated or resized under the job" in st["error"]["message"], st["error"]
        assert st["regions"]["hydrated"] < st["regions"]["total"]
    finally:
        d.kill()
