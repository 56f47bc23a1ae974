"""Schedules against torch's own schedulers and against published formulas.

The torch schedulers drive a real ``torch.optim.SGD`` and we read ``param_groups[0]['lr']`` after
every ``step()``, exactly as a training loop sees it. The other references (HF transformers,
REX, the power scheduler, infinite schedules, MiniCPM, epfml) are written out below from their
published definitions, independently of fastsched's segment tables.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from fastsched.schedules import (
    REX,
    WSD,
    Cosine,
    CosineRestarts,
    Exponential,
    Infinite,
    InverseSqrt,
    Join,
    LinearDecay,
    LinearWarmup,
    MultiStep,
    OneCycle,
    Polynomial,
    Power,
    StepDecay,
)

N = 1000
BASE_LR = 0.1

# torch's step() updates most schedulers recursively (lr_t from lr_{t-1}), not from the closed
# form, so float64 rounding accumulates over the steps: for the multiplicative forms (StepLR,
# ExponentialLR, PolynomialLR, LinearLR) by about 1e-13 relative after 1,000 steps.
# CosineAnnealingLR multiplies by a ratio of cosines, (1 + cos(pi t/T)) / (1 + cos(pi (t-1)/T)),
# whose denominator goes to 0 at the end of the period, where rounding is amplified. Measured
# here: at most 8e-14 relative (1e-16 absolute at lr 0.1), but the bound depends on T and
# eta_min, so the cosine comparisons use the 1e-6 relative agreement the schedules promise, with
# 1e-9 absolute for the values that reach exactly 0.
RTOL_RECURSIVE = 1e-10
RTOL_COSINE = 1e-6
ATOL_COSINE = 1e-9


def torch_lrs(make_scheduler, n: int = N, base_lr: float = BASE_LR, **sgd) -> list[float]:
    """``group['lr']`` at steps 0..n-1 of an SGD optimizer driven by a torch scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr, **sgd)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return out


def ours(sched, n: int = N, base_lr: float = BASE_LR) -> list[float]:
    vals = sched.evaluate(torch.arange(n)).tolist()
    host = [sched(t) for t in range(n)]
    assert host == pytest.approx(vals, rel=1e-12, abs=1e-15)
    return [base_lr * v for v in vals]


def assert_lrs(got, want, rtol=RTOL_RECURSIVE, atol=0.0):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=atol)


# -- torch.optim.lr_scheduler ------------------------------------------------------------------

@pytest.mark.parametrize("start,end,iters", [(0.25, 1.0, 200), (1.0, 0.1, 300), (0.5, 0.5, 10)])
def test_linear_lr(start, end, iters):
    want = torch_lrs(lambda o: tls.LinearLR(o, start_factor=start, end_factor=end,
                                            total_iters=iters))
    assert_lrs(ours(LinearWarmup(iters, start_factor=start, end_factor=end)), want)


@pytest.mark.parametrize("t_max,r", [(N, 0.01), (N, 0.0), (300, 0.2)])
def test_cosine_annealing_lr(t_max, r):
    n = min(N, t_max + 1)  # torch keeps going round the cosine past T_max; we hold eta_min
    want = torch_lrs(lambda o: tls.CosineAnnealingLR(o, T_max=t_max, eta_min=r * BASE_LR), n)
    assert_lrs(ours(Cosine(t_max, min_ratio=r), n), want, rtol=RTOL_COSINE, atol=ATOL_COSINE)
    assert Cosine(t_max, min_ratio=r)(10 * t_max) == r


@pytest.mark.parametrize("step_size,gamma", [(100, 0.5), (33, 0.1), (1, 0.99)])
def test_step_lr(step_size, gamma):
    want = torch_lrs(lambda o: tls.StepLR(o, step_size=step_size, gamma=gamma))
    assert_lrs(ours(StepDecay(step_size, gamma=gamma)), want)


@pytest.mark.parametrize("milestones,gamma", [((100, 250, 600), 0.3), ((1, 999), 0.1)])
def test_multistep_lr(milestones, gamma):
    want = torch_lrs(lambda o: tls.MultiStepLR(o, milestones=list(milestones), gamma=gamma))
    assert_lrs(ours(MultiStep(milestones, gamma=gamma)), want)


