"""A job whose source is an NBD export served by nbdkit (issue 15), loopback only: 127.0.0.1 and
Unix sockets. Every nbdkit and hydrationd started here is stopped by PID."""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hydtest import (CLONECTL, HYDRATIOND, Daemon, VarlinkError, allocated, make_image,  # noqa: E402
                     sha256_of)

pytestmark = [
    pytest.mark.skipif(not os.path.exists(HYDRATIOND), reason=f"{HYDRATIOND} not built"),
    pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed (Scripts/install-deps.sh --test)"),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class NBDKit:
    """nbdkit in the foreground (-f), serving `args`; stopped by PID."""

    def __init__(self, tmp, args, port=None, unix=None, extra=(), name="nbdkit"):
        self.tmp = str(tmp)
        self.args = list(args)
        self.port = port
        self.unix = unix
        self.extra = list(extra)
        self.log_path = os.path.join(self.tmp, f"{name}.log")
        self.proc = None

    @property
    def uri(self):
        if self.unix:
            return f"nbd+unix:///?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self, timeout=10.0):
        cmd = ["nbdkit", "-f", "--exit-with-parent"]
        if self.unix:
            cmd += ["-U", self.unix]
        else:
            cmd += ["-i", "127.0.0.1", "-p", str(self.port)]
        cmd += self.extra + self.args
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {open(self.log_path).read()}")
            try:
                if self.unix:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(self.unix)
                else:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                s.close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nbdkit did not start")

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


@pytest.fixture
def cleanup():
    things = []
    yield things
    for t in reversed(things):
        t.kill()


def start_job(d, name, source, dest, **extra):
    params = {"name": name, "source": source, "dest": str(dest)}
    params.update(extra)
    return d.call("Start", params)["job"]


def test_tcp_clone_equal_and_status_shows_uri(tmp_path, cleanup):
    size = 24 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=1)
    srv = NBDKit(tmp_path, ["file", str(img)], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    st = start_job(d, "r", srv.uri, tmp_path / "dst.img")
    assert st["source"]["path"] == srv.uri
    st = d.wait_state("r", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    # Holes and zero runs were found by BLOCK_STATUS or by reading zeros: not written.
    assert st["bytes"]["skipped_zero"] >= size // 2 - (1 << 20)
    out = subprocess.run([CLONECTL, "--socket", d.sock, "status", "r"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert srv.uri in out.stdout


def clonectl(d, *args, timeout=60):
    return subprocess.run([CLONECTL, "--socket", d.sock, *args], capture_output=True, text=True, timeout=timeout)


def test_unix_socket_discard_source_releases_as_it_goes(tmp_path, cleanup):
    """clonectl --source nbd+unix://…, --discard-source: the served file's allocation falls while copying."""
    size = 64 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=2, chunk=256 << 10)
    full = allocated(img)
    sock = str(tmp_path / "nbd.sock")
    srv = NBDKit(tmp_path, ["file", str(img)], unix=sock).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    r = clonectl(d, "start", "u", "--source", srv.uri, "--dest", str(tmp_path / "dst.img"), "--discard-source",
                 "--space-budget", "8M", "--region-size", "64K", "--rate-limit", "32M")
    assert r.returncode == 0, r.stderr
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        st = d.status("u")
        seen.append((st["bytes"]["hydrated"], allocated(img)))
        if st["state"] != "hydrating":
            break
        time.sleep(0.1)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0, "every region was trimmed (nbdkit file punches on TRIM)"
    # While copying, the source shrank: some sample shows part released and part still there.
    middle = [a for h, a in seen if 0 < h < size]
    assert any(0 < a < full for a in middle), seen
    assert st["discard"]["failed"] == 0


def test_server_without_trim_refuses_discard_source(tmp_path, cleanup):
    img = tmp_path / "src.img"
    make_image(img, 4 << 20, seed=3)
    srv = NBDKit(tmp_path, ["file", str(img)], port=free_port(), extra=["--readonly"]).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    with pytest.raises(VarlinkError) as e:
        start_job(d, "nt", srv.uri, tmp_path / "dst.img", discard_source=True)
    assert e.value.name == "org.hydrationd.Control.InvalidParameter"
    assert e.value.parameters["parameter"] == "discard_source"
    assert "DiscardUnsupported" in e.value.parameters["reason"] and "TRIM" in e.value.parameters["reason"]
    assert not (tmp_path / "dst.img").exists(), "nothing was created"
    # Without release the same server is fine.
    start_job(d, "nt", srv.uri, tmp_path / "dst.img")
    assert d.wait_state("nt", ["complete", "failed"])["state"] == "complete"


def test_delay_filter_distant_host(tmp_path, cleanup):
    size = 16 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=4)
    srv = NBDKit(tmp_path, ["--filter=delay", "file", str(img), "rdelay=5ms", "delay-trim=5ms"], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "dl", srv.uri, tmp_path / "dst.img", discard_source=True)
    st = d.wait_state("dl", ["complete", "failed"], timeout=120)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


def test_read_errors_fail_with_errno_and_region_then_resume(tmp_path, cleanup):
    """nbdkit --filter=error: an NBD EIO reply is a read error (retried, then failed, resumable)."""
    size = 8 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=5)
    trigger = tmp_path / "inject"
    srv = NBDKit(tmp_path, ["--filter=error", "file", str(img), "error-pread=EIO", "error-pread-rate=100%",
                            f"error-pread-file={trigger}"], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    # Created healthy (its identity samples are read at creation), then every read fails.
    start_job(d, "er", srv.uri, tmp_path / "dst.img", no_hydration=True)
    trigger.write_text("")
    d.call("Resume", {"name": "er"})
    st = d.wait_state("er", ["failed", "complete"], timeout=60)
    assert st["state"] == "failed", st
    assert st["error"]["code"] == "SourceReadFailed"
    assert st["error"]["errno"] == 5
    assert st["error"]["region"] is not None
    trigger.unlink()
    d.call("Resume", {"name": "er"})
    st = d.wait_state("er", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want


def test_server_killed_and_restarted_mid_copy(tmp_path, cleanup):
    """The job pauses itself with SourceUnavailable, reconnects, resumes by itself, ends equal."""
    size = 48 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=6, chunk=256 << 10)
    port = free_port()
    srv = NBDKit(tmp_path, ["file", str(img)], port=port).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "kr", srv.uri, tmp_path / "dst.img", discard_source=True, region_size=65536,
              rate_limit_bytes_per_second=16 << 20)
    while d.status("kr")["bytes"]["hydrated"] < 8 << 20:
        time.sleep(0.05)
    srv.kill(signal.SIGKILL)
    deadline = time.time() + 20
    st = d.status("kr")
    while time.time() < deadline and not (st["error"] and st["error"]["code"] == "SourceUnavailable"):
        time.sleep(0.05)
        st = d.status("kr")
    assert st["state"] == "paused", st
    assert st["error"]["code"] == "SourceUnavailable", st
    assert "since" in st["error"]["message"]
    print("while the server is down:", st["state"], st["error"])
    time.sleep(1.0)
    srv2 = NBDKit(tmp_path, ["file", str(img)], port=port, name="nbdkit2").start()
    cleanup.append(srv2)
    d.call("Set", {"name": "kr", "rate_limit_bytes_per_second": 0})
    st = d.wait_state("kr", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert st["error"] is None
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


def test_daemon_sigkilled_mid_copy_and_restarted(tmp_path, cleanup):
    size = 48 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=7, chunk=256 << 10)
    srv = NBDKit(tmp_path, ["file", str(img)], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "k9", srv.uri, tmp_path / "dst.img", discard_source=True, region_size=65536,
              commit_interval_ms=50, rate_limit_bytes_per_second=24 << 20)
    for _ in range(3):
        time.sleep(0.4)
        d.kill(signal.SIGKILL)
        d.start()
        st = d.status("k9")
        assert st["state"] in ("hydrating", "complete"), st
    d.call("Set", {"name": "k9", "rate_limit_bytes_per_second": 0})
    st = d.wait_state("k9", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


def test_another_disk_at_the_same_uri_is_not_confirmed(tmp_path, cleanup):
    """Same export name, size and description, other content: DeviceUnconfirmed, nothing written."""
    size = 8 << 20
    img = tmp_path / "src.img"
    other = tmp_path / "other.img"
    make_image(img, size, seed=8)
    make_image(other, size, seed=9)
    port = free_port()
    srv = NBDKit(tmp_path, ["file", str(img)], port=port).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "id", srv.uri, tmp_path / "dst.img", discard_source=True, no_hydration=True)
    d.stop()
    srv.kill()
    srv2 = NBDKit(tmp_path, ["file", str(other)], port=port, name="nbdkit2").start()
    cleanup.append(srv2)
    before = allocated(other)
    d.start()
    st = d.status("id")
    assert st["state"] == "failed", st
    assert st["error"]["code"] == "DeviceUnconfirmed", st
    assert allocated(other) == before, "nothing was released on the other disk"
    # The right disk back: the job resumes.
    srv2.kill()
    srv3 = NBDKit(tmp_path, ["file", str(img)], port=port, name="nbdkit3").start()
    cleanup.append(srv3)
    d.call("Resume", {"name": "id"})
    assert d.wait_state("id", ["complete", "failed"], timeout=60)["state"] == "complete"


@pytest.mark.skipif(shutil.which("psktool") is None, reason="psktool (gnutls-bin) not installed")
def test_tls_with_psk(tmp_path, cleanup):
    size = 8 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=10)
    keys = tmp_path / "keys.psk"
    subprocess.run(["psktool", "-u", "hyd", "-p", str(keys)], check=True, capture_output=True)
    port = free_port()
    srv = NBDKit(tmp_path, ["file", str(img)], port=port, extra=["--tls=require", f"--tls-psk={keys}"]).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    # Without TLS the server refuses.
    with pytest.raises(VarlinkError):
        start_job(d, "plain", srv.uri, tmp_path / "plain.img")
    uri = f"nbds://hyd@127.0.0.1:{port}/?tls-psk-file={keys}"
    start_job(d, "tls", uri, tmp_path / "dst.img", discard_source=True)
    st = d.wait_state("tls", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


def test_pause_while_the_server_is_down_stays_paused(tmp_path, cleanup):
    """A user pause during an outage stops the automatic resume; `resume` goes on."""
    size = 32 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=11, chunk=256 << 10)
    sock = str(tmp_path / "nbd.sock")
    srv = NBDKit(tmp_path, ["file", str(img)], unix=sock).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "p", srv.uri, tmp_path / "dst.img", discard_source=True, region_size=65536,
              rate_limit_bytes_per_second=8 << 20)
    while d.status("p")["bytes"]["hydrated"] < 4 << 20:
        time.sleep(0.05)
    srv.kill(signal.SIGKILL)
    os.unlink(sock)
    deadline = time.time() + 20
    while time.time() < deadline and (d.status("p")["error"] or {}).get("code") != "SourceUnavailable":
        time.sleep(0.05)
    out = clonectl(d, "status", "p")
    assert "SourceUnavailable" in out.stdout and "unavailable since" in out.stdout, out.stdout
    r = clonectl(d, "pause", "p")
    assert r.returncode == 0, r.stderr
    srv2 = NBDKit(tmp_path, ["file", str(img)], unix=sock, name="nbdkit2").start()
    cleanup.append(srv2)
    time.sleep(3)
    st = d.status("p")
    assert st["state"] == "paused", st
    d.call("Set", {"name": "p", "rate_limit_bytes_per_second": 0})
    r = clonectl(d, "resume", "p")
    assert r.returncode == 0, r.stderr
    st = d.wait_state("p", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


@pytest.mark.parametrize("filters,params", [
    (["--filter=multi-conn"], ["multi-conn-mode=disable"]),   # one connection, requests pipelined on it
    (["--filter=noextents"], []),                             # BLOCK_STATUS says all data: zeros found by reading
])
def test_servers_without_multi_conn_or_block_status(tmp_path, cleanup, filters, params):
    size = 16 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=12)
    srv = NBDKit(tmp_path, [*filters, "file", str(img), *params], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "f", srv.uri, tmp_path / "dst.img", discard_source=True)
    st = d.wait_state("f", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert st["bytes"]["skipped_zero"] >= size // 2 - (1 << 20)
    assert allocated(img) == 0
    # The destination holds only the data.
    assert allocated(tmp_path / "dst.img") <= size // 2 + (1 << 20)


def test_second_job_on_a_uri_being_released_is_refused(tmp_path, cleanup):
    img = tmp_path / "src.img"
    make_image(img, 8 << 20, seed=13)
    srv = NBDKit(tmp_path, ["file", str(img)], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "a", srv.uri, tmp_path / "a.img", discard_source=True, no_hydration=True)
    with pytest.raises(VarlinkError) as e:
        start_job(d, "b", srv.uri, tmp_path / "b.img")
    assert e.value.name == "org.hydrationd.Control.DeviceInUse"
    assert e.value.parameters["job"] == "a"


def test_shutdown_during_an_outage_and_restart_while_the_server_is_down(tmp_path, cleanup):
    """SIGTERM while the source is unreachable ends promptly; a restart with the server still
    down lists the job as failed (IOError, the open error) and reopens it by itself once the
    server answers (retried with backoff, 1 s doubling to 30 s): no operator needed."""
    size = 32 << 20
    img = tmp_path / "src.img"
    want = make_image(img, size, seed=14, chunk=256 << 10)
    port = free_port()
    srv = NBDKit(tmp_path, ["file", str(img)], port=port).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "s", srv.uri, tmp_path / "dst.img", discard_source=True, region_size=65536,
              rate_limit_bytes_per_second=8 << 20)
    while d.status("s")["bytes"]["hydrated"] < 4 << 20:
        time.sleep(0.05)
    srv.kill(signal.SIGKILL)
    deadline = time.time() + 20
    while time.time() < deadline and (d.status("s")["error"] or {}).get("code") != "SourceUnavailable":
        time.sleep(0.05)
    t0 = time.time()
    assert d.stop() == 0
    assert time.time() - t0 < 10, "shutdown waited for the source"
    d.start()
    st = d.status("s")
    assert st["state"] == "failed" and st["error"]["code"] == "IOError", st
    time.sleep(2.5)
    st = d.status("s")
    assert st["state"] == "failed" and st["error"]["code"] == "IOError", "still down: still failed, nothing touched"
    srv2 = NBDKit(tmp_path, ["file", str(img)], port=port, name="nbdkit2").start()
    cleanup.append(srv2)
    st = d.wait_state("s", ["hydrating", "complete"], timeout=40)
    d.call("Set", {"name": "s", "rate_limit_bytes_per_second": 0})
    st = d.wait_state("s", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want
    assert allocated(img) == 0


@pytest.mark.skipif(shutil.which("nbdcopy") is None or shutil.which("qemu-io") is None,
                    reason="nbdcopy (libnbd-bin) or qemu-io (qemu-utils) missing")
def test_live_clone_of_a_remote_source_is_a_migration(tmp_path, cleanup):
    """The whole move between hosts: the disk on the old host (nbdkit over TCP), the clone
    served on the new host from its first second (--export), client writes landing there while
    the old host's space comes back (--discard-source, TRIM after each commit)."""
    size = 16 << 20
    img = tmp_path / "old-host.img"
    make_image(img, size, seed=6, chunk=256 << 10)
    with open(img, "rb") as f:
        original = f.read()
    full = allocated(img)
    srv = NBDKit(tmp_path, ["file", str(img)], port=free_port()).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    r = clonectl(d, "start", "vm", "--source", srv.uri, "--dest", str(tmp_path / "new-host.img"), "--discard-source",
                 "--export", "--rate-limit", "512K", "--commit-interval", "200ms")
    assert r.returncode == 0, r.stderr
    export = d.status("vm")["export"]["uri"]
    # The workload reads the whole disk on the new host while most of it is still on the old one.
    out = tmp_path / "read.img"
    subprocess.run(["nbdcopy", export, str(out)], check=True, timeout=120)
    with open(out, "rb") as f:
        assert f.read() == original, "the clone read mid-migration differs from the disk"
    st = d.status("vm")
    assert st["state"] == "hydrating" and st["regions"]["hydrated"] < st["regions"]["total"], st["regions"]
    # It writes (across region boundaries, into regions still remote) and flushes.
    q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1000000 300000", "-c", "flush", export],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    expected = bytearray(original)
    expected[1000000:1300000] = b"\x3c" * 300000
    assert clonectl(d, "set", "vm", "--rate-limit", "0").returncode == 0
    st = d.wait_state("vm", ["complete", "failed"], timeout=120)
    assert st["state"] == "complete", st
    with open(tmp_path / "new-host.img", "rb") as f:
        assert f.read() == bytes(expected), "the new host's disk is not the clone with the client's write"
    # The old host's space came back (nbdkit file punches on TRIM).
    assert allocated(img) < full // 20, f"old host still holds {allocated(img)} of {full} bytes"


NBD_READ_ONE = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(4096, int(sys.argv[2]))
print("read", flush=True)
"""


def test_a_source_that_stops_answering_pauses_the_job_and_holds_no_other_export(tmp_path, cleanup):
    """A remote source that stops answering without closing its socket (nbdkit delay filter, 300 s
    per read): the job's reads time out (HYDRATION_NBD_TIMEOUT_MS, 30 s by default; 6 s here, longer than the other export may wait),
    the job pauses with SourceUnavailable and `remove --force` returns at once. Meanwhile clients
    stuck on that source hold only their own export's threads: another job's export is served
    (Tests/attacks/l13, l14: pause, remove and SIGTERM hung, the other export was starved)."""
    if not os.path.exists("/usr/bin/python3") or subprocess.run(["/usr/bin/python3", "-c", "import nbd"],
                                                                 capture_output=True).returncode != 0:
        pytest.skip("python3-libnbd missing")
    img = tmp_path / "src.img"
    make_image(img, 16 << 20, seed=21, chunk=256 << 10)
    local = tmp_path / "local.img"
    make_image(local, 4 << 20, seed=22)
    sock = str(tmp_path / "slow.sock")
    srv = NBDKit(tmp_path, ["file", str(img)], unix=sock).start()
    cleanup.append(srv)
    # Source reads time out after 20 s; a read of the other export that took anywhere near that
    # long would have waited behind them (the bound below, 10 s, leaves a loaded machine room).
    d = Daemon(tmp_path, extra_env={"HYDRATION_NBD_TIMEOUT_MS": "20000"}).start()
    cleanup.append(d)
    r = clonectl(d, "start", "stuck", "--source", srv.uri, "--dest", str(tmp_path / "stuck.img"), "--export",
                 "--no-hydration")
    assert r.returncode == 0, r.stderr
    r = clonectl(d, "start", "other", "--source", str(local), "--dest", str(tmp_path / "other.img"), "--export",
                 "--no-hydration")
    assert r.returncode == 0, r.stderr
    # The server now stops answering reads (same socket, 300 s per read, connection kept open).
    srv.kill()
    os.unlink(sock)
    slow = NBDKit(tmp_path, ["--filter=delay", "file", str(img), "delay-read=300"], unix=sock, name="slow").start()
    cleanup.append(slow)
    stuck_uri = d.status("stuck")["export"]["uri"]
    other_uri = d.status("other")["export"]["uri"]
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    readers = [subprocess.Popen(["/usr/bin/python3", "-c", NBD_READ_ONE, stuck_uri, str(i << 20)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    try:
        time.sleep(0.5)
        t0 = time.time()
        out = subprocess.run(["/usr/bin/python3", "-c", NBD_READ_ONE, other_uri, "8192"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "read" in out.stdout, out.stderr
        assert time.time() - t0 < 10, f"another job's export waited {time.time() - t0:.1f} s behind a stalled source"
        # The stalled reads time out: their clients get an error, not a hang.
        for p in readers:
            p.wait(timeout=90)
            assert p.returncode != 0, "a read of a source that never answered succeeded"
        # Hydration of the stalled job: it pauses with SourceUnavailable instead of hanging.
        assert clonectl(d, "resume", "stuck").returncode == 0
        deadline = time.time() + 90
        while time.time() < deadline and (d.status("stuck")["error"] or {}).get("code") != "SourceUnavailable":
            time.sleep(0.1)
        assert (d.status("stuck")["error"] or {}).get("code") == "SourceUnavailable", d.status("stuck")
        t0 = time.time()
        r = clonectl(d, "remove", "stuck", "--force", timeout=120)
        assert r.returncode == 0, r.stderr
        # It may wait out one read's 20 s deadline, never the 300 s the stalled server holds a read.
        assert time.time() - t0 < 60, f"remove --force took {time.time() - t0:.1f} s"
    finally:
        for p in readers:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- issue 22: identity at every reconnection, deadlines, alignment -------------------------------

REGION = 65536


def dense_image(path, size, seed):
    """Random bytes everywhere (no holes): the fingerprint's samples are at each eighth's start."""
    import random
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def fingerprint_offsets(size):
    """Where RemoteIdentity.chooseSamples samples a disk that is data everywhere."""
    return sorted({(size * k // 8) // 4096 * 4096 for k in range(8)})


def write_other_disk(path, src, kind):
    """Another disk of the same size: `other` differs everywhere; `matching` equals the source at
    the fingerprint's sampled blocks and differs everywhere else (the fingerprint can't tell)."""
    other = bytearray(b ^ 0x5A for b in src)
    if kind == "matching":
        for off in fingerprint_offsets(len(src)):
            other[off:off + 4096] = src[off:off + 4096]
    with open(path, "wb") as f:
        f.write(other)
    return bytes(other)


def regions_not_from(dest, src, other):
    """Regions of the clone that hold the other disk's bytes (never allowed), and that are neither
    the source's nor zeros."""
    with open(dest, "rb") as f:
        got = f.read()
    foreign, odd = 0, 0
    for off in range(0, len(src), REGION):
        r = got[off:off + REGION]
        if r == src[off:off + REGION] or r == bytes(len(r)):
            continue
        if r == other[off:off + REGION]:
            foreign += 1
        else:
            odd += 1
    return foreign, odd


