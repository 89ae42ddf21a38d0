"""clonectl end to end against a real hydrationd (issue 5).

Every test starts its own hydrationd on a temporary socket and state directory and stops it by PID
at the end. Binaries come from $HYDRATION_BIN_DIR (default <repo>/.build/debug); build them first
with `swift build`. Run: python3 -m pytest -q Tests/integration/test_clonectl.py
"""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hydtest import VarlinkError, call as varlink_call  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("HYDRATION_BIN_DIR", REPO / ".build" / "debug"))
CLONECTL = BIN / "clonectl"
HYDRATIOND = BIN / "hydrationd"

KiB = 1 << 10
MiB = 1 << 20

if not (CLONECTL.exists() and HYDRATIOND.exists()):
    pytest.skip(f"clonectl/hydrationd not built in {BIN} (run swift build)", allow_module_level=True)

# The JobStatus schema (version 1; docs/control-protocol.md, docs/clonectl.md): key -> nested keys.
JOB_STATUS_KEYS = {
    "version": None,
    "name": None,
    "state": None,
    "source": {"path", "size_bytes"},   # + "io", "io_reason" while the job has it open (OPTIONAL)
    "dest": {"path"},
    "region_size": None,
    "regions": {"total", "hydrated", "hydrating"},
    "bytes": {"total", "hydrated", "committed", "skipped_zero", "discarded"},
    "throughput_bytes_per_second": None,
    "eta_seconds": None,
    "commits": {"count", "last_unix_ms", "last_duration_ms"},
    "discard": {"enabled", "pending_bytes", "failed"},
    "space_budget_bytes": None,
    "settings": {"threshold", "batch_size", "rate_limit_bytes_per_second", "commit_interval_ms"},
    "metadata": {"path", "mode"},
    "error": None,
    "export": None,   # null, or {"uri", "clients"} for an exported job (test_export_wiring.py)
    "verify": {"enabled", "verified_bytes", "mismatches", "read_back"},  # Start verify (test_verify.py)
}
STATES = {"idle", "hydrating", "paused", "complete", "failed"}
# Keys a JobStatus object may also have: how the job reads and writes (Start io).
OPTIONAL = {"source": {"io", "io_reason"}, "dest": {"io", "io_reason"}}


def assert_job_status(obj):
    """Validates one JobStatus object against the schema: every key present, types right."""
    assert isinstance(obj, dict), obj
    assert set(obj) == set(JOB_STATUS_KEYS), set(obj) ^ set(JOB_STATUS_KEYS)
    for key, sub in JOB_STATUS_KEYS.items():
        if sub is not None:
            assert set(obj[key]) - OPTIONAL.get(key, set()) == sub, (key, obj[key])
    for side in ("source", "dest"):
        if "io" in obj[side]:
            assert obj[side]["io"] in ("direct", "buffered") and isinstance(obj[side]["io_reason"], str), obj[side]
    assert obj["version"] == 1
    assert obj["state"] in STATES
    assert isinstance(obj["name"], str)
    assert isinstance(obj["region_size"], int)
    for k in ("total", "hydrated", "committed", "skipped_zero", "discarded"):
        assert isinstance(obj["bytes"][k], int) and obj["bytes"][k] >= 0
    assert obj["bytes"]["committed"] <= obj["bytes"]["hydrated"] <= obj["bytes"]["total"]
    assert obj["regions"]["hydrated"] <= obj["regions"]["total"]
    assert isinstance(obj["throughput_bytes_per_second"], (int, float))
    assert obj["eta_seconds"] is None or isinstance(obj["eta_seconds"], (int, float))
    assert obj["metadata"]["mode"] in ("rw", "ro", "fail")
    assert obj["error"] is None or {"code", "message"} <= set(obj["error"])


