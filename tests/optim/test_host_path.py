"""The host path of step(): the C++ host helper (fastsched/csrc/host.cpp) against the Python path.

The helper decides, every step, whether the cached tables still describe the parameters,
gradients and states; the Python path (TableBuilder.key / cached / repoint) decides the same
from Python. Both must give the same tables and the same parameters after any sequence of the
things a training loop does between steps.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from fastsched.kernels import layout as L

import fastsched
from fastsched.optim import _hostext
from fastsched.optim._tables import TableBuilder

SLOW = -1


@pytest.fixture(scope="module")
def hx():
    mod = _hostext.wait()
    assert mod is not None, _hostext.status()  # a test machine has a C++ compiler
    return mod


@pytest.fixture
def python_path():
    """Run the test body with the helper switched off (the Python path)."""
    prev = _hostext._reset_for_tests(None, "off for this test")
    yield
    _hostext._reset_for_tests(*prev)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (7, 5), (300,), (3, 4, 5), (2049,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _armed(hx, opt):
    a = opt._tables.armed(hx, opt.param_groups)
    return a[0], a


def _call(hx, opt, key, a):
    return hx.check(opt.param_groups, len(key[1]), a[4], a[5], a[6], opt.state, a[7], a[8],
                    key[4][1])


def _check(hx, opt):
    """One call of the helper on the optimizer's cached key."""
    key, a = _armed(hx, opt)
    return _call(hx, opt, key, a)


def _grads(params, gen, pool=None):
    if pool is None:
        return [torch.randn(p.shape, generator=gen) for p in params]
    return [b.copy_(torch.randn(p.shape, generator=gen)) for p, b in zip(params, pool)]


def test_check_sees_every_change(hx):
    params = _params()
    opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
    gen = torch.Generator().manual_seed(1)
    pool = [torch.empty_like(p) for p in params]
    for p, g in zip(params, _grads(params, gen, pool)):
        p.grad = g
    opt.step()
    assert _check(hx, opt) == 0
    # new gradient objects at the same addresses (what the caching allocator usually gives)
    for p, g in zip(params, pool):
        p.grad = g.view_as(g)
    assert _check(hx, opt) == 0
    # two gradients at new addresses: counted, and the armed addresses follow
    params[2].grad = params[2].grad.clone()
    params[4].grad = params[4].grad.clone()
    key, a = _armed(hx, opt)
    before = a[2].clone()
    n = _call(hx, opt, key, a)
    assert n == 2
    assert a[2][2] == params[2].grad.data_ptr() and a[2][4] == params[4].grad.data_ptr()
    assert torch.equal(a[2][[0, 1, 3, 5]], before[[0, 1, 3, 5]])


@pytest.mark.parametrize("change", [
    "param_moved", "grad_none", "grad_transposed", "state_reset", "state_added",
    "state_replaced", "state_cleared", "param_replaced", "group_added", "subclass",
    "param_transposed", "group_moved"])
def test_check_leaves_other_changes_to_the_python_path(hx, change):
    params = _params()
    opt = fastsched.AdamW([{"params": params[:4]}, {"params": params[4:]}], lr=1e-2,
                          backend="cpu")
    gen = torch.Generator().manual_seed(1)
    for p, g in zip(params, _grads(params, gen)):
        p.grad = g
    opt.step()
    assert _check(hx, opt) == 0
    if change == "param_transposed":  # the same storage, another layout
        params[2].data = params[2].data.t()
        params[2].grad = params[2].grad.t()
    elif change == "group_moved":  # the same flat order, another group (hyperparameters)
        opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop())
    elif change == "param_moved":
        params[3].data = params[3].data.clone()
    elif change == "grad_none":
        params[1].grad = None
    elif change == "grad_transposed":
        g = params[2].grad
        params[2].grad = g.t().contiguous().t()
    elif change == "state_reset":
        opt.state[params[0]] = {}
    elif change == "state_replaced":  # a tensor put in place of a state inside its dict
        opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].clone()
    elif change == "state_added":
        opt.state[params[0]]["extra"] = torch.zeros(())
    elif change == "state_cleared":
        opt.state.clear()
    elif change == "param_replaced":
        q = torch.nn.Parameter(params[3].detach().clone())
        q.grad = params[3].grad
        opt.param_groups[0]["params"][3] = q
    elif change == "group_added":
        q = torch.nn.Parameter(torch.zeros(3))
        q.grad = torch.zeros(3)
        opt.param_groups.append({**opt.param_groups[0], "params": [q]})
    elif change == "subclass":
        class P(torch.nn.Parameter):
            pass
        q = P(params[3].detach().clone())
        q.grad = params[3].grad
        opt.param_groups[0]["params"][3] = q
    key, a = _armed(hx, opt)
    assert _call(hx, opt, key, a) == SLOW