def wait_error(d, name, code, timeout=60):
    deadline = time.time() + timeout
    st = d.status(name)
    while time.time() < deadline and (st["error"] or {}).get("code") != code:
        time.sleep(0.05)
        st = d.status(name)
    assert (st["error"] or {}).get("code") == code, f"waited {timeout}s for {code}, job is {st}"
    return st


@pytest.mark.parametrize("kind", ["other", "matching"])
def test_a_reconnection_to_another_disk_stops_the_job_and_releases_nothing(tmp_path, cleanup, kind):
    """Paused mid-copy, the server is replaced at the same socket by another disk of the same size
    (nbdkit's file plugin sends no description; `matching`: a disk equal to the source at every
    sampled block of the fingerprint). The resume's first read reconnects in the call: the
    reconnection reads the witness blocks, finds other bytes, and the job fails DeviceUnconfirmed
    with nothing read into the clone from, and nothing released on, that disk. The right disk
    back and `resume`: the clone completes equal to the source."""
    size = 16 << 20
    img = tmp_path / "src.img"
    src = dense_image(img, size, seed=40)
    want = sha256_of(img)
    other_path = tmp_path / "other.img"
    other = write_other_disk(other_path, src, kind)
    sock = str(tmp_path / "src.sock")
    srv = NBDKit(tmp_path, ["file", str(img)], unix=sock).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "sw", srv.uri, tmp_path / "dst.img", discard_source=True, region_size=REGION,
              rate_limit_bytes_per_second=4 << 20)
    while d.status("sw")["bytes"]["hydrated"] < 2 << 20:
        time.sleep(0.05)
    d.call("Pause", {"name": "sw"})
    srv.kill()
    os.unlink(sock)
    srv2 = NBDKit(tmp_path, ["file", str(other_path)], unix=sock, name="other").start()
    cleanup.append(srv2)
    other_alloc = allocated(other_path)
    d.call("Set", {"name": "sw", "rate_limit_bytes_per_second": 0})
    d.call("Resume", {"name": "sw"})
    st = d.wait_state("sw", ["failed", "complete"], timeout=60)
    assert st["state"] == "failed", st
    assert st["error"]["code"] == "DeviceUnconfirmed", st
    assert allocated(other_path) == other_alloc, "the other disk was released on"
    assert sha256_of(other_path) == hashlib.sha256(other).hexdigest(), "the other disk changed"
    foreign, odd = regions_not_from(tmp_path / "dst.img", src, other)
    assert foreign == 0 and odd == 0, f"{foreign} regions of the clone are the other disk's, {odd} are neither"
    # The right disk back: the job reopens (confirming it) and completes.
    srv2.kill()
    os.unlink(sock)
    srv3 = NBDKit(tmp_path, ["file", str(img)], unix=sock, name="back").start()
    cleanup.append(srv3)
    d.call("Resume", {"name": "sw"})
    st = d.wait_state("sw", ["complete", "failed"], timeout=60)
    assert st["state"] == "complete", st
    assert sha256_of(tmp_path / "dst.img") == want


