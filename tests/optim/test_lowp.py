"""Below fp32: master weights, stochastic rounding, bf16 / 8-bit states (the reference backend
and the state dict; the compiled executors are compared with it in test_lowp_cpu.py and
tests/kernels/test_lowp_triton.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fastsched.kernels import layout as L

import fastsched
from fastsched.optim import _cpu, _lowp
from fastsched.tools.toy import ToyTask

SHAPES = [(), (1,), (255,), (256,), (257,), (3, 97), (40, 300)]


def _params(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


# -- the codec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_every_code_round_trips(signed):
    bias = L.Q_BIAS_SIGNED if signed else L.Q_BIAS_UNSIGNED
    mags = torch.arange(128 if signed else 256)
    vals = _lowp._decode(mags, bias)
    assert torch.equal(_lowp._encode(vals, bias), mags)
    assert vals[-1].item() == L.Q_TOP and bool((vals[1:] > vals[:-1]).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 3000])
def test_quantize_error_bound(signed, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-8, 0, n)
    if not signed:
        x = x * x
    codes, scale = _lowp.quantize(x, signed)
    assert codes.dtype == torch.uint8 and scale.shape == (_lowp.n_blocks(n),)
    y = _lowp.dequantize(codes, scale, signed)
    blk = torch.arange(n) // L.Q_BLOCK
    absmax = torch.zeros(scale.shape[0]).scatter_reduce(0, blk, x.abs(), "amax")
    # half a mantissa step of the value (relative), or the subnormal quantum of the block
    bound = torch.maximum(x.abs() * 2.0 ** -(L.Q_MANT + 1),
                          absmax[blk] / L.Q_TOP * 2.0 ** (1 - L.Q_BIAS_SIGNED - L.Q_MANT))
    assert bool(((y - x).abs() <= bound * 1.001 + 1e-30).all())
    # idempotent: a decoded state encodes to the same values (a tiny negative value's code
    # 0x80, -0.0, comes back as 0x00)
    c2, s2 = _lowp.quantize(y, signed)
    assert torch.equal(_lowp.dequantize(c2, s2, signed), y) and torch.equal(s2, scale)


def test_quantize_nonfinite_block_is_nan_not_lost():
    x = torch.ones(600)
    x[300] = float("inf")
    codes, scale = _lowp.quantize(x, True)
    assert scale[0] == 1 / L.Q_TOP and math.isnan(scale[1]) and scale[2] == 1 / L.Q_TOP
    y = _lowp.dequantize(codes, scale, True)
    assert bool(y[256:512].isnan().all()) and bool((y[:256] == 1).all())


def test_fmix32_matches_integers():
    h = torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789])
    assert _lowp.fmix32(h).tolist() == [_lowp.fmix32(int(v)) for v in h]
    assert _lowp.fmix32(1) != _lowp.fmix32(2)


# -- stochastic rounding -----------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased():
    """The mean over 2^17 draws of a value 1/4, 1/2 and 3/4 of the way between two bf16
    neighbours is within 5 standard errors of the value (the nearest rounding is not)."""
    n = 1 << 17
    for frac in (0.25, 0.5, 0.75):
        x = torch.full((n,), 1.0 + frac * 2.0 ** -7)
        r = _lowp.stochastic_round_bf16(x, _lowp.sr_key(3, 1), 7).to(torch.float64)
        p_up = (r > 1.0).double().mean().item()
        se = math.sqrt(frac * (1 - frac) / n)
        assert abs(p_up - frac) < 5 * se
        assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}


def test_stochastic_rounding_keys():
    x = torch.full((4096,), 1.0 + 2.0 ** -9)
    a = _lowp.stochastic_round_bf16(x, _lowp.sr_key(0, 0), 1)
    assert torch.equal(a, _lowp.stochastic_round_bf16(x, _lowp.sr_key(0, 0), 1))
    for other in (_lowp.stochastic_round_bf16(x, _lowp.sr_key(1, 0), 1),
                  _lowp.stochastic_round_bf16(x, _lowp.sr_key(0, 1), 1),
                  _lowp.stochastic_round_bf16(x, _lowp.sr_key(0, 0), 2),
                  _lowp.stochastic_round_bf16(x, _lowp.sr_key(0, 0), 1, elem0=4096)):
        assert not torch.equal(a, other)
    # a shard starting at element 1000 draws what the whole tensor drew there
    whole = _lowp.stochastic_round_bf16(x, 9, 5)
    assert torch.equal(_lowp.stochastic_round_bf16(x[1000:], 9, 5, elem0=1000), whole[1000:])
    # NaN stays NaN, infinities stay
    y = _lowp.stochastic_round_bf16(torch.tensor([float("nan"), float("inf"), -float("inf")]),
                                    1, 1)
    assert y[0].isnan() and y[1] == float("inf") and y[2] == -float("inf")


def test_sr_optimizer_matches_formula_and_is_reproducible():
    params = _params(torch.bfloat16)
    start = [p.detach().clone() for p in params]
    opt = fastsched.SGD(params, lr=0.1, stochastic_rounding=True, seed=11,
                        backend="reference")
    grads = _grads(params, 1)
    _step(opt, params, grads)
    for pos, (p, p0, g) in enumerate(zip(params, start, grads)):
        w = p0.float() - 0.1 * g.float()
        want = _lowp.stochastic_round_bf16(w.reshape(-1), _lowp.sr_key(11, pos), 1)
        assert torch.equal(p.detach().reshape(-1).view(torch.int16), want.view(torch.int16))
    again = [torch.nn.Parameter(p.clone()) for p in start]
    opt2 = fastsched.SGD(again, lr=0.1, stochastic_rounding=True, seed=11, backend="reference")
    _step(opt2, again, grads)
    assert all(torch.equal(a, b) for a, b in zip(params, again))


def test_sr_training_follows_fp32_where_nearest_stalls():
    """Tiny updates (below half a bf16 ulp) vanish with rounding to nearest; stochastically
    rounded, the bf16 weights follow the fp32 trajectory on average."""
    n = 1 << 14
    fp32 = torch.ones(n)
    sr = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    rn = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    o_sr = fastsched.SGD([sr], lr=1e-3, stochastic_rounding=True, backend="reference")
    o_rn = fastsched.SGD([rn], lr=1e-3, backend="reference")
    for _ in range(50):
        g = torch.ones(n)
        fp32 -= 1e-3 * g
        _step(o_sr, [sr], [g.bfloat16()])
        _step(o_rn, [rn], [g.bfloat16()])
    assert rn.detach().float().mean().item() == 1.0  # every update rounded away
    assert abs(sr.detach().float().mean().item() - fp32.mean().item()) < 1e-4


# -- master weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_equal_fp32_adamw(dtype):
    params = _params(dtype, 2)
    master = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = fastsched.AdamW(params, lr=3e-2, weight_decay=0.1, master_weights=True,
                          backend="reference")
    ref = torch.optim.AdamW(master, lr=3e-2, weight_decay=0.1, foreach=False)
    for t in range(20):
        grads = _grads(params, 100 + t)
        _step(opt, params, grads)
        _step(ref, master, [g.float() for g in grads])
    for p, m in zip(params, master):
        mine = opt.state[p]["master_param"]
        torch.testing.assert_close(mine, m.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), mine.to(dtype))  # the parameter: master to nearest
        assert opt.state[p]["exp_avg"].dtype == torch.float32


# -- 8-bit states ------------------------------------------------------------------------------

def test_8bit_step_is_fp32_step_on_decoded_states():
    """One step from 8-bit states: the parameter is the fp32 AdamW step from the decoded
    states, and the new codes are the quantisation of the fp32 new states (so each new state
    is within the block bound of the exact one)."""
    params = _params(torch.float32, 3, [(40, 300), (5000,)])
    opt = fastsched.AdamW(params, lr=1e-2, state_dtype="8bit", min_8bit_size=0,
                          backend="reference")
    for t in range(3):
        _step(opt, params, _grads(params, t))
    before = [p.detach().clone() for p in params]
    st = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    grads = _grads(params, 9)
    _step(opt, params, grads)
    for p, p0, s, g in zip(params, before, st, grads):
        m0 = _lowp.dequantize(s["exp_avg_code"], s["exp_avg_scale"], True)
        v0 = _lowp.dequantize(s["exp_avg_sq_code"], s["exp_avg_sq_scale"], False)
        q = torch.nn.Parameter(p0.clone())
        ref = torch.optim.AdamW([q], lr=1e-2, foreach=False)
        ref.state[q] = {"step": s["step"].clone(), "exp_avg": m0.reshape(p.shape),
                        "exp_avg_sq": v0.reshape(p.shape)}
        _step(ref, [q], [g])
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, scale = _lowp.quantize(ref.state[q][name], signed)
            got = opt.state[p]
            assert (codes.reshape(-1).int() - got[name + "_code"].reshape(-1).int()
                    ).abs().max() <= 1  # fp32 rounding of the step may cross a code boundary
            torch.testing.assert_close(got[name + "_scale"], scale, rtol=1e-6, atol=0)


def test_small_tensors_keep_fp32_states():
    params = _params(torch.bfloat16, 4, [(10,), (4096,)])
    opt = fastsched.AdamW(params, state_dtype="8bit", backend="reference")
    _step(opt, params, _grads(params, 0))
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
    assert opt.state[params[1]]["exp_avg_code"].dtype == torch.uint8


@pytest.mark.parametrize("kw", [dict(state_dtype="8bit", min_8bit_size=0),
                                dict(state_dtype=torch.bfloat16),
                                dict(stochastic_rounding=True, state_dtype="8bit",
                                     min_8bit_size=0),
                                dict(master_weights=True, state_dtype="8bit", min_8bit_size=0)])
@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
@pytest.mark.filterwarnings("ignore:state_dtype='8bit'.*ALLoRA")  # (its group keeps float32)
def test_lowp_awkward_shapes_many_steps(kw, kind):
    """0-d, 1, 255 / 256 / 257 elements, odd 2-D shapes, ALLoRA on one group: 30 steps stay
    finite and close to an fp32 run (loose: bf16 parameters and 8-bit states)."""
    dtype = torch.bfloat16 if kw.get("stochastic_rounding") or kw.get("master_weights") \
        else torch.float32
    params = _params(dtype, 5)
    fp = [torch.nn.Parameter(p.detach().float()) for p in params]
    extra = dict(momentum=0.9) if kind == "SGD" else {}
    groups = [{"params": params[:-1]}, {"params": params[-1:], "allora_eta": 2.0}]
    opt = getattr(fastsched, kind)(groups, lr=1e-2, backend="reference", **extra, **kw)
    ref = getattr(fastsched, kind)([{"params": fp[:-1]}, {"params": fp[-1:], "allora_eta": 2.0}],
                                   lr=1e-2, backend="reference", **extra)
    for t in range(30):
        grads = _grads(params, 200 + t)
        _step(opt, params, grads)
        _step(ref, fp, [g.float() for g in grads])
    for p, q in zip(params, fp):
        assert bool(torch.isfinite(p).all())
        # bf16 parameters: a few ulps of random walk (stochastic rounding) over 30 steps;
        # 8-bit momentum (3-bit mantissas, the buffer requantised every step) drifts further:
        # test_8bit_step_is_fp32_step_on_decoded_states checks each step exactly
        tol = 0.25 if kw.get("state_dtype") == "8bit" and kind == "SGD" else 0.05
        assert bool(((p.detach().float() - q.detach()).abs()
                     <= tol + 0.05 * q.detach().abs()).all())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu.available(), reason="the compiled CPU backend is not built"))])
def test_8bit_training_run_tracks_fp32(backend):
    """The toy task (2-layer MLP), ~97% of the parameters in 8-bit states: the evaluation loss
    falls by >= 30% and stays within 1% of fp32 AdamW's at every evaluation over 300 steps, on
    the reference backend and on the compiled one CPU users get."""
    def run(**kw):
        task = ToyTask(seed=0)
        model = task.model()
        opt = fastsched.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01,
                              backend=backend, **kw)
        step = task.train_step(model, opt)
        losses = [task.eval_loss(model)]
        for t in range(300):
            step()
            if (t + 1) % 25 == 0:
                losses.append(task.eval_loss(model))
        return opt, model, losses

    opt, model, q = run(state_dtype="8bit", min_8bit_size=256)
    n8 = sum(p.numel() for p in model.parameters() if "exp_avg_code" in opt.state[p])
    assert n8 / sum(p.numel() for p in model.parameters()) >= 0.9
    _, _, f = run()
    assert q[-1] <= 0.7 * q[0] and f[-1] <= 0.7 * f[0]
    for a, b in zip(q[1:], f[1:]):
        assert abs(a - b) <= 0.01 * b, (q, f)


# -- options, errors, checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("dtype,kw,words", [
    (torch.float32, dict(master_weights=True), ["master_weights", "float32"]),
    (torch.float16, dict(stochastic_rounding=True), ["stochastic_rounding", "float16"]),
    (torch.float32, dict(stochastic_rounding=True), ["stochastic_rounding", "float32"]),
    (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True),
     ["master_weights", "stochastic_rounding"]),
    (torch.float32, dict(state_dtype="8bit", amsgrad=True), ["state_dtype", "amsgrad"]),
    (torch.float32, dict(state_dtype="int8"), ["state_dtype", "8bit"]),
    (torch.float32, dict(state_dtype=torch.float16), ["state_dtype", "bfloat16"]),
    (torch.float32, dict(min_8bit_size=-1), ["min_8bit_size"]),
    (torch.float32, dict(seed=-1), ["seed"]),
    (torch.float32, dict(master_weights=1), ["master_weights"]),
])
def test_bad_combinations_name_both(dtype, kw, words):
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    with pytest.raises(ValueError) as e:
        fastsched.AdamW([p], **kw)
    for w in words:
        assert w in str(e.value)


def test_bad_change_between_steps_is_refused_before_anything_moves():
    p = torch.nn.Parameter(torch.ones(300))
    opt = fastsched.AdamW([p], backend="reference")
    _step(opt, [p], [torch.ones(300)])
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["master_weights"] = True
    p.grad = torch.ones(300)
    with pytest.raises(ValueError, match="master_weights"):
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("kw", [dict(state_dtype="8bit", min_8bit_size=0),
                                dict(master_weights=True),
                                dict(stochastic_rounding=True, state_dtype=torch.bfloat16)])
def test_state_dict_round_trip_is_exact(kw, tmp_path):
    params = _params(torch.bfloat16, 6)
    opt = fastsched.AdamW(params, lr=1e-2, backend="reference", seed=5, **kw)
    for t in range(3):
        _step(opt, params, _grads(params, t))
    torch.save(opt.state_dict(), tmp_path / "sd.pt")
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = fastsched.AdamW(copies, lr=1e-2, backend="reference", **kw)
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert other.seed == 5
    for p, q in zip(params, copies):
        a, b = opt.state[p], other.state[q]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for t in range(3, 6):
        grads = _grads(params, t)
        _step(opt, params, grads)
        _step(other, copies, grads)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


def test_torch_checkpoint_loads_into_8bit_and_exports_back():
    params = _params(torch.float32, 7, [(40, 300), (7,)])
    tp = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(tp, lr=1e-2)
    for t in range(3):
        _step(torch_opt, tp, _grads(tp, t))
    opt = fastsched.AdamW(params, lr=1e-2, state_dtype="8bit", min_8bit_size=100,
                          backend="reference")
    opt.load_state_dict(torch_opt.state_dict())
    st = opt.state[params[0]]
    assert "exp_avg" not in st and st["exp_avg_code"].dtype == torch.uint8  # quantised on load
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # small: full precision
    m = _lowp.dequantize(st["exp_avg_code"], st["exp_avg_scale"], True).reshape(-1)
    ref = torch_opt.state[tp[0]]["exp_avg"].reshape(-1)
    absmax = ref.abs().max()
    assert (m - ref).abs().max() <= absmax * _lowp.max_rel_error()
    # a torch optimizer cannot misread the codes: they are under their own keys, and the
    # export gives torch's format back
    exported = opt.export_state_dict()
    assert set(exported["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    back.load_state_dict(exported)
    torch.testing.assert_close(back.state_dict()["state"][0]["exp_avg"].reshape(-1), m)


def test_state_dtype_change_converts_states():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = fastsched.AdamW([p], backend="reference", state_dtype="8bit")
    _step(opt, [p], [torch.randn(5000)])
    m = _lowp.dequantize(opt.state[p]["exp_avg_code"], opt.state[p]["exp_avg_scale"], True)
    opt.param_groups[0]["state_dtype"] = torch.float32
    _step(opt, [p], [torch.zeros(5000)])
    assert "exp_avg_code" not in opt.state[p]
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m)


@pytest.mark.parametrize("kw", [dict(state_dtype="8bit", min_8bit_size=0),
                                dict(master_weights=True),
                                dict(stochastic_rounding=True)])
def test_skipped_step_touches_nothing(kw):
    """A non-finite gradient under the guard: parameters, masters, codes and scales unchanged;
    the next step applies (clipping, statistics and a schedule on)."""
    params = _params(torch.bfloat16, 8)
    opt = fastsched.AdamW(params, lr=1e-2, backend="reference", max_grad_norm=1.0, stats=True,
                          schedule=fastsched.schedules.Cosine(20, warmup_steps=2), **kw)
    _step(opt, params, _grads(params, 0))
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for p in params]
    grads = _grads(params, 1)
    grads[-1].view(-1)[3] = float("nan")
    _step(opt, params, grads)
    assert opt.stats_dict()["skipped"]
    for p, (p0, st) in zip(params, before):
        assert torch.equal(p, p0)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    _step(opt, params, _grads(params, 2))
    assert not opt.stats_dict()["skipped"]
    assert not torch.equal(params[-1], before[-1][0])


def test_grad_scaler_composes_with_8bit_and_master():
    """torch.amp.GradScaler: the scaled gradients are unscaled in the step (grad_scale) and an
    inf skips it (found_inf), as for fp32 states."""
    params = _params(torch.bfloat16, 9, [(40, 300)])
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, backend="reference", master_weights=True, state_dtype="8bit",
              min_8bit_size=0)
    opt, ref = fastsched.AdamW(params, **kw), fastsched.AdamW(twin, **kw)
    g = _grads(params, 3)[0]
    opt.grad_scale = torch.tensor([1024.0])
    opt.found_inf = torch.tensor([0.0])
    _step(opt, params, [(g.float() * 1024).bfloat16()])
    _step(ref, twin, [g])
    torch.testing.assert_close(opt.state[params[0]]["master_param"],
                               ref.state[twin[0]]["master_param"], rtol=1e-6, atol=1e-7)
    opt.found_inf = torch.tensor([1.0])
    before = params[0].detach().clone()
    _step(opt, params, [(g.float() * 1024).bfloat16()])
    assert torch.equal(params[0], before)


def test_flat_scales_of_older_checkpoints_load_into_the_row_layout():
    """Checkpoints before the row layout of 8-bit scales stored them flat: they load (the same
    blocks) and the run continues as if uninterrupted."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 512))
    q = torch.nn.Parameter(p.detach().clone())
    a = fastsched.AdamW([p], lr=1e-2, state_dtype="8bit", min_8bit_size=0, backend="reference")
    b = fastsched.AdamW([q], lr=1e-2, state_dtype="8bit", min_8bit_size=0, backend="reference")
    g = [torch.randn(4, 512) for _ in range(6)]
    for x in g[:3]:
        p.grad = x.clone()
        a.step()
    assert a.state[p]["exp_avg_scale"].shape == (4, 2)
    sd = copy.deepcopy(a.state_dict())  # (the state dict holds a's own state tensors)
    for k in ("exp_avg_scale", "exp_avg_sq_scale"):
        sd["state"][0][k] = sd["state"][0][k].reshape(-1).clone()  # as saved before
    with torch.no_grad():
        q.copy_(p)
    b.load_state_dict(sd)
    for x in g[3:]:
        p.grad, q.grad = x.clone(), x.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)
    assert b.state[q]["exp_avg_scale"].shape == (4, 2)
    for k in ("exp_avg_code", "exp_avg_scale", "exp_avg_sq_code", "exp_avg_sq_scale"):
        assert torch.equal(a.state[p][k], b.state[q][k]), k
