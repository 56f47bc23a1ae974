"""state_dict() / load_state_dict(): round trips, and checkpoints exchanged with torch.optim."""

from __future__ import annotations

import pytest
import torch
from optim_cases import (
    ADAM,
    ADAMW,
    BASIC,
    BLOCK,
    CASES,
    SGD_MOM,
    SGD_NESTEROV,
    assert_all_equal,
    assert_same_state,
    by_id,
    clone_all,
    compact_layouts,
    make_inputs,
    one_thread,  # noqa: F401 - autouse fixture
    run,
    save_load,
    set_grads,
    state_snapshot,
)

import fastsched
from fastsched.optim import _cpu
from fastsched.schedules import WSD, Cosine, from_dict
from fastsched.testing import TOLERANCES, Layout

TOL = TOLERANCES[torch.float32]

#: every configuration through the reference backend, the basic ones through Triton
ROUND_TRIPS = [(c, "reference") for c in CASES] + [(c, "triton") for c in BASIC]


def _fresh(inputs_params, device):
    return [p.detach().clone().to(device) for p in inputs_params]


@pytest.mark.parametrize("case,backend", ROUND_TRIPS,
                         ids=[f"{c.id}-{b}" for c, b in ROUND_TRIPS])
def test_round_trip_continues_identically(case, backend, kernel_device):
    """Save after n steps, load into a new optimizer over copies of the parameters: both
    continue bit for bit alike (states, clock and schedule included)."""
    device = kernel_device if backend == "triton" else "cpu"
    n = 4 if backend == "reference" else 2
    sched = Cosine(total_steps=3 * n, warmup_steps=n // 2, min_ratio=0.05)
    inputs = make_inputs(compact_layouts(), 2 * n, case.seed + 20)
    params = inputs.params(device=device)
    opt = case.make(params, backend=backend, schedule=sched)
    run(opt, params, inputs.grads[:n])

    sd = save_load(opt.state_dict())
    assert sd["fastsched"] == {"schedule": sched.to_dict(), "clock": n, "seed": 0,
                               "float64_arithmetic": "float64"}
    copies = [p.detach().clone() for p in params]
    other = case.make(copies, backend=backend)  # schedule and clock come from the checkpoint
    other.load_state_dict(sd)
    assert other.schedule == sched and int(other.clock.item()) == n
    assert_same_state(state_snapshot(other), state_snapshot(opt))

    run(opt, params, inputs.grads[n:], start=n)
    run(other, copies, inputs.grads[n:], start=n)
    assert_all_equal([p.cpu() for p in copies], [p.cpu() for p in params])
    assert_same_state(state_snapshot(other), state_snapshot(opt))
    assert int(other.clock.item()) == int(opt.clock.item()) == 2 * n


def test_state_dict_layout_is_torchs():
    """Per-parameter state names, the step tensor and group keys are torch's."""
    inputs = make_inputs(compact_layouts(), 2, 21)
    for case in (ADAM, ADAMW, SGD_MOM):
        ours, theirs = inputs.params(), inputs.params()
        opt, ref = case.make(ours, backend="reference"), case.make_torch(theirs)
        run(opt, ours, inputs.grads)
        run(ref, theirs, inputs.grads)
        a, b = opt.state_dict(), ref.state_dict()
        assert set(a) == set(b) | {"fastsched"}
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            extra = {"step"} if case.ours is fastsched.SGD else set()
            assert set(a["state"][i]) == set(b["state"][i]) | extra, case.id
            for k, v in b["state"][i].items():
                assert a["state"][i][k].dtype == v.dtype and a["state"][i][k].shape == v.shape
        for ga, gb in zip(a["param_groups"], b["param_groups"]):
            assert set(gb) <= set(ga), set(gb) - set(ga)
            assert ga["params"] == gb["params"]


# -- checkpoints exchanged with torch -------------------------------------------------------

CROSS = [ADAMW, ADAM, SGD_MOM, SGD_NESTEROV, by_id("AdamW-weight_decay=0.0-maximize")]
CROSS_RUNS = [(c, "reference") for c in CROSS] + [(ADAMW, "triton"), (SGD_MOM, "triton")]


@pytest.mark.parametrize("case,backend", CROSS_RUNS, ids=[f"{c.id}-{b}" for c, b in CROSS_RUNS])
def test_torch_checkpoint_into_fastsched(case, backend, kernel_device):
    """torch.optim trains n steps, fastsched loads its checkpoint and continues: the result is
    torch's uninterrupted 2n-step run."""
    device = kernel_device if backend == "triton" else "cpu"
    n = 4 if backend == "reference" else 2
    inputs = make_inputs(compact_layouts(), 2 * n, case.seed + 22)
    theirs = inputs.params()
    ref = case.make_torch(theirs)
    run(ref, theirs, inputs.grads[:n])
    sd = save_load(ref.state_dict())
    mid = clone_all(theirs)

    ours = _fresh(theirs, device)
    opt = case.make(ours, backend=backend)
    opt.load_state_dict(sd)
    if case.ours is not fastsched.SGD:
        assert int(opt.clock.item()) == n  # the number of steps taken
    run(opt, ours, inputs.grads[n:], start=n)
    run(ref, theirs, inputs.grads[n:], start=n)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, **TOL)
    # a control: restarting from the same parameters without the optimizer state ends far
    # from the uninterrupted run, so the comparison above can fail
    fresh = case.make_torch(mid)
    run(fresh, mid, inputs.grads[n:], start=n)
    assert any(not torch.allclose(a, b, **TOL) for a, b in zip(mid, theirs))


