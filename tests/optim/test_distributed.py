"""fastsched optimizers under FSDP2, DDP and 1-D tensor parallel on CPU (gloo), and DCP
checkpoints across world sizes. Each test spawns its ranks (bounded in time, always torn down);
the scenarios themselves are in dist_worker.py. The ranks return what they measured (statistics
of every step, full parameters, flags, error messages) and the tests compare it here, for every
rank."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dist_worker
import pytest
import torch
from dist_worker import NAN_STEP, STEPS

import fastsched
from fastsched.schedules import Cosine

LIMIT_S = 150  # per scenario; a hung collective fails after init_process_group's 60 s timeout
RTOL = 1e-5  # parameters against the one-process run, relative to each tensor's largest entry


def spawn(scenario: str, world: int, tmp, limit: float = LIMIT_S,
          interpret: bool = True) -> list:
    """Run ``dist_worker.<scenario>`` on ``world`` ranks and return each rank's result (what the
    scenario function returned), in rank order. ``interpret``: the ranks run Triton kernels on
    CPU tensors under the interpreter (decided when they import triton: the variable is set for
    the children only), else compiled on the GPU."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=dist_worker.entry, args=(scenario, r, world, str(tmp)))
             for r in range(world)]
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + limit
    try:
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.terminate()
        for p in hung:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [f.read_text() for f in sorted(tmp.glob(f"error-{scenario}-{world}-*.txt"))]
    assert not errors, "\n".join(errors)
    assert not hung, f"{scenario}: ranks still running after {limit} s (killed)"
    assert [p.exitcode for p in procs] == [0] * world
    return [torch.load(dist_worker.result_path(tmp, scenario, world, r), weights_only=True)
            for r in range(world)]


# -- comparisons -------------------------------------------------------------------------------

def assert_close(actual, expected, rtol=RTOL, what=""):
    """Every tensor within ``rtol`` of its twin, relative to the twin's largest entry."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what} tensor {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        d = float((a - e).abs().max() / e.abs().max().clamp_min(1e-6))
        assert d <= rtol, f"{what} tensor {i}: relative difference {d:.3g} > {rtol}"


def assert_equal(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"{what} tensor {i} differs"


def compare_stats(ours, ref, what, rtol=1e-12):
    """Statistics of every step equal: global norms to ``rtol`` (1e-12: float64 sums in another
    order), per-tensor ones to 1e-6 (param_norm and update_rms are float32 sums)."""
    assert len(ours) == len(ref), what
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a["skipped"] == b["skipped"], (what, k)
        assert a["skip_count"] == b["skip_count"], (what, k)
        for key in ("grad_norm", "grad_norm_l1", "clip_coef", "nonfinite"):
            assert abs(a[key] - b[key]) <= rtol * max(abs(b[key]), 1.0), (what, k, key, a, b)
        assert a["lr"] == b["lr"], (what, k)
        assert len(a["tensors"]) == len(b["tensors"]), (what, k)
        for (na, ta), (nb, tb) in zip(a["tensors"].items(), b["tensors"].items()):
            assert na == nb, (what, k)
            for key in ("grad_norm", "param_norm", "update_rms"):
                if tb[key] is None:
                    assert ta[key] is None, (what, k, na, key)
                else:
                    assert abs(ta[key] - tb[key]) <= 1e-6 * max(abs(tb[key]), 1e-12), \
                        (what, k, na, key, ta[key], tb[key])


# -- FSDP2 and DCP (world size 2, then 1 and 4) ------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """World size 2: FSDP2 against one process, then DCP checkpoints (fastsched and torch).
    The checkpoint directory and every rank's result."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return tmp, spawn("fsdp_train_and_save", 2, tmp)


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_fsdp2_equals_single_process(trained, cls):
    """20 steps of AdamW and SGD with clipping, statistics, the guard (a NaN on rank 1 only:
    every rank skips), a schedule and ALLoRA rows: parameters within 1e-5, norms equal."""
    tmp, ranks = trained
    assert (tmp / "after-fastsched.pt").exists() and (tmp / "after-torch.pt").exists()
    assert len(ranks) == 2
    for rank, res in enumerate(ranks):
        r, what = res[cls], f"FSDP2 {cls} rank {rank}"
        stats = r["stats"]
        assert len(stats) == STEPS, what
        assert stats[NAN_STEP]["skipped"] and stats[NAN_STEP]["nonfinite"] == 1, what
        assert sum(s["skipped"] for s in stats) == 1, what
        assert stats[0]["clip_coef"] < 1.0, what  # clipping is active
        compare_stats(stats, r["ref_stats"], what)
        assert r["state_types"], what
        wrong = [(i, k, t) for i, k, t in r["state_types"] if t != "DTensor"]
        assert not wrong, f"{what}: optimizer state that is not a DTensor: {wrong}"
        assert r["distributed"] and not r["ref_distributed"], what
        assert_close(r["params"], r["ref_params"], what=what)
        if cls == "AdamW":
            assert r["clock"] == STEPS - 1, what
    # the ranks agree with each other: the same statistics (all-reduced) and full parameters
    for rank, res in enumerate(ranks[1:], 1):
        what = f"FSDP2 {cls} rank {rank} vs rank 0"
        compare_stats(res[cls]["stats"], ranks[0][cls]["stats"], what)
        assert_equal(res[cls]["params"], ranks[0][cls]["params"], what)


