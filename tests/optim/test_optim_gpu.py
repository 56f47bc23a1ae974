"""On a CUDA GPU: capture and replay of step() in a CUDA graph, no host synchronisation in
step(), and parity with torch's fused CUDA optimizers in GPU arithmetic."""

from __future__ import annotations

import pytest
import torch
from optim_cases import (
    ADAM,
    ADAMW,
    BLOCK,
    SGD_NESTEROV,
    Case,
    Inputs,
    assert_all_equal,
    by_id,
    make_inputs,
    run,
)

from fastsched.schedules import Cosine
from fastsched.testing import TOLERANCES, assert_low_precision_close, awkward_layouts

pytestmark = pytest.mark.gpu

STEPS = 50
GRAPHED = [ADAMW, ADAM, SGD_NESTEROV, by_id("SGD-momentum=0.9-dampening=0.3-maximize")]


def layouts():
    return awkward_layouts(BLOCK, empty=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GRAPHED, ids=lambda c: c.id)
def test_cuda_graph_replay_equals_eager(case, dtype):
    """Warm up (states and tables exist), capture one step with static gradients, replay it
    with new gradient values: bit for bit the eager optimizer, schedule clock included."""
    n = 12
    lay = layouts()
    inputs = make_inputs(lay, n, case.seed + 40)
    sched = Cosine(total_steps=n, warmup_steps=3, min_ratio=0.1)
    graphed = inputs.params(dtype=dtype, device="cuda")
    eager = inputs.params(dtype=dtype, device="cuda")
    static = [l.make(g, dtype=dtype, device="cuda") for l, g in zip(lay, inputs.grads[0])]
    for p, g in zip(graphed, static):
        p.grad = g
    opt = case.make(graphed, backend="triton", schedule=sched)
    opt.step()  # step 0: states, tables, compiled kernels
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # step 1 on a side stream, as torch's capture recipe does
        for g, new in zip(static, inputs.grads[1]):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    assert int(opt.clock.item()) == 2  # capturing ran nothing

    ref = case.make(eager, backend="triton", schedule=sched)
    run(ref, eager, inputs.grads[:2])
    for k in range(2, n):
        for g, new in zip(static, inputs.grads[k]):
            g.copy_(new)
        graph.replay()
        run(ref, eager, [inputs.grads[k]], start=k)
        torch.cuda.synchronize()
        assert_all_equal(graphed, eager, f"replay of step {k}")
    assert int(opt.clock.item()) == int(ref.clock.item()) == n
    for p, q in zip(graphed, eager):
        for name, v in opt.state[p].items():
            assert torch.equal(v, ref.state[q][name]), name


@pytest.mark.parametrize("case", [ADAMW, ADAM, SGD_NESTEROV], ids=lambda c: c.id)
def test_step_does_not_synchronize(case):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: none in
    step(), with the cached tables, new gradient tensors, or an lr changed between steps."""
    inputs = make_inputs(layouts(), 5, case.seed + 41)
    params = inputs.params(device="cuda")
    opt = case.make(params, backend="triton", schedule=Cosine(total_steps=10, warmup_steps=2))
    run(opt, params, inputs.grads[:1])
    new_grads = [torch.empty_like(p).copy_(g) for p, g in zip(params, inputs.grads[1])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # the same gradient tensors
        for p, g in zip(params, new_grads):  # new gradient tensors
            p.grad = g
        opt.step()
        opt.param_groups[0]["lr"] *= 0.5  # a new group table
        opt.step()
        opt.zero_grad(set_to_none=False)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert int(opt.clock.item()) == 5


# -- parity in GPU arithmetic ---------------------------------------------------------------

NATIVE = ["AdamW-weight_decay=0.1", "Adam-weight_decay=0.1-amsgrad-maximize",
          "SGD-momentum=0.9-nesterov-weight_decay=0.1", "SGD-momentum=0.9-dampening=0.3"]


def _run(case: Case, inputs: Inputs, dtype, ours: bool, fused: bool = True):
    params = inputs.params(dtype=dtype, device="cuda")
    if ours:
        opt = case.make(params, backend="triton")
    else:
        opt = case.make_torch(params, **({"fused": True} if fused else {"foreach": False}))
    run(opt, params, inputs.grads)
    torch.cuda.synchronize()
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NATIVE)
def test_native_parity_with_torch_fused_cuda(name, dtype):
    case = by_id(name)
    inputs = make_inputs(layouts(), STEPS, case.seed + 42)
    r = lambda t: t.to(dtype).to(torch.float32)  # noqa: E731 - the same rounded inputs
    inputs = Inputs(inputs.layouts, [r(t) for t in inputs.init],
                    [[r(g) for g in gs] for gs in inputs.grads])
    ours = _run(case, inputs, dtype, True)
    fused = _run(case, inputs, dtype, False)
    if dtype == torch.float32:
        for i, (a, b) in enumerate(zip(ours, fused)):
            torch.testing.assert_close(a, b, **TOLERANCES[dtype],
                                       msg=lambda m, i=i: f"tensor {i}: {m}")
        return
    ref = _run(case, inputs, torch.float64, False, fused=False)
    assert_low_precision_close(ours, fused, ref, msg=f"{name} vs torch fused CUDA")
