"""fastsched optimizers under FSDP2, DDP and 1-D tensor parallel on CPU (gloo), and DCP
checkpoints across world sizes. Each test spawns its ranks (bounded in time, always torn down);
the scenarios themselves are in dist_worker.py."""

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

import fastsched

LIMIT_S = 150  # per scenario; a hung collective fails after init_process_group's 60 s timeout


def spawn(scenario: str, world: int, tmp, limit: float = LIMIT_S, interpret: bool = True) -> None:
    """Run ``dist_worker.<scenario>`` on ``world`` ranks. ``interpret``: the ranks run Triton
    kernels on CPU tensors under the interpreter (decided when they import triton: the variable
    is set for the children only), else compiled on the GPU."""
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """World size 2: FSDP2 against one process, then DCP checkpoints (fastsched and torch)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    spawn("fsdp_train_and_save", 2, tmp)
    return tmp


def test_fsdp2_equals_single_process(trained):
    """20 steps of AdamW and SGD with clipping, statistics, the guard (a NaN on rank 1 only:
    every rank skips), a schedule and ALLoRA rows: parameters within 1e-5, norms equal."""
    assert (trained / "after-fastsched.pt").exists() and (trained / "after-torch.pt").exists()


@pytest.mark.parametrize("world", [1, 4])
def test_dcp_checkpoint_reshards(trained, world):
    """The world-size-2 checkpoints (fastsched.AdamW and torch.optim.AdamW) load at another
    world size; 5 more steps equal the uninterrupted run."""
    spawn("fsdp_load", world, trained)


def test_ddp_tensor_parallel_triton_and_errors(tmp_path):
    """DDP equals one process; Shard(0) / Shard(1) / Replicate DTensors on a 1-D mesh with ALLoRA
    column, row and tensor units spanning ranks equal one process; the Triton kernels on shards;
    2-D meshes, Partial placements and plain tensors mixed in are refused, naming the parameter."""
    spawn("ddp_and_tensor_parallel", 2, tmp_path)


@pytest.mark.gpu
def test_fsdp2_nccl_fused_kernels_without_host_sync(tmp_path):
    """NCCL, world size 1, one GPU: the Triton step on DTensor shards (reduce, all-reduce,
    finalize, update) runs under torch.cuda.set_sync_debug_mode("error") after a warm-up, and
    equals the unsharded run."""
    spawn("nccl_no_sync", 1, tmp_path, interpret=False)


def test_fsdp2_cpu_example_runs_under_torchrun(tmp_path):
    """examples/fsdp2_cpu.py as the README runs it (torchrun, 2 ranks, gloo): it trains and
    reloads its DCP checkpoint with the schedule clock recovered."""
    example = Path(__file__).resolve().parent.parent / "examples" / "fsdp2_cpu.py"
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
