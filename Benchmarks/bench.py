#!/usr/bin/env python3
"""End-to-end benchmark of hydrationd against nbdcopy, cp, qemu-img and dd (issue 7).

Creates test images (dense random; 50% holes; 50% zero-filled data blocks; a large sparse image
with 1% data), drops the page cache before each timed run, times every copier on every image and
records, per run: wall time, ratio to the best peer, MB/s, CPU seconds, peak RSS, peak page-cache
footprint of source and destination, peak (source + destination allocated bytes) / image size
sampled every 50 ms, the destination's allocated bytes, and whether its content equals the
source's. Adds fio sequential read/write references, the status round-trip latency of hydrationd
during a full-speed copy, and a plot of space and progress over time (hydrationd with
discard_source against cp).

    sudo python3 Benchmarks/bench.py                 # full run: 2 GiB images + 1 TiB sparse
    sudo python3 Benchmarks/bench.py --smoke         # 16 MiB images, < 1 minute
    python3 Benchmarks/bench.py --help

Not a test and not part of CI. Needs root for dropping caches (falls back to per-file
POSIX_FADV_DONTNEED) and for installing missing Debian packages.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
REPO = Path(__file__).resolve().parent.parent
PEERS = ["nbdcopy", "cp", "qemu-img", "dd"]
# The end state of --discard-source by another route (issue 13): nbdcopy, then rm of the source
# and sync (twice the peak space). Compared with the -discard rows, not counted as a best peer.
DISCARD_PEERS = ["nbdcopy-rm"]
HYD_TOOLS = ["hydrationd", "hydrationd-discard"]
# Variants for A/B runs (issue 13), only with --tools: "-direct" runs the daemon with
# HYDRATION_DIRECT_IO=1 (O_DIRECT on both sides), "-buffered" with 0, "-dsrc" / "-ddst" with O_DIRECT
# on the source / destination only, "-base" runs the binaries of --base-bin-dir (an older build).
HYD_VARIANTS = ["hydrationd-direct", "hydrationd-direct-discard", "hydrationd-buffered", "hydrationd-buffered-discard",
                "hydrationd-base", "hydrationd-base-discard",
                "hydrationd-dsrc", "hydrationd-dsrc-discard", "hydrationd-ddst", "hydrationd-ddst-discard"]
ALL_TOOLS = HYD_TOOLS + PEERS + DISCARD_PEERS
# --variant NAME=ARGS adds the tools "hydrationd@NAME" and "hydrationd-discard@NAME", started with
# these extra `clonectl start` options (e.g. b4="--batch-size 4"), for A/B runs in one run;
# NAME=START_ARGS|DAEMON_ARGS also passes options to hydrationd (e.g. t4="|--io-threads 4").
VARIANT_ARGS: dict[str, list[str]] = {}
VARIANT_DAEMON_ARGS: dict[str, list[str]] = {}
IMAGE_KINDS = ["dense", "holes", "zeros", "sparse"]
APT_PACKAGES = {"time": "time", "nbdcopy": "libnbd-bin", "nbdkit": "nbdkit", "qemu-img": "qemu-utils", "fio": "fio",
                "fincore": "util-linux"}
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*a):
    print(*a, flush=True)


def parse_size(s: str) -> int:
    s = s.strip()
    for suffix, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB),
                         ("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def human(n: float) -> str:
    for unit, m in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= m:
            return f"{n / m:.3g} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------------------------
# Dependencies


def ensure_dependencies(no_install: bool) -> None:
    missing = sorted({pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None})
    if missing:
        if no_install:
            sys.exit(f"missing Debian packages: {' '.join(missing)} (run without --no-install as root)")
        if os.geteuid() != 0:
            sys.exit(f"missing Debian packages {' '.join(missing)}; run as root so they can be installed")
        log(f"installing: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def ensure_matplotlib(no_install: bool) -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    if no_install:
        return False
    log("installing matplotlib (pip)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "matplotlib"]
    if subprocess.run(cmd).returncode != 0:
        subprocess.run(cmd + ["--break-system-packages"])
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------
# Page cache and allocation probes

_libc = ctypes.CDLL(None, use_errno=True)
SYS_cachestat = 451  # same number on x86_64 and the generic table (arm64); Linux >= 6.5


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


def _cachestat_fd(fd: int) -> int | None:
    rng, cs = _CachestatRange(0, 0), _Cachestat()
    rc = _libc.syscall(SYS_cachestat, fd, ctypes.byref(rng), ctypes.byref(cs), 0)
    if rc != 0:
        return None
    return cs.nr_cache * PAGE


def _have_cachestat() -> bool:
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        return _cachestat_fd(fd) is not None
    finally:
        os.close(fd)


HAVE_CACHESTAT = _have_cachestat()


def cached_bytes(path: str) -> int:
    """Bytes of `path` in the page cache. cachestat(2) where the kernel has it: it walks only the
    cached pages, while `fincore` (mincore) walks every page of the file and costs ~12 s of system
    time per call on a 1 TiB file. Falls back to `fincore --bytes --noheadings`."""
    if HAVE_CACHESTAT:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            return _cachestat_fd(fd) or 0
        finally:
            os.close(fd)
    if not os.path.exists(path):
        return 0
    out = subprocess.run(["fincore", "--bytes", "--noheadings", path], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


def fincore_bytes(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", path], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


def allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def drop_caches(files: list[str]) -> str:
    """`sync; echo 3 > drop_caches` where permitted; otherwise fsync + POSIX_FADV_DONTNEED on the
    files involved. Returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (not its children) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Images


