"""Plain PyTorch executor of the fused step: the CPU backend and the oracle for the kernels.

It runs the passes of the Triton backend on the same buffers of a :class:`~._tables.Plan`
(statistics into ``tstat``, finalize into ``scal`` / ``gstat`` / ``lr`` / ``history``, update
reading ``scal`` and summing into ``ustat``), with the same formulas, so the two agree to fp32
rounding and one statistics view decodes both. It never reads a device value on the host, so it
is also sync-free on CUDA tensors (just slow: several kernels per tensor).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..kernels import layout as L
from . import _lowp

__all__ = ["grad_sums", "finalize", "adam_update", "sgd_update", "allora_scales", "sqrt_rn",
           "unit_sums", "unit_sums_f32"]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 or float64 tensor, as the compiled CPU
    executor's ``std::sqrt`` and the kernels' ``sqrt_rn``. torch's CPU ``sqrt`` is not (MKL's
    vector routine: ~0.7% of float32 and ~0.9% of float64 inputs one ulp off). On the CPU:
    numpy's (the sqrt instruction, IEEE); elsewhere float32 through float64 (correctly rounded
    whenever the float64 root is within 4 ulps: the exact root of a float32 lies at least 2^-50
    of its binade from every float32 midpoint) and float64 as torch's (IEEE on CUDA)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        out = torch.empty_like(x)
        np.sqrt(x.numpy(), out=out.numpy())
        return out
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    return torch.sqrt(x)


def _pow(b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``b ** e`` (float64 vectors) as the compiled CPU executor's ``std::pow``: on the CPU the C
    library's ``pow`` element by element (``math.pow``), which torch's vectorised pow (8
    elements or more) differs from in the last bit for ~1% of (beta, step) pairs; elsewhere
    torch's."""
    if b.device.type != "cpu":
        return torch.pow(b, e)
    return torch.tensor(list(map(math.pow, b.tolist(), e.tolist())), dtype=b.dtype)


def grad_sums(grads, tstat: torch.Tensor, *, guard: bool, reduce=None) -> None:
    """The statistics pass: per tensor (sum g^2, sum |g|, non-finite count) in float64 into
    ``tstat``; non-finite elements are left out of the sums when ``guard`` is on (else the sums
    are non-finite, as ``clip_grad_norm_``'s). ``reduce`` (or None) sums the rows of local
    shards over ranks."""
    sq, ab, nf = [], [], []
    for g in grads:
        g64 = g.to(torch.float64)
        bad = ~torch.isfinite(g64)
        ok = torch.where(bad, 0.0, g64) if guard else g64
        sq.append((ok * ok).sum())
        ab.append(ok.abs().sum())
        nf.append(bad.sum().to(torch.float64))
    sums = torch.stack([torch.stack(sq), torch.stack(ab), torch.stack(nf)], 1)
    if reduce is not None:
        sums = reduce(sums)
    tstat[:, L.TS_SQ], tstat[:, L.TS_ABS], tstat[:, L.TS_NONFINITE] = sums.unbind(1)