@pytest.mark.parametrize("world", [1, 4])
def test_dcp_checkpoint_reshards(trained, world):
    """The world-size-2 checkpoints (fastsched.AdamW and torch.optim.AdamW) load at another
    world size; 5 more steps equal the uninterrupted run."""
    tmp, _ = trained
    ranks = spawn("fsdp_load", world, tmp)
    assert len(ranks) == world
    after = torch.load(tmp / "after-fastsched.pt", weights_only=True)
    after_torch = torch.load(tmp / "after-torch.pt", weights_only=True)
    lr = [2e-2 * Cosine(total_steps=40, warmup_steps=3)(STEPS - 1)] * 2
    for rank, r in enumerate(ranks):
        what = f"DCP 2 -> {world} rank {rank}"
        assert r["clock"] == STEPS - 1, what  # recovered from the per-parameter steps
        assert r["lr"] == lr, what
        assert_close(r["params"], after, what=f"{what}: resumed fastsched.AdamW")
        assert r["torch_clock"] == 10, what
        assert_close(r["torch_params"], after_torch, what=f"{what}: torch.optim.AdamW checkpoint")


# -- 8-bit states under FSDP2, DCP resharding (world size 2, then 1 and 4) ----------------------

@pytest.fixture(scope="module")
def trained8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2-8bit")
    return tmp, spawn("fsdp_8bit", 2, tmp)


def test_fsdp2_8bit_states_equal_single_process(trained8):
    """8-bit AdamW states of FSDP2 shards (weights of 48 rows of 512: 24 rows a rank) are the
    one-process run's bit for bit (codes, scales and parameters, 10 steps, default and
    reference backends): a shard's blocks are whole rows' blocks. The codes and scales are
    DTensors sharded like the parameter (what DCP reshards)."""
    _, ranks = trained8
    for rank, res in enumerate(ranks):
        for backend in ("auto", "reference"):
            r = res[backend]
            what = f"rank {rank} backend {backend}"
            assert_equal(r["params"], r["ref_params"], what=what)
            assert len(r["codes"]) == len(r["ref_codes"]), what
            n8 = 0
            for a, b in zip(r["codes"], r["ref_codes"]):
                assert a.keys() == b.keys(), what
                for k in a:
                    # the sharded scales are (rows, blocks a row); the plain ones flat
                    assert torch.equal(a[k].reshape(-1), b[k].reshape(-1)), (what, k)
                n8 += bool(a)
            assert n8 == 1, what  # the 48 x 512 weight
            types = dict(r["state_types"])
            assert types["exp_avg_code"] == "DTensor" and types["exp_avg_scale"] == "DTensor"
            assert types["exp_avg"] == "DTensor", what  # the float32 states of the others


