"""bench/ema_stall.py: the plain-PyTorch model of the second moment's code rounded to nearest
equals fastsched's 8-bit states (so the stochastic variant of the model says what that rounding
would do), and the study runs end to end. Nothing here asserts a timing."""

from __future__ import annotations

import pytest
import torch

import fastsched


@pytest.fixture(scope="module")
def es(bench_script):
    return bench_script("ema_stall")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_nearest_model_equals_fastsched_codes(es, backend):
    gen = torch.Generator().manual_seed(3)
    n = 4 * 256
    sigma = torch.exp(torch.rand(n, generator=gen) * -4.6) * 1e-2
    p = torch.nn.Parameter(torch.zeros(n))
    opt = fastsched.AdamW([p], lr=0.0, weight_decay=0.0, state_dtype="8bit", min_8bit_size=0,
                          backend=backend)
    model = es.CodecModel(n, sr=False, seed=0)
    for step in range(60):
        g = sigma * torch.randn(n, generator=gen) * (10.0 if step >= 30 else 1.0)
        p.grad = g.clone()
        opt.step()
        model.step(g)
        v = opt.export_state_dict()["state"][0]["exp_avg_sq"]
        torch.testing.assert_close(model.v, v, rtol=0, atol=0)


def test_stochastic_model_is_unbiased_per_step(es):
    """One step of the stochastic model from a fixed state: the mean over many draws is the
    unrounded EMA within 5 standard errors (a wrong probability would be off by ~a code)."""
    n = 256
    v0 = torch.linspace(0.5, 1.875, n)
    g = torch.full((n,), 0.3)
    want = 0.999 * v0 + 0.001 * g * g
    draws = []
    for seed in range(400):
        m = es.CodecModel(n, sr=True, seed=seed)
        m.v = v0.clone()
        m.step(g)
        draws.append(m.v)
    d = torch.stack(draws).double()
    # a draw is one of the two codes around the value: its standard deviation is at most half
    # a code (2^(exponent - 3) of a = v / scale, for 3 mantissa bits, times the scale)
    scale = want.double().max() / 1.875
    code = torch.exp2(torch.floor(torch.log2(want.double() / scale)) - 3) * scale
    assert ((d - want.double()[None]).abs() <= code[None] * 1.0001).all()
    se = code / 2 / len(draws) ** 0.5
    assert ((d.mean(0) - want.double()).abs() <= 5 * se).all()
    # and it is not rounding to nearest: most values land on both codes
    assert ((d != d[0]).any(0)).float().mean() > 0.9


def test_study_runs_and_reports(es, capsys):
    with pytest.raises(ValueError, match="numel"):
        es.run(numel=1000, steps=4, seed=0)
    res = es.run(numel=4096, steps=4, seed=0, models=True)
    names = set(res["rows"][0]) - {"phase", "step"}
    assert any(k.startswith("fastsched 8bit") for k in names)
    assert {"model E5M3 nearest", "model E5M3 stochastic"} <= names
    assert [r["phase"] for r in res["rows"]] == ["steady"] * 4 + ["shrink"] * 4 + ["grow"] * 4
    for r in res["rows"]:
        lo, mid, hi = r["model E5M3 nearest"]
        assert 0 < lo <= mid <= hi
        f = next(v for k, v in r.items() if k.startswith("fastsched 8bit"))
        assert f == r["model E5M3 nearest"]
    assert set(res["skipped"]) <= {"bitsandbytes AdamW8bit", "torchao AdamW8bit",
                                   "fastsched 8bit (cpu)"}