def finalize(plan, buffers, schedule_table: torch.Tensor, *, stats_pass: bool, clip: bool,
             guard: bool, grad_scale=None, found_inf=None) -> None:
    """The finalize pass: schedule, global norms, clip coefficient, skip flag and every
    per-tensor scalar in float64, rounded once into ``plan.scal``; advances the counters."""
    from ..schedules._core import evaluate_table

    dev = plan.scal.device
    f64 = torch.float64
    clock = buffers.clock
    t0 = clock.to(f64).reshape(())  # the step's clock value, for the ring buffer
    factor = evaluate_table(schedule_table, clock.reshape(1))[0]
    inv_scale = (torch.ones((), dtype=f64, device=dev) if grad_scale is None
                 else 1.0 / grad_scale.reshape(()).to(f64))
    coef = torch.ones((), dtype=f64, device=dev)
    active = torch.ones((), dtype=torch.bool, device=dev)
    ts = plan.tstat
    if stats_pass:
        gnorm = sqrt_rn(ts[:, L.TS_SQ].sum()) * inv_scale
        nonfinite = ts[:, L.TS_NONFINITE].sum()
        ts[:, L.TS_NORM] = sqrt_rn(ts[:, L.TS_SQ]) * inv_scale
        if clip:  # clip_grad_norm_: max_norm / (norm + 1e-6), clamped at 1
            coef = torch.clamp(buffers.config[L.CFG_MAX_GRAD_NORM] / (gnorm + 1e-6), max=1.0)
        if guard:
            active = nonfinite == 0
    if found_inf is not None:
        active = active & (found_inf.reshape(()) == 0)
    rows = buffers.groups[plan.group_rows]  # device tables only: no host round trip
    step = torch.stack(plan.steps).to(f64)
    new_step = step + active.to(f64)
    lr = rows[:, L.G_LR] * factor
    sign = torch.where(rows[:, L.G_MAXIMIZE] != 0, -1.0, 1.0).to(f64)
    out = torch.zeros((len(plan), L.S_COLS), dtype=f64, device=dev)
    if plan.kind == L.KIND_ADAM:
        b1, b2 = rows[:, L.G_ADAM_BETA1], rows[:, L.G_ADAM_BETA2]
        wd, dec = rows[:, L.G_WEIGHT_DECAY], rows[:, L.G_ADAM_DECOUPLED] != 0
        bc1 = 1.0 - _pow(b1, new_step)
        bc2 = 1.0 - _pow(b2, new_step)
        out[:, L.S_ADAM_STEP_SIZE] = lr / bc1
        out[:, L.S_ADAM_BC2_SQRT] = sqrt_rn(bc2)
        out[:, L.S_ADAM_DECAY_MUL] = torch.where(dec, 1.0 - lr * wd, 1.0)
        out[:, L.S_ADAM_L2] = torch.where(dec, 0.0, wd)
        # 1 - beta in float64, rounded once (fp32 1 - fp32(0.999) is 1.3e-5 off)
        out[:, L.S_ADAM_OMB1] = 1.0 - b1
        out[:, L.S_ADAM_OMB2] = 1.0 - b2
        out[:, L.S_ADAM_EPS] = rows[:, L.G_ADAM_EPS]
        out[:, L.S_ADAM_BC1] = bc1
    else:  # torch.optim.SGD: the first step copies d_p into the momentum buffer
        first = step == 0
        mom = rows[:, L.G_SGD_MOMENTUM]
        out[:, L.S_SGD_MOM_A] = torch.where(first, 0.0, mom)
        out[:, L.S_SGD_MOM_B] = torch.where(first, 1.0, 1.0 - rows[:, L.G_SGD_DAMPENING])
        out[:, L.S_SGD_WEIGHT_DECAY] = rows[:, L.G_WEIGHT_DECAY]
        out[:, L.S_SGD_NESTEROV] = rows[:, L.G_SGD_NESTEROV]
        out[:, L.S_SGD_MOMENTUM] = mom
    out[:, L.S_GRAD_MUL] = sign * coef * inv_scale
    out[:, L.S_ACTIVE] = active.to(f64)
    out[:, L.S_LR] = lr
    out[:, L.S_INV_ETA2] = rows[:, L.G_INV_ETA2]
    out[:, L.S_ALLORA_UPDATE] = rows[:, L.G_ALLORA_UPDATE]
    plan.scal.copy_(out)
    if plan.scal64 is not None:  # float64 tensors: the scalars before their rounding
        plan.scal64.copy_(out)
    for s, v in zip(plan.steps, new_step.to(torch.float32).unbind()):
        s.copy_(v)
    clock.add_(active.to(clock.dtype))
    if stats_pass:
        g = buffers.gstat
        lr_all = buffers.groups[:, L.G_LR] * factor
        skipped = (~active).to(f64)
        g[L.STAT_GRAD_NORM] = gnorm
        g[L.STAT_GRAD_NORM_L1] = ts[:, L.TS_ABS].sum() * inv_scale
        g[L.STAT_CLIP_COEF] = coef
        g[L.STAT_SKIPPED] = skipped
        g[L.STAT_SKIP_COUNT] += skipped
        g[L.STAT_NONFINITE] = nonfinite
        g[L.STAT_LR0] = lr_all[0]
        g[L.STAT_INV_SCALE] = inv_scale
        buffers.lr.copy_(lr_all)
        if buffers.history_len:
            slot = buffers.history_pos % buffers.history_len
            row = torch.zeros(L.H_COLS, dtype=f64, device=dev)
            row[L.H_STEP] = t0
            row[L.H_GRAD_NORM] = g[L.STAT_GRAD_NORM]
            row[L.H_LR] = lr_all[0]
            row[L.H_SKIPPED] = skipped
            row[L.H_GRAD_NORM_L1] = g[L.STAT_GRAD_NORM_L1]
            buffers.history[slot] = row
            buffers.history_pos += 1