def _script(opt_params, opt, steps=12, seed=3):
    """A training loop's worth of changes between steps; returns the parameters after each."""
    gen = torch.Generator().manual_seed(seed)
    pools = [[torch.empty_like(p) for p in opt_params] for _ in range(2)]
    out = []
    for k in range(steps):
        grads = _grads(opt_params, gen, pools[(k // 3) % 2])  # addresses move every 3 steps
        for p, g in zip(opt_params, grads):
            p.grad = g.view_as(g)  # new objects every step
        if k == 4:
            opt_params[1].grad = None  # a parameter without a gradient this step
        if k == 6:
            opt_params[3].data = opt_params[3].data.clone()  # p.data replaced
        if k == 7:
            opt_params[2].grad = opt_params[2].grad.t().contiguous().t()  # another layout
        if k == 8:  # a state tensor replaced inside its dict
            st = opt.state[opt_params[4]]
            st["exp_avg"] = st["exp_avg"] * 0.5
        if k == 9:
            opt.param_groups[0]["lr"] *= 0.5
        opt.step()
        out.append([p.detach().clone() for p in opt_params])
        opt.zero_grad()
        assert all(p.grad is None for p in opt_params)
    return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_helper_and_python_path_agree(hx, backend):
    runs = {}
    for path in ("helper", "python"):
        params = _params()
        opt = fastsched.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                              stats=True, backend=backend)
        prev = _hostext._reset_for_tests(*((hx, None) if path == "helper" else (None, "off")))
        try:
            runs[path] = (_script(params, opt), opt.table_builds)
        finally:
            _hostext._reset_for_tests(*prev)
    (a, builds_a), (b, builds_b) = runs["helper"], runs["python"]
    assert builds_a == builds_b
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            assert torch.equal(x, y)
    # and both are right: the PyTorch reference over the same script (a table left pointing at
    # the storage `p.data = ...` freed once wrote there: heap corruption, then a crash)
    params = _params()
    ref = _script(params, fastsched.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                                          stats=True, backend="reference"))
    for step_a, step_r in zip(a, ref):
        for x, y in zip(step_a, step_r):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_the_helper_path_is_taken_and_rewrites_the_gradient_column(hx, monkeypatch):
    params = _params()
    opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    for p, g in zip(params, _grads(params, gen)):
        p.grad = g
    opt.step()
    calls = []
    orig = TableBuilder.key
    monkeypatch.setattr(TableBuilder, "key", staticmethod(
        lambda *a, **k: calls.append(1) or orig(*a, **k)))
    for _ in range(3):
        opt.zero_grad()
        for p, g in zip(params, _grads(params, gen)):  # new addresses every step
            p.grad = g
        opt.step()
        plan = opt._tables.plan
        want = [params[i].grad.data_ptr() for i in plan.order]
        assert plan.tensors[:, L.T_G].tolist() == want
    assert calls == []  # neither key() nor a rebuild
    assert opt.table_builds == 1


def test_previous_gradients_are_not_retained_on_the_helper_path(hx):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    opt = fastsched.AdamW(model.parameters(), lr=1e-3, backend="cpu")
    x = torch.randn(4, 5)
    refs = []
    for _ in range(4):
        model(x).square().mean().backward()
        refs.append(weakref.ref(model[0].weight.grad))
        opt.step()
        opt.zero_grad()
    gc.collect()
    assert all(r() is None for r in refs)
    assert opt.table_builds == 1


def test_zero_grads_sets_none_and_calls_subclass_setters(hx):
    seen = []

    class Traced(torch.Tensor):
        @property
        def grad(self):
            return super().grad

        @grad.setter
        def grad(self, value):
            seen.append(value)
            torch.Tensor.grad.__set__(self, value)

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.zeros(4, requires_grad=True)
    c = torch.zeros(2).as_subclass(Traced).requires_grad_()
    for t in (a, b, c):
        t.grad = torch.ones_like(t)
    seen.clear()
    hx.zero_grads([{"params": [a, b]}, {"params": [c]}])
    assert a.grad is None and b.grad is None and c.grad is None
    assert seen == [None]
    with pytest.raises(TypeError, match="params"):
        hx.zero_grads([{"not params": []}])


def test_zero_grad_under_a_torch_function_mode_goes_through_python(hx):
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "__set__":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    params = _params()
    opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
    for p in params:
        p.grad = torch.zeros_like(p)
    with Count():
        opt.zero_grad()
    assert Count.n == len(params)
    assert all(p.grad is None for p in params)


def test_python_path_gives_the_same_result(python_path):
    params = _params()
    opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
    assert _hostext.get() is None
    out = _script(params, opt, steps=4)
    assert len(out) == 4 and opt.table_builds >= 1


def test_mode_and_build_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSCHED_HOST_EXT", "sometimes")
    with pytest.raises(ValueError, match=r"FASTSCHED_HOST_EXT must be one of \['auto', 'off'"):
        _hostext._mode()
    monkeypatch.setenv("FASTSCHED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.raises(RuntimeError, match="false failed"):
        _hostext.build()
    assert list(tmp_path.rglob("*.so")) == []  # nothing half-written left behind
    # a failed build warns once and leaves the Python path, saying why
    prev = _hostext._reset_for_tests(None, None)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _hostext._load(True)
        assert len(w) == 1 and "could not be built" in str(w[0].message)
        assert _hostext.get() is None and "false failed" in _hostext.status()
    finally:
        _hostext._reset_for_tests(*prev)


@pytest.fixture(scope="module")
def build_of_an_exited_process(tmp_path_factory):
    """The cache directory of a build started by a process that has exited (it starts the
    build and ends). Started by the first test that asks for it: the auto-mode test below
    compiles its own module meanwhile, so the two compiles (~15 s each here) share the cores
    instead of running one after the other."""
    import os
    import subprocess
    import sys

    cache = tmp_path_factory.mktemp("exited-build")
    env = {**os.environ, "FASTSCHED_HOST_EXT": "auto", "FASTSCHED_CACHE_DIR": str(cache)}
    code = ("from fastsched.optim import _hostext; assert _hostext.get() is None; "
            "assert _hostext._thread is not None")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    return cache


def test_auto_mode_builds_in_the_background_and_switches_paths(monkeypatch, tmp_path,
                                                               build_of_an_exited_process):
    """The default: the first step starts the build and takes the Python path; once the module
    is there, steps take it (same tables, same results). A fresh cache directory, so this
    really compiles (~10-15 s)."""
    monkeypatch.setenv("FASTSCHED_HOST_EXT", "auto")
    monkeypatch.setenv("FASTSCHED_CACHE_DIR", str(tmp_path))
    prev = _hostext._reset_for_tests(None, None)
    saved_thread = _hostext._thread
    _hostext._thread = None
    try:
        params = _params()
        opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
        gen = torch.Generator().manual_seed(0)
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()  # starts the build; the Python path runs meanwhile
        assert _hostext._thread is not None
        assert _hostext.status() in ("being built",) or _hostext._module is not None
        mod = _hostext.wait(120)
        assert mod is not None, _hostext.status()
        assert list(tmp_path.rglob("fastsched_host*")), "the module is in the cache directory"
        assert "loaded from" in _hostext.status()
        ref_params = _params()
        ref = fastsched.AdamW(ref_params, lr=1e-2, backend="cpu")
        prev_mod = _hostext._reset_for_tests(None, "off")
        try:
            gen2 = torch.Generator().manual_seed(0)
            for p, g in zip(ref_params, _grads(ref_params, gen2)):
                p.grad = g
            ref.step()
        finally:
            _hostext._reset_for_tests(*prev_mod)
        for _ in range(3):  # helper on ours, Python path on the reference: the same steps
            opt.zero_grad()
            _hostext._reset_for_tests(None, "off")
            ref.zero_grad()
            gs = _grads(params, gen)
            for p, q, g in zip(params, ref_params, gs):
                p.grad, q.grad = g, g.clone()
            ref.step()
            _hostext._reset_for_tests(mod, None)
            opt.step()
        for a, b in zip(params, ref_params):
            assert torch.equal(a, b)
    finally:
        _hostext._reset_for_tests(*prev)
        _hostext._thread = saved_thread


def test_a_build_outlives_the_process_that_started_it(build_of_an_exited_process):
    """A process shorter than the build (a CLI run, a short job) still leaves the module in the
    cache: the compiler renames its own output."""
    import time

    cache = build_of_an_exited_process
    deadline = time.time() + 180
    while time.time() < deadline and not list(cache.rglob("fastsched_host*")):
        time.sleep(1)
    found = list(cache.rglob("fastsched_host*"))
    assert found, "the build did not finish after its process exited"
    assert found[0].stat().st_mode & 0o044, "readable by others sharing the cache"


def test_no_cache_directory_leaves_the_python_path(monkeypatch):
    def nowhere():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(_hostext, "_cache_dir", nowhere)
    monkeypatch.setenv("FASTSCHED_HOST_EXT", "auto")
    prev = _hostext._reset_for_tests(None, None)
    saved_thread, _hostext._thread = _hostext._thread, None
    try:
        params = _params()
        opt = fastsched.AdamW(params, lr=1e-2, backend="cpu")
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.warns(RuntimeWarning, match="cannot be built here"):
            opt.step()
        opt.zero_grad()
        assert "home directory" in _hostext.status()
    finally:
        _hostext._reset_for_tests(*prev)
        _hostext._thread = saved_thread


@pytest.mark.parametrize("path", ["helper", "python"])
def test_layout_and_group_changes_between_steps_follow_torch(hx, path):
    """`p.data = p.data.t()` (same storage, another layout) and a parameter moved to another
    group with the flat order unchanged: both paths rebuild, and the steps equal torch's."""
    torch.manual_seed(0)
    mk = [torch.randn(6, 6), torch.randn(5), torch.randn(4)]
    ours = [torch.nn.Parameter(t.clone()) for t in mk]
    ref = [torch.nn.Parameter(t.clone()) for t in mk]
    groups = lambda ps: [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.0}]  # noqa
    opt = fastsched.AdamW(groups(ours), backend="cpu", weight_decay=0.0)
    topt = torch.optim.AdamW(groups(ref), weight_decay=0.0)
    prev = _hostext._reset_for_tests(*((hx, None) if path == "helper" else (None, "off")))
    try:
        for k in range(4):
            if k == 1:
                for ps in (ours, ref):
                    ps[0].data = ps[0].data.t()
            if k == 2:  # b to the lr 0 group: [a], [b, c]
                for o in (opt, topt):
                    o.param_groups[1]["params"].insert(0, o.param_groups[0]["params"].pop())
            g = [torch.randn(p.shape) for p in ours]
            for p, q, x in zip(ours, ref, g):
                p.grad, q.grad = x.clone(), x.clone()
            opt.step()
            topt.step()
            for p, q in zip(ours, ref):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        _hostext._reset_for_tests(*prev)


def test_a_gradient_without_storage_is_refused():
    from torch.testing._internal.two_tensor import TwoTensor

    p = torch.nn.Parameter(torch.zeros(4))
    opt = fastsched.AdamW([p], lr=1e-2, backend="cpu")
    p.grad = TwoTensor(torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="does not support gradients of type TwoTensor"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))
