"""ALLoRA units: the fused step equals torch.optim applied to gradients pre-scaled per unit by
1 / sqrt(||theta_unit||^2 + 1/eta^2), the norms taken from the parameters before the step.

Several LoRA-like groups (A: r x in, B: out x r starting at 0) share one optimizer with a plain
group; unit lengths above 256 (several chunks per unit in the kernel) and below 16 (many units
per program), 3-D, 1-D, 0-d and empty tensors are all present. Adam runs with eps = 1e-2 so that
the size of the scaled gradient shows in the update (with eps ~ 0, Adam would hide a wrong but
slowly varying scale).
"""

from __future__ import annotations

import pytest
import torch
from optim_oracle import allora_scale64, rel_err

import fastsched
from fastsched.optim import UNIT_CLASSES

BLOCK = 256
RTOL = 1e-5

#: A1 / B1: rows of 260 (two chunks of 256, the second partial; 520 as one tensor unit) and of
#: 2, columns of 2 and of 130 (five 32-row steps of the column path); 260 columns of 2 and 130
#: rows of 2 take several programs of 128 units, the last partial. A program on the masked row
#: path walks its whole tile (8 sub-tiles) whatever the tensor holds: under the interpreter the
#: cost is programs x sub-tiles x chunks, so the factors are no larger than that needs.
SHAPES = {"A1": (2, 260), "B1": (130, 2), "C1": (6, 5, 3),
          "A2": (4, 40), "B2": (40, 4), "bias": (37,), "scalar": (), "empty": (0, 5),
          "W": (10, 10), "b": (10,)}
ZERO_INIT = {"B1", "B2"}
#: (names, allora_eta, lr); None: a plain group
GROUPS = [(["A1", "B1", "C1"], 0.5, 1e-2),
          (["A2", "B2", "bias", "scalar", "empty"], 2.0, 3e-2),
          (["W", "b"], None, 1e-2)]
KW = {"adamw": dict(betas=(0.9, 0.95), eps=1e-2, weight_decay=0.1),
      "sgd": dict(momentum=0.9, weight_decay=1e-3)}


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    return request.param


def _build(kind, backend, device, unit, **opt_kw):
    gen = torch.Generator().manual_seed(0)
    params = {}
    for n, s in SHAPES.items():
        x = torch.zeros(s) if n in ZERO_INIT else torch.randn(s, generator=gen) * 0.5
        params[n] = x.to(device).requires_grad_()
    tparams = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    groups, tgroups = [], []
    for names, eta, lr in GROUPS:
        g = {"params": [params[n] for n in names], "lr": lr}
        if eta is not None:
            g.update(allora_eta=eta, allora_unit=unit, allora_apply="grad")
        groups.append(g)
        tgroups.append({"params": [tparams[n] for n in names], "lr": lr})
    cls, tcls = ((fastsched.AdamW, torch.optim.AdamW) if kind == "adamw"
                 else (fastsched.SGD, torch.optim.SGD))
    opt = cls(groups, backend=backend, block_size=BLOCK, **KW[kind], **opt_kw)
    topt = tcls(tgroups, **KW[kind])
    return params, tparams, opt, topt


def _step_both(params, tparams, opt, topt, k, clip=None):
    """One step of both; the torch side clips (raw gradients), then scales each ALLoRA unit as
    the fastsched groups say now, from the parameters before the step."""
    gen = torch.Generator().manual_seed(1000 + k)
    for n, p in params.items():
        g = torch.randn(p.shape, generator=gen).to(p.device) * (3.0 if k % 2 else 0.3)
        p.grad = g.clone()
        tparams[n].grad = g.clone()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
    for group, tgroup in zip(opt.param_groups, topt.param_groups):
        if group["allora_eta"] is None:
            continue
        for t in tgroup["params"]:
            s = allora_scale64(t, group["allora_unit"], group["allora_eta"])
            t.grad.mul_(s.to(t.dtype))
    opt.step()
    topt.step()


