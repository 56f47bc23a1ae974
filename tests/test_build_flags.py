"""The compiler-dependent flags of the compiled CPU backend's build (setup_ext/build_flags.py),
against the C++ compiler Python's build uses here: OpenMP and the architecture are what the
compiler takes, the fallbacks engage where it takes neither, and an architecture it refuses is
an error that names FASTSCHED_CPU_ARCH."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "setup_ext"))
import build_flags  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def cc():
    from setuptools._distutils import ccompiler, sysconfig

    c = ccompiler.new_compiler()
    sysconfig.customize_compiler(c)
    if c.compiler_type == "msvc":
        pytest.skip("MSVC takes fixed flags (/openmp)")
    if not build_flags.links(c, [], []):
        pytest.skip("no working C++ compiler")
    return c


def test_links_tells_a_flag_the_compiler_refuses(cc):
    assert build_flags.links(cc, ["-O2"], [])
    assert not build_flags.links(cc, ["-march=no-such-architecture"], [])
    assert not build_flags.links(cc, [], [], "#include <no_such_header.h>\nint main() {}\n")
    # a library the linker cannot find: a program is linked, so this fails
    assert not build_flags.links(cc, [], ["-lno_such_library_fastsched"])


def test_openmp_flags(cc, monkeypatch):
    monkeypatch.delenv("FASTSCHED_OPENMP", raising=False)
    if not build_flags.links(cc, ["-fopenmp"], ["-fopenmp"], build_flags.OPENMP_PROBE):
        pytest.skip("this compiler has no -fopenmp")
    assert build_flags.openmp_flags(cc) == (["-fopenmp"], ["-fopenmp"])
    monkeypatch.setenv("FASTSCHED_OPENMP", "0")
    assert build_flags.openmp_flags(cc) == ([], [])


def test_no_openmp_builds_for_one_thread_with_a_warning(cc, monkeypatch):
    """A compiler that builds no OpenMP program (Apple clang without libomp): no flags, and a
    warning that says so and how to get it."""
    monkeypatch.delenv("FASTSCHED_OPENMP", raising=False)
    monkeypatch.setattr(build_flags, "OPENMP_PROBE",
                        "#include <no_such_omp_header.h>\nint main() { return 0; }\n")
    with pytest.warns(UserWarning, match="no OpenMP program.*one thread"):
        assert build_flags.openmp_flags(cc) == ([], [])


def test_macos_builds_without_openmp_unless_asked(cc, monkeypatch):
    """torch's macOS wheels carry their own libomp; a second one aborts the process at import
    (OMP Error #15), so macOS builds have no OpenMP unless FASTSCHED_OPENMP=1."""
    monkeypatch.setattr(build_flags.sys, "platform", "darwin")
    monkeypatch.delenv("FASTSCHED_OPENMP", raising=False)
    with pytest.warns(UserWarning, match="macOS.*without OpenMP.*FASTSCHED_OPENMP=1"):
        assert build_flags.openmp_flags(cc) == ([], [])
    monkeypatch.setenv("FASTSCHED_OPENMP", "1")
    if build_flags.links(cc, ["-fopenmp"], ["-fopenmp"], build_flags.OPENMP_PROBE):
        assert build_flags.openmp_flags(cc) == (["-fopenmp"], ["-fopenmp"])
    monkeypatch.setenv("FASTSCHED_OPENMP", "yes")
    with pytest.raises(ValueError, match="FASTSCHED_OPENMP must be 0, 1 or auto, got 'yes'"):
        build_flags.openmp_flags(cc)


def test_arch_flags(cc):
    assert build_flags.arch_flags(cc, "") == []
    native = build_flags.arch_flags(cc, "native")
    assert native in (["-march=native"], ["-mcpu=native"], [])
    if build_flags.links(cc, ["-march=native"], []):
        assert native == ["-march=native"]
    with pytest.raises(RuntimeError, match=r"FASTSCHED_CPU_ARCH='bogus'.*-march=bogus"):
        build_flags.arch_flags(cc, "bogus")


def test_the_extension_reports_its_build():
    """The installed extension says what it was built with (the bench records it)."""
    from fastsched.optim import _cpu

    if not _cpu.available():
        pytest.skip(f"no compiled CPU backend: {_cpu.reason()}")
    e = _cpu.ext()
    assert e.simd() in ("avx512", "avx2", "avx", "generic")
    assert e.half() in ("_Float16", "__fp16", "software")
    assert isinstance(e.openmp(), bool)


def _setup_build_ext(tmp_path, **env):
    """`python setup.py build_ext` into tmp_path with these environment variables."""
    import subprocess

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib",
                        str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                       cwd=root, env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    return r, list((tmp_path / "lib").rglob("_cpu_ext*"))


def test_without_a_compiler_the_install_goes_on(tmp_path, cc):
    """No working compiler: the optional extension is skipped with a warning (CPU steps then
    run the reference backend), the build itself succeeds."""
    bad = "/nonexistent/fastsched-no-compiler"
    r, built = _setup_build_ext(tmp_path, CC=bad, CXX=bad, LDSHARED=f"{bad} -shared")
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'building extension "fastsched._cpu_ext" failed' in r.stdout + r.stderr
    assert "builds no program" in r.stdout + r.stderr
    assert built == []


def test_an_architecture_the_compiler_refuses_is_an_error(tmp_path, cc):
    r, built = _setup_build_ext(tmp_path, FASTSCHED_CPU_ARCH="no-such-arch")
    assert r.returncode != 0
    assert "FASTSCHED_CPU_ARCH='no-such-arch'" in r.stderr
    assert built == []
