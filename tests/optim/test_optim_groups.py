"""Parameter groups, learning-rate changes, missing gradients, zero_grad and memory layouts,
each checked against torch.optim doing the same thing, on both backends."""

from __future__ import annotations

import pytest
import torch
from optim_cases import (
    ADAM,
    ADAMW,
    BASIC,
    BLOCK,
    SGD_MOM,
    SGD_NESTEROV,
    Case,
    assert_all_equal,
    assert_same_state,
    clone_all,
    compact_layouts,
    make_inputs,
    one_thread,  # noqa: F401 - autouse fixture
    run,
    set_grads,
    state_snapshot,
)

import fastsched
from fastsched.testing import TOLERANCES, Layout

TOL = TOLERANCES[torch.float32]
BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device(backend, kernel_device):
    return kernel_device if backend == "triton" else "cpu"


def steps_for(backend: str, n: int) -> int:
    """Fewer steps through the interpreter."""
    return n if backend == "reference" else max(2, n // 3)


def assert_close_all(ours, theirs, msg=""):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a.cpu(), b.cpu(), **TOL, msg=lambda m, i=i: f"{msg} {i}: {m}")


def group_overrides(case: Case) -> list[dict]:
    """Three groups with their own hyperparameters (the third takes the defaults)."""
    if case.ours is fastsched.SGD:
        return [dict(lr=0.05, momentum=0.5), dict(momentum=0.0, weight_decay=0.2),
                dict(dampening=0.25)]
    return [dict(lr=3e-3, betas=(0.8, 0.99)), dict(weight_decay=0.3, eps=1e-6), dict()]


def split(params, overrides):
    n = len(overrides)
    return [dict(params=params[i::n], **o) for i, o in enumerate(overrides)]


# -- groups ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", BASIC + [SGD_NESTEROV], ids=lambda c: c.id)
def test_groups_with_their_own_hyperparameters(case, backend, device):
    over = group_overrides(case)
    if case is SGD_NESTEROV:
        over = [dict(lr=0.05, momentum=0.5), dict(nesterov=False, momentum=0.0), dict()]
    inputs = make_inputs(compact_layouts(), steps_for(backend, 12), case.seed + 1)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(split(ours, over), backend=backend)
    ref = case.make_torch(split(theirs, over))
    run(opt, ours, inputs.grads)
    run(ref, theirs, inputs.grads)
    assert_close_all(ours, theirs)
    # the groups really differ: the same run with one group drifts away from them
    single = inputs.params()
    run(case.make_torch(single), single, inputs.grads)
    assert any(not torch.allclose(a.cpu(), b, **TOL) for a, b in zip(ours, single))


@pytest.mark.parametrize("case", BASIC, ids=lambda c: c.id)
def test_add_param_group_after_steps(case, backend, device):
    n = steps_for(backend, 8)
    inputs = make_inputs(compact_layouts(), 2 * n, case.seed + 2)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(ours[:2], backend=backend)
    ref = case.make_torch(theirs[:2])
    run(opt, ours, inputs.grads[:n])
    run(ref, theirs, inputs.grads[:n])
    extra = group_overrides(case)[0]
    opt.add_param_group(dict(params=ours[2:], **extra))
    ref.add_param_group(dict(params=theirs[2:], **extra))
    assert opt.param_groups[1]["lr"] == ref.param_groups[1]["lr"]
    run(opt, ours, inputs.grads[n:], start=n)
    run(ref, theirs, inputs.grads[n:], start=n)
    assert_close_all(ours, theirs)
    # the first n steps did not touch the parameters added later (they had gradients)
    steps = [float(opt.state[p]["step"]) for p in ours]
    if case.ours is not fastsched.SGD:
        assert steps == [2 * n] * 2 + [n] * (len(ours) - 2)


@pytest.mark.parametrize("case", BASIC, ids=lambda c: c.id)
def test_lr_change_takes_effect_at_next_step(case, backend, device):
    n = steps_for(backend, 9)
    inputs = make_inputs(compact_layouts(), n, case.seed + 3)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(split(ours, [{}, {}]), backend=backend)
    ref = case.make_torch(split(theirs, [{}, {}]))

    for k in range(n):
        if k == 1:  # lr 0 in one group: its parameters stay put this step (AdamW: no decay)
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.0
            before = clone_all(ours)
        if k == 2:
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.05
            opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 1e-3
        set_grads(ours, inputs.grads[k], k)
        set_grads(theirs, inputs.grads[k], k)
        opt.step()
        ref.step()
        assert_close_all(ours, theirs, f"step {k}")
        if k == 1:
            frozen = ours[0::2]
            assert_all_equal([p.cpu() for p in frozen], [p.cpu() for p in before[0::2]])
            assert any(not torch.equal(a, b) for a, b in zip(ours[1::2], before[1::2]))
    assert opt.current_lr() == [0.05, 1e-3]


