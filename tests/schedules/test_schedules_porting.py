"""Porting from other code: every row of ``docs/porting.md`` checked against the original formula.

Each reference is written out here from the authors' or library's code (versions in
``docs/porting.md``), independently of fastsched's segment tables; HF transformers' own
schedulers are called when transformers is installed, else its formulas are written out. Also:
the literature defaults (Power ``a = 4``, Infinite ``alpha = 10``, WSD's truncated decay length)
and dicts saved by fastsched before format version 2 resuming with the values they were saved
with.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from fastsched.schedules import (
    FORMAT_VERSION,
    WSD,
    Constant,
    Cosine,
    Infinite,
    InverseSqrt,
    Join,
    LinearDecay,
    Power,
    ScheduleLR,
    Table,
    from_dict,
)


def check(sched, ref, steps, rel=1e-12, abs=1e-15):
    steps = list(steps)
    want = [ref(t) for t in steps]
    got = sched.evaluate(torch.tensor(steps)).tolist()
    assert got == pytest.approx(want, rel=rel, abs=abs)
    assert [sched(t) for t in steps] == pytest.approx(want, rel=rel, abs=abs)


# -- HF transformers (src/transformers/optimization.py) ------------------------------------------

def _hf_formula(name, W, T=None, *, D=None, S=None, warmup_type="linear", decay_type="cosine",
                min_lr_ratio=0.0, min_lr_rate=None, timescale=None):
    def f(t):
        if name == "inverse_sqrt":
            tau = timescale if timescale is not None else (W or 10_000)
            return t / max(1, W) if t < W else 1.0 / math.sqrt((t + tau - W) / tau)
        if name == "wsd":
            r = min_lr_ratio
            if t < W:
                p = t / max(1, W)
                g = {"linear": p, "cosine": 0.5 * (1.0 - math.cos(math.pi * p)),
                     "1-sqrt": 1.0 - math.sqrt(1.0 - p)}[warmup_type]
                return max(0.0, g * (1.0 - r) + r)
            stable = S if S is not None else T - W - D
            if t < W + stable:
                return 1.0
            if t < W + stable + D:
                p = (t - W - stable) / max(1, D)
                g = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)),
                     "1-sqrt": 1.0 - math.sqrt(p)}[decay_type]
                return max(0.0, g * (1.0 - r) + r)
            return r
        if t < W:
            return t / max(1, W)
        p = (t - W) / max(1, T - W)
        if name == "linear":
            return max(0.0, (T - t) / max(1, T - W))
        cos = 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * p))
        if name == "cosine":
            return max(0.0, cos)
        r = min_lr_rate
        return max(0.0, cos * (1 - r) + r)  # cosine_with_min_lr
    return f


def hf(name, W, T=None, **kw):
    """HF's multiplier at step t: transformers' own LambdaLR when installed, else its formula."""
    try:
        from transformers import optimization as o
    except ImportError:
        return _hf_formula(name, W, T, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if name == "cosine":
        s = o.get_cosine_schedule_with_warmup(opt, W, T)
    elif name == "linear":
        s = o.get_linear_schedule_with_warmup(opt, W, T)
    elif name == "cosine_with_min_lr":
        s = o.get_cosine_with_min_lr_schedule_with_warmup(opt, W, T,
                                                         min_lr_rate=kw["min_lr_rate"])
    elif name == "inverse_sqrt":
        s = o.get_inverse_sqrt_schedule(opt, W, timescale=kw.get("timescale"))
    else:
        s = o.get_wsd_schedule(opt, W, kw["D"], num_training_steps=T,
                               num_stable_steps=kw.get("S"), warmup_type=kw["warmup_type"],
                               decay_type=kw["decay_type"], min_lr_ratio=kw["min_lr_ratio"])
    return s.lr_lambdas[0]


@pytest.mark.parametrize("W,T", [(100, 1000), (0, 300), (1, 10)])
def test_hf_cosine_with_warmup(W, T):
    check(Cosine(T, warmup_steps=W), hf("cosine", W, T), range(T + 1))


@pytest.mark.parametrize("W,T,r", [(100, 1000, 0.1), (0, 500, 0.05)])
def test_hf_cosine_with_min_lr(W, T, r):
    check(Cosine(T, warmup_steps=W, min_ratio=r), hf("cosine_with_min_lr", W, T, min_lr_rate=r),
          range(T + 1))


@pytest.mark.parametrize("W,T", [(100, 1000), (0, 300)])
def test_hf_linear_with_warmup(W, T):
    check(LinearDecay(T, warmup_steps=W), hf("linear", W, T), range(2 * T))


@pytest.mark.parametrize("W,timescale", [(100, None), (0, None), (400, 1000.0)])
def test_hf_inverse_sqrt(W, timescale):
    check(InverseSqrt(W, timescale=timescale), hf("inverse_sqrt", W, timescale=timescale),
          list(range(3000)) + [10**6])


@pytest.mark.parametrize("warmup_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("r", [0.0, 0.1])
def test_hf_wsd(warmup_type, decay_type, r):
    W, T, D = 100, 1000, 300
    sched = WSD(warmup_steps=W, total_steps=T, decay_steps=D, warmup_shape=warmup_type,
                decay_shape=decay_type, min_ratio=r, warmup_start_factor=r)
    check(sched, hf("wsd", W, T, D=D, warmup_type=warmup_type, decay_type=decay_type,
                    min_lr_ratio=r), range(T + 200))


# -- epfml/schedules-and-scaling (Haegele et al.), src/optim/utils.py::wsd_schedule -------------

def epfml_wsd(n_iterations, final_lr_factor=0.0, n_warmup=1000, init_div_factor=100,
              fract_decay=0.1, decay_type="linear"):
    n_anneal_steps = int(fract_decay * n_iterations)
    n_hold = n_iterations - n_anneal_steps

    def schedule(step):
        if step < n_warmup:
            return (step / n_warmup) + (1 - step / n_warmup) / init_div_factor
        if step < n_hold:
            return 1.0
        if step < n_iterations:
            p = (step - n_hold) / n_anneal_steps
            r = final_lr_factor
            if decay_type == "exp":
                return r**p
            g = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) * 0.5,
                 "square": 1 - p**2, "sqrt": 1 - math.sqrt(p)}[decay_type]
            return r + (1 - r) * g
        return final_lr_factor
    return schedule


def test_epfml_truncates_the_decay_length():
    # the issue's example: T = 1006, fract_decay = 0.1 -> int(100.6) = 100 decay steps from 906
    ref = epfml_wsd(1006, n_warmup=10, decay_type="sqrt")
    assert ref(905) == ref(906) == 1.0
    sched = WSD(warmup_steps=10, total_steps=1006, warmup_start_factor=1 / 100)
    assert sched(906) == 1.0 and sched(907) < 1.0
    check(sched, ref, range(1100))
    # the previous rounding (101 decay steps) is still available, and is OLMo-core's
    old = WSD(warmup_steps=10, total_steps=1006, warmup_start_factor=1 / 100,
              decay_rounding="round")
    assert old(906) == pytest.approx(1 - math.sqrt(1 / 101), rel=1e-12)  # 0.9005


@pytest.mark.parametrize("decay_type,shape", [("linear", "linear"), ("cosine", "cosine"),
                                              ("square", "square"), ("sqrt", "1-sqrt"),
                                              ("exp", "exp")])
@pytest.mark.parametrize("T,frac", [(1006, 0.1), (2999, 0.29), (70, 0.3)])
def test_epfml_wsd(decay_type, shape, T, frac):
    W, div, r = T // 10, 100, 0.05
    sched = WSD(warmup_steps=W, total_steps=T, decay_fraction=frac, decay_shape=shape,
                min_ratio=r, warmup_start_factor=1 / div)
    check(sched, epfml_wsd(T, r, W, div, frac, decay_type), range(T + 50))


def test_epfml_defaults():
    # epfml's defaults: n_warmup=1000, init_div_factor=100, fract_decay=0.1, linear, factor 0
    T = 12_345
    sched = WSD(warmup_steps=1000, total_steps=T, decay_shape="linear",
                warmup_start_factor=1 / 100)
    check(sched, epfml_wsd(T), range(0, T + 10, 7))


# -- MiniCPM (arXiv 2404.06395): WSD with an exponential decay of half-life T_half ---------------

def test_minicpm_half_life():
    W, T_stable_end, D, T_half = 100, 900, 300, 60.0

    def ref(t):
        if t < W:
            return t / W
        if t < T_stable_end:
            return 1.0
        return 0.5 ** ((min(t, T_stable_end + D) - T_stable_end) / T_half)
    sched = WSD(warmup_steps=W, stable_steps=T_stable_end - W, decay_steps=D,
                decay_shape="exp-half-life", half_life=T_half)
    check(sched, ref, range(T_stable_end + D + 100))


# -- GPT-NeoX megatron/learning_rates.py::AnnealingLR (@ea7aefd) ---------------------------------

def neox(W, T, lr, min_lr, style):
    def f(t):
        if W > 0 and t <= W:
            return lr * max(1, t) / W / lr
        n, end = t - W, T - W
        if style == "linear":
            v = lr * (end - n) / end
        else:
            v = min_lr + (lr - min_lr) / 2.0 * (math.cos(math.pi * n / end) + 1)
        return max(v, min_lr) / lr
    return f


@pytest.mark.parametrize("W,T,r", [(100, 1000, 0.1), (10, 500, 0.0)])
def test_gpt_neox_cosine(W, T, r):
    lr = 6e-4
    ref = neox(W, T, lr, r * lr, "cosine")
    simple = Cosine(T, warmup_steps=W, min_ratio=r)
    check(simple, ref, range(1, T + 1))   # every step but 0
    assert simple(0) == 0.0 and ref(0) == pytest.approx(1 / W)
    # exact at step 0 too: hold 1/W for one step, then the same curve one step shorter
    exact = Join((Constant(1 / W), Cosine(T - 1, warmup_steps=W - 1, min_ratio=r,
                                          warmup_start_factor=1 / W)), (1,))
    check(exact, ref, range(T + 1))


@pytest.mark.parametrize("W,T,r", [(100, 1000, 0.0), (100, 1000, 0.1), (7, 300, 0.25)])
def test_gpt_neox_linear(W, T, r):
    lr = 3e-4
    ref = neox(W, T, lr, r * lr, "linear")
    if r == 0:
        check(LinearDecay(T, warmup_steps=W), ref, range(1, 2 * T))
    # NeoX clips at min_lr instead of interpolating to it: the line reaches r at T - r (T - W)
    exact = Table((0, 1, W, T - r * (T - W)), (1 / W, 1 / W, 1.0, r))
    check(exact, ref, range(2 * T))


# -- nanoGPT train.py::get_lr ---------------------------------------------------------------------

def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("W,T", [(2000, 600_000), (100, 5000), (1, 50)])
def test_nanogpt(W, T):
    lr, min_lr = 6e-4, 6e-5
    sched = Cosine(T, warmup_steps=W, min_ratio=min_lr / lr, warmup_start_factor=1 / (W + 1))
    steps = sorted(set(range(0, min(T, 3 * W) + 5)) | set(range(0, T + 100, max(1, T // 997))))
    check(sched, lambda t: nanogpt_get_lr(t, lr, W, T, min_lr) / lr, steps)
    # the default warmup (from 0) is one step behind: t / W instead of (t + 1) / (W + 1)
    assert Cosine(T, warmup_steps=W, min_ratio=0.1)(0) == 0.0


# -- IBM dolomite-engine / lm-engine lm_engine/optimization/scheduler.py::PowerScheduler --------

def ibm_power(num_warmup_steps, optimizer_lr, a, b, c):
    """PowerScheduler._lr_lambda (num_constant_steps = 0, no decay branch)."""
    def power(a_, b_, x):
        return a_ * x**b_
    warm_top = min(1, power(a / optimizer_lr, b, num_warmup_steps * c))

    def f(s):
        if num_warmup_steps > 0 and s <= num_warmup_steps:
            return warm_top / num_warmup_steps * s
        return min(1, power(a / optimizer_lr, b, s * c))
    return f


IBM = dict(lr=0.02, a=4096, b=-0.51, c=4194304, batch=1024, W=2500)  # a = 4 x global batch


def test_ibm_power_scheduler_with_the_default_a():
    cfg = IBM
    ref = ibm_power(cfg["W"], cfg["lr"], cfg["a"], cfg["b"], cfg["c"])
    # defaults a = 4 (per sequence), b = -0.51, lr_max = 0.02 are IBM's configuration
    sched = Power(tokens_per_step=cfg["c"], batch_size=cfg["batch"], warmup_steps=cfg["W"])
    steps = list(range(0, 3 * cfg["W"], 3)) + [6190, 6191, 6192, 8142, 10**4, 10**5, 10**7]
    check(sched, ref, steps)
    # with IBM's other batch, a: 4608 at 1152
    ref_1152 = ibm_power(100, 0.02, 4608, -0.51, 1152 * 4096)
    check(Power(tokens_per_step=1152 * 4096, batch_size=1152, warmup_steps=100), ref_1152,
          range(0, 20_000, 13))


def test_power_old_default_differs_as_the_issue_says():
    cfg = IBM
    new = Power(tokens_per_step=cfg["c"], batch_size=cfg["batch"])
    old = Power(tokens_per_step=cfg["c"], batch_size=cfg["batch"], a=4.6)
    assert old.factor(10**5) / new.factor(10**5) == pytest.approx(1.15)

    def cap_ends(a):  # first step at which the power law falls below lr_max
        return math.floor((cfg["batch"] * a / cfg["lr"]) ** (1 / -cfg["b"]) / cfg["c"]) + 1
    assert cap_ends(4.0) == 6191 and cap_ends(4.6) == 8142
    assert new.factor(6190) == 1.0 and new.factor(6191) < 1.0
    assert old.factor(8141) == 1.0 and old.factor(8142) < 1.0


# -- pytorch_optimizer lr_scheduler/wsd.py::get_wsd_schedule ---------------------------------------

def kozistr_wsd(W, S, D, min_lr_ratio=0.0, cooldown_type="1-sqrt"):
    def f(t):
        if t < W:
            return t / max(1, W)
        if t < W + S:
            return 1.0
        if t < W + S + D:
            p = (t - W - S) / D
            if cooldown_type == "cosine":
                p = (t - W - S) / max(1, D)
                v = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * p)))
                return (1.0 - min_lr_ratio) * v + min_lr_ratio
            return {"1-sqrt": 1 - math.sqrt(p), "1-square": 1 - p**2,
                    "linear": 1 - p}[cooldown_type]
        return min_lr_ratio
    return f


@pytest.mark.parametrize("cooldown,shape", [("1-sqrt", "1-sqrt"), ("1-square", "square"),
                                            ("linear", "linear"), ("cosine", "cosine")])
def test_pytorch_optimizer_wsd(cooldown, shape):
    W, S, D = 50, 400, 150
    check(WSD(warmup_steps=W, stable_steps=S, decay_steps=D, decay_shape=shape),
          kozistr_wsd(W, S, D, 0.0, cooldown), range(700))
    if cooldown == "cosine":  # the only cooldown that honours min_lr_ratio
        check(WSD(warmup_steps=W, stable_steps=S, decay_steps=D, decay_shape="cosine",
                  min_ratio=0.1), kozistr_wsd(W, S, D, 0.1, "cosine"), range(700))


# -- the infinite schedule's authors: Pauljanson002/MAE-1 infinite_scheduler.py::infinite_lr -----

def infinite_lr(it, total, warmup_ratio, cooldown_ratio, constant_ratio, start_lr, constant_lr,
                min_lr, decay_style, timescale=10):
    warmup_iters = int(total * warmup_ratio)
    cooldown_iters = int(total * cooldown_ratio)   # an absolute step: the cooldown's end
    constant_iters = int(total * constant_ratio)
    if it <= warmup_iters:
        return it / warmup_iters * start_lr
    if it <= cooldown_iters:
        p = (it - warmup_iters) / (cooldown_iters - warmup_iters)
        if decay_style == "constant_infinite":
            return start_lr - (start_lr - constant_lr) * p
        if decay_style == "inverse_sqrt_infinite":
            def inv_f(x):
                return 1 / math.sqrt(1 + timescale * x) - 1
            return start_lr + (constant_lr - start_lr) / inv_f(1) * inv_f(p)
        return constant_lr + (start_lr - constant_lr) / 2.0 * (math.cos(math.pi * p) + 1)
    if it <= constant_iters:
        return constant_lr
    exp_factor = -math.log(min_lr / constant_lr) / (total - constant_iters)
    return constant_lr * math.exp(-exp_factor * (it - constant_iters))


@pytest.mark.parametrize("style,shape", [("cosine_cooldown_infinite", "cosine"),
                                         ("inverse_sqrt_infinite", "inv-sqrt"),
                                         ("constant_infinite", "linear")])
def test_infinite_authors_code(style, shape):
    T, wr, cr, kr, lr, c, lo = 10_007, 0.05, 0.15, 0.8, 1e-3, 0.1, 0.01
    W, end, k = int(T * wr), int(T * cr), int(T * kr)
    sched = Infinite(W, const_ratio=c, cooldown_end=end, cooldown_shape=shape,
                     anneal_start=k, anneal_steps=T - k, min_ratio=lo)
    ref = lambda t: infinite_lr(t, T, wr, cr, kr, lr, c * lr, lo * lr, style) / lr
    check(sched, ref, range(T + 1), rel=1e-11)  # exp(log) against a power: 1e-12 relative
    assert sched.alpha == 10.0  # the authors' timescale
    # the same schedule given by the cooldown's length
    assert Infinite(W, end - W, c, cooldown_shape=shape, anneal_start=k, anneal_steps=T - k,
                    min_ratio=lo).segments() == sched.segments()


# -- dicts saved before format version 2 ---------------------------------------------------------

# to_dict() output of fastsched before this change (HEAD 548e192), copied verbatim
OLD_WSD = {"kind": "wsd", "warmup_steps": 20, "total_steps": 1006, "decay_steps": None,
           "decay_fraction": None, "stable_steps": None, "decay_shape": "1-sqrt",
           "min_ratio": 0.0, "warmup_shape": "linear", "warmup_start_factor": 0.0,
           "decay_power": 1.0, "half_life": None}
OLD_POWER = {"kind": "power", "tokens_per_step": 4194304, "batch_size": 1024, "lr_max": 0.02,
             "a": 4.6, "b": -0.51, "warmup_steps": 2500, "total_steps": None, "decay_steps": 0,
             "decay_shape": "linear", "min_ratio": 0.0, "half_life": None, "decay_power": 1.0}
OLD_INFINITE = {"kind": "infinite", "warmup_steps": 100, "cooldown_steps": 400,
                "const_ratio": 0.3, "cooldown_shape": "inv-sqrt", "alpha": 8.0,
                "anneal_start": None, "anneal_steps": 0, "min_ratio": 0.001}
OLD_JOIN = {"kind": "join", "schedules": [
    {"kind": "wsd", "warmup_steps": 0, "total_steps": 1006, "decay_steps": None,
     "decay_fraction": None, "stable_steps": None, "decay_shape": "1-sqrt", "min_ratio": 0.0,
     "warmup_shape": "linear", "warmup_start_factor": 0.0, "decay_power": 1.0,
     "half_life": None}, {"kind": "constant", "value": 0.5}], "boundaries": [2000]}


def test_every_dict_carries_the_format_version():
    assert FORMAT_VERSION == 2
    d = Join((WSD(total_steps=100), Constant(0.5)), (200,)).to_dict()
    assert d["version"] == 2 and d["schedules"][0]["version"] == 2


def test_old_power_and_infinite_dicts_resume_exactly_without_warning():
    # the old to_dict stored every field, defaults included: a = 4.6 and alpha = 8 come back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = from_dict(json.loads(json.dumps(OLD_POWER)))
        i = from_dict(OLD_INFINITE)
    assert p.a == 4.6 and i.alpha == 8.0
    assert p(906) == 0.3624 and p(10**5) == pytest.approx(0.27827310971442476, rel=1e-15)
    assert i(250) == pytest.approx(0.4750000000000001, rel=1e-15)


def test_old_wsd_dict_resumes_with_its_rounding_and_warns():
    with pytest.warns(UserWarning, match=r"decay_rounding='round'.*would change the schedule"):
        s = from_dict(OLD_WSD)
    assert s.decay_rounding == "round"
    assert s(906) == 0.9004962809790011  # the value fastsched computed before the change
    # saved again (format 2) it keeps the rounding and loads silently
    d = s.to_dict()
    assert d["version"] == 2 and d["decay_rounding"] == "round"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_dict(d)(906) == 0.9004962809790011
    # nested in a Join too
    with pytest.warns(UserWarning, match="decay_rounding"):
        j = from_dict(OLD_JOIN)
    assert j(906) == 0.9004962809790011 and j(2000) == 0.5


def test_old_dict_warns_only_where_the_values_differ():
    exact = dict(OLD_WSD, total_steps=1000)  # 0.1 * 1000: rounding and truncation agree
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = from_dict(exact)
    assert s.decay_rounding == "round" and s.segments() == WSD(warmup_steps=20,
                                                               total_steps=1000).segments()


def test_hand_written_dicts_without_version_keep_the_old_defaults_and_warn():
    bare = {"kind": "power", "tokens_per_step": 1e6, "batch_size": 512}
    with pytest.warns(UserWarning, match=r"a=4\.6.*a=4\.0"):
        assert from_dict(bare).a == 4.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_dict({**bare, "version": 2}).a == 4.0
    inf = {"kind": "infinite", "warmup_steps": 10, "cooldown_steps": 90, "const_ratio": 0.5,
           "cooldown_shape": "inv-sqrt"}
    with pytest.warns(UserWarning, match=r"alpha=8\.0"):
        assert from_dict(inf).alpha == 8.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cosine cooldown does not use alpha: no warning
        assert from_dict({**inf, "cooldown_shape": "cosine"}).alpha == 8.0
        assert from_dict({**inf, "version": 2}).alpha == 10.0


def test_newer_or_bad_versions_are_refused():
    with pytest.raises(ValueError, match="format version 3"):
        from_dict({**Cosine(10).to_dict(), "version": 3})
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        from_dict({**Cosine(10).to_dict(), "version": "2"})


def test_old_checkpoints_resume_through_schedule_lr_and_the_fused_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    sl = ScheduleLR(opt, WSD(total_steps=1006))
    state = {**sl.state_dict(), "schedule": OLD_WSD, "last_epoch": 905}
    with pytest.warns(UserWarning, match="decay_rounding"):
        sl.load_state_dict(state)
    p.grad = torch.ones_like(p)
    opt.step()
    sl.step()
    assert sl.last_epoch == 906
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9004962809790011, rel=1e-15)

    from fastsched.optim import AdamW

    fused = AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, schedule=Power(1e6, 512))
    sd = fused.state_dict()
    sd["fastsched"] = {"schedule": OLD_POWER, "clock": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.load_state_dict(sd)
    assert fused.schedule.a == 4.6 and fused.schedule == from_dict(OLD_POWER)