def test_the_watchers_probe_confirms_the_disk(tmp_path, cleanup):
    """The server dies mid-copy (the job pauses itself, SourceUnavailable); a disk equal to the
    source only at the fingerprint's blocks comes up at the same TCP port. The watcher's probe
    is a reconnection like any other: DeviceUnconfirmed, the job does not resume by itself, no
    byte of that disk reaches the clone. (Without --discard-source: with it, the discarder's
    release waiting for the connection may be the first to reconnect, as in the test above.)"""
    size = 16 << 20
    img = tmp_path / "src.img"
    src = dense_image(img, size, seed=41)
    other_path = tmp_path / "other.img"
    other = write_other_disk(other_path, src, "matching")
    port = free_port()
    srv = NBDKit(tmp_path, ["file", str(img)], port=port).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "wp", srv.uri, tmp_path / "dst.img", region_size=REGION, rate_limit_bytes_per_second=4 << 20)
    while d.status("wp")["bytes"]["hydrated"] < 2 << 20:
        time.sleep(0.05)
    srv.kill()
    wait_error(d, "wp", "SourceUnavailable")
    srv2 = NBDKit(tmp_path, ["file", str(other_path)], port=port, name="other").start()
    cleanup.append(srv2)
    st = wait_error(d, "wp", "DeviceUnconfirmed")
    assert st["state"] == "failed", st
    assert "witness" in st["error"]["message"], st
    assert sha256_of(other_path) == hashlib.sha256(other).hexdigest()
    with open(d.log_path, errors="replace") as f:
        assert "source reachable again" not in f.read(), "the job resumed on the other disk"
    foreign, odd = regions_not_from(tmp_path / "dst.img", src, other)
    assert foreign == 0 and odd == 0, f"{foreign} regions of the clone are the other disk's, {odd} are neither"


