"""Exported jobs end to end (issue 12, daemon wiring): a real hydrationd serves the clone of every
job started with --export on its NBD socket, and real NBD clients (libnbd's nbdinfo and python
binding) see it.

Only the handshake is relied on here (names, sizes, flags, connection counts, refusals,
disconnects): the export's I/O semantics are tested with the engine (docs/live-clone.md).

Every test starts its own hydrationd (hydtest.Daemon: temporary control and NBD sockets) and
stops it, and every client it starts, by PID. Run:
    python3 -m pytest -x Tests/integration/test_export_wiring.py
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hydtest import CLONECTL, HYDRATIOND, Daemon, VarlinkError, make_image  # noqa: E402

MiB = 1 << 20
# Debian's python has the libnbd binding (python3-libnbd); a pyenv/venv python usually does not.
DEBIAN_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(HYDRATIOND), reason=f"{HYDRATIOND} not built"),
    pytest.mark.skipif(not shutil.which("nbdinfo"), reason="nbdinfo not installed (libnbd-bin)"),
]

# Connects to URI, prints "connected SIZE", then waits until the server ends the connection and
# prints "disconnected". It sends no request: only the handshake is relied on.
HOLDER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", h.get_size(), flush=True)
try:
    while not (h.aio_is_closed() or h.aio_is_dead()):
        h.poll(200)
except nbd.Error as e:
    pass
print("disconnected", flush=True)
"""


def uri(sock, name=""):
    return f"nbd+unix:///{name}?socket={sock}"


