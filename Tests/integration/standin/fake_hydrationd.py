#!/usr/bin/env python3
"""Stand-in for hydrationd, used only to prove the systemd test harness (test_systemd.py).

It has hydrationd's planned command line and systemd behaviour, with a deliberately simple
engine: it copies a source file to a destination in 64 KiB regions, rate-limited, and commits
progress (fsync destination -> write job file -> fsync -> rename -> fsync directory) every 0.5 s.

systemd behaviour, as the real daemon must have it:
  * socket activation: uses the listening fd from LISTEN_FDS/LISTEN_PID, else binds --socket;
  * READY=1 only after the socket listens and all jobs are restored from --state-dir;
  * STATUS= one-line summary (same format as HydrationService.statusLine) kept current;
  * WATCHDOG=1 at half of WATCHDOG_USEC from the work loop; HYDRATIOND_TEST_WATCHDOG_STALL_AFTER_MS=N
    stops the pings after N ms (the test-only stall hook);
  * SIGTERM: STOPPING=1, final commit of every job, exit 0.
Stand-in-only knobs (environment): FAKE_HYDRATIOND_READY_DELAY_MS (pretend restoring takes this
long before READY=1), FAKE_HYDRATIOND_NO_READY=1 (never send READY=1: a negative control),
FAKE_HYDRATIOND_BREAK=no-final-commit|ignore-listen-fds|no-watchdog|no-resume (mutations, to check
by hand that each test in test_systemd.py fails when the behaviour it checks is missing).

Control protocol (stand-in only): one JSON object per line over the Unix stream socket, one reply.
"""
import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

REGION = 64 * 1024
BREAK = os.environ.get("FAKE_HYDRATIOND_BREAK", "")
COMMIT_INTERVAL = 1.0   # like the real daemon (dm-clone commits every second)
STATUS_INTERVAL = 0.25


