"""The optimizer configurations under test, and the helpers that drive them side by side with
``torch.optim``. One table (``CASES``) drives the generic tests: parity over many steps, state
dict round trips, parameter groups, lr changes mid-run and the triton-vs-reference check.
"""

from __future__ import annotations

import io
import itertools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import fastsched
from fastsched.testing import Layout, awkward_layouts, random_values

#: block size for the tests: tensors larger than a block are cheap to build and to run
BLOCK = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run its tests with one torch thread."""
    # the tensors here are small: two OpenMP threads on a 2-core machine that is also running
    # the interpreter made torch.optim 20-300x slower (58 ms vs 1.6 ms per AdamW step)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: fastsched class, its torch twin and the keyword arguments."""

    ours: type
    theirs: type
    kwargs: tuple[tuple[str, object], ...]

    @property
    def kw(self) -> dict:
        return dict(self.kwargs)

    @property
    def id(self) -> str:
        parts = [self.ours.__name__]
        for k, v in self.kwargs:
            if k == "lr":
                continue
            parts.append(k if v is True else f"{k}={v}")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        """A seed derived from the configuration, so every case draws its own inputs."""
        return zlib.crc32(self.id.encode())

    def make(self, params, **extra) -> torch.optim.Optimizer:
        extra.setdefault("block_size", BLOCK)
        return self.ours(params, **self.kw, **extra)

    def make_torch(self, params, **extra) -> torch.optim.Optimizer:
        return self.theirs(params, **self.kw, **extra)

    def group(self) -> dict:
        """This configuration as a parameter group of ``fastsched.Adam`` / ``fastsched.SGD``
        (AdamW is Adam with ``decoupled_weight_decay=True``)."""
        g = self.kw
        if self.ours is fastsched.AdamW:
            g["decoupled_weight_decay"] = True
        return g


def _case(ours, theirs, **kw) -> Case:
    return Case(ours, theirs, tuple(kw.items()))


def _adam_cases() -> list[Case]:
    out = []
    for cls, theirs in ((fastsched.Adam, torch.optim.Adam), (fastsched.AdamW, torch.optim.AdamW)):
        for wd, amsgrad, maximize in itertools.product((0.0, 0.1), (False, True), (False, True)):
            kw = dict(lr=1e-2, weight_decay=wd)
            if amsgrad:
                kw["amsgrad"] = True
            if maximize:
                kw["maximize"] = True
            out.append(_case(cls, theirs, **kw))
    return out


def _sgd_cases() -> list[Case]:
    out = []
    moms = ((0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True))
    for (mom, damp, nest), wd, maximize in itertools.product(moms, (0.0, 0.1), (False, True)):
        kw = dict(lr=1e-2)
        if mom:
            kw["momentum"] = mom
        if damp:
            kw["dampening"] = damp
        if nest:
            kw["nesterov"] = True
        if wd:
            kw["weight_decay"] = wd
        if maximize:
            kw["maximize"] = True
        out.append(_case(fastsched.SGD, torch.optim.SGD, **kw))
    return out


#: every supported option combination: Adam / AdamW x weight decay 0 / 0.1 x amsgrad x maximize,
#: SGD x (no momentum | momentum | momentum + dampening | nesterov) x weight decay x maximize
CASES: list[Case] = _adam_cases() + _sgd_cases()
ADAM_CASES = [c for c in CASES if c.ours is not fastsched.SGD]
SGD_CASES = [c for c in CASES if c.ours is fastsched.SGD]


def by_id(name: str) -> Case:
    for c in CASES:
        if c.id == name:
            return c
    raise KeyError(name)


#: one case per optimizer class, for the tests of machinery shared by all configurations
ADAMW = by_id("AdamW-weight_decay=0.1")
ADAM = by_id("Adam-weight_decay=0.1-amsgrad")
SGD_MOM = by_id("SGD-momentum=0.9-weight_decay=0.1")
SGD_NESTEROV = by_id("SGD-momentum=0.9-nesterov")
BASIC = [ADAMW, ADAM, SGD_MOM]


# -- inputs -----------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Initial values and a gradient sequence (float32, CPU) for a list of layouts."""

    layouts: list[Layout]
    init: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]]

    def params(self, dtype=torch.float32, device="cpu", keep_layout=True) -> list[torch.Tensor]:
        """Fresh parameters with the initial values (rounded to ``dtype``)."""
        return [(l if keep_layout else Layout(l.shape)).make(v, dtype=dtype, device=device)
                for l, v in zip(self.layouts, self.init)]


def make_inputs(layouts: Sequence[Layout], steps: int, seed: int, *, grad_scale: float = 1.0,
                init_scale: float = 1.0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    init = random_values(layouts, gen, init_scale)
    grads = [random_values(layouts, gen, grad_scale) for _ in range(steps)]
    return Inputs(list(layouts), init, grads)


def awkward_inputs(steps: int, seed: int, **kw) -> Inputs:
    return make_inputs(awkward_layouts(BLOCK, empty=True), steps, seed, **kw)


def compact_layouts(block: int = BLOCK) -> list[Layout]:
    """Fewer tensors and programs for the interpreter (7 update programs), still 0-d,
    1 element, block +- 1 (the first at an unaligned address), a permuted matrix of exactly two
    blocks and an empty tensor."""
    return [Layout(()), Layout((1,)), Layout((block - 1,), "offset"), Layout((block + 1,)),
            Layout((block // 8, 16), "permuted"), Layout((0, 3))]


def set_grads(params, grads, step: int) -> None:
    """Give each parameter its gradient of this step, in the parameter's layout (as autograd
    does). Every other step writes into the existing gradient tensors instead of new ones, so
    both the cached-table path and the new-gradient path of the fused step run."""
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        elif p.grad is not None and step % 2 == 1 and p.grad.stride() == p.stride():
            p.grad.copy_(g)
        else:
            p.grad = torch.empty_like(p).copy_(g)


def run(opt, params, grads: Sequence[Sequence[torch.Tensor | None]], *, start: int = 0,
        after_step: Callable[[int], None] | None = None) -> None:
    for k, gs in enumerate(grads):
        set_grads(params, gs, start + k)
        opt.step()
        if after_step is not None:
            after_step(start + k)


def clone_all(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


def state_snapshot(opt) -> dict:
    """Deep copy of every parameter's state (tensors cloned)."""
    out = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p, {})
        out[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            x, y = a[i][k], b[i][k]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), (i, k)
            else:
                assert x == y, (i, k)


def save_load(sd: dict, map_location=None) -> dict:
    """A state dict as it comes back from disk (no tensor shared with the live optimizer)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False, map_location=map_location)


def assert_all_equal(xs, ys, msg="") -> None:
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, (msg, i)
        assert torch.equal(x, y), f"{msg}: tensor {i} (shape {tuple(x.shape)}) differs, max " \
                                  f"{(x.double() - y.double()).abs().max().item():.3g}"
