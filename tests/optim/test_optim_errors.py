"""Bad input: errors worded like torch.optim's, raised before anything is modified."""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_cases import (
    ADAM,
    ADAMW,
    BASIC,
    SGD_MOM,
    assert_all_equal,
    assert_same_state,
    clone_all,
    compact_layouts,
    make_inputs,
    one_thread,  # noqa: F401 - autouse fixture
    run,
    state_snapshot,
)

import fastsched
from fastsched.optim import _cpu
from fastsched.schedules import Cosine

CLASSES = [fastsched.Adam, fastsched.AdamW, fastsched.SGD]


def _trained(case, backend="reference", device="cpu", steps=2):
    """An optimizer after a few steps (so there are states and cached tables to corrupt)."""
    inputs = make_inputs(compact_layouts(), steps + 1, case.seed + 30)
    params = inputs.params(device=device)
    opt = case.make(params, backend=backend, schedule=Cosine(total_steps=10))
    run(opt, params, inputs.grads[:steps])
    return opt, params, inputs.grads[steps]


class Unchanged:
    """Context: the optimizer's parameters, states, clock and groups are as they were."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params

    def __enter__(self):
        self.p = clone_all(self.params)
        self.s = state_snapshot(self.opt)
        self.c = int(self.opt.clock.item())
        self.g = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.n = [len(g["params"]) for g in self.opt.param_groups]
        return self

    def __exit__(self, *exc):
        assert_all_equal([p.cpu() for p in self.params], [p.cpu() for p in self.p])
        assert_same_state(state_snapshot(self.opt), self.s)
        assert int(self.opt.clock.item()) == self.c
        assert [len(g["params"]) for g in self.opt.param_groups] == self.n
        return False


# -- construction ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs,match", [
    (fastsched.Adam, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (fastsched.AdamW, dict(lr=float("nan")), "Invalid learning rate"),
    (fastsched.SGD, dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (fastsched.Adam, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (fastsched.AdamW, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (fastsched.Adam, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (fastsched.Adam, dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
    (fastsched.AdamW, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (fastsched.SGD, dict(lr=0.1, momentum=-0.5), "Invalid momentum value: -0.5"),
    (fastsched.SGD, dict(lr=0.1, weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (fastsched.SGD, dict(lr=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    (fastsched.SGD, dict(lr=0.1, nesterov=True, momentum=0.9, dampening=0.1),
     "Nesterov momentum requires a momentum and zero dampening"),
    (fastsched.SGD, dict(lr=0.1, momentum=0.9, dampening=1.5), "Invalid dampening value: 1.5"),
    (fastsched.SGD, dict(lr=0.1, momentum=0.9, dampening=-0.5), "Invalid dampening value"),
    (fastsched.Adam, dict(differentiable=True), "differentiable=True is not supported"),
    (fastsched.SGD, dict(differentiable=True), "differentiable=True is not supported"),
    (fastsched.AdamW, dict(backend="cuda"), "backend must be one of"),
    (fastsched.AdamW, dict(block_size=100), "block_size must be a power of two"),
    (fastsched.AdamW, dict(block_size=8), "block_size must be a power of two"),
    (fastsched.SGD, dict(lr=0.1, block_size=256.0), "block_size must be a power of two"),
    (fastsched.AdamW, dict(schedule=lambda t: 1.0), "schedule must be a fastsched"),
    (fastsched.AdamW, dict(schedule="cosine"), "schedule must be a fastsched"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_invalid_arguments(cls, kwargs, match):
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=match):
        cls([p], **kwargs)


def test_torch_wording_matches():
    """The hyperparameter messages are torch's, word for word."""
    p = torch.zeros(3)
    pairs = [(fastsched.Adam, torch.optim.Adam, dict(lr=-1.0)),
             (fastsched.Adam, torch.optim.Adam, dict(eps=-1.0)),
             (fastsched.AdamW, torch.optim.AdamW, dict(betas=(0.5, 1.0))),
             (fastsched.AdamW, torch.optim.AdamW, dict(weight_decay=-2.0)),
             (fastsched.SGD, torch.optim.SGD, dict(lr=0.1, momentum=-1.0)),
             (fastsched.SGD, torch.optim.SGD, dict(lr=0.1, nesterov=True))]
    for ours, theirs, kw in pairs:
        with pytest.raises(ValueError) as a:
            ours([p], **kw)
        with pytest.raises(ValueError) as b:
            theirs([p], **kw)
        assert str(a.value) == str(b.value)


def test_compatibility_arguments_accepted():
    p = torch.zeros(3)
    fastsched.AdamW([p], foreach=True, fused=True, capturable=True)
    fastsched.Adam([p], foreach=False, fused=False, decoupled_weight_decay=True)
    fastsched.SGD([p], lr=0.1, foreach=True, fused=True)