def write_image(path, size, seed=1):
    """A file of `size` bytes with distinct non-zero content per MiB (so nothing is skipped as zero)."""
    block = bytes((i * 7 + seed) % 251 + 1 for i in range(4096))
    with open(path, "wb") as f:
        for i in range(size // 4096):
            f.write(i.to_bytes(8, "little") + block[8:])
    return str(path)


def blank(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


class Daemon:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.state = self.tmp / "state"
        self.socket = str(self.tmp / "control.sock")
        self.log = self.tmp / "hydrationd.log"
        self.proc = None

    def start(self):
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(HYDRATIOND), "--state-dir", str(self.state), "--socket", self.socket],
            stdout=logf, stderr=logf,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                r = self.run("list")
                if r.returncode == 0:
                    return self
            assert self.proc.poll() is None, f"hydrationd exited: {self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"hydrationd did not start: {self.log.read_text()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def env(self):
        env = dict(os.environ)
        env["HYDRATION_SOCKET"] = self.socket
        env.pop("COLUMNS", None)
        return env

    def run(self, *args, timeout=60, env=None):
        return subprocess.run(
            [str(CLONECTL), *args], capture_output=True, text=True, timeout=timeout, env=env or self.env()
        )

    def ok(self, *args, **kw):
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"clonectl {' '.join(args)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r

    def status(self, name):
        r = self.ok("status", name, "--json")
        obj = json.loads(r.stdout)
        assert_job_status(obj)
        return obj

    def wait_state(self, name, states, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(name)
            if s["state"] in states:
                return s
            time.sleep(0.1)
        raise AssertionError(f"job {name} never reached {states}: {s}")


# Small threshold and batch so a rate-limited job's progress moves steadily (with the defaults, 32
# regions are in flight at once and progress jumps in large steps).
STEADY = ["--threshold", "8", "--batch-size", "4"]


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def one_line_error(r):
    """The error is exactly one line on stderr, prefixed clonectl:."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("clonectl: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------
# job lifecycle


def test_start_pause_resume_set_commit_remove(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 32 * MiB)
    dst = blank(tmp_path / "dst.img", 32 * MiB)

    # 256 KiB/s, then 512 KiB/s: the job hydrates for over a minute, far longer than the steps below
    # take on a loaded machine, and is removed before it ends.
    r = daemon.ok("start", "vm1", "--source", src, "--dest", dst, "--region-size", "64K",
                  "--rate-limit", "256K", "--commit-interval", "200ms", "--threshold", "8", "--batch-size", "4")
    assert r.stdout.startswith("created job vm1: hydrating"), r.stdout
    s = daemon.status("vm1")
    assert s["state"] == "hydrating"
    assert s["region_size"] == 65536
    assert set(s["source"]) == {"path", "size_bytes", "io", "io_reason"}, s["source"]
    assert (s["source"]["path"], s["source"]["size_bytes"]) == (src, 32 * MiB), s["source"]
    # A file source is read direct (io=auto), where the filesystem can do direct I/O.
    assert s["source"]["io"] == ("direct" if direct_io_capable(tmp_path) else "buffered"), s["source"]
    assert s["source"]["io_reason"].startswith("io=auto: file source, 100.0 % allocated"), s["source"]
    assert s["settings"] == {"threshold": 8, "batch_size": 4, "rate_limit_bytes_per_second": 256 * KiB,
                             "commit_interval_ms": 200}

    # A hydrating job is not removed without --force.
    r = daemon.run("remove", "vm1")
    assert r.returncode == 65
    assert "pause it first" in one_line_error(r)

    r = daemon.ok("pause", "vm1")
    assert r.stdout.startswith("paused job vm1: paused")
    assert daemon.status("vm1")["state"] == "paused"
    human = daemon.ok("status", "vm1").stdout
    assert human.startswith("vm1: paused, ")
    assert re.search(r"\(\d+(\.\d)? [KMG]?i?B of 32 MiB\)", human), human

    r = daemon.ok("resume", "vm1")
    assert r.stdout.startswith("resumed job vm1: hydrating")

    r = daemon.ok("set", "vm1", "--rate-limit", "512KiB/s", "--threshold", "16", "--commit-interval", "1s")
    assert "rate limit 512 KiB/s" in r.stdout and "threshold 16" in r.stdout, r.stdout
    s = daemon.status("vm1")
    assert s["settings"]["rate_limit_bytes_per_second"] == 512 * KiB
    assert s["settings"]["threshold"] == 16
    assert s["settings"]["commit_interval_ms"] == 1000
    assert s["settings"]["batch_size"] == 4  # untouched

    time.sleep(0.5)
    before = daemon.status("vm1")["commits"]["count"]
    r = daemon.ok("commit", "vm1")
    assert r.stdout.startswith("committed job vm1: "), r.stdout
    after = daemon.status("vm1")
    assert after["commits"]["count"] > before
    assert after["bytes"]["committed"] > 0

    # `start NAME` alone resumes.
    daemon.ok("pause", "vm1")
    r = daemon.ok("start", "vm1")
    assert r.stdout.startswith("resumed job vm1: hydrating"), r.stdout

    r = daemon.ok("remove", "vm1", "--force")
    assert r.stdout.strip() == "removed job vm1"
    assert daemon.ok("list").stdout.strip() == "no jobs"
    assert json.loads(daemon.ok("list", "--json").stdout) == []


def test_wait_complete_and_list(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 8 * MiB)
    dst = blank(tmp_path / "dst.img", 8 * MiB)
    daemon.ok("start", "small", "--source", src, "--dest", dst, "--no-hydration")
    assert daemon.status("small")["state"] == "paused"

    r = daemon.ok("list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PROGRESS", "DISCARD", "SOURCE", "DEST"]
    assert lines[1].split()[:2] == ["small", "paused"]
    summary = json.loads(daemon.ok("list", "--json").stdout)
    assert summary == [{"name": "small", "state": "paused", "source_path": src, "dest_path": dst,
                        "regions_total": 128, "regions_hydrated": 0, "discard_enabled": False}]

    daemon.ok("resume", "small")
    r = daemon.ok("wait", "small", "--timeout", "60s")
    assert r.stdout.strip() == "job small complete: 8 MiB hydrated"
    s = daemon.status("small")
    assert s["state"] == "complete"
    assert s["bytes"]["hydrated"] == s["bytes"]["total"] == 8 * MiB
    assert Path(src).read_bytes() == Path(dst).read_bytes()
    # Waiting on a complete job returns at once.
    assert daemon.run("wait", "small", "-q").returncode == 0


def test_start_wait(daemon, tmp_path):
    """`start --wait`: one command that creates the job and returns when it ends, with wait's
    exit statuses; --json prints the status it ended with."""
    src = write_image(tmp_path / "src.img", 8 * MiB)
    dst = blank(tmp_path / "dst.img", 8 * MiB)
    r = daemon.ok("start", "sw", "--source", src, "--dest", dst, "--wait", timeout=120)
    assert r.stdout.splitlines()[0].startswith("created job sw: ")
    assert r.stdout.splitlines()[-1] == "job sw complete: 8 MiB hydrated"
    assert Path(src).read_bytes() == Path(dst).read_bytes()
    assert daemon.status("sw")["state"] == "complete"

    dst2 = blank(tmp_path / "dst2.img", 8 * MiB)
    r = daemon.ok("start", "swj", "--source", src, "--dest", dst2, "--wait", "--json", timeout=120)
    ended = json.loads(r.stdout)
    assert_job_status(ended)
    assert ended["state"] == "complete" and ended["bytes"]["hydrated"] == 8 * MiB

    # Created paused, it would wait for ever: a usage error, and no job.
    r = daemon.run("start", "swp", "--source", src, "--dest", blank(tmp_path / "dst3.img", 8 * MiB),
                   "--no-hydration", "--wait")
    assert r.returncode == 64, r
    assert "--wait with --no-hydration would wait for ever" in r.stderr, r.stderr
    assert daemon.run("status", "swp").returncode == 65

    # A job that fails while it is waited for: exit 1 with the reason. The source shrinks under a
    # rate-limited job (a read error, SourceReadFailed): at 64 KiB/s it is still in the first half when
    # the source is cut to half, however busy the machine; then the limit is lifted.
    src4 = write_image(tmp_path / "src4.img", 8 * MiB, seed=4)
    p = subprocess.Popen([str(CLONECTL), "start", "swf", "--source", src4, "--dest", blank(tmp_path / "dst4.img", 8 * MiB),
                          "--rate-limit", "64K", *STEADY, "--wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())
    try:
        deadline = time.monotonic() + 30
        while daemon.run("status", "swf").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.wait_state("swf", ["hydrating"])
        assert daemon.status("swf")["bytes"]["hydrated"] < 4 * MiB
        os.truncate(src4, 4 * MiB)
        daemon.ok("set", "swf", "--rate-limit", "0")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, (out, err)
    assert "job swf failed: SourceReadFailed" in err, err

    # Resuming a complete job with --wait returns at once.
    r = daemon.ok("start", "sw", "--wait")
    assert r.stdout.splitlines()[-1] == "job sw complete: 8 MiB hydrated"


def test_status_human_and_json(daemon, tmp_path):
    for name in ("a", "b"):
        daemon.ok("start", name, "--source", write_image(tmp_path / f"{name}.src", 4 * MiB),
                  "--dest", blank(tmp_path / f"{name}.dst", 4 * MiB), "--no-hydration",
                  "--discard-source", "--space-budget", "1M")
    one = json.loads(daemon.ok("status", "a", "--json").stdout)
    assert_job_status(one)
    assert one["name"] == "a" and one["discard"]["enabled"] is True
    assert one["space_budget_bytes"] == MiB
    every = json.loads(daemon.ok("status", "--json").stdout)
    assert isinstance(every, list) and [j["name"] for j in every] == ["a", "b"]
    for j in every:
        assert_job_status(j)

    human = daemon.ok("status", "a").stdout
    assert human.startswith("a: paused, 0.0% (0 B of 4 MiB)"), human
    for label in ("source", "dest", "regions", "committed", "discard", "settings", "metadata"):
        assert re.search(rf"^  {label}\s", human, re.M), (label, human)
    assert "(4 MiB)" in human and "64 KiB each" in human
    # A file source released as it is copied is read buffered (its write lease), the dest direct.
    assert re.search(r"^  i/o\s+(source )?(direct|buffered) \(io=auto: file source, 100\.0 % allocated", human, re.M), human
    table = daemon.ok("status").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "PROGRESS", "SIZE", "RATE", "ETA", "DISCARDED"]
    assert [l.split()[0] for l in table[1:]] == ["a", "b"]

    # The rate and ETA while hydrating.
    daemon.ok("start", "c", "--source", write_image(tmp_path / "c.src", 16 * MiB),
              "--dest", blank(tmp_path / "c.dst", 16 * MiB), "--rate-limit", "512K", *STEADY)
    time.sleep(2)
    human = daemon.ok("status", "c").stdout
    assert re.search(r"throughput  \d+(\.\d)? (KiB|MiB)/s, ETA (\d+s|<1s|\dm\d\ds)", human), human


def direct_io_capable(path):
    """ext4, XFS and btrfs do direct I/O; tmpfs (a CI machine's /tmp, perhaps) does not."""
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return r.stdout.strip() in ("ext2/ext3", "xfs", "btrfs")


def test_io_mode(daemon, tmp_path):
    """Start's io (issue 13): auto reads a file source direct, sparse or dense (round 5),
    --io overrides it and survives a restart, a bad value is refused by clonectl (64) and by the
    daemon (InvalidParameter io) with nothing created; every copy is exact."""
    capable = direct_io_capable(tmp_path)
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(20 * MiB)
        f.write(os.urandom(2 * MiB))
    dense = write_image(tmp_path / "dense.img", 8 * MiB, seed=5)
    cases = [("sp", str(sparse), [], "io=auto: file source, 3.1 % allocated"),
             ("de", dense, [], "io=auto: file source, 100.0 % allocated"),
             ("dd", dense, ["--io", "direct"], "io=direct"),
             ("sb", str(sparse), ["--io", "buffered"], "io=buffered")]
    for name, src, opts, why in cases:
        dst = str(tmp_path / f"{name}.dst")
        # Paused first: status shows io while the job has its devices open.
        daemon.ok("start", name, "--source", src, "--dest", dst, "--no-hydration", *opts)
        st = json.loads(daemon.ok("status", name, "--json").stdout)
        assert_job_status(st)
        want_direct = why.startswith("io=direct") or "file source" in why
        for side in ("source", "dest"):
            assert st[side]["io_reason"].startswith(why), (name, st[side])
            assert st[side]["io"] == ("direct" if want_direct and capable else "buffered"), (name, st[side])
        if name == "dd":
            human = daemon.ok("status", "dd").stdout
            assert re.search(r"^  i/o\s+(direct|buffered) \(io=direct", human, re.M), human
            continue
        daemon.ok("resume", name)
        daemon.ok("wait", name)
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert a.read() == b.read(), name

    # The job's setting is persisted: a restarted daemon opens "dd" direct again, and copies it.
    daemon.stop()
    daemon.start()
    st = json.loads(daemon.ok("status", "dd", "--json").stdout)
    assert st["source"]["io_reason"].startswith("io=direct"), st["source"]
    daemon.ok("resume", "dd")
    daemon.ok("wait", "dd")
    with open(dense, "rb") as a, open(tmp_path / "dd.dst", "rb") as b:
        assert a.read() == b.read()

    r = daemon.run("start", "bad", "--source", dense, "--dest", str(tmp_path / "bad.dst"), "--io", "fast")
    assert r.returncode == 64 and "--io must be auto, buffered or direct" in r.stderr, r.stderr
    with pytest.raises(VarlinkError) as e:
        varlink_call(daemon.socket, "Start", {"name": "bad", "source": dense, "dest": str(tmp_path / "bad.dst"), "io": "fast"})
    assert e.value.name == "org.hydrationd.Control.InvalidParameter", e.value
    assert e.value.parameters["parameter"] == "io" and "auto, buffered, direct" in e.value.parameters["reason"], e.value
    assert [j["name"] for j in json.loads(daemon.ok("list", "--json").stdout)] == ["dd", "de", "sb", "sp"]
    assert not (tmp_path / "bad.dst").exists()


# ------------------------------------------------------------------------------------------------
# --watch


# A watch line's measured rate and ETA (the first lines say "0 B/s  ETA unknown").
RATE_AND_ETA = re.compile(r"\d+(\.\d)? (KiB|MiB)/s  ETA \d")


def read_lines_until(proc, enough, timeout=60):
    """Lines of proc's stdout until enough(lines) holds; a liveness guard, not a timing claim."""
    lines, buf = [], b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while not enough(lines):
        assert time.monotonic() < deadline, f"waited {timeout} s for more watch lines; saw {lines!r}"
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"the watch ended early: {lines!r}"
        buf += chunk
        *done, buf = buf.split(b"\n")
        lines += [l.decode() for l in done]
    return lines, buf


def test_watch_plain_lines(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 16 * MiB)
    dst = blank(tmp_path / "dst.img", 16 * MiB)
    # Held at 128 KiB/s until the watch has shown two lines with a rate and an ETA, then let go:
    # the lines below are there however busy the machine is.
    daemon.ok("start", "w", "--source", src, "--dest", dst, "--rate-limit", "128K", *STEADY)
    p = subprocess.Popen([str(CLONECTL), "status", "w", "--watch"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=daemon.env())
    try:
        lines, rest = read_lines_until(p, lambda ls: sum(bool(RATE_AND_ETA.search(l)) for l in ls) >= 2)
        daemon.ok("set", "w", "--rate-limit", "0")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    lines += (rest + out).decode().splitlines()
    r = subprocess.CompletedProcess(p.args, 0, "\n".join(lines) + "\n", err)
    assert len(lines) >= 3, r.stdout
    assert "\r" not in r.stdout and "\x1b" not in r.stdout
    for line in lines:
        assert re.match(r"^w  (hydrating|complete)  \d+\.\d% \(.* of 16 MiB\)", line), line
    assert any(re.search(r"  \d+(\.\d)? (KiB|MiB)/s  ETA ", l) for l in lines), r.stdout
    assert lines[-1] == "w  complete  100.0% (16 MiB of 16 MiB)"

    # --watch --json: one JobStatus per line.
    r = daemon.ok("status", "w", "--watch", "--json")
    docs = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(docs) == 1 and docs[0]["state"] == "complete"
    assert_job_status(docs[0])


def run_on_pty(args, env, timeout=60, interrupt_after=None, on_output=None):
    """Runs clonectl with stdout/stderr on a pseudo-terminal; returns (exit status, output bytes).
    on_output(output so far) is called after each read."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(CLONECTL), *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    out = b""
    start = time.monotonic()
    interrupted = False
    while True:
        if interrupt_after is not None and not interrupted and time.monotonic() - start > interrupt_after:
            os.kill(proc.pid, signal.SIGINT)
            interrupted = True
        assert time.monotonic() - start < timeout, out
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if on_output:
                on_output(out)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), out


def test_watch_progress_bar_on_pty(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 16 * MiB)
    dst = blank(tmp_path / "dst.img", 16 * MiB)
    # Held at 128 KiB/s until two frames with a rate and an ETA are drawn, then let go.
    daemon.ok("start", "tty", "--source", src, "--dest", dst, "--rate-limit", "128K", *STEADY)
    lifted = []

    def lift_when_drawn(out):
        if not lifted and len(re.findall(RATE_AND_ETA.pattern.encode(), out)) >= 2:
            daemon.ok("set", "tty", "--rate-limit", "0")
            lifted.append(True)

    rc, out = run_on_pty(["status", "tty", "--watch"], daemon.env(), on_output=lift_when_drawn)
    assert lifted, out
    assert rc == 0, out
    text = out.decode()
    frames = [f for f in text.split("\r\x1b[2K") if f.strip()]
    assert len(frames) >= 3, repr(text)
    bar = re.compile(r"^tty \[[#.]{10,50}\]  \d+\.\d%")
    for f in frames:
        assert bar.match(f), repr(f)
    assert any(re.search(r"(KiB|MiB)/s  ETA ", f) for f in frames), repr(text)
    assert re.search(r"tty \[#+\]  100\.0%  complete", frames[-1]), repr(frames[-1])
    # The bar is redrawn in place: one line, ended by a newline only at the end.
    assert text.rstrip("\r\n").count("\n") == 0, repr(text)
    (tmp_path / "watch-pty.txt").write_bytes(out)


def test_watch_ctrl_c_on_pty(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 16 * MiB)
    dst = blank(tmp_path / "dst.img", 16 * MiB)
    daemon.ok("start", "slow", "--source", src, "--dest", dst, "--rate-limit", "256K", *STEADY)
    rc, out = run_on_pty(["status", "slow", "--watch"], daemon.env(), interrupt_after=1.5)
    assert rc == 130, (rc, out)
    assert b"slow [" in out and out.endswith(b"\n") or out.endswith(b"\r\n"), out
    # The job keeps running: the watch only follows it.
    assert daemon.status("slow")["state"] == "hydrating"


def test_watch_script_pty(daemon, tmp_path):
    """The same through script(1), as an operator would capture it."""
    import shutil
    if not shutil.which("script"):
        pytest.skip("script(1) not installed")
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    daemon.ok("start", "s", "--source", src, "--dest", dst, "--rate-limit", "4M", *STEADY)
    typescript = tmp_path / "typescript"
    r = subprocess.run(["script", "-q", "-e", "-c", f"{CLONECTL} status s --watch", str(typescript)],
                       capture_output=True, timeout=60, env=daemon.env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r
    assert b"\r\x1b[2Ks [" in r.stdout, r.stdout
    assert b"100.0%  complete" in r.stdout


# ------------------------------------------------------------------------------------------------
# offline check and dump


def test_check_and_dump_offline(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    meta = str(tmp_path / "job.meta")
    daemon.ok("start", "m", "--source", src, "--dest", dst, "--metadata", meta, "--region-size", "256K")
    daemon.ok("wait", "m")
    daemon.stop()

    env = dict(os.environ, HYDRATION_SOCKET=str(tmp_path / "no-daemon.sock"))
    r = daemon.run("check", meta, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{meta}: OK, format version 2, generation ")
    assert "16 of 16 regions hydrated (100.0%), complete" in r.stdout
    report = json.loads(daemon.run("check", meta, "--json", env=env).stdout)
    assert report["valid"] is True and report["regions_total"] == 16 and report["problems"] == []
    assert report["source_path"] == src and report["dest_path"] == dst

    r = daemon.run("dump", meta, env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^region size\s+256 KiB$", r.stdout, re.M), r.stdout
    assert re.search(r"^flags\s+complete$", r.stdout, re.M), r.stdout
    assert r.stdout.rstrip().endswith("hydrated regions (1 range):\n  0-15")
    d = json.loads(daemon.run("dump", meta, "--json", env=env).stdout)
    assert d["dump_version"] == 1 and d["format_version"] == 2
    assert "stable_id" in d["source"] and "pending_release_ranges" in d
    assert d["hydrated_ranges"] == [{"start": 0, "count": 16}]
    assert d["source"]["path"] == src and d["source"]["kind"] == "file" and d["source"]["size_bytes"] == 4 * MiB
    assert d["complete"] is True and d["regions_hydrated"] == 16

    # Damaged: both superblocks overwritten.
    bad = tmp_path / "bad.meta"
    data = bytearray(Path(meta).read_bytes())
    data[0:8] = b"XXXXXXXX"
    data[4096:4104] = b"XXXXXXXX"
    bad.write_bytes(bytes(data))
    r = daemon.run("check", str(bad), env=env)
    assert r.returncode == 1
    assert "INVALID" in r.stdout and "no valid superblock" in one_line_error(r)
    assert json.loads(daemon.run("check", str(bad), "--json", env=env).stdout)["valid"] is False
    r = daemon.run("dump", str(bad), env=env)
    assert r.returncode == 1 and "nothing to dump" in one_line_error(r)

    r = daemon.run("check", str(tmp_path / "missing.meta"), env=env)
    assert r.returncode == 66 and "ENOENT" in one_line_error(r)


# ------------------------------------------------------------------------------------------------
# exit codes


@pytest.mark.parametrize("args, needle", [
    (["start", "x", "--source", "/a", "--dest", "/b", "--region-size", "12X"], "invalid size '12X'"),
    (["start", "x", "--source", "/a", "--dest", "/b", "--region-size", "3000"], "power of two"),
    (["start", "x", "--source", "/a", "--dest", "/b", "--region-size", "128M"], "--region-size must be a power of two from 4K to 64M"),
    (["start", "x", "--source", "/a", "--dest", "/b", "--commit-interval", "5"], "invalid duration '5'"),
    (["start", "x", "--source", "/a", "--dest", "/b", "--rate-limit", "fast"], "invalid rate 'fast'"),
    (["start", "x", "--source", "/a"], "needs both --source and --dest"),
    (["set", "x"], "nothing to set"),
    (["set", "x", "--batch-size", "0"], "--batch-size must be a positive"),
    (["wait", "x", "--timeout", "soon"], "invalid duration 'soon'"),
    # Options that only apply with another one are refused, not dropped (issue 14).
    (["start", "x", "--source", "/a", "--dest", "/b", "--space-budget", "8M"],
     "--space-budget applies only with --discard-source"),
    (["start", "x", "--threshold", "8"], "--threshold applies only when creating a job"),
    (["start", "x", "--dest", "/b"], "needs both --source and --dest (missing --source)"),
    (["wait", "x", "--timeout", "0"], "--timeout must be longer than 0"),
    (["--socket", "/tmp/x.sock", "check", "/tmp/x.meta"], "--socket does not apply to 'check'"),
    (["--socket", "/tmp/x.sock", "dump", "/tmp/x.meta"], "--socket does not apply to 'dump'"),
    (["frobnicate"], "Unexpected argument"),
    (["start", "x", "--source", "/a", "--dest", "/b", "--io", "fast"], "--io must be auto, buffered or direct (got 'fast')"),
    (["start", "x", "--io", "direct"], "--io applies only when creating a job"),
    (["pause"], "Missing expected argument"),
])
def test_exit_64_usage(daemon, args, needle):
    r = daemon.run(*args)
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "accepted" in r.stderr or "expected" in r.stderr or "needs" in r.stderr or "must" in r.stderr \
        or "nothing" in r.stderr or "Usage" in r.stderr


def test_options_that_only_apply_with_others(daemon, tmp_path):
    """--space-budget takes effect with --discard-source and is refused without it, at start (64,
    before anything is sent) and at set (65, the daemon knows the job does not discard)."""
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    r = daemon.run("start", "plain", "--source", src, "--dest", dst, "--space-budget", "8M", "--no-hydration")
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert "--space-budget applies only with --discard-source" in r.stderr, r.stderr
    assert json.loads(daemon.ok("list", "--json").stdout) == [], "nothing was created"

    daemon.ok("start", "plain", "--source", src, "--dest", dst, "--no-hydration")
    assert daemon.status("plain")["space_budget_bytes"] is None
    r = daemon.run("set", "plain", "--space-budget", "8M")
    assert r.returncode == 65, (r.returncode, r.stderr)
    line = one_line_error(r)
    assert "space_budget_bytes" in line and "--discard-source" in line, line
    assert daemon.status("plain")["space_budget_bytes"] is None
    daemon.ok("set", "plain", "--rate-limit", "1M")  # the job is still there and settable

    # Tunables given to 'start NAME' (which resumes) are refused, and the job is not resumed.
    r = daemon.run("start", "plain", "--rate-limit", "2M")
    assert r.returncode == 64 and "--rate-limit applies only when creating a job" in r.stderr, r.stderr
    assert "clonectl set plain --rate-limit" in r.stderr, r.stderr
    assert daemon.status("plain")["state"] == "paused"

    # With --discard-source the budget takes effect, and set changes it.
    src2 = write_image(tmp_path / "src2.img", 4 * MiB)
    dst2 = blank(tmp_path / "dst2.img", 4 * MiB)
    daemon.ok("start", "disc", "--source", src2, "--dest", dst2, "--discard-source", "--space-budget", "8M",
              "--no-hydration")
    assert daemon.status("disc")["space_budget_bytes"] == 8 * MiB
    daemon.ok("set", "disc", "--space-budget", "16M")
    assert daemon.status("disc")["space_budget_bytes"] == 16 * MiB


def test_exit_69_daemon_unreachable(tmp_path):
    sock = str(tmp_path / "nobody.sock")
    env = dict(os.environ, HYDRATION_SOCKET=sock)
    for args in (["list"], ["status", "x"], ["start", "x"], ["wait", "x"]):
        r = subprocess.run([str(CLONECTL), *args], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 69, r
        line = one_line_error(r)
        assert sock in line and "hydrationd --socket" in line, line
    # --socket before or after the command wins over the environment.
    r = subprocess.run([str(CLONECTL), "--socket", "/nonexistent/x.sock", "list"], capture_output=True, text=True,
                       env=dict(os.environ), timeout=30)
    assert r.returncode == 69 and "/nonexistent/x.sock" in r.stderr
    r = subprocess.run([str(CLONECTL), "list", "--socket", "/nonexistent/y.sock"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 69 and "/nonexistent/y.sock" in r.stderr


def test_exit_65_rejected(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    small = blank(tmp_path / "small.img", 1 * MiB)
    for args, needle in [
        (["pause", "ghost"], "no job named 'ghost'"),
        (["status", "ghost"], "no job named 'ghost'"),
        (["remove", "ghost"], "no job named 'ghost'"),
        (["start", "ghost"], "no job named 'ghost'"),
        (["start", "bad/name", "--source", src, "--dest", dst], "invalid parameter"),
        (["start", "tiny", "--source", src, "--dest", small], "destination"),
        (["start", "same", "--source", src, "--dest", src], "invalid parameter"),
        (["start", "gone", "--source", str(tmp_path / "missing"), "--dest", dst], "invalid parameter"),
    ]:
        r = daemon.run(*args)
        assert r.returncode == 65, (args, r.returncode, r.stderr)
        assert needle in one_line_error(r), (args, r.stderr)
    daemon.ok("start", "one", "--source", src, "--dest", dst, "--no-hydration")
    r = daemon.run("start", "one", "--source", src, "--dest", dst)
    assert r.returncode == 65 and "already exists" in one_line_error(r)
    other = blank(tmp_path / "other.img", 4 * MiB)
    r = daemon.run("start", "two", "--source", other, "--dest", dst)
    assert r.returncode == 65, r.stderr
    one_line_error(r)


def test_exit_1_failed_job_and_124_timeout(daemon, tmp_path):
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    daemon.ok("start", "doomed", "--source", src, "--dest", dst, "--no-hydration")

    # wait on a paused job times out: 124.
    r = daemon.run("wait", "doomed", "--timeout", "700ms")
    assert r.returncode == 124, r
    assert "is paused" in r.stderr and "timed out after 700ms" in r.stderr

    # Corrupt the metadata while the daemon is down: it restores the job as failed.
    daemon.stop()
    meta = daemon.state / "jobs" / "doomed.meta"
    data = bytearray(meta.read_bytes())
    data[0:8] = b"XXXXXXXX"
    data[4096:4104] = b"XXXXXXXX"
    meta.write_bytes(bytes(data))
    daemon.start()
    assert daemon.status("doomed")["state"] == "failed"

    r = daemon.run("wait", "doomed")
    assert r.returncode == 1, r
    line = one_line_error(r)
    assert line.startswith("clonectl: job doomed failed: ") and "no valid superblock" in line
    r = daemon.run("status", "doomed", "--watch")
    assert r.returncode == 1
    assert r.stdout.startswith("doomed  failed")
    assert "progress unknown" in daemon.ok("status", "doomed").stdout
    # A failed job is removable.
    daemon.ok("remove", "doomed")


def test_remove_of_a_partly_released_job_keeps_its_record(daemon, tmp_path):
    """Issue 11 part 4: the destination of a partly released discard_source job holds the only
    copy of those regions; removing the job must not delete the only record of which they are."""
    src = write_image(tmp_path / "src.img", 24 * MiB)
    want = Path(src).read_bytes()
    dst = str(tmp_path / "dst.img")
    daemon.ok("start", "vm", "--source", src, "--dest", dst, "--discard-source",
              "--rate-limit", "1M", "--commit-interval", "100ms")
    deadline = time.time() + 20
    while daemon.status("vm")["bytes"]["discarded"] < 2 * MiB:
        assert time.time() < deadline, daemon.status("vm")
        time.sleep(0.05)
    daemon.ok("pause", "vm")

    r = daemon.run("remove", "vm")
    assert r.returncode == 65, r
    line = one_line_error(r)
    assert "only copy" in line and "--force" in line, line
    assert daemon.status("vm")["state"] == "paused"

    r = daemon.ok("remove", "vm", "--force")
    m = re.search(r"its metadata was kept at (\S+):", r.stdout)
    assert m, r.stdout
    kept = m.group(1)
    assert Path(kept).exists()
    assert len(list((daemon.state / "kept").glob("vm-*.json"))) == 1

    # A new job on that destination is refused, pointing at the kept record.
    r = daemon.run("start", "vm", "--source", src, "--dest", dst, "--discard-source")
    assert r.returncode == 65, r
    assert kept in one_line_error(r)

    # Naming the kept metadata resumes the job; it completes with the destination whole.
    daemon.ok("start", "vm", "--source", src, "--dest", dst, "--metadata", kept)
    r = daemon.run("wait", "vm", "--timeout", "60s")
    assert r.returncode == 0, r
    assert Path(dst).read_bytes() == want
    assert os.stat(src).st_blocks == 0


# ------------------------------------------------------------------------------------------------
# Error fields: set where the error is thrown, sent as they are, printed with them.

def test_metadata_exists_is_its_own_error_naming_the_file(daemon, tmp_path):
    """A create whose metadata file is already there: MetadataExists with the file's path (it was
    MetadataCorrupt with an empty path, printed "metadata  is corrupt: …")."""
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    meta = tmp_path / "taken.meta"
    meta.write_bytes(b"not ours" * 512)
    with pytest.raises(VarlinkError) as e:
        varlink_call(daemon.socket, "Start", {"name": "ex", "source": src, "dest": dst, "metadata": str(meta)})
    assert e.value.name == "org.hydrationd.Control.MetadataExists", e.value
    assert e.value.parameters["path"] == str(meta), e.value
    r = daemon.run("start", "ex", "--source", src, "--dest", dst, "--metadata", str(meta))
    line = one_line_error(r)
    assert r.returncode == 65, r.stderr
    assert f"metadata {meta} already exists" in line and "corrupt" not in line, line
    assert meta.read_bytes() == b"not ours" * 512


def test_metadata_mismatch_names_the_metadata_file(daemon, tmp_path):
    """A paused job whose destination shrank: MetadataCorrupt naming the job's metadata file (the
    path was empty on the wire, and clonectl printed "metadata  is corrupt")."""
    src = write_image(tmp_path / "src.img", 4 * MiB)
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    meta = str(tmp_path / "mm.meta")
    daemon.ok("start", "mm", "--source", src, "--dest", dst, "--metadata", meta, "--no-hydration")
    os.truncate(dst, 1 * MiB)
    with pytest.raises(VarlinkError) as e:
        varlink_call(daemon.socket, "Resume", {"name": "mm"})
    assert e.value.name == "org.hydrationd.Control.MetadataCorrupt", e.value
    assert e.value.parameters["path"] == meta, e.value
    r = daemon.run("resume", "mm")
    line = one_line_error(r)
    assert f"metadata {meta} is corrupt" in line and "metadata  is" not in line, line


def test_io_error_names_the_unreachable_source(daemon, tmp_path):
    """A remote source that does not answer at create: IOError with the source's URI as its path
    (it was null)."""
    src = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    dst = blank(tmp_path / "dst.img", 4 * MiB)
    with pytest.raises(VarlinkError) as e:
        varlink_call(daemon.socket, "Start", {"name": "io", "source": src, "dest": dst})
    assert e.value.name == "org.hydrationd.Control.IOError", e.value
    assert e.value.parameters["path"] == src, e.value
    r = daemon.run("start", "io", "--source", src, "--dest", dst)
    assert f"I/O error on {src}" in one_line_error(r), r.stderr