def test_lr_as_cpu_tensor():
    """A 1-element CPU tensor lr is read as a number, as torch.optim accepts it."""
    inputs = make_inputs(compact_layouts(), 3, 4)
    ours, theirs = inputs.params(), inputs.params()
    opt = fastsched.AdamW(ours, lr=torch.tensor(1e-2), backend="reference")
    ref = torch.optim.AdamW(theirs, lr=torch.tensor(1e-2))
    run(opt, ours, inputs.grads)
    run(ref, theirs, inputs.grads)
    assert_close_all(ours, theirs)


# -- missing gradients, zero_grad -----------------------------------------------------------

@pytest.mark.parametrize("case", BASIC + [SGD_NESTEROV], ids=lambda c: c.id)
def test_missing_and_late_gradients(case, backend, device):
    """A parameter whose grad is None is skipped (state untouched, step not counted); one that
    gets gradients only from step 2 starts its state then; one never gets any and has none."""
    n = steps_for(backend, 9)
    layouts = compact_layouts()
    inputs = make_inputs(layouts, n, case.seed + 4)
    for k, gs in enumerate(inputs.grads):
        gs[0] = None  # never a gradient
        if k < 2:
            gs[1] = None  # from step 2 on
        if k % 2 == 1:
            gs[2] = None  # every other step
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(ours, backend=backend)
    ref = case.make_torch(theirs)

    for k, gs in enumerate(inputs.grads):
        before = state_snapshot(opt)
        params_before = clone_all(ours)
        set_grads(ours, gs, k)
        set_grads(theirs, gs, k)
        opt.step()
        ref.step()
        after = state_snapshot(opt)
        for i, g in enumerate(gs):
            if g is None:
                if i == 0 or (i == 1 and k < 2):
                    assert not after[i], (k, i)
                assert_same_state({0: before[i]}, {0: after[i]})
                assert torch.equal(ours[i].cpu(), params_before[i].cpu()), (k, i)
        assert_close_all(ours, theirs, f"step {k}")
    assert ours[0] not in opt.state or not opt.state[ours[0]]
    if case.ours is not fastsched.SGD:
        expected = [n - 2, (n + 1) // 2]
        assert [float(opt.state[p]["step"]) for p in ours[1:3]] == expected
        assert [float(ref.state[p]["step"]) for p in theirs[1:3]] == expected


@pytest.mark.parametrize("case", [ADAMW, SGD_MOM], ids=lambda c: c.id)
def test_zero_grad(case, backend, device):
    n = steps_for(backend, 6)
    inputs = make_inputs(compact_layouts(), n, case.seed + 5)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(ours, backend=backend)
    ref = case.make_torch(theirs)
    for k, gs in enumerate(inputs.grads):
        set_to_none = k % 2 == 0
        opt.zero_grad(set_to_none=set_to_none)
        ref.zero_grad(set_to_none=set_to_none)
        for p, q in zip(ours, theirs):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert not p.grad.any()
        # accumulate as backward() does: into the zeroed tensors, or fresh ones after None
        for p, q, g in zip(ours, theirs, gs):
            for t in (p, q):
                if t.grad is None:
                    t.grad = torch.empty_like(t).copy_(g)
                else:
                    t.grad.add_(g.to(t.device))
        opt.step()
        ref.step()
    assert_close_all(ours, theirs)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)


def test_step_without_any_gradient_changes_nothing(backend, device):
    inputs = make_inputs(compact_layouts(), 1, 6)
    params = inputs.params(device=device)
    opt = ADAMW.make(params, backend=backend)
    assert opt.step() is None
    assert not opt.state
    assert int(opt.clock.item()) == 0
    assert_all_equal([p.cpu() for p in params], inputs.init)


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fastsched.SGD([p], lr=0.1, backend="reference")

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 5.0
    assert torch.equal(p.detach(), torch.tensor([0.8, -1.6]))


# -- memory layouts -------------------------------------------------------------------------

def _strided_grads(kind: str, g: torch.Tensor) -> torch.Tensor:
    """``g``'s values (a contiguous tensor of >= 1 dimension) in an unusual memory layout."""
    if kind == "transposed":  # the transpose of a contiguous tensor of the reversed shape
        return g.t().contiguous().t() if g.dim() == 2 else g
    if kind == "expanded":  # stride 0 along the first dimension (g is constant along it)
        return g[:1].expand_as(g)
    if kind == "strided":  # every other element of a buffer twice as long
        out = torch.zeros((2 * g.numel(),), dtype=g.dtype, device=g.device)[::2].view(g.shape)
        return out.copy_(g)
    if kind == "offset":  # contiguous, one element into a buffer: not 16-byte aligned
        return Layout(tuple(g.shape), "offset").like(g)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["transposed", "expanded", "strided", "offset"])