@dataclass
class Image:
    kind: str
    path: str
    size: int
    data_bytes: int  # bytes written with non-zero data
    allocated: int  # st_blocks * 512 after creation
    digest: str = ""
    extents: int = 0


class DataSource:
    """Incompressible data, fast: a pool of random bytes, each 64 KiB unit stamped with its offset
    so that misplaced blocks cannot pass verification."""

    def __init__(self, seed: int):
        self.pool = bytearray(os.urandom(16 * MiB))
        self.rng = random.Random(seed)

    def block(self, offset: int, length: int) -> bytes:
        start = self.rng.randrange(0, len(self.pool) - length - 1) & ~7
        buf = bytearray(self.pool[start:start + length])
        for o in range(0, length, 64 * KiB):
            buf[o:o + 16] = (offset + o).to_bytes(8, "little") + b"HYDBENCH"
        return bytes(buf)


def runs(rng: random.Random, size: int, data_fraction: float, unit: int = 64 * KiB,
         mean_data_run: int = 2 * MiB) -> list[tuple[int, int]]:
    """Alternating hole/data runs: data runs of 64 KiB .. 4 MiB (multiples of `unit`), gaps sized
    so that about `data_fraction` of the image is data. Returns (offset, length) of the data runs."""
    out = []
    max_run = max(unit, 2 * mean_data_run - unit)
    mean_gap = mean_data_run * (1 - data_fraction) / data_fraction
    off = 0
    while off < size:
        gap = int(rng.uniform(0, 2 * mean_gap)) // unit * unit
        off += gap
        if off >= size:
            break
        length = min(rng.randrange(unit, max_run + 1, unit), size - off)
        out.append((off, length))
        off += length
    return out


