"""Checkpoints of the options below fp32: the export leaves the optimizer as it was, each
group's options survive a round trip (this version's checkpoints, earlier versions', torch's),
a bad checkpoint is refused before anything is modified, and ALLoRA under 8-bit states says
that its tensors keep float32 states."""

from __future__ import annotations

import copy
import io
import random
import warnings

import pytest
import torch

import fastsched
from fastsched.optim import _cpu

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu.available(), reason=f"no compiled CPU backend: {_cpu.reason()}"))]

#: a matrix of whole 256-element rows (8-bit states), a vector of partial blocks, a small one
SHAPES = [(8, 512), (1000,), (7,)]


def _gen():
    """A generator of fresh random inputs (its seed in the captured output of a failure)."""
    seed = random.randrange(2**31)
    print(f"inputs: torch.Generator().manual_seed({seed})")
    return torch.Generator().manual_seed(seed)


def _params(gen, dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _twins(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def _steps(opts_params, n, gen):
    """``n`` steps of each (optimizer, params) pair on the same fresh gradients."""
    for _ in range(n):
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        for opt, params in opts_params:
            _step(opt, params, torch.Generator().manual_seed(seed))


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(opt):
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()}
             for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return copy.deepcopy(groups), state, opt.seed, int(opt.clock.item())


def _assert_same(opt, snap):
    groups, state, seed, clock = _snapshot(opt)
    assert groups == snap[0]
    assert (seed, clock) == snap[2:]
    assert state.keys() == snap[1].keys()
    for i in state:
        assert state[i].keys() == snap[1][i].keys(), i
        for k, v in state[i].items():
            assert v.dtype == snap[1][i][k].dtype and torch.equal(v, snap[1][i][k]), (i, k)


def _assert_bits_equal(xs, ys):
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and torch.equal(x, y)


# -- export_state_dict --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(master_weights=True, state_dtype="8bit"),
                                dict(stochastic_rounding=True, state_dtype="8bit"),
                                dict(master_weights=True, state_dtype=torch.bfloat16)],
                         ids=["master-8bit", "sr-8bit", "master-bf16"])
def test_export_mid_run_changes_nothing(backend, kw):
    """An export between steps is a copy: the run goes on bit for bit as one without it
    (torch's state_dict hands out the optimizer's own per-parameter dicts)."""
    gen = _gen()
    params = _params(gen, torch.bfloat16)
    twin = _twins(params)
    kw = dict(lr=1e-2, backend=backend, min_8bit_size=0, seed=3, **kw)
    a, b = fastsched.AdamW(params, **kw), fastsched.AdamW(twin, **kw)
    _steps([(a, params), (b, twin)], 2, gen)
    keys = {i: sorted(a.state[p]) for i, p in enumerate(params)}
    exported = a.export_state_dict()
    assert {i: sorted(a.state[p]) for i, p in enumerate(params)} == keys
    for st in exported["state"].values():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
    assert not any(k in g for g in exported["param_groups"]
                   for k in ("state_dtype", "master_weights", "allora_eta"))
    _steps([(a, params), (b, twin)], 3, gen)
    _assert_bits_equal(params, twin)
    for p, q in zip(params, twin):
        assert a.state[p].keys() == b.state[q].keys()
        _assert_bits_equal([a.state[p][k] for k in a.state[p]], [b.state[q][k] for k in a.state[p]])


# -- group options across a round trip ---------------------------------------------------------

#: (constructor options, group 1's own, parameter dtype): group 1 set apart from the
#: constructor at the library's default, which earlier versions left out of the state dict
OVERRIDES = [
    (dict(state_dtype="8bit", min_8bit_size=0), dict(state_dtype=None), torch.float32),
    (dict(state_dtype=torch.bfloat16), dict(state_dtype=None), torch.float32),
    (dict(stochastic_rounding=True), dict(stochastic_rounding=False), torch.bfloat16),
    (dict(master_weights=True, state_dtype="8bit", min_8bit_size=0),
     dict(master_weights=False, min_8bit_size=4096), torch.bfloat16),
    (dict(allora_eta=2.0, allora_unit="column"), dict(allora_eta=None), torch.float32),
    (dict(state_dtype="8bit", min_8bit_size=0), dict(state_dtype=torch.float32),
     torch.float32),
]


def _grouped(params, ctor, own, backend, cls=fastsched.AdamW):
    return cls([{"params": params[:1]}, {"params": params[1:], **own}], lr=1e-2,
               backend=backend, **ctor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ctor,own,dtype", OVERRIDES, ids=[
    "8bit-none", "bf16-none", "sr-off", "master-off", "allora-off", "8bit-f32"])
