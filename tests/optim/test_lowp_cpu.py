"""Below fp32 on the compiled CPU executor (``backend="cpu"``): master weights, stochastic
rounding, float32 / bfloat16 / 8-bit states, against the reference backend (the oracle) and
fastsched.optim._lowp (the definition of the codec and the generator).

* the codec and the generator of the extension alone (``quantize`` / ``dequantize`` /
  ``sr_round``) bit for bit against _lowp: every code, non-finite blocks, subnormal block
  maxima, the index's high word;
* many steps of every option combination against the reference, bit for bit (parameters,
  masters, codes, scales, states, step counters; statistics to float64 rounding), awkward
  shapes (0-d, 1, 255 / 256 / 257, over a block of 8192, many tensors), ALLoRA rows / columns /
  the tensor with 8-bit states, a skipped step with statistics, GradScaler;
* 1 and 2 threads bit for bit; the errors of a bad table.

Bit for bit needs the same float32 operations on both sides, and the reference is what a
machine without a C++ compiler runs, as it is: correctly rounded square roots (torch's CPU
``sqrt`` is not: MKL's vector routine) and the executor's float64 ALLoRA unit sums, in its
order (``_reference.sqrt_rn``, ``_reference.unit_sums``), so every difference is a bug.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastsched.kernels import layout as L
from test_cpu_backend import BLK, _grads, _run

import fastsched
from fastsched.optim import _cpu, _lowp, _reference
from fastsched.optim._tables import LowP

pytestmark = [pytest.mark.skipif(not _cpu.available(),
                                reason=f"no compiled CPU backend: {_cpu.reason()}"),
              # (ALLoRA groups asked for 8-bit states keep float32, as the warning says)
              pytest.mark.filterwarnings("ignore:state_dtype='8bit'.*ALLoRA")]


# -- the codec and the generator alone ------------------------------------------------------------

def _quantize(x, signed):
    x = x.detach().to(torch.float32).contiguous().reshape(-1)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    scales = torch.empty(_lowp.n_blocks(x.numel()), dtype=torch.float32)
    _cpu.ext().quantize(x.data_ptr(), x.numel(), int(signed), codes.data_ptr(),
                        scales.data_ptr())
    return codes, scales


def _dequantize(codes, scales, signed):
    out = torch.empty(codes.numel(), dtype=torch.float32)
    _cpu.ext().dequantize(codes.data_ptr(), scales.contiguous().data_ptr(), codes.numel(),
                          int(signed), out.data_ptr())
    return out


def _bits_equal(a, b, nan_bits=True):
    """The same bits; nan_bits=False: any NaN equals any NaN (a NaN's sign and payload are
    whatever the instructions that made it left: torch's and the executor's differ)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if not nan_bits and a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a[~nan], b[~nan]
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _codec_inputs():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (0, 1, 15, 16, 17, 255, 256, 257, 1000, 4099):
        for k in range(6):
            x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * (2 * k))
            if k == 1 and n:
                x[torch.randint(0, n, (3,), generator=g)] = float("nan")
            if k == 2 and n:
                x[torch.randint(0, n, (2,), generator=g)] = -float("inf")
            if k == 3 and n > 300:
                x[256:512] = 0.0
                x[300] = -0.0
            if k == 4:
                x = x * 1e-39  # subnormal block maxima: 1 / absmax overflows to inf
            if k == 5 and n:
                x[::7] = x[::7] * 1e-30  # subnormal codes next to normal ones
            out.append(x)
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_lowp(signed):
    for x in _codec_inputs():
        x = x if signed else x.abs()
        c1, s1 = _quantize(x, signed)
        c2, s2 = _lowp.quantize(x, signed)
        assert torch.equal(c1, c2), (x.numel(), (c1 != c2).sum())
        assert _bits_equal(s1, s2), x.numel()


@pytest.mark.parametrize("signed", [True, False])
def test_dequantize_matches_lowp(signed):
    codes = torch.arange(256, dtype=torch.uint8).repeat(5)
    for scales in ([1.0, 3.3e-3, 7e-39, 2.0e30, float("nan")],  # 2e30: KDEC * scale overflows
                   [0.0, 1e-20, 5.5, 1e5, 3e38]):
        s = torch.tensor(scales, dtype=torch.float32)
        assert _bits_equal(_dequantize(codes, s, signed), _lowp.dequantize(codes, s, signed))
    for x in _codec_inputs():
        c, s = _lowp.quantize(x if signed else x.abs(), signed)
        assert _bits_equal(_dequantize(c, s, signed), _lowp.dequantize(c, s, signed))


