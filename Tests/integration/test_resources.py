"""Per-job resources, the descriptor limit and signals of a real hydrationd.

- A paused job (closed, "parked") and a complete one hold no descriptors; the daemon's count does
  not grow with such jobs.
- The soft RLIMIT_NOFILE is raised to the hard limit at start.
- A restart with more open jobs than descriptors still serves the control socket.
- SIGHUP is ignored (logged): the daemon keeps serving, and SIGTERM still stops it cleanly.

Run: python3 -m pytest -q Tests/integration/test_resources.py
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hydtest import HYDRATIOND, Daemon, VarlinkError  # noqa: E402

MiB = 1 << 20

if not os.path.exists(HYDRATIOND):
    pytest.skip(f"hydrationd not built ({HYDRATIOND})", allow_module_level=True)


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def soft_nofile(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def make_jobs(d, tmp, n, prefix, **params):
    imgs = Path(tmp) / f"{prefix}-img"
    imgs.mkdir()
    for i in range(n):
        src = imgs / f"s{i}"
        with open(src, "wb") as f:
            f.write(os.urandom(MiB))
        p = {"name": f"{prefix}{i}", "source": str(src), "dest": str(imgs / f"d{i}"), "region_size": 64 * 1024}
        p.update(params)
        d.call("Start", p)


def wait_until(what, predicate, timeout=120.0):
    deadline = time.time() + timeout
    seen = None
    while time.time() < deadline:
        ok, seen = predicate()
        if ok:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"still waiting after {timeout}s for {what}; saw {seen}")


@pytest.fixture
def tmp(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_paused_and_complete_jobs_hold_no_descriptors(tmp):
    d = Daemon(tmp).start()
    try:
        pid = d.proc.pid
        base_fds, base_threads = fds(pid), threads(pid)
        n = 40
        # Held paused (never hydrating): created with no_hydration, then paused.
        make_jobs(d, tmp, n, "p", no_hydration=True)
        for i in range(n):
            d.call("Pause", {"name": f"p{i}"})
        assert all(j["state"] == "paused" for j in d.call("List")["jobs"])
        paused_fds = fds(pid)
        # Six each before (source, its O_DIRECT twin, destination, its two twins, metadata).
        assert paused_fds - base_fds < n // 4, f"{n} paused jobs: {base_fds} -> {paused_fds} descriptors"

        # Complete ones.
        make_jobs(d, tmp, n, "c")
        wait_until(f"{n} jobs complete", lambda: (
            all(j["state"] == "complete" for j in d.call("List")["jobs"] if j["name"].startswith("c")),
            [j["state"] for j in d.call("List")["jobs"]]))
        # The jobs let go of their devices once their last commit is done (settled): poll.
        complete_fds = wait_until("descriptors of complete jobs closed", lambda: (
            fds(pid) - paused_fds < n // 4, fds(pid)))
        assert threads(pid) - base_threads < 8, f"threads {base_threads} -> {threads(pid)}"

        # A paused job resumes (its devices confirmed again) and completes.
        d.call("Resume", {"name": "p0"})
        d.wait_state("p0", {"complete"}, timeout=120)
        src, dst = tmp / "p-img" / "s0", tmp / "p-img" / "d0"
        assert src.read_bytes() == dst.read_bytes()
        print(f"descriptors: base {base_fds}, {n} paused {paused_fds}, +{n} complete {complete_fds}")
    finally:
        d.stop()


def test_paused_job_reopen_confirms_devices(tmp):
    """A parked job's source replaced by another file is not silently adopted at resume."""
    d = Daemon(tmp).start()
    try:
        make_jobs(d, tmp, 1, "r", no_hydration=True)
        d.call("Pause", {"name": "r0"})
        src = tmp / "r-img" / "s0"
        os.rename(src, str(src) + ".old")
        with open(src, "wb") as f:
            f.write(os.urandom(MiB))
        with pytest.raises(VarlinkError) as e:
            d.call("Resume", {"name": "r0"})
        assert e.value.name.endswith("DeviceUnconfirmed"), e.value
    finally:
        d.stop()


def test_soft_limit_raised_to_hard(tmp):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    d = Daemon(tmp)
    log = open(d.log_path, "ab")
    proc = subprocess.Popen(["prlimit", f"--nofile=1024:{hard}", HYDRATIOND, "--state-dir", d.state, "--socket", d.sock,
                             "--nbd-socket", d.nbd_sock], stdout=log, stderr=log, env=d.env)
    d.proc = proc
    try:
        wait_until("the daemon to listen", lambda: (os.path.exists(d.sock) and proc.poll() is None, proc.poll()), timeout=60)
        assert soft_nofile(proc.pid) == hard
    finally:
        d.stop()


def test_restart_with_too_few_descriptors_still_serves(tmp):
    """More open (hydrating) jobs than descriptors: the daemon comes up, lists them all and can be
    stopped cleanly; those it could not open are reported as failed."""
    d = Daemon(tmp).start()
    n = 60
    try:
        # Hydrating, held by a rate limit: each is open, with its descriptors.
        make_jobs(d, tmp, n, "h", rate_limit_bytes_per_second=4096, batch_size=1)
    finally:
        assert d.stop() == 0
    log = open(d.log_path, "ab")
    proc = subprocess.Popen(["prlimit", "--nofile=200:200", HYDRATIOND, "--state-dir", d.state, "--socket", d.sock,
                             "--nbd-socket", d.nbd_sock], stdout=log, stderr=log, env=d.env)
    d.proc = proc
    try:
        def listed():
            if proc.poll() is not None:
                raise AssertionError(f"hydrationd exited with {proc.returncode}: {d.log()}")
            try:
                return True, d.call("List", timeout=10)["jobs"]
            except (OSError, EOFError, VarlinkError) as e:
                return False, repr(e)
        jobs = wait_until("the control socket under a limit of 200 descriptors", listed, timeout=120)
        assert len(jobs) == n
        states = [j["state"] for j in jobs]
        assert "hydrating" in states, states
    finally:
        assert d.stop() == 0, d.log()
    assert not os.path.exists(d.sock), "socket file removed"