def write_image(kind: str, path: str, size: int, sparse_fraction: float, seed: int) -> Image:
    rng = random.Random(f"{kind}-{seed}")
    ds = DataSource(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    data = 0
    extents = 0
    chunk = 4 * MiB
    try:
        os.ftruncate(fd, size)
        if kind == "dense":
            layout = [(0, size)]
        elif kind in ("holes", "zeros"):
            layout = runs(rng, size, 0.5)
        elif kind == "sparse":
            layout = runs(rng, size, sparse_fraction)
        else:
            raise ValueError(kind)
        zero = bytes(chunk)
        if kind == "zeros":
            # Every block allocated: the gaps are written as explicit zeros.
            pos = 0
            for off, length in layout + [(size, 0)]:
                while pos < off:
                    n = min(chunk, off - pos)
                    os.pwrite(fd, zero[:n], pos)
                    pos += n
                pos = off + length
        for off, length in layout:
            extents += 1
            pos = off
            while pos < off + length:
                n = min(chunk, off + length - pos)
                os.pwrite(fd, ds.block(pos, n), pos)
                pos += n
            data += length
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return Image(kind, path, size, data, allocated(path), extents=extents)


def content_digest(path: str, chunk: int = MiB) -> str:
    """sha256 over the file's size and its non-zero 1 MiB chunks (with their offsets), reading only
    the data extents (SEEK_DATA/SEEK_HOLE): equal for two files exactly when their contents are
    equal, whether the zeros are holes or written zeros, and cheap on a 1 TiB sparse file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    zero = bytes(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            e_ = os.lseek(fd, d, SEEK_HOLE)
            c = d // chunk * chunk
            while c < e_:
                buf = os.pread(fd, chunk, c)
                if buf != zero[:len(buf)]:
                    h.update(c.to_bytes(8, "little"))
                    h.update(buf)
                c += chunk
            off = max(c, off + chunk)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return h.hexdigest()


def prepare_images(args, kinds: list[str]) -> dict[str, Image]:
    data_dir = Path(args.data_dir)
    images = {}
    for kind in kinds:
        size = args.sparse_size if kind == "sparse" else args.size
        path = str(data_dir / f"{kind}-{size}.img")
        meta_path = path + ".json"
        if args.keep and os.path.exists(path) and os.path.exists(meta_path):
            with open(meta_path) as f:
                img = Image(**json.load(f))
            if img.size == os.path.getsize(path):
                log(f"image {kind}: reusing {path}")
                images[kind] = img
                continue
        t0 = time.monotonic()
        img = write_image(kind, path, size, args.sparse_data_fraction, args.seed)
        img.digest = content_digest(path)
        with open(meta_path, "w") as f:
            json.dump(img.__dict__, f)
        log(f"image {kind}: {human(size)}, {human(img.data_bytes)} data in {img.extents} extents, "
            f"{human(img.allocated)} allocated ({time.monotonic() - t0:.1f} s to create)")
        images[kind] = img
    return images


# ----------------------------------------------------------------------------------------------
# Sampling


class Sampler(threading.Thread):
    """Every `interval` s: allocated bytes of source and destination (st_blocks * 512), their page
    cache footprint, the RSS of `pid`, and (optionally) progress from `progress_fn`."""

    def __init__(self, src: str, dst: str, interval: float = 0.05, pid: int | None = None,
                 cache_every: int = 1, progress_fn=None, src_cache: bool = True):
        super().__init__(daemon=True)
        self.src, self.dst, self.interval, self.pid = src, dst, interval, pid
        # A source released as it is copied (--discard-source) holds the daemon's write lease: the
        # open that cachestat(2) needs is a late opener, and the job rightly pauses. Not sampled.
        self.src_cache = src_cache
        self.cache_every = cache_every
        self.progress_fn = progress_fn
        self.series: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self, i: int):
        s = {"t": round(time.monotonic() - self.t0, 4),
             "src_alloc": allocated(self.src), "dst_alloc": allocated(self.dst)}
        if i % self.cache_every == 0:
            if self.src_cache:
                s["src_cache"] = cached_bytes(self.src)
            s["dst_cache"] = cached_bytes(self.dst)
        if self.pid:
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is not None:
                s["rss_kib"] = rss
        if self.progress_fn:
            try:
                p = self.progress_fn()
                if p is not None:
                    s["progress"] = p
            except Exception:
                pass
        self.series.append(s)

    def run(self):
        i = 0
        nxt = time.monotonic()
        while not self.stop_event.is_set():
            self.sample(i)
            i += 1
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                nxt = time.monotonic()

    def finish(self):
        self.stop_event.set()
        self.join()
        self.sample(0)  # one final sample after the run

    def peaks(self) -> dict:
        def mx(key):
            vals = [s[key] for s in self.series if key in s]
            return max(vals) if vals else None
        return {"peak_src_cache": mx("src_cache"), "peak_dst_cache": mx("dst_cache"),
                "peak_rss_sampled_kib": mx("rss_kib"),
                "peak_alloc_sum": max((s["src_alloc"] + s["dst_alloc"]) for s in self.series),
                "samples": len(self.series)}


# ----------------------------------------------------------------------------------------------
# Runs


@dataclass
class Result:
    image: str
    tool: str
    status: str = "ok"  # ok | skipped | failed | timeout
    reason: str = ""
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_kib: int | None = None
    peak_src_cache: int | None = None
    peak_dst_cache: int | None = None
    peak_alloc_sum: int | None = None
    peak_space_ratio: float | None = None  # peak (src + dst allocated) / image size
    peak_space_ratio_data: float | None = None  # same, over the source's initial allocation
    dst_allocated: int | None = None
    src_allocated_after: int | None = None
    verified: bool | None = None
    mb_s: float | None = None  # image size / wall
    data_mb_s: float | None = None  # source data bytes / wall
    ratio_best_peer: float | None = None
    cache_drop: str = ""
    extra: dict = field(default_factory=dict)
    series: list = field(default_factory=list)


def _wait4_with_timeout(proc: subprocess.Popen, timeout: float):
    box = {}

    def waiter():
        box["r"] = os.wait4(proc.pid, 0)

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        th.join()
        proc.returncode = -9
        return None
    _, status, ru = box["r"]
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru


def finish_result(r: Result, img: Image, sampler: Sampler, dst: str, pristine_digest: str, verify: bool):
    peaks = sampler.peaks()
    r.peak_src_cache, r.peak_dst_cache = peaks["peak_src_cache"], peaks["peak_dst_cache"]
    r.peak_alloc_sum = peaks["peak_alloc_sum"]
    r.peak_space_ratio = r.peak_alloc_sum / img.size
    r.peak_space_ratio_data = r.peak_alloc_sum / img.allocated if img.allocated else None
    r.extra["samples"] = peaks["samples"]
    if peaks["peak_rss_sampled_kib"] is not None:
        r.extra["peak_rss_sampled_kib"] = peaks["peak_rss_sampled_kib"]
    r.series = sampler.series
    if r.wall_s:
        r.mb_s = img.size / r.wall_s / 1e6
        r.data_mb_s = img.data_bytes / r.wall_s / 1e6
    os.sync()
    r.dst_allocated = allocated(dst)
    if verify and r.status == "ok":
        if not os.path.exists(dst):
            r.verified = False
        elif os.path.getsize(dst) != img.size:
            r.verified = False
            r.extra["dst_size"] = os.path.getsize(dst)
        else:
            r.verified = content_digest(dst) == pristine_digest
        if not r.verified:
            r.status = "failed"
            r.reason = "destination differs from source"


def peer_command(tool: str, src: str, dst: str) -> list[str]:
    if tool == "nbdcopy":
        return ["nbdcopy", "--flush", src, dst]
    if tool == "cp":
        return ["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh", src, dst]
    if tool == "qemu-img":
        return ["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none", "-W", "-m", "8", src, dst]
    if tool == "dd":
        return ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync,sparse", "status=none"]
    if tool == "nbdcopy-rm":
        # sync -f: the filesystem holding the removed source (its blocks freed and, on ext4
        # -o discard, trimmed at the journal commit this waits for).
        return ["sh", "-c", 'nbdcopy --flush "$1" "$2" && rm -f "$1" && sync -f "$2"', "sh", src, dst]
    raise ValueError(tool)


def run_peer(args, tool: str, img: Image) -> Result:
    r = Result(img.kind, tool)
    dst = str(Path(args.data_dir) / "dst.img")
    remove(dst)
    src = img.path
    if tool in DISCARD_PEERS or args.fresh_source:
        # It removes its source: run on a copy made outside the timed region.
        src = str(Path(args.data_dir) / "src-work.img")
        work_copy(img, src)
    if tool in ("nbdcopy", "nbdcopy-rm"):
        # nbdcopy writes into an existing destination of at least the source's size.
        with open(dst, "wb") as f:
            f.truncate(img.size)
    r.cache_drop = drop_caches([src, dst] + ([img.path] if src != img.path else []))
    sampler = Sampler(src, dst, args.interval)
    errf = open(Path(args.data_dir) / f"{tool}.stderr", "w+")
    sampler.start()
    t0 = time.monotonic()
    # CPU and peak RSS come from GNU time, not from our own wait4: a child forked from this Python
    # process keeps its RSS high-water mark across exec (exec records the mm it leaves), so its
    # ru_maxrss would read ~40-80 MiB whatever it does. time(1) forks the copier from a 1 MiB process.
    timef = Path(args.data_dir) / f"{tool}.time"
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", str(timef),
                             *peer_command(tool, src, dst)],
                            stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
    ru = _wait4_with_timeout(proc, args.timeout)
    r.wall_s = time.monotonic() - t0
    sampler.finish()
    if ru is None:
        r.status, r.reason = "timeout", f"killed after {args.timeout:.0f} s"
        r.extra["lower_bound"] = True
    else:
        try:
            u, sy, m = timef.read_text().strip().splitlines()[-1].split()
            r.cpu_s, r.peak_rss_kib = float(u) + float(sy), int(m)
        except (OSError, ValueError):
            r.cpu_s = ru.ru_utime + ru.ru_stime
        if proc.returncode != 0:
            errf.seek(0)
            r.status, r.reason = "failed", f"exit {proc.returncode}: {errf.read()[-300:].strip()}"
    errf.close()
    remove(str(timef))
    if src != img.path:
        r.src_allocated_after = allocated(src) if os.path.exists(src) else 0
        remove(src)
    finish_result(r, img, sampler, dst, img.digest, verify=not args.no_verify)
    remove(dst)
    return r


def work_copy(img: Image, dst: str):
    """A copy of the image for a run that destroys its source, allocated as the image is: holes
    stay holes and written zeros stay written (`--sparse=auto`; `--sparse=always` turned the zeros
    image into the holes image, and the -discard rows of runs before 2026-11-29 19:50 measured that)."""
    remove(dst)
    subprocess.run(["cp", "--sparse=auto", img.path, dst], check=True)
    got, want = allocated(dst), allocated(img.path)
    if abs(got - want) > 4 * MiB:
        raise RuntimeError(f"work copy of {img.path} has {got} bytes allocated, the image {want}")


def remove(path: str):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- hydrationd


class Daemon:
    """hydrationd started for one run: `hydrationd --state-dir DIR --socket PATH`."""

    def __init__(self, args, tag: str):
        self.bin = Path(args.base_bin_dir if "-base" in tag and args.base_bin_dir else args.bin_dir)
        self.env = None
        for variant, value in (("-buffered", "0"), ("-direct", "1"), ("-dsrc", "source"), ("-ddst", "dest")):
            if variant in tag:
                self.env = dict(os.environ, HYDRATION_DIRECT_IO=value)
        self.tag = tag
        self.state = Path(args.data_dir) / f"hyd-state-{tag}"
        self.sock = str(Path(args.data_dir) / "hyd.sock")
        self.log_path = Path(args.data_dir) / f"hydrationd-{tag}.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable(args) -> str | None:
        b = Path(args.bin_dir)
        for name in ("hydrationd", "clonectl"):
            if not os.access(b / name, os.X_OK):
                return f"{b / name} not found (build with `swift build -c release` or set HYDRATION_BIN_DIR)"
        try:
            out = subprocess.run([str(b / "clonectl"), "--help"], capture_output=True, text=True, timeout=10)
            if "not yet wired" in out.stdout + out.stderr:
                return "clonectl: not yet wired"
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"clonectl --help failed: {e}"
        return None

    def start(self, timeout: float = 30):
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        remove(self.sock)
        self.logf = open(self.log_path, "w")
        # Extra hydrationd options, for tuning experiments (e.g. "--io-threads 16").
        extra = os.environ.get("HYDRATION_BENCH_DAEMON_ARGS", "").split()
        if "@" in self.tag:
            extra += VARIANT_DAEMON_ARGS[self.tag.split("@", 1)[1]]
        self.proc = subprocess.Popen([str(self.bin / "hydrationd"), "--state-dir", str(self.state), "--socket", self.sock, *extra],
                                     stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"hydrationd exited ({self.proc.returncode}) before creating its socket: "
                                   f"{self.log_path.read_text()[-300:].strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"hydrationd created no socket within {timeout:.0f} s")
            time.sleep(0.02)

    def start_waits(self) -> bool:
        """Whether this build's `clonectl start` has --wait (asked outside the timed region)."""
        if not hasattr(self, "_start_waits"):
            out = subprocess.run([str(self.bin / "clonectl"), "start", "--help"], capture_output=True, text=True, timeout=10)
            self._start_waits = "--wait" in out.stdout
        return self._start_waits

    def ctl(self, *a, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "clonectl"), "--socket", self.sock, *a], capture_output=True, text=True,
                              timeout=timeout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "logf", None):
            self.logf.close()
        shutil.rmtree(self.state, ignore_errors=True)
        remove(self.sock)