def test_stochastic_rounding_matches_lowp():
    g = torch.Generator().manual_seed(1)
    for k, elem0 in enumerate([0, 5, 2**32 - 100, 2**32 - 7, 2**33 + 7, 2**40 + 3]):
        n = 1000 + 97 * k
        x = torch.randn(n, generator=g) * 10 ** (k - 2)
        x[::89] = float("nan")
        x[5], x[6], x[7] = float("inf"), -float("inf"), 3.4e38
        key = int(torch.randint(0, 2**32, (1,), generator=g, dtype=torch.int64))
        for step in (1, 2, 2**31 + 5):
            out = torch.empty(n, dtype=torch.bfloat16)
            _cpu.ext().sr_round(x.data_ptr(), n, key, step, elem0, out.data_ptr())
            ref = _lowp.stochastic_round_bf16(x, key, step, elem0)
            assert _bits_equal(out, ref), (elem0, step)


# -- many steps against the reference -------------------------------------------------------------

SHAPES = [(), (1,), (255,), (256,), (257,), (3, 5), (31, 17), (BLK + 3,), (2, BLK + 1),
          (5000,), (600, 33)]
MANY = [(k % 7 + 1, 40 * (k % 5) + 3) for k in range(30)]
B8 = dict(state_dtype="8bit", min_8bit_size=1)

# (class, options, parameter dtype)
CONFIGS = {
    "adamw-8bit": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1, **B8), torch.float32),
    "adam-l2-maximize-8bit": (fastsched.Adam, dict(lr=1e-2, weight_decay=0.1, maximize=True,
                                                   **B8), torch.float32),
    "adamw-beta1-0-8bit": (fastsched.AdamW, dict(lr=1e-2, betas=(0.0, 0.99), **B8),
                           torch.float32),
    "adamw-bf16-8bit": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1, **B8), torch.bfloat16),
    "adamw-bf16-sr": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=True,
                                            seed=3), torch.bfloat16),
    "adamw-bf16-sr-8bit": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1,
                                                 stochastic_rounding=True, seed=4, **B8),
                           torch.bfloat16),
    "adamw-bf16-sr-fp32-states": (fastsched.AdamW, dict(lr=1e-2, stochastic_rounding=True,
                                                        state_dtype=torch.float32),
                                  torch.bfloat16),
    "adamw-bf16-master": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1, master_weights=True),
                          torch.bfloat16),
    "adamw-bf16-master-8bit": (fastsched.AdamW, dict(lr=1e-2, master_weights=True, **B8),
                               torch.bfloat16),
    "adamw-bf16-master-bf16-states": (fastsched.AdamW, dict(lr=1e-2, master_weights=True,
                                                            state_dtype=torch.bfloat16),
                                      torch.bfloat16),
    "adam-amsgrad-f16-master": (fastsched.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1,
                                                     master_weights=True), torch.float16),
    "adam-amsgrad-bf16-fp32-states": (fastsched.Adam, dict(lr=1e-2, amsgrad=True,
                                                           state_dtype=torch.float32),
                                      torch.bfloat16),
    "adamw-fp32-bf16-states": (fastsched.AdamW, dict(lr=1e-2, state_dtype=torch.bfloat16),
                               torch.float32),
    "sgd-momentum-8bit": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.3,
                                              weight_decay=0.1, **B8), torch.float32),
    "sgd-nesterov-bf16-sr-8bit": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True,
                                                      stochastic_rounding=True, **B8),
                                  torch.bfloat16),
    "sgd-bf16-sr": (fastsched.SGD, dict(lr=1e-2, stochastic_rounding=True), torch.bfloat16),
    "sgd-momentum-bf16-master-8bit": (fastsched.SGD, dict(lr=1e-2, momentum=0.9,
                                                          master_weights=True, **B8),
                                      torch.bfloat16),
    # 16-bit parameters with their own dtype's states: the fused register loop (Adam without
    # amsgrad) and the 64-element SGD loop, fp16 through F16C's conversions
    "adamw-bf16": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1), torch.bfloat16),
    "adam-l2-maximize-fp16": (fastsched.Adam, dict(lr=1e-2, weight_decay=0.1, maximize=True),
                              torch.float16),
    "adamw-beta1-0-fp16": (fastsched.AdamW, dict(lr=1e-2, betas=(0.0, 0.99)), torch.float16),
    "sgd-nesterov-fp16": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True,
                                              weight_decay=0.1), torch.float16),
}
FEATURES = {
    "plain": dict(),
    "clip-stats-history": dict(max_grad_norm=1.0, stats=True, history=4),
}
#: float64 sums of the statistics: the same values summed in another order
_STATS_KEYS = ("tstat", "ustat", "gstat", "history")
#: the update statistics: float32 partial sums of 16 squares per lane (setup_ext/kernels.h,
#: LANE_RUN), within 16 float32 roundings of the reference's float64 sums
_USTAT_RTOL = 16 * 2.0 ** -24


