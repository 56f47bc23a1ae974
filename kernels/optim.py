"""Multi-tensor optimizer kernels: the passes of one fused optimizer step.

Layout: every table, column and code is declared once in ``fastsched.kernels.layout`` (imported
here as ``L``; module attributes are constants to compiled Triton and to the interpreter) and
built by ``fastsched.optim._tables``.

Passes of a step:

1. statistics (only when clipping, the guard or statistics are on): one program per block of
   every gradient writes (sum g^2, sum |g|, non-finite count); a per-tensor reduce launch sums a
   tensor's blocks in a fixed order (deterministic, unlike float atomics), so the clip coefficient
   is reproducible run to run.
2. finalize: one program reads the step counter from device memory, evaluates the schedule
   (``schedule.schedule_value``), the global norms, the clip coefficient and the skip flag, and
   every per-tensor scalar in float64 (fp32 ``1 - beta2 ** t`` cancels catastrophically at small
   ``t``: 1e-4 relative error after 6 steps on an H100, against 1.7e-5 in float64), then advances
   the counters (not on a skipped step).
3. update: one program per ``BLOCK`` elements of every tensor of one dtype in one launch. 2048-
   element blocks with 16-byte alignment hints reached 2.99 TB/s on an H100 (99% of copy), 2.53
   TB/s without the hints and 2.39 TB/s at 4096. The variants that cannot hold a block's worth
   of loads in registers (16-bit and 8-bit storage: fp32 working copies of every array) run
   pipelined instead: one program per run of blocks of a tensor, the next blocks copied into
   shared memory while one is computed (``_run_update_kernel``, ``_RUN_LAUNCH``). ALLoRA
   tensors go to a unit-tiled variant in which a program owns whole rows (or columns, or the
   tensor), so the unit norms cost no extra trip to memory for units that stay in cache between
   the norm and the update loop.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import layout as L
from . import replay as _replay
from .schedule import schedule_value

KIND_ADAM = L.KIND_ADAM
KIND_SGD = L.KIND_SGD


# -- statistics pass ----------------------------------------------------------------------------

@triton.jit
def _grad_stats_kernel(tensors_ptr, blocks_ptr, part_ptr, DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, MASK_BAD: tl.constexpr):
    """Partial sums of one block of a gradient (row ``pid`` of ``part``: its own, so no
    program reads what another writes). A full block of a 16-byte-aligned gradient loads with
    no mask (LDG.E.128); the last block and unaligned gradients with ``offs < numel``."""
    pid = tl.program_id(0)
    tidx = tl.load(blocks_ptr + pid * L.B_COLS + L.B_TENSOR)
    start = tl.multiple_of(tl.load(blocks_ptr + pid * L.B_COLS + L.B_START), BLOCK)
    numel = tl.load(tensors_ptr + tidx * L.T_COLS + L.T_NUMEL)
    ga = tl.load(tensors_ptr + tidx * L.T_COLS + L.T_G)
    offs = start + tl.arange(0, BLOCK)
    if (start + BLOCK <= numel) & ((ga & 15) == 0):
        g = tl.load(_typed(ga, DTYPE, True) + offs).to(tl.float32)
    else:
        g = tl.load(_typed(ga, DTYPE, False) + offs, mask=offs < numel, other=0.0)
        g = g.to(tl.float32)
    bad = (g != g) | (tl.abs(g) == float("inf"))
    ok = g  # nonfinite="ignore": the norms are non-finite, as clip_grad_norm_'s
    if MASK_BAD:  # guard on: non-finite elements are counted and left out of the norms
        ok = tl.where(bad, 0.0, g)
    tl.store(part_ptr + pid * L.PART_COLS + L.PART_SQ, tl.sum(ok * ok, 0))
    tl.store(part_ptr + pid * L.PART_COLS + L.PART_ABS, tl.sum(tl.abs(ok), 0))
    tl.store(part_ptr + pid * L.PART_COLS + L.PART_NONFINITE, tl.sum(bad.to(tl.float32), 0))


@triton.jit
def _reduce_kernel(first_ptr, part_ptr, tstat_ptr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    b0 = tl.load(first_ptr + t)
    b1 = tl.load(first_ptr + t + 1)
    sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    ab = tl.zeros([BLOCK_R], dtype=tl.float64)
    nf = tl.zeros([BLOCK_R], dtype=tl.float64)
    for s in range(b0, b1, BLOCK_R):
        i = s + tl.arange(0, BLOCK_R)
        m = i < b1
        row = part_ptr + i * L.PART_COLS
        sq += tl.load(row + L.PART_SQ, mask=m, other=0.0).to(tl.float64)
        ab += tl.load(row + L.PART_ABS, mask=m, other=0.0).to(tl.float64)
        nf += tl.load(row + L.PART_NONFINITE, mask=m, other=0.0).to(tl.float64)
    tl.store(tstat_ptr + t * L.TS_COLS + L.TS_SQ, tl.sum(sq, 0))
    tl.store(tstat_ptr + t * L.TS_COLS + L.TS_ABS, tl.sum(ab, 0))
    tl.store(tstat_ptr + t * L.TS_COLS + L.TS_NONFINITE, tl.sum(nf, 0))


# -- finalize -----------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["advance"])
def _finalize_kernel(tensors_ptr, groups_ptr, scal_ptr, sched_ptr, n_seg, clock_ptr, n_tensors,
                     cfg_ptr, tstat_ptr, ustat_ptr, gstat_ptr, lr_out_ptr, n_groups, hist_ptr,
                     hist_pos_ptr, hist_len, grad_scale_ptr, found_inf_ptr, advance,
                     KIND: tl.constexpr, STATS: tl.constexpr, CLIP: tl.constexpr,
                     GUARD: tl.constexpr, SCALER: tl.constexpr, HISTORY: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, SEG_BLOCK: tl.constexpr):
    """Program ``pid`` writes the per-tensor scalars of rows ``pid * BLOCK_T ...`` (grid-stride,
    so one program may walk every row); every program computes the global values itself.

    Free of intra-launch races: every program reads the clock, the norms' per-tensor sums
    (``TS_SQ``/``TS_ABS``/``TS_NONFINITE``), the groups, ``cfg`` and the scaler, and none of
    them writes those; per-tensor rows (``scal``, ``TS_NORM``, ``ustat``, the step counters) are
    read and written by their owner only; ``gstat``, ``lr_out`` and the ring buffer by program 0
    only. The clock is advanced by the first update launch (whose programs never read it), or
    here when ``advance`` is set, which the launcher allows only with a one-program grid.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    one = tl.zeros([1], dtype=tl.int32)
    clock = tl.load(clock_ptr + one)
    factor = schedule_value(sched_ptr, n_seg, clock.to(tl.float64), SEG_BLOCK)
    inv_scale = tl.full([1], 1.0, tl.float64)
    if SCALER:
        inv_scale = 1.0 / tl.load(grad_scale_ptr + one).to(tl.float64)
    grad_mul = tl.full([1], 1.0, tl.float64)
    active = tl.full([1], 1.0, tl.float64)
    gnorm = tl.zeros([1], dtype=tl.float64)
    gl1 = tl.zeros([1], dtype=tl.float64)
    nonfinite = tl.zeros([1], dtype=tl.float64)
    if STATS:
        # every program sums every tensor, in the same order (bit-identical results in each):
        # 1024-row chunks, 2 dependent rounds at 2,000 tensors where 128-row ones took 16
        for t0 in range(0, n_tensors, BLOCK_S):
            idx = t0 + tl.arange(0, BLOCK_S)
            m = idx < n_tensors
            ts = tstat_ptr + idx * L.TS_COLS
            gnorm += tl.sum(tl.load(ts + L.TS_SQ, mask=m, other=0.0), 0)
            gl1 += tl.sum(tl.load(ts + L.TS_ABS, mask=m, other=0.0), 0)
            nonfinite += tl.sum(tl.load(ts + L.TS_NONFINITE, mask=m, other=0.0), 0)
        gnorm = tl.sqrt(gnorm) * inv_scale
        gl1 = gl1 * inv_scale
        if CLIP:
            # torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), clamped at 1, applied
            # by multiplication even when it is 1 (no branch on a device value)
            max_norm = tl.load(cfg_ptr + L.CFG_MAX_GRAD_NORM + one)
            # (a nan norm gives a nan coefficient, as torch.clamp; tl.minimum may drop nan)
            coef = max_norm / (gnorm + 1e-6)
            grad_mul = tl.where(coef > 1.0, 1.0, coef)
        if GUARD:
            active = tl.where(nonfinite > 0.0, 0.0, 1.0)
    if SCALER:
        found = tl.load(found_inf_ptr + one).to(tl.float64)
        active = tl.where(found != 0.0, 0.0, active)
    clip_coef = grad_mul
    grad_mul = grad_mul * inv_scale
    for t0 in range(pid * BLOCK_T, n_tensors, nprog * BLOCK_T):
        idx = t0 + tl.arange(0, BLOCK_T)
        m = idx < n_tensors
        if STATS:
            ts = tstat_ptr + idx * L.TS_COLS
            sq = tl.load(ts + L.TS_SQ, mask=m, other=0.0)
            tl.store(ts + L.TS_NORM, tl.sqrt(sq) * inv_scale, mask=m)
            us = ustat_ptr + idx * L.US_COLS
            tl.store(us + L.US_PARAM_SQ, tl.zeros([BLOCK_T], tl.float32), mask=m)
            tl.store(us + L.US_UPDATE_SQ, tl.zeros([BLOCK_T], tl.float32), mask=m)
        row = tensors_ptr + idx * L.T_COLS
        grp = tl.load(row + L.T_GROUP, mask=m, other=0)
        gp = groups_ptr + grp * L.G_COLS
        lr = tl.load(gp + L.G_LR, mask=m, other=0.0) * factor
        wd = tl.load(gp + L.G_WEIGHT_DECAY, mask=m, other=0.0)
        maximize = tl.load(gp + L.G_MAXIMIZE, mask=m, other=0.0)
        inv_eta2 = tl.load(gp + L.G_INV_ETA2, mask=m, other=0.0)
        allora_update = tl.load(gp + L.G_ALLORA_UPDATE, mask=m, other=0.0)
        step_ptr = tl.load(row + L.T_STEP, mask=m, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr, mask=m, other=0.0).to(tl.float64)
        new_step = step + active
        sign = tl.where(maximize != 0.0, -1.0, 1.0)
        out = scal_ptr + idx * L.S_COLS
        if KIND == L.KIND_ADAM:
            b1 = tl.load(gp + L.G_ADAM_BETA1, mask=m, other=0.0)
            b2 = tl.load(gp + L.G_ADAM_BETA2, mask=m, other=0.0)
            decoupled = tl.load(gp + L.G_ADAM_DECOUPLED, mask=m, other=0.0)
            # torch.optim.Adam(W): bias corrections from the per-tensor step after increment
            bc1 = 1.0 - tl.exp(new_step * tl.log(b1))
            bc2 = 1.0 - tl.exp(new_step * tl.log(b2))
            tl.store(out + L.S_ADAM_STEP_SIZE, (lr / bc1).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_BC2_SQRT, tl.sqrt(bc2).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_DECAY_MUL,
                     tl.where(decoupled != 0.0, 1.0 - lr * wd, 1.0).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_L2, tl.where(decoupled != 0.0, 0.0, wd).to(tl.float32),
                     mask=m)
            # 1 - beta in float64, rounded once: fp32 1 - fp32(0.999) is 1.3e-5 off, a bias on v
            # that grew to 4e-4 relative error against torch.optim.Adam after 50 steps
            tl.store(out + L.S_ADAM_OMB1, (1.0 - b1).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_OMB2, (1.0 - b2).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_EPS,
                     tl.load(gp + L.G_ADAM_EPS, mask=m, other=0.0).to(tl.float32), mask=m)
            tl.store(out + L.S_ADAM_BC1, bc1.to(tl.float32), mask=m)
        else:
            # torch.optim.SGD: the first step copies d_p into the momentum buffer
            first = step == 0.0
            mom = tl.load(gp + L.G_SGD_MOMENTUM, mask=m, other=0.0)
            damp = tl.load(gp + L.G_SGD_DAMPENING, mask=m, other=0.0)
            tl.store(out + L.S_SGD_MOM_A, tl.where(first, 0.0, mom).to(tl.float32), mask=m)
            tl.store(out + L.S_SGD_MOM_B, tl.where(first, 1.0, 1.0 - damp).to(tl.float32),
                     mask=m)
            tl.store(out + L.S_SGD_WEIGHT_DECAY, wd.to(tl.float32), mask=m)
            tl.store(out + L.S_SGD_NESTEROV,
                     tl.load(gp + L.G_SGD_NESTEROV, mask=m, other=0.0).to(tl.float32), mask=m)
            tl.store(out + L.S_SGD_MOMENTUM, mom.to(tl.float32), mask=m)
        tl.store(out + L.S_GRAD_MUL, (sign * grad_mul).to(tl.float32), mask=m)
        tl.store(out + L.S_ACTIVE, active.to(tl.float32) + tl.zeros([BLOCK_T], tl.float32),
                 mask=m)
        tl.store(out + L.S_LR, lr.to(tl.float32), mask=m)
        tl.store(out + L.S_INV_ETA2, inv_eta2.to(tl.float32), mask=m)
        tl.store(out + L.S_ALLORA_UPDATE, allora_update.to(tl.float32), mask=m)
        tl.store(step_ptr, new_step.to(tl.float32), mask=m)
    if advance != 0:  # one-program grid only (no update launch this step): see the launcher
        tl.store(clock_ptr + one, clock + active.to(tl.int64))
    if STATS:
        if pid == 0:
            # every group's lr, also of groups without a gradient this step
            for g0 in range(0, n_groups, BLOCK_T):
                gi = g0 + tl.arange(0, BLOCK_T)
                gm = gi < n_groups
                tl.store(lr_out_ptr + gi,
                         tl.load(groups_ptr + gi * L.G_COLS + L.G_LR, mask=gm, other=0.0)
                         * factor, mask=gm)
            lr0 = tl.load(groups_ptr + L.G_LR + one) * factor
            skipped = 1.0 - active
            tl.store(gstat_ptr + L.STAT_GRAD_NORM + one, gnorm)
            tl.store(gstat_ptr + L.STAT_GRAD_NORM_L1 + one, gl1)
            tl.store(gstat_ptr + L.STAT_CLIP_COEF + one, clip_coef)
            tl.store(gstat_ptr + L.STAT_SKIPPED + one, skipped)
            tl.store(gstat_ptr + L.STAT_SKIP_COUNT + one,
                     tl.load(gstat_ptr + L.STAT_SKIP_COUNT + one) + skipped)
            tl.store(gstat_ptr + L.STAT_NONFINITE + one, nonfinite)
            tl.store(gstat_ptr + L.STAT_LR0 + one, lr0)
            tl.store(gstat_ptr + L.STAT_INV_SCALE + one, inv_scale)
            if HISTORY:
                pos = tl.load(hist_pos_ptr + one)
                slot = pos % hist_len
                h = hist_ptr + slot * L.H_COLS
                tl.store(h + L.H_STEP, clock.to(tl.float64))
                tl.store(h + L.H_GRAD_NORM, gnorm)
                tl.store(h + L.H_LR, lr0)
                tl.store(h + L.H_SKIPPED, skipped)
                tl.store(h + L.H_GRAD_NORM_L1, gl1)
                tl.store(hist_pos_ptr + one, pos + 1)


