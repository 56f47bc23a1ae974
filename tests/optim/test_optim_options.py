"""Options read in a step have one source: changing one between steps takes effect at the next
step on every backend (max_grad_norm, nonfinite, stats, history), and the tables are reused
when gradients are re-created by backward."""

import dataclasses
import gc
import math
import weakref

import pytest
import torch
from optim_oracle import Hyper, Oracle, rel_err

import fastsched
from fastsched.optim import StepOptions


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    return request.param


def _setup(backend, kernel_device, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (), (2049,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).float().to(kernel_device)
              .requires_grad_() for s in shapes]
    opt = fastsched.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    oracle = Oracle(params, [Hyper(lr=1e-2, weight_decay=0.1)] * len(params),
                    max_grad_norm=kw.get("max_grad_norm"))
    return params, opt, oracle, gen


def _grads(params, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.device) for p in params]


def _step(params, opt, oracle, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return oracle.step(grads)


def test_max_grad_norm_set_between_steps(backend, kernel_device):
    """None -> a number (the statistics pass starts), another number, back to None (it stops):
    the parameters follow clip_grad_norm_ + AdamW at every step."""
    params, opt, oracle, gen = _setup(backend, kernel_device)
    assert not opt.options.stats_pass
    with pytest.raises(RuntimeError, match="statistics are off"):
        opt.stats  # noqa: B018
    for k, norm in enumerate([None, 0.5, 0.5, 3.0, None, None]):
        opt.max_grad_norm = norm
        oracle.max_grad_norm = norm
        assert opt.options.stats_pass is (norm is not None)
        assert opt.nonfinite == ("skip" if norm is not None else "ignore")
        out = _step(params, opt, oracle, _grads(params, gen, scale=3.0))
        for p, q in zip(params, oracle.params):
            assert rel_err(p, q) < 2e-6, (k, norm)
        if norm is not None:
            st = opt.stats_dict()
            assert st["clip_coef"] == pytest.approx(out["clip_coef"], rel=1e-6)
            assert st["clip_coef"] < 1.0  # the gradients are ~3x too large for either norm
            assert st["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-6)


def test_max_grad_norm_checked_before_anything_changes():
    opt = fastsched.AdamW([torch.zeros(3, requires_grad=True)], max_grad_norm=1.0)
    for bad in (-1.0, 0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
            opt.max_grad_norm = bad
        assert opt.max_grad_norm == 1.0
    with pytest.raises(ValueError, match=r"nonfinite must be one of \['skip', 'raise', "
                                         r"'ignore'\]"):
        opt.nonfinite = "drop"
    assert opt.nonfinite == "skip"
    with pytest.raises(ValueError, match="options must be a fastsched.optim.StepOptions"):
        opt.options = {"stats": True}
    with pytest.raises(ValueError, match="history must be an integer >= 0"):
        StepOptions(history=-1)


def test_nonfinite_default_is_explicit():
    """nonfinite=None means "skip" exactly when clipping, stats or history is on; an explicit
    "ignore" is kept whatever else is on."""
    p = [torch.zeros(2, requires_grad=True)]
    assert fastsched.AdamW(p).nonfinite == "ignore"
    assert fastsched.AdamW(p, stats=True).nonfinite == "skip"
    assert fastsched.AdamW(p, history=4).nonfinite == "skip"
    assert fastsched.AdamW(p, max_grad_norm=1.0).nonfinite == "skip"
    opt = fastsched.AdamW(p, max_grad_norm=1.0, nonfinite="ignore")
    assert opt.nonfinite == "ignore" and opt.options.stats_pass
    opt = fastsched.AdamW(p, nonfinite="raise")
    assert opt.options.stats_pass and opt.options.guard


def test_nonfinite_set_between_steps(backend, kernel_device):
    """"skip" leaves everything as it was on a NaN gradient; switched to "ignore" the NaN
    reaches the parameter (torch semantics); back to "skip" it is skipped again."""
    params, opt, oracle, gen = _setup(backend, kernel_device, stats=True)
    grads = _grads(params, gen)
    grads[1][3] = float("nan")
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert opt.stats_dict()["skip_count"] == 1
    opt.nonfinite = "ignore"
    opt.step()
    assert torch.isnan(params[1]).any()
    assert not torch.isnan(params[0]).any()
    opt.nonfinite = "skip"
    after = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, params))
    assert opt.stats_dict()["skip_count"] == 2


def test_per_tensor_stats_follow_the_option(backend, kernel_device):
    """stats=True adds the per-tensor update statistics; clipping alone reports the global and
    per-tensor gradient statistics only."""
    params, opt, oracle, gen = _setup(backend, kernel_device, max_grad_norm=1.0)
    out = _step(params, opt, oracle, _grads(params, gen))
    st = opt.stats_dict()
    assert all(t["param_norm"] is None for t in st["tensors"].values())
    assert [t["grad_norm"] for t in st["tensors"].values()] == pytest.approx(
        out["tensor_grad_norm"], rel=1e-6)
    opt.options = dataclasses.replace(opt.options, stats=True)
    out = _step(params, opt, oracle, _grads(params, gen))
    st = opt.stats_dict()
    assert [t["param_norm"] for t in st["tensors"].values()] == pytest.approx(
        out["tensor_param_norm"], rel=1e-5)


def test_history_resized_between_steps(backend, kernel_device):
    params, opt, oracle, gen = _setup(backend, kernel_device, history=2)
    for _ in range(3):
        _step(params, opt, oracle, _grads(params, gen))
    assert opt.grad_norm_history()["step"] == [1, 2]
    opt.options = dataclasses.replace(opt.options, history=5)
    _step(params, opt, oracle, _grads(params, gen))
    assert opt.grad_norm_history()["step"] == [3]  # a resized ring buffer starts empty


def test_new_gradients_reuse_the_tables_and_are_not_retained(backend, kernel_device):
    """zero_grad(set_to_none=True) + backward every step (torch's default loop): the tables
    are built once, and the optimizer keeps no reference to the previous gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(),
                                torch.nn.Linear(17, 3)).to(kernel_device)
    opt = fastsched.AdamW(model.parameters(), lr=1e-3, backend=backend, max_grad_norm=1.0)
    x = torch.randn(32, 9, device=kernel_device)
    refs = []
    for _ in range(4):
        model(x).square().mean().backward()
        opt.step()
        refs.append(weakref.ref(model[0].weight.grad))
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
    assert opt.table_builds == 1