def _check(rec_a, rec_b):
    """Bit for bit: parameters, states (codes, scales, masters), counters, scal; statistics
    to float64 rounding (the update statistics to _USTAT_RTOL)."""
    for k, (a, b) in enumerate(zip(rec_a, rec_b)):
        assert a.keys() == b.keys()
        for key in a:
            xs, ys = (a[key], b[key]) if key == "params" else ([a[key]], [b[key]])
            for i, (x, y) in enumerate(zip(xs, ys)):
                if x is None:
                    assert y is None
                elif key in _STATS_KEYS or key == "lr":  # (lr: float64 cos, libm's / torch's)
                    rtol = _USTAT_RTOL if key == "ustat" else 1e-9
                    torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12, equal_nan=True,
                                               msg=lambda m, k=k, key=key: f"step {k} {key}: {m}")
                elif key == "scal":  # float64 finalize rounded once: pow may differ in a bit
                    torch.testing.assert_close(x, y, rtol=2e-7, atol=0, equal_nan=True)
                else:
                    ok = _bits_equal(x, y, nan_bits=False)
                    if not ok and x.is_floating_point():
                        d = (x.double() - y.double()).abs().max()
                        pytest.fail(f"step {k} {key}[{i}]: not bit for bit (max |diff| {d})")
                    assert ok, f"step {k} {key}[{i}]: not bit for bit"


def _both(cls, kw, shapes, dtype, steps, seed, **run_kw):
    grads = _grads(shapes, steps, seed, scale=3.0)
    _, _, a = _run("cpu", cls, kw, shapes, dtype, grads, **run_kw)
    _, _, b = _run("reference", cls, kw, shapes, dtype, grads, **run_kw)
    return a, b


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_bit_for_bit(name, features):
    cls, kw, dtype = CONFIGS[name]
    a, b = _both(cls, {**kw, **FEATURES[features]}, SHAPES, dtype, 10, 1)
    _check(a, b)


@pytest.mark.parametrize("name", ["adamw-8bit", "adamw-bf16", "adamw-bf16-sr-8bit",
                                  "adamw-fp32-bf16-states"])
def test_late_steps_bias_correction_one(name):
    """beta2 = 0.5: from step 25 on sqrt(1 - beta2^t) rounds to 1 in float32 and the fused loop
    leaves its division out (x / 1 is x): the same bits as the reference's division."""
    cls, kw, dtype = CONFIGS[name]
    a, b = _both(cls, {**kw, "betas": (0.9, 0.5), "max_grad_norm": 1.0, "stats": True}, SHAPES,
                 dtype, 30, 3)
    assert float(a[-1]["scal"][0, L.S_ADAM_BC2_SQRT]) == 1.0
    assert float(a[0]["scal"][0, L.S_ADAM_BC2_SQRT]) != 1.0
    _check(a, b)


def test_many_tensors_and_groups():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in MANY]
    out = []
    for backend in ("cpu", "reference"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        groups = [dict(params=ps[:10], stochastic_rounding=True),
                  dict(params=ps[10:20], master_weights=True, state_dtype="8bit"),
                  dict(params=ps[20:], state_dtype="8bit", stochastic_rounding=True,
                       betas=(0.8, 0.95))]
        opt = fastsched.AdamW(groups, lr=1e-2, weight_decay=0.1, backend=backend, seed=9,
                              min_8bit_size=100)
        g2 = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g2).bfloat16()
            opt.step()
        out.append([p.detach().clone() for p in ps]
                   + [v.clone() for p in ps for v in opt.state[p].values()])
    for x, y in zip(*out):
        assert _bits_equal(x, y)