def run_hydrationd(args, tool: str, img: Image) -> Result:
    r = Result(img.kind, tool)
    why = Daemon.unavailable(args)
    if why:
        r.status, r.reason = "skipped", why
        return r
    discard = tool.split("@", 1)[0].endswith("-discard")
    data_dir = Path(args.data_dir)
    dst = str(data_dir / "dst.img")
    remove(dst)
    src = img.path
    if discard or args.fresh_source:
        # The job destroys its source: run on a copy, outside the timed region, and verify the
        # destination against the pristine image's digest.
        src = str(data_dir / "src-work.img")
        work_copy(img, src)
    d = Daemon(args, tool)
    try:
        d.start()
        d.start_waits()
        r.cache_drop = drop_caches([src, img.path, dst])
        name = f"bench-{img.kind}"
        sampler = Sampler(src, dst, args.interval, pid=d.proc.pid, src_cache=not discard)
        cpu0 = proc_cpu_seconds(d.proc.pid)
        sampler.start()
        t0 = time.monotonic()
        start = ["start", name, "--source", src, "--dest", dst, "--commit-interval", "1s"]
        # Extra clonectl start options, for tuning experiments (e.g. "--threshold 512").
        start += os.environ.get("HYDRATION_BENCH_START_ARGS", "").split()
        if "@" in tool:
            start += VARIANT_ARGS[tool.split("@", 1)[1]]
        if discard:
            start.insert(6, "--discard-source")
        try:
            if d.start_waits():
                # One command, as a user runs a one-off copy (`clonectl start … --wait`), like the peers.
                out = d.ctl(*start, "--wait", timeout=args.timeout)
            else:  # an older build (--base-bin-dir) without `start --wait`
                out = d.ctl(*start)
                if out.returncode == 0:
                    out = d.ctl("wait", name, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            out = None
        r.wall_s = time.monotonic() - t0
        cpu1 = proc_cpu_seconds(d.proc.pid)
        sampler.finish()
        if out is None:
            r.status, r.reason = "timeout", f"clonectl start --wait exceeded {args.timeout:.0f} s"
        elif out.returncode != 0:
            r.status, r.reason = "failed", f"clonectl exit {out.returncode}: {(out.stderr or out.stdout)[-300:].strip()}"
        if cpu0 is not None and cpu1 is not None:
            r.cpu_s = cpu1 - cpu0
        r.peak_rss_kib = proc_status_kib(d.proc.pid, "VmHWM")
        st = d.ctl("status", name, "--json")
        if st.returncode == 0:
            try:
                r.extra["job_status"] = json.loads(st.stdout)
            except json.JSONDecodeError:
                r.extra["job_status_raw"] = st.stdout[-500:]
        r.src_allocated_after = allocated(src)
        finish_result(r, img, sampler, dst, img.digest, verify=not args.no_verify)
    except Exception as e:  # a daemon that does not come up is a failed run, not a crash of the bench
        r.status, r.reason = "failed", str(e)
    finally:
        d.stop()
        remove(dst)
        if src != img.path:
            remove(src)
    return r


# --- status round trip


def varlink_call(sock: socket.socket, method: str, params: dict) -> dict:
    sock.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("daemon closed the connection")
        buf += chunk
    return json.loads(buf[:-1])


def status_latency(args, img: Image) -> dict:
    why = Daemon.unavailable(args)
    if why:
        return {"status": "skipped", "reason": why}
    dst = str(Path(args.data_dir) / "dst-status.img")
    remove(dst)
    d = Daemon(args, "status")
    res: dict = {"status": "ok", "image": img.kind, "calls": 0}
    try:
        d.start()
        drop_caches([img.path, dst])
        name = "bench-status"
        out = d.ctl("start", name, "--source", img.path, "--dest", dst, "--commit-interval", "1s")
        if out.returncode != 0:
            return {"status": "failed", "reason": f"clonectl start: {(out.stderr or out.stdout)[-300:].strip()}"}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.sock)
        lat = []
        params = json.loads(args.status_params)
        t_end = time.monotonic() + args.timeout
        for _ in range(args.status_calls):
            t0 = time.perf_counter()
            reply = varlink_call(s, "org.hydrationd.Control.GetStatus", params)
            lat.append((time.perf_counter() - t0) * 1000)
            if "error" in reply:
                res["error"] = reply
                break
            if time.monotonic() > t_end:
                break
            time.sleep(args.status_gap)
        s.close()
        st = d.ctl("status", name, "--json")
        try:
            res["state_after"] = json.loads(st.stdout).get("state")
        except (json.JSONDecodeError, AttributeError):
            res["state_after"] = None
        res.update(calls=len(lat), p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), max_ms=max(lat) if lat else None)
        if res["state_after"] == "complete":
            res["note"] = "the job completed before the last call: some calls were not under full-speed copying"
        d.ctl("cancel", name)
    except Exception as e:
        res = {"status": "failed", "reason": str(e)}
    finally:
        d.stop()
        remove(dst)
    return res


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- fio


