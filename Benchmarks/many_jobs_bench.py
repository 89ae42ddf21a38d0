#!/usr/bin/python3
"""Many jobs in one daemon: what thousands of small jobs cost (descriptors, threads, memory,
latency of the control socket, restart time).

Creates N jobs of SIZE-byte images on tmpfs, under a daemon started with a soft descriptor limit
of 1024 (systemd's default; the daemon raises it to the hard limit), and measures:

1. create: per-job latency of Start (created with no_hydration, so nothing copies yet), then Pause
   of each (a paused job is closed: it holds no descriptor);
2. with N paused jobs: List and GetStatus latency (median/p99 of 20), RSS, descriptors, threads;
3. resume all, wait until all are complete (complete jobs are closed too): the same figures;
4. restart (SIGTERM, start again): time until the socket answers, and until List shows all N
   jobs; the same figures after it.

    sudo python3 Benchmarks/many_jobs_bench.py --jobs 2000            # .build/release if built
    sudo python3 Benchmarks/many_jobs_bench.py --jobs 200 --bin .build/debug

Not a test and not part of CI. Writes Benchmarks/results/DATE-many-jobs.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IFACE = "org.hydrationd.Control"


def call(sock, method, params=None, timeout=120.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        msg = {"method": method if "." in method else f"{IFACE}.{method}", "parameters": params or {}}
        s.sendall(json.dumps(msg).encode() + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
    finally:
        s.close()
    reply = json.loads(buf.split(b"\0", 1)[0])
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']} {reply.get('parameters')}")
    return reply.get("parameters", {})


def proc_figures(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"rss_mib": round(rss / (1 << 20), 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def latency(fn, n=20):
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
    xs.sort()
    return {"median_ms": round(statistics.median(xs), 2), "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 2)}


def wait(what, pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes per image (default 1 MiB)")
    ap.add_argument("--bin", default=None, help="directory with hydrationd (default .build/release, else .build/debug)")
    ap.add_argument("--dir", default="/dev/shm", help="tmpfs for the images (default /dev/shm)")
    args = ap.parse_args()
    bindir = Path(args.bin) if args.bin else (REPO / ".build/release" if (REPO / ".build/release/hydrationd").exists() else REPO / ".build/debug")
    hyd = str(bindir / "hydrationd")
    work = Path(tempfile.mkdtemp(prefix="many-jobs-", dir=args.dir))
    state, sock, nbd = work / "state", str(work / "c.sock"), str(work / "n.sock")
    (work / "img").mkdir()
    log = open(work / "daemon.log", "ab")
    hard = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    cmd = ["prlimit", f"--nofile=1024:{hard}", hyd, "--state-dir", str(state), "--socket", sock, "--nbd-socket", nbd,
           "--log-level", "warning"]
    rows = []
    proc = None

    def start():
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        t0 = time.perf_counter()

        def up():
            if p.poll() is not None:
                raise SystemExit(f"hydrationd exited with {p.returncode}; log in {work}/daemon.log")
            try:
                call(sock, "org.varlink.service.GetInfo", timeout=5)
                return True
            except (OSError, EOFError, RuntimeError):
                return False
        wait("the socket", up, 600)
        return p, time.perf_counter() - t0

    try:
        proc, _ = start()
        base = proc_figures(proc.pid)
        rows.append(("empty daemon", base, {}))
        data = os.urandom(args.size)
        creates = []
        t_all = time.perf_counter()
        for i in range(args.jobs):
            src = work / "img" / f"s{i}"
            src.write_bytes(data)
            t = time.perf_counter()
            call(sock, "Start", {"name": f"j{i}", "source": str(src), "dest": str(work / "img" / f"d{i}"),
                                 "region_size": 64 * 1024, "no_hydration": True})
            call(sock, "Pause", {"name": f"j{i}"})
            creates.append((time.perf_counter() - t) * 1000)
        create_total = time.perf_counter() - t_all
        creates.sort()
        create = {"jobs": args.jobs, "total_s": round(create_total, 1),
                  "start+pause median_ms": round(statistics.median(creates), 1),
                  "p99_ms": round(creates[int(len(creates) * 0.99) - 1], 1), "max_ms": round(creates[-1], 1)}
        rows.append((f"{args.jobs} paused", proc_figures(proc.pid),
                     {"List": latency(lambda: call(sock, "List")), "GetStatus": latency(lambda: call(sock, "GetStatus", {"name": "j0"}))}))

        t = time.perf_counter()
        for i in range(args.jobs):
            call(sock, "Resume", {"name": f"j{i}"})
        resume_s = time.perf_counter() - t

        def all_complete():
            return all(j["state"] == "complete" for j in call(sock, "List")["jobs"])
        wait("every job complete", all_complete, 3600)
        complete_s = time.perf_counter() - t
        # Complete jobs are closed when the daemon notices the state change (within a tick).
        time.sleep(2)
        rows.append((f"{args.jobs} complete", proc_figures(proc.pid),
                     {"List": latency(lambda: call(sock, "List")), "GetStatus": latency(lambda: call(sock, "GetStatus", {"name": "j0"}))}))

        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=600)
        stop_s = time.perf_counter() - t
        proc, up_s = start()
        t = time.perf_counter()
        wait("List to show every job", lambda: len(call(sock, "List")["jobs"]) == args.jobs, 600)
        listed_s = up_s + (time.perf_counter() - t)
        rows.append((f"{args.jobs} complete, after restart", proc_figures(proc.pid),
                     {"List": latency(lambda: call(sock, "List")), "GetStatus": latency(lambda: call(sock, "GetStatus", {"name": "j0"}))}))
        with open(f"/proc/{proc.pid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
    finally:
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
        shutil.rmtree(work, ignore_errors=True)

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = [f"# Many jobs: {args.jobs} jobs of {args.size} bytes on tmpfs",
           "", f"Build {bindir.name} at {rev}; {os.cpu_count()} CPUs; daemon started with soft limit 1024, "
           f"hard {hard} (soft raised at start to {soft}).", "",
           f"- create: {create}",
           f"- resume of all: {resume_s:.1f} s; all complete after {complete_s:.1f} s",
           f"- stop (SIGTERM, final commits) {stop_s:.1f} s, exit {rc}; restart: socket answers after {up_s:.2f} s, "
           f"List shows all {args.jobs} after {listed_s:.2f} s", "",
           "| state | RSS MiB | descriptors | threads | List median / p99 ms | GetStatus median / p99 ms |",
           "|---|---|---|---|---|---|"]
    for name, fig, lat in rows:
        l, g = lat.get("List", {}), lat.get("GetStatus", {})
        out.append(f"| {name} | {fig['rss_mib']} | {fig['fds']} | {fig['threads']} | "
                   f"{l.get('median_ms', '-')} / {l.get('p99_ms', '-')} | {g.get('median_ms', '-')} / {g.get('p99_ms', '-')} |")
    text = "\n".join(out) + "\n"
    print(text)
    res = REPO / "Benchmarks" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-many-jobs.md")
    res.write_text(text)


if __name__ == "__main__":
    main()