ALLORA_SHAPES = [(), (5,), (3, 8), (6, 17), (40, 300), (64, 96), (7, 1000), (3, BLK + 7),
                 (BLK + 5, 2), (300, 70), (5, 2048), (3, 1031)]


#: ALLoRA units the update sums several at a time (setup_ext: sum_sq_rows8 for rows of 8 and
#: multiples of 16 up to 256, short_sums16 for other rows of at most 16), with unit counts that
#: leave some to the one-unit loop, a tensor of two blocks, and LoRA's shapes (rank 16)
SHORT_UNIT_SHAPES = [(37, 16), (21, 8), (19, 32), (9, 48), (11, 256), (35, 5), (50, 12),
                     (600, 16), (16, 300), (300, 16)]
SHORT_UNIT_CONFIGS = {
    "adamw-fp32": (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1), torch.float32),
    "sgd-momentum-fp32": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
                          torch.float32),
    "adamw-bf16": CONFIGS["adamw-bf16"],
    "adamw-bf16-sr-8bit": CONFIGS["adamw-bf16-sr-8bit"],
}


@pytest.mark.parametrize("unit", ["row", "column"])
@pytest.mark.parametrize("name", list(SHORT_UNIT_CONFIGS))
def test_allora_short_units(name, unit):
    """Short ALLoRA units: their float64 sums (several units side by side) and the float32
    update of short spans through the fused loop, bit for bit against the reference."""
    cls, kw, dtype = SHORT_UNIT_CONFIGS[name]
    kw = {**kw, "allora_eta": 0.7, "allora_unit": unit, "stats": True, "max_grad_norm": 1.0}
    a, b = _both(cls, kw, SHORT_UNIT_SHAPES, dtype, 6, 5)
    _check(a, b)


@pytest.mark.parametrize("name", ["adamw-fp32", "adamw-bf16"])
def test_allora_short_units_one_and_two_threads(name):
    """The side-by-side unit sums, the fused short spans and the update statistics: the same
    bits with 1 and 2 threads."""
    cls, kw, dtype = SHORT_UNIT_CONFIGS[name]
    kw = {**kw, "allora_eta": 0.7, "allora_unit": "row", "stats": True, "max_grad_norm": 1.0}
    grads = _grads(SHORT_UNIT_SHAPES, 3, 8)
    _, _, one = _run("cpu", cls, kw, SHORT_UNIT_SHAPES, dtype, grads, nthreads=1)
    _, _, two = _run("cpu", cls, kw, SHORT_UNIT_SHAPES, dtype, grads, nthreads=2)
    for x, y in zip(one, two):
        for key in x:
            xs, ys = (x[key], y[key]) if key == "params" else ([x[key]], [y[key]])
            for u, v in zip(xs, ys):
                assert u is None or _bits_equal(u, v), key


@pytest.mark.parametrize("apply", ["grad", "update"])
@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
@pytest.mark.parametrize("name", ["adamw-8bit", "adamw-bf16-sr-8bit", "sgd-momentum-8bit",
                                  "adamw-bf16-sr", "adamw-fp32-bf16-states",
                                  "adamw-bf16-master-8bit"])
def test_allora_units_with_8bit_states(name, unit, apply):
    """ALLoRA groups keep float32 states under state_dtype="8bit" (the names say what the
    configuration asks for); rows of 96, 1000, 300, 17, columns, the tensor, rows of 2048 and
    1031 (summed beside the update of the row before); also below fp32 without 8-bit states."""
    cls, kw, dtype = CONFIGS[name]
    kw = {**kw, "allora_eta": 0.7, "allora_unit": unit, "allora_apply": apply, "stats": True}
    a, b = _both(cls, kw, ALLORA_SHAPES, dtype, 6, 5)
    _check(a, b)


@pytest.mark.parametrize("name", ["adamw-8bit", "adamw-bf16-sr-8bit", "adamw-bf16-master-8bit",
                                  "sgd-momentum-bf16-master-8bit", "adamw-bf16-sr"])
