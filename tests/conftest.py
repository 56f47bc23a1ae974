"""Test configuration: without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before triton is imported (it decides at decoration time whether
``@triton.jit`` functions are compiled or interpreted), so it is set here, first.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the host helper of step() (fastsched/optim/_hostext.py) is built in the foreground at the
# first step, so that every test runs the same path from its first step on;
# tests/optim/test_host_path.py runs both paths side by side
os.environ.setdefault("FASTSCHED_HOST_EXT", "wait")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw a fixed sequence of examples by default (derandomize), so a failure
# reproduces and CI cannot fail by chance; HYPOTHESIS_PROFILE=explore draws new examples.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

#: device on which the Triton backend is exercised: the GPU when there is one, else the CPU
#: through the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


@pytest.fixture(scope="session")
def bench_script():
    """load(NAME): bench/NAME.py as a module (those scripts run as ``python bench/NAME.py``, not
    from a package), registered in sys.modules under NAME (dataclasses and pickling look their
    module up there). Here, not in a conftest.py under tests/: a second module named conftest
    would shadow this one for ``from conftest import ...``."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def compile_check(bench_script):
    """bench/compile_check.py, loaded once, with ``variants(lowp)`` computed once per ``lowp``:
    the enumeration runs the host path of every configuration (~12 s, ~15 s with the variants
    below fp32 on a 2-core machine), and three tests of tests/kernels read the same lists. Each
    call returns a new list of the same variants."""
    cc = bench_script("compile_check")
    enumerate_variants, done = cc.variants, {}

    def variants(lowp=False):
        if lowp not in done:
            done[lowp] = enumerate_variants(lowp)
        vs, n_cfg = done[lowp]
        return list(vs), n_cfg

    cc.variants = variants
    return cc
