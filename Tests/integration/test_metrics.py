"""Prometheus metrics (`hydrationd --metrics-listen`) against a real daemon, Debian's promtool and a
real Prometheus server.

Each test starts its own hydrationd (private socket, state directory and a free TCP port on
127.0.0.1) and stops it by PID. Jobs are held still so that the numbers compared do not move: one
runs to completion (its hydrated bytes are its size), one is started with --no-hydration.
promtool and prometheus come from Debian's `prometheus` package (Scripts/install-deps.sh --test).
Run: python3 -m pytest -q Tests/integration/test_metrics.py
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("HYDRATION_BIN_DIR", REPO / ".build" / "debug"))
CLONECTL = BIN / "clonectl"
HYDRATIOND = BIN / "hydrationd"
MiB = 1 << 20
# Liveness guards only: what is awaited is said when one expires.
DEADLINE = 90.0

if not (CLONECTL.exists() and HYDRATIOND.exists()):
    pytest.skip(f"clonectl/hydrationd not built in {BIN} (run swift build)", allow_module_level=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def image(path, size, seed=1):
    with open(path, "wb") as f:
        f.write(bytes((seed + i) % 251 for i in range(4096)) * (size // 4096))
    return str(path)


def blank(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


class Daemon:
    def __init__(self, tmp, port):
        self.tmp = Path(tmp)
        self.port = port
        self.socket = str(self.tmp / "control.sock")
        self.log = self.tmp / "hydrationd.log"
        self.proc = None

    def start(self, *extra):
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(HYDRATIOND), "--state-dir", str(self.tmp / "state"), "--socket", self.socket,
             "--nbd-socket", str(self.tmp / "nbd.sock"), "--metrics-listen", f"127.0.0.1:{self.port}", *extra],
            stdout=logf, stderr=logf)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"hydrationd exited: {self.log.read_text()}"
            if os.path.exists(self.socket) and self.run("list").returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError(f"hydrationd did not answer on its socket in {DEADLINE}s: {self.log.read_text()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def run(self, *args):
        env = dict(os.environ, HYDRATION_SOCKET=self.socket)
        return subprocess.run([str(CLONECTL), *args], capture_output=True, text=True, timeout=120, env=env)

    def ok(self, *args):
        r = self.run(*args)
        assert r.returncode == 0, f"clonectl {' '.join(args)}: {r.stdout}{r.stderr}"
        return r

    def status(self, name):
        return json.loads(self.ok("status", name, "--json").stdout)

    def scrape(self, path="/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return r.read().decode()


def samples(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (Scripts/install-deps.sh --test)")
    return path


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, free_port()).start()
    yield d
    d.stop()


def held_jobs(d, tmp_path):
    """`done`: complete (hydrated = its size); `held`: created with --no-hydration (hydrated 0);
    `part`: hydrating at 256 KiB/s (over 4 minutes for its 64 MiB), with at least one commit: the
    engine's own counters (commit durations, bytes copied) are those of open, running jobs."""
    d.ok("start", "done", "--source", image(tmp_path / "a.src", 4 * MiB), "--dest", blank(tmp_path / "a.dst", 4 * MiB))
    d.ok("wait", "done", "--timeout", "120s")
    d.ok("start", "held", "--source", image(tmp_path / "b.src", 8 * MiB, seed=7),
         "--dest", blank(tmp_path / "b.dst", 8 * MiB), "--no-hydration")
    d.ok("start", "part", "--source", image(tmp_path / "c.src", 64 * MiB, seed=3),
         "--dest", blank(tmp_path / "c.dst", 64 * MiB), "--region-size", "64K", "--rate-limit", "256K",
         "--commit-interval", "100ms")
    deadline = time.monotonic() + DEADLINE
    while d.status("part")["commits"]["count"] < 1:
        assert time.monotonic() < deadline, f"no commit of job part after {DEADLINE}s: {d.status('part')}"
        time.sleep(0.05)