def test_sighup_is_ignored(tmp):
    d = Daemon(tmp).start()
    try:
        make_jobs(d, tmp, 1, "s", rate_limit_bytes_per_second=4096, batch_size=1)
        d.proc.send_signal(signal.SIGHUP)
        wait_until("the SIGHUP to be logged", lambda: ("SIGHUP ignored" in d.log(), d.log()[-500:]), timeout=60)
        assert d.proc.poll() is None, "SIGHUP killed the daemon"
        assert d.status("s0")["state"] == "hydrating"
    finally:
        rc = d.stop()
    assert rc == 0
    assert not os.path.exists(d.sock)


# --- a late opener of a file source released as it is copied ---------------------------------

def _released_job(d, tmp, name):
    src, dst = Path(tmp) / f"{name}.src", Path(tmp) / f"{name}.dst"
    data = os.urandom(4 * MiB)
    src.write_bytes(data)
    d.call("Start", {"name": name, "source": str(src), "dest": str(dst), "discard_source": True,
                     "region_size": 64 * 1024, "batch_size": 1, "rate_limit_bytes_per_second": 64 * 1024})
    wait_until("some regions released", lambda: (
        d.status(name)["bytes"]["discarded"] >= 128 * 1024, d.status(name)["bytes"]))
    return src, dst, data


def _wait_in_use(d, name, naming=()):
    """Paused with DeviceInUse, and the opener named (the first message, set at the pause, says
    "another process" until the daemon has found who it is: on a loaded machine that is later)."""
    def paused():
        s = d.status(name)
        e = s.get("error") or {}
        named = "by another process while" not in e.get("message", "")
        if naming:
            named = named and any(n in e.get("message", "") for n in naming)
        return (s["state"] == "paused" and e.get("code") == "DeviceInUse" and named), s
    return wait_until(f"job {name} paused with DeviceInUse, its opener named", paused, timeout=60)


def test_late_opener_pauses_the_job(tmp):
    d = Daemon(tmp).start()
    opener = None
    try:
        src, dst, data = _released_job(d, tmp, "late")
        # A reader that opens the source mid-job and keeps it open (its open blocks until the
        # daemon gives its lease up).
        opener = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); print('opened', flush=True); sys.stdin.read()", str(src)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert opener.stdout.readline().strip() == "opened"
        s = _wait_in_use(d, "late", naming=[f"pid {opener.pid}"])
        assert f"pid {opener.pid}" in s["error"]["message"], s["error"]
        # Nothing is released any more: the source's allocation stays.
        before = os.stat(src).st_blocks
        discarded = s["bytes"]["discarded"]
        # A resume while it still has the source open is refused.
        with pytest.raises(VarlinkError) as e:
            d.call("Resume", {"name": "late"})
        assert e.value.name.endswith("DeviceInUse"), e.value
        assert os.stat(src).st_blocks == before
        assert d.status("late")["bytes"]["discarded"] == discarded
        opener.stdin.close()
        opener.wait(timeout=60)
        opener = None
        # Once it is gone: resumed by the operator, and finished.
        d.call("Set", {"name": "late", "rate_limit_bytes_per_second": 1 << 30})
        d.call("Resume", {"name": "late"})
        d.wait_state("late", {"complete"}, timeout=120)
        assert dst.read_bytes() == data
    finally:
        if opener:
            opener.kill()
            opener.wait()
        d.stop()


def test_late_dd_and_loop_device(tmp):
    """A real `dd` opening the source mid-job, then a loop device attached mid-job."""
    if shutil.which("losetup") is None or os.geteuid() != 0:
        pytest.skip("needs root and losetup")
    d = Daemon(tmp).start()
    loop = None
    try:
        src, dst, data = _released_job(d, tmp, "dd")
        out = subprocess.run(["dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none"], timeout=120)
        assert out.returncode == 0
        s = _wait_in_use(d, "dd")
        assert "dd" in s["error"]["message"] or "gone again" in s["error"]["message"], s["error"]
        d.call("Resume", {"name": "dd"})
        assert d.status("dd")["state"] == "hydrating"
        loop = subprocess.run(["losetup", "-f", "--show", "-r", str(src)], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        s = _wait_in_use(d, "dd", naming=[loop])
        assert loop in s["error"]["message"], s["error"]
        with pytest.raises(VarlinkError):
            d.call("Resume", {"name": "dd"})
        subprocess.run(["losetup", "-d", loop], timeout=120, check=True)
        loop = None
        # The kernel lets go of a detached loop's file asynchronously: retry the resume.
        def resumed():
            try:
                d.call("Resume", {"name": "dd"})
                return True, None
            except VarlinkError as e:
                return False, str(e)
        wait_until("a resume after the loop device is gone", resumed, timeout=60)
        d.call("Set", {"name": "dd", "rate_limit_bytes_per_second": 1 << 30})
        d.wait_state("dd", {"complete"}, timeout=120)
        assert dst.read_bytes() == data
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], timeout=120)
        d.stop()
