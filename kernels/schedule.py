"""Triton evaluation of a fastsched schedule table (see ``fastsched.schedules._core``).

``schedule_value`` is a ``@triton.jit`` device function other kernels call with a step loaded from
device memory: it reads the float64 segment table, finds the row by counting the starts that are
``<= t`` (branch-free, vectorised over ``SEG_BLOCK`` rows at a time) and evaluates every shape with
``tl.where``. All arithmetic is float64: the finalize launch of an optimizer step evaluates it once,
so the cost is nil, and fp32 ``cos``/``exp`` would put 1e-7 relative error into the learning rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout as L  # module attributes: constants to compiled Triton and the interpreter

_PI = tl.constexpr(3.141592653589793)


@triton.jit
def _pow(base, exponent):
    return tl.exp(exponent * tl.log(base))


@triton.jit
def schedule_value(seg_ptr, n_seg, t, SEG_BLOCK: tl.constexpr):
    """Value of the schedule table at ``t`` (a float64 block of any 1-D shape, e.g. ``[1]``)."""
    count = tl.zeros(t.shape, dtype=tl.int32)
    for s0 in range(0, n_seg, SEG_BLOCK):
        rows = s0 + tl.arange(0, SEG_BLOCK)
        starts = tl.load(seg_ptr + rows * L.SEG_COLS + L.SEG_START, mask=rows < n_seg,
                         other=float("inf"))
        count += tl.sum((starts[None, :] <= t[:, None]).to(tl.int32), axis=1)
    idx = tl.maximum(count - 1, 0)
    base = seg_ptr + idx * L.SEG_COLS
    start = tl.load(base + L.SEG_START)
    length = tl.load(base + L.SEG_LENGTH)
    shape = tl.load(base + L.SEG_SHAPE)
    v0 = tl.load(base + L.SEG_V0)
    v1 = tl.load(base + L.SEG_V1)
    a = tl.load(base + L.SEG_A)
    b = tl.load(base + L.SEG_B)
    c = tl.load(base + L.SEG_C)

    x = tl.maximum(t - start, 0.0)
    p = tl.minimum(tl.maximum(x / length, 0.0), 1.0)
    p = tl.where(p != p, 0.0, p)
    dv = v0 - v1

    lin = v0 + (v1 - v0) * p
    cosv = v1 + dv * _pow(0.5 * (1.0 + tl.cos(p * _PI)), a)  # tensor first: the interpreter
    # turns constexpr * tensor into a constexpr
    poly = v1 + dv * _pow(1.0 - p, a)
    powd = v1 + dv * (1.0 - _pow(p, a))
    geo = tl.where(v0 == 0.0, v0, v0 * _pow(v1 / v0, p))  # v0 = 0: a schedule scaled by 0
    e = x / b
    e = tl.where(c != 0.0, tl.floor(e), e)
    exp_rate = v1 + dv * _pow(a, e)
    inv_sqrt = v1 + dv / tl.sqrt(1.0 + x / a)
    rex = v1 + dv * (1.0 - p) / (1.0 - a * p)
    power = tl.minimum(v0, v1 * _pow((x + a) * c, b))
    h1 = 1.0 / tl.sqrt(1.0 + a) - 1.0
    hp = 1.0 / tl.sqrt(1.0 + a * p) - 1.0
    inv_sqrt_cd = v0 + (v1 - v0) * hp / tl.where(h1 == 0.0, 1.0, h1)

    out = v0
    out = tl.where(shape == L.SHAPE_LINEAR, lin, out)
    out = tl.where(shape == L.SHAPE_COSINE, cosv, out)
    out = tl.where(shape == L.SHAPE_POLY, poly, out)
    out = tl.where(shape == L.SHAPE_POW_DECAY, powd, out)
    out = tl.where(shape == L.SHAPE_GEOMETRIC, geo, out)
    out = tl.where(shape == L.SHAPE_EXP_RATE, exp_rate, out)
    out = tl.where(shape == L.SHAPE_INV_SQRT, inv_sqrt, out)
    out = tl.where(shape == L.SHAPE_REX, rex, out)
    out = tl.where(shape == L.SHAPE_POWER, power, out)
    out = tl.where(shape == L.SHAPE_INV_SQRT_CD, inv_sqrt_cd, out)
    return out


@triton.jit
def _schedule_eval_kernel(seg_ptr, n_seg, steps_ptr, out_ptr, n_steps,
                          BLOCK: tl.constexpr, SEG_BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_steps
    t = tl.load(steps_ptr + offs, mask=mask, other=0).to(tl.float64)
    val = schedule_value(seg_ptr, n_seg, t, SEG_BLOCK)
    tl.store(out_ptr + offs, val, mask=mask)


def evaluate_schedule(table: torch.Tensor, steps: torch.Tensor, block: int | None = None,
                      seg_block: int = 64) -> torch.Tensor:
    """Evaluate a ``(n, SEG_COLS)`` float64 segment table at ``steps`` with the Triton kernel.

    Returns a float64 tensor of ``steps``' shape. ``table`` and ``steps`` must be on the same
    device (CUDA, or CPU under ``TRITON_INTERPRET=1``). Negative steps evaluate as step 0 (no
    check: it would synchronise with the host).
    """
    if table.dtype != torch.float64 or table.dim() != 2 or table.shape[1] != L.SEG_COLS:
        raise ValueError(f"table must be a float64 (n, {L.SEG_COLS}) tensor, got {table.dtype} "
                         f"{tuple(table.shape)}")
    if table.device != steps.device:
        raise ValueError(f"table and steps must share a device, got {table.device} and "
                         f"{steps.device}")
    flat = steps.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float64, device=steps.device)
    n = flat.numel()
    if block is None:
        # The interpreter pays per program, not per element: 10,000 steps take 1.1 s at
        # BLOCK=256 and 0.06 s at BLOCK=16384 on a 2-core CPU. On a GPU, 256 keeps the
        # (BLOCK, SEG_BLOCK) comparison of the row search small.
        on_gpu = steps.device.type == "cuda"
        block = 256 if on_gpu else min(16384, max(16, triton.next_power_of_2(n)))
    if n:
        grid = (triton.cdiv(n, block),)
        _schedule_eval_kernel[grid](table.contiguous(), table.shape[0], flat, out, n,
                                    BLOCK=block, SEG_BLOCK=seg_block)
    return out.reshape(steps.shape)