@pytest.mark.parametrize("gamma", [0.995, 0.9])
def test_exponential_lr(gamma):
    want = torch_lrs(lambda o: tls.ExponentialLR(o, gamma=gamma))
    assert_lrs(ours(Exponential(gamma)), want, atol=1e-300)


@pytest.mark.parametrize("iters,power", [(800, 1.0), (800, 2.0), (1000, 0.5), (5, 1.0)])
def test_polynomial_lr(iters, power):
    want = torch_lrs(lambda o: tls.PolynomialLR(o, total_iters=iters, power=power))
    assert_lrs(ours(Polynomial(iters, power=power)), want, atol=1e-15)


ONE_CYCLE = [
    dict(),
    dict(anneal_strategy="linear"),
    dict(pct_start=0.25, three_phase=True),
    dict(pct_start=0.4, three_phase=True, anneal_strategy="linear", div_factor=10.0,
         final_div_factor=100.0),
    dict(pct_start=0.123, div_factor=3.0),
]


@pytest.mark.parametrize("kw", ONE_CYCLE, ids=[str(k) for k in ONE_CYCLE])
@pytest.mark.parametrize("total", [N, 997])
def test_one_cycle_lr(kw, total):
    max_lr = 0.3
    want = torch_lrs(lambda o: tls.OneCycleLR(o, max_lr=max_lr, total_steps=total,
                                              cycle_momentum=False, **kw), total)
    got = ours(OneCycle(total, **kw), total, base_lr=1.0)
    assert_lrs(got, [w / max_lr for w in want])


