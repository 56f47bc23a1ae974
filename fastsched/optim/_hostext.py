"""The host helper of ``step()`` and ``zero_grad()``: a small C++ module built at run time.

Reusing a step's device tables needs, every step, the data pointer of every parameter and
gradient and the identity of every state dict. In Python that is ~0.25 us a parameter on a
2-vCPU EPYC (``p.grad`` alone, torch's own ``[p.grad for p in params]``, is 0.065 us), so a
LoRA model's 448 tensors would spend ~110 us there; ``fastsched/csrc/host.cpp`` reads the
``at::Tensor`` behind each object in ~0.012 us a parameter, and zeroes gradients in ~0.01 us
(``p.grad = None``: 0.085 us).

It includes torch's headers, so it is compiled against the torch that runs, with the C++
compiler Triton's own launcher already needs on a GPU machine, once per (torch, Python, source)
into ``$FASTSCHED_CACHE_DIR`` (default ``~/.cache/fastsched``), about 10 s on 2 cores. The build
runs in the background from the first ``step()``; the Python path serves until it is there
(both give the same tables). ``FASTSCHED_HOST_EXT``: ``auto`` (default), ``off`` (Python path
only), ``wait`` (build in the foreground at the first step). A failed build warns once and
leaves the Python path; :func:`status` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["get", "status", "build", "SOURCE"]

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "host.cpp"
MODES = ("auto", "off", "wait")

_module = None
_reason: str | None = None  # why there is no module (None: not decided yet, or loaded)
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _mode() -> str:
    m = os.environ.get("FASTSCHED_HOST_EXT", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"FASTSCHED_HOST_EXT must be one of {list(MODES)}, got {m!r}")
    return m


def _cache_dir() -> Path:
    base = os.environ.get("FASTSCHED_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastsched"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _command(cxx: str, src: Path, out: Path, std: str) -> list[str]:
    from torch.utils import cpp_extension

    inc = [f"-I{p}" for p in cpp_extension.include_paths()] + \
        [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [cxx, "-O2", "-shared", "-fPIC", f"-std={std}", "-w", abi, *inc, str(src), "-o",
            str(out), *libs, *rpath, "-ltorch_python", "-ltorch_cpu", "-lc10"]


def _target() -> Path:
    """Where the module for this torch / Python / source lives."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), torch.__file__.encode(),
                 str(getattr(torch.version, "git_version", "")).encode(),
                 sys.version.encode(), sysconfig.get_config_var("EXT_SUFFIX").encode()):
        h.update(part)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return _cache_dir() / f"host-{h.hexdigest()[:16]}" / f"fastsched_host{suffix}"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("fastsched_host", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.version() != 1:
        raise ImportError(f"{path} is of interface {mod.version()}, expected 1")
    mod.init(torch.nn.Parameter)
    return mod


def build() -> Path:
    """Compile the helper for this torch into the cache (atomically: concurrent processes, e.g.
    the ranks of one job, each compile into a temporary file and rename it into place) and
    return its path. Raises RuntimeError with the compiler's message on failure."""
    out = _target()
    if out.exists():
        return out
    if sys.platform == "win32":
        raise RuntimeError("the host helper is built on Linux and macOS only")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++ on PATH; or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        err = ""
        for std in ("c++20", "c++17"):  # torch >= 2.10 headers want C++20, older ones 17
            r = subprocess.run(_command(cxx, SOURCE, Path(tmp), std), capture_output=True,
                               text=True)
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
            err = (r.stderr or r.stdout).strip()
        raise RuntimeError(f"{Path(cxx).name} failed:\n" + "\n".join(err.splitlines()[-15:]))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(foreground: bool) -> None:
    global _module, _reason
    try:
        mod = _import(build())
    except Exception as e:  # noqa: BLE001 - any failure leaves the (correct) Python path
        with _lock:
            _reason = f"{type(e).__name__}: {e}"
        warnings.warn(f"fastsched: the host helper of step() could not be built ({_reason}); "
                      "step() and zero_grad() take the Python path (~0.25 us more a "
                      "parameter). FASTSCHED_HOST_EXT=off silences this.", RuntimeWarning,
                      stacklevel=4 if foreground else 1)
        return
    with _lock:
        _module = mod


def get():
    """The helper module, or None while it is being built, when it could not be, or when
    ``FASTSCHED_HOST_EXT=off``. The first call starts the build (see the module docstring)."""
    global _thread, _reason
    if _module is not None or _reason is not None:
        return _module
    if _thread is not None:
        return None if _thread.is_alive() else _module
    mode = _mode()
    if mode == "off":
        _reason = "FASTSCHED_HOST_EXT=off"
        return None
    if _target().exists() or mode == "wait":
        _load(True)
        return _module
    _thread = threading.Thread(target=_load, args=(False,), name="fastsched-host-build",
                               daemon=True)
    _thread.start()
    return None


def wait(timeout: float | None = None):
    """Start the build if needed and wait for it; the module or None (see :func:`status`)."""
    get()
    if _thread is not None:
        _thread.join(timeout)
    return _module


def status() -> str:
    """One line: whether the host helper of ``step()`` is in use, being built, or why not
    (``fastsched.optim.host_helper_status``)."""
    if _module is not None:
        return f"loaded from {_target()}"
    if _reason is not None:
        return f"not in use: {_reason}"
    if _thread is not None and _thread.is_alive():
        return "being built"
    return "not started (the first step() starts it)"


def _reset_for_tests(module=None, reason: str | None = None) -> tuple:
    """Swap the module state (tests run both paths); returns the previous (module, reason)."""
    global _module, _reason
    prev = (_module, _reason)
    _module, _reason = module, reason
    return prev
