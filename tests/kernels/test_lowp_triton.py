"""Below fp32 in the Triton kernels: bit for bit with ``fastsched.optim._lowp`` (the definition).

Three levels, each under the interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``) or on a
GPU when there is one:

* the codec pieces of ``fastsched.kernels.optim`` (8-bit encode / decode, fmix32, the generator,
  bf16 stochastic rounding) in small test kernels against ``_lowp``;
* the update kernels driven directly (hand-built tables; every STATE_* storage and MODE_*) against
  a PyTorch transcription of the update that uses ``_lowp`` for the codec;
* the optimizers, ``backend="triton"`` against ``backend="reference"`` (skipped until the host
  side has the options).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from fastsched.kernels import layout as L
from fastsched.kernels import optim as ko

from fastsched.optim import _lowp

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_M32 = 0xFFFFFFFF


def _bits32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & _M32


# -- the codec pieces -----------------------------------------------------------------------------

@triton.jit
def _decode_kernel(codes_ptr, scale_ptr, out_ptr, SIGNED: tl.constexpr):
    r = tl.arange(0, 1)
    c = tl.arange(0, 256)
    codes = tl.load(codes_ptr + r[:, None] * 256 + c[None, :])
    s = tl.load(scale_ptr + r)
    tl.store(out_ptr + r[:, None] * 256 + c[None, :], ko._q_decode(codes, s[:, None], SIGNED))


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, scale_ptr, n, ROWS: tl.constexpr, SIGNED: tl.constexpr,
                   MASKED: tl.constexpr):
    r = tl.arange(0, ROWS)
    offs = r[:, None] * 256 + tl.arange(0, 256)[None, :]
    mask = offs < n
    if MASKED:
        x = tl.load(x_ptr + offs, mask=mask, other=float("nan"))  # left out of the absmax
    else:
        x = tl.load(x_ptr + offs)
    codes, scale = ko._q_encode(x, mask, MASKED, SIGNED)
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(scale_ptr + r, scale, mask=r * 256 < n)


@triton.jit
def _fmix_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    h = tl.load(x_ptr + i).to(tl.uint32)
    tl.store(out_ptr + i, ko._fmix32(h).to(tl.int64))


@triton.jit
def _sr_kernel(x_ptr, out_ptr, key, step_ptr, elem0, N: tl.constexpr):
    i = tl.arange(0, N)
    stp = tl.load(step_ptr)
    c = ko._fmix32(key.to(tl.uint32) ^ stp.to(tl.uint32))
    y = ko._sr_bf16(tl.load(x_ptr + i), c, elem0 + i.to(tl.int64))
    tl.store(out_ptr + i, y)


@pytest.mark.parametrize("signed", [True, False])
def test_decode_every_code(signed):
    codes = torch.arange(256, dtype=torch.uint8, device=DEV)
    if not signed:  # unsigned codes: every byte is a magnitude
        codes = codes.clone()
    for scale in (1.0, 3.5e-3, 7.0e20, float("nan"), 0.0):
        s = torch.tensor([scale], dtype=torch.float32, device=DEV)
        out = torch.empty(256, dtype=torch.float32, device=DEV)
        _decode_kernel[(1,)](codes, s, out, SIGNED=signed)
        want = _lowp.dequantize(codes, s, signed)
        assert torch.equal(_bits32(out), _bits32(want)), scale


def _encode(x: torch.Tensor, signed: bool, masked: bool):
    n = x.numel()
    rows = max(1, triton.next_power_of_2(_lowp.n_blocks(n)))
    xs = torch.zeros(rows * 256, dtype=torch.float32, device=DEV)
    xs[:n] = x
    codes = torch.zeros(n, dtype=torch.uint8, device=DEV)
    scale = torch.zeros(_lowp.n_blocks(n), dtype=torch.float32, device=DEV)
    _encode_kernel[(1,)](xs, codes, scale, n, ROWS=rows, SIGNED=signed, MASKED=masked)
    return codes, scale


@pytest.mark.parametrize("signed", [True, False])
def test_encode_every_code_round_trips(signed):
    """Each code's value (scale 1, the top code in the block for absmax Q_TOP) encodes to itself:
    all 256 (signed) or 256 magnitudes (unsigned), subnormals included."""
    codes = torch.arange(256, dtype=torch.uint8, device=DEV)
    vals = _lowp.dequantize(codes, torch.ones(1, device=DEV), signed)
    got, scale = _encode(vals, signed, masked=False)
    want, wscale = _lowp.quantize(vals, signed)
    assert torch.equal(got, want) and torch.equal(_bits32(scale), _bits32(wscale))
    # every code but the duplicate zero (0x80: -0.0 -> 0x00) and the values above Q_TOP
    assert torch.equal(want[:0x78], codes[:0x78]) if signed else True


def _hard_values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    k = torch.randint(0, 8, (n,), generator=g)
    x = torch.where(k == 0, 0.0, x)
    x = torch.where(k == 1, x * 1e-30, x)  # far below the block's absmax: subnormal codes
    return x.to(torch.float32)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 700, 1024])
def test_encode_matches_quantize(signed, n):
    x = _hard_values(n, n)
    if not signed:
        x = x.abs()
    for masked in ([True] if n % 256 else [False, True]):
        got, scale = _encode(x.to(DEV), signed, masked)
        want, wscale = _lowp.quantize(x, signed)
        assert torch.equal(got.cpu(), want), (n, masked)
        assert torch.equal(_bits32(scale.cpu()), _bits32(wscale)), (n, masked)


@pytest.mark.parametrize("signed", [True, False])
def test_encode_edge_blocks(signed):
    """Per block: all zeros; a NaN; an inf; a tiny absmax (Q_TOP / absmax overflows: 0 * inf);
    values at the subnormal / normal boundary; exact ties of the rounding."""
    blocks = [torch.zeros(256), torch.full((256,), -2.0), torch.linspace(-1, 1, 256)]
    b = torch.linspace(-1, 1, 256)
    b[7] = float("nan")
    blocks.append(b)
    b = torch.linspace(-1, 1, 256)
    b[9] = float("-inf")
    blocks.append(b)
    b = torch.zeros(256)
    b[3] = 1e-40  # subnormal absmax: inv = inf, zeros become NaN before the clamp
    b[4] = -5e-41
    blocks.append(b)
    top = 1.875
    q = 2.0 ** (1 - (L.Q_BIAS_SIGNED if signed else L.Q_BIAS_UNSIGNED))
    b = torch.tensor([top] + [q * (1 + k / 64) for k in range(-32, 223)], dtype=torch.float32)
    blocks.append(b)
    mant = torch.tensor([1 + (2 * k + 1) / 16 for k in range(8)])  # halfway between codes
    b = torch.cat([torch.tensor([top]), (mant[None, :] * 2.0 ** -torch.arange(32)[:, None])
                   .reshape(-1)[:255]])
    blocks.append(b)
    x = torch.cat(blocks).to(torch.float32)
    if not signed:
        x = x.abs()
    got, scale = _encode(x.to(DEV), signed, masked=False)
    want, wscale = _lowp.quantize(x, signed)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(_bits32(scale.cpu()), _bits32(wscale))


def test_fmix32_matches():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2**32, (1024,), generator=g, dtype=torch.int64)
    x[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    got = torch.empty(1024, dtype=torch.int64, device=DEV)
    _fmix_kernel[(1,)](x.to(DEV), got, N=1024)
    assert torch.equal(got.cpu() & _M32, _lowp.fmix32(x))
    assert int(_lowp.fmix32(x)[1]) == _lowp.fmix32(1)


@pytest.mark.parametrize("elem0", [0, 12345, 2**32 - 100, 3 * 2**32 + 7])
@pytest.mark.parametrize("step", [1, 2, 1000])
def test_stochastic_round_bf16_matches(elem0, step):
    """Random values and the special ones (NaN, inf, the largest finite, ties, negatives), indices
    crossing 2^32 (elem0 close to it: lo wraps, hi changes within the block)."""
    n = 256
    g = torch.Generator().manual_seed(step)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-30, 30, (n,), generator=g)
    x[:8] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.4028235e38, -0.0, 0.0,
                          1.0 + 2.0 ** -8, -(1.0 + 2.0 ** -8)])
    key = _lowp.sr_key(1234, 5)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    _sr_kernel[(1,)](x.to(DEV), out, key, torch.tensor([float(step)], device=DEV), elem0, N=n)
    want = _lowp.stochastic_round_bf16(x, key, step, elem0)
    assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))


def test_stochastic_round_is_unbiased_in_the_kernel():
    x = torch.full((4096,), 1.0 + 2.0 ** -10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1
    out = torch.empty(4096, dtype=torch.bfloat16, device=DEV)
    _sr_kernel[(1,)](x.to(DEV), out, 77, torch.tensor([3.0], device=DEV), 0, N=4096)
    up = (out.cpu().float() > 1.0).float().mean().item()
    assert abs(up - 0.125) < 0.02


# -- the optimizers: backend="triton" against backend="reference" ---------------------------------

import fastsched  # noqa: E402

#: awkward sizes: 0-d, 1 element, one quantisation block -1 / = / +1, several blocks of the
#: update (block_size 512 and the default 2048) with a partial last one, a matrix, small
#: tensors with partial quantisation blocks of other lengths (8, 29, 50: with the five above,
#: eight tensors of one program each; every tensor costs a program per pass under the
#: interpreter); ``_params`` adds a view one element past an aligned address (the masked path
#: throughout)
SHAPES = [(), (1,), (255,), (256,), (257,), (3000,), (33, 65), (8,), (29,), (50,)]

#: the ALLoRA unit tests (with ``unaligned=299``): these launch the unit kernel only (no flat
#: blocks, so block_size plays no part), whose interpreted cost grows with the chunks of each
#: tile (SHAPES' 3000-element unit: ~7 s of 3 steps on a CPU). Each unit class (lengths <= 16,
#: <= 128, longer: [128, 16], [16, 128], [8, 256] tiles), mostly several to a launch: 0-d,
#: 1 element, 15, 50, 257 and the unaligned 299 (two 256-chunks, a masked last one); a matrix
#: with odd dims whose rows (19) and columns (17) are both of the middle class, over two tiles
#: with a partial last one and, along a column, two sub-tiles of 16 rows
UNIT_SHAPES = [(), (1,), (15,), (50,), (257,), (17, 19)]
#: steps of a comparison (``_run``): the second reads what the first wrote (the states, 8-bit
#: codes and scales, amsgrad's maximum, the masters, the step that keys stochastic rounding);
#: a third repeats the second's paths at half again the interpreter's time
STEPS = 2


def _params(dtype, seed=0, shapes=SHAPES, unaligned=1500):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    base = torch.randn(1 + unaligned, generator=g).to(dtype)
    ps.append(base[1:])  # unaligned storage offset
    return [torch.nn.Parameter(p.to(DEV)) for p in ps]


def _run(cls, backend, dtype, steps=STEPS, nan_step=None, block_size=512, shapes=SHAPES,
         unaligned=1500, **kw):
    params = _params(dtype, shapes=shapes, unaligned=unaligned)
    opt = cls(params, backend=backend, block_size=block_size, **kw)
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype).to(DEV)
        if k == nan_step:
            params[5].grad.view(-1)[17] = float("nan")
        opt.step()
    return params, opt


def _state(opt, params):
    return [{k: v.detach().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for p in params]


#: (class, parameter dtype, options, exact): ``exact``: the parameters agree bit for bit (the
#: fp32 arithmetic of the update is the same; otherwise within fp32 rounding)
CASES = {
    "adamw-f32-bf16states": (fastsched.AdamW, torch.float32, dict(state_dtype=torch.bfloat16)),
    "adamw-f32-8bit": (fastsched.AdamW, torch.float32, dict(state_dtype="8bit", min_8bit_size=1)),
    "adam-l2-f32-8bit": (fastsched.Adam, torch.float32,
                         dict(state_dtype="8bit", min_8bit_size=256, weight_decay=0.1)),
    "adamw-bf16-master": (fastsched.AdamW, torch.bfloat16, dict(master_weights=True)),
    "adamw-f16-master": (fastsched.AdamW, torch.float16, dict(master_weights=True)),
    "adamw-bf16-master-8bit": (fastsched.AdamW, torch.bfloat16,
                               dict(master_weights=True, state_dtype="8bit", min_8bit_size=1)),
    "adamw-bf16-master-bf16states": (fastsched.AdamW, torch.bfloat16,
                                     dict(master_weights=True, state_dtype=torch.bfloat16)),
    "adamw-bf16-sr": (fastsched.AdamW, torch.bfloat16, dict(stochastic_rounding=True, seed=7)),
    "adamw-bf16-sr-f32states": (fastsched.AdamW, torch.bfloat16,
                                dict(stochastic_rounding=True, state_dtype=torch.float32)),
    "adamw-bf16-sr-8bit": (fastsched.AdamW, torch.bfloat16,
                           dict(stochastic_rounding=True, seed=2**40 + 3, state_dtype="8bit",
                                min_8bit_size=1)),
    "adamw-bf16-f32states": (fastsched.AdamW, torch.bfloat16, dict(state_dtype=torch.float32)),
    "adamw-amsgrad-bf16states": (fastsched.AdamW, torch.float32,
                                 dict(amsgrad=True, state_dtype=torch.bfloat16)),
    "sgd-f32-8bit": (fastsched.SGD, torch.float32,
                     dict(momentum=0.9, state_dtype="8bit", min_8bit_size=1)),
    "sgd-nesterov-bf16-sr-8bit": (fastsched.SGD, torch.bfloat16,
                                  dict(momentum=0.9, nesterov=True, weight_decay=1e-2,
                                       stochastic_rounding=True, state_dtype="8bit",
                                       min_8bit_size=1)),
    "sgd-bf16-master": (fastsched.SGD, torch.bfloat16, dict(momentum=0.9, master_weights=True)),
    "sgd-nomomentum-bf16-sr": (fastsched.SGD, torch.bfloat16, dict(stochastic_rounding=True)),
}


def _compare(a, b, pa, pb, dtype):
    for i, (x, y) in enumerate(zip(pa, pb)):
        if dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7, msg=f"param {i}")
        else:  # one rounding of an fp32 value within fp32 rounding: bit equal or one ulp
            assert torch.equal(x, y) or torch.allclose(x.float(), y.float(), rtol=1e-2, atol=0), i
    for i, (sa, sb) in enumerate(zip(_state(a, pa), _state(b, pb))):
        assert sa.keys() == sb.keys(), i
        for k in sa:
            u, v = sa[k], sb[k]
            if k.endswith("_code") or u.dtype in (torch.bfloat16, torch.float16) or k == "step":
                # 8-bit codes and scales, states rounded once: bit for bit
                assert torch.equal(u.view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), \
                    (i, k)
            elif k.endswith("_scale"):
                assert torch.equal(_bits32(u), _bits32(v)), (i, k)
            else:
                torch.testing.assert_close(u, v, rtol=2e-6, atol=1e-7, msg=f"{i} {k}")


#: block 512: [2, 256] tiles of 8-bit states, several blocks per tensor; the default 2048 (the
#: [8, 256] tiles of the full-block path) for the 8-bit cases
_RUNS = [(c, 512) for c in CASES] + [(c, 2048) for c in CASES if "8bit" in c]


@pytest.mark.parametrize("case,block_size", _RUNS)
def test_triton_matches_reference(case, block_size):
    cls, dtype, kw = CASES[case]
    stats = block_size == 512  # per-tensor statistics: fp32 w_new and u
    pa, a = _run(cls, "triton", dtype, block_size=block_size, stats=stats, **kw)
    pb, b = _run(cls, "reference", dtype, block_size=block_size, stats=stats, **kw)
    if stats:
        sa, sb = a.stats, b.stats
        for k in ("tensor_param_norm", "tensor_update_rms"):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=0, msg=k)
    if kw.get("stochastic_rounding") and not kw.get("master_weights"):
        # stochastic rounding of the same fp32 values: the same bits; different fp32 values
        # (one ulp of fp32 arithmetic) may round apart only where r lands on the boundary
        for i, (x, y) in enumerate(zip(pa, pb)):
            diff = (x.view(torch.int16) != y.view(torch.int16)).sum().item()
            assert diff <= max(1, x.numel() // 1000), (i, diff)
    _compare(a, b, pa, pb, dtype)


@pytest.mark.parametrize("case", ["adamw-bf16-sr-8bit", "adamw-bf16-master-8bit",
                                  "sgd-f32-8bit"])
def test_skipped_step_touches_nothing(case):
    """A NaN gradient under nonfinite="skip": parameters, masters, codes and scales unchanged."""
    cls, dtype, kw = CASES[case]
    pa, a = _run(cls, "triton", dtype, steps=2, **kw, nonfinite="skip")
    before = ([p.detach().clone() for p in pa], _state(a, pa))
    g = torch.Generator().manual_seed(5)
    for p in pa:
        p.grad = torch.randn(p.shape, generator=g).to(dtype).to(DEV)
    pa[3].grad.view(-1)[0] = float("nan")
    a.step()
    for x, y in zip(before[0], pa):
        assert torch.equal(x, y.detach())
    for sx, sy in zip(before[1], _state(a, pa)):
        for k in sx:
            assert torch.equal(sx[k].view(torch.uint8) if sx[k].dim() else sx[k],
                               sy[k].view(torch.uint8) if sy[k].dim() else sy[k]), k


def test_stochastic_rounding_is_exact_on_equal_inputs():
    """SGD without momentum or weight decay: w - lr * g in fp32 is the same on both backends, so
    the rounded parameters are bit for bit the same, step after step."""
    cls, dtype, kw = CASES["sgd-nomomentum-bf16-sr"]
    pa, _ = _run(cls, "triton", dtype, steps=4, lr=1e-3, **kw)
    pb, _ = _run(cls, "reference", dtype, steps=4, lr=1e-3, **kw)
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
@pytest.mark.parametrize("kw", [dict(state_dtype=torch.bfloat16),
                                dict(stochastic_rounding=True, seed=3)], ids=["bf16states", "sr"])
def test_allora_units_below_fp32(unit, kw):
    dtype = torch.bfloat16 if kw.get("stochastic_rounding") else torch.float32
    kw = dict(kw, allora_eta=0.5, allora_unit=unit, shapes=UNIT_SHAPES, unaligned=299)
    pa, a = _run(fastsched.AdamW, "triton", dtype, **kw)
    pb, b = _run(fastsched.AdamW, "reference", dtype, **kw)
    _compare(a, b, pa, pb, dtype)


def test_units_launcher_refuses_8bit_states():
    """A unit tile does not own whole quantisation blocks: the launcher refuses 8-bit states."""
    t = torch.zeros(1, L.T_COLS, dtype=torch.int64)
    with pytest.raises(ValueError, match="8-bit"):
        ko.launch_units_update(L.KIND_ADAM, t, t, t, t, 1, torch.float32, 8, 256, False, False,
                               t, False, state=L.STATE_8BIT)
    with pytest.raises(ValueError, match="bfloat16"):
        ko.launch_update(L.KIND_ADAM, t, t, t, t, 1, torch.float16, 2048, False, False, t, False,
                         mode=L.MODE_SR)
    with pytest.raises(ValueError, match="amsgrad"):
        ko.launch_update(L.KIND_ADAM, t, t, t, t, 1, torch.float32, 2048, True, False, t, False,
                         state=L.STATE_8BIT)


def test_encode_multiplier_rounds_as_torch():
    """Blocks whose absmax makes reciprocal(absmax) * Q_TOP differ from the correctly rounded
    Q_TOP / absmax (a quarter of them), with values on the rounding boundary of a code."""
    g = torch.Generator().manual_seed(3)
    absmax = torch.rand(64, generator=g) + 0.01
    one = torch.full_like(absmax, L.Q_TOP)
    assert ((one / absmax) != (L.Q_TOP / absmax)).any()
    x = torch.rand(64, 256, generator=g) * absmax[:, None] * torch.where(
        torch.rand(64, 256, generator=g) < 0.5, -1.0, 1.0)
    x[:, 0] = absmax
    x = x.reshape(-1)
    for signed in (True, False):
        v = x if signed else x.abs()
        got, scale = _encode(v.to(DEV), signed, masked=False)
        want, wscale = _lowp.quantize(v, signed)
        assert torch.equal(got.cpu(), want) and torch.equal(_bits32(scale.cpu()), _bits32(wscale))


def test_compile_check_sweeps_the_variants_below_fp32(compile_check):
    """bench/compile_check.py compiles the variants below fp32 (lowp_configs, through the real
    host path), apart from the torch-semantics ones whose count test_compile.py holds."""
    cc = compile_check
    base, _ = cc.variants()
    assert not any(cc.is_lowp(v) for v in base)
    vs, n = cc.variants(lowp=True)
    assert n == len(cc.configs()) + len(cc.lowp_configs()) + 1
    # per block or pipelined (kernels/optim.py, _RUN_LAUNCH)
    upd = [v for v in vs if v.name in ("_update_kernel", "_run_update_kernel") and cc.is_lowp(v)]
    got = {(str(v.constexprs["DTYPE"]), str(v.constexprs["SDTYPE"]), v.constexprs["MODE"])
           for v in upd}
    want = {(str(ko.tl_dtype(d)), str(ko.tl_state(s, d, m)), m) for d, s, m in cc.LOWP}
    assert got == want
    units = {(str(v.constexprs["SDTYPE"]), v.constexprs["MODE"]) for v in vs
             if v.name == "_units_update_kernel" and cc.is_lowp(v)}
    assert "uint8" not in {s for s, _ in units} and {m for _, m in units} == {0, 1, 2}
    # the warps the launchers chose, and the bytes a program moves, as compiled
    for v in upd:
        c = v.constexprs
        if v.name == "_run_update_kernel":
            key = (c["KIND"], ko._TL_NAMES[c["DTYPE"]], ko._TL_NAMES[c["SDTYPE"]], c["MODE"],
                   c["FLAG"], c["STATS"], c["L2"])
            assert (c["BLOCK"], c["STAGES"], v.options["num_warps"]) == ko._RUN_LAUNCH[key]
            continue
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[str(c["DTYPE"])]
        state = next(s for d, s, m in cc.LOWP if (d, m) == (dtype, c["MODE"])
                     and str(ko.tl_state(s, d, m)) == str(c["SDTYPE"]))
        st = None if str(ko.tl_dtype(dtype)) == str(c["SDTYPE"]) else state
        assert (c["SPLIT"], v.options["num_warps"]) == ko.update_launch(
            c["KIND"], dtype, 2048, c["FLAG"], st, c["MODE"], c["L2"])
    v = next(v for v in upd if str(v.constexprs["SDTYPE"]) == "uint8"
             and str(v.constexprs["DTYPE"]) == "fp32" and v.constexprs["KIND"] == L.KIND_ADAM)
    assert cc.program_bytes(v) == v.constexprs["BLOCK"] * (4 + 4 + 1 + 1)


@pytest.mark.parametrize("elem0", [0, 2**32 - 1000, 5 * 2**32 + 3])
def test_sr_step_of_a_shard(elem0):
    """Plain SGD through the tables of a local shard whose first element has index ``elem0`` in
    the whole parameter (as under FSDP2): p = stochastic_round_bf16(p - lr * g) exactly, with the
    tensor's step after the increment; a second step draws other bits."""
    from fastsched.optim import functional
    from fastsched.optim._buffers import StepBuffers
    from fastsched.optim._tables import Entry, LowP, TableBuilder
    from fastsched.schedules import Constant

    g = torch.Generator().manual_seed(elem0 % 1000)
    shapes = [(3000,), (257,), (1,), ()]
    ps = [torch.randn(s, generator=g).to(torch.bfloat16).to(DEV) for s in shapes]
    keys = [_lowp.sr_key(99, i) for i in range(len(ps))]
    for step in (1, 2):
        gs = [torch.randn(s, generator=g).to(torch.bfloat16).to(DEV) for s in shapes]
        entries = [Entry(p, gr, 0, (None, None, None), torch.full((), step - 1.0, device=DEV),
                         None, LowP(L.STATE_BF16, L.MODE_SR, None, (None, None), k, elem0))
                   for p, gr, k in zip(ps, gs, keys)]
        plan = TableBuilder(L.KIND_SGD, 512).build(entries, list(range(len(ps))), key=None,
                                                   backend="triton")
        lr = torch.tensor(1e-2, dtype=torch.float32)
        want = [_lowp.stochastic_round_bf16(p.float().cpu() - lr * gr.float().cpu(), k, step,
                                            elem0) for p, gr, k in zip(ps, gs, keys)]
        functional.sgd(plan, StepBuffers(DEV, 1, 0), lr=1e-2, schedule=Constant(1.0))
        for p, w in zip(ps, want):
            assert torch.equal(p.cpu().view(torch.int16), w.view(torch.int16))
        assert all(float(e.step) == step for e in entries)


@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
def test_allora_units_with_master(unit):
    """With a master copy the unit norms are those of the fp32 master (the weights the step
    updates), as in the reference and the C++ executor."""
    kw = dict(master_weights=True, allora_eta=0.5, allora_unit=unit, shapes=UNIT_SHAPES,
              unaligned=299)
    pa, a = _run(fastsched.AdamW, "triton", torch.bfloat16, **kw)
    pb, b = _run(fastsched.AdamW, "reference", torch.bfloat16, **kw)
    _compare(a, b, pa, pb, torch.bfloat16)


def test_launches_name_the_variant():
    """``opt.launches()`` names each update launch's state storage and mode: one launch per
    (parameter dtype, storage, mode); small tensors under "8bit" go to the float32-state launch."""
    params, opt = _run(fastsched.AdamW, "triton", torch.bfloat16, steps=1, state_dtype="8bit",
                       min_8bit_size=256, stochastic_rounding=True)
    updates = [d for d in opt.launches() if d["pass"] == "update"]
    kinds = {(d.get("states"), d.get("mode")) for d in updates}
    assert kinds == {("8bit", "stochastic_rounding"), ("float32", "stochastic_rounding")}
    assert len(updates) == 2 and sum(len(d["tensors"]) for d in updates) == len(params)