@pytest.mark.parametrize("t0,t_mult,r", [(100, 1, 0.0), (50, 2, 0.05), (64, 1, 0.1)])
def test_cosine_annealing_warm_restarts(t0, t_mult, r):
    want = torch_lrs(lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=t0, T_mult=t_mult,
                                                               eta_min=r * BASE_LR))
    cycles = 1
    while sum(t0 * t_mult**i for i in range(cycles)) <= N:
        cycles += 1
    sched = CosineRestarts(t0, cycles=cycles, t_mult=float(t_mult), min_ratio=r)
    # torch computes each value from the closed form (the cycle clock is tracked by addition)
    assert_lrs(ours(sched), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("w,total,r,start", [(100, N, 0.1, 0.1), (10, 500, 0.0, 0.01)])
def test_sequential_lr_warmup_then_cosine_is_join(w, total, r, start):
    def make(o):
        warm = tls.LinearLR(o, start_factor=start, end_factor=1.0, total_iters=w)
        cos = tls.CosineAnnealingLR(o, T_max=total - w, eta_min=r * BASE_LR)
        return tls.SequentialLR(o, [warm, cos], milestones=[w])

    n = total + 1
    want = torch_lrs(make, n)
    joined = Join((LinearWarmup(w, start_factor=start), Cosine(total - w, min_ratio=r)), (w,))
    assert_lrs(ours(joined, n), want, rtol=RTOL_COSINE, atol=ATOL_COSINE)
    # the same curve as one Cosine with a warmup
    single = Cosine(total, warmup_steps=w, min_ratio=r, warmup_start_factor=start)
    assert ours(single, n) == pytest.approx(ours(joined, n), rel=1e-12, abs=1e-15)


# -- HF transformers (src/transformers/optimization.py), written out ----------------------------

def hf_cosine(t, W, T, num_cycles=0.5, min_lr_rate=0.0):
    if t < W:
        return t / max(1, W)
    progress = (t - W) / max(1, T - W)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def hf_hard_restarts(t, W, T, num_cycles):
    if t < W:
        return t / max(1, W)
    progress = (t - W) / max(1, T - W)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def hf_linear(t, W, T):
    if t < W:
        return t / max(1, W)
    return max(0.0, (T - t) / max(1, T - W))


def hf_polynomial(t, W, T, lr_init, lr_end, power):
    if t < W:
        return t / max(1, W)
    if t > T:
        return lr_end / lr_init
    pct_remaining = 1 - (t - W) / (T - W)
    return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init


def hf_inverse_sqrt(t, W, timescale=None):
    if timescale is None:
        timescale = W or 10_000
    if t < W:
        return t / max(1, W)
    shift = timescale - W
    return 1.0 / math.sqrt((t + shift) / timescale)


def hf_wsd(t, W, S, D, warmup_type, decay_type, r, num_cycles=0.5):
    if t < W:
        p = t / max(1, W)
        f = {"linear": p, "cosine": 0.5 * (1.0 - math.cos(math.pi * p)),
             "1-sqrt": 1.0 - math.sqrt(1.0 - p)}[warmup_type]
        return max(0.0, f * (1.0 - r) + r)
    if t < W + S:
        return 1.0
    if t < W + S + D:
        p = (t - W - S) / max(1, D)
        f = {"linear": 1.0 - p,
             "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * p)),
             "1-sqrt": 1.0 - math.sqrt(p)}[decay_type]
        return max(0.0, f * (1.0 - r) + r)
    return r


def check(sched, ref, steps, rel=1e-12, abs=1e-15):
    got = sched.evaluate(torch.tensor(list(steps))).tolist()
    want = [ref(t) for t in steps]
    assert got == pytest.approx(want, rel=rel, abs=abs)
    assert [sched(t) for t in steps] == pytest.approx(want, rel=rel, abs=abs)


@pytest.mark.parametrize("W,T,r", [(100, 1000, 0.0), (100, 1000, 0.1), (0, 500, 0.05),
                                   (1, 10, 0.5)])
def test_hf_cosine_with_min_lr(W, T, r):
    sched = Cosine(T, warmup_steps=W, min_ratio=r)
    # HF's num_cycles=0.5 cosine climbs again past T; fastsched holds the floor (documented)
    check(sched, lambda t: hf_cosine(t, W, T, min_lr_rate=r), range(T + 1))
    assert sched(T + 1) == sched(5 * T) == r


@pytest.mark.parametrize("W,T,cycles", [(100, 1000, 3), (0, 1000, 4)])
def test_hf_cosine_with_hard_restarts(W, T, cycles):
    sched = CosineRestarts((T - W) / cycles, cycles=cycles, warmup_steps=W)
    check(sched, lambda t: hf_hard_restarts(t, W, T, cycles), range(2 * T))


@pytest.mark.parametrize("W,T", [(100, 1000), (0, 300)])
def test_hf_linear(W, T):
    check(LinearDecay(T, warmup_steps=W), lambda t: hf_linear(t, W, T), range(2 * T))


@pytest.mark.parametrize("W,T,power", [(100, 1000, 1.0), (50, 500, 2.0), (0, 500, 0.5)])
def test_hf_polynomial_with_lr_end(W, T, power):
    lr_init, lr_end = 3e-4, 1e-7  # HF's default lr_end
    sched = Polynomial(T, power=power, warmup_steps=W, end_ratio=lr_end / lr_init)
    check(sched, lambda t: hf_polynomial(t, W, T, lr_init, lr_end, power), range(2 * T))


@pytest.mark.parametrize("W,timescale", [(100, None), (0, None), (400, 1000.0)])
def test_hf_inverse_sqrt(W, timescale):
    sched = InverseSqrt(W, timescale=timescale)
    check(sched, lambda t: hf_inverse_sqrt(t, W, timescale), list(range(3000)) + [10**6])


@pytest.mark.parametrize("warmup_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("r", [0.0, 0.1])
def test_hf_wsd(warmup_type, decay_type, r):
    W, S, D = 100, 600, 300
    # HF's warmup rises from min_lr_ratio (every phase is mapped through f * (1 - r) + r)
    sched = WSD(warmup_steps=W, stable_steps=S, decay_steps=D, warmup_shape=warmup_type,
                decay_shape=decay_type, min_ratio=r, warmup_start_factor=r)
    check(sched, lambda t: hf_wsd(t, W, S, D, warmup_type, decay_type, r), range(1200))
    # HF's num_training_steps form: stable = T - W - D
    by_total = WSD(warmup_steps=W, total_steps=W + S + D, decay_steps=D,
                   warmup_shape=warmup_type, decay_shape=decay_type, min_ratio=r,
                   warmup_start_factor=r)
    assert by_total.segments() == sched.segments()


# -- WSD variants: MiniCPM half-life, epfml (Haegele et al.) ------------------------------------

def minicpm(t, W, T_stable_end, T_half):
    if t < W:
        return t / W
    if t < T_stable_end:
        return 1.0
    return 0.5 ** ((t - T_stable_end) / T_half)


def test_minicpm_exponential_half_life():
    W, S, D, h = 100, 800, 400, 50.0
    sched = WSD(warmup_steps=W, stable_steps=S, decay_steps=D, decay_shape="exp-half-life",
                half_life=h)
    check(sched, lambda t: minicpm(t, W, W + S, h), range(W + S + D + 1))
    # after the decay window the schedule holds its last value, 0.5 ** (D / h)
    assert sched(10**6) == pytest.approx(0.5 ** (D / h), rel=1e-12)


def epfml_wsd(t, n_iterations, final_lr_factor, n_warmup, init_div_factor, fract_decay,
              decay_type):
    n_anneal = int(fract_decay * n_iterations)
    n_hold = n_iterations - n_anneal
    if t < n_warmup:
        return t / n_warmup + (1 - t / n_warmup) / init_div_factor
    if t < n_hold:
        return 1.0
    if t < n_iterations:
        p = (t - n_hold) / n_anneal
        r = final_lr_factor
        if decay_type == "exp":
            return r**p
        g = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)),
             "square": 1 - p**2, "sqrt": 1 - math.sqrt(p)}[decay_type]
        return r + (1 - r) * g
    return final_lr_factor