def _assert_match(params, tparams, opt, topt):
    worst = 0.0
    for n, p in params.items():
        t = tparams[n]
        worst = max(worst, rel_err(p, t))
        assert rel_err(p, t) <= RTOL, n
        for name, v in topt.state[t].items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert rel_err(opt.state[p][name], v) <= RTOL, (n, name)
    return worst


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
def test_allora_equals_torch_on_prescaled_gradients(backend, kernel_device, unit, kind):
    params, tparams, opt, topt = _build(kind, backend, kernel_device, unit)
    # three steps: from B = 0 (the first creates the states), then with states and B away from
    # the origin, at both gradient sizes (0.3, 3.0, 0.3); longer runs: the settings-change test
    # (6 steps) and the oracle (4)
    for k in range(3):
        _step_both(params, tparams, opt, topt, k)
        _assert_match(params, tparams, opt, topt)
    # the B factors left the origin and the scales now differ between units
    assert params["B1"].abs().min() > 0 and params["B2"].abs().min() > 0
    if backend == "triton":
        _assert_tile_classes(opt)


def _assert_tile_classes(opt):
    """Each ALLoRA tensor sits in the launch of its unit-length class (short rows: many units
    per program; long: one 256-wide chunk loop per unit)."""
    seen = 0
    for b in opt.launches():
        if b["pass"] != "units":
            continue
        k = next(i for i, (_, nu, ch) in enumerate(UNIT_CLASSES)
                 if (nu, ch) == (b["units_per_program"], b["chunk"]))
        lo = 0 if k == 0 else UNIT_CLASSES[k - 1][0]
        hi = UNIT_CLASSES[k][0]
        for ulen in b["unit_length"]:
            assert (ulen == 0 or ulen > lo) and (hi is None or ulen <= hi), (ulen, b)
            seen += 1
    assert seen == 8


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_allora_after_clipping(backend, kernel_device, kind):
    """Clipping first, on the raw gradients of every group; then the ALLoRA scaling. The
    statistics report the raw gradients."""
    params, tparams, opt, topt = _build(kind, backend, kernel_device, "row", max_grad_norm=2.0,
                                        stats=True)
    for k in range(3):  # as in the test above: the first step, then with states, both sizes
        _step_both(params, tparams, opt, topt, k, clip=2.0)
        raw = torch.cat([p.grad.detach().double().reshape(-1) for p in params.values()])
        sd = opt.stats_dict()
        assert sd["grad_norm"] == pytest.approx(float(raw.norm()), rel=1e-6)
        assert (sd["clip_coef"] < 1.0) == (float(raw.norm()) > 2.0)
        _assert_match(params, tparams, opt, topt)
        # per tensor (the unit-tiled update accumulates them): the new parameter's norm and the
        # RMS of the unscaled update, from torch's state
        for gi, (names, _, _) in enumerate(GROUPS):
            for i, n in enumerate(names):
                t, st = tparams[n], topt.state[tparams[n]]
                if kind == "adamw":
                    b1, b2 = KW["adamw"]["betas"]
                    step = float(st["step"])
                    u = (st["exp_avg"].double() / (1 - b1 ** step)) / (
                        (st["exp_avg_sq"].double() / (1 - b2 ** step)).sqrt()
                        + KW["adamw"]["eps"])
                else:
                    u = st["momentum_buffer"].double()
                got = sd["tensors"][f"group{gi}.param{i}"]
                assert got["param_norm"] == pytest.approx(float(t.detach().double().norm()),
                                                          rel=1e-5, abs=1e-12), n
                rms = float(u.pow(2).mean().sqrt()) if u.numel() else 0.0
                assert got["update_rms"] == pytest.approx(rms, rel=1e-5, abs=1e-12), n