def test_skipped_step_with_stats_touches_nothing(name):
    """A NaN gradient under nonfinite="skip" with statistics: nothing moves (parameters,
    masters, codes, scales) and the update statistics are zero (no update ran), as the
    kernels leave them."""
    cls, kw, dtype = CONFIGS[name]
    kw = {**kw, "max_grad_norm": 1.0, "stats": True, "nonfinite": "skip"}
    grads = _grads(SHAPES, 5, 3, bad_at=2)
    opt, params, a = _run("cpu", cls, kw, SHAPES, dtype, grads)
    _, _, b = _run("reference", cls, kw, SHAPES, dtype, grads)
    _check(a, b)
    assert opt.stats_dict()["skip_count"] == 1
    before, skipped = a[1], a[2]
    for key in before:
        if key not in ("params", "scal", "gstat", "history", "tstat", "ustat", "lr", "clock"):
            assert _bits_equal(before[key], skipped[key]), key
    for x, y in zip(before["params"], skipped["params"]):
        assert _bits_equal(x, y)
    assert not skipped["ustat"].any() and before["ustat"].all()


@pytest.mark.parametrize("name", ["adamw-bf16-master-8bit", "adamw-bf16-sr-8bit"])
def test_grad_scaler(name):
    cls, kw, dtype = CONFIGS[name]
    scaler = [(1024.0, 0.0), (0.5, 0.0), (2048.0, 1.0), (8.0, 0.0), (8.0, 0.0)]
    a, b = _both(cls, {**kw, "max_grad_norm": 1.0, "stats": True}, SHAPES, dtype,
                 len(scaler), 4, scaler=scaler)
    _check(a, b)


@pytest.mark.parametrize("name", ["adamw-8bit", "adamw-bf16-sr-8bit", "adamw-bf16-master-8bit",
                                  "sgd-nesterov-bf16-sr-8bit", "adamw-bf16",
                                  "adam-l2-maximize-fp16"])
def test_one_and_two_threads_bit_identical(name):
    cls, kw, dtype = CONFIGS[name]
    kw = {**kw, "max_grad_norm": 1.0, "stats": True, "history": 2}
    shapes = [(3 * BLK + 11,), (300, 70), (7,), (), (5 * BLK + 256,)]
    grads = _grads(shapes, 4, 6, scale=10.0)
    for extra in (dict(), dict(allora_eta=2.0, allora_unit="column"),
                  dict(allora_eta=2.0, allora_unit="row")):
        _, _, one = _run("cpu", cls, {**kw, **extra}, shapes, dtype, grads, nthreads=1)
        _, _, two = _run("cpu", cls, {**kw, **extra}, shapes, dtype, grads, nthreads=2)
        for x, y in zip(one, two):
            for key in x:
                xs, ys = (x[key], y[key]) if key == "params" else ([x[key]], [y[key]])
                for u, v in zip(xs, ys):
                    assert u is None or _bits_equal(u, v), key


def test_8bit_nonfinite_state_is_nan_as_lowp():
    """nonfinite="ignore": an inf gradient reaches the states; its block's scale turns NaN and
    its codes 0 (sign bits kept), as _lowp.quantize, on both backends."""
    cls, kw, dtype = CONFIGS["adamw-8bit"]
    grads = _grads([(700,)], 3, 2)
    grads[1][0][300] = float("inf")
    _, _, a = _run("cpu", cls, {**kw, "nonfinite": "ignore"}, [(700,)], dtype, grads)
    _, _, b = _run("reference", cls, {**kw, "nonfinite": "ignore"}, [(700,)], dtype, grads)
    _check(a, b)
    assert torch.isnan(a[1]["0.exp_avg_scale"][1])


# -- errors ---------------------------------------------------------------------------------------

def _table(**cols):
    """A one-row tensors table of a float32 parameter of 300 elements, float32 states."""
    keep = {k: torch.zeros(300) for k in ("p", "g", "m", "v")}
    keep["step"] = torch.ones(1)
    row = [0] * L.T_COLS
    row[L.T_P], row[L.T_G] = keep["p"].data_ptr(), keep["g"].data_ptr()
    row[L.T_S1], row[L.T_S2] = keep["m"].data_ptr(), keep["v"].data_ptr()
    row[L.T_STEP], row[L.T_NUMEL] = keep["step"].data_ptr(), 300
    for k, v in cols.items():
        row[getattr(L, k)] = v
    return torch.tensor([row], dtype=torch.int64), keep