def test_group_set_apart_from_the_constructor_survives_a_round_trip(backend, ctor, own, dtype):
    gen = _gen()
    shapes = [(8, 512), (4, 256), (1000,)]
    params = _params(gen, dtype, shapes)
    twin = _twins(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ALLoRA under 8-bit: its own test)
        a = _grouped(params, ctor, own, backend)
        _steps([(a, params)], 2, gen)
        sd = _save_load(a.state_dict())
        b = _grouped(twin, ctor, own, backend)
        b.load_state_dict(sd)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} \
            == {k: v for k, v in gb.items() if k != "params"}
    for p, q in zip(params, twin):
        assert a.state[p].keys() == b.state[q].keys()
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    _steps([(a, params), (b, twin)], 2, gen)
    _assert_bits_equal(params, twin)


def test_sgd_group_set_apart_survives_a_round_trip():
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (2000,)])
    kw = dict(lr=1e-2, momentum=0.9, state_dtype="8bit", min_8bit_size=0, backend="reference")
    a = fastsched.SGD([{"params": params[:1]}, {"params": params[1:], "state_dtype": None}],
                      **kw)
    _steps([(a, params)], 2, gen)
    b = fastsched.SGD([{"params": _twins(params)[:1]},
                       {"params": _twins(params)[1:], "state_dtype": None}], **kw)
    b.load_state_dict(_save_load(a.state_dict()))
    assert b.param_groups[1]["state_dtype"] is None
    assert set(b.state[b.param_groups[1]["params"][0]]) == {"step", "momentum_buffer"}


def test_state_dict_leaves_out_the_optimizers_defaults_only():
    """Keys at this optimizer's defaults are left out (a torch.distributed.checkpoint load asks
    for every key; a torch checkpoint has none), the constructor's values that are not the
    library's defaults are recorded once, and a configuration at the library's defaults gives
    the state dict of earlier versions."""
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (300,)])
    opt = fastsched.AdamW([{"params": params[:1]}, {"params": params[1:], "state_dtype": None}],
                          state_dtype="8bit", min_8bit_size=0, backend="reference")
    sd = opt.state_dict()
    g0, g1 = sd["param_groups"]
    assert "state_dtype" not in g0 and "min_8bit_size" not in g0 and "allora_eta" not in g0
    assert g1["state_dtype"] is None and "min_8bit_size" not in g1
    assert sd["fastsched"]["group_defaults"] == {"state_dtype": "8bit", "min_8bit_size": 0}
    plain = fastsched.AdamW(params, backend="reference").state_dict()
    assert "group_defaults" not in plain["fastsched"]
    assert not any(k in plain["param_groups"][0] for k in (
        "state_dtype", "master_weights", "stochastic_rounding", "min_8bit_size", "allora_eta",
        "allora_unit", "allora_apply"))


def test_checkpoint_of_an_earlier_version_resumes_as_saved():
    """Earlier versions left a key out where it equalled the library's default (ALLoRA's three
    when it was off) and wrote no "group_defaults": such a key is the library's default, not
    the loading constructor's."""
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (4, 256), (1000,)])
    ctor = dict(state_dtype="8bit", min_8bit_size=0, allora_eta=2.0)
    a = fastsched.AdamW([{"params": params[:1], "allora_eta": None},
                         {"params": params[1:], "state_dtype": None, "allora_eta": None}],
                        lr=1e-2, backend="reference", **ctor)
    _steps([(a, params)], 2, gen)
    sd = copy.deepcopy(a.state_dict())
    # as an earlier version saved it
    del sd["fastsched"]["group_defaults"]
    g0, g1 = sd["param_groups"]
    g0.update(state_dtype="8bit", min_8bit_size=0)
    g1.update(min_8bit_size=0)
    del g1["state_dtype"]
    for g in (g0, g1):
        for k in ("allora_eta", "allora_unit", "allora_apply"):
            g.pop(k, None)
    twin = _twins(params)
    b = fastsched.AdamW([{"params": twin[:1], "allora_eta": None},
                         {"params": twin[1:], "state_dtype": None, "allora_eta": None}],
                        lr=1e-2, backend="reference", **ctor)
    b.load_state_dict(sd)
    assert [g["state_dtype"] for g in b.param_groups] == ["8bit", None]
    assert [g["allora_eta"] for g in b.param_groups] == [None, None]
    assert "exp_avg" in b.state[twin[1]] and "exp_avg_code" in b.state[twin[0]]
    _steps([(a, params), (b, twin)], 2, gen)
    _assert_bits_equal(params, twin)


