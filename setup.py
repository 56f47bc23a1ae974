"""Build glue of the compiled CPU executor (``fastsched._cpu_ext``, sources in ``setup_ext/``).

Everything else about the package is declared in pyproject.toml. The extension is optional: a
failed build (no C++ compiler, no OpenMP) still installs the package, and the optimizers fall
back to the PyTorch reference backend on CPU with one warning.

Environment: ``FASTSCHED_CPU_ARCH`` (default ``native``; e.g. ``x86-64-v3`` for a build shared
between machines, empty for the compiler's default), ``FASTSCHED_NO_EXT_BUILD=1`` skips the build,
``FASTSCHED_BUILD_JOBS`` the compiler processes run side by side (default: one per core),
``FASTSCHED_OPENMP`` ``0`` / ``1`` / ``auto`` (default: with OpenMP, but on macOS without: see
build_flags.openmp_flags; one thread, the same bits).

OpenMP and ``-march=native`` are what the compiler accepts, tried in turn: ``-fopenmp`` (GCC,
clang with libomp), then Homebrew's libomp through ``-Xpreprocessor -fopenmp`` (Apple clang has no
``-fopenmp``; macOS with FASTSCHED_OPENMP=1 only), else none: the extension then runs one thread,
with a warning at build time;
``-march=native``, then ``-mcpu=native`` (clang on ARM before version 15), then the compiler's
default. An explicit ``FASTSCHED_CPU_ARCH`` the compiler refuses fails the build of the extension.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

try:  # (a build requirement in pyproject.toml; without it the sources compile one by one)
    from pybind11.setup_helpers import ParallelCompile
except ImportError:
    ParallelCompile = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "setup_ext"))
import gen_layout  # noqa: E402
from build_flags import arch_flags, links, openmp_flags  # noqa: E402


class BuildExt(build_ext):
    """Generate the layout header, then compile with the flags this compiler accepts, the
    sources side by side (one compiler process per core)."""

    def build_extension(self, ext):
        gen_layout.write(os.path.join(HERE, "setup_ext", "generated", "layout.h"))
        cc = self.compiler
        if cc.compiler_type == "msvc":
            # the loops are written on GCC / clang vector types (__attribute__((vector_size)),
            # __builtin_convertvector), which MSVC does not have: say so, instead of its pages
            # of errors (the optional extension is then skipped with this warning)
            raise CompileError("MSVC cannot compile the CPU backend (GCC / clang vector "
                               "extensions); CPU steps use the reference backend")
        else:
            if not links(cc, [], []):  # (the optional extension is then skipped with a warning)
                raise CompileError("the C++ compiler builds no program: "
                                   + " ".join(getattr(cc, "compiler_so_cxx", None)
                                              or getattr(cc, "compiler_so", None) or ["?"]))
            omp_c, omp_l = openmp_flags(cc)
            quiet = ["-Wno-maybe-uninitialized"]
            # no FMA contraction and no fast-math: the reference's fp32 operations, one by one
            # -g0: Python's own flags ask for debug information, which took 33 of the 85 s one
            # file took to compile (GCC 12, 2-core Xeon); GCC's AVX-512 headers' "__Y may be
            # used uninitialized" (the idiom of their _mm512_undefined_*) printed ~5,000 lines
            # of warnings
            ext.extra_compile_args = [
                "-O3", "-g0", "-std=c++17", *omp_c, "-ffp-contract=off", "-fno-math-errno",
                "-fno-trapping-math", "-fvisibility=hidden",
                *(quiet if links(cc, ["-Werror", *quiet], []) else []),  # (GCC's option)
                *([] if omp_c else ["-Wno-unknown-pragmas"]),
                *arch_flags(cc, os.environ.get("FASTSCHED_CPU_ARCH", "native"))]
            ext.extra_link_args = omp_l
        if ParallelCompile is None:
            super().build_extension(ext)
            return
        # setuptools compiles the sources of one extension one after the other (build_ext
        # --parallel only builds separate extensions side by side); pybind11's ParallelCompile
        # replaces distutils' compile loop with one thread per core, each running the compiler
        # (FASTSCHED_BUILD_JOBS sets how many; MSVC's compiler class has a loop of its own)
        with ParallelCompile("FASTSCHED_BUILD_JOBS"):
            super().build_extension(ext)


ext_modules = []
if os.environ.get("FASTSCHED_NO_EXT_BUILD") != "1":
    ext_modules.append(Extension(
        "fastsched._cpu_ext",
        # the largest first, so that with 2 processes cpu_ext.cpp runs beside the other two: 21 s
        # for the build on a 2-core Xeon (GCC 12), against 52 s for the one file they were (with
        # -g0; 85 s with Python's -g)
        sources=["setup_ext/cpu_ext.cpp", "setup_ext/fused_16.cpp", "setup_ext/fused_f32.cpp"],
        include_dirs=["setup_ext", "setup_ext/generated"],
        depends=["setup_ext/kernels.h", "setup_ext/fused.h", "kernels/layout.py"],
        language="c++", optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
