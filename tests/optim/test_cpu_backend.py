"""The compiled CPU executor (``backend="cpu"``, ``fastsched._cpu_ext``) against the reference
backend (the oracle) and torch.optim.

* the optimizer matrix of test_optim_parity (every configuration, every dtype) against torch;
* parity with the reference backend over many steps for every option combination (clipping,
  statistics, guard with a non-finite gradient, GradScaler, ALLoRA row / column / tensor units
  short and long, history), awkward shapes and every storage dtype, float64 included: the
  parameters, the states, every statistics buffer, the step counters and the clock;
* results bit for bit the same with 1 and 2 threads and from run to run;
* the fallback to the reference backend and the error messages.

Tolerances: ``fastsched.testing.TOLERANCES`` of the storage dtype (float64 parameters step in
float64 on both CPU backends, as in torch.optim). The compiled backend rounds sqrt
and division correctly, as the Triton kernels; torch's CPU sqrt (used by the reference) is off
by one ulp for some inputs, so float32 results are close, not identical.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from optim_cases import CASES, DTYPE_IDS, DTYPES, awkward_inputs, one_thread  # noqa: F401
from test_optim_parity import STEPS, check_parity, ours_run, rounded

import fastsched
from fastsched.optim import _cpu, _tables
from fastsched.schedules import Cosine
from fastsched.testing import TOLERANCES

pytestmark = [pytest.mark.skipif(not _cpu.available() and os.environ.get("FASTSCHED_NO_EXT")
                                != "1", reason=f"compiled CPU backend: {_cpu.reason()}"),
              # (ALLoRA groups asked for 8-bit states keep float32, as the warning says)
              pytest.mark.filterwarnings("ignore:state_dtype='8bit'.*ALLoRA")]
needs_ext = pytest.mark.skipif(not _cpu.available(), reason=f"no compiled CPU backend: "
                                                            f"{_cpu.reason()}")

BLK = 8192  # the extension's block (checked below): tensors larger than one block


@pytest.fixture
def float64_tables(monkeypatch):
    """float64 parameters through the table builder (its dtype list may not have them yet)."""
    if torch.float64 not in _tables._DTYPES:
        monkeypatch.setattr(_tables, "_DTYPES", _tables._DTYPES + (torch.float64,))


# -- the optimizer matrix of test_optim_parity, on the compiled backend ---------------------------

@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_backend_matches_torch(case, dtype):
    inputs = rounded(awkward_inputs(STEPS, case.seed + DTYPES.index(dtype)), dtype)
    ours = ours_run(case, inputs, dtype, "cpu")
    check_parity(case, inputs, dtype, ours)


# -- parity with the reference backend ----------------------------------------------------------

SHAPES = [(), (1,), (0,), (7,), (3, 5), (0, 4), (BLK + 3,), (2, BLK + 1), (31, 17), (5, 300)]
MANY = [(k % 7 + 1, k % 5 + 2) for k in range(40)]


def _grads(shapes, steps, seed, *, bad_at=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        gs = [torch.randn(s, generator=gen) * scale for s in shapes]
        if k == bad_at:
            for g in gs:
                if g.numel():
                    g.view(-1)[g.numel() // 2] = float("nan")
                    break
        out.append(gs)
    return out


def _run(backend, cls, kw, shapes, dtype, grads, *, scaler=None, nthreads=None):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = cls(params, backend=backend, schedule=Cosine(total_steps=len(grads) + 5,
                                                       warmup_steps=3), **kw)
    n = torch.get_num_threads()
    if nthreads is not None:
        torch.set_num_threads(nthreads)
    record = []
    try:
        for k, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.to(dtype) * (scaler[k][0] if scaler else 1.0)
            if scaler:
                opt.grad_scale = torch.tensor([scaler[k][0]])
                opt.found_inf = torch.tensor([scaler[k][1]])
            opt.step()
            if scaler:
                del opt.grad_scale, opt.found_inf
            record.append(_snapshot(opt, params))
    finally:
        torch.set_num_threads(n)
    return opt, params, record


def _snapshot(opt, params):
    t = opt.tables()
    snap = {"params": [p.detach().clone() for p in params],
            **{k: t[k].clone() for k in ("clock", "gstat", "lr", "history", "tstat", "scal")},
            "ustat": t["ustat"].clone() if opt.options.stats else None}
    for i, p in enumerate(params):
        for name, v in opt.state[p].items():
            snap[f"{i}.{name}"] = v.clone()
    return snap


def _close(a, b, what, dtype, slack=1.0, tol_dtype=None):
    tol = dict(TOLERANCES[tol_dtype or dtype])
    tol["atol"] *= slack
    if a is None:
        assert b is None, what
        return
    if a.dtype in (torch.float64, torch.int64) and a.dtype != dtype:  # statistics, counters
        tol = dict(rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_parity(rec_a, rec_b, dtype, slack=1.0, tol_dtype=None):
    for k, (a, b) in enumerate(zip(rec_a, rec_b)):
        assert a.keys() == b.keys()
        for key in a:
            if key == "params":
                for i, (x, y) in enumerate(zip(a[key], b[key])):
                    _close(x, y, f"step {k} param {i}", dtype, slack, tol_dtype)
            else:
                _close(a[key], b[key], f"step {k} {key}", dtype, slack, tol_dtype)


ADAMW = (fastsched.AdamW, dict(lr=1e-2, weight_decay=0.1))
OPTIONS = {
    "adamw": ADAMW,
    "adam-l2-amsgrad-maximize": (fastsched.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True,
                                                      maximize=True)),
    "adamw-beta1-0": (fastsched.AdamW, dict(lr=1e-2, betas=(0.0, 0.99))),
    "sgd": (fastsched.SGD, dict(lr=1e-2)),
    "sgd-momentum-dampening-wd": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.3,
                                                      weight_decay=0.1)),
    "sgd-nesterov-maximize": (fastsched.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True,
                                                  maximize=True)),
}
FEATURES = {
    "plain": dict(),
    "clip-stats-history": dict(max_grad_norm=1.0, stats=True, history=4),
    "stats-ignore": dict(stats=True, nonfinite="ignore"),
}


@needs_ext
@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_reference_every_option(name, features):
    cls, kw = OPTIONS[name]
    kw = {**kw, **FEATURES[features]}
    grads = _grads(SHAPES, 12, 1, scale=3.0)
    _, _, a = _run("cpu", cls, kw, SHAPES, torch.float32, grads)
    _, _, b = _run("reference", cls, kw, SHAPES, torch.float32, grads)
    _assert_parity(a, b, torch.float32)


DTYPES4 = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES4, ids=str)
@pytest.mark.parametrize("name", ["adam-l2-amsgrad-maximize", "sgd-nesterov-maximize"])
def test_matches_reference_every_dtype(name, dtype, float64_tables):
    cls, kw = OPTIONS[name]
    kw = {**kw, "max_grad_norm": 2.0, "stats": True}
    grads = _grads(SHAPES, 8, 2)
    _, _, a = _run("cpu", cls, kw, SHAPES, dtype, grads)
    _, _, b = _run("reference", cls, kw, SHAPES, dtype, grads)
    _assert_parity(a, b, dtype)


@needs_ext
@pytest.mark.parametrize("mode", ["skip", "ignore"])
@pytest.mark.parametrize("name", ["adam-l2-amsgrad-maximize", "sgd-momentum-dampening-wd"])
def test_guard_with_a_nan(name, mode):
    cls, kw = OPTIONS[name]
    kw = {**kw, "max_grad_norm": 1.0, "stats": True, "history": 3, "nonfinite": mode}
    grads = _grads(SHAPES, 6, 3, bad_at=2)
    opt, _, a = _run("cpu", cls, kw, SHAPES, torch.float32, grads)
    _, _, b = _run("reference", cls, kw, SHAPES, torch.float32, grads)
    _assert_parity(a, b, torch.float32)
    if mode == "skip":
        assert opt.stats_dict()["skip_count"] == 1 and int(opt.clock) == 5


@needs_ext
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening-wd"])
def test_grad_scaler(name, clip):
    cls, kw = OPTIONS[name]
    kw = {**kw, "max_grad_norm": clip, "stats": clip is not None}
    scaler = [(1024.0, 0.0), (0.5, 0.0), (2048.0, 1.0), (8.0, 0.0), (8.0, 0.0)]
    grads = _grads(SHAPES, len(scaler), 4)
    opt, _, a = _run("cpu", cls, kw, SHAPES, torch.float32, grads, scaler=scaler)
    _, _, b = _run("reference", cls, kw, SHAPES, torch.float32, grads, scaler=scaler)
    _assert_parity(a, b, torch.float32)
    assert int(opt.clock) == 4


ALLORA_SHAPES = [(), (5,), (3, 8), (4, 16), (6, 17), (40, 2), (64, 300), (3, BLK + 7),
                 (BLK + 5, 2), (0, 3)]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES4, ids=str)
@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening-wd"])
def test_allora_units(name, unit, dtype, float64_tables):
    cls, kw = OPTIONS[name]
    kw = {**kw, "allora_eta": 0.7, "allora_unit": unit, "stats": True}
    low = dtype in (torch.bfloat16, torch.float16)
    # low precision: a few steps from a common state (TOLERANCES): a one-ulp difference of a
    # float16 parameter moves its unit's norm and so every multiplier of the unit next step
    grads = _grads(ALLORA_SHAPES, 3 if low else 6, 5)
    _, _, a = _run("cpu", cls, kw, ALLORA_SHAPES, dtype, grads)
    _, _, b = _run("reference", cls, kw, ALLORA_SHAPES, dtype, grads)
    # the reference sums a unit's squares in float32 (torch's order), this backend in float64:
    # the last bit of a multiplier differs now and then, which moves a low-precision state by
    # one ulp (1.2e-4 at 0.18 in float16) that then decays towards 0 (measured: 1.1e-4 at
    # 8e-4, against the 1e-4 of TOLERANCES): twice the absolute floor there
    # float64: the multiplier is float32 for every dtype (the step around it float64), and its
    # last bit may differ as above: float32 tolerances
    _assert_parity(a, b, dtype, slack=2.0 if low else 1.0,
                   tol_dtype=torch.float32 if dtype == torch.float64 else None)


#: rows the update sums beside the update of the row before them (``unit_pipe`` in
#: setup_ext/cpu_ext.cpp, rows of at least 1024): one per block (5632, the chain goes on from
#: block to block), four per block (2048), an odd length (1031), the shortest (1024)
LONG_ROWS = [(3, 5632), (9, 2048), (5, 1031), (2, 1024), (1, 1500), (7,)]


#: (dtype, mode): every dtype plain; bf16 also with fp32 masters and stochastic rounding
LONG_ROW_MODES = [(d, "plain") for d in DTYPES4] + [(torch.bfloat16, m) for m in ("master", "sr")]


@needs_ext
@pytest.mark.parametrize(("dtype", "mode"), LONG_ROW_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening-wd"])
def test_allora_long_rows_summed_beside_the_update(name, dtype, mode, float64_tables):
    """Long row units summed a piece at a time beside the update of the row before: the bits of
    the sums read alone (the extension's unit_pipe(False)), with 1 and 2 threads, and the
    reference's results to its tolerances; bf16 also with fp32 master weights (the sums read
    the masters) and stochastic rounding."""
    cls, kw = OPTIONS[name]
    kw = {**kw, "allora_eta": 0.7, "allora_unit": "row", "stats": True, "max_grad_norm": 1.0,
          **({"master_weights": True} if mode == "master" else {}),
          **({"stochastic_rounding": True, "seed": 3} if mode == "sr" else {})}
    grads = _grads(LONG_ROWS, 4, 8)
    ext = _cpu.ext()
    was = ext.unit_pipe(False)
    try:
        _, _, alone = _run("cpu", cls, kw, LONG_ROWS, dtype, grads, nthreads=1)
        ext.unit_pipe(True)
        _, _, one = _run("cpu", cls, kw, LONG_ROWS, dtype, grads, nthreads=1)
        _, _, two = _run("cpu", cls, kw, LONG_ROWS, dtype, grads, nthreads=2)
    finally:
        ext.unit_pipe(was)
    _bitwise(alone, one)
    _bitwise(one, two)
    _, _, ref = _run("reference", cls, kw, LONG_ROWS, dtype, grads)
    low = dtype in (torch.bfloat16, torch.float16)
    _assert_parity(one, ref, dtype, slack=2.0 if low else 1.0,
                   tol_dtype=torch.float32 if dtype == torch.float64 else None)


@needs_ext
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_allora_long_rows_of_bf16_with_float32_states(sr):
    """bf16 parameters with float32 states (state_dtype=torch.float32) step through the fused
    loop, which sums the next row beside its update (SideSum): the bits of the sums read alone
    (unit_pipe(False)), with 1 and 2 threads."""
    kw = {"lr": 1e-2, "weight_decay": 0.1, "allora_eta": 0.7, "allora_unit": "row",
          "state_dtype": torch.float32, "stats": True, "max_grad_norm": 1.0,
          **({"stochastic_rounding": True, "seed": 3} if sr else {})}
    grads = _grads(LONG_ROWS, 4, 9)
    ext = _cpu.ext()
    was = ext.unit_pipe(False)
    try:
        _, _, alone = _run("cpu", fastsched.AdamW, kw, LONG_ROWS, torch.bfloat16, grads,
                           nthreads=1)
        ext.unit_pipe(True)
        _, _, one = _run("cpu", fastsched.AdamW, kw, LONG_ROWS, torch.bfloat16, grads,
                         nthreads=1)
        _, _, two = _run("cpu", fastsched.AdamW, kw, LONG_ROWS, torch.bfloat16, grads,
                         nthreads=2)
    finally:
        ext.unit_pipe(was)
    _bitwise(alone, one)
    _bitwise(one, two)


@needs_ext
def test_many_tensors_and_groups():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MANY]
    results = []
    for backend in ("cpu", "reference"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        groups = [dict(params=ps[:10]), dict(params=ps[10:25], lr=3e-3, weight_decay=0.0),
                  dict(params=ps[25:], betas=(0.8, 0.95), allora_eta=1.0)]
        opt = fastsched.AdamW(groups, lr=1e-2, weight_decay=0.1, backend=backend,
                              max_grad_norm=0.5, stats=True)
        g2 = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g2)
            opt.step()
        results.append((ps, opt.stats_dict()))
    (a, sa), (b, sb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOLERANCES[torch.float32])
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-12)
    assert sa["lr"] == pytest.approx(sb["lr"], rel=1e-12)


# -- determinism ---------------------------------------------------------------------------------

def _bitwise(rec_a, rec_b):
    for a, b in zip(rec_a, rec_b):
        for key in a:
            xs, ys = (a[key], b[key]) if key == "params" else ([a[key]], [b[key]])
            for x, y in zip(xs, ys):
                if x is not None:  # bits: nan == nan
                    x, y = x.reshape(-1), y.reshape(-1)
                    assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["adam-l2-amsgrad-maximize", "sgd-nesterov-maximize"])
def test_one_and_two_threads_bit_identical(name, dtype):
    cls, kw = OPTIONS[name]
    kw = {**kw, "max_grad_norm": 1.0, "stats": True, "history": 2, "allora_eta": 2.0,
          "allora_unit": "column"}
    shapes = [(3 * BLK + 11,), (300, 70), (7,), ()]
    grads = _grads(shapes, 4, 6, scale=10.0)
    _, _, one = _run("cpu", cls, kw, shapes, dtype, grads, nthreads=1)
    _, _, two = _run("cpu", cls, kw, shapes, dtype, grads, nthreads=2)
    _, _, again = _run("cpu", cls, kw, shapes, dtype, grads, nthreads=2)
    _bitwise(one, two)
    _bitwise(two, again)


#: configurations whose passes run through the ranges of blocks the threads take in turn
RANGE_CASES = {
    "adamw-fp32": ("adamw", torch.float32, {}),
    "adamw-bf16": ("adamw", torch.bfloat16, {}),
    "adamw-bf16-sr-8bit": ("adamw", torch.bfloat16,
                           {"stochastic_rounding": True, "seed": 5, "state_dtype": "8bit"}),
    "sgd-fp32": ("sgd-momentum-dampening-wd", torch.float32, {}),
}


@needs_ext
@pytest.mark.parametrize("unit", [None, "row", "column"], ids=lambda u: u or "plain")
@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_thread_ranges_do_not_change_the_bits(case, unit):
    """The threads of the statistics and update passes take the blocks in ranges of
    ``chunk_blocks`` (16) from a shared counter: ranges of 1 and 3 blocks on 2 threads (a
    boundary at every block or every third: the chains of ALLoRA row sums cut there, the two
    runs of the statistics pass side by side in short ranges) give the bits of one thread's
    single range."""
    name, dtype, extra = RANGE_CASES[case]
    cls, kw = OPTIONS[name]
    kw = {**kw, **extra, "max_grad_norm": 1.0, "stats": True,
          **({"allora_eta": 0.7, "allora_unit": unit} if unit else {})}
    shapes = LONG_ROWS + [(3 * BLK + 11,), (300, 70), (2 * BLK + 256,), ()]
    grads = _grads(shapes, 3, 10, scale=3.0)
    ext = _cpu.ext()
    _, _, one = _run("cpu", cls, kw, shapes, dtype, grads, nthreads=1)
    was = ext.chunk_blocks(0)
    try:
        for n in (1, 3):
            assert ext.chunk_blocks(n) in (was, 1)
            _, _, two = _run("cpu", cls, kw, shapes, dtype, grads, nthreads=2)
            _bitwise(one, two)
    finally:
        ext.chunk_blocks(was)
    assert ext.chunk_blocks(0) == was == 16


@needs_ext
def test_chunk_blocks_rejects_a_negative_count():
    with pytest.raises(ValueError, match="chunk_blocks: n must be >= 1"):
        _cpu.ext().chunk_blocks(-1)


def _lane_model(x: torch.Tensor, guard: bool) -> tuple[float, float, float]:
    """A tensor's (sum g^2, sum |g|, non-finite count) as the extension defines them, in numpy
    float64: per block of BLK elements, element i to lane i % 16, each lane summed from +0 in
    element order, the 16 lanes added in lane order, the blocks in block order."""
    import numpy as np

    flat = x.detach().reshape(-1).to(torch.float64).numpy()
    out = [0.0, 0.0, 0.0]
    for b0 in range(0, flat.size, BLK):
        blk = flat[b0:b0 + BLK]
        pad = np.zeros(-(-blk.size // 16) * 16)
        pad[:blk.size] = blk
        lanes = pad.reshape(-1, 16)
        fin = np.isfinite(lanes)
        ok = np.where(fin, lanes, 0.0) if guard else lanes
        with np.errstate(invalid="ignore", over="ignore"):
            sq = np.cumsum(ok * ok, axis=0)[-1]  # cumsum: strictly in element order
            ab = np.cumsum(np.abs(ok), axis=0)[-1]
        nf = np.cumsum(~fin, axis=0)[-1].astype(np.float64)
        for k, lane in enumerate((sq, ab, nf)):
            s = 0.0
            for j in range(16):
                s += float(lane[j])
            out[k] += s
    return out[0], out[1], out[2]


@needs_ext
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "noguard"])
def test_statistics_pass_bits_of_the_lane_order(nthreads, guard):
    """The statistics pass reads two runs of blocks side by side on each thread (a thread's
    blocks paired differently with 1, 2 or 3 threads): every tensor's sums are still those of
    its blocks summed alone, bit for bit against a numpy model of the lane order; tensors of
    four dtypes and awkward lengths, a block with an inf and a NaN."""
    L = fastsched.kernels.layout
    gen = torch.Generator().manual_seed(11)
    specs = [((3 * BLK + 11,), torch.float32), ((BLK + 5,), torch.bfloat16), ((7,), torch.float32),
             ((2 * BLK,), torch.float16), ((2, BLK + 9), torch.float32), ((), torch.float32),
             ((BLK + 3,), torch.float64), ((5 * BLK - 1,), torch.float32), ((33,), torch.bfloat16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in specs]
    for k, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** (k % 3 - 1)).to(p.dtype)
    bad = params[4].grad.view(-1)
    bad[BLK + 100], bad[BLK + 777] = float("inf"), float("nan")
    opt = fastsched.AdamW(params, lr=1e-3, backend="cpu", stats=True,
                          nonfinite="skip" if guard else "ignore")
    n = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        opt.step()
    finally:
        torch.set_num_threads(n)
    ts = opt.tables()["tstat"]
    names = opt.stats_names()
    for i, p in enumerate(params):
        row = names.index(f"group0.param{i}")
        want = _lane_model(p.grad, guard)
        got = tuple(float(ts[row, c]) for c in (L.TS_SQ, L.TS_ABS, L.TS_NONFINITE))
        assert str(got) == str(want), (i, got, want)  # bits (nan == nan)


# -- build, fallback, errors ---------------------------------------------------------------------

@needs_ext
def test_compiled_layout_is_layout_py():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "setup_ext"))
    try:
        import gen_layout
    finally:
        sys.path.pop(0)
    ext = _cpu.ext()
    assert ext.layout() == gen_layout.constants() == _cpu._layout_constants()
    assert ext.block() == BLK
    assert set(ext.dtype_codes()) == {"float32", "bfloat16", "float16", "float64"}


@needs_ext
def test_auto_picks_cpu_on_cpu_tensors():
    p = torch.nn.Parameter(torch.randn(3))
    assert fastsched.AdamW([p]).backend == "cpu"
    assert fastsched.SGD([p], lr=0.1, backend="reference").backend == "reference"


@needs_ext  # (without it backend="cpu" is refused when chosen)
def test_cpu_backend_refuses_other_devices():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    opt = fastsched.AdamW([p], backend="cpu")
    with pytest.raises(ValueError, match="backend='cpu' runs on CPU tensors.*meta"):
        opt.step()


@pytest.fixture
def no_ext(monkeypatch):
    monkeypatch.setattr(_cpu, "_ext", None)
    monkeypatch.setattr(_cpu, "_reason", "the extension fastsched._cpu_ext was not built (test)")
    monkeypatch.setattr(_cpu, "_warned", False)
    monkeypatch.delenv("FASTSCHED_NO_EXT", raising=False)


def test_fallback_warns_once_and_says_how(no_ext):
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for p in ps:
            opt = fastsched.AdamW([p])
            assert opt.backend == "reference"
            for _ in range(2):
                p.grad = torch.randn(4)
                opt.step()
    msgs = [str(x.message) for x in w if "compiled CPU backend" in str(x.message)]
    assert len(msgs) == 1
    assert "not built" in msgs[0] and "pip install -e ." in msgs[0] and "g++" in msgs[0]


def test_without_a_compiler_one_warning_at_the_users_line(tmp_path):
    """No C++ compiler on PATH and no extension: CPU training (step and zero_grad) warns once,
    the fallback's warning, at the line of the user's step() (not torch's wrapper); the host
    helper of step() is not built for the reference backend, so it does not warn too."""
    code = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastsched._cpu_ext":
                    raise ImportError("no extension (test)")
        sys.meta_path.insert(0, Block())
        import torch, fastsched
        model = torch.nn.Linear(8, 2)
        opt = fastsched.AdamW(model.parameters(), lr=1e-3)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()  # the user's line
                opt.zero_grad()
        print(opt.backend, len(w))
        for x in w:
            print(x.filename, x.lineno, str(x.message)[:60])
        """)
    script = tmp_path / "user.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC", "FASTSCHED_NO_EXT",
                                                            "FASTSCHED_HOST_EXT")}
    env.update(PATH=str(tmp_path), FASTSCHED_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "reference 1", out.stdout
    line = 1 + next(i for i, t in enumerate(code.splitlines()) if "the user's line" in t)
    assert lines[1].startswith(f"{script} {line} fastsched: the compiled CPU backend"), lines


def test_cpu_backend_without_the_extension_names_the_reason(no_ext):
    """Refused when it is chosen (the constructor, the setter), not at the first step."""
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"backend='cpu' is not available: .*not built.*g\+\+"):
        fastsched.AdamW([p], backend="cpu")
    opt = fastsched.AdamW([p], backend="reference")
    with pytest.raises(ValueError, match=r"backend='cpu' is not available"):
        opt.backend = "cpu"
    assert opt.backend == "reference"


