#!/usr/bin/python3
"""Live-clone benchmark (issue 12): hydrationd's NBD export of a job's clone against `nbdkit file`
serving the same image, in the same run, on the same machine.

1. Sequential read with nbdcopy (to null:), page cache dropped before each run:
   - nbdkit file SOURCE (the reference);
   - the export of a job created with --no-hydration (every region from the source);
   - the export of the same job once complete (every region from the destination).
2. 4 KiB random reads (libnbd, one connection, queue depth 1), latency p50/p99/max:
   - the export, job idle (--no-hydration);
   - the export while the job hydrates at full speed (copier and client at once).
3. The hydration rate: alone, and while nbdcopy streams the export to null: in a loop.

    sudo /usr/bin/python3 Benchmarks/live_clone_bench.py             # 2 GiB dense image
    sudo /usr/bin/python3 Benchmarks/live_clone_bench.py --size 256M # quick

Needs Debian's python (the libnbd binding: python3-libnbd), nbdkit, libnbd-bin, a release build
(`swift build -c release`). Not a test and not part of CI. Writes a markdown table to
Benchmarks/results/DATE-live-clone.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd  # python3-libnbd

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(s):
    for suf, m in (("G", GiB), ("M", MiB), ("K", KiB)):
        if s.upper().rstrip("IB").endswith(suf):
            return int(float(s.upper().rstrip("IB")[:-1]) * m)
    return int(s)


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def make_dense(path, size, seed=7):
    rnd = random.Random(seed)
    block = bytes(rnd.getrandbits(8) for _ in range(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            # A different MiB each time (cheap: rotate the block).
            k = (i * 7919) % MiB
            f.write(block[k:] + block[:k])
        f.flush()
        os.fsync(f.fileno())


def wait_socket(path, timeout=15):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


class Daemon:
    def __init__(self, tmp, bin_dir):
        self.tmp = tmp
        self.bin = bin_dir
        self.sock = os.path.join(tmp, "control.sock")
        self.nbd_sock = os.path.join(tmp, "nbd.sock")
        self.proc = subprocess.Popen([os.path.join(bin_dir, "hydrationd"), "--state-dir", os.path.join(tmp, "state"),
                                      "--socket", self.sock, "--nbd-socket", self.nbd_sock, "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "d.log"), "ab"))
        wait_socket(self.sock)
        wait_socket(self.nbd_sock)

    def ctl(self, *args, check=True):
        r = subprocess.run([os.path.join(self.bin, "clonectl"), "--socket", self.sock, *args],
                           capture_output=True, text=True, timeout=600)
        if check and r.returncode != 0:
            raise RuntimeError(f"clonectl {' '.join(args)}: {r.stderr}")
        return r

    def status(self, name):
        return json.loads(self.ctl("status", name, "--json").stdout)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def nbdcopy_read(uri):
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.monotonic() - t0


def random_reads(uri, size, count, seed=1):
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(seed)
    lat = []
    for _ in range(count):
        off = rnd.randrange(0, size // 4096) * 4096
        t0 = time.perf_counter()
        h.pread(4096, off)
        lat.append((time.perf_counter() - t0) * 1000)
    h.shutdown()
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)], "max_ms": lat[-1], "n": len(lat)}


def hydrate(d, name, src, dst, export, extra=()):
    args = ["start", name, "--source", src, "--dest", dst] + (["--export"] if export else []) + list(extra)
    d.ctl(*args)


def wait_complete(d, name, timeout=600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = d.status(name)
        if st["state"] == "complete":
            return st
        if st["state"] == "failed":
            raise RuntimeError(st)
        time.sleep(0.05)
    raise RuntimeError("timeout")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=2 * GiB)
    ap.add_argument("--data-dir", default="/work/bench-data")
    ap.add_argument("--bin-dir", default=str(REPO / ".build" / "release"))
    ap.add_argument("--reads", type=int, default=3000, help="4 KiB random reads per latency run")
    ap.add_argument("--results-dir", default=str(REPO / "Benchmarks" / "results"))
    args = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install nbdkit libnbd-bin)")
    os.makedirs(args.data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="live-bench-", dir=args.data_dir)
    src = os.path.join(tmp, "src.img")
    print(f"image: {args.size >> 20} MiB dense random in {tmp}", flush=True)
    make_dense(src, args.size)
    rows = []
    results = {"size": args.size}

    # 1. Sequential read: nbdkit file vs the export (all from the source), then all from the dest.
    ksock = os.path.join(tmp, "nbdkit.sock")
    kit = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "file", src], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = None
    try:
        wait_socket(ksock)
        kit_s = [nbdcopy_read(f"nbd+unix:///?socket={ksock}") for _ in range(2)]
        kit.terminate()
        kit.wait()
        d = Daemon(tmp, args.bin_dir)
        dst = os.path.join(tmp, "dst.img")
        hydrate(d, "seq", src, dst, True, ["--no-hydration"])
        uri = d.status("seq")["export"]["uri"]
        src_s = [nbdcopy_read(uri) for _ in range(2)]
        idle_lat = random_reads(uri, args.size, args.reads)
        d.ctl("resume", "seq")
        wait_complete(d, "seq")
        dst_s = [nbdcopy_read(uri) for _ in range(2)]
        best_kit = min(kit_s)
        results["seq"] = {"nbdkit_file_s": kit_s, "export_from_source_s": src_s, "export_from_dest_s": dst_s}
        rows.append(("nbdcopy read, nbdkit file (reference)", f"{best_kit:.2f} s", f"{args.size / best_kit / MiB:.0f} MiB/s", "1.00x"))
        rows.append(("nbdcopy read, export, nothing hydrated", f"{min(src_s):.2f} s", f"{args.size / min(src_s) / MiB:.0f} MiB/s",
                     f"{best_kit / min(src_s):.2f}x of nbdkit's throughput"))
        rows.append(("nbdcopy read, export, complete", f"{min(dst_s):.2f} s", f"{args.size / min(dst_s) / MiB:.0f} MiB/s",
                     f"{best_kit / min(dst_s):.2f}x of nbdkit's throughput"))
        d.ctl("remove", "seq")
        os.remove(dst)

        # 2 + 3. Hydration alone, then with a client: random reads, and a streaming reader.
        dst2 = os.path.join(tmp, "dst2.img")
        drop_caches()
        t0 = time.monotonic()
        hydrate(d, "alone", src, dst2, True)
        wait_complete(d, "alone")
        alone_s = time.monotonic() - t0
        d.ctl("remove", "alone")
        os.remove(dst2)

        drop_caches()
        t0 = time.monotonic()
        hydrate(d, "lat", src, dst2, True)
        uri = d.status("lat")["export"]["uri"]
        busy_lat = random_reads(uri, args.size, args.reads)
        busy_state = d.status("lat")
        wait_complete(d, "lat")
        lat_s = time.monotonic() - t0
        d.ctl("remove", "lat")
        os.remove(dst2)

        drop_caches()
        stop = threading.Event()
        t0 = time.monotonic()
        hydrate(d, "stream", src, dst2, True)
        uri = d.status("stream")["export"]["uri"]
        streamed = [0]

        def streamer():
            while not stop.is_set():
                subprocess.run(["nbdcopy", uri, "null:"], check=False)
                streamed[0] += 1
        th = threading.Thread(target=streamer)
        th.start()
        wait_complete(d, "stream")
        stream_s = time.monotonic() - t0
        stop.set()
        th.join()
        d.ctl("remove", "stream")
        results.update({"hydration_alone_s": alone_s, "hydration_with_random_reads_s": lat_s,
                        "hydration_with_streaming_reader_s": stream_s, "idle_latency": idle_lat,
                        "hydrating_latency": busy_lat, "hydrated_fraction_after_reads":
                        busy_state["bytes"]["hydrated"] / busy_state["bytes"]["total"]})
        rows.append(("4 KiB random read, job idle", f"p50 {idle_lat['p50_ms']:.3f} ms", f"p99 {idle_lat['p99_ms']:.3f} ms", f"max {idle_lat['max_ms']:.1f} ms"))
        rows.append(("4 KiB random read, hydrating at full speed", f"p50 {busy_lat['p50_ms']:.3f} ms", f"p99 {busy_lat['p99_ms']:.3f} ms", f"max {busy_lat['max_ms']:.1f} ms"))
        rows.append(("hydration alone", f"{alone_s:.2f} s", f"{args.size / alone_s / MiB:.0f} MiB/s", "1.00x"))
        rows.append(("hydration with a 4 KiB random reader", f"{lat_s:.2f} s", f"{args.size / lat_s / MiB:.0f} MiB/s", f"{alone_s / lat_s:.2f}x of alone"))
        rows.append(("hydration with nbdcopy streaming the export", f"{stream_s:.2f} s", f"{args.size / stream_s / MiB:.0f} MiB/s",
                     f"{alone_s / stream_s:.2f}x of alone ({streamed[0]} reader passes started)"))
    finally:
        if kit.poll() is None:
            kit.terminate()
        if d:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = [f"# Live clone benchmark {stamp}", "", f"Image: {args.size >> 20} MiB dense random; release build; page cache dropped before each sequential read and hydration.", "",
          "| what | time / latency | rate | ratio |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    md += ["", "```json", json.dumps(results, indent=1), "```", ""]
    text = "\n".join(md)
    print(text)
    os.makedirs(args.results_dir, exist_ok=True)
    Path(args.results_dir, f"{stamp}-live-clone.md").write_text(text)


if __name__ == "__main__":
    main()
