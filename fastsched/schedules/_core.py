"""Schedules as data: a short table of segments that Python, torch and Triton all evaluate.

Every named schedule compiles to a table of segments. Row ``i`` of the table is

    (start, length, shape, v0, v1, a, b, c)

and covers the steps ``start_i <= t < start_{i+1}``; the last row covers every later step. Inside a
segment the local clock is ``x = t - start`` and the progress is ``p = clamp(x / length, 0, 1)``
(``length`` may be ``inf`` for unbounded phases, then ``p = 0``). The value is one of the shapes
below, each homogeneous of degree one in ``(v0, v1)`` so that scaling a schedule scales ``v0`` and
``v1`` only:

    CONST        v0
    LINEAR       v0 + (v1 - v0) * p
    COSINE       v1 + (v0 - v1) * (0.5 * (1 + cos(pi * p))) ** a
    POLY         v1 + (v0 - v1) * (1 - p) ** a              (a = 0.5: HF "1-sqrt" warmup)
    POW_DECAY    v1 + (v0 - v1) * (1 - p ** a)              (a = 0.5: "1-sqrt", a = 2: "square")
    GEOMETRIC    v0 * (v1 / v0) ** p                        (exponential interpolation)
    EXP_RATE     v1 + (v0 - v1) * a ** (x / b)              (c != 0: floor(x / b), a staircase)
    INV_SQRT     v1 + (v0 - v1) / sqrt(1 + x / a)
    REX          v1 + (v0 - v1) * (1 - p) / (1 - a * p)
    POWER        min(v0, v1 * ((x + a) * c) ** b)           (Shen et al. power scheduler)
    INV_SQRT_CD  v0 + (v1 - v0) * h(p) / h(1),  h(q) = 1 / sqrt(1 + a * q) - 1

Device evaluation is branch-free: find the row by counting starts ``<= t``, compute every shape
and pick one with ``where`` (the form optax's ``join_schedules`` uses), so the same arithmetic runs
from a device step counter inside a kernel with no host synchronisation. Three implementations
evaluate a table, all in float64: :func:`evaluate_table` (vectorised torch, any device),
:func:`evaluate_rows` (plain Python floats for one step: about 6 us instead of about 0.9 ms for a
one-element torch evaluation on a 2-core CPU, which matters to an ``LRScheduler`` called every
step) and the Triton device function in ``fastsched.kernels.schedule``. The tests check that the
three agree.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from enum import IntEnum

import torch

from ..kernels import layout as L

__all__ = ["Shape", "Segment", "COLUMNS", "segments_to_table", "evaluate_table", "evaluate_rows"]


class Shape(IntEnum):
    """Shape codes stored in column ``SEG_SHAPE`` of a segment table; the values are declared
    once in ``fastsched.kernels.layout`` (``SHAPE_*``), which the Triton evaluator reads too."""

    CONST = L.SHAPE_CONST
    LINEAR = L.SHAPE_LINEAR
    COSINE = L.SHAPE_COSINE
    POLY = L.SHAPE_POLY
    POW_DECAY = L.SHAPE_POW_DECAY
    GEOMETRIC = L.SHAPE_GEOMETRIC
    EXP_RATE = L.SHAPE_EXP_RATE
    INV_SQRT = L.SHAPE_INV_SQRT
    REX = L.SHAPE_REX
    POWER = L.SHAPE_POWER
    INV_SQRT_CD = L.SHAPE_INV_SQRT_CD


COLUMNS = L.SEG_NAMES
# the columns in the order the evaluators unpack them
_COLS = (L.SEG_START, L.SEG_LENGTH, L.SEG_SHAPE, L.SEG_V0, L.SEG_V1, L.SEG_A, L.SEG_B, L.SEG_C)


@dataclass(frozen=True)
class Segment:
    """One row of a schedule table; see the module docstring for the shapes."""

    start: float
    length: float
    shape: Shape
    v0: float
    v1: float = 0.0
    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def shifted(self, offset: float) -> Segment:
        return Segment(self.start + offset, self.length, self.shape, self.v0, self.v1,
                       self.a, self.b, self.c)

    def scaled(self, factor: float) -> Segment:
        return Segment(self.start, self.length, self.shape, self.v0 * factor, self.v1 * factor,
                       self.a, self.b, self.c)

    def as_row(self) -> tuple[float, ...]:
        row = [0.0] * L.SEG_COLS
        for col, v in zip(_COLS, (self.start, self.length, int(self.shape), self.v0, self.v1,
                                  self.a, self.b, self.c)):
            row[col] = float(v)
        return tuple(row)


def segments_to_table(segments: list[Segment], device=None) -> torch.Tensor:
    """Pack segments into a contiguous ``(n, 8)`` float64 tensor (the device representation)."""
    if not segments:
        raise ValueError("a schedule needs at least one segment")
    if segments[0].start != 0:
        raise ValueError(f"the first segment must start at step 0, got {segments[0].start}")
    for prev, nxt in zip(segments, segments[1:]):
        if not nxt.start >= prev.start:
            raise ValueError("segment starts must be non-decreasing")
    return torch.tensor([s.as_row() for s in segments], dtype=torch.float64, device=device)


def _pow(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    # exp(b * log(x)): the same formula the kernel uses, so 0 ** positive = 0 on both sides.
    return torch.exp(exponent * torch.log(base))


def evaluate_table(table: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Evaluate a segment table at ``steps`` (any shape, any device) in float64.

    Steps must be non-negative; steps past the last segment's end hold its final value.
    """
    t = steps.to(torch.float64)
    table = table.to(device=t.device, dtype=torch.float64)
    starts = table[:, L.SEG_START].contiguous()
    idx = torch.searchsorted(starts, t.reshape(-1), right=True).reshape(t.shape) - 1
    idx = idx.clamp_(min=0)
    row = table[idx]  # (..., SEG_COLS)
    start, length, shape, v0, v1, a, b, c = (row[..., col] for col in _COLS)
    x = (t - start).clamp(min=0.0)
    p = (x / length).clamp(0.0, 1.0)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
    dv = v0 - v1
    one = torch.ones_like(p)

    lin = v0 + (v1 - v0) * p
    cos = v1 + dv * _pow(0.5 * (1.0 + torch.cos(math.pi * p)), a)
    poly = v1 + dv * _pow(1.0 - p, a)
    powd = v1 + dv * (1.0 - _pow(p, a))
    # v0 = 0 only for a schedule scaled by 0: 0 rather than 0 * (0/0) = nan
    geo = torch.where(v0 == 0, v0, v0 * _pow(v1 / v0, p))
    e = x / b
    e = torch.where(c != 0, torch.floor(e), e)
    exp_rate = v1 + dv * _pow(a, e)
    inv_sqrt = v1 + dv / torch.sqrt(1.0 + x / a)
    rex = v1 + dv * (1.0 - p) / (1.0 - a * p)
    power = torch.minimum(v0, v1 * _pow((x + a) * c, b))
    h1 = 1.0 / torch.sqrt(1.0 + a) - 1.0
    hp = 1.0 / torch.sqrt(1.0 + a * p) - 1.0
    inv_sqrt_cd = v0 + (v1 - v0) * hp / torch.where(h1 == 0, one, h1)

    out = v0.clone()
    for code, val in (
        (Shape.LINEAR, lin), (Shape.COSINE, cos), (Shape.POLY, poly), (Shape.POW_DECAY, powd),
        (Shape.GEOMETRIC, geo), (Shape.EXP_RATE, exp_rate), (Shape.INV_SQRT, inv_sqrt),
        (Shape.REX, rex), (Shape.POWER, power), (Shape.INV_SQRT_CD, inv_sqrt_cd),
    ):
        out = torch.where(shape == float(code), val, out)
    return out