def test_allora_settings_change_between_steps(backend, kernel_device):
    params, tparams, opt, topt = _build("sgd", backend, kernel_device, "row")
    changes = {
        2: lambda g: (g[0].update(allora_eta=3.0), g[1].update(allora_unit="column")),
        3: lambda g: g[2].update(allora_eta=0.25, allora_unit="tensor",  # plain -> ALLoRA
                                 allora_apply="grad"),
        4: lambda g: g[0].update(allora_eta=None),  # ALLoRA -> plain
    }
    for k in range(6):
        if k in changes:
            changes[k](opt.param_groups)
        _step_both(params, tparams, opt, topt, k)
        _assert_match(params, tparams, opt, topt)


def test_allora_needs_contiguous_parameters():
    p = torch.randn(5, 4).t().requires_grad_()  # dense, not contiguous
    fastsched.AdamW([p])  # fine without ALLoRA
    with pytest.raises(ValueError, match="contiguous"):
        fastsched.AdamW([p], allora_eta=1.0)


# -- allora_apply="update": the unit's step is scaled (an adaptive per-unit learning rate) -----

def _oracle_run(kind, backend, device, unit, apply, steps=4, **opt_kw):
    """fastsched vs the float64 oracle (``optim_oracle``, written independently) with ALLoRA
    on the LoRA-like groups; returns the worst relative error of the parameters."""
    from optim_oracle import Hyper, Oracle

    gen = torch.Generator().manual_seed(0)
    params, hypers, groups = [], [], []
    for gi, (names, eta, lr) in enumerate(GROUPS):
        ps = []
        for n in names:
            x = torch.zeros(SHAPES[n]) if n in ZERO_INIT else torch.randn(SHAPES[n],
                                                                          generator=gen) * 0.5
            ps.append(x.to(device).requires_grad_())
            kw = ({"kind": "adam", "betas": KW["adamw"]["betas"], "eps": KW["adamw"]["eps"],
                   "weight_decay": KW["adamw"]["weight_decay"]} if kind == "adamw" else
                  {"kind": "sgd", **{k: KW["sgd"][k] for k in ("momentum", "weight_decay")}})
            hypers.append(Hyper(lr=lr, group=gi, allora_eta=eta, allora_unit=unit,
                                allora_apply=apply, **kw))
        g = {"params": ps, "lr": lr}
        if eta is not None:
            g.update(allora_eta=eta, allora_unit=unit, allora_apply=apply)
        groups.append(g)
        params += ps
    cls = fastsched.AdamW if kind == "adamw" else fastsched.SGD
    opt = cls(groups, backend=backend, block_size=BLOCK, **KW[kind], **opt_kw)
    oracle = Oracle(params, hypers)
    worst = 0.0
    for k in range(steps):
        gen = torch.Generator().manual_seed(1000 + k)
        grads = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        oracle.step(grads)
        worst = max(worst, max(rel_err(p, q) for p, q in zip(params, oracle.params)))
    return worst


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
def test_allora_update_mode_matches_the_oracle(backend, kernel_device, unit, kind):
    """Each unit's Adam / SGD step times 1 / sqrt(||theta_unit||^2 + 1/eta^2), the decoupled
    weight decay unscaled: the float64 oracle over 4 steps (awkward shapes, several chunks per
    unit, 0-d and empty tensors, a plain group beside)."""
    assert _oracle_run(kind, backend, kernel_device, unit, "update") <= 2e-5


def test_allora_update_is_the_default_and_differs_from_grad_under_adamw(kernel_device):
    """Under AdamW the gradient scaling is normalised away (Adam divides by sqrt(v)); the
    update scaling is not. The default is "update"."""
    p = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert fastsched.AdamW([p], allora_eta=1.0).param_groups[0]["allora_apply"] == "update"
    moved = {}
    for apply in ("grad", "update"):
        q = p.detach().clone().requires_grad_()
        opt = fastsched.AdamW([q], lr=1e-2, allora_eta=1.0, allora_apply=apply,
                              weight_decay=0.0)
        q.grad = torch.ones_like(q)
        opt.step()
        moved[apply] = (q.detach() - p.detach()).abs().mean().item()
    plain = fastsched.AdamW([p.detach().clone().requires_grad_()], lr=1e-2, weight_decay=0.0)
    plain.param_groups[0]["params"][0].grad = torch.ones_like(p)
    plain.step()
    base = (plain.param_groups[0]["params"][0].detach() - p.detach()).abs().mean().item()
    # rows of norm ~17: "grad" moves by lr (Adam's first step is sign-like), "update" by lr/17
    assert moved["grad"] == pytest.approx(base, rel=1e-4)
    assert moved["update"] < 0.2 * base


