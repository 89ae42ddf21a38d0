"""Shared helpers for the integration tests: start a real hydrationd, talk Varlink to it, make images."""
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN_DIR = os.environ.get("HYDRATION_BIN_DIR", os.path.join(REPO, ".build", "debug"))
HYDRATIOND = os.path.join(BIN_DIR, "hydrationd")
CLONECTL = os.path.join(BIN_DIR, "clonectl")
IFACE = "org.hydrationd.Control"


class VarlinkError(Exception):
    def __init__(self, name, parameters):
        super().__init__(f"{name} {parameters}")
        self.name = name
        self.parameters = parameters


def call(sock_path, method, params=None, timeout=30.0):
    """One Varlink call on a fresh connection; returns the reply parameters or raises VarlinkError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        msg = {"method": method if "." in method else f"{IFACE}.{method}"}
        if params is not None:
            msg["parameters"] = params
        s.sendall(json.dumps(msg).encode() + b"\0")
        reply = _read_one(s)
    finally:
        s.close()
    if "error" in reply:
        raise VarlinkError(reply["error"], reply.get("parameters", {}))
    return reply.get("parameters", {})


def send_raw(sock_path, raw: bytes, timeout=10.0):
    """Sends raw bytes; returns the first reply (dict) or None if the server closed the connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(raw)
        try:
            return _read_one(s)
        except (ConnectionError, EOFError):
            return None
    finally:
        s.close()


def _read_one(s):
    buf = b""
    while b"\0" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return json.loads(buf.split(b"\0", 1)[0])


class Daemon:
    """A hydrationd on a private socket and state directory; always stopped by PID."""

    def __init__(self, tmp, name="d", extra_env=None, extra_args=None):
        self.tmp = str(tmp)
        self.state = os.path.join(self.tmp, f"{name}-state")
        self.sock = os.path.join(self.tmp, f"{name}.sock")
        # Its own NBD socket (exported jobs): two daemons in one directory must not share nbd.sock.
        self.nbd_sock = os.path.join(self.tmp, f"{name}-nbd.sock")
        self.extra_args = list(extra_args or [])
        self.log_path = os.path.join(self.tmp, f"{name}.log")
        self.env = dict(os.environ)
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("LISTEN_FDS", None)
        if extra_env:
            self.env.update(extra_env)
        self.proc = None

    def start(self, timeout=20.0):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [HYDRATIOND, "--state-dir", self.state, "--socket", self.sock, "--nbd-socket", self.nbd_sock,
             "--log-level", "info", *self.extra_args],
            stdout=log, stderr=log, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hydrationd exited with {self.proc.returncode}: {self.log()}")
            try:
                call(self.sock, "org.varlink.service.GetInfo", {}, timeout=2)
                return self
            except (OSError, EOFError, VarlinkError):
                time.sleep(0.05)
        raise RuntimeError("hydrationd did not start: " + self.log())

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def call(self, method, params=None, timeout=30.0):
        return call(self.sock, method, params, timeout)

    def status(self, name):
        return self.call("GetStatus", {"name": name})["jobs"][0]

    def wait_state(self, name, states, timeout=60.0):
        deadline = time.time() + timeout
        st = None
        while time.time() < deadline:
            st = self.status(name)
            if st["state"] in states:
                return st
            time.sleep(0.05)
        raise AssertionError(f"job {name} still {st and st['state']} after {timeout}s")

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def stop(self):
        return self.kill(signal.SIGTERM)


def make_image(path, size, seed, chunk=1 << 20):
    """Random data, holes and zero runs (by chunk index mod 4: data, hole, data, zeros); returns sha256."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        off = 0
        i = 0
        while off < size:
            n = min(chunk, size - off)
            kind = i % 4
            if kind in (0, 2):
                data = rnd.randbytes(n)
                f.seek(off)
                f.write(data)
                h.update(data)
            elif kind == 1:
                h.update(b"\0" * n)  # hole
            else:
                f.seek(off)
                f.write(b"\0" * n)
                h.update(b"\0" * n)
            off += n
            i += 1
        f.truncate(size)
    return h.hexdigest()


def sha256_of(path, size=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while True:
            n = 1 << 20 if left is None else min(1 << 20, left)
            if n == 0:
                break
            b = f.read(n)
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def allocated(path):
    return os.stat(path).st_blocks * 512