@pytest.mark.parametrize("case,backend", CROSS_RUNS, ids=[f"{c.id}-{b}" for c, b in CROSS_RUNS])
def test_fastsched_checkpoint_into_torch(case, backend, kernel_device):
    """fastsched trains n steps, torch.optim loads its checkpoint and continues: the result is
    fastsched's uninterrupted 2n-step run."""
    device = kernel_device if backend == "triton" else "cpu"
    n = 4 if backend == "reference" else 2
    inputs = make_inputs(compact_layouts(), 2 * n, case.seed + 23)
    ours = inputs.params(device=device)
    opt = case.make(ours, backend=backend)
    run(opt, ours, inputs.grads[:n])
    sd = save_load(opt.state_dict(), map_location="cpu")

    theirs = _fresh(ours, "cpu")
    ref = case.make_torch(theirs)
    ref.load_state_dict(sd)
    run(ref, theirs, inputs.grads[n:], start=n)
    run(opt, ours, inputs.grads[n:], start=n)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, **TOL)


def test_checkpoint_into_fused_torch_and_back():
    """torch fused=True keeps its step on the parameter's device; the exchange works too."""
    inputs = make_inputs(compact_layouts(), 6, 24)
    ours, theirs = inputs.params(), inputs.params()
    opt = ADAMW.make(ours, backend="reference")
    ref = ADAMW.make_torch(theirs, fused=True)
    run(opt, ours, inputs.grads[:2])
    ref.load_state_dict(save_load(opt.state_dict()))
    for a, b in zip(ours, theirs):
        b.data.copy_(a)
    run(ref, theirs, inputs.grads[2:4], start=2)
    opt.load_state_dict(save_load(ref.state_dict()))
    for a, b in zip(ours, theirs):
        a.data.copy_(b)
    run(opt, ours, inputs.grads[4:], start=4)
    run(ref, theirs, inputs.grads[4:], start=4)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
    assert all(float(opt.state[p]["step"]) == 6 for p in ours)


