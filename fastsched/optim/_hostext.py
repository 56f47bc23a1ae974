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

import contextlib
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
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
    extra = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    return [cxx, "-O2", "-shared", "-fPIC", f"-std={std}", "-w", abi, *inc, str(src), "-o",
            str(out), *libs, *rpath, "-ltorch_python", "-ltorch_cpu", "-lc10", *extra]


def _torch_lib() -> str:
    """What identifies the torch binary the module links against: libtorch_python's path,
    size and modification time (a torch rebuilt in place at the same version differs here)."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libtorch_python*"))
    if not found:
        return str(lib)
    st = found[0].stat()
    return f"{found[0]}:{st.st_size}:{st.st_mtime_ns}"


def _target() -> Path:
    """Where the module for this torch / Python / source / compile command lives."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__, torch.__file__, _torch_lib(),
                 str(getattr(torch.version, "git_version", "")), sys.version,
                 str(sysconfig.get_config_var("EXT_SUFFIX")),
                 " ".join(_command("CXX", Path("SRC"), Path("OUT"), "STD"))):
        h.update(part if isinstance(part, bytes) else part.encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return _cache_dir() / f"host-{h.hexdigest()[:16]}" / f"fastsched_host{suffix}"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("fastsched_host", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.version() != 3:  # 3: check() compares the objects inside the state dicts too
        raise ImportError(f"{path} is of interface {mod.version()}, expected 3")
    mod.init(torch.nn.Parameter)
    return mod


def _start_build() -> tuple[subprocess.Popen, Path, Path] | Path:
    """Start compiling the helper into the cache; the module's path when it is already there,
    else (the compiler's process, the log, the target). The compiler runs in a session of its
    own and renames its output into place itself, so a build finishes (and is not wasted) when
    the process that started it exits first; concurrent builds (the ranks of one job) each write
    a file of their own and rename it atomically."""
    out = _target()
    if out.exists():
        return out
    if sys.platform == "win32":
        raise RuntimeError("the host helper is built on Linux and macOS only")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++ on PATH; or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in out.parent.glob(".build-*"):  # left by builds killed mid-way
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > 3600:
                old.unlink()
    tag = f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, log = out.parent / (tag + out.suffix), out.parent / (tag + ".log")
    # torch >= 2.10 headers want C++20, older ones C++17
    tries = " || ".join(shlex.join(_command(cxx, SOURCE, tmp, std)) for std in ("c++20", "c++17"))
    script = f"({tries}) && mv -f {shlex.quote(str(tmp))} {shlex.quote(str(out))}"
    with open(log, "w") as f:
        proc = subprocess.Popen(["sh", "-c", script], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log, out


def build(started=None) -> Path:
    """Compile the helper for this torch into the cache (see :func:`_start_build`; ``started``:
    a build it started) and return its path. Raises RuntimeError with the compiler's message on
    failure."""
    if started is None:
        started = _start_build()
    if isinstance(started, Path):
        return started
    proc, log, out = started
    rc = proc.wait()
    try:
        msg = log.read_text().strip()
    except OSError:
        msg = ""
    with contextlib.suppress(OSError):
        log.unlink()
    if rc != 0 or not out.exists():
        cxx = Path(_compiler() or "the compiler").name
        raise RuntimeError(f"{cxx} failed:\n" + "\n".join(msg.splitlines()[-15:]))
    return out


def _load(foreground: bool, started=None) -> None:
    global _module, _reason
    try:
        mod = _import(build(started))
    except Exception as e:  # noqa: BLE001 - any failure leaves the (correct) Python path
        with _lock:
            _reason = f"{type(e).__name__}: {e}"
        try:  # (from the build thread, a warnings filter set to "error" has no one to tell)
            warnings.warn(f"fastsched: the host helper of step() could not be built "
                          f"({_reason}); step() and zero_grad() take the Python path (~0.25 "
                          "us more a parameter). FASTSCHED_HOST_EXT=off silences this.",
                          RuntimeWarning, stacklevel=4 if foreground else 1)
        except Warning:
            if foreground:
                raise
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
    try:
        # the compiler starts here, in the caller's thread: a process that exits before the
        # build ends still leaves the module in the cache (see _start_build)
        started = _target() if mode == "wait" else _start_build()
    except Exception as e:  # noqa: BLE001 - no cache directory (no HOME, no permission...)
        _reason = f"{type(e).__name__}: {e}"
        warnings.warn(f"fastsched: the host helper of step() cannot be built here "
                      f"({_reason}); the Python path runs. Set FASTSCHED_CACHE_DIR, or "
                      "FASTSCHED_HOST_EXT=off to silence this.", RuntimeWarning, stacklevel=3)
        return None
    if isinstance(started, Path):  # there already, or to be built in the foreground
        _load(True)
        return _module
    _thread = threading.Thread(target=_load, args=(False, started), name="fastsched-host-build",
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
        return f"loaded from {_module.__file__}"
    if _reason is not None:
        return f"not in use: {_reason}"
    if _thread is not None and _thread.is_alive():
        return "being built"
    try:
        where = _target()
    except Exception as e:  # noqa: BLE001
        return f"not in use: {type(e).__name__}: {e}"
    return f"not started (the first step() builds it into {where.parent})"


def _reset_for_tests(module=None, reason: str | None = None) -> tuple:
    """Swap the module state (tests run both paths); returns the previous (module, reason)."""
    global _module, _reason
    prev = (_module, _reason)
    _module, _reason = module, reason
    return prev
