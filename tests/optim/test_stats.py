"""Gradient statistics, global-norm clipping, the non-finite guard and GradScaler support.

Both backends run every test: ``reference`` (plain torch) and ``triton`` (the kernels; on a CPU
through the Triton interpreter). Statistics are checked against the float64 oracle in
``optim_oracle.py``; clipping and GradScaler against ``torch.nn.utils.clip_grad_norm_`` followed by
``torch.optim``. Interpreted steps cost ~0.3 s each, so runs are a few steps on small tensors
(with ``block_size=256`` a 300-element tensor still spans two blocks).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from optim_oracle import Hyper, Oracle, rel_err

import fastsched
from fastsched.optim import _cpu
from fastsched.schedules import LinearWarmup

BLOCK = 256
#: fp32 step against the float64 oracle or torch's fp32 step (relative to the tensor's max |x|)
RTOL = 1e-5


@pytest.fixture(params=["reference", "triton", "cpu"])
def backend(request, kernel_device):
    if request.param == "cpu" and (kernel_device != "cpu" or not _cpu.available()):
        pytest.skip(f"compiled CPU backend: CPU tensors only; {_cpu.reason()}")
    return request.param


def _randn(shape, seed, device, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device)


def _leaves(shapes, seed, device):
    return [_randn(s, seed + i, device).requires_grad_() for i, s in enumerate(shapes)]


def _warmup(t):
    """LinearWarmup(4, start_factor=0.25) written out: 0.25 + 0.75 * min(t, 4) / 4."""
    return 0.25 + 0.75 * min(t, 4) / 4


def _state_snapshot(opt, params):
    out = []
    for p in params:
        out.append(p.detach().clone())
        for _name, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor):
                out.append(v.clone())
    out.append(opt.clock.clone())
    return out


def _assert_bit_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x, y)


# -- statistics against the float64 oracle ------------------------------------------------------

#: group 0: a two-block matrix, a vector, a 0-d scalar; group 1: an empty tensor and a matrix
SHAPES = [(3, 100), (7,), (), (0, 3), (5, 4)]
GROUP_OF = [0, 0, 0, 1, 1]
LRS = (1e-2, 3e-2)

CONFIGS = {
    "adamw": (fastsched.AdamW, dict(weight_decay=0.1, betas=(0.9, 0.95)),
              dict(kind="adam", betas=(0.9, 0.95), weight_decay=0.1, decoupled=True)),
    "adam_amsgrad_l2": (fastsched.Adam, dict(weight_decay=0.01, amsgrad=True, eps=1e-6),
                        dict(kind="adam", weight_decay=0.01, decoupled=False, amsgrad=True,
                             eps=1e-6)),
    "sgd_nesterov": (fastsched.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                     dict(kind="sgd", momentum=0.9, nesterov=True, weight_decay=0.01)),
}


def _grouped(params):
    return [{"params": [p for p, g in zip(params, GROUP_OF) if g == k], "lr": LRS[k]}
            for k in range(2)]


def _names():
    """name of each tensor of SHAPES in stats_dict() (optimizer built from plain groups)."""
    names, count = [], [0, 0]
    for g in GROUP_OF:
        names.append(f"group{g}.param{count[g]}")
        count[g] += 1
    return names


@pytest.mark.parametrize("config", list(CONFIGS))
def test_statistics_match_float64_oracle(backend, kernel_device, config):
    cls, kw, hyper = CONFIGS[config]
    params = _leaves(SHAPES, 0, kernel_device)
    opt = cls(_grouped(params), backend=backend, block_size=BLOCK, max_grad_norm=2.0,
              stats=True, schedule=LinearWarmup(4, start_factor=0.25), **kw)
    oracle = Oracle([p.detach().cpu() for p in params],
                    [Hyper(lr=LRS[g], group=g, **hyper) for g in GROUP_OF],
                    schedule=_warmup, max_grad_norm=2.0)
    names = _names()
    # global norms ~ 18 * scale: clipped (54, 18), not clipped (0.9, 0.36), one NaN step
    for k, scale in enumerate([0.05, 3.0, None, 0.02, 1.0]):
        grads = [_randn(s, 100 + 10 * k + i, kernel_device, scale or 1.0)
                 for i, s in enumerate(SHAPES)]
        if scale is None:
            grads[4][2, 1] = float("nan")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        exp = oracle.step([g.cpu() for g in grads])
        st = opt.stats
        assert all(isinstance(v, torch.Tensor) and v.device.type == kernel_device
                   for v in st.values())
        sd = opt.stats_dict()
        assert sd["skipped"] is exp["skipped"]
        assert sd["skip_count"] == exp["skip_count"] == (0 if k < 2 else 1)
        assert sd["nonfinite"] == exp["nonfinite"]
        for key in ("grad_norm", "grad_norm_l1", "clip_coef"):
            assert sd[key] == pytest.approx(exp[key], rel=1e-6), key
        # the learning rate applied at this step, per group: lr * schedule(clock)
        assert sd["lr"] == pytest.approx([lr * _warmup(exp["clock"]) for lr in LRS], rel=1e-12)
        assert set(sd["tensors"]) == set(names)
        for i, n in enumerate(names):
            t = sd["tensors"][n]
            assert t["grad_norm"] == pytest.approx(exp["tensor_grad_norm"][i], rel=1e-6,
                                                   abs=1e-12)
            if exp["skipped"]:  # no update ran: zero on the device, None in the dict
                assert t["param_norm"] is None and t["update_rms"] is None
                assert float(st["tensor_param_norm"][i]) == 0.0
                assert float(st["tensor_update_rms"][i]) == 0.0
                continue
            assert t["param_norm"] == pytest.approx(exp["tensor_param_norm"][i], rel=RTOL,
                                                    abs=1e-12)
            assert t["update_rms"] == pytest.approx(exp["tensor_update_rms"][i], rel=RTOL,
                                                    abs=1e-12)
        for p, q in zip(params, oracle.params):
            assert rel_err(p, q) <= RTOL
    assert opt.clock.item() == oracle.clock == 4


def test_device_stats_follow_stats_names(backend, kernel_device):
    params = _leaves(SHAPES, 0, kernel_device)
    opt = fastsched.SGD(_grouped(params), backend=backend, block_size=BLOCK, stats=True)
    assert opt.stats == {} and opt.stats_dict() == {} and opt.stats_names() == []
    grads = [_randn(s, 7 + i, kernel_device) for i, s in enumerate(SHAPES)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    st = opt.stats
    names = opt.stats_names()
    assert sorted(names) == sorted(_names())
    for j, n in enumerate(names):
        i = _names().index(n)
        assert float(st["tensor_grad_norm"][j]) == pytest.approx(
            float(grads[i].double().norm()), rel=1e-6)
        assert float(st["tensor_param_norm"][j]) == pytest.approx(
            float(params[i].detach().double().norm()), rel=1e-6)
    assert st["lr"].tolist() == pytest.approx(list(LRS))
    assert float(st["clip_coef"]) == 1.0 and float(st["skipped"]) == 0.0


def test_stats_dict_keyed_by_parameter_names(backend, kernel_device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2)).to(kernel_device)
    model[2].bias.requires_grad_(False)  # no gradient: not in the statistics
    named = list(model.named_parameters())
    unused = ("unused", torch.nn.Parameter(torch.zeros(3, device=kernel_device)))
    # the last group has no gradient this step: its lr is reported all the same
    opt = fastsched.AdamW([{"params": named[:2]}, {"params": named[2:], "lr": 0.1},
                           {"params": [unused], "lr": 0.2}],
                          backend=backend, block_size=BLOCK, stats=True)
    x = torch.randn(5, 6, device=kernel_device)
    model(x).pow(2).sum().backward()
    grads = {n: p.grad.detach().double().clone() for n, p in named if p.grad is not None}
    opt.step()
    sd = opt.stats_dict()
    assert set(sd["tensors"]) == set(grads) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                "2.weight"}
    assert sorted(opt.stats_names()) == sorted(grads)
    params = dict(named)
    for n, g in grads.items():
        assert sd["tensors"][n]["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        assert sd["tensors"][n]["param_norm"] == pytest.approx(
            float(params[n].detach().double().norm()), rel=1e-6)
    # every element's first Adam update is +-1 (eps aside): update RMS 1
    for n in grads:
        assert sd["tensors"][n]["update_rms"] == pytest.approx(1.0, rel=1e-4)
    assert sd["lr"] == pytest.approx([1e-3, 0.1, 0.2])
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert sd["grad_norm"] == pytest.approx(total, rel=1e-6)


def test_stats_dict_names_from_model_named_parameters(backend, kernel_device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 1)).to(kernel_device)
    opt = fastsched.SGD(model.named_parameters(), lr=0.1, backend=backend, block_size=BLOCK,
                        stats=True)
    model(torch.randn(4, 3, device=kernel_device)).sum().backward()
    norms = {n: float(p.grad.double().norm()) for n, p in model.named_parameters()}
    opt.step()
    tensors = opt.stats_dict()["tensors"]
    assert list(tensors) == opt.stats_names()
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for n, v in tensors.items():
        assert v["grad_norm"] == pytest.approx(norms[n], rel=1e-6)
        assert v["update_rms"] * math.sqrt(dict(model.named_parameters())[n].numel()) == \
            pytest.approx(norms[n], rel=1e-6)  # plain SGD: the update is the gradient


def test_history_ring_buffer_wraps_in_order(backend, kernel_device):
    params = _leaves([(20,), (3, 4)], 0, kernel_device)
    opt = fastsched.AdamW(params, lr=0.5, backend=backend, block_size=BLOCK, history=3,
                          schedule=LinearWarmup(4, start_factor=0.25))
    assert opt.grad_norm_history() == {"step": [], "grad_norm": [], "grad_norm_l1": [], "lr": [],
                                       "skipped": []}
    expect = []
    clock = 0
    for k in range(6):
        grads = [_randn(p.shape, 50 + 3 * k + i, kernel_device, 1.0 + k) for i, p in
                 enumerate(params)]
        bad = k == 3
        if bad:
            grads[1][0, 0] = float("inf")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        norm = math.sqrt(sum(float(torch.where(g.isfinite(), g, 0).double().pow(2).sum())
                             for g in grads))
        l1 = sum(float(torch.where(g.isfinite(), g, 0).double().abs().sum()) for g in grads)
        expect.append((clock, norm, 0.5 * _warmup(clock), bad, l1))
        clock += 0 if bad else 1
        h = opt.grad_norm_history()
        last = expect[-3:]
        assert h["step"] == [e[0] for e in last]
        assert h["grad_norm"] == pytest.approx([e[1] for e in last], rel=1e-6)
        assert h["grad_norm_l1"] == pytest.approx([e[4] for e in last], rel=1e-6)
        assert h["lr"] == pytest.approx([e[2] for e in last], rel=1e-12)
        assert h["skipped"] == [e[3] for e in last]
    # the same buffer through stats_dict; the clock: steps 0, 1, 2, 3 (skipped), 3, 4
    assert opt.stats_dict()["history"] == h
    assert h["step"] == [3, 3, 4] and h["skipped"] == [True, False, False]
    assert opt.clock.item() == 5


# -- clipping -----------------------------------------------------------------------------------

CLIP_SHAPES = [(3, 100), (7,), (5, 4), ()]
#: global norms ~ 18 * scale against max_grad_norm 1: clipped and not clipped in turn
CLIP_SCALES = [5.0, 0.01, 3.0, 0.02, 10.0, 0.05, 1.0, 0.01, 2.0, 0.03]


def _clip_pair(kind, params, backend, c):
    tparams = [p.detach().clone().requires_grad_() for p in params]
    if kind == "adamw":
        kw = dict(lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)
        return (fastsched.AdamW(params, backend=backend, block_size=BLOCK, max_grad_norm=c,
                                **kw), torch.optim.AdamW(tparams, **kw), tparams)
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    return (fastsched.SGD(params, backend=backend, block_size=BLOCK, max_grad_norm=c, **kw),
            torch.optim.SGD(tparams, **kw), tparams)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_clipping_equals_clip_grad_norm_then_torch(backend, kernel_device, kind):
    params = _leaves(CLIP_SHAPES, 0, kernel_device)
    opt, topt, tparams = _clip_pair(kind, params, backend, 1.0)
    clipped = []
    for k, scale in enumerate(CLIP_SCALES):
        grads = [_randn(p.shape, 200 + 7 * k + i, kernel_device, scale)
                 for i, p in enumerate(params)]
        for p, t, g in zip(params, tparams, grads):
            p.grad = g.clone()
            t.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        clipped.append(float(norm) > 1.0)
        opt.step()
        topt.step()
        for p, t in zip(params, tparams):
            assert rel_err(p, t) <= RTOL
            for name, v in topt.state[t].items():
                if isinstance(v, torch.Tensor) and v.dim():
                    assert rel_err(opt.state[p][name], v) <= RTOL, name
    assert any(clipped) and not all(clipped)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_all_zero_gradients(backend, kernel_device, kind):
    params = _leaves(CLIP_SHAPES, 3, kernel_device)
    tparams = [p.detach().clone().requires_grad_() for p in params]
    if kind == "adamw":
        kw = dict(lr=0.1, weight_decay=0.5)
        opt = fastsched.AdamW(params, backend=backend, block_size=BLOCK, max_grad_norm=1.0,
                              stats=True, **kw)
        topt = torch.optim.AdamW(tparams, **kw)
    else:
        kw = dict(lr=0.1, weight_decay=0.5, momentum=0.9)
        opt = fastsched.SGD(params, backend=backend, block_size=BLOCK, max_grad_norm=1.0,
                            stats=True, **kw)
        topt = torch.optim.SGD(tparams, **kw)
    before = [p.detach().double().clone() for p in params]
    for _ in range(2):
        for p, t in zip(params, tparams):
            p.grad = torch.zeros_like(p)
            t.grad = torch.zeros_like(t)
        opt.step()
        topt.step()
        sd = opt.stats_dict()
        assert sd["grad_norm"] == 0.0 and sd["grad_norm_l1"] == 0.0
        assert sd["clip_coef"] == 1.0 and not sd["skipped"] and sd["nonfinite"] == 0
        for p, t in zip(params, tparams):
            assert torch.isfinite(p).all()
            assert rel_err(p, t) <= 1e-6
    # weight decay only: AdamW multiplies by (1 - lr wd) per step; SGD with momentum (buffer
    # wd p0, then 0.9 buf + wd p1) moves p by lr wd (p0 + p1 + 0.9 p0) over two steps
    for p, p0 in zip(params, before):
        if kind == "adamw":
            expect = p0 * 0.95 ** 2
        else:
            p1 = p0 * (1 - 0.05)
            expect = p1 - 0.05 * (0.9 * p0 + p1)
        assert rel_err(p, expect) <= 1e-6
    if kind == "adamw":
        assert all(u["update_rms"] == 0.0 for u in sd["tensors"].values())


# -- non-finite guard ---------------------------------------------------------------------------

GUARD_SHAPES = [(3, 100), (6,), (4, 5)]


def _guard_opt(kind, params, backend, **kw):
    if kind == "adamw_amsgrad":
        return fastsched.AdamW(params, lr=0.05, amsgrad=True, backend=backend, block_size=BLOCK,
                               schedule=LinearWarmup(4, start_factor=0.25), **kw)
    return fastsched.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                         backend=backend, block_size=BLOCK,
                         schedule=LinearWarmup(4, start_factor=0.25), **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["adamw_amsgrad", "sgd_momentum"])
def test_nonfinite_step_is_skipped_without_trace(backend, kernel_device, kind, bad):
    seen = _leaves(GUARD_SHAPES, 0, kernel_device)
    clean = _leaves(GUARD_SHAPES, 0, kernel_device)
    a = _guard_opt(kind, seen, backend, max_grad_norm=5.0)
    b = _guard_opt(kind, clean, backend, max_grad_norm=5.0)

    def step(opt, params, k, poison=False):
        for i, p in enumerate(params):
            p.grad = _randn(p.shape, 300 + 5 * k + i, kernel_device)
        if poison:
            params[1].grad[4] = bad
        opt.step()

    for k in range(2):
        step(a, seen, k)
        step(b, clean, k)
    before = _state_snapshot(a, seen)
    names = {n for p in seen for n, v in a.state[p].items() if isinstance(v, torch.Tensor)}
    assert names == ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
                     if kind == "adamw_amsgrad" else {"step", "momentum_buffer"})
    step(a, seen, 99, poison=True)
    _assert_bit_identical(_state_snapshot(a, seen), before)
    sd = a.stats_dict()
    assert sd["skipped"] and sd["skip_count"] == 1 and sd["nonfinite"] == 1
    for k in range(2, 4):
        step(a, seen, k)
        step(b, clean, k)
        _assert_bit_identical(_state_snapshot(a, seen), _state_snapshot(b, clean))
    sd = a.stats_dict()
    assert not sd["skipped"] and sd["skip_count"] == 1
    assert a.clock.item() == 4


def test_nonfinite_raise(backend, kernel_device):
    params = _leaves(GUARD_SHAPES, 0, kernel_device)
    opt = fastsched.AdamW(params, lr=0.05, backend=backend, block_size=BLOCK, nonfinite="raise")

    def step(k, poison=False):
        for i, p in enumerate(params):
            p.grad = _randn(p.shape, 400 + 5 * k + i, kernel_device)
        if poison:
            params[0].grad[1, 7] = float("nan")
        opt.step()

    step(0)
    assert not opt.stats_dict()["skipped"]
    before = _state_snapshot(opt, params)
    step(1, poison=True)  # the step itself never raises: it is skipped on the device
    _assert_bit_identical(_state_snapshot(opt, params), before)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.stats_dict()
    assert opt.stats_dict()["skip_count"] == 1  # reported once
    step(2)
    assert opt.stats_dict()["skip_count"] == 1
    step(3, poison=True)
    step(4, poison=True)
    with pytest.raises(FloatingPointError, match="^2 step"):
        opt.stats_dict()
    assert opt.clock.item() == 2


IGNORE_CASES = [  # (stats, max_grad_norm, bad value)
    (False, None, float("nan")),
    (True, None, float("inf")),
    (True, 1.0, float("nan")),  # clip_grad_norm_: norm nan, every gradient nan
    (True, 1.0, float("inf")),  # norm inf, coefficient 0: inf * 0 = nan, the rest 0
]


@pytest.mark.parametrize("stats,clip,bad", IGNORE_CASES,
                         ids=["nostats-nan", "stats-inf", "clip-nan", "clip-inf"])
def test_nonfinite_ignore_propagates_like_torch(backend, kernel_device, stats, clip, bad):
    params = _leaves(GUARD_SHAPES, 0, kernel_device)
    tparams = [p.detach().clone().requires_grad_() for p in params]
    opt = fastsched.AdamW(params, lr=0.05, backend=backend, block_size=BLOCK,
                          nonfinite="ignore", stats=stats, max_grad_norm=clip)
    topt = torch.optim.AdamW(tparams, lr=0.05)
    for k in range(2):
        for i, (p, t) in enumerate(zip(params, tparams)):
            g = _randn(p.shape, 500 + 5 * k + i, kernel_device)
            if k == 1 and i == 0:
                g[2, 3] = bad
            p.grad, t.grad = g.clone(), g.clone()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(tparams, clip)
        opt.step()
        topt.step()
    assert torch.isnan(params[0][2, 3])
    assert not torch.isfinite(opt.state[params[0]]["exp_avg"][2, 3])
    for p, t in zip(params, tparams):
        torch.testing.assert_close(p, t, rtol=RTOL, atol=0, equal_nan=True)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][name], topt.state[t][name], rtol=RTOL,
                                       atol=0, equal_nan=True)
    assert opt.clock.item() == 2
    if stats:
        sd = opt.stats_dict()
        assert not sd["skipped"] and sd["skip_count"] == 0 and sd["nonfinite"] == 1
        if clip is not None:  # the norm is torch's: non-finite
            assert math.isnan(sd["grad_norm"]) == math.isnan(float(norm))
            assert sd["grad_norm"] == float(norm) or math.isnan(sd["grad_norm"])


# -- GradScaler ---------------------------------------------------------------------------------

SCALE = 1024.0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_grad_scale_found_inf_contract(backend, kernel_device, kind):
    """What GradScaler.step does for optimizers with _step_supports_amp_scaling: set
    ``grad_scale`` and ``found_inf``, call step() with scaled gradients, delete both."""
    params = _leaves(CLIP_SHAPES, 1, kernel_device)
    opt, topt, tparams = _clip_pair(kind, params, backend, 1.0)
    assert opt._step_supports_amp_scaling
    for k, (scale, inf) in enumerate([(3.0, 0.0), (0.02, 0.0), (3.0, 1.0), (0.5, 0.0)]):
        grads = [_randn(p.shape, 600 + 5 * k + i, kernel_device, scale)
                 for i, p in enumerate(params)]
        for p, t, g in zip(params, tparams, grads):
            p.grad = g * SCALE
            t.grad = g.clone()
        before = _state_snapshot(opt, params)
        opt.grad_scale = torch.tensor([SCALE], device=kernel_device)
        opt.found_inf = torch.tensor([inf], device=kernel_device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        sd = opt.stats_dict()
        unscaled = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        assert sd["grad_norm"] == pytest.approx(unscaled, rel=1e-6)
        assert sd["tensors"]["group0.param0"]["grad_norm"] == pytest.approx(
            float(grads[0].double().norm()), rel=1e-6)
        assert sd["clip_coef"] == pytest.approx(min(1.0, 1.0 / (unscaled + 1e-6)), rel=1e-6)
        assert sd["skipped"] is bool(inf)
        if inf:
            _assert_bit_identical(_state_snapshot(opt, params), before)
            continue
        torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        topt.step()
        for p, t in zip(params, tparams):
            assert rel_err(p, t) <= RTOL
    assert opt.stats_dict()["skip_count"] == 1 and opt.clock.item() == 3


@pytest.mark.parametrize("grad_scale", [None, SCALE], ids=["unscaled", "scaled"])
def test_found_inf_skips_without_statistics(backend, kernel_device, grad_scale):
    """With statistics off the guard is off too, but found_inf still skips the step; after an
    explicit ``scaler.unscale_(opt)`` GradScaler sets ``grad_scale = None``."""
    params = _leaves(GUARD_SHAPES, 0, kernel_device)
    opt = fastsched.AdamW(params, lr=0.05, backend=backend, block_size=BLOCK)
    for i, p in enumerate(params):
        p.grad = _randn(p.shape, 700 + i, kernel_device)
    opt.step()
    before = _state_snapshot(opt, params)
    params[2].grad[1, 1] = float("inf")
    opt.grad_scale = None if grad_scale is None else torch.tensor([grad_scale],
                                                                  device=kernel_device)
    opt.found_inf = torch.ones(1, device=kernel_device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    _assert_bit_identical(_state_snapshot(opt, params), before)


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["fused", "unscale_"])
def test_real_gradscaler_loop(backend, kernel_device, explicit_unscale):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 3)).to(kernel_device)
    tmodel = copy.deepcopy(model)
    opt = fastsched.AdamW(model.parameters(), lr=0.01, backend=backend, block_size=BLOCK,
                          stats=not explicit_unscale)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(kernel_device, init_scale=SCALE, growth_interval=2)
    for k in range(4):
        x = torch.randn(8, 12, device=kernel_device)
        y = torch.randn(8, 3, device=kernel_device)
        scaler.scale((model(x) - y).pow(2).mean()).backward()
        overflow = k == 2
        if overflow:
            model[2].weight.grad[0, 0] = float("inf")
        if explicit_unscale:
            scaler.unscale_(opt)
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        assert scaler.get_scale() == (scale_before / 2 if overflow else
                                      scale_before * (2 if k == 1 else 1))
        if not overflow:
            (tmodel(x) - y).pow(2).mean().backward()
            topt.step()
        topt.zero_grad()
        opt.zero_grad()
        for p, t in zip(model.parameters(), tmodel.parameters()):
            assert rel_err(p, t) <= RTOL
        if not explicit_unscale:
            sd = opt.stats_dict()
            assert sd["skipped"] is overflow
    assert opt.clock.item() == 3


# -- bad input ----------------------------------------------------------------------------------

BAD = [
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm"),
    (dict(max_grad_norm=True), "max_grad_norm"),
    (dict(max_grad_norm="1"), "max_grad_norm"),
    (dict(allora_eta=0.0), "allora_eta"),
    (dict(allora_eta=-0.5), "allora_eta"),
    (dict(allora_eta=float("nan")), "allora_eta"),
    (dict(allora_eta=float("inf")), "allora_eta"),
    (dict(allora_eta=1.0, allora_unit="diag"), "allora_unit"),
    (dict(allora_unit="columns"), "allora_unit"),
    (dict(history=-1), "history"),
    (dict(history=2.5), "history"),
    (dict(nonfinite="warn"), "nonfinite"),
    (dict(nonfinite=False), "nonfinite"),
    (dict(stats=1), "stats"),
]
GROUP_KEYS = ("allora_eta", "allora_unit")


@pytest.mark.parametrize("cls", [fastsched.AdamW, fastsched.Adam, fastsched.SGD])
@pytest.mark.parametrize("kw,name", BAD, ids=[f"{k}={v!r}" for kw, _ in BAD
                                               for k, v in list(kw.items())[-1:]])
def test_bad_input_names_the_argument(cls, kw, name):
    p = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        cls([p], **kw)
    group_kw = {k: v for k, v in kw.items() if k in GROUP_KEYS}
    if group_kw:  # the same per parameter group, at construction and in add_param_group
        with pytest.raises(ValueError, match=name):
            cls([{"params": [p], **group_kw}])
        opt = cls([p])
        with pytest.raises(ValueError, match=name):
            opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **group_kw})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("key,value", [("allora_eta", -1.0), ("allora_unit", "diag")])
def test_bad_group_value_set_between_steps(key, value):
    p = torch.ones(3, 4, requires_grad=True)
    opt = fastsched.AdamW([p], allora_eta=1.0)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step()


def test_statistics_off_raise_clear_errors():
    p = torch.ones(3, requires_grad=True)
    opt = fastsched.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="statistics are off.*stats=True"):
        _ = opt.stats
    with pytest.raises(RuntimeError, match="statistics are off"):
        opt.stats_dict()
    with pytest.raises(RuntimeError, match="history=N"):
        opt.grad_norm_history()


# -- GPU only: no host synchronisation, CUDA graphs ---------------------------------------------

def _full_featured(device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(4, 300), (40, 4), (4, 40), (33,), (), (64, 64)]
    ps = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    with torch.no_grad():
        ps[1].zero_()  # LoRA B starts at zero
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    opt = fastsched.AdamW([{"params": ps[:2], "allora_eta": 0.5},
                           {"params": ps[2:5], "allora_eta": 2.0, "allora_unit": "column"},
                           {"params": ps[5:], "lr": 3e-3}],
                          lr=1e-2, max_grad_norm=1.0, stats=True, history=4,
                          schedule=LinearWarmup(3, start_factor=0.1))
    for p, gr in zip(ps, grads):
        p.grad = gr
    return ps, grads, opt


@pytest.mark.gpu
def test_step_performs_no_host_sync():
    ps, grads, opt = _full_featured("cuda")
    opt.step()  # warm-up: tables and states are built here
    torch.cuda.synchronize()
    for k in range(4):
        if k == 3:
            ps[0].grad[0, 0] = float("nan")  # in place: the gradient table stays valid
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sd = opt.stats_dict()
    assert sd["skipped"] and sd["skip_count"] == 1


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    ps, grads, opt = _full_featured("cuda")
    eps, egrads, eopt = _full_featured("cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    eopt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(4):
        for gr, egr in zip(grads, egrads):
            new = torch.randn_like(gr) * (0.01 if k % 2 else 10.0)
            gr.copy_(new)
            egr.copy_(new)
        if k == 2:
            grads[3][5] = float("inf")
            egrads[3][5] = float("inf")
        graph.replay()
        eopt.step()
        torch.cuda.synchronize()
        for p, q in zip(ps, eps):
            assert torch.equal(p, q)
        for p, q in zip(ps, eps):
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][name], eopt.state[q][name])
        a, b = opt.stats_dict(), eopt.stats_dict()
        assert a["skip_count"] == b["skip_count"] == (1 if k >= 2 else 0)
        assert a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
    assert opt.clock.item() == eopt.clock.item() == 4
