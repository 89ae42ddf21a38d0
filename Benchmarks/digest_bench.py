#!/usr/bin/env python3
"""`clonectl digest` (hyd1:, docs/digest.md) against sha256sum and b3sum on the benchmark images
(bench.py's dense, holes and zeros kinds), in one run, rounds interleaved so that the machine's
load falls on every tool alike. Per image and tool: median, min and max wall time over --runs
runs, CPU seconds, and the ratio of medians to sha256sum's; cold (the image's pages dropped with
POSIX_FADV_DONTNEED before each run; not the global drop_caches, which would disturb other users
of the machine) and warm (the image in the page cache).

    python3 Benchmarks/digest_bench.py                       # 1 GiB images, 3 runs
    python3 Benchmarks/digest_bench.py --size 64M --runs 1   # smoke

Needs .build/release/clonectl (swift build -c release --product clonectl); b3sum from Debian's
package of that name, skipped when missing. Not a test and not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, human, parse_size, write_image  # noqa: E402


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def run_one(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU (user + system) seconds of one run, and the digest it printed."""
    t0 = time.monotonic()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ,
                          file_actions=[(os.POSIX_SPAWN_OPEN, 1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)])
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} exited {os.waitstatus_to_exitcode(status)}")
    with open(out_path) as f:
        digest = f.read().split()[0]
    return wall, ru.ru_utime + ru.ru_stime, digest


def main() -> None:
    global out_path
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="dense,holes,zeros")
    ap.add_argument("--data-dir", help="where the images go (default: a new directory under /var/tmp)")
    ap.add_argument("--bin-dir", default=str(REPO / ".build" / "release"))
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()

    clonectl = os.path.join(args.bin_dir, "clonectl")
    if not os.path.exists(clonectl):
        sys.exit(f"{clonectl} not built: swift build -c release --product clonectl")
    tools = {"clonectl digest": [clonectl, "digest"], "sha256sum": ["sha256sum"]}
    if shutil.which("b3sum"):
        tools["b3sum"] = ["b3sum"]
    else:
        print("b3sum not installed (apt-get install b3sum): skipped", file=sys.stderr)

    own_dir = args.data_dir is None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="digest-bench.", dir="/var/tmp")
    out_path = os.path.join(data_dir, "out.txt")
    results = []
    try:
        for kind in args.kinds.split(","):
            path = os.path.join(data_dir, f"{kind}.img")
            img = write_image(kind, path, args.size, 0.01, 1)
            print(f"image {kind}: {human(img.size)}, {human(img.data_bytes)} data, {human(img.allocated)} allocated",
                  file=sys.stderr)
            for mode in ("cold", "warm"):
                samples: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
                digests: dict[str, set[str]] = {t: set() for t in tools}
                for _ in range(args.runs):
                    for tool, cmd in tools.items():
                        if mode == "cold":
                            drop_file_cache(path)
                        else:
                            warm(path)
                        wall, cpu, d = run_one(cmd + [path])
                        samples[tool].append((wall, cpu))
                        digests[tool].add(d)
                base = statistics.median(w for w, _ in samples["sha256sum"])
                for tool in tools:
                    walls = [w for w, _ in samples[tool]]
                    cpus = [c for _, c in samples[tool]]
                    med = statistics.median(walls)
                    row = dict(image=kind, mode=mode, tool=tool, median_s=med, min_s=min(walls), max_s=max(walls),
                               cpu_s=statistics.median(cpus), ratio_to_sha256sum=med / base,
                               mb_s=args.size / med / 1e6, runs=len(walls), digests=sorted(digests[tool]))
                    assert len(digests[tool]) == 1, f"{tool} gave different digests: {digests[tool]}"
                    results.append(row)
                    print(f"{kind:6} {mode:4} {tool:16} median {med:6.2f} s (min {min(walls):.2f}, max {max(walls):.2f}) "
                          f"cpu {row['cpu_s']:.2f} s  {row['mb_s']:7.0f} MB/s  x{row['ratio_to_sha256sum']:.2f}",
                          file=sys.stderr)
            os.unlink(path)
    finally:
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    print(f"| image | cache | tool | median wall (s) | min-max (s) | CPU (s) | MB/s | ratio to sha256sum |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['image']} | {r['mode']} | {r['tool']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
              f"{r['cpu_s']:.2f} | {r['mb_s']:.0f} | {r['ratio_to_sha256sum']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(size=args.size, runs=args.runs, nproc=os.cpu_count(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