def test_a_frozen_server_fails_reads_and_holds_no_command(tmp_path, cleanup):
    """nbdkit stopped with SIGSTOP (its kernel still accepts connections): clients' reads of
    unhydrated regions of the live clone fail (EIO) after the request deadline instead of hanging
    for the freeze; a read of a hydrated region is served meanwhile; the job pauses with
    SourceUnavailable; `pause`, `remove --force` and SIGTERM return while the server is still
    frozen (it is thawed only at the end)."""
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode != 0:
        pytest.skip("python3-libnbd missing")
    size = 16 << 20
    img = tmp_path / "src.img"
    dense_image(img, size, seed=42)
    sock = str(tmp_path / "src.sock")
    srv = NBDKit(tmp_path, ["file", str(img)], unix=sock).start()
    cleanup.append(srv)
    d = Daemon(tmp_path, extra_env={"HYDRATION_NBD_TIMEOUT_MS": "4000",
                                    "HYDRATION_NBD_CONNECT_TIMEOUT_MS": "3000"}).start()
    cleanup.append(d)
    r = clonectl(d, "start", "fz", "--source", srv.uri, "--dest", str(tmp_path / "dst.img"), "--export",
                 "--region-size", "64K", "--rate-limit", "512K")
    assert r.returncode == 0, r.stderr
    while d.status("fz")["bytes"]["committed"] < 1 << 20:
        time.sleep(0.05)
    uri = d.status("fz")["export"]["uri"]
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    srv.proc.send_signal(signal.SIGSTOP)
    try:
        readers = [subprocess.Popen(["/usr/bin/python3", "-c", NBD_READ_ONE, uri, str((8 + i) << 20)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
        for p in readers:
            p.wait(timeout=60)
            assert p.returncode != 0, "a read of a frozen source succeeded"
        out = subprocess.run(["/usr/bin/python3", "-c", NBD_READ_ONE, uri, "0"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "read" in out.stdout, out.stderr
        wait_error(d, "fz", "SourceUnavailable")
        assert clonectl(d, "resume", "fz", timeout=60).returncode == 0
        r = clonectl(d, "pause", "fz", timeout=60)
        assert r.returncode == 0, r.stderr
        assert clonectl(d, "resume", "fz", timeout=60).returncode == 0
        r = clonectl(d, "remove", "fz", "--force", timeout=60)
        assert r.returncode == 0, r.stderr
        r = clonectl(d, "start", "fz2", "--source", srv.uri, "--dest", str(tmp_path / "dst2.img"), timeout=60)
        assert r.returncode != 0 and "handshake" in r.stderr, r.stderr
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=60)
    finally:
        srv.proc.send_signal(signal.SIGCONT)


class MuteListener:
    """A TCP listener that accepts connections and never says a word (a typo'd port, a proxy)."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted.append(c)

    def count(self):
        with self.lock:
            return len(self.accepted)

    def kill(self):
        self.sock.close()
        with self.lock:
            for c in self.accepted:
                c.close()


def test_a_server_that_never_greets_times_out_and_holds_no_shared_thread(tmp_path, cleanup):
    """Nine `clonectl start --source nbd://127.0.0.1:PORT/` against a listener that accepts and
    never greets: while all nine wait for the handshake, another job's hydration and pause go on;
    each start then fails with IOError (ETIMEDOUT, 'handshake') after the connection deadline."""
    mute = MuteListener()
    cleanup.append(mute)
    local = tmp_path / "local.img"
    make_image(local, 32 << 20, seed=43)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    start_job(d, "busy", str(local), tmp_path / "busy.img", region_size=REGION, rate_limit_bytes_per_second=4 << 20)
    starts = [subprocess.Popen([CLONECTL, "--socket", d.sock, "start", f"mute{i}", "--source",
                                f"nbd://127.0.0.1:{mute.port}/", "--dest", str(tmp_path / f"m{i}.img")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(9)]
    try:
        deadline = time.time() + 60
        while mute.count() < 9 and time.time() < deadline:
            time.sleep(0.05)
        assert mute.count() >= 9, f"only {mute.count()} of 9 starts connected"
        # All nine are waiting for a greeting: the other job still hydrates and pauses.
        h0 = d.status("busy")["bytes"]["hydrated"]
        deadline = time.time() + 60
        while d.status("busy")["bytes"]["hydrated"] <= h0 and time.time() < deadline:
            time.sleep(0.05)
        assert d.status("busy")["bytes"]["hydrated"] > h0, "another job's hydration stopped"
        r = clonectl(d, "pause", "busy", timeout=60)
        assert r.returncode == 0, r.stderr
        for p in starts:
            out, err = p.communicate(timeout=60)
            assert p.returncode != 0, out
            assert "handshake" in err and "timed out" in err, err
    finally:
        for p in starts:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_server_that_needs_4k_alignment_serves_sector_reads_of_the_clone(tmp_path, cleanup):
    """The remote source needs 4 KiB alignment (nbdkit blocksize-policy, error policy): a client's
    512-byte read of an unhydrated region through the live clone is widened to the server's
    minimum block and gets the source's bytes, not EINVAL."""
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode != 0:
        pytest.skip("python3-libnbd missing")
    size = 4 << 20
    img = tmp_path / "src.img"
    src = dense_image(img, size, seed=44)
    sock = str(tmp_path / "src.sock")
    srv = NBDKit(tmp_path, ["--filter=blocksize-policy", "file", str(img), "blocksize-minimum=4096",
                            "blocksize-error-policy=error"], unix=sock).start()
    cleanup.append(srv)
    d = Daemon(tmp_path).start()
    cleanup.append(d)
    r = clonectl(d, "start", "al", "--source", srv.uri, "--dest", str(tmp_path / "dst.img"), "--export",
                 "--no-hydration")
    assert r.returncode == 0, r.stderr
    uri = d.status("al")["export"]["uri"]
    code = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
sys.stdout.buffer.write(h.pread(512, 512) + h.pread(1000, 8192 + 100))
"""
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    out = subprocess.run(["/usr/bin/python3", "-c", code, uri], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == src[512:1024] + src[8192 + 100:8192 + 1100]