def test_cpu_backend_turned_off_says_how_to_turn_it_on(monkeypatch):
    monkeypatch.setattr(_cpu, "_ext", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.setenv("FASTSCHED_NO_EXT", "1")
    with pytest.raises(ValueError, match=r"turned off by FASTSCHED_NO_EXT=1; unset "
                                         r"FASTSCHED_NO_EXT, or use backend='reference'"):
        fastsched.SGD([torch.nn.Parameter(torch.randn(4))], lr=0.1, backend="cpu")


def test_stale_build_is_refused(monkeypatch):
    class Stale:
        def __getattr__(self, name):
            return lambda *a: None

        @staticmethod
        def layout():
            return {**_cpu._layout_constants(), "T_COLS": 99}

    monkeypatch.setattr(_cpu, "_ext", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.delenv("FASTSCHED_NO_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "fastsched._cpu_ext", Stale())
    monkeypatch.setattr(fastsched, "_cpu_ext", Stale(), raising=False)
    assert not _cpu.available()
    assert "T_COLS" in _cpu.reason() and "rebuild" in _cpu.reason()


def test_no_ext_env_turns_it_off_silently():
    code = ("import warnings, torch, fastsched\n"
            "warnings.simplefilter('error')\n"
            "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)\n"
            "o = fastsched.AdamW([p]); o.step(); print(o.backend)\n")
    env = {**os.environ, "FASTSCHED_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


@needs_ext
def test_float64_refused_on_triton(float64_tables):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"params\[0\].*float64.*Triton"):
        fastsched.AdamW([p], backend="triton")


@needs_ext
@pytest.mark.parametrize("momentum, dampening, nesterov", [
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("scaled", ["none", "maximize", "clip", "allora-update"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bf16_sgd_loop_variants_bit_for_bit(scaled, momentum, dampening, nesterov, dtype):
    """The 16-bit SGD loop (bf16; fp16 through F16C's conversions) is compiled once per
    combination of its options (momentum, gradient multiplier, step multiplier, dampening,
    nesterov): each one equals the reference bit for bit (SGD has no square root; both round
    the same float32 operations to nearest even; ALLoRA's unit sums in float64 on both sides,
    in the same order), with special values in the parameters and gradients: -0, subnormals,
    a NaN and an infinity (ignored by the guard), over 6 steps; NaN payloads aside."""
    kw = dict(lr=0.5, momentum=momentum, dampening=dampening, nesterov=nesterov,
              weight_decay=0.1, nonfinite="ignore")
    if scaled == "maximize":
        kw["maximize"] = True
    elif scaled == "clip":
        kw["max_grad_norm"] = 0.5
    elif scaled == "allora-update":
        kw.update(allora_eta=0.7, allora_unit="tensor", allora_apply="update")
    shapes = [(1000,), (3, 129), (64,), (7,)]
    tiny = torch.finfo(dtype).tiny
    runs = []
    for backend in ("cpu", "reference"):
        gen = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
                  for s in shapes]
        with torch.no_grad():
            params[0][:4] = torch.tensor([-0.0, tiny / 4, -tiny / 2, float("inf")])
        opt = fastsched.SGD(params, backend=backend, **kw)
        gen = torch.Generator().manual_seed(12)
        out = []
        for k in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            params[1].grad[0, :3] = torch.tensor([-0.0, tiny / 8, float("nan") if k == 2 else 1])
            opt.step()
            out.append([t.detach().clone() for p in params
                        for t in (p, opt.state[p].get("momentum_buffer"))
                        if t is not None])
        runs.append(out)
    for k, (a, b) in enumerate(zip(*runs)):
        for i, (x, y) in enumerate(zip(a, b)):  # NaN payloads aside (torch's are its own)
            assert torch.equal(x.isnan(), y.isnan()), (k, i)
            keep = ~x.isnan()
            assert torch.equal(x[keep].view(torch.int16), y[keep].view(torch.int16)), (k, i)
    assert runs[0][-1][0].isnan().any()  # the infinity and the NaN went through


F64_TORCH = {
    "adamw": (fastsched.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-l2-amsgrad-maximize": (fastsched.Adam, torch.optim.Adam,
                                 dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    "adamw-beta1-0": (fastsched.AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.0, 0.99))),
    "sgd-momentum-dampening-wd": (fastsched.SGD, torch.optim.SGD,
                                  dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    "sgd-nesterov-maximize": (fastsched.SGD, torch.optim.SGD,
                              dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True)),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", list(F64_TORCH))
def test_float64_steps_in_float64_as_torch(name, backend):
    """float64 parameters step in float64, as torch.optim: parameters and states within
    TOLERANCES[float64] (rtol 1e-12) of torch's for-loop step over 20 steps of float64
    gradients (float32 arithmetic is ~1e-7 off); clipping and statistics on."""
    if backend == "cpu" and not _cpu.available():
        pytest.skip(f"no compiled CPU backend: {_cpu.reason()}")
    ours_cls, torch_cls, kw = F64_TORCH[name]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ours = ours_cls(a, backend=backend, stats=True, **kw)
    ref = torch_cls(b, foreach=False, **kw)
    for _ in range(20):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x.grad, y.grad = g, g.clone()
        ours.step()
        ref.step()
    tol = TOLERANCES[torch.float64]
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, y, **tol, msg=lambda m, i=i: f"param {i}: {m}")
        for k, v in ref.state[y].items():
            if k != "step":
                assert ours.state[x][k].dtype == torch.float64, k
                torch.testing.assert_close(ours.state[x][k], v, **tol,
                                           msg=lambda m, k=k, i=i: f"param {i} {k}: {m}")
    upd = ours.stats_dict()["tensors"]
    assert all(t["update_rms"] is not None for t in upd.values())


def test_float64_checkpoint_of_an_earlier_version_warns():
    """A fastsched checkpoint with float64 states and without the float64 marker (saved when
    float64 parameters stepped in float32) warns that the arithmetic changed; this version's
    (of a float64 or a float32 model) and torch's load silently."""
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = fastsched.AdamW([p], backend="reference")
    p.grad = torch.randn(4, dtype=torch.float64)
    opt.step()
    sd = opt.state_dict()
    assert sd["fastsched"]["float64_arithmetic"] == "float64"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsched.AdamW([p], backend="reference").load_state_dict(sd)
        q = torch.nn.Parameter(p.detach().clone())
        t = torch.optim.AdamW([q])
        q.grad = p.grad.clone()
        t.step()
        fastsched.AdamW([p], backend="reference").load_state_dict(t.state_dict())
    old = {**sd, "fastsched": {k: v for k, v in sd["fastsched"].items()
                               if k != "float64_arithmetic"}}
    with pytest.warns(UserWarning, match="float64 parameters in float32 arithmetic"):
        fastsched.AdamW([p], backend="reference").load_state_dict(old)
    # this version's checkpoint of a float32 model, loaded after model.double(): no warning
    f = torch.nn.Parameter(torch.randn(4))
    of = fastsched.AdamW([f], backend="reference")
    f.grad = torch.randn(4)
    of.step()
    sf = of.state_dict()
    assert sf["fastsched"]["float64_arithmetic"] == "float64"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsched.AdamW([p], backend="reference").load_state_dict(sf)


@needs_ext
def test_stream_kernel():
    t = [torch.arange(10, dtype=torch.int32) + 10 * k for k in range(4)]
    p, g, m, v = (x.clone() for x in t)
    _cpu.ext().stream(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 10, 2)
    assert torch.equal(p, t[2]) and torch.equal(m, t[3]) and torch.equal(v, t[0] ^ t[1])


@needs_ext
def test_bias_correction_division_has_the_dividers_bits():
    """The Adam loop divides sqrt(v) by sqrt(1 - beta2^t) with a multiply and two fma
    (Markstein's correction, div_by16 in setup_ext/kernels.h; builds without AVX-512 divide):
    float32 division's bits for the bias corrections of common beta2 and for random divisors,
    on dividends of every exponent the loop divides (the square root of a float32: 0,
    2^-75 .. 2^64), inf and NaN."""
    gen = torch.Generator().manual_seed(11)
    n = 1 << 16
    sig = torch.randint(0, 1 << 23, (n,), generator=gen, dtype=torch.int32)
    exp = torch.randint(127 - 75, 127 + 65, (n,), generator=gen, dtype=torch.int32)
    a = ((exp << 23) | sig).view(torch.float32)
    a[:4] = torch.tensor([0.0, float("inf"), float("nan"), 3.7e-23])
    divisors = [math.sqrt(1.0 - beta2 ** t) for beta2 in (0.999, 0.99, 0.95, 0.9999)
                for t in (1, 2, 3, 10, 77, 1000, 5000)]
    divisors += (torch.rand(40, generator=gen, dtype=torch.float64) * 0.999 + 1e-3).tolist()
    ext = _cpu.ext()
    out = torch.empty_like(a)
    for b in divisors:
        b32 = torch.tensor(b, dtype=torch.float32)
        bf = b32.item()
        ext.div_by(a.data_ptr(), bf, n, out.data_ptr())
        torch.testing.assert_close(out, a / b32.expand(n), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, bf=bf: f"b = {bf!r}: {m}")
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"b must be a float32 in \(0, 1\]"):
            ext.div_by(a.data_ptr(), bad, n, out.data_ptr())


def test_software_fp16_conversions_equal_the_compilers(tmp_path):
    """Compilers without _Float16 in C++ (GCC 11, Ubuntu 22.04's default: the extension did
    not build there) store fp16 as 16-bit words converted by setup_ext/kernels.h
    (FS_SOFT_HALF): setup_ext/check_half.cpp compares them with the compiler's _Float16 on
    every binary16 value, every float32 whose binary16 is subnormal or about to overflow,
    every rounding boundary of every exponent, inf and NaN. Needs g++ >= 12 or clang >= 15 on
    x86-64 (the reference); ``check_half all`` checks all 2^32 float32."""
    import shutil

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
    sys.path.insert(0, os.path.join(root, "setup_ext"))
    try:
        import gen_layout
    finally:
        sys.path.pop(0)
    gen_layout.write(str(tmp_path / "layout.h"))
    exe = tmp_path / "check_half"
    # F16C (every AVX2 CPU has it) where the CPU has it: the reference conversions are then
    # instructions (0.8 s to run), not libgcc's calls (20 s)
    arch = ["-mf16c"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    build = subprocess.run([cxx, "-O2", "-std=c++17", *arch, f"-I{root}/setup_ext",
                            f"-I{tmp_path}", f"{root}/setup_ext/check_half.cpp", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    if run.returncode == 2:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-2000:]
    assert "mismatched 0" in run.stdout


@needs_ext
@pytest.mark.parametrize("kw, passes", [
    ({}, ["fastsched::finalize", "fastsched::update"]),
    ({"max_grad_norm": 1.0, "stats": True},
     ["fastsched::grad_stats", "fastsched::finalize", "fastsched::update"]),
])
def test_profiler_sees_the_passes(monkeypatch, kw, passes):
    """Each pass is a fastsched::<pass> range under a profiler, and no range object is made
    without one (a normal step pays nothing; torch's Optimizer.step makes its own range)."""
    p = torch.nn.Parameter(torch.randn(BLK + 5))
    p.grad = torch.randn(BLK + 5)
    opt = fastsched.AdamW([p], backend="cpu", **kw)
    opt.step()
    made = []
    real = torch.autograd.profiler.record_function
    monkeypatch.setattr(torch.autograd.profiler, "record_function",
                        lambda name, *a: (name.startswith("fastsched::") and made.append(name))
                        or real(name, *a))
    opt.step()
    assert made == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert made == passes
    names = [e.name for e in prof.events() if e.name.startswith("fastsched::")]
    assert names == passes


def test_reference_bias_corrections_use_the_c_librarys_pow():
    """The reference's beta ** step (float64, one per tensor) is the C library's pow, as the
    executor's std::pow: torch's vectorised pow (8 elements or more) differs in the last bit
    for these pairs on an AVX-512 Xeon (and for ~0.3% of random ones)."""
    from fastsched.optim._reference import _pow

    pairs = [(0.999, 7333), (0.9999, 14582), (0.999, 38143), (0.9999, 27119), (0.98, 11292),
             (0.99, 36559), (0.99, 19101), (0.999, 25030), (0.99, 22858), (0.999, 40030),
             (0.95, 12704), (0.999, 9614), (0.995, 33942), (0.99, 18905), (0.98, 25679),
             (0.99, 36), (0.98, 73), (0.995, 1568)]
    g = torch.Generator().manual_seed(7)
    b = torch.cat([torch.tensor([x for x, _ in pairs], dtype=torch.float64),
                   1 - torch.rand(4000, generator=g, dtype=torch.float64) * 0.1])
    e = torch.cat([torch.tensor([float(n) for _, n in pairs], dtype=torch.float64),
                   torch.randint(1, 10**6, (4000,), generator=g).double()])
    want = [math.pow(x, y) for x, y in zip(b.tolist(), e.tolist())]
    assert _pow(b, e).tolist() == want


@needs_ext
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_stochastic_rounding_of_nan_in_the_fused_loop(state_dtype):
    """NaN gradients under nonfinite="ignore": the NaN parameters of the fused stochastic
    rounding store are the quiet NaN 0x7FC0 (its rare path), the rest as the reference's."""
    out = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4099).bfloat16())
        opt = fastsched.AdamW([p], lr=1e-2, backend=backend, stochastic_rounding=True,
                              state_dtype=state_dtype, nonfinite="ignore", min_8bit_size=0)
        for t in range(3):
            g = torch.randn(4099)
            if t == 1:
                g[[3, 17, 18, 300, 4098]] = float("nan")
            p.grad = g.bfloat16()
            opt.step()
        out[backend] = p.detach().view(torch.int16).clone()
    nan = torch.isnan(out["cpu"].view(torch.bfloat16))
    assert int(nan.sum()) >= 5 and bool((out["cpu"][nan] == 0x7FC0).all())
    assert torch.equal(out["cpu"], out["reference"])


@needs_ext
def test_schedules_give_the_references_learning_rates_bit_for_bit():
    """The executor's schedule evaluation (C++ ``schedule_value``) and the reference's
    (``evaluate_table``) are two implementations of the segment table: the applied learning
    rates (float64) of every step equal, warmups, restarts and decays included."""
    from fastsched import schedules as S

    scheds = [S.Cosine(total_steps=150, warmup_steps=20), S.CosineRestarts(period=70),
              S.Exponential(gamma=0.97), S.InverseSqrt(warmup_steps=30),
              S.WSD(total_steps=150, warmup_steps=10, decay_steps=60),
              S.OneCycle(total_steps=150), S.Polynomial(total_steps=150, power=2.0)]
    for sch in scheds:
        lrs = {}
        for backend in ("reference", "cpu"):
            p = torch.nn.Parameter(torch.ones(3))
            opt = fastsched.AdamW([p], lr=1e-3, backend=backend, schedule=sch)
            seen = []
            for _ in range(160):
                p.grad = torch.ones(3)
                opt.step()
                seen.append(opt.tables()["lr"].clone())
            lrs[backend] = torch.stack(seen)
        assert torch.equal(lrs["cpu"], lrs["reference"]), sch
