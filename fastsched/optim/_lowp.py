"""Below fp32: stochastic rounding to bf16 and block-scaled 8-bit optimizer states, in PyTorch.

This module is the definition every executor follows bit for bit (the Triton kernels in
``fastsched.kernels.optim``, the C++ executor in ``setup_ext/kernels.h``, the reference in
``fastsched.optim._reference``), and the codec of the state dict (quantise on load, dequantise
on export).

**Stochastic rounding** (Gupta et al. 2015, arXiv 1502.02551; bf16 training: Zamirai et al.
2020, arXiv 2010.06192): an fp32 value ``x`` between two bf16 neighbours is rounded up with
probability equal to its distance from the lower one in units of the gap, so ``E[round(x)] = x``:
the 16 low bits of ``x``'s fp32 pattern plus a uniform 16-bit integer carry into the kept bits
exactly that often. The integer comes from a counter-based generator (no state, any element in
any order): ``fmix32`` (MurmurHash3's finaliser, a bijection of 32-bit words with full
avalanche) over the words (seed, parameter's position in ``param_groups``) on the host
(:func:`sr_key`), then the tensor's step, then the element's index in the whole parameter on the
device (:func:`sr_bits`). The same (seed, step, position, index) gives the same bits on every
backend and under any sharding.

**8-bit states** (Dettmers et al. 2022, arXiv 2110.02861: block-wise quantisation; the code
follows the fp8 block-scaled states of torchao's ``AdamWFp8``): the flat tensor in blocks of
``Q_BLOCK`` = 256 elements, one float32 scale per block (absmax / ``Q_TOP``), each element a
float-like code: ``exp_avg`` and ``momentum_buffer`` sign + 4 exponent + 3 mantissa bits (bias
15: 18 binades below the block's absmax, subnormals included), ``exp_avg_sq`` 5 exponent + 3
mantissa bits without a sign (bias 31: 34 binades, so that a small second moment never rounds to
0 while its first moment does not, which would turn ``m / (sqrt(v) + eps)`` into ``m / eps``).
Rounding is to nearest even on the fp32 bits (relative error at most 2^-4). 256-element blocks:
one outlier coarsens 255 neighbours only; the scales cost 4 B / 256 = 0.016 B per element.
Arithmetic codes (no 256-entry map and binary search, as bitsandbytes' dynamic map needs) cost a
few integer operations per element on every backend.
"""

from __future__ import annotations

import math

import torch

from ..kernels import layout as L

__all__ = ["STATE_CODES", "storage_flat", "fmix32", "sr_key", "sr_bits", "stochastic_round_bf16",
           "quantize", "scaled_blocks", "dequantize", "n_blocks", "MIN_8BIT_SIZE"]

#: tensors with fewer elements keep float32 states under ``state_dtype="8bit"`` (as
#: bitsandbytes' ``min_8bit_size``): biases and norms are few bytes and the most sensitive
MIN_8BIT_SIZE = 4096
_M32 = 0xFFFFFFFF
#: the STATE_* code of each storage dtype of the states (uint8: 8-bit codes)
STATE_CODES = {torch.float32: L.STATE_F32, torch.bfloat16: L.STATE_BF16,
               torch.float16: L.STATE_F16, torch.float64: L.STATE_F64, torch.uint8: L.STATE_8BIT}


def storage_flat(t):
    """A dense tensor as a flat view in storage order (the order the kernels walk it in)."""
    if t is None or t.is_contiguous():
        return None if t is None else t.reshape(-1)
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    return t.permute(perm).reshape(-1)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow."""
    lo = (h * (c & 0xFFFF)) & _M32
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(h):
    """MurmurHash3's 32-bit finaliser; ``h``: a Python int or an int64 tensor of 32-bit values."""
    if isinstance(h, int):
        h &= _M32
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _M32
        return h ^ (h >> 16)
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sr_key(seed: int, position: int) -> int:
    """The host half of a tensor's key: ``seed`` (0 <= seed < 2^64) and the parameter's position
    in the optimizer's ``param_groups`` (flattened). Column ``T_SR_KEY`` of the tensors table."""
    s = fmix32(fmix32(seed & _M32) ^ (seed >> 32))
    return fmix32(s ^ (position & _M32))


def sr_bits(key: int, step, index: torch.Tensor) -> torch.Tensor:
    """The 32 random bits of each element: ``c = fmix32(key ^ step)`` (``step``: the tensor's
    step after this update, an integer or a 0-d tensor), then ``fmix32(fmix32(lo ^ c) + hi)``
    with (lo, hi) the 32-bit halves of the element's index in the whole parameter
    (``index``: int64). Returns int64 values < 2^32."""
    if isinstance(step, torch.Tensor):
        c = fmix32(torch.as_tensor(key, dtype=torch.int64, device=index.device)
                   ^ step.to(device=index.device, dtype=torch.int64))
    else:
        c = fmix32(key ^ (int(step) & _M32))
    lo, hi = index & _M32, index >> 32
    return fmix32((fmix32(lo ^ c) + hi) & _M32)