# -- update -------------------------------------------------------------------------------------
# Code shape (triton 3.6, sm_90; bench/compile_check.py prints and asserts it):
# * a full block of a tensor whose addresses are all 16-byte aligned takes a path with no mask
#   at all: only then does Triton prove 4 (fp32) / 8 (bf16, fp16) elements share a predicate and
#   emit LDG.E.128 / STG.E.128. The mask `offs < numel` (numel from the table) kept every access
#   scalar, and a mask rewritten as `offs < start + BLOCK` in a branch is merged back with it.
#   The partial last block and unaligned tensors take the masked path; the alignment test is
#   per tensor, at run time, so one unaligned view does not demote its launch.
# * the optional state (amsgrad's max_exp_avg_sq, SGD's momentum buffer) is a scalar branch on
#   its address, not a mask `where(has, mask, False)`: that mask stayed scalar and converted
#   layouts through shared memory.
# * update statistics: relaxed reductions (REDG). The default sem="acq_rel" compiled to
#   ATOMG between MEMBAR.ALL.GPU / CCTL.IVALL, draining every program's stores.
# * a skipped step (S_ACTIVE == 0) returns before any load or store.
# No program of an update launch reads what another one writes: a block (or unit tile) is
# owned by one program; scal, the tables and the clock are written by other launches, except
# the clock increment here, which no update program reads; ustat takes relaxed reductions only.

@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """fp32 -> storage dtype with round-to-nearest-even (bf16 by bit arithmetic).

    The GPU's cvt.rn.bf16.f32 gives the same bits; the Triton interpreter truncates fp32 -> bf16,
    which biases every step by half an ulp and would make CPU tests disagree with the GPU.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _typed(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A table address as a pointer; ALIGNED: 16-byte aligned (checked by the caller). Called
    once per path, so the hint sits on that path's own int-to-pointer cast only."""
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


# -- below fp32 (the definition: fastsched.optim._lowp; bit for bit) ------------------------------
# 8-bit codes: constants of the codec per bias (signed: exp_avg / momentum, unsigned: exp_avg_sq)
_Q_TOP = tl.constexpr(L.Q_TOP)
#: the magic constant 2^(24 - bias - Q_MANT) whose ulp is the subnormal quantum, and its bits
_Q_MAGIC_S = tl.constexpr(2.0 ** (24 - L.Q_BIAS_SIGNED - L.Q_MANT))
_Q_MAGIC_U = tl.constexpr(2.0 ** (24 - L.Q_BIAS_UNSIGNED - L.Q_MANT))
_Q_MAGIC_BITS_S = tl.constexpr((127 + 24 - L.Q_BIAS_SIGNED - L.Q_MANT) << 23)
_Q_MAGIC_BITS_U = tl.constexpr((127 + 24 - L.Q_BIAS_UNSIGNED - L.Q_MANT) << 23)
#: the smallest normal magnitude 2^(1 - bias) and the subnormal quantum 2^(1 - bias - Q_MANT)
_Q_NORMAL_S = tl.constexpr(2.0 ** (1 - L.Q_BIAS_SIGNED))
_Q_NORMAL_U = tl.constexpr(2.0 ** (1 - L.Q_BIAS_UNSIGNED))
_Q_QUANTUM_S = tl.constexpr(2.0 ** (1 - L.Q_BIAS_SIGNED - L.Q_MANT))
_Q_QUANTUM_U = tl.constexpr(2.0 ** (1 - L.Q_BIAS_UNSIGNED - L.Q_MANT))
#: exponent rebias of a normal code ((127 - bias) << Q_MANT)
_Q_REBIAS_S = tl.constexpr((127 - L.Q_BIAS_SIGNED) << L.Q_MANT)
_Q_REBIAS_U = tl.constexpr((127 - L.Q_BIAS_UNSIGNED) << L.Q_MANT)
_Q_SHIFT = tl.constexpr(23 - L.Q_MANT)
_Q_HALF = tl.constexpr((1 << (23 - L.Q_MANT - 1)) - 1)
_Q_SUBN = tl.constexpr(1 << L.Q_MANT)


@triton.jit
def _fmix32(h):
    """MurmurHash3's finaliser on uint32 (wrapping multiplications), as ``_lowp.fmix32``."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _sr_bf16(x, c, idx):
    """fp32 ``x`` -> bf16 with stochastic rounding (``_lowp.stochastic_round_bf16``): ``c`` =
    fmix32(key ^ step) (uint32, per tensor), ``idx`` the elements' int64 indices in the whole
    parameter; NaN -> 0x7FC0."""
    lo = idx.to(tl.uint32)  # the low 32 bits (truncation)
    hi = (idx >> 32).to(tl.uint32)
    r = _fmix32(_fmix32(lo ^ c) + hi)
    bits = x.to(tl.uint32, bitcast=True)
    out = (bits + (r & 0xFFFF)) >> 16
    out = tl.where(x != x, 0x7FC0, out)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _q_decode(code, scale, SIGNED: tl.constexpr):
    """fp32 values of uint8 ``code`` with their block's ``scale`` (``_lowp.dequantize``)."""
    c = code.to(tl.uint32)
    if SIGNED:
        mag = c & 0x7F
        sub = mag.to(tl.float32) * _Q_QUANTUM_S
        normal = ((mag + _Q_REBIAS_S) << _Q_SHIFT).to(tl.float32, bitcast=True)
    else:
        mag = c
        sub = mag.to(tl.float32) * _Q_QUANTUM_U
        normal = ((mag + _Q_REBIAS_U) << _Q_SHIFT).to(tl.float32, bitcast=True)
    v = tl.where(mag < _Q_SUBN, sub, normal) * scale
    if SIGNED:
        v = tl.where(c >= 0x80, -v, v)
    return v


@triton.jit
def _q_encode(x, mask, MASKED: tl.constexpr, SIGNED: tl.constexpr):
    """(uint8 codes, float32 scale per row) of fp32 ``x`` [rows, Q_BLOCK], each row one block
    (``_lowp.quantize``): elements outside ``mask`` (MASKED) are left out of the absmax; a row
    with a NaN or inf gets scale NaN and magnitude codes 0."""
    ax = tl.abs(x)
    bad = (x != x) | (ax == float("inf"))
    if MASKED:
        ax = tl.where(mask, ax, 0.0)
        bad = bad & mask
    absmax = tl.max(ax, 1)
    nonfinite = tl.max(bad.to(tl.int32), 1) != 0
    scale = tl.where(nonfinite, float("nan"), tl.div_rn(absmax, _Q_TOP))
    # torch's Q_TOP / absmax (Tensor.__rtruediv__) is reciprocal(absmax) * Q_TOP: two roundings
    inv = tl.where(nonfinite | (absmax == 0.0), 0.0, tl.div_rn(1.0, absmax) * _Q_TOP)
    a = ax * inv[:, None]
    a = tl.where(a > _Q_TOP, _Q_TOP, a)  # torch.clamp(max=): keeps a NaN (0 * inf)
    a = tl.where(nonfinite[:, None], 0.0, a)
    b = a.to(tl.uint32, bitcast=True)
    r = (b + _Q_HALF + ((b >> _Q_SHIFT) & 1)) >> _Q_SHIFT  # nearest even on the fp32 bits
    if SIGNED:
        sub = (a + _Q_MAGIC_S).to(tl.uint32, bitcast=True) - _Q_MAGIC_BITS_S
        mag = tl.where(a < _Q_NORMAL_S, sub, r - _Q_REBIAS_S)
        mag = mag | tl.where(x < 0.0, 0x80, 0).to(tl.uint32)
    else:
        sub = (a + _Q_MAGIC_U).to(tl.uint32, bitcast=True) - _Q_MAGIC_BITS_U
        mag = tl.where(a < _Q_NORMAL_U, sub, r - _Q_REBIAS_U)
    return mag.to(tl.uint8), scale


@triton.jit
def _raw(ptr, offs, mask, MASKED: tl.constexpr):
    """A load in the storage dtype (no conversion)."""
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _raw_s(ptr, q_ptr, offs, qoffs, mask, qmask, MASKED: tl.constexpr, SDTYPE: tl.constexpr):
    """(stored values, their rows' scales: SDTYPE uint8; else 0.0)."""
    if SDTYPE == tl.uint8:
        if MASKED:
            c = tl.load(ptr + offs, mask=mask, other=0)
            sc = tl.load(q_ptr + qoffs, mask=qmask, other=0.0)
        else:
            c = tl.load(ptr + offs)
            sc = tl.load(q_ptr + qoffs)
        return c, sc
    else:
        return _raw(ptr, offs, mask, MASKED), 0.0


@triton.jit
def _val_s(x, sc, SDTYPE: tl.constexpr, SIGNED: tl.constexpr):
    """fp32 values of a state loaded by :func:`_raw_s` (``sc``: its rows' scales)."""
    if SDTYPE == tl.uint8:
        return _q_decode(x, sc[:, None], SIGNED)
    else:
        return x.to(tl.float32)


@triton.jit
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    return _raw(ptr, offs, mask, MASKED).to(tl.float32)


@triton.jit
def _st(ptr, offs, x, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, _to_storage(x, DTYPE), mask=mask)
    else:
        tl.store(ptr + offs, _to_storage(x, DTYPE))