@pytest.mark.parametrize("cols, words", [
    (dict(T_SDTYPE=9), "unknown state storage"),
    (dict(T_MODE=4), "unknown mode"),
    (dict(T_MODE=L.MODE_MASTER), "without a master"),
    (dict(T_MODE=L.MODE_SR), "not bfloat16"),
    (dict(T_SDTYPE=L.STATE_8BIT), "without their scales"),
])
def test_bad_rows_are_refused(cols, words):
    tensors, keep = _table(**cols)
    scal = torch.zeros((1, L.S_COLS))
    scal[0, L.S_ACTIVE] = 1.0
    ustat = torch.zeros((1, L.US_COLS), dtype=torch.float64)
    dtypes = torch.zeros(1, dtype=torch.int64)
    uoff = torch.full((1,), -1, dtype=torch.int64)
    usums = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=words):
        _cpu.ext().update(L.KIND_ADAM, tensors.data_ptr(), dtypes.data_ptr(), 1,
                          scal.data_ptr(), 0, ustat.data_ptr(), uoff.data_ptr(),
                          usums.data_ptr(), 0, 0, 1)
    assert not keep["p"].any()


@pytest.mark.parametrize("name", ["adamw-bf16-sr-8bit", "sgd-momentum-bf16-master-8bit"])
def test_runs_on_the_extension(name, monkeypatch):
    """backend="cpu" with low-precision options runs the compiled update, not the reference
    (the host falls back to it for an extension without them: _cpu.SUPPORTS_LOWP)."""
    def refuse(*a, **k):
        raise AssertionError("the reference update ran")

    monkeypatch.setattr(_reference, "adam_update", refuse)
    monkeypatch.setattr(_reference, "sgd_update", refuse)
    cls, kw, dtype = CONFIGS[name]
    _run("cpu", cls, kw, SHAPES, dtype, _grads(SHAPES, 2, 0))


def _plan(p, states, lowp, **cols):
    row = [0] * L.T_COLS
    for k, v in cols.items():
        row[getattr(L, k)] = v
    return SimpleNamespace(params=[p], local_params=[p], states=[tuple(states)], lowp=[lowp],
                           host_rows=[row])


def test_host_tables_checked_against_the_tensors():
    """The storage the table promises against the tensors the plan holds (the extension reads
    raw addresses): each disagreement is a ValueError naming the parameter."""
    p = torch.zeros(300, dtype=torch.bfloat16)
    f32 = [torch.zeros(300), torch.zeros(300), None]
    _cpu._check_lowp(_plan(p, f32, LowP(L.STATE_F32), T_SDTYPE=L.STATE_F32))  # fine
    with pytest.raises(ValueError, match="states stored as code"):
        _cpu._check_lowp(_plan(p, f32, None, T_SDTYPE=L.STATE_BF16))
    with pytest.raises(ValueError, match="one storage per tensor"):
        _cpu._check_lowp(_plan(p, [torch.zeros(300), p.clone(), None], None))
    with pytest.raises(ValueError, match="stochastic rounding needs bfloat16"):
        _cpu._check_lowp(_plan(p.half(), f32, LowP(L.STATE_F32, L.MODE_SR)))
    with pytest.raises(ValueError, match="master copy must be float32"):
        _cpu._check_lowp(_plan(p, f32, LowP(L.STATE_F32, L.MODE_MASTER,
                                            torch.zeros(300, dtype=torch.float64))))
    codes = [torch.zeros(300, dtype=torch.uint8)] * 2 + [None]
    with pytest.raises(ValueError, match="scales"):
        _cpu._check_lowp(_plan(p, codes, LowP(L.STATE_8BIT, scales=(torch.zeros(1), None)),
                               T_SDTYPE=L.STATE_8BIT))
    _cpu._check_lowp(_plan(p, codes, LowP(L.STATE_8BIT, scales=(torch.zeros(2),) * 2),
                           T_SDTYPE=L.STATE_8BIT))
