"""A stand-in sm_90 (H100) driver for Triton, for machines without a GPU.

With it installed, a ``@triton.jit`` kernel called on CPU tensors is specialised, compiled
(TTIR -> PTX -> cubin with Triton's own ptxas) and launched through Triton's real generated
launcher exactly as on an H100, except that the launch itself (``cuLaunchKernelEx`` in a stub
``libcuda.so.1`` built from ``stub_libcuda.c`` with the system C compiler) does nothing. So the
host cost of a step can be timed and the compiled code read. Nothing computes: tensors keep
their values. Written for Triton 3.6 (the GPU machines' version); other versions may differ in
the driver interface.

Use: ``from standin import install; install()`` before the first launch, with
``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("FASTSCHED_STANDIN_DIR", Path.home() / ".cache" / "fastsched-standin"))

#: H100 SXM figures the compiler and the launcher ask for (132 SMs, 64K registers an SM)
H100 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
        "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
        "mem_bus_width": 5120}


def build_stub() -> Path:
    """Compile the stub libcuda.so.1 (once; about a second)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / "libcuda.so.1"
    src = HERE / "stub_libcuda.c"
    if not lib.exists() or lib.stat().st_mtime < src.stat().st_mtime:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise SystemExit("the stand-in driver needs a C compiler (gcc or cc) on PATH")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                        str(lib), str(src)], check=True)
        link = CACHE / "libcuda.so"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("libcuda.so.1")
    return lib


def install() -> None:
    """Make Triton's active driver a stand-in H100 whose launches do nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the stand-in driver runs compiled kernels")
    lib = build_stub()
    os.environ.setdefault("TRITON_LIBCUDA_PATH", str(lib.parent))
    # the generated launchers link against libcuda.so.1 by soname: load the stub globally first
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver
    from triton.backends.nvidia.driver import CudaLauncher, ty_to_cpp
    from triton.runtime.driver import driver

    class _Utils:
        def get_device_properties(self, device):
            return dict(H100)

        def load_binary(self, name, kernel, shared, device):
            # (module, function, n_regs, n_spills, n_max_threads): handles are never used
            return (1, 1, 0, 0, 1024)

    class StandinH100(GPUDriver):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = CudaLauncher

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_benchmarker(self):
            raise RuntimeError("stand-in driver: nothing runs on a device, nothing to time")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("stand-in driver: no device memory")

    driver.set_active(StandinH100())


def launches() -> int:
    """How many kernel launches reached the stub driver so far."""
    lib = ctypes.CDLL(str(CACHE / "libcuda.so.1"))
    return ctypes.c_ulonglong.in_dll(lib, "standin_launches").value