@pytest.mark.parametrize("decay_type,shape", [("linear", "linear"), ("cosine", "cosine"),
                                              ("square", "square"), ("sqrt", "1-sqrt"),
                                              ("exp", "exp")])
def test_epfml_wsd(decay_type, shape):
    T, r, W, div, frac = 2000, 0.05, 200, 100.0, 0.2
    sched = WSD(warmup_steps=W, total_steps=T, decay_fraction=frac, decay_shape=shape,
                min_ratio=r, warmup_start_factor=1 / div)
    check(sched, lambda t: epfml_wsd(t, T, r, W, div, frac, decay_type), range(T + 100))


# -- REX -----------------------------------------------------------------------------------------

def test_rex_paper_profile():
    # Chen et al.: eta_t = eta_0 (1 - z) / (1/2 + (1/2)(1 - z)), z = t / T; then 0
    T = 1000
    check(REX(T), lambda t: (1 - min(t / T, 1)) / (0.5 + 0.5 * (1 - min(t / T, 1))),
          range(2 * T))


def test_rex_pytorch_optimizer_form_with_floor():
    # pytorch_optimizer REXScheduler: min + (max - min) (1 - p) / (1 - p/2); min once t >= T
    T, lo, hi = 800, 1e-5, 1e-3
    ref = lambda t: (lo + (hi - lo) * (1 - t / T) / (1 - t / T / 2) if t < T else lo) / hi
    check(REX(T, min_ratio=lo / hi), ref, range(2 * T))


@pytest.mark.parametrize("alpha", [0.9, 0.1, 0.0])
def test_rex_generalised(alpha):
    # alpha = 0.9: REX_LR's z / (0.1 + 0.9 z) with z = 1 - p; alpha = 1 - beta in init2winit
    # (beta = 0.9 -> alpha = 0.1); alpha = 0: linear decay.
    T, W = 1000, 50
    def ref(t):
        if t < W:
            return t / W
        p = min((t - W) / (T - W), 1.0)
        z = 1 - p
        return z / ((1 - alpha) + alpha * z)
    check(REX(T, alpha=alpha, warmup_steps=W), ref, range(T + 50))


# -- power scheduler (Shen et al.; IBM dolomite-engine PowerScheduler) ---------------------------

def dolomite_power(s, W, lr, a, b, c):
    if s <= W:
        return (s / W) * min(1.0, (a / lr) * (W * c) ** b)
    return min(1.0, (a / lr) * (s * c) ** b)