#: elements of the pieces the CPU executor sums a contiguous unit longer than this in
#: (``BLK`` of setup_ext/kernels.h), and its accumulation lanes (``W``)
_UNIT_PIECE = 8192
_LANES = 16


def _lane_sums(sq: torch.Tensor) -> torch.Tensor:
    """Sums of the rows of ``sq`` (float64 squares, a unit a row) in the CPU executor's order
    (``SumSq`` of setup_ext/kernels.h): element j into lane j % 16, each lane from +0 in element
    order, then the lanes 0..15 in order from +0; a row over 8192 elements in pieces of 8192
    summed so and added in order (``unit_sums``). Zeros pad the rows (a zero adds nothing to a
    sum of squares, which is never -0). ``cumsum`` on the CPU adds in order (one rounding per
    element): its last entry is the sequential sum."""
    units, n = sq.shape
    if n == 0 or units == 0:
        return sq.new_zeros(units)
    piece = _UNIT_PIECE if n > _UNIT_PIECE else -(-n // _LANES) * _LANES
    pieces = -(-n // piece)
    sq = torch.nn.functional.pad(sq, (0, pieces * piece - n))
    lanes = sq.reshape(units, pieces, piece // _LANES, _LANES).cumsum(2)[:, :, -1]
    parts = lanes.cumsum(2)[:, :, -1]
    return parts.cumsum(1)[:, -1]


def _units64(p: torch.Tensor, unit: str) -> tuple[torch.Tensor, bool]:
    """``p``'s float32 values (float64 parameters rounded to float32 first) in float64, 2-D, and
    whether the whole tensor is one unit (then one row; else ``p.reshape(p.shape[0], -1)``:
    rows are units of ``"row"``, columns of ``"column"``)."""
    x = p.to(torch.float32).to(torch.float64)
    if p.dim() < 2 or unit == "tensor":
        return x.reshape(1, -1), True
    return x.reshape(p.shape[0], math.prod(p.shape[1:])), False


def unit_sums(p: torch.Tensor, unit: str) -> torch.Tensor:
    """The ALLoRA sums of squares of ``p``'s units, float64, as the CPU executor sums them (bit
    for bit): the float32 values (float64 parameters rounded to float32 first), squared exactly
    in float64; contiguous units (rows, the tensor, a single column) by :func:`_lane_sums`,
    columns row by row in order. Shaped for the reduction over ranks: () for the tensor,
    (rows, 1) for rows, (1, columns) for columns."""
    v, whole = _units64(p, unit)
    sq = v * v
    if whole:
        return _lane_sums(sq).reshape(())
    if unit == "row":
        return _lane_sums(sq).reshape(-1, 1)
    if sq.shape[1] == 1:  # one column: a contiguous unit
        return _lane_sums(sq.t()).reshape(1, 1)
    if sq.shape[0] == 0:
        return sq.new_zeros(1, sq.shape[1])
    return sq.cumsum(0)[-1:]


def unit_sums_f32(p: torch.Tensor, unit: str) -> torch.Tensor:
    """:func:`unit_sums` rounded to float32 (the executor's ``static_cast<float>``), from
    torch's faster float64 sums where the order cannot matter: two float64 sums of the same n
    non-negative terms in any orders are within 2.01 n 2^-53 of each other (relative), so where
    the ends of that interval round to the same float32 both do; the other units (~n 2^-29 of
    them: rare) are summed again in the executor's order."""
    v, whole = _units64(p, unit)
    dim = 1 if whole or unit == "row" else 0
    n = v.shape[dim]
    fast = v.square_().sum(dim)
    delta = (4 * n + 4) * 2.0 ** -53
    amb = (fast * (1 - delta)).to(torch.float32) != (fast * (1 + delta)).to(torch.float32)
    if amb.any():  # NaN and infinite sums too: the executor's order gives their value
        exact = unit_sums(p, unit).reshape(-1)
        fast = torch.where(amb, exact, fast)
    out = fast.to(torch.float32)
    return out.reshape(()) if whole else out.reshape((1, -1) if dim == 0 else (-1, 1))


def allora_scales(p: torch.Tensor, unit: str, inv_eta2: float, reduce=None) -> torch.Tensor:
    """ALLoRA gradient multiplier ``1 / sqrt(||theta_unit||^2 + 1 / eta^2)`` shaped like ``p``
    (float32, a broadcast view), as the CPU executor's ``unit_scale``: the float64 sum of
    squares (:func:`unit_sums`) rounded to float32, plus ``inv_eta2`` rounded to float32, a
    correctly rounded float32 square root and division.

    Units are the rows or columns of ``p.reshape(p.shape[0], -1)`` or the whole tensor (always
    the whole tensor below two dimensions). ``reduce`` (or None) sums the per-unit float64 sums
    of squares over the ranks holding parts of a unit (a sharded parameter's local shard); it
    is called on every rank, also for an empty shard.
    """
    if isinstance(inv_eta2, torch.Tensor):  # (a float64 scalar would promote the sums)
        inv_eta2 = inv_eta2.to(torch.float32)
    if reduce is None:
        n = unit_sums_f32(p, unit)
    else:  # the executor's float64 sums of each rank, summed over the ranks, then rounded
        n = unit_sums(p, unit)
        n = (reduce(n.reshape(1)).reshape(()) if n.dim() == 0 else reduce(n)).to(torch.float32)
    scale = 1.0 / sqrt_rn(n + inv_eta2)
    if n.dim() == 0:
        return scale.expand(p.shape)
    cols = math.prod(p.shape[1:])
    return scale.expand(p.shape[0], cols).reshape(p.shape)


def _scales(plan, rows):
    """Per tensor (gradient multiplier, update multiplier): ALLoRA's unit scale goes to the
    gradient (``allora_apply="grad"``) or to the step (``"update"``); None: 1."""
    out = []
    for i, (p, unit) in enumerate(zip(plan.local_params, plan.units)):
        if unit is None:
            out.append((None, None))
            continue
        lp = plan.lowp[i] if plan.lowp else None
        if lp is not None and lp.master is not None:
            p = lp.master  # the weights the step updates: the unit norms of the master
        row = rows[plan.group_index[i]]
        red = None if plan.dist is None else (lambda t, i=i: plan.dist.reduce_units(i, t))
        scale = allora_scales(p, unit, row[L.G_INV_ETA2], red)
        out.append((None, scale) if row[L.G_ALLORA_UPDATE] else (scale, None))
    return out


_flat = _lowp.storage_flat


class _Io:
    """Reads and writes of one tensor's parameter and states under its low-precision options
    (``plan.lowp[i]``; None: the parameter's dtype for everything, as torch)."""

    def __init__(self, plan, i, act):
        self.lp = plan.lowp[i] if plan.lowp else None
        # the arithmetic: float64 for a float64 tensor with float64 states (torch.optim's),
        # else float32 (fused=True's, and every storage below fp32)
        lp = self.lp
        f64 = plan.local_params[i].dtype == torch.float64 and (lp is None or lp.mode == 0 and (
            lp.sdtype == _lowp.STATE_CODES[torch.float64]
            or all(t is None for t in plan.states[i])))
        self.cdt = torch.float64 if f64 else torch.float32
        self.scal = plan.scal64[i] if f64 else plan.scal[i]
        self.act = act  # None: the step cannot be skipped (no guard, no scaler): plain writes
        self.step = plan.steps[i]  # after finalize's increment: the generator's step

    def param(self, p):
        lp = self.lp
        if lp is not None and lp.master is not None:
            return _flat(lp.master).to(torch.float32)
        return (p if lp is None else _flat(p)).to(self.cdt)

    def _put(self, dst, x):
        dst.copy_(x if self.act is None else torch.where(self.act, x, dst))

    def write_param(self, p, w):
        lp = self.lp
        if lp is None:
            self._put(p, w.to(p.dtype))
            return
        pf = _flat(p)
        if lp.master is not None:
            self._put(_flat(lp.master), w)
            self._put(pf, w.to(p.dtype))
        elif lp.mode & L.MODE_SR:
            self._put(pf, _lowp.stochastic_round_bf16(w, lp.key, self.step, lp.elem0))
        else:
            self._put(pf, w.to(p.dtype))

    def state(self, t, k):
        """State ``k`` (0: S1, 1: S2, 2: S3) in the arithmetic's dtype (flat when low
        precision)."""
        lp = self.lp
        if t is None:
            return None
        if lp is None:
            return t.to(self.cdt)
        if lp.sdtype == L.STATE_8BIT:
            return _lowp.dequantize(_flat(t), lp.scales[k], signed=k == 0)
        return _flat(t).to(self.cdt)

    def write_state(self, t, k, x):
        lp = self.lp
        if lp is None:
            self._put(t, x.to(t.dtype))
            return
        tf = _flat(t)
        if lp.sdtype == L.STATE_8BIT:
            codes, scale = _lowp.quantize(x, signed=k == 0)
            q = lp.scales[k]
            self._put(tf, codes)
            self._put(q, scale.reshape(q.shape))
        else:
            self._put(tf, x.to(t.dtype))


def _flat_or(t, io):
    return t if io.lp is None or t is None else _flat(t)


def _flat_scale(x, io):
    """An ALLoRA multiplier shaped like its parameter (often a broadcast view), flat in the
    parameter's storage order: ALLoRA parameters are contiguous, so the logical order."""
    return x if io.lp is None or x is None else x.reshape(-1)


def _active(plan, can_skip):
    """The step's active flag as a device tensor (writes go through ``torch.where``) when the
    step can be skipped (non-finite guard or a GradScaler), else None (plain writes)."""
    return plan.scal[0, L.S_ACTIVE] != 0 if can_skip else None


def _put_ustat(plan, ustat, act) -> None:
    """The update statistics; zero on a skipped step (no update ran), as the kernels."""
    u = torch.stack(ustat)
    plan.ustat.copy_(u if act is None else torch.where(act, u, 0.0))


def adam_update(plan, grads, rows, *, stats: bool, can_skip: bool = True) -> None:
    """Adam / AdamW update of every tensor from ``plan.scal``, as ``torch.optim.Adam(W)`` with
    ``fused=True``: fp32 arithmetic (float64 for float64 tensors with float64 states, as
    torch), one rounding to the storage dtype; on a skipped step
    nothing changes. With ``stats`` the per-tensor (sum of new p^2, sum of u^2) go to
    ``plan.ustat``, u the update m_hat / (sqrt(v_hat) + eps) (times the ALLoRA scale with
    ``allora_apply="update"``), zero on a skipped step. ``rows``: the groups table on the host.
    ``can_skip``: False when the step cannot be skipped (writes without ``torch.where``). Low
    precision (``plan.lowp``): the master copy, stochastic rounding and the state storage of
    :mod:`._lowp`, on flat views in storage order."""
    act = _active(plan, can_skip)
    scales = _scales(plan, rows)
    ustat = []
    for i, p in enumerate(plan.local_params):
        io = _Io(plan, i, act)
        s = io.scal
        m_t, v_t, vmax_t = plan.states[i]
        g = _flat_or(grads[i], io).to(io.cdt) * s[L.S_GRAD_MUL]
        g_scale, u_scale = (_flat_scale(x, io) for x in scales[i])
        if g_scale is not None:
            g = g * g_scale
        p32 = io.param(p) * s[L.S_ADAM_DECAY_MUL]  # AdamW: p * (1 - lr * wd)
        if plan.l2[i]:  # Adam's L2 penalty, as torch only if weight_decay != 0 (never AdamW)
            g = g + s[L.S_ADAM_L2] * p32
        omb1, omb2 = s[L.S_ADAM_OMB1], s[L.S_ADAM_OMB2]
        m = io.state(m_t, 0)
        # torch's lerp: from the nearer end (beta1 = 0: m = g exactly)
        m = torch.where(omb1 < 0.5, m + omb1 * (g - m), g - (g - m) * (1.0 - omb1))
        v = (1.0 - omb2) * io.state(v_t, 1) + omb2 * g * g
        vv = v
        if vmax_t is not None:
            vv = torch.maximum(io.state(vmax_t, 2), v)
            io.write_state(vmax_t, 2, vv)
        u = m / (sqrt_rn(vv) / s[L.S_ADAM_BC2_SQRT] + s[L.S_ADAM_EPS])
        if u_scale is not None:
            u = u * u_scale  # the decoupled decay above is not scaled
        p32 = p32 - s[L.S_ADAM_STEP_SIZE] * u
        if stats:
            ustat.append(torch.stack([(p32.double() ** 2).sum(),
                                      ((u.double() / s[L.S_ADAM_BC1].double()) ** 2).sum()]))
        io.write_param(p, p32)
        io.write_state(m_t, 0, m)
        io.write_state(v_t, 1, v)
    if stats:
        _put_ustat(plan, ustat, act)


def sgd_update(plan, grads, rows, *, stats: bool, can_skip: bool = True) -> None:
    """SGD update as ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay,
    maximize) from ``plan.scal``; with ``stats`` (sum of new p^2, sum of d^2) per tensor; low
    precision as :func:`adam_update`."""
    act = _active(plan, can_skip)
    scales = _scales(plan, rows)
    ustat = []
    for i, p in enumerate(plan.local_params):
        io = _Io(plan, i, act)
        s = io.scal
        p32 = io.param(p)
        d = _flat_or(grads[i], io).to(io.cdt) * s[L.S_GRAD_MUL]
        g_scale, u_scale = (_flat_scale(x, io) for x in scales[i])
        if g_scale is not None:
            d = d * g_scale
        if plan.l2[i]:  # as torch.optim.SGD, only if weight_decay != 0
            d = d + s[L.S_SGD_WEIGHT_DECAY] * p32
        buf = plan.states[i][0]
        if buf is not None:
            nb = s[L.S_SGD_MOM_A] * io.state(buf, 0) + s[L.S_SGD_MOM_B] * d
            io.write_state(buf, 0, nb)
            d = torch.where(s[L.S_SGD_NESTEROV] != 0, d + s[L.S_SGD_MOMENTUM] * nb, nb)
        if u_scale is not None:
            d = d * u_scale
        p32 = p32 - s[L.S_LR] * d
        if stats:
            ustat.append(torch.stack([(p32.double() ** 2).sum(), (d.double() ** 2).sum()]))
        io.write_param(p, p32)
    if stats:
        _put_ustat(plan, ustat, act)
