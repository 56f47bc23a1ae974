"""Test helpers: tolerances per dtype, low-precision checks against a high-precision reference,
and parameter sets built to break multi-tensor kernels.

``TOLERANCES[dtype]`` holds the ``rtol``/``atol`` with which fastsched is compared to
``torch.optim`` in that dtype (``torch.testing.assert_close(ours, theirs, **TOLERANCES[dtype])``).
Low-precision results are best judged three ways (:func:`assert_low_precision_close`): the
error of ours against a float64 reference computed from the same inputs may be at most
``LOW_PRECISION_RATIO`` times torch's own error in the same dtype, plus a small absolute floor.

Example::

    from fastsched.testing import TOLERANCES, awkward_layouts
    layouts = awkward_layouts(block_size=256)
    params = [l.make(torch.randn(l.shape)) for l in layouts]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TOLERANCES", "LOW_PRECISION_RATIO", "LOW_PRECISION_FLOOR", "Layout",
           "awkward_layouts", "random_values", "max_abs_error", "assert_low_precision_close"]

#: Tolerances of fastsched against torch.optim in one dtype. float32: the relative error of
#: 1e-5 the optimizers promise; atol covers elements that cancel to near zero (50 steps of every
#: Adam / AdamW / SGD configuration at lr 1e-2 on O(1) values needed at most 1.0e-7 beyond the
#: 1e-5 relative, SGD; Adam 2.6e-8). bfloat16 / float16: two units in the last place (8 bits of
#: mantissa: 2^-7; 11 bits: 2^-10) plus an absolute floor, for results a few steps from a common
#: state (the Triton kernels against the reference backend: bit for bit in 5 of 6 50-step runs);
#: longer runs against torch are judged against float64 with :func:`assert_low_precision_close`.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}

#: ours may be at most this many times as far from the float64 reference as torch is
LOW_PRECISION_RATIO = 2.0

#: absolute floor of the three-way check, about a quarter of an ulp at 1: where torch's own error
#: is (nearly) zero, ours may still be that far (measured: none needed against torch fused=True
#: over 192 runs of 50 steps, where ours matched torch bit for bit in 99% of the Adam tensors)
LOW_PRECISION_FLOOR: dict[torch.dtype, float] = {
    torch.bfloat16: 2e-3,
    torch.float16: 2.5e-4,
    torch.float32: 1e-6,
}


@dataclass(frozen=True)
class Layout:
    """Shape and memory layout of one parameter.

    ``kind``: ``"contiguous"``; ``"permuted"`` (dense but not contiguous: the transpose of a
    contiguous tensor, dimensions reversed); ``"offset"`` (contiguous, but a view starting one
    element into a larger buffer, so its address is not 16-byte aligned).
    """

    shape: tuple[int, ...]
    kind: str = "contiguous"

    def __post_init__(self):
        if self.kind not in ("contiguous", "permuted", "offset"):
            raise ValueError(f"kind must be 'contiguous', 'permuted' or 'offset', got "
                             f"{self.kind!r}")
        if self.kind == "permuted" and len(self.shape) < 2:
            raise ValueError("a permuted layout needs at least two dimensions")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def make(self, values: torch.Tensor, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """A new tensor with this layout holding ``values`` (converted to ``dtype``/``device``).

        The result is a leaf tensor (it can be an ``nn.Parameter``-like optimizer parameter):
        for the ``"offset"`` layout it is a view of a private buffer one element longer.
        """
        if tuple(values.shape) != tuple(self.shape):
            raise ValueError(f"values of shape {tuple(values.shape)} for layout {self}")
        dtype = dtype or values.dtype
        device = device if device is not None else values.device
        if self.kind == "contiguous":
            out = torch.empty(self.shape, dtype=dtype, device=device)
        elif self.kind == "permuted":
            out = torch.empty(self.shape[::-1], dtype=dtype, device=device).permute(
                *reversed(range(len(self.shape))))
        else:
            buf = torch.empty(self.numel + 1, dtype=dtype, device=device)
            out = buf[1:].view(self.shape)
        out.copy_(values)
        return out

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped and laid out as ``t``'s layout would be, with ``t``'s values."""
        return self.make(t, dtype=t.dtype, device=t.device)


def awkward_layouts(block_size: int, *, permuted: bool = True, offset: bool = True,
                    empty: bool = False) -> list[Layout]:
    """Parameter layouts that break multi-tensor kernels.

    A 0-d tensor, a 1-element tensor, odd and prime sizes, ``block_size - 1``, ``block_size``,
    ``block_size + 1``, a tensor of a little over two blocks, a 3-d tensor, and optionally a
    permuted (dense, non-contiguous) matrix larger than a block, a view at an unaligned address
    and an empty tensor. About seven blocks' worth of elements in all.
    """
    b = block_size
    out = [Layout(()), Layout((1,)), Layout((7,)), Layout((b - 1,)), Layout((b,)),
           Layout((b + 1,)), Layout((2 * b + 3,)), Layout((3, 5, 7))]
    if permuted:
        out.append(Layout((b // 16 + 1, 17), "permuted"))
    if offset:
        out.append(Layout((b // 2 + 5,), "offset"))
    if empty:
        out.append(Layout((0, 3)))
    return out


def random_values(layouts: Sequence[Layout], generator: torch.Generator,
                  scale: float = 1.0) -> list[torch.Tensor]:
    """Standard normal float32 values (times ``scale``) for each layout, on the CPU."""
    return [torch.randn(l.shape, generator=generator, dtype=torch.float32) * scale
            for l in layouts]


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` computed in float64: 0.0 for empty tensors, ``inf`` where
    a difference is not finite (NaN or infinity in either tensor, unless both hold the same
    infinity)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} and {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64).cpu()
    b = expected.detach().to(torch.float64).cpu()
    d = torch.where(a == b, 0.0, a - b).abs()  # equal infinities: no error
    if not bool(torch.isfinite(d).all()):
        return math.inf
    return float(d.max())


def assert_low_precision_close(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor],
                               reference: Sequence[torch.Tensor], *,
                               ratio: float = LOW_PRECISION_RATIO, floor: float | None = None,
                               msg: str = "") -> list[tuple[float, float]]:
    """Three-way check for low-precision results, tensor by tensor.

    ``max|ours - reference| <= ratio * max|theirs - reference| + floor``, where ``theirs`` is
    torch in the same dtype and ``reference`` the same computation in float64 (or float32) from
    the same initial values. ``floor`` defaults to ``LOW_PRECISION_FLOOR[dtype of ours]``.
    Returns the (ours, theirs) errors of every tensor.
    """
    if not (len(ours) == len(theirs) == len(reference)):
        raise ValueError("ours, theirs and reference must have the same number of tensors")
    errors = []
    bad = []
    for i, (a, b, r) in enumerate(zip(ours, theirs, reference)):
        fl = LOW_PRECISION_FLOOR.get(a.dtype, 0.0) if floor is None else floor
        ea, eb = max_abs_error(a, r), max_abs_error(b, r)
        errors.append((ea, eb))
        if not ea <= ratio * eb + fl:
            bad.append(f"tensor {i} (shape {tuple(a.shape)}, {a.dtype}): error {ea:.3g} vs "
                       f"the reference, torch's {eb:.3g} (allowed {ratio:g} x {eb:.3g} + "
                       f"{fl:.3g})")
    if bad:
        raise AssertionError((msg + ": " if msg else "") + "; ".join(bad))
    return errors
