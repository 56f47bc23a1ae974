"""Build glue of the compiled CPU executor (``fastsched._cpu_ext``, sources in ``setup_ext/``).

Everything else about the package is declared in pyproject.toml. The extension is optional: a
failed build (no C++ compiler, no OpenMP) still installs the package, and the optimizers fall
back to the PyTorch reference backend on CPU with one warning.

Environment: ``FASTSCHED_CPU_ARCH`` (default ``native``; e.g. ``x86-64-v3`` for a build shared
between machines, empty for the compiler's default), ``FASTSCHED_NO_EXT_BUILD=1`` skips the build.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "setup_ext"))
import gen_layout  # noqa: E402


class BuildExt(build_ext):
    """Generate the layout header, then compile with the flags this compiler accepts."""

    def build_extension(self, ext):
        gen_layout.write(os.path.join(HERE, "setup_ext", "generated", "layout.h"))
        cc = self.compiler
        arch = os.environ.get("FASTSCHED_CPU_ARCH", "native")
        # no FMA contraction and no fast-math: the reference's fp32 operations, one by one
        flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
                 "-fno-trapping-math", "-fvisibility=hidden"]
        if arch:
            flags.append(f"-march={arch}")
        if cc.compiler_type == "msvc":
            flags = ["/O2", "/openmp", "/fp:precise", "/std:c++17"]
        ext.extra_compile_args = flags
        ext.extra_link_args = [] if cc.compiler_type == "msvc" else ["-fopenmp"]
        super().build_extension(ext)


ext_modules = []
if os.environ.get("FASTSCHED_NO_EXT_BUILD") != "1":
    ext_modules.append(Extension(
        "fastsched._cpu_ext", sources=["setup_ext/cpu_ext.cpp"],
        include_dirs=["setup_ext", "setup_ext/generated"],
        depends=["setup_ext/kernels.h", "kernels/layout.py"], language="c++", optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