@pytest.mark.parametrize("W", [2500, 100])
def test_power_matches_dolomite(W):
    # IBM's config: lr 0.02, a = 4096 = 4 x global batch 1024, b = -0.51, c = 4M tokens per step
    batch, a_paper, lr, b, c = 1024, 4.0, 0.02, -0.51, 4194304
    sched = Power(tokens_per_step=c, batch_size=batch, lr_max=lr, a=a_paper, b=b,
                  warmup_steps=W)
    steps = list(range(0, 3 * W)) + [10**4, 10**5, 10**6, 10**7]
    check(sched, lambda s: dolomite_power(s, W, lr, batch * a_paper, b, c), steps)
    assert sched.factor(10**5) == pytest.approx(dolomite_power(10**5, W, lr, 4096, b, c))


def test_power_capped_without_warmup():
    sched = Power(tokens_per_step=1e6, batch_size=512)
    coef = 512 * 4.0 / 0.02  # the default a = 4 per sequence (IBM's configurations)
    check(sched, lambda s: min(1.0, coef * (s * 1e6) ** -0.51) if s else 1.0,
          [0, 1, 10, 100, 10**4, 10**6])


def test_power_final_linear_decay():
    # reference: warmup (n/N_w) eta(N_w), power law, then (N - n)/N_decay * eta(N - N_decay)
    W, N, D, c, batch = 200, 6000, 600, 2**20, 256
    sched = Power(tokens_per_step=c, batch_size=batch, warmup_steps=W, total_steps=N,
                  decay_steps=D)
    eta = lambda n: min(1.0, batch * 4.0 * (n * c) ** -0.51 / 0.02)

    def ref(n):
        if n < W:
            return n / W * eta(W)
        if n < N - D:
            return eta(n)
        return max(0.0, (N - n) / D) * eta(N - D)
    check(sched, ref, range(N + 100))


# -- infinite schedules (Ibrahim et al. 2024, section 5.1) ---------------------------------------

def infinite_ref(t, Tw, Tcd, c, shape, alpha, Tann=None, Tend=None, lo=None):
    if t <= Tw and Tw > 0:
        return t / Tw
    if t <= Tcd:
        q = (t - Tw) / (Tcd - Tw)
        if shape == "cosine":
            return c + (1 - c) / 2 * (1 + math.cos(math.pi * q))
        h = lambda x: 1 / math.sqrt(1 + alpha * x) - 1
        return 1 + (c - 1) * h(q) / h(1)
    if Tann is None or t <= Tann:
        return c
    if t <= Tend:
        return c * (lo / c) ** ((t - Tann) / (Tend - Tann))
    return lo


@pytest.mark.parametrize("shape", ["cosine", "inv-sqrt"])
@pytest.mark.parametrize("anneal", [False, True])
def test_infinite(shape, anneal):
    Tw, cd, c, alpha = 100, 900, 0.25, 8.0
    extra = dict(anneal_start=3000, anneal_steps=500, min_ratio=1e-3) if anneal else {}
    sched = Infinite(Tw, cd, c, cooldown_shape=shape, alpha=alpha, **extra)
    ref_extra = dict(Tann=3000, Tend=3500, lo=1e-3) if anneal else {}
    check(sched, lambda t: infinite_ref(t, Tw, Tw + cd, c, shape, alpha, **ref_extra),
          list(range(4000)) + [10**6])


def test_minimum_defaults_follow_the_literature():
    assert OneCycle(100).div_factor == 25.0 and OneCycle(100).final_div_factor == 1e4
    assert OneCycle(100).pct_start == 0.3 and OneCycle(100).anneal_strategy == "cos"
    assert REX(100).alpha == 0.5
    assert StepDecay(10).gamma == 0.1 and MultiStep((1,)).gamma == 0.1
    assert WSD(total_steps=1000).segments()[-2].start == 900  # 10% decay by default
    assert WSD(total_steps=1000).decay_rounding == "floor"  # epfml truncates f * T
    assert InverseSqrt(0).segments()[0].a == 10_000  # HF's timescale when W = 0
    assert Power(1e6, 1).a == 4.0 and Power(1e6, 1).b == -0.51  # IBM's code: a = 4 / sequence
    assert Power(1e6, 1).lr_max == 0.02
    assert Infinite(10, 10, 0.5).alpha == 10.0  # the authors' infinite_lr: timescale=10