def test_torch_checkpoint_keeps_the_constructed_schedule():
    """A torch checkpoint carries no schedule: the one given at construction stays, and the
    clock is the number of steps taken (the largest per-parameter step)."""
    inputs = make_inputs(compact_layouts(), 3, 25)
    theirs = inputs.params()
    ref = ADAMW.make_torch(theirs)
    run(ref, theirs, inputs.grads)
    sched = WSD(warmup_steps=2, total_steps=10)
    opt = ADAMW.make(_fresh(theirs, "cpu"), schedule=sched, backend="reference")
    opt.load_state_dict(save_load(ref.state_dict()))
    assert opt.schedule == sched
    assert int(opt.clock.item()) == 3
    assert opt.current_lr() == [ADAMW.kw["lr"] * sched(3)]


def test_fastsched_checkpoint_replaces_the_schedule():
    inputs = make_inputs(compact_layouts(), 3, 26)
    a = inputs.params()
    sched = Cosine(total_steps=20, warmup_steps=4)
    opt = ADAMW.make(a, schedule=sched, backend="reference")
    run(opt, a, inputs.grads)
    sd = save_load(opt.state_dict())
    other = ADAMW.make(_fresh(a, "cpu"), schedule=WSD(total_steps=7), backend="reference")
    other.load_state_dict(sd)
    assert other.schedule == sched == from_dict(sd["fastsched"]["schedule"])
    assert other.current_lr() == opt.current_lr() == [ADAMW.kw["lr"] * sched(3)]


def test_load_mismatched_state_dict_changes_nothing():
    inputs = make_inputs(compact_layouts(), 2, 27)
    params = inputs.params()
    opt = ADAMW.make(params, backend="reference")
    run(opt, params, inputs.grads)
    before, clock = state_snapshot(opt), int(opt.clock.item())
    other = ADAMW.make(inputs.params()[:2], backend="reference")
    run(other, other.param_groups[0]["params"], [g[:2] for g in inputs.grads])
    with pytest.raises(ValueError, match="size of optimizer's group"):
        opt.load_state_dict(other.state_dict())
    assert_same_state(state_snapshot(opt), before)
    assert int(opt.clock.item()) == clock


def test_state_moves_to_the_parameters_dtype_and_layout():
    """Loaded states take each parameter's dtype and memory layout (a torch checkpoint from a
    float32 run into bf16 parameters, a contiguous one into permuted parameters)."""
    layouts = [Layout((9, 17), "permuted"), Layout((5,))]
    inputs = make_inputs(layouts, 3, 28)
    theirs = inputs.params(keep_layout=False)
    ref = ADAMW.make_torch(theirs)
    run(ref, theirs, inputs.grads)
    sd = save_load(ref.state_dict())
    ours = [l.make(t.detach(), dtype=torch.bfloat16) for l, t in zip(layouts, theirs)]
    opt = ADAMW.make(ours, backend="reference")
    opt.load_state_dict(sd)
    for p in ours:
        for k in ("exp_avg", "exp_avg_sq"):
            s = opt.state[p][k]
            assert s.dtype == torch.bfloat16 and s.stride() == p.stride(), k
    kept = clone_all(ours)
    run(opt, ours, [inputs.grads[0]])
    assert any(not torch.equal(a, b) for a, b in zip(ours, kept))


def _steps_with_a_change(opt, ref, ours, theirs, grads, change) -> None:
    """Steps both optimizers over ``grads``, ``change()`` before the third step, the memory it
    freed then reused, as a training loop would (a table still pointing there would show); the
    parameters must end equal."""
    junk = None
    for k, gs in enumerate(grads):
        if k == 2:
            change()
            junk = [torch.full_like(p, 1e30) for p in ours for _ in range(3)]
        set_grads(ours, gs, 1)  # into the same gradient tensors: the cached tables' case
        set_grads(theirs, gs, 1)
        opt.step()
        ref.step()
    del junk
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, **TOL)


def _reset(opt, params, how: str) -> None:
    if how == "clear":
        opt.state.clear()
    elif how == "assign":
        opt.state[params[1]] = {}
    elif how == "pop":
        opt.state.pop(params[2])
    elif how == "clear-one":
        opt.state[params[0]].clear()