@triton.jit
def _ld_s(ptr, q_ptr, offs, qoffs, mask, qmask, MASKED: tl.constexpr, SDTYPE: tl.constexpr,
          SIGNED: tl.constexpr):
    """A state as fp32: its storage (the pointer's type), or 8-bit codes (SDTYPE uint8) times
    their block's scale (``q_ptr + qoffs``: one per row of a [rows, Q_BLOCK] tile)."""
    x, sc = _raw_s(ptr, q_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE)
    return _val_s(x, sc, SDTYPE, SIGNED)


@triton.jit
def _st_s(ptr, q_ptr, offs, qoffs, x, mask, qmask, MASKED: tl.constexpr, SDTYPE: tl.constexpr,
          SIGNED: tl.constexpr):
    """Store a state (fp32 ``x``): in its storage with nearest-even rounding, or as 8-bit codes
    and the scales of its rows (SDTYPE uint8: each row of the tile one whole Q_BLOCK)."""
    if SDTYPE == tl.uint8:
        codes, scale = _q_encode(x, mask, MASKED, SIGNED)
        if MASKED:
            tl.store(ptr + offs, codes, mask=mask)
            tl.store(q_ptr + qoffs, scale, mask=qmask)
        else:
            tl.store(ptr + offs, codes)
            tl.store(q_ptr + qoffs, scale)
    else:
        _st(ptr, offs, x, mask, SDTYPE, MASKED)


@triton.jit
def _st_p(p_ptr, w_ptr, offs, w, mask, sr_c, elem0, DTYPE: tl.constexpr, MASKED: tl.constexpr,
          MODE: tl.constexpr):
    """Store the new fp32 parameter ``w``: MODE_MASTER: into the fp32 master and, rounded to
    nearest even, into the parameter; MODE_SR (bf16): stochastically rounded (``sr_c``:
    fmix32(key ^ step), ``elem0``: the index of the local tensor's first element); else rounded
    to nearest even."""
    if (MODE & L.MODE_MASTER) != 0:
        _st(w_ptr, offs, w, mask, tl.float32, MASKED)
        _st(p_ptr, offs, w, mask, DTYPE, MASKED)
    elif (MODE & L.MODE_SR) != 0:
        tl.static_assert(DTYPE == tl.bfloat16, "stochastic rounding: bf16 parameters only")
        x = _sr_bf16(w, sr_c, elem0 + offs)
        if MASKED:
            tl.store(p_ptr + offs, x, mask=mask)
        else:
            tl.store(p_ptr + offs, x)
    else:
        _st(p_ptr, offs, w, mask, DTYPE, MASKED)


@triton.jit
def _sr_prologue(row, MODE: tl.constexpr):
    """(fmix32(key ^ step), index of the first element) of a MODE_SR tensor: the step is the
    tensor's counter after this step's increment (finalize wrote it); (0, 0) otherwise."""
    if (MODE & L.MODE_SR) != 0:
        key = tl.load(row + L.T_SR_KEY).to(tl.uint32)
        step = tl.load(tl.load(row + L.T_STEP).to(tl.pointer_type(tl.float32)))
        return _fmix32(key ^ step.to(tl.uint32)), tl.load(row + L.T_ELEM0)
    else:
        return 0, 0


@triton.jit
def _scalars(scal_ptr, tidx, KIND: tl.constexpr, STATS: tl.constexpr):
    """The per-tensor scalars of the update, loaded once per program (not per chunk)."""
    sc = scal_ptr + tidx * L.S_COLS
    grad_mul = tl.load(sc + L.S_GRAD_MUL)
    if KIND == L.KIND_ADAM:
        c0 = tl.load(sc + L.S_ADAM_STEP_SIZE)
        c1 = tl.load(sc + L.S_ADAM_BC2_SQRT)
        c2 = tl.load(sc + L.S_ADAM_DECAY_MUL)
        c3 = tl.load(sc + L.S_ADAM_L2)
        c4 = tl.load(sc + L.S_ADAM_OMB1)  # 1 - beta1
        c5 = tl.load(sc + L.S_ADAM_OMB2)  # 1 - beta2
        c6 = tl.load(sc + L.S_ADAM_EPS)
        c7 = 1.0
        if STATS:
            c7 = tl.load(sc + L.S_ADAM_BC1)
    else:
        c0 = tl.load(sc + L.S_LR)
        c1 = tl.load(sc + L.S_SGD_MOM_A)
        c2 = tl.load(sc + L.S_SGD_MOM_B)
        c3 = tl.load(sc + L.S_SGD_WEIGHT_DECAY)
        c4 = tl.load(sc + L.S_SGD_NESTEROV)
        c5 = tl.load(sc + L.S_SGD_MOMENTUM)
        c6 = 0.0
        c7 = 0.0
    return grad_mul, c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _load_raw(p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, offs, mask, w_ptr, q1_ptr, q2_ptr,
              qoffs, qmask, KIND: tl.constexpr, MASKED: tl.constexpr, FLAG: tl.constexpr,
              SDTYPE: tl.constexpr, MODE: tl.constexpr):
    """The loads of :func:`_apply` in storage form: (p or the master, g, S1, its scales, S2,
    its scales, S3), the scales 0.0 unless SDTYPE is uint8, an absent state 0.0 (or zeros
    when its group lacks it: ``has3`` false). Called for both halves of a block before either
    half's :func:`_compute`, so that every load is issued before the first store: the compiler
    does not move a load above a store that may alias it."""
    if (MODE & L.MODE_MASTER) != 0:
        rp = _raw(w_ptr, offs, mask, MASKED)
    else:
        rp = _raw(p_ptr, offs, mask, MASKED)
    rg = _raw(g_ptr, offs, mask, MASKED)
    if KIND == L.KIND_ADAM:
        r1, k1 = _raw_s(s1_ptr, q1_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE)
        r2, k2 = _raw_s(s2_ptr, q2_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE)
        if FLAG:
            if has3:
                r3 = _raw(s3_ptr, offs, mask, MASKED)
            else:
                r3 = tl.zeros_like(r2)
        else:
            r3 = 0.0
    else:
        r2 = 0.0
        k2 = 0.0
        r3 = 0.0
        if FLAG:
            if has3:
                r1, k1 = _raw_s(s1_ptr, q1_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE)
            else:
                r1 = tl.zeros_like(rg).to(s1_ptr.dtype.element_ty)
                if SDTYPE == tl.uint8:
                    k1 = tl.zeros_like(qoffs).to(tl.float32)
                else:
                    k1 = 0.0
        else:
            r1 = 0.0
            k1 = 0.0
    return rp, rg, r1, k1, r2, k2, r3


@triton.jit
def _apply(p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, offs, mask, g_scale, u_scale, grad_mul,
           c0, c1, c2, c3, c4, c5, c6, c7, w_ptr, q1_ptr, q2_ptr, qoffs, qmask, sr_c, elem0,
           KIND: tl.constexpr, DTYPE: tl.constexpr, MASKED: tl.constexpr, FLAG: tl.constexpr,
           STATS: tl.constexpr, SDTYPE: tl.constexpr, MODE: tl.constexpr, L2: tl.constexpr):
    """Load, update and store the elements ``offs`` (any block shape; ``mask`` used only when
    MASKED) of one tensor; ``c0..c7``: :func:`_scalars`.

    ``g_scale`` multiplies the gradient on top of the per-tensor multiplier, ``u_scale`` the
    update (ALLoRA units, ``allora_apply`` "grad" / "update"; 1.0 otherwise: the decoupled
    decay ``p * (1 - lr * wd)`` is never scaled). Adam follows torch's fused kernel
    (``fused_adam_utils.cuh``): L2 or decoupled decay, lerp for the first moment, correctly
    rounded sqrt and division; SGD follows ``torch.optim.SGD``. ``has3``: the optional state
    exists (FLAG variants): amsgrad's ``max_exp_avg_sq`` at ``s3_ptr`` (Adam), the momentum
    buffer at ``s1_ptr`` (SGD). L2: the gradient gets ``weight_decay * p`` (Adam's L2
    penalty, SGD's weight decay; the bucket's groups all have weight_decay != 0, and for Adam
    not decoupled); without it the term is not computed, as torch adds it only then: with a
    zero coefficient ``0 * p`` would turn an inf parameter's moments into NaN.
    Below fp32: the states are stored in SDTYPE (uint8: 8-bit codes, ``offs`` a [rows,
    Q_BLOCK] tile whose rows are whole blocks, their scales at ``q1_ptr`` / ``q2_ptr`` +
    ``qoffs``, ``qmask`` the rows holding an element); MODE_MASTER reads and writes the fp32
    master at ``w_ptr``; MODE_SR stores the parameter with stochastic rounding (``sr_c``,
    ``elem0``: :func:`_sr_prologue`). See :func:`_st_p`.
    Returns the sums of p^2 and u^2 of these elements (STATS; else 0). The loads come one
    array at a time, each converted to fp32 where it is loaded (the code shape the launch tables
    were chosen for at SPLIT 1); :func:`_load_raw` + :func:`_compute` are the same step with the
    loads apart (SPLIT 2).
    """
    if (MODE & L.MODE_MASTER) != 0:
        p = _ld(w_ptr, offs, mask, MASKED)
    else:
        p = _ld(p_ptr, offs, mask, MASKED)
    g = _ld(g_ptr, offs, mask, MASKED)
    m = 0.0
    v = 0.0
    if KIND == L.KIND_ADAM:
        m = _ld_s(s1_ptr, q1_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE, True)
        v = _ld_s(s2_ptr, q2_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE, False)
    return _compute(p, g, m, 0.0, v, 0.0, 0.0, p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, offs,
                    mask, g_scale, u_scale, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, w_ptr,
                    q1_ptr, q2_ptr, qoffs, qmask, sr_c, elem0, KIND, DTYPE, MASKED, FLAG, STATS,
                    SDTYPE, MODE, False, L2)


@triton.jit
def _compute(rp, rg, r1, k1, r2, k2, r3, p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, offs, mask,
             g_scale, u_scale, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, w_ptr, q1_ptr, q2_ptr,
             qoffs, qmask, sr_c, elem0, KIND: tl.constexpr, DTYPE: tl.constexpr,
             MASKED: tl.constexpr, FLAG: tl.constexpr, STATS: tl.constexpr,
             SDTYPE: tl.constexpr, MODE: tl.constexpr, PRE3: tl.constexpr, L2: tl.constexpr):
    """The arithmetic and the stores of :func:`_apply` (its docstring) on loaded values: PRE3,
    :func:`_load_raw`'s (storage form, the optional state among them); otherwise fp32 ``rp``,
    ``rg``, ``r1`` = m, ``r2`` = v, and the optional state loaded here, inside its branch."""
    p = rp.to(tl.float32)
    g = rg.to(tl.float32) * grad_mul * g_scale
    if KIND == L.KIND_ADAM:
        if PRE3:
            m = _val_s(r1, k1, SDTYPE, True)
            v = _val_s(r2, k2, SDTYPE, False)
        else:
            m = r1
            v = r2
        p = p * c2  # AdamW: p * (1 - lr * wd); Adam: 1
        if L2:  # Adam's L2 penalty in the gradient (never AdamW's, never with weight_decay 0)
            g = g + c3 * p
        # torch lerp_(g, w = 1 - beta1): from the nearer end, so beta1 = 0 gives m = g exactly
        m = tl.where(c4 < 0.5, m + c4 * (g - m), g - (g - m) * (1.0 - c4))
        v = (1.0 - c5) * v + c5 * g * g
        vv = v
        if FLAG:  # amsgrad for the groups that have a max_exp_avg_sq (address != 0)
            tl.static_assert(SDTYPE != tl.uint8, "amsgrad's max_exp_avg_sq is never 8-bit")
            if has3:
                if PRE3:
                    vmax = tl.maximum(r3.to(tl.float32), v)
                else:
                    vmax = tl.maximum(_ld(s3_ptr, offs, mask, MASKED), v)
                _st(s3_ptr, offs, vmax, mask, SDTYPE, MASKED)
                vv = vmax
        denom = tl.div_rn(tl.sqrt_rn(vv), c1) + c6
        u = tl.div_rn(m, denom) * u_scale
        p = p - c0 * u
        _st_s(s1_ptr, q1_ptr, offs, qoffs, m, mask, qmask, MASKED, SDTYPE, True)
        _st_s(s2_ptr, q2_ptr, offs, qoffs, v, mask, qmask, MASKED, SDTYPE, False)
        if STATS:
            u = tl.div_rn(u, c7)  # the unscaled update m_hat / (sqrt(v_hat) + eps)
    else:
        d = g
        if L2:  # weight_decay != 0 (as torch.optim.SGD: 0 * inf would be a NaN)
            d = d + c3 * p
        if FLAG:  # groups without momentum have no buffer (address 0): d passes through
            if has3:
                if PRE3:
                    buf = c1 * _val_s(r1, k1, SDTYPE, True) + c2 * d
                else:
                    buf = c1 * _ld_s(s1_ptr, q1_ptr, offs, qoffs, mask, qmask, MASKED, SDTYPE,
                                     True) + c2 * d
                _st_s(s1_ptr, q1_ptr, offs, qoffs, buf, mask, qmask, MASKED, SDTYPE, True)
                d = tl.where(c4 != 0.0, d + c5 * buf, buf)
        u = d * u_scale
        p = p - c0 * u
    _st_p(p_ptr, w_ptr, offs, p, mask, sr_c, elem0, DTYPE, MASKED, MODE)
    psq = 0.0
    usq = 0.0
    if STATS:  # per-tensor sums of the new p^2 and of u^2 over these elements
        if MASKED:
            psq = tl.sum(tl.where(mask, p * p, 0.0))
            usq = tl.sum(tl.where(mask, u * u, 0.0))
        else:
            psq = tl.sum(p * p)
            usq = tl.sum(u * u)
    return psq, usq


