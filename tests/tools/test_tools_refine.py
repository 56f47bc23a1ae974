"""fastsched.tools.refine: schedules refined from gradient norms (Defazio et al., 2310.07831)."""

import numpy as np
import pytest
import torch
from fastsched.kernels.schedule import evaluate_schedule

import fastsched
from fastsched.schedules import LinearDecay, Table, evaluate_table
from fastsched.tools import closed_form_schedule, median_filter, refine, refine_curve


def _steps(n):
    return torch.arange(n)


# -- the worst case: constant norms give linear decay ------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("T, tol", [(777, 1e-3), (20_000, 1e-3), (300, 0.0)])
def test_constant_norms_give_linear_decay(norm, T, tol):
    sched = refine(np.full(T, 3.7), norm=norm, tol=tol)
    assert isinstance(sched, Table)
    t = _steps(T + 5)
    # 1 at step 0, 0 at the last step of the run and after: LinearDecay over T - 1 steps
    expect = LinearDecay(T - 1).evaluate(t)
    assert torch.allclose(sched.evaluate(t), expect, rtol=0, atol=1e-12)
    assert sched(0) == pytest.approx(1.0, abs=1e-12) and sched(T - 1) == pytest.approx(0, abs=1e-12)


def test_constant_norms_rescaled_to_a_new_length():
    sched = refine(np.ones(400), total_steps=2500)
    t = _steps(2500)
    assert torch.allclose(sched.evaluate(t), LinearDecay(2499).evaluate(t), atol=1e-12)


def test_closed_form_matches_the_sum_definition():
    rng = np.random.default_rng(0)
    g = rng.uniform(0.5, 3.0, size=40)
    for norm, power in (("l2", -2.0), ("l1", -1.0)):
        w = g ** power
        eta = np.array([w[t] * w[t + 1:].sum() / w[-1] for t in range(g.size)])
        np.testing.assert_allclose(closed_form_schedule(g, norm), eta / eta.max(), rtol=1e-13)
        assert closed_form_schedule(g, norm)[-1] == 0.0


# -- the smoothing of the paper's code ---------------------------------------------------------

def test_median_filter_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 7, size=301).astype(float)  # many ties
    for size in (1, 3, 15, 301, 999):
        h = size // 2
        padded = np.pad(x, (h, h), mode="edge")
        ref = np.array([np.median(padded[i:i + size]) for i in range(x.size)])
        np.testing.assert_array_equal(median_filter(x, size), ref)
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)