def test_fastsched_checkpoint_restores_the_saved_options_over_the_constructor():
    """A fastsched checkpoint's groups come back as saved (as its lr does), whatever the
    loading optimizer was built with; a group's option set after the load changes it."""
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512)])
    a = fastsched.AdamW(params, lr=1e-2, backend="reference")
    _steps([(a, params)], 2, gen)
    twin = _twins(params)
    b = fastsched.AdamW(twin, lr=1e-2, state_dtype="8bit", min_8bit_size=0, backend="reference")
    b.load_state_dict(_save_load(a.state_dict()))
    assert b.param_groups[0]["state_dtype"] is None
    assert b.param_groups[0]["min_8bit_size"] == fastsched.optim._lowp.MIN_8BIT_SIZE
    assert b.state[twin[0]]["exp_avg"].dtype == torch.float32
    b.param_groups[0].update(state_dtype="8bit", min_8bit_size=0)
    _steps([(b, twin)], 1, gen)
    assert "exp_avg_code" in b.state[twin[0]]


def _torch_checkpoint(gen, params, amsgrad=False):
    tp = _twins(params)
    t = torch.optim.AdamW([{"params": tp[:1]}, {"params": tp[1:]}], lr=1e-2, amsgrad=amsgrad)
    _steps([(t, tp)], 2, gen)
    return t.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_checkpoint_keeps_each_groups_own_options(backend):
    """A torch.optim checkpoint has none of fastsched's group keys: each group keeps its own
    (per-group 8-bit states: quantised on load), not the constructor's defaults."""
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (4, 256)])
    sd = _torch_checkpoint(gen, params)
    ours = _twins(params)
    opt = fastsched.AdamW([{"params": ours[:1], "state_dtype": "8bit", "min_8bit_size": 0},
                           {"params": ours[1:], "allora_eta": 3.0}], lr=1e-2, backend=backend)
    opt.load_state_dict(sd)
    g0, g1 = opt.param_groups
    assert (g0["state_dtype"], g0["min_8bit_size"], g0["allora_eta"]) == ("8bit", 0, None)
    assert (g1["state_dtype"], g1["allora_eta"], g1["allora_apply"]) == (None, 3.0, "update")
    assert "exp_avg" not in opt.state[ours[0]] \
        and opt.state[ours[0]]["exp_avg_code"].dtype == torch.uint8
    assert opt.state[ours[1]]["exp_avg"].dtype == torch.float32
    _steps([(opt, ours)], 1, gen)


# -- bad checkpoints: refused before anything is modified ---------------------------------------

def _trained(backend, dtype=torch.float32, **kw):
    gen = _gen()
    params = _params(gen, dtype, [(4, 512), (300,)])
    kw = dict(lr=1e-2, state_dtype="8bit", min_8bit_size=0, backend=backend, **kw)
    opt = fastsched.AdamW(params, **kw)
    _steps([(opt, params)], 2, gen)
    return params, opt


def _set(key, value, pid=0):
    return lambda sd: sd["state"][pid].__setitem__(key, value(sd["state"][pid]))


def _group(**kv):
    return lambda sd: sd["param_groups"][0].update(kv)


def _unquantised(st, dtype):
    del st["exp_avg_code"], st["exp_avg_scale"]
    st["exp_avg"] = torch.ones(300, dtype=dtype)