@triton.jit
def _add_stats(us_ptr, psq, usq, STATS: tl.constexpr):
    """Per-tensor parameter norm and update RMS: relaxed float reductions (REDG; order-
    dependent in the last bits, reported, never fed back into the arithmetic)."""
    if STATS:
        tl.atomic_add(us_ptr + L.US_PARAM_SQ, psq, sem="relaxed")
        tl.atomic_add(us_ptr + L.US_UPDATE_SQ, usq, sem="relaxed")


@triton.jit
def _tensor_row(tensors_ptr, scal_ptr, tidx, KIND: tl.constexpr, STATS: tl.constexpr,
                SDTYPE: tl.constexpr, MODE: tl.constexpr):
    """What a program of the update needs from the tables about tensor ``tidx``, loaded once:
    (numel, the addresses of p, g, S1, S2, S3, has3, the master's and the 8-bit scales', every
    address 16-byte aligned, the stochastic-rounding key and first element, :func:`_scalars`)."""
    row = tensors_ptr + tidx * L.T_COLS
    numel = tl.load(row + L.T_NUMEL)
    pa = tl.load(row + L.T_P)
    ga = tl.load(row + L.T_G)
    s1 = tl.load(row + L.T_S1)
    s2 = tl.load(row + L.T_S2)  # 0 for SGD
    s3 = tl.load(row + L.T_S3)  # 0 without amsgrad
    # the optional state of the FLAG variants (absent states have address 0: aligned)
    has3 = (s3 if KIND == L.KIND_ADAM else s1) != 0
    grad_mul, c0, c1, c2, c3, c4, c5, c6, c7 = _scalars(scal_ptr, tidx, KIND, STATS)
    wa = pa  # the master's address (MODE_MASTER; otherwise never read)
    if (MODE & L.MODE_MASTER) != 0:
        wa = tl.load(row + L.T_MASTER)
    q1 = pa  # the scales of 8-bit S1 / S2 (read with SDTYPE uint8 only)
    q2 = pa
    if SDTYPE == tl.uint8:
        q1 = tl.load(row + L.T_Q1)
        q2 = tl.load(row + L.T_Q2)
    sr_c, elem0 = _sr_prologue(row, MODE)
    aligned = ((pa | ga | s1 | s2 | s3 | (wa if (MODE & L.MODE_MASTER) != 0 else 0)) & 15) == 0
    return (numel, pa, ga, s1, s2, s3, has3, wa, q1, q2, aligned, sr_c, elem0, grad_mul, c0, c1,
            c2, c3, c4, c5, c6, c7)


@triton.jit
def _aligned_ptrs(pa, ga, s1, s2, s3, wa, q1, q2, DTYPE: tl.constexpr, SDTYPE: tl.constexpr):
    """The pointers of the full-block path of a tensor whose addresses are 16-byte aligned
    (:func:`_tensor_row`'s ``aligned``): p, g, S1, S2, S3, the master, the 8-bit scales (4-byte
    per-block values: no hint)."""
    return (_typed(pa, DTYPE, True), _typed(ga, DTYPE, True), _typed(s1, SDTYPE, True),
            _typed(s2, SDTYPE, True), _typed(s3, SDTYPE, True), _typed(wa, tl.float32, True),
            _typed(q1, tl.float32, False), _typed(q2, tl.float32, False))