def test_metrics_match_status_and_pass_promtool(daemon, tmp_path):
    held_jobs(daemon, tmp_path)
    text = daemon.scrape()
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", \
        f"promtool check metrics:\n{check.stdout}{check.stderr}\n--- exposition:\n{text}"
    m = samples(text)
    for name in ("done", "held"):
        s = daemon.status(name)
        assert m[f'hydrationd_job_hydrated_bytes{{job="{name}"}}'] == s["bytes"]["hydrated"], (name, s["bytes"])
        assert m[f'hydrationd_job_committed_bytes{{job="{name}"}}'] == s["bytes"]["committed"], (name, s["bytes"])
        assert m[f'hydrationd_job_size_bytes{{job="{name}"}}'] == s["bytes"]["total"], (name, s["bytes"])
        assert m[f'hydrationd_job_state{{job="{name}",state="{s["state"]}"}}'] == 1.0
    assert m['hydrationd_job_hydrated_bytes{job="done"}'] == 4 * MiB
    assert m['hydrationd_job_hydrated_bytes{job="held"}'] == 0
    assert m['hydrationd_jobs{state="complete"}'] == 1.0
    # The engine's counters of a running job reach the exposition: its commits are in the
    # histogram (read just after the status, so a commit in between may add one), and the copier
    # has written bytes.
    assert m['hydrationd_job_state{job="part",state="hydrating"}'] == 1.0
    commits = m['hydrationd_job_commits_total{job="part"}']
    assert commits >= 1
    assert m['hydrationd_job_commit_duration_seconds_count{job="part"}'] >= commits
    assert m['hydrationd_job_commit_duration_seconds_bucket{job="part",le="+Inf"}'] == \
        m['hydrationd_job_commit_duration_seconds_count{job="part"}']
    assert m['hydrationd_job_copied_bytes_total{job="part"}'] > 0

    # Any other path is 404, and a removed job's series disappear.
    with pytest.raises(urllib.error.HTTPError) as e:
        daemon.scrape("/")
    assert e.value.code == 404
    daemon.ok("remove", "held", "--force")
    after = daemon.scrape()
    assert 'job="held"' not in after, after
    assert 'job="done"' in after


def test_busy_metrics_port_is_a_named_error(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        d = Daemon(tmp_path, busy.getsockname()[1])
        with pytest.raises(AssertionError):
            d.start()
        d.proc.wait(timeout=60)
        assert d.proc.returncode == 1
        log = d.log.read_text()
        assert "MetricsListenFailed: cannot listen for metrics on 127.0.0.1:" in log, log
        # Refused before any job or socket was opened.
        assert not os.path.exists(d.socket)
    finally:
        busy.close()


def test_real_prometheus_scrapes_the_daemon(daemon, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: install Debian's prometheus package (Scripts/install-deps.sh --test)")
    held_jobs(daemon, tmp_path)
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: hydrationd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.port}']\n")
    log = open(tmp_path / "prometheus.log", "ab")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=log, stderr=log)
    try:
        want = daemon.status("done")["bytes"]["hydrated"]
        # Prometheus sets `job` to the scrape job's name: the daemon's own label becomes
        # `exported_job` (unless the scrape config says honor_labels: true; docs/operations.md).
        query_any = urllib.parse.quote("hydrationd_job_hydrated_bytes")
        seen = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/query?query={query_any}", timeout=30) as r:
                    seen = json.load(r)
            except (urllib.error.URLError, ConnectionError):
                seen = None
            results = (seen or {}).get("data", {}).get("result", [])
            if len(results) == 3:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus had not scraped the three jobs after 120 s: {seen}")
        assert seen["status"] == "success"
        by_job = {r["metric"]["exported_job"]: float(r["value"][1]) for r in seen["data"]["result"]}
        # `part` is still hydrating: its value moves between the scrape and the query.
        del by_job["part"]
        assert by_job == {"done": float(want), "held": float(daemon.status("held")["bytes"]["hydrated"])}, by_job
        assert all(r["metric"]["job"] == "hydrationd" for r in seen["data"]["result"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_example_alert_rules_pass_promtool():
    rules = REPO / "packaging" / "prometheus" / "hydrationd-alerts.yml"
    r = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
    # And they fire on the series they are written for (a stalled job, a failed one, a release
    # lagging), not on a job that moves: promtool's rule unit tests.
    tests = REPO / "packaging" / "prometheus" / "hydrationd-alerts.test.yml"
    r = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_systemd_drop_in_verifies(tmp_path):
    """The metrics drop-in applied to the shipped unit passes `systemd-analyze verify`, and its
    ExecStart keeps the endpoint on loopback."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    packaging = REPO / "packaging" / "systemd"
    # verify checks that ExecStart's binary exists: point both at the daemon under test.
    (tmp_path / "hydrationd.service").write_text(
        (packaging / "hydrationd.service").read_text().replace("/usr/local/bin/hydrationd", str(HYDRATIOND)))
    dropin = (packaging / "hydrationd-metrics.conf").read_text()
    assert "--metrics-listen 127.0.0.1:" in dropin
    (tmp_path / "hydrationd.service.d").mkdir()
    (tmp_path / "hydrationd.service.d" / "metrics.conf").write_text(
        dropin.replace("/usr/local/bin/hydrationd", str(HYDRATIOND)))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "hydrationd.service")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