def log(msg):
    print(f"fake-hydrationd[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def notify(*lines):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall("\n".join(lines).encode())


def parse_rate(text):
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def format_rate(bps):
    kib, mib, gib = 1024.0, 1024.0 ** 2, 1024.0 ** 3
    if bps >= gib:
        t = int(round(bps / gib * 10))
        return f"{t // 10}.{t % 10} GiB/s"
    if bps >= mib:
        return f"{int(bps / mib)} MiB/s"
    if bps >= kib:
        return f"{int(bps / kib)} KiB/s"
    return f"{int(bps)} B/s"


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Job:
    def __init__(self, state_dir, name, source, dest, rate=None, discard=False,
                 hydrated=0, state="hydrating"):
        self.state_dir = state_dir
        self.name, self.source, self.dest = name, source, dest
        self.rate, self.discard = rate, discard
        self.size = os.stat(source).st_size
        self.total = (self.size + REGION - 1) // REGION
        self.hydrated = hydrated          # regions copied (in memory)
        self.committed = hydrated         # regions recorded durably
        self.state = state if self.hydrated < self.total else "complete"
        self.src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self.dst_fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.dst_fd).st_size < self.size:
            os.ftruncate(self.dst_fd, self.size)
        self.allowance = 0.0
        self.window = []                  # (time, bytes) for throughput

    @property
    def path(self):
        return os.path.join(self.state_dir, "jobs", self.name + ".json")

    def throughput(self):
        now = time.monotonic()
        self.window = [(t, b) for t, b in self.window if now - t <= 2.0]
        if self.state != "hydrating" or not self.window:
            return 0.0
        span = max(now - self.window[0][0], 0.25)
        return sum(b for _, b in self.window) / span

    def work(self, dt):
        if self.state != "hydrating":
            return
        budget = 8 * REGION
        if self.rate:
            self.allowance = min(self.allowance + self.rate * dt, float(self.rate))
            budget = min(budget, int(self.allowance) // REGION * REGION)
        copied = 0
        while copied < budget and self.hydrated < self.total:
            off = self.hydrated * REGION
            data = os.pread(self.src_fd, REGION, off)
            os.pwrite(self.dst_fd, data, off)
            self.hydrated += 1
            copied += REGION
        if self.rate:
            self.allowance -= copied
        if copied:
            self.window.append((time.monotonic(), copied))
        if self.hydrated >= self.total:
            self.state = "complete"

    def commit(self, force=False):
        if not force and self.committed == self.hydrated and os.path.exists(self.path):
            return
        os.fdatasync(self.dst_fd)
        record = {"name": self.name, "source": self.source, "dest": self.dest, "rate": self.rate,
                  "discard": self.discard, "hydrated": self.hydrated, "state": self.state}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        self.committed = self.hydrated

    def status(self):
        return {
            "version": 1, "name": self.name, "state": self.state,
            "source": {"path": self.source, "size_bytes": self.size},
            "dest": {"path": self.dest}, "region_size": REGION,
            "regions": {"total": self.total, "hydrated": self.hydrated, "hydrating": 0},
            "bytes": {"total": self.size, "hydrated": min(self.hydrated * REGION, self.size),
                      "committed": min(self.committed * REGION, self.size),
                      "skipped_zero": 0, "discarded": 0},
            "throughput_bytes_per_second": self.throughput(),
            "discard": {"enabled": self.discard, "pending_bytes": 0, "failed": 0},
            "error": None,
        }

    def summary(self):
        pct = self.hydrated * 100 // self.total if self.total else 0
        if self.state == "hydrating":
            s = f"{self.name} hydrating {pct}%"
            tp = self.throughput()
            return s + (f" {format_rate(tp)}" if tp >= 1 else "")
        if self.state == "paused":
            return f"{self.name} paused {pct}%"
        return f"{self.name} {self.state}"


def status_line(jobs):
    if not jobs:
        return "0 jobs"
    head = "1 job: " if len(jobs) == 1 else f"{len(jobs)} jobs: "
    return head + ", ".join(j.summary() for j in jobs)


def listen_socket(path):
    """The socket-activated listener if systemd passed one, else a freshly bound one."""
    if BREAK != "ignore-listen-fds" and os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        s = socket.socket(fileno=3)
        s.set_inheritable(False)
        log(f"socket-activated, fd 3 ({s.getsockname()})")
        return s, False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    os.chmod(path, 0o660)
    s.listen(16)
    log(f"bound {path}")
    return s, True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--socket-group")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args()

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))

    listener, bound = listen_socket(args.socket)
    listener.setblocking(False)

    jobs_dir = os.path.join(args.state_dir, "jobs")
    os.makedirs(jobs_dir, exist_ok=True)
    jobs = []
    for fn in sorted(os.listdir(jobs_dir)):
        if fn.endswith(".json"):
            with open(os.path.join(jobs_dir, fn)) as f:
                r = json.load(f)
            resume_at = 0 if BREAK == "no-resume" else r["hydrated"]
            jobs.append(Job(args.state_dir, r["name"], r["source"], r["dest"], r["rate"],
                            r["discard"], resume_at, r["state"]))
            log(f"restored job {r['name']} at region {r['hydrated']}")
    time.sleep(int(os.environ.get("FAKE_HYDRATIOND_READY_DELAY_MS", "0")) / 1000)

    start = time.monotonic()
    if os.environ.get("FAKE_HYDRATIOND_NO_READY") != "1":
        notify("READY=1", "STATUS=" + status_line(jobs))
    wd_interval = None
    if os.environ.get("WATCHDOG_USEC") and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
        wd_interval = int(os.environ["WATCHDOG_USEC"]) / 2e6
    stall = os.environ.get("HYDRATIOND_TEST_WATCHDOG_STALL_AFTER_MS")
    stall_after = int(stall) / 1000 if stall else None
    log(f"ready; watchdog interval {wd_interval}, stall after {stall_after}")

    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    last = last_commit = last_status = time.monotonic()
    last_ping = None
    stalled_logged = False
    while not stop["flag"]:
        for _key, _ev in sel.select(timeout=0.05):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    handle(conn, args.state_dir, jobs)
                except Exception as e:  # a client's error never takes the daemon down
                    log(f"request failed: {e!r}")
        now = time.monotonic()
        for j in jobs:
            j.work(now - last)
        last = now
        if now - last_commit >= COMMIT_INTERVAL:
            for j in jobs:
                j.commit()
            last_commit = now
        if now - last_status >= STATUS_INTERVAL:
            notify("STATUS=" + status_line(jobs))
            last_status = now
        if wd_interval is not None and BREAK != "no-watchdog":
            if stall_after is not None and now - start >= stall_after:
                if not stalled_logged:
                    log("test stall: no more watchdog pings")
                    stalled_logged = True
            elif last_ping is None or now - last_ping >= wd_interval:
                notify("WATCHDOG=1")
                last_ping = now

    notify("STOPPING=1", "STATUS=final commit")
    for j in jobs:
        if BREAK != "no-final-commit":
            j.commit(force=True)
        log(f"final commit {j.name} hydrated={j.hydrated}/{j.total}")
    if bound:
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
    log("exit 0")
    return 0


def handle(conn, state_dir, jobs):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    req = json.loads(buf)
    method = req.get("method")
    by_name = {j.name: j for j in jobs}
    if method == "start":
        if req["name"] in by_name:
            reply = {"error": "JobExists"}
        else:
            j = Job(state_dir, req["name"], req["source"], req["dest"], parse_rate(req.get("rate_limit")),
                    bool(req.get("discard_source")))
            j.commit(force=True)
            jobs.append(j)
            reply = {"status": j.status()}
    elif method == "status":
        j = by_name.get(req.get("name"))
        reply = {"status": j.status()} if j else {"error": "NoSuchJob"}
    elif method == "list":
        reply = {"jobs": [j.status() for j in jobs]}
    else:
        reply = {"error": "MethodNotImplemented"}
    conn.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