def _reference_pipeline(g, norm, nvals=10_000, sigma=0.1):
    """The steps of visual.py written out plainly: drop inf, clip 2 at each end, resample to
    nvals, reflect-pad the end, median filter ('nearest'), crop, map in closed form."""
    g = np.asarray(g, dtype=float)
    g = g[~np.isinf(g)][2:-2]
    if g.size < nvals:
        g = np.interp(np.linspace(0, 1, nvals), np.linspace(0, 1, g.size), g)
    width = 2 * (int(sigma * nvals) // 2) + 1
    pad = 2 * width
    x = np.pad(g, (0, pad), mode="reflect")
    h = width // 2
    xe = np.pad(x, (h, h), mode="edge")
    filt = np.array([np.median(xe[i:i + width]) for i in range(x.size)])[:-pad]
    sm = np.interp(np.linspace(0, 1, nvals), np.linspace(0, 1, g.size), filt)
    w = sm ** (-2.0 if norm == "l2" else -1.0)
    tail = np.flip(np.cumsum(np.flip(w)))
    sched = np.zeros(nvals)
    sched[:-1] = w[:-1] * tail[1:] / tail[-1]
    return sched / sched.max(), sm


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_refine_curve_follows_the_reference_pipeline(norm):
    rng = np.random.default_rng(2)
    t = np.linspace(0, 1, 1500)
    g = (1 + 4 * np.exp(-t / 0.05) + 2 * t ** 4) * np.exp(0.3 * rng.standard_normal(t.size))
    g[[0, -1]] = np.inf  # export artefacts at the ends are dropped
    sched, smoothed = _reference_pipeline(g, norm)
    out = refine_curve(g, norm=norm)
    np.testing.assert_allclose(out["smoothed"], smoothed, rtol=1e-12)
    np.testing.assert_allclose(out["schedule"], sched, rtol=1e-10, atol=1e-13)


def test_large_early_norms_give_warmup_and_rising_late_norms_a_fast_anneal():
    rng = np.random.default_rng(3)
    t = np.linspace(0, 1, 4000)
    g = (1 + 6 * np.exp(-t / 0.08) + 3 * np.clip(t - 0.6, 0, None) / 0.4)
    g = g * np.exp(0.2 * rng.standard_normal(t.size))
    sched = refine(g)
    v = sched.evaluate(_steps(4000)).numpy()
    peak = int(np.argmax(v))
    assert v[0] < 0.5 and 200 < peak < 1500  # a warmup emerges from the large early norms
    lin = 1 - np.arange(4000) / 3999
    # the rising norms at the end anneal faster than linear decay over the last 40%
    assert np.all(v[2800:3990] < lin[2800:3990] * v[2400] / lin[2400])


@pytest.mark.parametrize("T", [20_000, 3000])
def test_device_table_stays_within_tol_of_the_refined_curve(T):
    rng = np.random.default_rng(4)
    g = np.exp(np.cumsum(0.01 * rng.standard_normal(T))) + 0.5
    curve = refine_curve(g)
    for tol in (1e-3, 1e-2):
        sched = refine(g, tol=tol)
        assert len(sched.steps) < 0.2 * min(T, 10_000)  # far fewer rows than points
        if T > 10_000:  # the table's knots sit on the n-point curve: check at those points
            at = torch.tensor(curve["progress"] * (T - 1))
            err = np.max(np.abs(evaluate_table(sched.table(), at).numpy() - curve["schedule"]))
        else:  # one point per step
            fine = np.interp(np.arange(T) / (T - 1), curve["progress"], curve["schedule"])
            err = np.max(np.abs(sched.evaluate(_steps(T)).numpy() - fine))
        assert err <= tol * (1 + 1e-9)



# -- inputs: optimizer, history dict, tensor -----------------------------------------------------

def _run_with_history(steps=40, history=64):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = fastsched.SGD(model.parameters(), lr=0.1, momentum=0.9, history=history)
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_refine_reads_an_optimizer_history():
    opt = _run_with_history()
    h = opt.grad_norm_history()
    assert len(h["grad_norm"]) == 40
    a = refine(opt)
    b = refine(h)
    c = refine(torch.tensor(h["grad_norm"], dtype=torch.float64))
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert a.steps[-1] == 39  # the logged run: steps 0..39


def test_skipped_and_nonfinite_steps_are_dropped():
    g = list(np.linspace(2.0, 1.0, 50))
    h = {"step": list(range(50)), "grad_norm": list(g), "skipped": [False] * 50}
    h["skipped"][20] = True
    h["grad_norm"][20] = 1e6  # a skipped step's norm must not count
    h["grad_norm"][30] = float("nan")
    dropped = {"step": [s for s in range(50) if s not in (20, 30)],
               "grad_norm": [v for i, v in enumerate(g) if i not in (20, 30)]}
    assert refine(h).to_dict() == refine(dropped).to_dict()


def test_strided_log_spans_the_run():
    h = {"step": list(range(0, 1000, 10)), "grad_norm": [1.0] * 100}
    sched = refine(h)
    assert sched.steps[-1] == 999  # 100 entries every 10 steps: a 1000-step run
    assert sched(499) == pytest.approx(1 - 499 / 999, abs=1e-12)


def test_the_optimizer_evaluates_the_refined_table(kernel_device):
    rng = np.random.default_rng(5)
    sched = refine(1 + rng.random(600), tol=1e-2)
    steps = torch.tensor([0, 1, 57, 123, 300, 598, 599, 650], device=kernel_device)
    kern = evaluate_schedule(sched.table(kernel_device), steps).cpu()
    assert torch.allclose(kern, sched.evaluate(steps.cpu()), rtol=1e-12, atol=1e-15)
    # a fused optimizer applies lr * schedule(clock) at each step
    p = torch.nn.Parameter(torch.ones(4))
    opt = fastsched.SGD([p], lr=0.5, schedule=sched, stats=True)
    for t in range(5):
        p.grad = torch.ones(4)
        opt.step()
        assert opt.stats_dict()["lr"][0] == pytest.approx(0.5 * sched(t), rel=1e-12)


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([np.inf] * 10, "usable values"),
    ([1.0, 2.0, 3.0], "usable values"),
    ("abc", "sequence of numbers"),
    ({"loss": [1.0]}, "'grad_norm'"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        refine(bad)


def test_l1_needs_l1_norms():
    with pytest.raises(ValueError, match="L1"):
        refine({"step": [0, 1], "grad_norm": [1.0, 2.0]}, norm="l1")
    with pytest.raises(ValueError, match="norm must be one of"):
        refine(np.ones(10), norm="l3")
    with pytest.raises(ValueError, match="total_steps"):
        refine(np.ones(10), total_steps=1)


def test_refine_l1_from_an_optimizer_history():
    """The ring buffer keeps L1 norms too, so the Adam-type refinement reads an optimizer."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = fastsched.AdamW([p], lr=1e-2, history=50)
    for k in range(30):
        p.grad = torch.full((8,), 1.0 + 0.1 * k)
        opt.step()
    h = opt.grad_norm_history()
    assert h["grad_norm_l1"] == pytest.approx([8 * (1.0 + 0.1 * k) for k in range(30)])
    a = fastsched.tools.refine(opt, norm="l1")
    b = fastsched.tools.refine(h["grad_norm_l1"], norm="l1")
    steps = torch.arange(0, 30)
    assert torch.allclose(a.evaluate(steps), b.evaluate(steps))
