"""The pipelined update (``_run_update_kernel``: one program per run of blocks of a tensor)
against the per-block kernel (``_update_kernel``): the same arithmetic, so the same bits, on
tensors that cover every path of a run: 0-d and one element, a partial last block, a partial
last run, several runs, a view 2 bytes off alignment (every block masked), and a tensor with and
without the optional state in one launch (the per-block kernel takes that launch).

Under the interpreter on CPU (conftest), or on a GPU when there is one. Every variant is forced
through the pipelined kernel here, whatever ``_RUN_LAUNCH`` holds (its choice is about the
compiled code, bench/run_sweep.py; the arithmetic is the same in every variant)."""

from __future__ import annotations

import pytest
import torch
from fastsched.kernels import optim as ko

import fastsched
from fastsched.optim._tables import RUN_ELEMENTS

SHAPES = [(), (1,), (2049,), (RUN_ELEMENTS + 5,), (2, RUN_ELEMENTS + 1000)]


class _Every(dict):
    """A launch table that has every variant, at one configuration."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def get(self, key, default=None):
        return self.cfg


def _params(dtype, device, gen, unaligned: bool):
    ps = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    if unaligned:  # a parameter 2 bytes past a 16-byte boundary: no block of it is aligned
        base = torch.randn(3001, generator=gen).to(dtype)
        ps.append(base[1:])
    ps = [torch.nn.Parameter(p.to(device)) for p in ps]
    if unaligned:
        assert ps[-1].data_ptr() % 16
    return ps


def _run(make, dtype, device, pipelined, monkeypatch, steps=3, unaligned=True, cfg=None):
    gen = torch.Generator().manual_seed(0)
    params = _params(dtype, device, gen, unaligned)
    with monkeypatch.context() as m:
        m.setattr(ko, "_RUN_LAUNCH", _Every(cfg) if pipelined else {})
        ko.run_launch.cache_clear()
        opt = make(params)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
            opt.step()
        launches = [d for d in opt.launches() if d["pass"] == "update"]
    ko.run_launch.cache_clear()
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for p in params]
    return [p.detach().clone() for p in params], state, launches, opt


def _same(a, b):
    pa, sa, _, _ = a
    pb, sb, _, _ = b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


CASES = {
    "adamw-fp32": (torch.float32, lambda ps: fastsched.AdamW(ps, lr=1e-2, backend="triton")),
    "adamw-bf16": (torch.bfloat16, lambda ps: fastsched.AdamW(ps, lr=1e-2, backend="triton")),
    "adam-l2-amsgrad-fp16": (torch.float16, lambda ps: fastsched.Adam(
        ps, lr=1e-3, weight_decay=0.1, amsgrad=True, backend="triton")),
    "sgd-nesterov-bf16": (torch.bfloat16, lambda ps: fastsched.SGD(
        ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2, backend="triton")),
    "adamw-bf16-8bit-sr": (torch.bfloat16, lambda ps: fastsched.AdamW(
        ps, lr=1e-2, state_dtype="8bit", min_8bit_size=1, stochastic_rounding=True,
        backend="triton")),
    "sgd-bf16-master": (torch.bfloat16, lambda ps: fastsched.SGD(
        ps, lr=1e-2, momentum=0.9, master_weights=True, backend="triton")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cfg", [(1024, 3, 4), (2048, 4, 4)])
def test_pipelined_equals_per_block(case, cfg, kernel_device, monkeypatch):
    dtype, make = CASES[case]
    block = _run(make, dtype, kernel_device, False, monkeypatch)
    run = _run(make, dtype, kernel_device, True, monkeypatch, cfg=cfg)
    assert block[2] and not any(d.get("pipelined") for d in block[2])
    assert run[2] and all(d.get("pipelined") for d in run[2])
    runs = sum(-(-p.numel() // RUN_ELEMENTS) for p in run[0])
    assert sum(d["programs"] for d in run[2]) == runs
    _same(block, run)


def test_statistics_and_skip(kernel_device, monkeypatch):
    """Update statistics (one reduction per program instead of per block: the same sums in
    another order) and a skipped step (non-finite gradient: nothing written, nor the clock)."""
    def make(ps):
        return fastsched.AdamW(ps, lr=1e-2, stats=True, nonfinite="skip", backend="triton")

    outs = [_run(make, torch.bfloat16, kernel_device, on, monkeypatch, cfg=(1024, 3, 4))
            for on in (False, True)]
    _same(*outs)
    a, b = (o[3].stats for o in outs)
    for k in ("tensor_param_norm", "tensor_update_rms"):
        assert a[k].shape == (len(outs[0][0]),)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=0)
    opt = outs[1][3]
    with monkeypatch.context() as m:
        m.setattr(ko, "_RUN_LAUNCH", _Every((1024, 3, 4)))
        ko.run_launch.cache_clear()
        live = opt.param_groups[0]["params"]
        before = [p.detach().clone() for p in live]
        for p in live:
            p.grad = torch.full_like(p, float("nan"))
        opt.step()
    ko.run_launch.cache_clear()
    for x, y in zip(before, live):
        assert torch.equal(x, y.detach())


def test_mixed_optional_state_keeps_per_block(kernel_device, monkeypatch):
    """A launch whose tensors differ in the optional state (SGD groups with and without
    momentum) cannot load it outside a branch: the per-block kernel runs it."""
    def make(ps):
        return fastsched.SGD([{"params": ps[:3]}, {"params": ps[3:], "momentum": 0.0}],
                             lr=1e-2, momentum=0.9, backend="triton")

    block = _run(make, torch.bfloat16, kernel_device, False, monkeypatch)
    run = _run(make, torch.bfloat16, kernel_device, True, monkeypatch, cfg=(1024, 3, 4))
    assert [d.get("pipelined", False) for d in run[2]] == [False]
    _same(block, run)