def stochastic_round_bf16(x: torch.Tensor, key: int, step, elem0: int = 0) -> torch.Tensor:
    """fp32 ``x`` (any shape; its flat element ``i`` has index ``elem0 + i``) rounded to bf16
    stochastically: ``(bits + (r & 0xFFFF)) >> 16``; NaN -> 0x7FC0 (torch's canonical NaN)."""
    x = x.to(torch.float32).contiguous()
    idx = elem0 + torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    r = sr_bits(key, step, idx).reshape(x.shape)
    bits = x.view(torch.int32).to(torch.int64) & _M32
    out = ((bits + (r & 0xFFFF)) >> 16) & 0xFFFF
    out = torch.where(torch.isnan(x), 0x7FC0, out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # low 16 bits


def n_blocks(numel: int) -> int:
    """Scales of an 8-bit state of ``numel`` elements."""
    return -(-numel // L.Q_BLOCK)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & _M32


def _float(bits: torch.Tensor) -> torch.Tensor:
    b = torch.where(bits >= 2**31, bits - 2**32, bits)
    return b.to(torch.int32).view(torch.float32)


def _encode(x: torch.Tensor, bias: int) -> torch.Tensor:
    """Magnitude codes of fp32 ``x`` in [0, Q_TOP] (int64): round to nearest even."""
    M = L.Q_MANT
    c = 2.0 ** (24 - bias - M)  # ulp(c) = the subnormal quantum 2^(1 - bias - M)
    sub = _bits(x + c) - _bits(torch.tensor(c, dtype=torch.float32))
    b = _bits(x)
    sh = 23 - M
    r = (b + (1 << (sh - 1)) - 1 + ((b >> sh) & 1)) >> sh
    normal = r - ((127 - bias) << M)
    return torch.where(x < 2.0 ** (1 - bias), sub, normal)


def _decode(mag: torch.Tensor, bias: int) -> torch.Tensor:
    M = L.Q_MANT
    sub = mag.to(torch.float32) * 2.0 ** (1 - bias - M)
    normal = _float((mag + ((127 - bias) << M)) << (23 - M))
    return torch.where(mag < (1 << M), sub, normal)


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, float32 scales of its ``Q_BLOCK`` blocks).

    Per block: ``absmax`` of the fp32 values, ``scale = absmax / Q_TOP`` (stored, one fp32
    division), ``inv = fp32(1 / absmax) * Q_TOP`` (two roundings; 0 when absmax is 0); per
    element ``a = min(|x| * inv, Q_TOP)``, code = magnitude code of ``a`` (| 0x80 when
    ``x < 0``, signed codes). A block whose absmax is not finite gets magnitude 0 (the sign bits
    kept) and scale NaN (its values decode to NaN: a non-finite state is not lost silently; only
    ``nonfinite="ignore"`` lets one through, where torch's would hold it).
    """
    blocks, a, scale = scaled_blocks(x)
    mag = _encode(a, L.Q_BIAS_SIGNED if signed else L.Q_BIAS_UNSIGNED)
    if signed:
        mag = mag | torch.where(blocks < 0, 0x80, 0)
    codes = mag.reshape(-1)[:x.numel()].to(torch.uint8).reshape(x.shape)
    return codes, scale


def scaled_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`quantize` encodes: (fp32 values of ``x`` in ``[blocks, Q_BLOCK]``, zero
    padded; their magnitudes ``a = min(|x| * inv, Q_TOP)``, 0 in a non-finite block; the
    float32 scale of each block)."""
    x32 = x.detach().to(torch.float32).reshape(-1)
    n = x32.numel()
    nb = n_blocks(n)
    pad = torch.zeros(nb * L.Q_BLOCK, dtype=torch.float32, device=x32.device)
    pad[:n] = x32
    blocks = pad.reshape(nb, L.Q_BLOCK)
    absmax = blocks.abs().amax(1) if nb else torch.zeros(0, device=x32.device)
    absmax = torch.where(torch.isnan(blocks).any(1), float("nan"), absmax)
    finite = torch.isfinite(absmax)
    scale = torch.where(finite, absmax / L.Q_TOP, float("nan")).to(torch.float32)
    # the reciprocal rounded, then the product rounded (torch's scalar / tensor, spelled out)
    inv = torch.where(finite & (absmax > 0), torch.reciprocal(absmax) * L.Q_TOP,
                      0.0).to(torch.float32)
    a = torch.clamp(blocks.abs() * inv[:, None], max=L.Q_TOP)
    a = torch.where(finite[:, None], a, 0.0)  # a non-finite block: codes 0, scale NaN
    return blocks, a, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of ``codes`` (any shape; flat blocks of ``Q_BLOCK``) with their ``scale``:
    ``decode(magnitude) * scale``, negated for a signed code with 0x80 set."""
    c = codes.reshape(-1).to(torch.int64)
    n = c.numel()
    blk = torch.arange(n, device=c.device) // L.Q_BLOCK
    s = scale.to(torch.float32).reshape(-1)[blk]  # (a DTensor's scales: (rows, blocks a row))
    if signed:
        v = _decode(c & 0x7F, L.Q_BIAS_SIGNED) * s
        v = torch.where(c >= 0x80, -v, v)
    else:
        v = _decode(c, L.Q_BIAS_UNSIGNED) * s
    return v.reshape(codes.shape)


def max_rel_error() -> float:
    """The largest relative error of one code against the block's absmax scale: half a
    mantissa step at the top, 2^-(Q_MANT + 1), plus the subnormal quantum (tests derive their
    bounds from this)."""
    return 2.0 ** -(L.Q_MANT + 1) + math.ldexp(1.0, 1 - L.Q_BIAS_SIGNED - L.Q_MANT)
