"""Benchmarks run anywhere: without a GPU, Triton kernels run under the interpreter on CPU.

``TRITON_INTERPRET`` must be set before triton is imported (as in ``tests/conftest.py``).
Run with ``pytest bench/ --benchmark-only``; ``pytest`` alone collects only ``tests/``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: device on which the Triton kernels are timed: the GPU when there is one, else the CPU
#: through the interpreter (which measures the interpreter, not a kernel).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