@pytest.mark.parametrize("how", ["clear", "assign", "pop", "clear-one"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_reset_between_steps(how, backend, kernel_device):
    """Clearing the state (all of it, or one parameter's) between steps starts it afresh at the
    next step, as torch does; the tables pointing at the old states are rebuilt."""
    device = kernel_device if backend == "triton" else "cpu"
    inputs = make_inputs([Layout(()), Layout((BLOCK + 1,)), Layout((7,))], 4, 29)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = ADAM.make(ours, backend=backend)
    ref = ADAM.make_torch(theirs)
    def change():
        _reset(opt, ours, how)
        _reset(ref, theirs, how)

    _steps_with_a_change(opt, ref, ours, theirs, inputs.grads, change)
    assert [float(opt.state[p]["step"]) for p in ours] == \
        [float(ref.state[p]["step"]) for p in theirs]


@pytest.mark.parametrize("what", ["exp_avg", "exp_avg_sq", "step", "all"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu.available(), reason="the compiled CPU backend is not built")), "triton"])
def test_state_tensor_replaced_between_steps(what, backend, kernel_device):
    """A tensor put in place of a state inside its dict (``opt.state[p]["exp_avg"] = t``) is
    what the next step reads and writes, as in torch.optim: the cached tables are rebuilt
    (they once kept the old tensor until something else changed). The old tensor is dropped
    and its memory reused before the step, so a table still pointing there would show."""
    device = kernel_device if backend == "triton" else "cpu"
    inputs = make_inputs([Layout(()), Layout((BLOCK + 1,)), Layout((7, 3))], 5, 31)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = ADAMW.make(ours, backend=backend)
    ref = ADAMW.make_torch(theirs)
    names = ["exp_avg", "exp_avg_sq", "step"] if what == "all" else [what]

    def change():
        for i in (0, 1):
            for name in names:
                for o, p in ((opt, ours[i]), (ref, theirs[i])):
                    old = o.state[p][name]
                    o.state[p][name] = (torch.full_like(old, 40.0) if name == "step" else
                                        old * 0.5 + (0.25 if name == "exp_avg_sq" else -0.125))

    _steps_with_a_change(opt, ref, ours, theirs, inputs.grads, change)
    for p, q in zip(ours, theirs):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][name].cpu(), ref.state[q][name], **TOL)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu.available(), reason="the compiled CPU backend is not built"))])
def test_state_tensor_replaced_by_another_shape_is_refused(backend):
    """A state replaced by a tensor of another shape than its parameter: a ValueError naming
    the parameter and the state before anything changes (the executors walk p.numel()
    elements of every state)."""
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastsched.AdamW(params, lr=1e-2, backend=backend)
    opt.step()
    opt.state[params[1]]["exp_avg_sq"] = torch.ones(3)
    kept = [p.detach().clone() for p in params]
    m = opt.state[params[0]]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: its state 'exp_avg_sq' has shape "
                                         r"\(3,\), the parameter \(5,\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, kept))
    assert torch.equal(opt.state[params[0]]["exp_avg"], m)


@pytest.mark.parametrize("case", [ADAMW, ADAM, SGD_MOM], ids=lambda c: c.id)
def test_checkpoint_of_an_older_torch(case):
    """Group keys added by later torch versions (maximize, foreach, capturable, differentiable,
    fused, decoupled_weight_decay) missing from a checkpoint take the optimizer's defaults, as
    in torch (AdamW stays decoupled)."""
    inputs = make_inputs(compact_layouts(), 6, case.seed + 24)
    theirs = inputs.params()
    ref = case.make_torch(theirs)
    run(ref, theirs, inputs.grads[:3])
    sd = save_load(ref.state_dict())
    for g in sd["param_groups"]:
        for k in ("maximize", "foreach", "capturable", "differentiable", "fused",
                  "decoupled_weight_decay"):
            g.pop(k, None)
    ours = _fresh(theirs, "cpu")
    opt = case.make(ours, backend="reference")
    opt.load_state_dict(sd)
    run(opt, ours, inputs.grads[3:], start=3)
    run(ref, theirs, inputs.grads[3:], start=3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