#: (what, corruption of a state dict of 8-bit states, words the ValueError names)
CORRUPT = [
    ("scales short", _set("exp_avg_scale", lambda st: torch.ones(3)),
     ["exp_avg_scale", "3 scales", "2048 codes"]),
    ("scale missing", lambda sd: sd["state"][0].pop("exp_avg_sq_scale"),
     ["exp_avg_sq_scale", "float32", "none"]),
    ("scale bf16", _set("exp_avg_scale", lambda st: st["exp_avg_scale"].bfloat16()),
     ["exp_avg_scale", "float32", "bfloat16"]),
    ("codes float32", _set("exp_avg_code", lambda st: st["exp_avg_code"].float()),
     ["exp_avg_code", "uint8", "float32"]),
    ("codes int8", _set("exp_avg_code", lambda st: st["exp_avg_code"].to(torch.int8)),
     ["exp_avg_code", "uint8", "int8"]),
    ("codes int64", _set("exp_avg_sq_code", lambda st: st["exp_avg_sq_code"].long()),
     ["exp_avg_sq_code", "uint8", "int64"]),
    ("codes and state", _set("exp_avg", lambda st: torch.ones(4, 512)),
     ["'exp_avg'", "exp_avg_code", "both"]),
    ("state not floating", lambda sd: _unquantised(sd["state"][1], torch.int32),
     ["'exp_avg'", "int32"]),
    ("state_dtype float16", _group(state_dtype="float16"),
     ["param_groups[0]", "state_dtype", "'bfloat16'", "'8bit'", "'float16'"]),
    ("state_dtype unknown", _group(state_dtype="nonsense"),
     ["state_dtype", "'float32'", "'8bit'", "'nonsense'"]),
    ("state_dtype int8", _group(state_dtype="int8"), ["state_dtype", "'8bit'", "'int8'"]),
    ("amsgrad with 8bit", _group(amsgrad=True), ["state_dtype", "amsgrad"]),
    ("min_8bit_size", _group(min_8bit_size=-4), ["min_8bit_size", ">= 0"]),
    ("allora_eta", _group(allora_eta=-1.0), ["allora_eta", "> 0"]),
    ("allora_unit", _group(allora_eta=2.0, allora_unit="diag"), ["allora_unit", "'row'"]),
    ("master_weights on fp32", _group(master_weights=True), ["master_weights", "float32"]),
    ("seed negative", lambda sd: sd["fastsched"].update(seed=-5), ["seed", "2**64", "-5"]),
    ("seed too large", lambda sd: sd["fastsched"].update(seed=2**64), ["seed", "2**64"]),
    ("seed bool", lambda sd: sd["fastsched"].update(seed=True), ["seed", "True"]),
    ("seed str", lambda sd: sd["fastsched"].update(seed="7"), ["seed", "'7'"]),
    ("group_defaults", lambda sd: sd["fastsched"].update(group_defaults=["8bit"]),
     ["group_defaults", "dict"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("corrupt,words", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_bad_checkpoint_is_refused_before_anything_is_modified(backend, corrupt, words):
    params, opt = _trained(backend)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # (would show a half load)
    for st in sd["state"].values():
        st["step"] = st["step"] + 100
    corrupt(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(sd)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    _assert_same(opt, before)
    _steps([(opt, params)], 1, _gen())  # and the run goes on


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_and_stochastic_rounding_in_a_checkpoint_are_refused_first(backend):
    gen = _gen()
    params = _params(gen, torch.bfloat16, [(4, 512)])
    opt = fastsched.AdamW(params, lr=1e-2, backend=backend)
    _steps([(opt, params)], 1, gen)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0].update(master_weights=True, stochastic_rounding=True, lr=0.5)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="master_weights=True and stochastic_rounding=True"):
        opt.load_state_dict(sd)
    _assert_same(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_amsgrad_checkpoint_into_8bit_states_is_refused_first(backend):
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (4, 256)])
    sd = _torch_checkpoint(gen, params, amsgrad=True)
    ours = _twins(params)
    opt = fastsched.AdamW([{"params": ours[:1]}, {"params": ours[1:]}], lr=1e-2,
                          state_dtype="8bit", min_8bit_size=0, backend=backend)
    _steps([(opt, ours)], 1, gen)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: state_dtype='8bit' and amsgrad"):
        opt.load_state_dict(sd)
    _assert_same(opt, before)


# -- ALLoRA under 8-bit states ------------------------------------------------------------------

def test_allora_under_8bit_states_warns_once_naming_the_group():
    gen = _gen()
    params = _params(gen, torch.float32, [(8, 512), (4, 256), (7,)])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = fastsched.AdamW([{"params": params[:1]},
                               {"params": params[1:], "allora_eta": 2.0}],
                              state_dtype="8bit", min_8bit_size=0, backend="reference")
        _steps([(opt, params)], 2, gen)
        opt.load_state_dict(opt.state_dict())
        _steps([(opt, params)], 1, gen)
    msgs = [str(x.message) for x in w if "ALLoRA" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert "param_groups[1]" in msgs[0] and "float32 states" in msgs[0]
    assert w[0].filename == __file__  # the user's line
    assert "exp_avg" in opt.state[params[1]] and "exp_avg_code" in opt.state[params[0]]


@pytest.mark.parametrize("kw", [dict(state_dtype="8bit"),  # only tensors under min_8bit_size
                                dict(state_dtype=torch.bfloat16, min_8bit_size=0),
                                dict(allora_eta=None, state_dtype="8bit", min_8bit_size=0)])
def test_allora_warning_only_where_8bit_states_were_asked_for(kw):
    gen = _gen()
    params = _params(gen, torch.float32, [(4, 256)])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = fastsched.AdamW(params, backend="reference", **{"allora_eta": 2.0, **kw})
        _steps([(opt, params)], 1, gen)
    assert not [x for x in w if "ALLoRA" in str(x.message)]