@pytest.mark.parametrize("unit", ["row", "column", "tensor"])
def test_allora_update_equals_grad_for_plain_sgd(backend, kernel_device, unit):
    """SGD without momentum or weight decay: scaling the gradient or the step is the same."""
    out = {}
    for apply in ("grad", "update"):
        gen = torch.Generator().manual_seed(3)
        p = (torch.randn(7, 33, generator=gen)).to(kernel_device).requires_grad_()
        opt = fastsched.SGD([p], lr=0.1, allora_eta=2.0, allora_unit=unit, allora_apply=apply,
                            backend=backend)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen).to(kernel_device)
            opt.step()
        out[apply] = p.detach().clone()
    assert rel_err(out["update"], out["grad"]) <= 1e-6


def test_allora_apply_is_validated_and_old_checkpoints_resume_as_grad():
    p = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"allora_apply must be one of \['update', 'grad'\]"):
        fastsched.AdamW([p], allora_eta=1.0, allora_apply="step")
    opt = fastsched.AdamW([p], allora_eta=1.0)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["allora_apply"] == "update"
    del sd["param_groups"][0]["allora_apply"]  # as saved before the option existed
    new = fastsched.AdamW([p], allora_eta=1.0)
    with pytest.warns(UserWarning, match="resumes with allora_apply='grad'"):
        new.load_state_dict(sd)
    assert new.param_groups[0]["allora_apply"] == "grad"
    torch_sd = torch.optim.AdamW([p]).state_dict()  # no ALLoRA keys: the optimizer's defaults
    other = fastsched.AdamW([p], allora_eta=1.0)
    other.load_state_dict(torch_sd)
    assert other.param_groups[0]["allora_apply"] == "update"


#: row units whose tiles are whole (every unit present, rows a multiple of the chunk, 16-byte
#: aligned rows: the kernel's unmasked 16-byte path) next to partial tiles of the same classes:
#: per class one tensor of one whole tile then a partial one (128 + 2 rows of 16, 16 + 1 of 128,
#: 8 + 1 of 512: two chunks a row), and rows of 8 (masked: not a multiple of the chunk, 16)
WHOLE_TILES = {"r16": (130, 16), "r128": (17, 128), "r512": (9, 512), "r8": (64, 8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("apply", ["grad", "update"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_allora_whole_tiles_match_the_reference(kernel_device, kind, apply, dtype):
    """The unit kernel's paths (whole tiles of aligned rows, masked partial tiles) against the
    reference backend over 2 steps (the first creates the states, the second reads them), in
    each unit class."""
    from fastsched.testing import TOLERANCES

    cls = fastsched.AdamW if kind == "adamw" else fastsched.SGD
    gen = torch.Generator().manual_seed(5)
    init = {n: torch.randn(s, generator=gen).to(dtype) for n, s in WHOLE_TILES.items()}
    runs = []
    for backend, device in (("triton", kernel_device), ("reference", "cpu")):
        params = [t.clone().to(device).requires_grad_() for t in init.values()]
        opt = cls(params, backend=backend, allora_eta=0.7, allora_unit="row",
                  allora_apply=apply, **KW[kind])
        g2 = torch.Generator().manual_seed(6)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g2).to(dtype).to(device)
            opt.step()
        runs.append([p.detach().cpu() for p in params])
    tol = TOLERANCES[dtype]
    for name, a, b in zip(WHOLE_TILES, *runs):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