def run_fio(args, size: int, label: str) -> list[Result]:
    path = str(Path(args.data_dir) / "fio.dat")
    out = []
    size = max(size // MiB, 1) * MiB
    for rw in ("write", "read"):
        r = Result(label, f"fio-{rw}")
        if rw == "write":
            remove(path)
        r.cache_drop = drop_caches([path])
        cmd = ["fio", f"--name=seq{rw}", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--direct=1",
               "--ioengine=libaio", "--iodepth=16", f"--size={size}", "--output-format=json"]
        if rw == "write":
            cmd.append("--end_fsync=1")
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True)
        r.wall_s = time.monotonic() - t0
        if p.returncode != 0:
            r.status, r.reason = "failed", p.stderr[-300:]
        else:
            job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0][rw]
            r.mb_s = job["bw_bytes"] / 1e6
            r.extra["process_wall_s"] = r.wall_s
            r.wall_s = job["runtime"] / 1000
            r.extra["bytes"] = size
            r.data_mb_s = r.mb_s
            r.cpu_s = None
        out.append(r)
    remove(path)
    if all(r.status == "ok" for r in out):
        b = Result(label, "fio-read+write")
        b.wall_s = sum(size / (r.mb_s * 1e6) for r in out)
        b.mb_s = size / b.wall_s / 1e6
        b.reason = "bound for a copy: read then write the same bytes on the same disk"
        b.extra["bytes"] = size
        out.append(b)
    return out


