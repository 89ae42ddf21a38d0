#!/usr/bin/python3
"""Control-plane latency under load: how long a `GetStatus` call on the control socket and a full
NBD handshake on the export socket take while (a) the daemon is idle, (b) a job copies at full
speed, (c) the same copy runs while `stress-ng --cpu N` keeps every core busy, and (d) the idle
daemon under the same CPU hog. The daemon's socket servers, its actors and the copy must not starve
each other: a control call or a handshake that waits for seconds under load is the failure this
measures.

    sudo /usr/bin/python3 Benchmarks/control_latency_bench.py              # 1 GiB image, 300 calls each
    sudo /usr/bin/python3 Benchmarks/control_latency_bench.py --size 256M --calls 100

Needs Debian's python (python3-libnbd), stress-ng, a build of hydrationd and clonectl (release by
default, `--bin-dir .build/debug` for a debug build). Not a test and not part of CI. Prints a
markdown table and writes it to Benchmarks/results/DATE-control-latency.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd  # python3-libnbd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_clone_bench import Daemon, make_dense, parse_size, wait_socket  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def varlink_call(sock_path: str, method: str, params: dict, timeout: float = 60) -> dict:
    """One Varlink call on a fresh connection (what clonectl does): NUL-terminated JSON."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    s.close()
    reply = json.loads(buf[:-1])
    if "error" in reply:
        raise RuntimeError(reply)
    return reply["parameters"]


def percentiles(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max_ms": lat[-1], "n": len(lat)}


def measure(d: Daemon, uri: str, calls: int, copy=None) -> tuple[dict, dict, int]:
    """`calls` GetStatus calls and NBD handshakes, alternating. With `copy` (a callable that starts
    a fresh copy job and returns its name), a copy runs the whole time: each one that completes is
    replaced. Returns the two latency summaries and the number of copies run."""
    status, handshake = [], []
    copies = 0
    current = None
    if copy:
        current, copies = copy(), 1
    for _ in range(calls):
        t0 = time.perf_counter()
        reply = varlink_call(d.sock, "org.hydrationd.Control.GetStatus", {})
        status.append((time.perf_counter() - t0) * 1000)
        if copy:
            state = next((j["state"] for j in reply["jobs"] if j["name"] == current), None)
            if state != "hydrating":
                d.ctl("remove", current, "--force", check=False)
                current, copies = copy(), copies + 1
        t0 = time.perf_counter()
        h = nbd.NBD()
        h.connect_uri(uri)  # the whole fixed-newstyle handshake, OPT_GO included
        h.get_size()
        h.shutdown()
        handshake.append((time.perf_counter() - t0) * 1000)
        del h
    if current:
        d.ctl("remove", current, "--force", check=False)
    return percentiles(status), percentiles(handshake), copies


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="stress-ng --cpu workers")
    ap.add_argument("--data-dir", default="/var/tmp")
    ap.add_argument("--bin-dir", default=str(REPO / ".build" / "release"))
    ap.add_argument("--results-dir", default=str(REPO / "Benchmarks" / "results"))
    args = ap.parse_args()
    if not shutil.which("stress-ng"):
        sys.exit("stress-ng is missing (apt-get install stress-ng)")
    tmp = tempfile.mkdtemp(prefix="ctl-latency-", dir=args.data_dir)
    src = os.path.join(tmp, "src.img")
    make_dense(src, args.size)
    d = Daemon(tmp, args.bin_dir)
    hog = None
    rows = []
    try:
        # An exported job held idle (--no-hydration) serves the handshakes in every phase.
        d.ctl("start", "idle", "--source", src, "--dest", os.path.join(tmp, "idle.img"), "--export", "--no-hydration")
        uri = d.status("idle")["export"]["uri"]

        copy_src = os.path.join(tmp, "copy-src.img")
        shutil.copyfile(src, copy_src)
        serial = iter(range(1_000_000))

        def copy_job() -> str:
            # The copy the load phases run beside: as fast as the machine goes.
            name = f"copy-{next(serial)}"
            dst = os.path.join(tmp, "copy-dst.img")
            if os.path.exists(dst):
                os.remove(dst)
            d.ctl("start", name, "--source", copy_src, "--dest", dst)
            return name

        def phase(label: str, copying: bool, hogged: bool) -> None:
            nonlocal hog
            if hogged:
                hog = subprocess.Popen(["stress-ng", "--cpu", str(args.hogs), "--timeout", "3600s"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            st, hs, copies = measure(d, uri, args.calls, copy_job if copying else None)
            rows.append((label, st, hs, copies))
            if hog:
                hog.terminate()
                hog.wait()
                hog = None

        phase("idle", False, False)
        phase("copy at full speed", True, False)
        phase(f"copy + stress-ng --cpu {args.hogs}", True, True)
        phase(f"idle + stress-ng --cpu {args.hogs}", False, True)
    finally:
        if hog:
            hog.terminate()
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"# Control-plane latency under load ({time.strftime('%Y-%m-%d %H:%M')}, {args.size >> 20} MiB dense image, "
             f"{args.calls} calls each, {os.cpu_count()} cores, binaries {args.bin_dir})", "",
             "| phase | GetStatus p50 / p99 / max (ms) | NBD handshake p50 / p99 / max (ms) | copies run meanwhile |",
             "|---|---|---|---|"]
    for label, st, hs, copies in rows:
        lines.append(f"| {label} | {st['p50_ms']:.2f} / {st['p99_ms']:.2f} / {st['max_ms']:.2f} | "
                     f"{hs['p50_ms']:.2f} / {hs['p99_ms']:.2f} / {hs['max_ms']:.2f} | {copies or '-'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.results_dir, exist_ok=True)
    Path(args.results_dir, time.strftime("%Y%m%d-%H%M%S") + "-control-latency.md").write_text(text)


if __name__ == "__main__":
    main()