@pytest.mark.parametrize("world", [1, 4])
def test_dcp_reshards_8bit_states(trained8, world):
    """The world-size-2 checkpoint with 8-bit states loads at world size 1 and 4: codes and
    scales as saved (moved row by row), and 5 more steps equal the uninterrupted run bit for
    bit; float32 masters of bf16 parameters load as saved."""
    tmp, saved = trained8
    ranks = spawn("fsdp_8bit_load", world, tmp)
    after = torch.load(tmp / "after-8bit.pt", weights_only=True)
    for rank, r in enumerate(ranks):
        what = f"DCP 8-bit 2 -> {world} rank {rank}"
        assert r["clock"] == 10, what
        for a, b in zip(r["codes"], saved[0]["auto"]["codes"]):
            assert a.keys() == b.keys(), what
            for k in a:
                assert torch.equal(a[k], b[k]), (what, k)
        assert_equal(r["params"], after, what=what)
        # float32 masters of bf16 parameters come back as saved, not cast to bf16 on the way
        assert all(m.dtype == torch.float32 for m in r["masters"]), what
        assert_equal(r["masters"], saved[0]["masters"], what=f"{what}: masters")
        assert r["master_codes"][0], what  # the 48 x 512 weight: 8-bit beside its master
        # the one-process run's full state dicts (model and optimizer) loaded into the shards:
        # 5 more steps equal the uninterrupted run (codes and scales resharded by rows)
        assert_equal(r["full_sd_params"], after, what=f"{what}: one-process checkpoint")


# -- DDP and tensor parallel (world size 2) ----------------------------------------------------

REFUSED = {  # parameter name -> what the error says (at construction, naming the parameter)
    "mine": "one optimizer must have all parameters on one mesh",
    "w2d": "2-D mesh",
    "part": "Partial",
    "plain": "plain tensor",
}


def test_fsdp2_stochastic_rounding_equals_single_process(tmp_path):
    """Stochastic rounding under FSDP2 (uneven Shard(0) shards at world size 2) draws, for
    every element, the bits the one-process run draws: the parameters are equal bit for bit."""
    ranks = spawn("fsdp_stochastic_rounding", 2, tmp_path)
    for rank, res in enumerate(ranks):
        for backend, (sharded, single) in res.items():
            assert_equal(sharded, single, what=f"rank {rank} backend {backend}")
            assert any(p.dtype == torch.bfloat16 for p in sharded)


def test_ddp_tensor_parallel_triton_and_errors(tmp_path):
    """DDP equals one process; Shard(0) / Shard(1) / Replicate DTensors on a 1-D mesh with ALLoRA
    column, row and tensor units spanning ranks equal one process; the Triton kernels on shards;
    2-D meshes, Partial placements and plain tensors mixed in are refused, naming the parameter."""
    ranks = spawn("ddp_and_tensor_parallel", 2, tmp_path)
    assert len(ranks) == 2
    for rank, r in enumerate(ranks):
        # DDP: gradients averaged by DDP, nothing else communicated
        ddp, what = r["ddp"], f"DDP rank {rank}"
        assert not ddp["distributed"], what
        assert_close(ddp["params"], ddp["ref_params"], what=what)
        assert len(ddp["stats"]) == len(ddp["ref_stats"]) == STEPS, what
        for k, (a, b) in enumerate(zip(ddp["stats"], ddp["ref_stats"])):
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"], (what, k)

        # tensor parallel, reference backend, ALLoRA units spanning ranks
        tp, single, what = r["tp"], r["tp_single"], f"tensor parallel rank {rank}"
        assert tp["distributed"] and not single["distributed"], what
        assert len(tp["stats"]) == STEPS, what
        assert tp["stats"][NAN_STEP]["skipped"] and tp["stats"][NAN_STEP]["nonfinite"] == 1, what
        compare_stats(tp["stats"], single["stats"], what)
        assert_close(tp["params"], single["params"], what=what)

        # the same on the compiled CPU backend (where it is built): the reference's bits
        tpc = r["tp_cpu"]
        if tpc is not None:
            what = f"tensor parallel, compiled CPU backend, rank {rank}"
            assert tpc["distributed"], what
            compare_stats(tpc["stats"], tp["stats"], what)
            assert_close(tpc["params"], single["params"], what=what)

        # Triton: column units of a Shard(0) parameter refused at the step, parameter untouched
        err = r["column_units_error"]
        assert err is not None, f"rank {rank}: column units of a Shard(0) parameter ran on the " \
            "Triton backend"
        assert "group0.param0" in err and "'column'" in err, err
        assert r["column_units_unchanged"], f"rank {rank}: the refused step changed the parameter"

        # Triton on shards: the kernels sum each 2048-element block in float32 before the
        # float64 sums; the shards' blocks are not the whole tensor's, so the norms agree to
        # float32 rounding
        tri, single, what = r["triton"], r["triton_single"], f"triton rank {rank}"
        assert tri["distributed"] and not single["distributed"], what
        assert {"reduce", "finalize"} <= set(tri["passes"]), (what, tri["passes"])
        compare_stats(tri["stats"], single["stats"], what, rtol=1e-6)
        assert_close(tri["params"], single["params"], what=what)

        # unsupported layouts
        assert r["refused"].keys() == REFUSED.keys(), rank
        for name, msg in REFUSED.items():
            err = r["refused"][name]
            assert err is not None, f"rank {rank}: no error for {msg} ({name})"
            assert msg in err and name in err, (rank, name, err)
        # 8-bit asked for a DTensor whose rows hold no whole block: float32, saying so
        assert r["q8_storage"] == "torch.float32", rank
        assert any("q8" in w and "keep float32 states" in w for w in r["q8_warnings"]), \
            (rank, r["q8_warnings"])

    # the ranks agree with each other
    for key in ("tp", "triton") + (("tp_cpu",) if ranks[0]["tp_cpu"] is not None else ()):
        what = f"{key} rank 1 vs rank 0"
        compare_stats(ranks[1][key]["stats"], ranks[0][key]["stats"], what)
        assert_equal(ranks[1][key]["params"], ranks[0][key]["params"], what)
    assert_equal(ranks[1]["ddp"]["params"], ranks[0]["ddp"]["params"], "DDP rank 1 vs rank 0")