def _pow_host(base: float, exponent: float) -> float:
    # exp(b * log(x)) with the torch/Triton conventions at x = 0 (log 0 = -inf).
    if base > 0:
        try:
            return math.exp(exponent * math.log(base))
        except OverflowError:
            return math.inf
    if base == 0:
        return 0.0 if exponent > 0 else (math.inf if exponent < 0 else math.nan)
    return math.nan


def evaluate_rows(rows: list[tuple[float, ...]], starts: list[float], t: float) -> float:
    """Value of a table (given as ``Segment.as_row()`` tuples and their starts) at one step.

    The plain-Python twin of :func:`evaluate_table` (same formulas, same clamping), for the host.
    """
    i = max(bisect_right(starts, t) - 1, 0)
    start, length, shape, v0, v1, a, b, c = (rows[i][col] for col in _COLS)
    x = max(t - start, 0.0)
    p = x / length if length != 0 else (math.nan if x == 0 else math.inf)
    p = 0.0 if math.isnan(p) else min(max(p, 0.0), 1.0)
    dv = v0 - v1
    shape = int(shape)
    if shape == Shape.CONST:
        return v0
    if shape == Shape.LINEAR:
        return v0 + (v1 - v0) * p
    if shape == Shape.COSINE:
        return v1 + dv * _pow_host(0.5 * (1.0 + math.cos(math.pi * p)), a)
    if shape == Shape.POLY:
        return v1 + dv * _pow_host(1.0 - p, a)
    if shape == Shape.POW_DECAY:
        return v1 + dv * (1.0 - _pow_host(p, a))
    if shape == Shape.GEOMETRIC:
        return v0 if v0 == 0 else v0 * _pow_host(v1 / v0, p)
    if shape == Shape.EXP_RATE:
        e = x / b
        return v1 + dv * _pow_host(a, math.floor(e) if c != 0 else e)
    if shape == Shape.INV_SQRT:
        return v1 + dv / math.sqrt(1.0 + x / a)
    if shape == Shape.REX:
        return v1 + dv * (1.0 - p) / (1.0 - a * p)
    if shape == Shape.POWER:
        return min(v0, v1 * _pow_host((x + a) * c, b))
    if shape == Shape.INV_SQRT_CD:
        h1 = 1.0 / math.sqrt(1.0 + a) - 1.0
        hp = 1.0 / math.sqrt(1.0 + a * p) - 1.0
        return v0 + (v1 - v0) * hp / (h1 if h1 != 0 else 1.0)
    raise ValueError(f"unknown shape code {shape}")