@triton.jit
def _masked_block(pa, ga, s1, s2, s3, has3, wa, q1, q2, start, numel, sr_c, elem0, grad_mul,
                  c0, c1, c2, c3, c4, c5, c6, c7, KIND: tl.constexpr, DTYPE: tl.constexpr,
                  BLOCK: tl.constexpr, FLAG: tl.constexpr, STATS: tl.constexpr,
                  SDTYPE: tl.constexpr, MODE: tl.constexpr, L2: tl.constexpr):
    """The block at ``start`` of a tensor through the masked path (its elements below
    ``numel``): the partial last block, and every block of an unaligned tensor. Returns the
    block's (sum p^2, sum u^2) (STATS; else 0)."""
    # the last block, unaligned tensors: scalar accesses (a masked element cannot share a
    # 16-byte instruction with its neighbours), in quarter blocks so that this path, one
    # register per element, does not set the kernel's register count (bf16 at 4 warps: 161
    # registers with the whole block at once); 8-bit states: in whole quantisation blocks
    psq = tl.zeros([], dtype=tl.float32)
    usq = tl.zeros([], dtype=tl.float32)
    if SDTYPE == tl.uint8:
        QR: tl.constexpr = (BLOCK + 4 * L.Q_BLOCK - 1) // (4 * L.Q_BLOCK)
        # (names apart from the other path's: Triton merges the variables of both)
        mrow = tl.arange(0, QR)
        for s0 in range(0, BLOCK, QR * L.Q_BLOCK):
            r0 = start + s0 + mrow * L.Q_BLOCK
            offs = r0[:, None] + tl.arange(0, L.Q_BLOCK)[None, :]
            a, b = _apply(_typed(pa, DTYPE, False), _typed(ga, DTYPE, False),
                          _typed(s1, SDTYPE, False), _typed(s2, SDTYPE, False),
                          _typed(s3, SDTYPE, False), has3, offs, offs < numel, 1.0, 1.0,
                          grad_mul, c0, c1, c2, c3, c4, c5, c6, c7,
                          _typed(wa, tl.float32, False), _typed(q1, tl.float32, False),
                          _typed(q2, tl.float32, False), (start + s0) // L.Q_BLOCK + mrow,
                          r0 < numel, sr_c, elem0, KIND, DTYPE, True, FLAG, STATS, SDTYPE,
                          MODE, L2)
            psq += a
            usq += b
    else:
        for s0 in range(0, BLOCK, BLOCK // 4):
            offs = start + s0 + tl.arange(0, BLOCK // 4)
            a, b = _apply(_typed(pa, DTYPE, False), _typed(ga, DTYPE, False),
                          _typed(s1, SDTYPE, False), _typed(s2, SDTYPE, False),
                          _typed(s3, SDTYPE, False), has3, offs, offs < numel, 1.0, 1.0,
                          grad_mul, c0, c1, c2, c3, c4, c5, c6, c7,
                          _typed(wa, tl.float32, False), _typed(q1, tl.float32, False),
                          _typed(q2, tl.float32, False), offs, offs, sr_c, elem0, KIND,
                          DTYPE, True, FLAG, STATS, SDTYPE, MODE, L2)
            psq += a
            usq += b
    return psq, usq


@triton.jit(do_not_specialize=["advance"])
def _update_kernel(tensors_ptr, blocks_ptr, scal_ptr, ustat_ptr, clock_ptr, advance,
                   KIND: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   FLAG: tl.constexpr, STATS: tl.constexpr, SDTYPE: tl.constexpr,
                   MODE: tl.constexpr, SPLIT: tl.constexpr, L2: tl.constexpr):
    """One program per ``BLOCK`` elements of a tensor (rows of ``blocks``). ``advance``: this
    launch advances the clock (program 0; the launcher sets it on one launch of the step).

    SDTYPE: storage of the states (DTYPE: as the parameter; uint8: 8-bit codes, the block in
    [BLOCK // Q_BLOCK, Q_BLOCK] tiles so that each row is one quantisation block, BLOCK a
    multiple of Q_BLOCK); MODE: MODE_* bits (master copy, stochastic rounding). With
    SDTYPE == DTYPE and MODE 0 the code is that of the variants before either existed.
    SPLIT (1 or 2): a full block in one piece, or in two halves whose loads are all issued
    before the first half is computed and stored (a store may alias a later load, so the
    compiler keeps the loads written after a store after it: two halves one after the other
    have half the block in flight). Which is faster depends on the registers ptxas needs:
    :func:`update_launch`. L2: the weight term in the gradient (:func:`_apply`)."""
    pid = tl.program_id(0)
    tidx = tl.load(blocks_ptr + pid * L.B_COLS + L.B_TENSOR)
    start = tl.multiple_of(tl.load(blocks_ptr + pid * L.B_COLS + L.B_START), BLOCK)
    if tl.load(scal_ptr + tidx * L.S_COLS + L.S_ACTIVE) == 0.0:
        return  # a skipped step touches nothing (nor the clock: it advances by S_ACTIVE = 0)
    if (advance != 0) & (pid == 0):
        tl.store(clock_ptr, tl.load(clock_ptr) + 1)
    (numel, pa, ga, s1, s2, s3, has3, wa, q1, q2, aligned, sr_c, elem0, grad_mul, c0, c1, c2,
     c3, c4, c5, c6, c7) = _tensor_row(tensors_ptr, scal_ptr, tidx, KIND, STATS, SDTYPE, MODE)
    if (start + BLOCK <= numel) & aligned:
        # uint8 codes of a BLOCK-aligned block of a 16-byte-aligned state are 16-byte aligned
        HB: tl.constexpr = BLOCK // SPLIT
        if SDTYPE == tl.uint8:
            qrow = tl.arange(0, HB // L.Q_BLOCK)
            offs = start + qrow[:, None] * L.Q_BLOCK + tl.arange(0, L.Q_BLOCK)[None, :]
            qoffs = start // L.Q_BLOCK + qrow
            QH: tl.constexpr = HB // L.Q_BLOCK
        else:
            offs = start + tl.arange(0, HB)
            qoffs = offs
            QH: tl.constexpr = HB
        fp, fg, f1, f2, f3, fw, fq1, fq2 = _aligned_ptrs(pa, ga, s1, s2, s3, wa, q1, q2, DTYPE,
                                                             SDTYPE)
        if SPLIT == 1:
            psq, usq = _apply(fp, fg, f1, f2, f3, has3, offs, offs, 1.0, 1.0, grad_mul, c0, c1,
                              c2, c3, c4, c5, c6, c7, fw, fq1, fq2, qoffs, qoffs, sr_c, elem0,
                              KIND, DTYPE, False, FLAG, STATS, SDTYPE, MODE, L2)
        else:  # both halves' loads, then each half's arithmetic and stores
            ap, ag, a1, ak1, a2, ak2, a3 = _load_raw(fp, fg, f1, f2, f3, has3, offs, offs, fw,
                                                     fq1, fq2, qoffs, qoffs, KIND, False, FLAG,
                                                     SDTYPE, MODE)
            bp, bg, b1, bk1, b2, bk2, b3 = _load_raw(fp, fg, f1, f2, f3, has3, offs + HB, offs,
                                                     fw, fq1, fq2, qoffs + QH, qoffs, KIND,
                                                     False, FLAG, SDTYPE, MODE)
            psq, usq = _compute(ap, ag, a1, ak1, a2, ak2, a3, fp, fg, f1, f2, f3, has3, offs,
                                offs, 1.0, 1.0, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, fw, fq1,
                                fq2, qoffs, qoffs, sr_c, elem0, KIND, DTYPE, False, FLAG, STATS,
                                SDTYPE, MODE, True, L2)
            x, y = _compute(bp, bg, b1, bk1, b2, bk2, b3, fp, fg, f1, f2, f3, has3, offs + HB,
                            offs, 1.0, 1.0, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, fw, fq1,
                            fq2, qoffs + QH, qoffs, sr_c, elem0, KIND, DTYPE, False, FLAG, STATS,
                            SDTYPE, MODE, True, L2)
            psq += x
            usq += y
    else:
        psq, usq = _masked_block(pa, ga, s1, s2, s3, has3, wa, q1, q2, start, numel, sr_c,
                                 elem0, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, KIND, DTYPE,
                                 BLOCK, FLAG, STATS, SDTYPE, MODE, L2)
    _add_stats(ustat_ptr + tidx * L.US_COLS, psq, usq, STATS)


@triton.jit(do_not_specialize=["advance"])
def _run_update_kernel(tensors_ptr, runs_ptr, scal_ptr, ustat_ptr, clock_ptr, advance,
                       KIND: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                       RUN: tl.constexpr, STAGES: tl.constexpr, FLAG: tl.constexpr,
                       ALL3: tl.constexpr, STATS: tl.constexpr, SDTYPE: tl.constexpr,
                       MODE: tl.constexpr, L2: tl.constexpr):
    """The update of :func:`_update_kernel` (same loads, arithmetic and stores), one program
    per run of ``RUN`` blocks of one tensor (rows of ``runs``: tensor, first element), its
    table row and scalars loaded once. The full blocks of an aligned tensor go through a loop
    the compiler software-pipelines ``STAGES`` deep (``tl.range(..., num_stages=STAGES)``):
    triton 3.6 copies the next STAGES - 1 blocks global -> shared with ``cp.async`` (SASS
    ``LDGSTS.E.BYPASS.128``, 16 bytes a thread) while one block is computed, so the bytes an SM
    has in flight sit in shared memory (228 KB) instead of registers: resident programs x
    (STAGES - 1) x a block's bytes (bench/compile_check.py counts them so). The 16-bit and 8-bit
    variants, which hold fp32 working copies of every array, stop at 32-168 KB with a block in
    registers; pipelined, 120-224 KB at 39-255 registers (bench/run_sweep.py). The
    partial last block and unaligned tensors take the masked path of :func:`_masked_block`
    first, in the same program.

    ALL3 (FLAG variants): every tensor of the launch has the optional state, so its load is
    not under the runtime branch ``has3``: the pipeliner leaves a load under a branch of the
    loop body in registers (``LDG.128`` in the loop). A launch whose tensors differ in it
    (groups with and without momentum) takes :func:`_update_kernel`.
    Free of races as :func:`_update_kernel`: a run is owned by one program."""
    pid = tl.program_id(0)
    tidx = tl.load(runs_ptr + pid * L.B_COLS + L.B_TENSOR)
    start = tl.multiple_of(tl.load(runs_ptr + pid * L.B_COLS + L.B_START), RUN * BLOCK)
    if tl.load(scal_ptr + tidx * L.S_COLS + L.S_ACTIVE) == 0.0:
        return  # a skipped step touches nothing (nor the clock: it advances by S_ACTIVE = 0)
    if (advance != 0) & (pid == 0):
        tl.store(clock_ptr, tl.load(clock_ptr) + 1)
    (numel, pa, ga, s1, s2, s3, has3, wa, q1, q2, aligned, sr_c, elem0, grad_mul, c0, c1, c2,
     c3, c4, c5, c6, c7) = _tensor_row(tensors_ptr, scal_ptr, tidx, KIND, STATS, SDTYPE, MODE)
    if ALL3:
        has3 = True
    rest = numel - start
    n_blocks = tl.minimum((rest + BLOCK - 1) // BLOCK, RUN).to(tl.int32)
    n_full = tl.where(aligned, tl.minimum(rest // BLOCK, RUN), 0).to(tl.int32)
    fp, fg, f1, f2, f3, fw, fq1, fq2 = _aligned_ptrs(pa, ga, s1, s2, s3, wa, q1, q2, DTYPE,
                                                         SDTYPE)
    psq = tl.zeros([], dtype=tl.float32)
    usq = tl.zeros([], dtype=tl.float32)
    # The masked blocks (a partial last block, an unaligned tensor) go first: compiled after the
    # pipelined loop, their registers stayed live beside its buffers (sm_90, triton 3.6:
    # 2-byte Adam + statistics 140 -> 123 registers, 144 -> 192 KB in flight).
    for k in range(n_full, n_blocks):
        a, b = _masked_block(pa, ga, s1, s2, s3, has3, wa, q1, q2, start + k * BLOCK, numel,
                             sr_c, elem0, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, KIND, DTYPE,
                             BLOCK, FLAG, STATS, SDTYPE, MODE, L2)
        psq += a
        usq += b
    for k in tl.range(0, n_full, num_stages=STAGES):
        b0 = start + k * BLOCK
        if SDTYPE == tl.uint8:
            qrow = tl.arange(0, BLOCK // L.Q_BLOCK)
            offs = b0 + qrow[:, None] * L.Q_BLOCK + tl.arange(0, L.Q_BLOCK)[None, :]
            qoffs = b0 // L.Q_BLOCK + qrow
        else:
            offs = b0 + tl.arange(0, BLOCK)
            qoffs = offs
        a, b = _apply(fp, fg, f1, f2, f3, has3, offs, offs, 1.0, 1.0, grad_mul, c0, c1, c2, c3,
                      c4, c5, c6, c7, fw, fq1, fq2, qoffs, qoffs, sr_c, elem0, KIND, DTYPE, False,
                      FLAG, STATS, SDTYPE, MODE, L2)
        psq += a
        usq += b
    _add_stats(ustat_ptr + tidx * L.US_COLS, psq, usq, STATS)


@triton.jit(do_not_specialize=["advance"])
def _units_update_kernel(tensors_ptr, blocks_ptr, scal_ptr, ustat_ptr, clock_ptr, advance,
                         KIND: tl.constexpr, DTYPE: tl.constexpr, UNITS: tl.constexpr,
                         CHUNK: tl.constexpr, FLAG: tl.constexpr, STATS: tl.constexpr,
                         SDTYPE: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr,
                         L2: tl.constexpr):
    """ALLoRA-style update: each program owns ``UNITS`` whole units (rows, columns or the tensor)
    of one tensor; pass 1 reduces ||theta_unit||^2, pass 2 scales the unit's gradient by
    1 / sqrt(||theta_unit||^2 + 1/eta^2) and applies the update.

    Tiles are [UNITS, CHUNK]. Rows (and whole-tensor units) have element stride 1: the offsets
    are written with a literal 1 so Triton sees the contiguity along a row and lays lanes
    along it (with the stride a runtime value, a warp load spanned 16-32 rows: 16 cache lines
    for 128 useful bytes at r=16). Columns have unit stride 1: lanes go across units, i.e.
    along the rows of the matrix. Table and scalar loads happen once, before the loops.
    A unit belongs to one program, so no program reads what another writes.
    SDTYPE / MODE / SPLIT / L2 as :func:`_update_kernel` (SPLIT 2 halves each chunk of a whole-row
    tile along its rows; with MODE_MASTER the norms are those of the fp32
    master, the weights the step updates, as in the reference and the C++ executor);
    not 8-bit states: a unit tile does not cover whole quantisation blocks (the launcher
    refuses them)."""
    tl.static_assert(SDTYPE != tl.uint8, "8-bit states: not in ALLoRA unit tiles")
    pid = tl.program_id(0)
    tidx = tl.load(blocks_ptr + pid * L.B_COLS + L.B_TENSOR)
    u0 = tl.load(blocks_ptr + pid * L.B_COLS + L.B_START)
    sc = scal_ptr + tidx * L.S_COLS
    if tl.load(sc + L.S_ACTIVE) == 0.0:
        return  # a skipped step touches nothing
    if (advance != 0) & (pid == 0):
        tl.store(clock_ptr, tl.load(clock_ptr) + 1)
    row = tensors_ptr + tidx * L.T_COLS
    unit_len = tl.load(row + L.T_ULEN)
    unit_stride = tl.load(row + L.T_USTRIDE)
    elem_stride = tl.load(row + L.T_ESTRIDE)
    n_units = tl.load(row + L.T_NUNITS)
    inv_eta2 = tl.load(sc + L.S_INV_ETA2)
    u_on = tl.load(sc + L.S_ALLORA_UPDATE)  # allora_apply: 1.0 "update", 0.0 "grad"
    pa = tl.load(row + L.T_P)
    p_ptr = _typed(pa, DTYPE, False)
    ga = tl.load(row + L.T_G)
    g_ptr = _typed(ga, DTYPE, False)
    s1 = tl.load(row + L.T_S1)
    s3 = tl.load(row + L.T_S3)
    s1_ptr = _typed(s1, SDTYPE, False)
    s2 = tl.load(row + L.T_S2)
    s2_ptr = _typed(s2, SDTYPE, False)
    s3_ptr = _typed(s3, SDTYPE, False)
    if (MODE & L.MODE_MASTER) != 0:
        w_ptr = _typed(tl.load(row + L.T_MASTER), tl.float32, False)
        n_ptr = w_ptr  # the unit norms of the weights the step updates: the master's
    else:
        w_ptr = _typed(pa, tl.float32, False)  # never read
        n_ptr = p_ptr
    sr_c, elem0 = _sr_prologue(row, MODE)
    has3 = (s3 if KIND == L.KIND_ADAM else s1) != 0
    grad_mul, c0, c1, c2, c3, c4, c5, c6, c7 = _scalars(scal_ptr, tidx, KIND, STATS)
    psq = tl.zeros([], dtype=tl.float32)
    usq = tl.zeros([], dtype=tl.float32)
    units = u0 + tl.arange(0, UNITS)
    # the masked paths' sub-tiles: 256 elements (8 a thread at 1 warp), one register per element
    # and a 64-bit address each; a quarter tile (512 elements) set the kernel's register count
    # above the 16-byte path's (16-bit SGD 243 -> 128 registers at 1 warp, 8 -> 16 programs per
    # SM; bf16 Adam 2000 -> ~720 bytes of spill stores: bench/compile_check.py --table).
    # Rows: [QUNITS, QCHUNK] (whole units, a row in chunks of at most 256); columns: every unit
    # of the tile, QROWS rows at a time (lanes along the units, i.e. along the matrix's rows)
    QCHUNK: tl.constexpr = CHUNK if CHUNK < 256 else 256
    QUNITS: tl.constexpr = UNITS if UNITS * QCHUNK <= 256 else 256 // QCHUNK
    QROWS: tl.constexpr = 256 // UNITS if UNITS < 256 else 1
    # a tile of whole rows of 16-byte-aligned tensors, rows starting 16 bytes apart (unit
    # stride a multiple of 8 elements), every unit of the tile present and the row a multiple of
    # CHUNK (rows of 16, 128 or a multiple of 256: LoRA B at r = 16, transformer rows; rows of
    # 8, 32 or 64 take the masked path):
    # no mask and 16-byte accesses (with masks, or without the divisibility hints, every access
    # is scalar: ~255 registers at 1-2 warps, 64-96 KB in flight per SM for 16-bit SGD)
    wm = s1
    if (MODE & L.MODE_MASTER) != 0:
        wm = tl.load(row + L.T_MASTER)
    whole = (elem_stride == 1) & (unit_len % CHUNK == 0) & (u0 + UNITS <= n_units) & (
        unit_stride % 8 == 0) & (((pa | ga | s1 | s2 | s3 | wm) & 15) == 0)
    if whole:
        # (names apart from the other paths': Triton merges the variables of both branches,
        # and with them the hints)
        wstride = tl.multiple_of(unit_stride, 8)
        wbase = units * wstride
        wp_ptr = _typed(pa, DTYPE, True)
        wg_ptr = _typed(ga, DTYPE, True)
        ws1_ptr = _typed(s1, SDTYPE, True)
        ws2_ptr = _typed(s2, SDTYPE, True)
        ws3_ptr = _typed(s3, SDTYPE, True)
        ww_ptr = _typed(wm, tl.float32, True)
        if (MODE & L.MODE_MASTER) != 0:
            wn_ptr = ww_ptr
        else:
            wn_ptr = wp_ptr
        wacc = tl.zeros([UNITS], dtype=tl.float32)
        for k0 in range(0, unit_len, CHUNK):
            wk = tl.multiple_of(k0, CHUNK) + tl.arange(0, CHUNK)
            woffs = wbase[:, None] + wk[None, :]
            wv = tl.load(wn_ptr + woffs).to(tl.float32)
            wacc += tl.sum(wv * wv, 1)
        wscale = tl.div_rn(1.0, tl.sqrt_rn(wacc + inv_eta2))  # IEEE, as the CPU's
        wgs = tl.where(u_on != 0.0, 1.0, wscale)[:, None]
        wus = tl.where(u_on != 0.0, wscale, 1.0)[:, None]
        for k0 in range(0, unit_len, CHUNK):
            if SPLIT == 1:
                wk = tl.multiple_of(k0, CHUNK) + tl.arange(0, CHUNK)
                woffs = wbase[:, None] + wk[None, :]
                a, b = _apply(wp_ptr, wg_ptr, ws1_ptr, ws2_ptr, ws3_ptr, has3, woffs, woffs,
                              wgs, wus, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, ww_ptr, ww_ptr,
                              ww_ptr, woffs, woffs, sr_c, elem0, KIND, DTYPE, False, FLAG, STATS,
                              SDTYPE, MODE, L2)
            else:  # the tile's two halves along the rows, loads first (see _update_kernel)
                wk = tl.multiple_of(k0, CHUNK) + tl.arange(0, CHUNK // 2)
                woffs = wbase[:, None] + wk[None, :]
                xp, xg, x1, xk1, x2, xk2, x3 = _load_raw(
                    wp_ptr, wg_ptr, ws1_ptr, ws2_ptr, ws3_ptr, has3, woffs, woffs, ww_ptr,
                    ww_ptr, ww_ptr, woffs, woffs, KIND, False, FLAG, SDTYPE, MODE)
                yp, yg, y1, yk1, y2, yk2, y3 = _load_raw(
                    wp_ptr, wg_ptr, ws1_ptr, ws2_ptr, ws3_ptr, has3, woffs + CHUNK // 2, woffs,
                    ww_ptr, ww_ptr, ww_ptr, woffs, woffs, KIND, False, FLAG, SDTYPE, MODE)
                a, b = _compute(xp, xg, x1, xk1, x2, xk2, x3, wp_ptr, wg_ptr, ws1_ptr, ws2_ptr,
                                ws3_ptr, has3, woffs, woffs, wgs, wus, grad_mul, c0, c1, c2, c3,
                                c4, c5, c6, c7, ww_ptr, ww_ptr, ww_ptr, woffs, woffs, sr_c, elem0,
                                KIND, DTYPE, False, FLAG, STATS, SDTYPE, MODE, True, L2)
                a2, b2 = _compute(yp, yg, y1, yk1, y2, yk2, y3, wp_ptr, wg_ptr, ws1_ptr,
                                  ws2_ptr, ws3_ptr, has3, woffs + CHUNK // 2, woffs, wgs, wus,
                                  grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, ww_ptr, ww_ptr,
                                  ww_ptr, woffs, woffs, sr_c, elem0, KIND, DTYPE, False, FLAG,
                                  STATS, SDTYPE, MODE, True, L2)
                a += a2
                b += b2
            psq += a
            usq += b
    elif elem_stride == 1:  # row units, whole-tensor units
        # the masked paths in the sub-tiles above: one register per element here, and the
        # whole tile at once would set the kernel's register count (255 at 1 warp, for the
        # 16-byte path too); a unit's sums do not depend on the other units of its tile
        for q0 in range(0, UNITS, QUNITS):
            qunits = u0 + q0 + tl.arange(0, QUNITS)
            qumask = qunits < n_units
            base = qunits * unit_stride
            acc = tl.zeros([QUNITS], dtype=tl.float32)
            for k0 in range(0, unit_len, QCHUNK):
                k = k0 + tl.arange(0, QCHUNK)
                offs = base[:, None] + k[None, :]
                mask = qumask[:, None] & (k[None, :] < unit_len)
                p = tl.load(n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(p * p, 1)
            scale = tl.div_rn(1.0, tl.sqrt_rn(acc + inv_eta2))  # IEEE, as the CPU's
            gs = tl.where(u_on != 0.0, 1.0, scale)[:, None]  # "grad": the gradient's multiplier
            us = tl.where(u_on != 0.0, scale, 1.0)[:, None]  # "update": the step's multiplier
            for k0 in range(0, unit_len, QCHUNK):
                k = k0 + tl.arange(0, QCHUNK)
                offs = base[:, None] + k[None, :]
                mask = qumask[:, None] & (k[None, :] < unit_len)
                a, b = _apply(p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, offs, mask,
                              gs, us, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, w_ptr, w_ptr,
                              w_ptr, offs, mask, sr_c, elem0, KIND, DTYPE, True, FLAG, STATS,
                              SDTYPE, MODE, L2)
                psq += a
                usq += b
    else:  # column units: unit_stride == 1 (allora_units), the units of a tile are adjacent
        # (the row path's twin with its own offsets: one path with a runtime choice of offsets
        # merges their contiguity, and the coalescing pass then lays lanes along rows for the
        # columns too; a shared helper with the choice constexpr holds 192 registers at
        # [16, 128] where this holds 156)
        cmask_u = units < n_units
        cacc = tl.zeros([UNITS], dtype=tl.float32)
        for ck0 in range(0, unit_len, QROWS):
            ck = ck0 + tl.arange(0, QROWS)
            coffs = units[:, None] + ck[None, :] * elem_stride
            cmask = cmask_u[:, None] & (ck[None, :] < unit_len)
            cp = tl.load(n_ptr + coffs, mask=cmask, other=0.0).to(tl.float32)
            cacc += tl.sum(cp * cp, 1)
        cscale = tl.div_rn(1.0, tl.sqrt_rn(cacc + inv_eta2))  # IEEE, as the CPU's
        cgs = tl.where(u_on != 0.0, 1.0, cscale)[:, None]  # "grad": the gradient's multiplier
        cus = tl.where(u_on != 0.0, cscale, 1.0)[:, None]  # "update": the step's multiplier
        for ck0 in range(0, unit_len, QROWS):
            ck = ck0 + tl.arange(0, QROWS)
            coffs = units[:, None] + ck[None, :] * elem_stride
            cmask = cmask_u[:, None] & (ck[None, :] < unit_len)
            a, b = _apply(p_ptr, g_ptr, s1_ptr, s2_ptr, s3_ptr, has3, coffs, cmask,
                          cgs, cus, grad_mul, c0, c1, c2, c3, c4, c5, c6, c7, w_ptr, w_ptr,
                          w_ptr, coffs, cmask, sr_c, elem0, KIND, DTYPE, True, FLAG, STATS,
                          SDTYPE, MODE, L2)
            psq += a
            usq += b
    _add_stats(ustat_ptr + tidx * L.US_COLS, psq, usq, STATS)


# -- launchers ----------------------------------------------------------------------------------
# Plain functions: check nothing the host path already checked, build the grid, launch. Storage
# dtypes arrive as torch dtypes.

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: rows of the tensors table per finalize program (one tensor per thread at 4 warps)
FINALIZE_ROWS = 128
FINALIZE_WARPS = 4


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a storage dtype (float32, bfloat16, float16)."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(_TL_DTYPES)}, got {dtype}") from None


#: the kernels' SDTYPE of each STATE_* code (uint8: 8-bit codes; STATE_F64 never reaches Triton)
_TL_STATES = {L.STATE_F32: tl.float32, L.STATE_BF16: tl.bfloat16, L.STATE_F16: tl.float16,
              L.STATE_8BIT: tl.uint8}
_MODES = (0, L.MODE_MASTER, L.MODE_SR)


def tl_state(state: int | None, dtype: torch.dtype, mode: int = 0):
    """SDTYPE of an update variant: ``state`` (a STATE_* code; None: the parameter's
    ``dtype``), checked with ``mode`` (0, MODE_MASTER or MODE_SR)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if mode == L.MODE_SR and dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding: bfloat16 parameters only, got {dtype}")
    if state is None:
        return tl_dtype(dtype)
    try:
        return _TL_STATES[state]
    except KeyError:
        raise ValueError(f"state must be one of {sorted(_TL_STATES)} (STATE_*), got "
                         f"{state!r}") from None


def _warps(elements: int, per_thread: int, most: int = 16) -> int:
    """Warps so that each thread owns ``per_thread`` elements (a power of two in 1..most)."""
    w = max(1, elements // (32 * per_thread))
    return min(most, 1 << (w.bit_length() - 1))


#: (SPLIT, num_warps) of an update program of 2048 elements by (kind, parameter dtype, state
#: storage, mode, flag), chosen by `python bench/launch_sweep.py` (triton 3.6, sm_90): of the
#: launch configurations SPLIT 1 / 2 x 1, 2, 4, 8 warps, those without spills, then the most
#: bytes of block data a thread has issued and not yet used times the threads an SM holds
#: (compile_check's "iss", read from the SASS), then the fewest registers x warps within 5% of
#: it. An H100 SM holds 65,536 registers and 64 warps; the prototype ran at 2.99 TB/s with
#: ~160 KB in flight, 2.53 TB/s with 64 KB. The previous choice (SPLIT 1; 4 warps for 4-byte
#: and 1 warp for 2-byte parameters) counted programs x block bytes, which assumes every load
#: of a program in flight at once: at 1 warp and 180-255 registers ptxas issues them in
#: rounds (SGD fp16 momentum: 108 KB by that count, 72 issued) or spills (18 of the 44
#: launch keys). Over the 44 keys the variants take, iss summed 3,793 -> 5,366 KB, 26 -> 44
#: keys without spills, 5 -> 21 at >= 128 KB (fp32 Adam 120 -> 192 KB at 2 warps, 163
#: registers, 6 programs; at 4 warps, SPLIT 2, no spill: bf16 Adam 112 -> 128 KB with 64
#: registers, fp16 56 -> 96, amsgrad 52 -> 120, where 1 warp spilled fp16 and amsgrad).
_UPDATE_LAUNCH = {
    (L.KIND_ADAM, "bf16", "bf16", 0, False): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, False): (1, 1),
    (L.KIND_ADAM, "bf16", "bf16", 1, True): (2, 2),
    (L.KIND_ADAM, "bf16", "bf16", 2, False): (1, 1),
    (L.KIND_ADAM, "bf16", "bf16", 2, True): (2, 4),
    (L.KIND_ADAM, "bf16", "fp32", 0, False): (2, 2),
    (L.KIND_ADAM, "bf16", "fp32", 0, True): (2, 4),
    (L.KIND_ADAM, "bf16", "fp32", 1, False): (2, 2),
    (L.KIND_ADAM, "bf16", "fp32", 1, True): (2, 2),
    (L.KIND_ADAM, "bf16", "uint8", 0, False): (2, 2),
    (L.KIND_ADAM, "bf16", "uint8", 1, False): (2, 2),
    (L.KIND_ADAM, "bf16", "uint8", 2, False): (1, 2),
    (L.KIND_ADAM, "fp16", "fp16", 0, False): (2, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True): (2, 4),
    (L.KIND_ADAM, "fp16", "fp32", 1, False): (2, 2),
    (L.KIND_ADAM, "fp16", "fp32", 1, True): (2, 2),
    (L.KIND_ADAM, "fp32", "bf16", 0, False): (1, 1),
    (L.KIND_ADAM, "fp32", "bf16", 0, True): (2, 4),
    (L.KIND_ADAM, "fp32", "fp32", 0, False): (2, 2),
    (L.KIND_ADAM, "fp32", "fp32", 0, True): (2, 2),
    (L.KIND_ADAM, "fp32", "uint8", 0, False): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 0, False): (1, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True): (1, 1),
    (L.KIND_SGD, "bf16", "bf16", 1, False): (1, 2),
    (L.KIND_SGD, "bf16", "bf16", 1, True): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 2, False): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 2, True): (1, 1),
    (L.KIND_SGD, "bf16", "fp32", 0, False): (1, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True): (2, 2),
    (L.KIND_SGD, "bf16", "fp32", 1, False): (1, 2),
    (L.KIND_SGD, "bf16", "fp32", 1, True): (2, 1),
    (L.KIND_SGD, "bf16", "uint8", 0, False): (2, 1),
    (L.KIND_SGD, "bf16", "uint8", 0, True): (2, 1),
    (L.KIND_SGD, "bf16", "uint8", 1, False): (1, 2),
    (L.KIND_SGD, "bf16", "uint8", 1, True): (2, 1),
    (L.KIND_SGD, "bf16", "uint8", 2, False): (2, 2),
    (L.KIND_SGD, "bf16", "uint8", 2, True): (2, 2),
    (L.KIND_SGD, "fp16", "fp16", 0, False): (1, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True): (1, 1),
    (L.KIND_SGD, "fp16", "fp32", 1, False): (1, 2),
    (L.KIND_SGD, "fp16", "fp32", 1, True): (2, 1),
    (L.KIND_SGD, "fp32", "bf16", 0, False): (1, 1),
    (L.KIND_SGD, "fp32", "bf16", 0, True): (1, 1),
    (L.KIND_SGD, "fp32", "fp32", 0, False): (1, 1),
    (L.KIND_SGD, "fp32", "fp32", 0, True): (2, 4),
    (L.KIND_SGD, "fp32", "uint8", 0, False): (1, 1),
    (L.KIND_SGD, "fp32", "uint8", 0, True): (2, 1)}
#: the configuration of a combination the table does not hold (Adam / SGD, 2-byte parameter):
#: the previous choice
_UPDATE_FALLBACK = {(L.KIND_ADAM, False): (1, 4), (L.KIND_ADAM, True): (1, 1),
                    (L.KIND_SGD, False): (1, 4), (L.KIND_SGD, True): (1, 1)}
#: benchmarks only (bench/gpu_check.sh): FASTSCHED_UPDATE_WARPS=4 launches every update program
#: with 4 warps and SPLIT 1 (Triton's default, the launch configuration before the tables)
_FORCE_WARPS = int(os.environ.get("FASTSCHED_UPDATE_WARPS", "0") or 0)
_DT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TL_NAMES = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16", tl.uint8: "uint8"}


def _launch(table: dict, fallback: dict, kind: int, dtype: torch.dtype, elements: int,
            flag: bool, sdtype, mode: int, no_l2: dict | None = None) -> tuple[int, int]:
    if _FORCE_WARPS:
        return 1, _FORCE_WARPS
    two = dtype.itemsize == 2
    key = (kind, _DT_NAMES[dtype], _TL_NAMES[sdtype], mode, bool(flag))
    if no_l2 is not None and key in no_l2:  # the variant without the weight term
        split, w = no_l2[key]
    else:
        split, w = table.get(key, fallback[kind, two])
    w = max(1, min(16, w * elements // 2048))
    # halves of whole 8-bit quantisation blocks, of at least 16 bytes a thread
    if sdtype == tl.uint8 and (elements // 2) % L.Q_BLOCK or elements < 512:
        split = 1
    return split, w


#: (SPLIT, num_warps) of the update variants without the weight term (L2=False: AdamW, groups
#: with weight_decay 0) where the table's choice, made with the term, does not hold for them:
#: leaving out one multiply and one add moved ptxas's allocation enough that at that choice 11
#: of these keys spilled 4-72 bytes or held less in flight than the variant with the term (fp32
#: Adam with bf16 states spilled 72 bytes; bf16 SGD with stochastic rounding 64 -> 36 KB).
#: Chosen as the table by `python bench/launch_sweep.py --l2 false --key ...` (triton 3.6,
#: sm_90) over those keys. A sweep of every key (`--l2 false`, 96 variants x 8
#: configurations) then moved three more that gain in flight: fp32 SGD with momentum 160 ->
#: 180 KB, bf16 Adam with fp32 states and amsgrad 160 -> 192, fp16 SGD with a master 128 -> 138
#: (its other changes were ties within 5%: 5,421 -> 5,479 KB summed over 44 keys); every other
#: key runs both variants at the table's choice (`compile_check.py --require` checks both).
#: bf16 Adam with 8-bit states and stochastic rounding: (2, 2), set by hand; the sweep's (2, 4)
#: held 40 KB but read a third of a full block with narrower loads, which the sweep does not
#: check and --require does.
_UPDATE_NO_L2 = {
    (L.KIND_ADAM, "bf16", "bf16", 0, False): (2, 2),
    (L.KIND_ADAM, "bf16", "bf16", 1, False): (2, 2),
    (L.KIND_ADAM, "bf16", "bf16", 2, False): (1, 1),
    (L.KIND_ADAM, "bf16", "fp32", 0, True): (2, 2),
    (L.KIND_ADAM, "bf16", "uint8", 2, False): (2, 2),
    (L.KIND_ADAM, "fp16", "fp16", 0, False): (2, 2),
    (L.KIND_ADAM, "fp32", "bf16", 0, False): (2, 1),
    (L.KIND_SGD, "bf16", "bf16", 0, True): (2, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, False): (1, 8),
    (L.KIND_SGD, "bf16", "bf16", 2, True): (1, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, False): (2, 1),
    (L.KIND_SGD, "bf16", "uint8", 2, False): (2, 1),
    (L.KIND_SGD, "fp16", "fp16", 0, True): (2, 4),
    (L.KIND_SGD, "fp16", "fp32", 1, False): (1, 1),
    (L.KIND_SGD, "fp32", "fp32", 0, True): (2, 1)}


@functools.cache  # on the host path of every step: a dict lookup
def update_launch(kind: int, dtype: torch.dtype, elements: int, flag: bool,
                  state: int | None = None, mode: int = 0, l2: bool = True) -> tuple[int, int]:
    """(SPLIT, num_warps) of an update launch whose programs own ``elements`` elements each:
    the table above, warps scaled so a thread keeps the same elements at other block sizes (1
    to 16); ``state`` / ``mode`` / ``l2`` as :func:`launch_update`."""
    return _launch(_UPDATE_LAUNCH, _UPDATE_FALLBACK, kind, dtype, elements, flag,
                   tl_state(state, dtype, mode), mode, None if l2 else _UPDATE_NO_L2)


def _go(fn, grid: tuple, args: tuple, kwargs: dict, rec) -> None:
    """``fn[grid](*args, **kwargs)``, recorded into ``rec`` = (list, dynamic tensors) when
    given (see :mod:`.replay`).

    Every kernel is compiled with ``enable_fp_fusion=False``: by default the compiler contracts
    ``a * b + c`` into one FMA (one rounding instead of two), so Adam's ``b1 * m + (1 - b1) * g``
    and a sum of squares would differ from the CPU executor and the reference (built without
    contraction) in the last bit, and a stochastic-rounding bit or an 8-bit code at a rounding
    boundary with them. Without it the update's PTX has no ``fma.rn.f32`` (division and square
    root are ``div_rn`` / ``sqrt_rn``: IEEE), so the elementwise arithmetic is the CPU's, operation
    for operation; the cost is registers within 8 of the fused code (sm_90, triton 3.6: Adam
    fp32 88 -> 96, the bf16 and 8-bit variants at 242-255 either way) on kernels that wait for
    memory, not arithmetic (bench/compile_check.py --table)."""
    kwargs.setdefault("enable_fp_fusion", False)
    kernel = fn[grid](*args, **kwargs)
    if rec is not None:
        _replay.record(rec[0], fn, kernel, grid, args, kwargs, rec[1])


def launch_grad_stats(tensors, blocks, part, n_blocks: int, dtype: torch.dtype, block: int,
                      mask_bad: bool = True, rec=None) -> None:
    """Statistics pass over the gradients of one dtype bucket (``part``: its rows of partials);
    ``mask_bad``: leave non-finite elements out of the sums (they are counted either way).

    One array per program (8 KB at 2048 fp32): 128 bytes a thread (2 warps fp32, 1 bf16) so
    that the 32 programs an SM may hold keep 128-256 KB in flight."""
    if n_blocks:
        per = 128 // torch.empty((), dtype=dtype).element_size()
        _go(_grad_stats_kernel, (n_blocks,), (tensors, blocks, part),
            dict(DTYPE=tl_dtype(dtype), BLOCK=block, MASK_BAD=mask_bad,
                 num_warps=_warps(block, per, 8)), rec)


def launch_reduce(first, part, tstat, n_tensors: int, block_r: int = 256, rec=None) -> None:
    """Per-tensor sums of the block partials, one program per tensor, in a fixed order."""
    _go(_reduce_kernel, (n_tensors,), (first, part, tstat), dict(BLOCK_R=block_r), rec)


def launch_finalize(tensors, groups, scal, sched_table, clock, n_tensors: int, kind: int, *,
                    cfg, tstat, ustat, gstat, lr_out, hist, hist_pos, hist_len: int,
                    grad_scale, found_inf, stats: bool, clip: bool, guard: bool,
                    history: bool, advance: bool = False, block_t: int = FINALIZE_ROWS,
                    block_s: int = 1024, seg_block: int = 64, rec=None) -> None:
    """Schedule, norms, clip coefficient, skip flag, per-tensor scalars, counters: one program
    per ``block_t`` tensors (at 2,000 tensors 16 programs in parallel where one program
    walked 16 chunks one after another, ~10-27 us).

    ``advance``: advance the clock here. Every program reads the clock, so only a one-program
    grid may write it: with ``advance`` the launch is one program walking every row (the step
    has no update launch: all its tensors are empty); otherwise the first update launch does.
    ``stats``: the statistics pass ran (``tstat`` holds its sums). Tensors that a disabled
    feature does not read may be any tensor (they are never touched).
    """
    scaler = grad_scale is not None
    dummy = scal
    grid = 1 if advance else max(1, triton.cdiv(n_tensors, block_t))
    _go(_finalize_kernel, (grid,), (
        tensors, groups, scal, sched_table, sched_table.shape[0], clock, n_tensors, cfg,
        tstat if stats else dummy, ustat if stats else dummy, gstat if stats else dummy,
        lr_out if stats else dummy, lr_out.numel() if stats else 0, hist if history else dummy,
        hist_pos if history else clock, max(hist_len, 1),
        grad_scale if scaler else dummy, found_inf if scaler else dummy, int(advance)),
        dict(KIND=kind, STATS=stats, CLIP=clip, GUARD=guard, SCALER=scaler, HISTORY=history,
             BLOCK_T=block_t, BLOCK_S=block_s, SEG_BLOCK=seg_block, num_warps=FINALIZE_WARPS),
        rec)


#: (BLOCK, STAGES, num_warps) of the pipelined update (:func:`_run_update_kernel`) by (kind,
#: parameter dtype, state storage, mode, flag, statistics, weight term): the variants where,
#: compiled for sm_90 by triton 3.6, it holds at least 1.1x the bytes in flight per SM of the
#: per-block kernel at its tables above, chosen by `python bench/run_sweep.py` (no spills, no
#: data load left in registers, 16-byte cp.async copies; then the most in flight, then the
#: fewest registers x warps; 3-4 stages, and 6 or 8 where those fall short of 128 KB). A FLAG
#: key applies to launches whose every tensor has the optional state (Bucket.all3); the
#: others, and every variant not here, keep the per-block kernel: fp32 AdamW holds 192 KB
#: either way, and the per-block design is the one measured on an H100 (2.99 TB/s, 99.7% of
#: copy). Of the 118 variants the sweep compiled (those short of 128 KB per block, and fp32 /
#: 16-bit AdamW), 116 are here; at 128 KB or more: 117 with them, 26 per block
#: (bench/results/run-sweep-sm90-20261202.txt). 16-bit SGD with momentum 56-108 -> 180-216 KB
#: (55-127 registers), 16-bit Adam 80-144 -> 144-224, bf16 with 8-bit states 32-168 ->
#: 120-216. Of the 29 at 6 or 8 stages, 27 are held to 2-3 programs an SM by their registers
#: (146-255: 8-bit states, stochastic rounding); the blocks copied ahead sit in shared memory,
#: so a deeper pipeline holds more with the same programs (bf16 Adam with 8-bit states and
#: stochastic rounding: 72 KB at 4 stages, 168 at 8). Short still: bf16 Adam with 8-bit
#: states, statistics and the weight term (120 KB at 6 stages, 214 registers).
_RUN_LAUNCH = {
    (L.KIND_ADAM, "bf16", "bf16", 0, False, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, False, False, True): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, False, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, False, True, True): (1024, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True, False, True): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True, True, True): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, True, False, False): (1024, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, True, False, True): (1024, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, True, True, False): (1024, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, True, True, True): (1024, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, False, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, False, False, True): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, False, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, False, True, True): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, True, False, False): (1024, 8, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, True, False, True): (1024, 8, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, True, True, False): (1024, 8, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, True, True, True): (1024, 8, 4),
    (L.KIND_ADAM, "bf16", "uint8", 0, False, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "bf16", "uint8", 0, False, False, True): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "uint8", 0, False, True, False): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 0, False, True, True): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 1, False, False, False): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 1, False, False, True): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 1, False, True, False): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 1, False, True, True): (2048, 6, 4),
    (L.KIND_ADAM, "bf16", "uint8", 2, False, False, False): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "uint8", 2, False, False, True): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "uint8", 2, False, True, False): (2048, 8, 4),
    (L.KIND_ADAM, "bf16", "uint8", 2, False, True, True): (2048, 8, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, False, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, False, False, True): (1024, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, False, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, False, True, True): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True, False, False): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True, False, True): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True, True, True): (2048, 4, 4),
    (L.KIND_ADAM, "fp32", "uint8", 0, False, False, False): (2048, 3, 4),
    (L.KIND_ADAM, "fp32", "uint8", 0, False, False, True): (2048, 3, 4),
    (L.KIND_ADAM, "fp32", "uint8", 0, False, True, False): (2048, 4, 4),
    (L.KIND_ADAM, "fp32", "uint8", 0, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True, False, False): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, False, False, False): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, False, False, True): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, False, True, True): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, True, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, True, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, True, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 1, True, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, False, True, False): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, False, True, True): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, True, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, True, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, True, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "bf16", 2, True, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True, False, False): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True, False, True): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True, True, False): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True, True, True): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 1, False, False, False): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "fp32", 1, False, False, True): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "fp32", 1, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "fp32", 1, False, True, True): (2048, 3, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, True, False, False): (2048, 6, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, True, False, True): (2048, 6, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, True, True, False): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 0, True, True, True): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, False, False, False): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, False, False, True): (1024, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, True, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, True, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, True, True, False): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 1, True, True, True): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, False, True, False): (1024, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, False, True, True): (1024, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, True, False, False): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, True, False, True): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, True, True, False): (2048, 8, 4),
    (L.KIND_SGD, "bf16", "uint8", 2, True, True, True): (2048, 8, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, False, False, False): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, False, False, True): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, False, True, False): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, False, True, True): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True, False, False): (2048, 3, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True, False, True): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True, True, False): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True, True, True): (2048, 4, 4),
    (L.KIND_SGD, "fp16", "fp32", 1, False, False, False): (2048, 3, 4),
    (L.KIND_SGD, "fp16", "fp32", 1, False, False, True): (2048, 3, 4),
    (L.KIND_SGD, "fp16", "fp32", 1, False, True, False): (2048, 3, 4),
    (L.KIND_SGD, "fp16", "fp32", 1, False, True, True): (2048, 4, 4)}
#: benchmarks only (bench/gpu_check.sh): FASTSCHED_UPDATE_RUNS=0 launches every flat update
#: through the per-block kernel (the launch configuration before the pipelined one)
_RUNS = os.environ.get("FASTSCHED_UPDATE_RUNS", "1") != "0"


@functools.cache  # on the host path of every step: a dict lookup
def run_launch(kind: int, dtype: torch.dtype, flag: bool, all3: bool, stats: bool,
               state: int | None = None, mode: int = 0, l2: bool = True):
    """(BLOCK, STAGES, num_warps) of the pipelined update of this variant, or None where the
    per-block kernel runs it (:data:`_RUN_LAUNCH`)."""
    if not _RUNS or _FORCE_WARPS or (flag and not all3):
        return None
    key = (kind, _DT_NAMES[dtype], _TL_NAMES[tl_state(state, dtype, mode)], mode, bool(flag),
           bool(stats), bool(l2))
    return _RUN_LAUNCH.get(key)


def launch_update(kind: int, tensors, blocks, scal, ustat, n_blocks: int, dtype: torch.dtype,
                  block: int, flag: bool, stats: bool, clock, advance: bool,
                  state: int | None = None, mode: int = 0, l2: bool = True,
                  runs=None, n_runs: int = 0, run_elements: int = 0, all3: bool = False,
                  rec=None) -> bool:
    """The update pass over every block of one dtype bucket (``flag``: amsgrad / momentum;
    ``stats``: per-tensor sums of p^2 and u^2 into ``ustat``; ``advance``: this launch
    advances ``clock``, on exactly one launch of a step). ``state``: the STATE_* code of the
    bucket's states (None: the parameter's dtype); ``mode``: 0, MODE_MASTER or MODE_SR;
    ``l2``: the gradient gets ``weight_decay * p`` (Adam's L2 penalty, SGD's weight decay;
    False: the term is left out, for AdamW and groups with weight_decay 0). The launch
    configuration does not depend on ``l2`` (the variant without the term is the other one
    less a multiply and an add) except where :data:`_UPDATE_NO_L2` says.
    ``runs`` / ``n_runs``: the same elements as rows (tensor, first element) of
    ``run_elements`` each; where :func:`run_launch` has the variant (``all3``: every tensor
    has the optional state), the launch is one program per run of the pipelined kernel.
    Returns whether it was (False: the per-block kernel, or nothing to launch)."""
    if n_blocks:
        sdtype = tl_state(state, dtype, mode)
        if sdtype == tl.uint8 and (block % L.Q_BLOCK or (kind == L.KIND_ADAM and flag)):
            raise ValueError("8-bit states: the block must be a multiple of Q_BLOCK and "
                             "amsgrad's max_exp_avg_sq is never 8-bit")
        cfg = None if runs is None else run_launch(kind, dtype, flag, all3, stats, state, mode,
                                                   bool(l2))
        if cfg is not None and run_elements % cfg[0] == 0:
            rb, stages, warps = cfg
            _go(_run_update_kernel, (n_runs,),
                (tensors, runs, scal, ustat if stats else scal, clock, int(advance)),
                dict(KIND=kind, DTYPE=tl_dtype(dtype), BLOCK=rb, RUN=run_elements // rb,
                     STAGES=stages, FLAG=flag, ALL3=bool(flag and all3), STATS=stats,
                     SDTYPE=sdtype, MODE=mode, L2=bool(l2), num_warps=warps), rec)
            return True
        split, warps = update_launch(kind, dtype, block, flag, state, mode, bool(l2))
        _go(_update_kernel, (n_blocks,),
            (tensors, blocks, scal, ustat if stats else scal, clock, int(advance)),
            dict(KIND=kind, DTYPE=tl_dtype(dtype), BLOCK=block, FLAG=flag, STATS=stats,
                 SDTYPE=sdtype, MODE=mode, SPLIT=split, L2=bool(l2), num_warps=warps), rec)
    return False


#: (SPLIT, num_warps) of an ALLoRA unit tile of 2048 elements by (kind, parameter dtype, state
#: storage, mode, flag), chosen as _UPDATE_LAUNCH by `python bench/launch_sweep.py --kernel
#: units` (SPLIT 2: each chunk of the tile in two halves along its rows, loads first). Over
#: the 32 keys: 13 -> 32 without spills, loads in flight summed 2,328 -> 3,332 KB (after the
#: masked paths went to 256-element sub-tiles; before that, 144 of the 216 unit variants
#: spilled, 177 KB of spill stores in all); fp32 Adam 80 -> 128 KB at 4 warps, 122 registers.
#: (bf16 Adam with fp32 states and amsgrad: 2 warps, not the sweep's 4, whose variant with
#: statistics spilled 20 bytes; 108 KB.)
_UNITS_LAUNCH = {
    (L.KIND_ADAM, "bf16", "bf16", 0, False): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 0, True): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, False): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 1, True): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, False): (2, 4),
    (L.KIND_ADAM, "bf16", "bf16", 2, True): (2, 4),
    (L.KIND_ADAM, "bf16", "fp32", 0, False): (2, 4),
    (L.KIND_ADAM, "bf16", "fp32", 0, True): (2, 2),
    (L.KIND_ADAM, "bf16", "fp32", 1, False): (2, 2),
    (L.KIND_ADAM, "bf16", "fp32", 1, True): (1, 2),
    (L.KIND_ADAM, "fp16", "fp16", 0, False): (2, 4),
    (L.KIND_ADAM, "fp16", "fp16", 0, True): (2, 4),
    (L.KIND_ADAM, "fp16", "fp32", 1, False): (2, 2),
    (L.KIND_ADAM, "fp16", "fp32", 1, True): (1, 2),
    (L.KIND_ADAM, "fp32", "bf16", 0, False): (2, 4),
    (L.KIND_ADAM, "fp32", "bf16", 0, True): (2, 4),
    (L.KIND_ADAM, "fp32", "fp32", 0, False): (2, 4),
    (L.KIND_ADAM, "fp32", "fp32", 0, True): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 0, False): (2, 4),
    (L.KIND_SGD, "bf16", "bf16", 0, True): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 1, False): (2, 2),
    (L.KIND_SGD, "bf16", "bf16", 1, True): (2, 1),
    (L.KIND_SGD, "bf16", "bf16", 2, False): (2, 1),
    (L.KIND_SGD, "bf16", "bf16", 2, True): (2, 2),
    (L.KIND_SGD, "bf16", "fp32", 0, False): (1, 4),
    (L.KIND_SGD, "bf16", "fp32", 0, True): (2, 4),
    (L.KIND_SGD, "bf16", "fp32", 1, False): (2, 2),
    (L.KIND_SGD, "bf16", "fp32", 1, True): (2, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, False): (2, 4),
    (L.KIND_SGD, "fp16", "fp16", 0, True): (2, 2),
    (L.KIND_SGD, "fp16", "fp32", 1, False): (2, 2),
    (L.KIND_SGD, "fp16", "fp32", 1, True): (2, 4),
    (L.KIND_SGD, "fp32", "bf16", 0, False): (1, 2),
    (L.KIND_SGD, "fp32", "bf16", 0, True): (2, 4),
    (L.KIND_SGD, "fp32", "fp32", 0, False): (1, 2),
    (L.KIND_SGD, "fp32", "fp32", 0, True): (2, 2)}
#: a combination the table does not hold: the previous choice (the masked paths, quarter
#: tiles then, set ~255 registers at any warp count, so fewer warps meant more programs)
_UNITS_FALLBACK = {(L.KIND_ADAM, False): (1, 2), (L.KIND_ADAM, True): (1, 1),
                   (L.KIND_SGD, False): (1, 1), (L.KIND_SGD, True): (1, 1)}


#: as :data:`_UPDATE_NO_L2` for the unit tiles (`launch_sweep.py --kernel units --l2 false
#: --key ...` over the keys whose variants without the term failed --require at the table's
#: choice). A sweep of every key, whose unit sweep leaves the statistics variants out, found
#: 14 keys holding 5-30% more in flight without statistics, but at those choices 16 statistics
#: variants spilled 8-36 bytes or held less (fp32 SGD 108 -> 90 KB): not taken.
_UNITS_NO_L2 = {
    (L.KIND_ADAM, "bf16", "fp32", 1, True): (2, 4),
    (L.KIND_ADAM, "fp16", "fp32", 1, True): (2, 4),
    (L.KIND_SGD, "fp32", "bf16", 0, False): (2, 1),
    (L.KIND_SGD, "fp32", "fp32", 0, False): (2, 1)}


@functools.cache
def units_launch(kind: int, dtype: torch.dtype, units: int, chunk: int, flag: bool,
                 state: int | None = None, mode: int = 0, l2: bool = True) -> tuple[int, int]:
    """(SPLIT, num_warps) of a units launch of [units, chunk] tiles (the table above, scaled as
    :func:`update_launch`; ``FASTSCHED_UPDATE_WARPS`` overrides it too). SPLIT halves a chunk:
    only chunks of 16 or more (halves of at least 16 bytes of bf16)."""
    split, warps = _launch(_UNITS_LAUNCH, _UNITS_FALLBACK, kind, dtype, units * chunk, flag,
                           tl_state(state, dtype, mode), mode, None if l2 else _UNITS_NO_L2)
    return (split if chunk >= 16 else 1), warps


def launch_units_update(kind: int, tensors, blocks, scal, ustat, n_blocks: int,
                        dtype: torch.dtype, units: int, chunk: int, flag: bool,
                        stats: bool, clock, advance: bool, state: int | None = None,
                        mode: int = 0, l2: bool = True, rec=None) -> None:
    """The ALLoRA update over the unit tiles of one (dtype, unit-length class) bucket; SPLIT
    and warps by :func:`units_launch` for a tile of ``units * chunk`` elements. ``state`` /
    ``mode`` / ``l2`` as :func:`launch_update`, except 8-bit states (ValueError: a unit tile
    does not own whole quantisation blocks)."""
    if n_blocks:
        sdtype = tl_state(state, dtype, mode)
        if sdtype == tl.uint8:
            raise ValueError("8-bit states of ALLoRA tensors are not supported by the Triton "
                             "unit kernel")
        split, warps = units_launch(kind, dtype, units, chunk, flag, state, mode, bool(l2))
        _go(_units_update_kernel, (n_blocks,),
            (tensors, blocks, scal, ustat if stats else scal, clock, int(advance)),
            dict(KIND=kind, DTYPE=tl_dtype(dtype), UNITS=units, CHUNK=chunk, FLAG=flag,
                 STATS=stats, SDTYPE=sdtype, MODE=mode, SPLIT=split, L2=bool(l2),
                 num_warps=warps), rec)
