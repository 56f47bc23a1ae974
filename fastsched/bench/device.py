"""Timing, copy bandwidth, memory and environment facts for one device (CUDA GPU or CPU)."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["Device", "quantiles", "copy_bandwidth", "MemoryMeter", "environment", "slug"]


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile (linear interpolation), min and max."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("no values")

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9), "min": xs[0], "max": xs[-1],
            "n": len(xs)}


class Device:
    """A CUDA device (CUDA events for device time) or the CPU (wall clock)."""

    def __init__(self, name: str | None = None):
        if name is None:
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch_device = torch.device(name)
        if self.is_cuda and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        if self.is_cuda and self.torch_device.index is None:
            self.torch_device = torch.device("cuda", torch.cuda.current_device())

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def kind(self) -> str:
        return self.torch_device.type

    @property
    def name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch_device)
        return _cpu_model()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def time_block(self, fn: Callable[[], None], n: int) -> float:
        """Seconds per call of ``n`` back-to-back calls, synchronising once at the end.

        On CUDA the interval is measured with events around the ``n`` calls (device time, which
        is also host time when the host cannot keep the device busy); on the CPU with the wall
        clock.
        """
        if self.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def time_single(self, fn: Callable[[], None]) -> float:
        """Seconds of one synchronised call: host launch time plus device time."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def empty_cache(self) -> None:
        if self.is_cuda:
            torch.cuda.empty_cache()


def copy_bandwidth(dev: Device, nbytes: int, reps: int = 20) -> dict:
    """Copy bandwidth of this device: ``dst.copy_(src)`` on ``nbytes``, bytes read + written.

    On CUDA this is the device-to-device ceiling an elementwise optimizer step can reach; on the
    CPU it is a memory copy (one thread per core, as torch's copy kernel runs).
    """
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=dev.torch_device)
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    for _ in range(3):
        copy()
    dev.sync()
    times = [dev.time_block(copy, 1) for _ in range(reps)]
    moved = 2 * n * 4
    q = quantiles(times)
    del copy, src, dst
    dev.empty_cache()
    return {"bytes_moved": moved, "reps": reps, "time_s": q,
            "gbps": moved / q["median"] / 1e9,
            "gbps_p10": moved / q["p90"] / 1e9, "gbps_p90": moved / q["p10"] / 1e9}


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (main-arena chunks + mmapped chunks), or None off glibc."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


class MemoryMeter:
    """Peak memory a piece of work adds above what was in use when :meth:`start` ran.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: bytes
    malloc reports in use (glibc ``mallinfo2``; torch's CPU allocator is malloc), sampled by
    :meth:`sample` between steps, so temporaries freed inside a step are missed; mallinfo2 sees
    the main arena and mmapped chunks (the CPU run uses one torch thread). Without glibc: the
    growth of the resident set (``VmRSS``), which reuse of resident pages can hide.
    """

    def __init__(self, dev: Device):
        self.dev = dev
        self.base = 0
        self._top = 0
        self._closed = False  # after close(): only window() counts
        self._at_close = 0  # bytes in use when close() ran
        self._level = 0  # net bytes the windows added since
        self._level_top = 0
        self._in_use = None if dev.is_cuda else _malloc_in_use()
        if dev.is_cuda:
            self.method = ("torch.cuda.max_memory_allocated above the allocation before the "
                           "optimizer")
        elif self._in_use is not None:
            self.method = ("CPU: malloc bytes in use (glibc mallinfo2) above those before the "
                           "optimizer, sampled between steps (temporaries freed inside a step "
                           "are missed)")
        else:
            self.method = ("CPU: resident-set growth (VmRSS) sampled between steps; reuse of "
                           "resident pages can hide part of it")

    def _now(self) -> int:
        if self._in_use is not None:
            return self._in_use()
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def start(self) -> None:
        if self.dev.is_cuda:
            self.dev.sync()
            torch.cuda.reset_peak_memory_stats(self.dev.torch_device)
            self.base = torch.cuda.memory_allocated(self.dev.torch_device)
            return
        self.base = self._top = self._now()

    def sample(self) -> None:
        if not self.dev.is_cuda and not self._closed:
            self._top = max(self._top, self._now())

    def close(self) -> None:
        """End the open measurement (the build and first step) on the CPU: from here on other
        work allocates too (the CPU run's contenders of a configuration are alive together),
        so only what :meth:`window` sees around this contender's own steps adds to the peak."""
        self.sample()
        self._at_close = self._now()
        self._closed = True

    @contextlib.contextmanager
    def window(self):
        """This contender's steps (the others alive but idle): the bytes in use they add or
        free go to a running level whose maximum, over what was in use at :meth:`close`, is the
        peak when above the first step's. Net bytes over a window: memory this contender
        leaves to a garbage collection that runs in another's window stays counted here, and
        memory of another freed in this one lowers the level (a collection of reference cycles
        between windows would settle both; the optimizers timed free theirs by reference
        count)."""
        if self.dev.is_cuda or not self._closed:
            yield
            self.sample()
            return
        w0 = self._now()
        yield
        self._level += self._now() - w0
        self._level_top = max(self._level_top, self._level)

    def peak(self) -> int:
        if self.dev.is_cuda:
            self.dev.sync()
            return int(torch.cuda.max_memory_allocated(self.dev.torch_device) - self.base)
        self.sample()
        top = max(self._top, self._at_close + self._level_top) if self._closed else self._top
        return int(max(0, top - self.base))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _git_changes(limit: int = 30) -> list[str] | None:
    """Tracked files with uncommitted changes (``git status --porcelain``, untracked left out):
    a run on a modified tree says so. None where git cannot tell."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    files = [line[3:] for line in out.stdout.splitlines() if line.strip()]
    return files[:limit] + ([f"... {len(files) - limit} more"] if len(files) > limit else [])


def environment(dev: Device, argv: Sequence[str] | None = None) -> dict:
    """Device name, versions, date and command line, for the results file."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU-only machines
        triton_version = None
    import fastsched

    env = {
        "device": dev.name,
        "device_kind": dev.kind,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastsched": getattr(fastsched, "__version__", None),
        "git_commit": _git_commit(),
        "git_uncommitted": _git_changes(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(list(argv) if argv is not None else sys.argv),
    }
    if dev.is_cuda:
        props = torch.cuda.get_device_properties(dev.torch_device)
        env.update({"cuda_runtime": torch.version.cuda, "driver": _driver_version(),
                    "gpu_memory_bytes": int(props.total_memory),
                    "compute_capability": f"{props.major}.{props.minor}"})
    else:
        env.update({"cuda_runtime": torch.version.cuda, "driver": None})
    return env


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device name."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:48].strip("-") or "device"