# ----------------------------------------------------------------------------------------------
# Reporting


def fmt(v, spec="", none="-"):
    return none if v is None else format(v, spec)


def mib(v):
    return None if v is None else v / MiB


def print_table(rows: list[Result], img: Image | None):
    if img:
        log(f"\n== {img.kind}: {human(img.size)}, {human(img.data_bytes)} data, {human(img.allocated)} allocated ==")
    hdr = (f"{'tool':<20}{'wall s':>8}{'x best':>8}{'MB/s':>9}{'dataMB/s':>9}{'CPU s':>7}{'RSS MiB':>8}"
           f"{'cache src/dst MiB':>19}{'space x':>9}{'dst alloc':>11}{'ok':>4}  note")
    log(hdr)
    for r in rows:
        if r.status == "skipped":
            log(f"{r.tool:<20}{'skipped':>8}  {r.reason}")
            continue
        cache = f"{fmt(mib(r.peak_src_cache), '.0f')}/{fmt(mib(r.peak_dst_cache), '.0f')}"
        wall = fmt(r.wall_s, ".2f") + (">" if r.status == "timeout" else "")
        note = r.reason if r.status != "ok" or r.tool.startswith("fio") else ""
        if r.src_allocated_after is not None:
            note += f"src left {human(r.src_allocated_after)}"
        log(f"{r.tool:<20}{wall:>8}{fmt(r.ratio_best_peer, '.2f'):>8}{fmt(r.mb_s, '.0f'):>9}{fmt(r.data_mb_s, '.0f'):>9}"
            f"{fmt(r.cpu_s, '.2f'):>7}{fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / 1024, '.0f'):>8}"
            f"{cache:>19}{fmt(r.peak_space_ratio, '.3f'):>9}{fmt(None if r.dst_allocated is None else human(r.dst_allocated)):>11}"
            f"{fmt(None if r.verified is None else ('yes' if r.verified else 'NO')):>4}  {note}")


