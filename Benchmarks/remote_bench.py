#!/usr/bin/env python3
"""Remote source benchmark (issue 15): hydrationd with an NBD source against `nbdcopy nbd://… DEST`
on the same served image.

nbdkit serves each image (`file` plugin) on 127.0.0.1; with --delay, through
`--filter=delay rdelay=5ms` (every read request waits 5 ms: a distant host). Both copiers read the
same export; before each timed run the page cache is dropped (root) so the server reads from
disk both times. Images: dense (random data) and holes (1 MiB runs alternating data and holes).
Each configuration runs --reps times; the median wall time is reported, and every destination is
compared with the image.

    sudo python3 Benchmarks/remote_bench.py                  # 1 GiB images, 3 runs each
    sudo python3 Benchmarks/remote_bench.py --size 256M --reps 1

Not a test and not part of CI. Uses the release binaries (.build/release, `swift build -c release`).
"""

from __future__ import annotations

import argparse
import hashlib
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

MiB, GiB = 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parent.parent


def parse_size(s: str) -> int:
    for suffix, mult in (("G", GiB), ("M", MiB), ("K", 1024)):
        if s.upper().endswith(suffix):
            return int(float(s[:-1]) * mult)
    return int(s)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def write_image(path: Path, kind: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        i = 0
        while off < size:
            n = min(MiB, size - off)
            if kind == "dense" or i % 2 == 0:
                data = os.urandom(n)
                f.seek(off)
                f.write(data)
                h.update(data)
            else:
                h.update(b"\0" * n)
            off += n
            i += 1
    return h.hexdigest()


def digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            b = f.read(min(8 * MiB, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    if left:
        h.update(b"\0" * left)
    return h.hexdigest()


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass


class Server:
    def __init__(self, image: Path, delay: bool):
        self.port = free_port()
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(self.port)]
        if delay:
            cmd += ["--filter=delay"]
        cmd += ["file", str(image)]
        if delay:
            cmd += ["rdelay=5ms"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nbdkit did not start")

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def run_nbdcopy(uri: str, dst: Path, size: int) -> float:
    with open(dst, "wb") as f:
        f.truncate(size)
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", uri, str(dst)], check=True)
    return time.monotonic() - t0


def run_hydrationd(bin_dir: Path, work: Path, uri: str, dst: Path, extra: list[str]) -> float:
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    sock = work / "hyd.sock"
    log = open(work / "hydrationd.log", "ab")
    d = subprocess.Popen([str(bin_dir / "hydrationd"), "--state-dir", str(state), "--socket", str(sock),
                          "--log-level", "warning"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 20
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        ctl = [str(bin_dir / "clonectl"), "--socket", str(sock)]
        drop_caches()
        t0 = time.monotonic()
        subprocess.run(ctl + ["start", "b", "--source", uri, "--dest", str(dst), "--commit-interval", "1s", *extra],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(ctl + ["wait", "b"], check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - t0
    finally:
        d.send_signal(signal.SIGKILL)
        d.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=GiB)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", default="dense,holes")
    ap.add_argument("--delays", default="0,5", help="read delays in ms to measure (0 and/or 5)")
    ap.add_argument("--data-dir", default="/var/tmp/hyd-remote-bench")
    ap.add_argument("--bin-dir", default=os.environ.get("HYDRATION_BIN_DIR", str(REPO / ".build" / "release")))
    ap.add_argument("--hyd-args", default="", help="extra clonectl start options")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.data_dir)
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(args.bin_dir)
    results = []
    try:
        for kind in args.images.split(","):
            img = work / f"{kind}.img"
            want = write_image(img, kind, args.size)
            for delay in [int(x) for x in args.delays.split(",")]:
                srv = Server(img, delay > 0)
                try:
                    times = {"nbdcopy": [], "hydrationd": []}
                    for rep in range(args.reps):
                        for tool in ("nbdcopy", "hydrationd"):
                            dst = work / "dst.img"
                            if dst.exists():
                                dst.unlink()
                            if tool == "nbdcopy":
                                t = run_nbdcopy(srv.uri, dst, args.size)
                            else:
                                t = run_hydrationd(bin_dir, work, srv.uri, dst, args.hyd_args.split())
                            ok = digest(dst, args.size) == want
                            if not ok:
                                raise SystemExit(f"{tool} {kind} delay={delay}: destination differs from the image")
                            times[tool].append(t)
                            print(f"{kind:6} delay={delay}ms {tool:10} run {rep + 1}: {t:7.3f} s "
                                  f"({args.size / t / MiB:7.1f} MiB/s)", flush=True)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    row = {"image": kind, "delay_ms": delay, "size": args.size,
                           "nbdcopy_s": med["nbdcopy"], "hydrationd_s": med["hydrationd"],
                           "nbdcopy_mib_s": args.size / med["nbdcopy"] / MiB,
                           "hydrationd_mib_s": args.size / med["hydrationd"] / MiB,
                           "time_ratio": med["hydrationd"] / med["nbdcopy"],
                           "throughput_ratio": med["nbdcopy"] / med["hydrationd"], "runs": times}
                    results.append(row)
                    print(f"== {kind} delay={delay}ms: nbdcopy {row['nbdcopy_mib_s']:.0f} MiB/s, hydrationd "
                          f"{row['hydrationd_mib_s']:.0f} MiB/s, time ratio {row['time_ratio']:.2f}x", flush=True)
                finally:
                    srv.stop()
            img.unlink()
    finally:
        for f in ("dst.img",):
            try:
                (work / f).unlink()
            except OSError:
                pass
    print("\n| image | delay | nbdcopy | hydrationd | time ratio (hyd/nbdcopy) | throughput vs nbdcopy |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['image']} | {r['delay_ms']} ms | {r['nbdcopy_mib_s']:.0f} MiB/s | {r['hydrationd_mib_s']:.0f} MiB/s "
              f"| {r['time_ratio']:.2f}x | {r['throughput_ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
