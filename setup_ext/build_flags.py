"""The compiler flags of the compiled CPU backend that depend on the compiler: OpenMP and the
target architecture, each the first way this compiler takes (setup.py; tests/test_build_flags.py
runs them against the compilers at hand).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

#: a program that needs the OpenMP runtime (omp.h, the pragma, a runtime call) to build and link
OPENMP_PROBE = """#include <omp.h>
int main() {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += omp_get_num_threads() > 0;
    return n > 0 ? 0 : 1;
}
"""


def links(cc, compile_args, link_args, source="int main() { return 0; }\n") -> bool:
    """Whether this compiler compiles ``source`` (C++) with compile_args and links it into a
    program with link_args (a program, not a shared object: a missing runtime library is an
    error there)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            objs = cc.compile([src], output_dir=d, extra_postargs=["-std=c++17", *compile_args])
            cc.link_executable(objs, "probe", output_dir=d, extra_postargs=link_args)
        except Exception:  # CompileError, LinkError; a compiler that is not there
            return False
    return True


def openmp_flags(cc) -> tuple[list[str], list[str]]:
    """(compile, link) arguments of the first way to OpenMP this compiler takes, or none.

    FASTSCHED_OPENMP: ``0`` none; ``1`` the first way that links, macOS included; unset
    (``auto``): the same, except on macOS, where the build has none unless asked for: torch's
    macOS wheels load their own libomp, and a second LLVM OpenMP runtime in the process (the
    one Homebrew's libomp or an LLVM clang links) stops it at import ("OMP: Error #15:
    Initializing libomp.dylib, but found libomp.dylib already initialized"), where a build
    without OpenMP only runs one thread."""
    mode = os.environ.get("FASTSCHED_OPENMP", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"FASTSCHED_OPENMP must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return [], []
    if sys.platform == "darwin" and mode == "auto":
        warnings.warn("fastsched: on macOS the compiled CPU backend is built without OpenMP "
                      "(one thread; torch's own libomp and a second copy abort the process); "
                      "FASTSCHED_OPENMP=1 builds with the compiler's or Homebrew's libomp",
                      stacklevel=1)
        return [], []
    ways = [(["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":  # Apple clang: Homebrew's libomp (`brew install libomp`)
        for p in ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
            if os.path.isdir(p):
                ways.append((["-Xpreprocessor", "-fopenmp", f"-I{p}/include"],
                             [f"-L{p}/lib", "-lomp", f"-Wl,-rpath,{p}/lib"]))
    for cflags, lflags in ways:
        if links(cc, cflags, lflags, OPENMP_PROBE):
            return cflags, lflags
    warnings.warn("fastsched: this C++ compiler builds no OpenMP program; the compiled CPU "
                  "backend is built for one thread (the same results, slower with several "
                  "cores)", stacklevel=1)
    return [], []


def arch_flags(cc, arch: str) -> list[str]:
    """-march=ARCH where the compiler takes it; for native, -mcpu=native next, then none."""
    if not arch:
        return []
    ways = [[f"-march={arch}"]] + ([["-mcpu=native"], []] if arch == "native" else [])
    for flags in ways:
        if links(cc, flags, []):
            return flags
    raise RuntimeError(f"FASTSCHED_CPU_ARCH={arch!r}: the C++ compiler refuses -march={arch}")