def markdown(rows: list[Result], images: dict[str, Image]) -> str:
    lines = ["| image | tool | wall s | × best peer | MB/s | data MB/s | CPU s | peak RSS MiB | peak cache src / dst MiB "
             "| peak (src+dst alloc) / size | dst allocated | content equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status == "skipped":
            lines.append(f"| {r.image} | {r.tool} | — (skipped: {r.reason}) |||||||||| ")
            continue
        wall = fmt(r.wall_s, ".2f") + (" (timeout, lower bound)" if r.status == "timeout" else "")
        lines.append(
            f"| {r.image} | {r.tool} | {wall} | {fmt(r.ratio_best_peer, '.2f')} | {fmt(r.mb_s, '.0f')} | {fmt(r.data_mb_s, '.0f')} "
            f"| {fmt(r.cpu_s, '.2f')} | {fmt(None if r.peak_rss_kib is None else r.peak_rss_kib / 1024, '.0f')} "
            f"| {fmt(mib(r.peak_src_cache), '.0f')} / {fmt(mib(r.peak_dst_cache), '.0f')} | {fmt(r.peak_space_ratio, '.3f')} "
            f"| {fmt(None if r.dst_allocated is None else human(r.dst_allocated))} "
            f"| {fmt(None if r.verified is None else ('yes' if r.verified else 'NO'))} |")
    return "\n".join(lines) + "\n"


def status_markdown(status: dict | None) -> str:
    """The status round trip under the table, so the .md (kept in git) holds every cited figure."""
    if not status or status.get("status") != "ok":
        return ""
    return (f"\nStatus round trip ({status['calls']} GetStatus calls during a full-speed copy of the "
            f"{status['image']} image): p50 {status['p50_ms']:.2f} ms, p99 {status['p99_ms']:.1f} ms, "
            f"max {status['max_ms']:.0f} ms; job {status.get('state_after')} after the last call.\n")


def plot(path: str, rows: list[Result], img: Image):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    drawn = 0
    for r in rows:
        if r.image != img.kind or r.tool not in ("cp", "hydrationd-discard") or not r.series:
            continue
        t = [s["t"] for s in r.series]
        space = [(s["src_alloc"] + s["dst_alloc"]) / img.size for s in r.series]
        prog = [s.get("progress", min(1.0, s["dst_alloc"] / img.allocated if img.allocated else 0)) for s in r.series]
        label = "hydrationd (discard_source)" if r.tool == "hydrationd-discard" else "cp --sparse=always + sync"
        ax1.plot(t, space, label=label)
        ax2.plot(t, prog, label=label)
        drawn += 1
    missing = [t for t in ("hydrationd-discard", "cp") if not any(r.tool == t and r.series and r.image == img.kind for r in rows)]
    ax1.set_ylabel("(src + dst allocated) / size")
    ax1.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax2.set_ylabel("progress (dst alloc / src data)")
    ax2.set_xlabel("time since start (s)")
    title = f"Space and progress, {img.kind} image {human(img.size)}"
    if missing:
        title += "\n(not measured yet: " + ", ".join(missing) + ")"
    ax1.set_title(title)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"plot: {path}")