@pytest.mark.parametrize("case", [ADAMW, SGD_MOM], ids=lambda c: c.id)
def test_non_contiguous_gradients(case, kind, backend, device):
    """Gradients laid out differently from their parameters give the same result as torch,
    and are not modified."""
    layouts = [Layout((5, 7)), Layout((BLOCK // 16 + 1, 17), "permuted"), Layout((BLOCK + 1,)),
               Layout(())]
    inputs = make_inputs(layouts, steps_for(backend, 6), case.seed + 7)
    if kind == "expanded":
        inputs.grads = [[g[:1].expand_as(g).clone() if g.dim() else g for g in gs]
                        for gs in inputs.grads]
    ours, theirs = inputs.params(device=device), inputs.params()
    opt = case.make(ours, backend=backend)
    ref = case.make_torch(theirs)
    for gs in inputs.grads:
        odd = [_strided_grads(kind, g.to(device)) if g.dim() else g.to(device) for g in gs]
        if kind == "transposed":
            assert not odd[0].is_contiguous()
        if kind == "expanded":
            assert odd[0].stride()[0] == 0
        if kind == "strided":
            assert odd[2].stride() == (2,)
        if kind == "offset":
            assert odd[0].is_contiguous() and odd[0].data_ptr() % 16 != 0
        kept = clone_all(odd)
        for p, g in zip(ours, odd):
            p.grad = g
        set_grads(theirs, gs, 0)
        opt.step()
        ref.step()
        assert_all_equal([g.cpu() for g in odd], [g.cpu() for g in kept], "gradient modified")
    assert_close_all(ours, theirs)


@pytest.mark.parametrize("case", [ADAMW, SGD_MOM], ids=lambda c: c.id)
def test_permuted_and_channels_last_parameters(case, backend, device):
    """Dense non-contiguous parameters (permuted, channels_last) keep their layout; states
    take it too; results match torch with gradients in either layout."""
    inputs = make_inputs([Layout((4, 3, 5, 7))], steps_for(backend, 6), case.seed + 8)
    x = inputs.init[0]
    ours = [x.to(device).to(memory_format=torch.channels_last),
            x.to(device).clone().permute(2, 0, 3, 1)]
    theirs = [x.clone(), x.permute(2, 0, 3, 1).contiguous()]
    strides = [p.stride() for p in ours]
    opt = case.make(ours, backend=backend)
    ref = case.make_torch(theirs)
    for k, gs in enumerate(inputs.grads):
        g = gs[0].to(device)
        # gradient of the first in its own layout, of the second contiguous
        ours[0].grad = g.to(memory_format=torch.channels_last) if k % 2 else g.clone()
        ours[1].grad = g.permute(2, 0, 3, 1).contiguous()
        theirs[0].grad = gs[0].clone()
        theirs[1].grad = gs[0].permute(2, 0, 3, 1).contiguous()
        opt.step()
        ref.step()
    assert [p.stride() for p in ours] == strides
    for p in ours:
        for v in opt.state[p].values():
            if v.dim():
                assert v.stride() == p.stride()
    assert_close_all(ours, theirs)


@pytest.mark.parametrize("case", [ADAM, SGD_MOM], ids=lambda c: c.id)
def test_parameter_layout_changed_between_steps(case, backend, device):
    """``p.data`` replaced by a channels_last copy after a few steps (what
    ``model.to(memory_format=torch.channels_last)`` does): the states follow the new layout and
    the run matches torch."""
    inputs = make_inputs([Layout((4, 3, 5, 7)), Layout((6,))], 4, case.seed + 9)
    ours, theirs = inputs.params(device=device), inputs.params()
    opt, ref = case.make(ours, backend=backend), case.make_torch(theirs)
    for k, gs in enumerate(inputs.grads):
        if k == 2:
            for p in ours + theirs[:1]:
                if p.dim() == 4:
                    p.data = p.data.to(memory_format=torch.channels_last)
        set_grads(ours, gs, k)
        set_grads(theirs, gs, k)
        opt.step()
        ref.step()
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert_close_all(ours, theirs)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(10)[::2],
    lambda: torch.randn(4, 6)[:, :3],
    lambda: torch.randn(1, 3).expand(4, 3),
    lambda: torch.randn(3, 4, 5).permute(1, 0, 2)[:, :, :2],
], ids=["step2", "columns", "expanded", "permuted-slice"])
@pytest.mark.parametrize("cls", [fastsched.AdamW, fastsched.SGD])
def test_non_dense_parameter_rejected(cls, make):
    bad = make()
    ok = torch.randn(3)
    with pytest.raises(ValueError, match="dense"):
        cls([ok, bad], lr=0.1)
    opt = cls([ok], lr=0.1)
    with pytest.raises(ValueError, match="dense"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


def test_block_size_changes_nothing_numerically(kernel_device):
    """Two block sizes (one block per tensor, several blocks per tensor) give the same bits."""
    inputs = make_inputs([Layout((BLOCK + 1,)), Layout((3, 7))], 2, 31)
    out = []
    for bs in (16, 1024):
        params = inputs.params(device=kernel_device)
        opt = ADAMW.make(params, backend="triton", block_size=bs)
        run(opt, params, inputs.grads)
        out.append([p.cpu() for p in params])
    assert_all_equal(out[0], out[1])