@pytest.mark.gpu
def test_fsdp2_nccl_fused_kernels_without_host_sync(tmp_path):
    """NCCL, world size 1, one GPU: the Triton step on DTensor shards (reduce, all-reduce,
    finalize, update) runs under torch.cuda.set_sync_debug_mode("error") after a warm-up, and
    equals the unsharded run."""
    (r,) = spawn("nccl_no_sync", 1, tmp_path, interpret=False)
    assert r["backend"] == "triton"
    assert r["distributed"]
    assert r["exp_avg_type"] == "DTensor"
    a, b = r["stats"], r["ref_stats"]
    assert a["skip_count"] == 0 and a["clip_coef"] < 1.0
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"]
    assert_close(r["params"], r["ref_params"], what="nccl")


# -- the example ------------------------------------------------------------------------------

def test_fsdp2_cpu_example_runs_under_torchrun(tmp_path):
    """examples/fsdp2_cpu.py as the README runs it (torchrun, 2 ranks, gloo): it trains and
    reloads its DCP checkpoint with the schedule clock recovered."""
    example = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_cpu.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(example)]
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, out
    losses = [float(v) for v in re.findall(r"loss (\S+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.05 * losses[0], out
    assert "schedule clock 60" in out, out


# -- checkpoints that do not match (one process) -----------------------------------------------

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _trained_state():
    m = _model()
    opt = fastsched.AdamW(m.named_parameters())
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return m, opt


def _snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def test_checkpoint_with_another_shape_is_refused():
    m, opt = _trained_state()
    sd = opt.state_dict()
    sd["state"][2]["exp_avg"] = torch.zeros(5, 4)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"1\.weight: checkpoint state 'exp_avg' has shape"):
        opt.load_state_dict(sd)
    after = _snapshot(opt)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])


def test_checkpoint_with_other_names_is_refused():
    m, opt = _trained_state()
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"] = ["0.weight", "0.bias", "x.weight", "1.bias"]
    with pytest.raises(ValueError, match="1.weight: the checkpoint has parameter 'x.weight'"):
        opt.load_state_dict(sd)


def test_state_dict_has_no_allora_keys_without_allora():
    """A torch.optim checkpoint has no ALLoRA keys; DCP loads exactly the keys of our state dict,
    so groups without ALLoRA leave them out (and loading puts them back)."""
    m, opt = _trained_state()
    sd = opt.state_dict()
    assert "allora_eta" not in sd["param_groups"][0]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["allora_eta"] is None
    assert opt.param_groups[0]["allora_unit"] == "row"