def machine_info(args) -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
        "mem_total": sh("grep MemTotal /proc/meminfo | awk '{print $2\" kB\"}'"),
        "filesystem": sh(f"df -T {args.data_dir} | tail -1 | awk '{{print $2\" on \"$1}}'"),
        "disk": sh(f"lsblk -ndo NAME,SIZE,ROTA,MODEL $(df {args.data_dir} | tail -1 | cut -d' ' -f1) 2>/dev/null"),
        "python": platform.python_version(),
        "nbdcopy": sh("nbdcopy --version | head -1"), "qemu-img": sh("qemu-img --version | head -1"),
        "fio": sh("fio --version"), "coreutils": sh("cp --version | head -1"),
        "page_cache_probe": "cachestat(2)" if HAVE_CACHESTAT else "fincore",
    }


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="dense/holes/zeros image size (default 2GiB)")
    ap.add_argument("--sparse-size", type=parse_size, default=TiB, help="sparse image size (default 1TiB)")
    ap.add_argument("--sparse-data-fraction", type=float, default=0.01, help="data fraction of the sparse image (0.01)")
    ap.add_argument("--images", default=",".join(IMAGE_KINDS), help="subset of " + ",".join(IMAGE_KINDS))
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help="subset of " + ",".join(ALL_TOOLS))
    ap.add_argument("--data-dir", default="/work/bench-data", help="where images go (not in git)")
    ap.add_argument("--bin-dir", default=os.environ.get("HYDRATION_BIN_DIR", str(REPO / ".build" / "release")),
                    help="hydrationd and clonectl ($HYDRATION_BIN_DIR, default .build/release)")
    ap.add_argument("--base-bin-dir", default=os.environ.get("HYDRATION_BASE_BIN_DIR", ""),
                    help="binaries of the hydrationd-base* variants (an older build, for a before/after in one run)")
    ap.add_argument("--results-dir", default=str(REPO / "Benchmarks" / "results"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "benchmarks-space.png"))
    ap.add_argument("--plot-image", default="dense", help="image whose runs are plotted (dense)")
    ap.add_argument("--interval", type=float, default=0.05, help="sampling interval, s (0.05)")
    ap.add_argument("--timeout", type=float, default=180, help="per-run limit, s (180); a killed run is reported as a lower bound")
    ap.add_argument("--status-calls", type=int, default=200)
    ap.add_argument("--status-gap", type=float, default=0.01, help="pause between status calls, s")
    ap.add_argument("--status-params", default="{}", help="JSON parameters of GetStatus")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install anything")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the images")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--label", default="", help="suffix of the results file name")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help='hydrationd with extra start options, as tools hydrationd@NAME and hydrationd-discard@NAME '
                         '(e.g. --variant b4="--batch-size 4"); repeatable')
    ap.add_argument("--fresh-source", action="store_true",
                    help="every run reads a fresh copy of the image, as the -discard and nbdcopy-rm runs must: on a "
                         "virtual disk backed by the host's page cache a just-written source reads faster, which "
                         "otherwise favours those runs")
    ap.add_argument("--smoke", action="store_true", help="16 MiB images and a 1 GiB sparse one; under a minute")
    args = ap.parse_args()
    if args.smoke:
        args.size = min(args.size, 16 * MiB)
        args.sparse_size = min(args.sparse_size, GiB)
        args.timeout = min(args.timeout, 60)
        args.status_calls = min(args.status_calls, 20)
        args.label = args.label or "smoke"
        if args.plot == str(REPO / "docs" / "benchmarks-space.png"):
            args.plot = str(Path(args.results_dir) / "smoke-space.png")

    kinds = [k for k in args.images.split(",") if k]
    tools = [t for t in args.tools.split(",") if t]
    for k in kinds:
        if k not in IMAGE_KINDS:
            sys.exit(f"unknown image {k}")
    for v in args.variant:
        name, sep, value = v.partition("=")
        if not sep or not name:
            sys.exit(f"--variant wants NAME=ARGS, got {v!r}")
        start_args, _, daemon_args = value.partition("|")
        VARIANT_ARGS[name] = start_args.split()
        VARIANT_DAEMON_ARGS[name] = daemon_args.split()
    for t in tools:
        base, _, variant = t.partition("@")
        if base not in ALL_TOOLS + HYD_VARIANTS or (variant and (variant not in VARIANT_ARGS or base not in HYD_TOOLS + HYD_VARIANTS)):
            sys.exit(f"unknown tool {t}")

    ensure_dependencies(args.no_install)
    have_mpl = ensure_matplotlib(args.no_install)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)

    machine = machine_info(args)
    log(f"machine: {machine['cpus']} CPUs {machine['cpu_model']}, {machine['mem_total']}, kernel {machine['kernel']}, "
        f"{machine['filesystem']}; page cache probe: {machine['page_cache_probe']}")
    why = Daemon.unavailable(args)
    if why:
        log(f"hydrationd rows skipped: {why}")

    all_rows: list[Result] = []
    images: dict[str, Image] = {}
    status = None
    t_start = time.monotonic()
    try:
        images = prepare_images(args, kinds)
        for kind in kinds:
            img = images[kind]
            rows = []
            for tool in tools:
                if tool.partition("@")[0] in HYD_TOOLS + HYD_VARIANTS:
                    r = run_hydrationd(args, tool, img)
                else:
                    r = run_peer(args, tool, img)
                rows.append(r)
                log(f"  {kind:<7} {tool:<20} {r.status:<8} {fmt(r.wall_s, '.2f')} s {r.reason}")
            best = min((r.wall_s for r in rows if r.tool in PEERS and r.status == "ok"), default=None)
            for r in rows:
                if best and r.wall_s and r.status in ("ok", "timeout"):
                    r.ratio_best_peer = r.wall_s / best
            if not args.no_fio:
                rows += run_fio(args, img.allocated, kind)
            print_table(rows, img)
            all_rows += rows
        if args.plot_image in images:
            status_img = images[args.plot_image]
        else:
            status_img = next(iter(images.values()))
        status = status_latency(args, status_img)
        log(f"\nstatus round trip (GetStatus during a full-speed copy): {json.dumps(status)}")
    finally:
        if not args.keep:
            for img in images.values():
                remove(img.path)
                remove(img.path + ".json")
        for leftover in ("dst.img", "dst-status.img", "src-work.img", "fio.dat"):
            remove(str(Path(args.data_dir) / leftover))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = stamp + (f"-{args.label}" if args.label else "")
    doc = {"timestamp": stamp, "machine": machine, "args": {k: v for k, v in vars(args).items()},
           "images": {k: {kk: vv for kk, vv in v.__dict__.items()} for k, v in images.items()},
           "runs": [r.__dict__ for r in all_rows], "status_latency": status,
           "duration_s": time.monotonic() - t_start}
    out = Path(args.results_dir) / f"{name}.json"
    out.write_text(json.dumps(doc, indent=1))
    md = Path(args.results_dir) / f"{name}.md"
    md.write_text(markdown(all_rows, images) + status_markdown(status))
    # The .json (with the 50 ms series) is not kept in git (.gitignore); the .md is. A run the docs
    # cite for figures only the .json has is stored as .json.xz (docs/benchmarks.md).
    log(f"\nresults: {out}\nmarkdown table: {md}")
    if have_mpl and args.plot_image in images:
        plot(args.plot, all_rows, images[args.plot_image])
    elif not have_mpl:
        log("plot skipped: matplotlib unavailable")


if __name__ == "__main__":
    main()