@pytest.mark.parametrize("cls", CLASSES)
def test_complex_parameters_rejected(cls):
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        cls([torch.zeros(3), torch.zeros(3, dtype=torch.complex64)], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.uint8])
def test_unsupported_dtypes_rejected(dtype):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, "
                                         "float64|complex"):
        fastsched.AdamW([torch.zeros(3, dtype=dtype)])


def test_float64_parameters_need_a_cpu_backend():
    """float64 parameters run on the CPU backends; the Triton kernels refuse them by name,
    at construction or at the step that would build Triton tables."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="float64 is not supported by the Triton backend"):
        fastsched.AdamW([p], backend="triton")
    opt = fastsched.AdamW([p], backend="reference")
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == torch.float64 and (p < 0).all()
    opt.backend = "triton"
    before = p.detach().clone()
    with pytest.raises(ValueError, match="float64 parameters are not supported by the Triton"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_mixed_devices_rejected():
    cpu, meta = torch.zeros(3), torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="all parameters on one device"):
        fastsched.AdamW([cpu, meta])
    with pytest.raises(ValueError, match="all parameters on one device"):
        fastsched.SGD([{"params": [meta]}, {"params": [cpu]}], lr=0.1)
    opt = fastsched.AdamW([cpu])
    with pytest.raises(ValueError, match="all parameters on one device"):
        opt.add_param_group({"params": [meta]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [cpu]


@pytest.mark.parametrize("cls", CLASSES)
def test_duplicate_parameters_rejected(cls):
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match="appear more than once"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch itself only warns about this one
        cls([a, b, a], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [a]}, {"params": [b, a]}], lr=0.1)
    opt = cls([a], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [b, a]})
    with pytest.raises(ValueError, match="appear more than once"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.add_param_group({"params": [b, b]})
    assert len(opt.param_groups) == 1


def test_add_param_group_validates_hyperparameters():
    opt, params, _ = _trained(ADAMW)
    extra = torch.zeros(5)
    with Unchanged(opt, params):
        with pytest.raises(ValueError, match="Invalid learning rate"):
            opt.add_param_group({"params": [extra], "lr": -1.0})
        with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
            opt.add_param_group({"params": [extra], "betas": (0.9, 1.0)})
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5


# -- at step() ------------------------------------------------------------------------------

BACKEND_CASES = [(c, "reference") for c in BASIC] + [(ADAMW, "triton"), (SGD_MOM, "triton")]


@pytest.mark.parametrize("case,backend", BACKEND_CASES,
                         ids=[f"{c.id}-{b}" for c, b in BACKEND_CASES])
def test_sparse_gradient_raises_before_any_change(case, backend, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    opt, params, grads = _trained(case, backend, device)
    for p, g in zip(params, grads):
        p.grad = g.to(device)
    params[2].grad = None
    sparse = torch.zeros(params[3].shape, device=device)
    sparse[1] = 1.0
    params[3].grad = sparse.to_sparse()
    with Unchanged(opt, params):
        with pytest.raises(RuntimeError, match=f"{case.ours.__name__} does not support sparse "
                                               "gradients"):
            opt.step()
    # with the sparse gradient gone, the step runs
    params[3].grad = None
    opt.step()


HYPER_BREAKS = {
    fastsched.AdamW: [("lr", -1.0, "Invalid learning rate"),
                      ("betas", (1.0, 0.999), "Invalid beta parameter at index 0"),
                      ("eps", -1.0, "Invalid epsilon value"),
                      ("weight_decay", -0.5, "Invalid weight_decay value")],
    fastsched.Adam: [("betas", (0.9, 1.0), "Invalid beta parameter at index 1"),
                     ("lr", float("inf"), "Invalid learning rate")],
    fastsched.SGD: [("lr", -1.0, "Invalid learning rate"),
                    ("momentum", -0.9, "Invalid momentum value"),
                    ("dampening", 2.0, "Invalid dampening value"),
                    ("nesterov", True, "Nesterov momentum requires")],
}
BREAKS = [(c, k, v, m) for c in BASIC for k, v, m in HYPER_BREAKS[c.ours]]


@pytest.mark.parametrize("case,key,value,match", BREAKS,
                         ids=[f"{c.id}-{k}" for c, k, _, _ in BREAKS])
def test_hyperparameter_made_invalid_between_steps(case, key, value, match):
    """``group[key] = bad`` between steps: step() raises ValueError and changes nothing; once
    restored, training continues as if nothing had happened."""
    opt, params, grads = _trained(case)
    twin, twin_params, _ = _trained(case)
    for p, q, g in zip(params, twin_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    group = opt.param_groups[0]
    saved = dict(group)
    group[key] = value
    if case.ours is fastsched.SGD and key == "nesterov":
        group["dampening"] = 0.5  # nesterov needs zero dampening
    with Unchanged(opt, params):
        with pytest.raises(ValueError, match=match):
            opt.step()
    group.update(saved)
    opt.step()
    twin.step()
    assert_all_equal(params, twin_params)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """backend="triton" on CPU tensors without TRITON_INTERPRET=1 is refused at step()."""
    opt, params, grads = _trained(ADAMW, steps=1)
    opt.backend = "triton"
    for p, g in zip(params, grads):
        p.grad = g
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with Unchanged(opt, params):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            opt.step()


def test_set_schedule_arguments():
    opt, params, _ = _trained(ADAM)
    with pytest.raises(ValueError, match="schedule must be a fastsched"):
        opt.set_schedule(lambda t: 1.0)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="clock must be an integer >= 0"):
            opt.set_schedule(Cosine(total_steps=5), clock=bad)
    sched = Cosine(total_steps=8, warmup_steps=2)
    opt.set_schedule(sched, clock=3)
    assert int(opt.clock.item()) == 3
    assert opt.current_lr() == [ADAM.kw["lr"] * sched(3)]


def test_gradient_of_wrong_shape_raises_before_any_change():
    opt, params, grads = _trained(ADAM)
    for p, g in zip(params, grads):
        p.grad = g
    # autograd refuses such a gradient; .data swaps in behind its back
    params[1].grad.data = torch.zeros(params[1].numel() + 1)
    with Unchanged(opt, params):
        with pytest.raises(RuntimeError, match="does not match its parameter"):
            opt.step()


def _replaced(case: str, p: torch.Tensor) -> torch.Tensor:
    """What ``p.data`` becomes in each case of the test below."""
    if case == "shape":  # another number of elements: the states no longer fit
        return torch.randn(p.numel() + 7)
    if case == "strided":  # every other column of a wider tensor (not dense)
        return torch.randn(p.shape[0], 2 * p.shape[1])[:, ::2]
    if case == "complex":
        return torch.randn(p.shape, dtype=torch.complex64)
    if case == "float8":
        return torch.randn(p.shape).to(torch.float8_e4m3fn)
    return torch.randn(tuple(reversed(p.shape))).t()  # "transposed": dense, not contiguous


CPU_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu.available(), reason="the compiled CPU backend is not built"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,allora,match", [
    ("shape", False, r"\['params'\]\[1\]: its state 'exp_avg' has shape \(3, 5\), the "
                     r"parameter \(22,\)"),
    ("strided", False, r"\['params'\]\[1\]: parameters must be dense in memory"),
    ("complex", False, r"\['params'\]\[1\]: complex parameters are not supported"),
    ("float8", False, r"\['params'\]\[1\]: dtype must be one of float32, .*float8_e4m3fn"),
    ("transposed", True, r"\['params'\]\[1\]: ALLoRA units need contiguous parameters"),
])
def test_parameter_data_replaced_after_the_first_step(backend, case, allora, match):
    """``p.data`` replaced after the states were made is checked again when the tables are
    rebuilt, before anything is modified: the executors walk p and its states as flat arrays
    of p's size (a smaller state was read and written past its end by the compiled backend, a
    strided p updated elements outside it)."""
    params = [torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(3, 5))]
    kw = {"allora_eta": 2.0} if allora else {}
    opt = fastsched.AdamW(params, lr=0.1, backend=backend, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[1].data = _replaced(case, params[1])
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    with Unchanged(opt, params):
        with pytest.raises(ValueError, match=r"param_groups\[0\]" + match):
            opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sgd_momentum_of_another_shape_is_refused(backend):
    p = torch.nn.Parameter(torch.randn(4))
    opt = fastsched.SGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.randn(4)
    opt.step()
    p.data = torch.randn(9)
    p.grad = torch.randn(9)
    with Unchanged(opt, [p]):
        with pytest.raises(ValueError, match=r"state 'momentum_buffer' has shape \(4,\), the "
                                             r"parameter \(9,\)"):
            opt.step()


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        fastsched.AdamW([])


def test_non_tensor_parameter():
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        fastsched.SGD([torch.zeros(2), 3.0], lr=0.1)


def test_parameters_split_across_devices_after_construction_are_refused():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3))
    opt = fastsched.AdamW([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(5), torch.randn(3)
    opt.step()
    # as if part of the model had been moved (a meta tensor stands in for another device)
    moved = torch.nn.Parameter(torch.empty(3, device="meta"))
    moved.grad = torch.empty(3, device="meta")
    opt.param_groups[0]["params"][1] = moved
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="one device"):
        opt.step()
    assert torch.equal(a.detach(), before)


@pytest.mark.gpu
def test_model_moved_to_cuda_after_construction_runs_the_kernels():
    model = torch.nn.Linear(8, 4)
    opt = fastsched.AdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW([p.detach().clone().cuda().requires_grad_() for p in
                             model.parameters()], lr=1e-2)
    model.cuda()
    for p, q in zip(model.parameters(), ref.param_groups[0]["params"]):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    ref.step()
    assert opt.backend == "triton"
    for p, q in zip(model.parameters(), ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
