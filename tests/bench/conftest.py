"""The scripts under bench/ loaded as modules (they are run as ``python bench/NAME.py``, not
imported from a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def bench_script():
    """load(NAME): bench/NAME.py as a module, registered in sys.modules under NAME (dataclasses
    and pickling look their module up there)."""
    return _load