def nbdinfo(*args, user=None, env=None, timeout=30):
    cmd = ["nbdinfo", *args]
    if user:
        cmd = [shutil.which("setpriv"), "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def clonectl(d, *args):
    return subprocess.run([CLONECTL, "--socket", d.sock, *args], capture_output=True, text=True, timeout=60)


def listed(sock):
    r = nbdinfo("--list", "--json", uri(sock))
    assert r.returncode == 0, r.stderr
    return [e["export-name"] for e in json.loads(r.stdout)["exports"]]


class Holder:
    """A libnbd client holding a connection to an export open; stopped by PID."""

    def __init__(self, export_uri):
        if not os.path.exists(DEBIAN_PYTHON) or subprocess.run(
                [DEBIAN_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
            pytest.skip("python3-libnbd (import nbd with /usr/bin/python3) is not installed")
        self.proc = subprocess.Popen([DEBIAN_PYTHON, "-c", HOLDER, export_uri], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("connected"), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.size = int(line.split()[1])

    def wait_disconnected(self, timeout=15):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return "disconnected" in out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.kill()


@pytest.fixture
def holders():
    started = []
    yield lambda u: started.append(Holder(u)) or started[-1]
    for h in started:
        h.stop()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_job(d, tmp, name, size, export, seed=1, **extra):
    src = tmp / f"{name}.img"
    make_image(src, size, seed=seed)
    params = {"name": name, "source": str(src), "dest": str(tmp / f"{name}.out"), "no_hydration": True}
    if export:
        params["export"] = True
    params.update(extra)
    return d.call("Start", params)["job"]


def test_list_shows_exported_jobs_only_and_info_has_name_and_size(daemon, tmp_path):
    assert os.path.exists(daemon.nbd_sock)
    assert oct(os.stat(daemon.nbd_sock).st_mode & 0o777) == "0o660"
    # Through clonectl: --export
    src = tmp_path / "ex.img"
    make_image(src, 6 * MiB, seed=1)
    r = clonectl(daemon, "start", "ex", "--source", str(src), "--dest", str(tmp_path / "ex.out"), "--export",
                 "--no-hydration", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["export"] == {"uri": uri(daemon.nbd_sock, "ex"), "clients": 0, "hydrate_on_read": False,
                             "io": {"read_bytes": 0, "written_bytes": 0, "trimmed_bytes": 0, "hydrated_regions": 0}}
    plain = start_job(daemon, tmp_path, "plain", 2 * MiB, export=False, seed=2)
    assert plain["export"] is None

    assert listed(daemon.nbd_sock) == ["ex"]
    r = nbdinfo("--json", uri(daemon.nbd_sock, "ex"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["exports"][0]
    assert info["export-name"] == "ex"
    assert info["export-size"] == 6 * MiB
    assert info["is_read_only"] is False
    assert "hydrationd" in info.get("description", "")
    # A job that is not exported is unknown to NBD clients.
    r = nbdinfo(uri(daemon.nbd_sock, "plain"))
    assert r.returncode != 0
    # The flag is persisted with the job.
    with open(os.path.join(daemon.state, "jobs", "ex.json")) as f:
        assert json.load(f)["export"] is True
    with open(os.path.join(daemon.state, "jobs", "plain.json")) as f:
        assert json.load(f)["export"] is False


def test_export_is_a_creation_option(daemon, tmp_path):
    # With only the name, Start resumes: export cannot take effect there.
    with pytest.raises(VarlinkError) as e:
        daemon.call("Start", {"name": "x", "export": True})
    assert e.value.name.endswith(".InvalidParameter")
    r = clonectl(daemon, "start", "x", "--export")
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert "--export" in r.stderr


def test_status_counts_clients_and_remove_needs_force(daemon, tmp_path, holders):
    start_job(daemon, tmp_path, "ex", 4 * MiB, export=True)
    h = holders(uri(daemon.nbd_sock, "ex"))
    assert h.size == 4 * MiB
    st = wait_for(lambda: (s := daemon.status("ex"))["export"]["clients"] == 1 and s, what="1 client in status")
    assert st["export"]["uri"] == uri(daemon.nbd_sock, "ex")
    r = clonectl(daemon, "status", "ex")
    assert r.returncode == 0 and f"export      {uri(daemon.nbd_sock, 'ex')} (1 client)" in r.stdout, r.stdout
    second = holders(uri(daemon.nbd_sock, "ex"))
    wait_for(lambda: daemon.status("ex")["export"]["clients"] == 2, what="2 clients")
    second.stop()
    wait_for(lambda: daemon.status("ex")["export"]["clients"] == 1, what="back to 1 client")

    # Refused while a client is connected: a named error, exit 65 like the other refusals.
    with pytest.raises(VarlinkError) as e:
        daemon.call("Remove", {"name": "ex"})
    assert e.value.name == "org.hydrationd.Control.ExportInUse"
    assert e.value.parameters["clients"] == 1 and e.value.parameters["name"] == "ex"
    r = clonectl(daemon, "remove", "ex")
    assert r.returncode == 65, (r.returncode, r.stderr)
    assert "1 client is connected" in r.stderr and "--force" in r.stderr
    assert listed(daemon.nbd_sock) == ["ex"]
    assert h.proc.poll() is None, "a refused remove must not disconnect the client"

    # --force: the client is disconnected, the export and the job are gone.
    r = clonectl(daemon, "remove", "ex", "--force")
    assert r.returncode == 0, r.stderr
    assert h.wait_disconnected(), "the client was not disconnected"
    assert listed(daemon.nbd_sock) == []
    with pytest.raises(VarlinkError):
        daemon.status("ex")


def test_restart_exports_again_and_shutdown_disconnects(tmp_path, holders):
    d = Daemon(tmp_path).start()
    try:
        start_job(d, tmp_path, "ex", 3 * MiB, export=True)
        start_job(d, tmp_path, "plain", 1 * MiB, export=False, seed=2)
        h = holders(uri(d.nbd_sock, "ex"))
        wait_for(lambda: d.status("ex")["export"]["clients"] == 1, what="1 client")
        # Graceful shutdown with a client connected: it is disconnected, the daemon exits 0.
        t0 = time.time()
        assert d.stop() == 0, d.log()
        assert time.time() - t0 < 15
        assert h.wait_disconnected()
        assert not os.path.exists(d.nbd_sock), "the daemon removes the NBD socket it created"

        d.start()
        assert listed(d.nbd_sock) == ["ex"]
        st = d.status("ex")
        assert {k: st["export"][k] for k in ("uri", "clients")} == {"uri": uri(d.nbd_sock, "ex"), "clients": 0}
        assert d.status("plain")["export"] is None
        r = nbdinfo("--json", uri(d.nbd_sock, "ex"))
        assert r.returncode == 0 and json.loads(r.stdout)["exports"][0]["export-size"] == 3 * MiB, r.stderr
    finally:
        d.kill()


def test_default_nbd_socket_is_next_to_the_control_socket(tmp_path):
    d = Daemon(tmp_path)
    # No --nbd-socket: the helper passes one, so start this daemon by hand.
    log = open(d.log_path, "ab")
    proc = subprocess.Popen([HYDRATIOND, "--state-dir", d.state, "--socket", d.sock], stdout=log, stderr=log, env=d.env)
    try:
        wait_for(lambda: os.path.exists(d.sock) and os.path.exists(tmp_path / "nbd.sock"), what="both sockets")
        start_job(d, tmp_path, "ex", 1 * MiB, export=True)
        assert d.status("ex")["export"]["uri"] == uri(str(tmp_path / "nbd.sock"), "ex")
        assert listed(str(tmp_path / "nbd.sock")) == ["ex"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# Sends OPT_GO for an export as a raw client and prints the reply type of the first option reply.
RAW_GO = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
read(18)                                   # NBDMAGIC, IHAVEOPT, handshake flags
s.sendall(struct.pack(">I", 3))            # FIXED_NEWSTYLE | NO_ZEROES
name = sys.argv[2].encode()
data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
magic, opt, rtype, length = struct.unpack(">QIII", read(20))
msg = read(length)
print(hex(rtype), msg.decode(errors="replace"))
"""


def _python_for_other_users():
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def test_unprivileged_peer_is_refused_with_policy_error():
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv to act as another user")
    # Everything 'nobody' touches lives in a world-readable directory of its own.
    pub = tempfile.mkdtemp(prefix="hyd-nbd-", dir="/tmp")
    os.chmod(pub, 0o755)
    d = Daemon(pub).start()
    try:
        from pathlib import Path
        start_job(d, Path(pub), "ex", 1 * MiB, export=True)
        os.chmod(d.nbd_sock, 0o666)  # let 'nobody' connect: access is decided by peer credentials
        # libnbd reports NBD_REP_ERR_POLICY as a failed OPT_GO; the server's message says why.
        env = dict(os.environ, LIBNBD_DEBUG="1")
        r = nbdinfo(uri(d.nbd_sock, "ex"), user="nobody", env=env)
        assert r.returncode != 0
        assert "may not use export 'ex'" in r.stderr, r.stderr[-2000:]
        # The export is left out of the list for that peer.
        r = nbdinfo("--list", "--json", uri(d.nbd_sock), user="nobody")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["exports"] == []
        # On the wire: NBD_REP_ERR_POLICY (2^31 + 2).
        out = subprocess.run([setpriv, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                              _python_for_other_users(), "-I", "-c", RAW_GO, d.nbd_sock, "ex"],
                             capture_output=True, text=True, timeout=30, cwd=pub)
        assert out.stdout.startswith("0x80000002 "), (out.stdout, out.stderr)
        # Root still gets it.
        assert listed(d.nbd_sock) == ["ex"]
    finally:
        d.kill()
        shutil.rmtree(pub, ignore_errors=True)


def test_socket_group_member_gets_the_export():
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv to act as another user")
    import grp
    from pathlib import Path
    gid = grp.getgrnam("nogroup").gr_gid
    pub = tempfile.mkdtemp(prefix="hyd-nbdg-", dir="/tmp")
    os.chmod(pub, 0o755)
    d = Daemon(pub, extra_args=["--socket-group", "nogroup"]).start()
    try:
        start_job(d, Path(pub), "ex", 1 * MiB, export=True)
        st = os.stat(d.nbd_sock)
        assert st.st_gid == gid and st.st_mode & 0o777 == 0o660
        # nobody:nogroup is in the socket group: it may connect (mode 0660) and gets the export.
        r = nbdinfo("--json", uri(d.nbd_sock, "ex"), user="nobody")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)["exports"][0]
        assert info["export-name"] == "ex" and info["is_read_only"] is False
    finally:
        d.kill()
        shutil.rmtree(pub, ignore_errors=True)


def test_hydrate_on_read_is_persisted_shown_and_needs_export(daemon, tmp_path):
    src = str(tmp_path / "src.img")
    make_image(src, 4 * MiB, seed=3)
    r = clonectl(daemon, "start", "h", "--source", src, "--dest", str(tmp_path / "dst.img"), "--hydrate-on-read")
    assert r.returncode == 64 and "--hydrate-on-read applies only with --export" in r.stderr, r.stderr
    with pytest.raises(VarlinkError) as e:
        daemon.call("Start", {"name": "h", "source": src, "dest": str(tmp_path / "dst.img"), "hydrate_on_read": True})
    assert e.value.name.endswith("InvalidParameter") and e.value.parameters.get("parameter") == "hydrate_on_read", e.value.parameters
    r = clonectl(daemon, "start", "h", "--source", src, "--dest", str(tmp_path / "dst.img"), "--export",
                 "--hydrate-on-read", "--no-hydration")
    assert r.returncode == 0, r.stderr
    st = daemon.status("h")
    assert st["export"]["hydrate_on_read"] is True
    with open(os.path.join(daemon.state, "jobs", "h.json")) as f:
        assert json.load(f)["hydrateOnRead"] is True
    # A read through the export hydrates the regions it read, though the job is not copying.
    r = nbdinfo("--map", uri(daemon.nbd_sock, "h"))
    assert r.returncode == 0, r.stderr
    # --no-extents: nbdcopy would not read what base:allocation calls holes (nothing to hydrate there).
    subprocess.run(["nbdcopy", "--no-extents", uri(daemon.nbd_sock, "h"), "null:"], check=True, timeout=60)
    deadline = time.time() + 20
    while daemon.status("h")["regions"]["hydrated"] < daemon.status("h")["regions"]["total"] and time.time() < deadline:
        time.sleep(0.05)
    st = daemon.status("h")
    assert st["regions"]["hydrated"] == st["regions"]["total"], st["regions"]
    assert st["export"]["io"]["hydrated_regions"] == st["regions"]["total"]
    assert "hydrate on read" in clonectl(daemon, "status", "h").stdout


def test_a_complete_job_restored_after_a_restart_offers_its_state_context(tmp_path):
    """A complete job restored from its metadata alone is served from its destination; it
    offers x-hydrationd:state as its live export did (every region hydrated and committed),
    not only base:allocation."""
    d = Daemon(tmp_path).start()
    try:
        src = tmp_path / "done.img"
        make_image(src, 3 * MiB + 4096, seed=4)
        d.call("Start", {"name": "done", "source": str(src), "dest": str(tmp_path / "done.out"), "export": True})
        d.wait_state("done", ["complete"])
        u = uri(d.nbd_sock, "done")
        live = nbdinfo("--map=x-hydrationd:state", u)
        assert live.returncode == 0, live.stderr
        d.stop()
        d.start()
        st = d.wait_state("done", ["complete"])
        assert st["export"] is not None, st
        r = nbdinfo("--json", u)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["exports"][0]["contexts"] == ["base:allocation", "x-hydrationd:state"]
        restored = nbdinfo("--map=x-hydrationd:state", u)
        assert restored.returncode == 0, restored.stderr
        extents = [line.split()[:3] for line in restored.stdout.splitlines() if line.strip()]
        # hydrated (1) | committed (2); the source was kept, so nothing released (4).
        assert extents == [["0", str(3 * MiB + 4096), "3"]], restored.stdout
        assert restored.stdout == live.stdout, "the same state as before the restart"
    finally:
        d.kill()
