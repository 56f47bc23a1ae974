"""Worker processes of tests/optim/test_distributed.py (one function per scenario, every rank).

Each scenario runs the distributed setup and its one-process twin and returns what it measured
(statistics of every step, full parameters, flags, error messages); ``entry`` saves that rank's
result as ``result-<scenario>-<world>-<rank>.pt`` in the tmp directory, where the test loads it
and makes the comparisons. A failing rank writes its traceback there instead and exits non-zero.
Every rank trains on the same data, so FSDP2's averaged gradients equal the single-process
gradients exactly and the runs differ only by the order of the (float64) norm sums.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import fastsched
from fastsched.schedules import Cosine

STEPS = 20  # steps before the checkpoint
MORE = 5  # steps after it
NAN_STEP = 7  # a NaN on rank 1 only at this step
ROWS = (6, 11, 10, 4)  # layer widths: uneven shards at world size 2 and 4 (11 rows -> 3,3,3,2)


def result_path(tmp, scenario: str, world: int, rank: int) -> Path:
    return Path(tmp) / f"result-{scenario}-{world}-{rank}.pt"


def entry(scenario: str, rank: int, world: int, tmp: str) -> None:
    """Run one rank of ``scenario``, save its result (or its traceback) and end the process
    with ``os._exit``: no process-group teardown and no interpreter shutdown after the work.
    A gloo rank of the FSDP2 8-bit scenario aborted in that teardown now and then ("terminate
    called without an active exception", exit code -6, with its work done); the ranks meet at a
    barrier after saving, so none leaves while another still communicates."""
    torch.set_num_threads(1)
    err = Path(tmp) / f"error-{scenario}-{world}-{rank}.txt"
    try:
        backend = "nccl" if scenario.startswith("nccl") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/rdv-{scenario}-{world}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
        result = globals()[scenario](rank, world, Path(tmp))
        torch.save(result, result_path(tmp, scenario, world, rank))
        dist.barrier()
    except BaseException:
        err.write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- models, data, optimizers ------------------------------------------------------------------

def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(ROWS, ROWS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def batch(step: int, part: int | None = None, parts: int = 1):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, ROWS[0], generator=g)
    y = torch.randn(16, ROWS[-1], generator=g)
    if part is not None:
        x, y = x.chunk(parts)[part], y.chunk(parts)[part]
    return x, y


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def fused(model, cls=fastsched.AdamW, **kw):
    """Clipping (active: max norm below the gradient norms), statistics, the guard, a schedule
    and ALLoRA row units on the first two weights."""
    named = dict(model.named_parameters())
    allora = [n for n in named if n.endswith("weight")][:2]
    groups = [{"params": [named[n] for n in allora], "allora_eta": 2.0, "allora_unit": "row"},
              {"params": [p for n, p in named.items() if n not in allora]}]
    opts = dict(lr=2e-2, max_grad_norm=0.3, stats=True, nonfinite="skip",
                schedule=Cosine(total_steps=40, warmup_steps=3))
    if cls is not fastsched.SGD:
        opts["weight_decay"] = 0.1
    else:
        opts["momentum"] = 0.9
    opts.update(kw)
    return cls(groups, **opts)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def host(tensors):
    """Plain CPU copies of (full) tensors, to return to the test: ``full_tensor()`` is a
    collective, so every rank calls this."""
    return [full(t.detach()).cpu().clone() for t in tensors]


def params_of(model):
    return host(model.parameters())


def chunk_offset(rows: int, world: int, rank: int) -> int:
    return sum(c.numel() for c in torch.arange(rows).chunk(world)[:rank])


def train(model, opt, steps, start=0, nan_rank=None, world=1, record=None):
    """Train on the same batch on every rank; a NaN at NAN_STEP on rank ``nan_rank`` (or on the
    same element of the unsharded weight when ``world`` is 1)."""
    for s in range(start, start + steps):
        x, y = batch(s)
        dev = model[0].weight.device
        torch.nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).backward()
        if s == NAN_STEP and nan_rank is not None:
            g = model[0].weight.grad
            if hasattr(g, "_local_tensor"):
                if dist.get_rank() == nan_rank:
                    g._local_tensor[0, 1] = float("nan")
            else:
                g[chunk_offset(g.shape[0], world, nan_rank), 1] = float("nan")
        opt.step()
        opt.zero_grad()
        if record is not None:
            record.append(opt.stats_dict())


def dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# -- scenarios ---------------------------------------------------------------------------------

def fsdp_train_and_save(rank, world, tmp):
    """FSDP2 vs single process (AdamW and SGD, 20 steps, NaN on rank 1 only), DCP checkpoints of
    fastsched.AdamW and torch.optim.AdamW, then 5 more steps recorded for the loading runs.

    Returns per optimizer class: the statistics of every step (FSDP2 and one process), the
    parameters of both runs, the type of every optimizer state tensor, ``distributed`` and (AdamW)
    the schedule clock at the checkpoint."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for cls in (fastsched.AdamW, fastsched.SGD):
        model = shard(make_model())
        opt = fused(model, cls)
        ref_model = make_model()
        ref = fused(ref_model, cls)
        ours_stats, ref_stats = [], []
        train(model, opt, STEPS, nan_rank=1, record=ours_stats)
        train(ref_model, ref, STEPS, nan_rank=1, world=world, record=ref_stats)
        res = out[cls.__name__] = {
            "stats": ours_stats, "ref_stats": ref_stats,
            "params": params_of(model), "ref_params": params_of(ref_model),
            "state_types": [(i, k, type(v).__name__) for i, st in enumerate(opt.state.values())
                            for k, v in st.items() if k != "step"],
            "distributed": opt.distributed, "ref_distributed": ref.distributed}
        if cls is fastsched.AdamW:
            res["clock"] = int(opt.clock.item())
            dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp / "ckpt-fastsched"))
            train(model, opt, MORE, start=STEPS)
            final = params_of(model)  # full_tensor() is a collective: on every rank
            if rank == 0:
                torch.save(final, tmp / "after-fastsched.pt")

    # torch.optim.AdamW under FSDP2: the checkpoint fastsched loads
    model = shard(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 10)
    dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp / "ckpt-torch"))
    train(model, opt, MORE, start=10)
    final = params_of(model)  # full_tensor() is a collective: on every rank
    if rank == 0:
        torch.save(final, tmp / "after-torch.pt")
    return out


def fsdp_load(rank, world, tmp):
    """Load the world-size-2 checkpoints at this world size and continue. Returns, per
    checkpoint, the recovered schedule clock (and learning rates) and the parameters after the
    5 further steps (the test compares them with the uninterrupted run's)."""
    model = shard(make_model(seed=123))
    opt = fused(model)
    dcp_load(model, opt, tmp / "ckpt-fastsched")
    res = {"clock": int(opt.clock.item()), "lr": opt.current_lr()}
    train(model, opt, MORE, start=STEPS)
    res["params"] = params_of(model)

    model = shard(make_model(seed=123))
    opt = fastsched.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dcp_load(model, opt, tmp / "ckpt-torch")
    res["torch_clock"] = int(opt.clock.item())
    train(model, opt, MORE, start=10)
    res["torch_params"] = params_of(model)
    return res


def refusal(make) -> str | None:
    """The message of the ValueError ``make()`` raises, None if it raises nothing (any other
    exception fails the rank)."""
    try:
        make()
    except ValueError as e:
        return str(e)
    return None


def fsdp_stochastic_rounding(rank, world, tmp):
    """bf16 parameters with stochastic rounding (bf16 states, a schedule, no global norms):
    FSDP2 against one process, 10 steps; both sets of full parameters, for a bitwise
    comparison (the generator indexes elements of the whole parameter)."""
    out = {}
    for backend in ("auto", "reference"):
        runs = []
        for sharded in (True, False):
            model = make_model().to(torch.bfloat16)
            if sharded:
                model = shard(model)
            opt = fastsched.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, seed=7,
                                  stochastic_rounding=True, backend=backend,
                                  schedule=Cosine(total_steps=40, warmup_steps=3))
            for s in range(10):
                x, y = batch(s)
                torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
                opt.step()
                opt.zero_grad()
            runs.append(params_of(model))
        out[backend] = runs
    return out


def ddp_and_tensor_parallel(rank, world, tmp):
    """DDP equals one process; hand-placed DTensors (Shard(0), Shard(1), Replicate, 1-D) with
    ALLoRA units spanning ranks; the Triton backend (interpreter) on shards; clear errors.
    Returns the statistics and parameters of every run and its one-process twin, and the
    messages of the refused layouts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    # DDP: each rank half of the batch, gradients averaged by DDP; nothing else communicated
    model = DistributedDataParallel(make_model())
    opt = fused(model.module)
    ref_model = make_model()
    ref = fused(ref_model)
    ours, theirs = [], []
    for s in range(STEPS):
        x, y = batch(s, rank, world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ours.append(opt.stats_dict())
        x, y = batch(s)
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
        ref.zero_grad()
        theirs.append(ref.stats_dict())
    out["ddp"] = {"stats": ours, "ref_stats": theirs, "distributed": opt.distributed,
                  "params": params_of(model.module), "ref_params": params_of(ref_model)}

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(5)
    shapes = [((8, 6), Shard(0), "column"), ((6, 10), Shard(1), "row"),
              ((7, 3), Replicate(), "tensor"), ((9,), Shard(0), "tensor"),
              ((5, 4), Shard(0), "row")]
    fulls = [torch.randn(s, generator=g) for s, _, _ in shapes]
    grads = [[torch.randn(s, generator=g) for s, _, _ in shapes] for _ in range(STEPS)]
    grads[NAN_STEP][2][1, 1] = float("inf")  # replicated: every rank sees it

    def run(backend, dtensors, steps):
        ps = [distribute_tensor(f.clone(), mesh, [pl]) if dtensors else f.clone()
              for f, (_, pl, _) in zip(fulls, shapes)]
        groups = [{"params": [p], "allora_eta": 1.5, "allora_unit": u}
                  for p, (_, _, u) in zip(ps, shapes)]
        o = fastsched.AdamW(groups, lr=1e-2, max_grad_norm=5.0, stats=True, backend=backend,
                            schedule=Cosine(total_steps=30, warmup_steps=2))
        rec = []
        for k in range(steps):
            for p, gr in zip(ps, grads[k]):
                p.grad = distribute_tensor(gr.clone(), mesh, p.placements) if dtensors \
                    else gr.clone()
            o.step()
            rec.append(o.stats_dict())
        return {"params": host(ps), "stats": rec, "distributed": o.distributed}

    out["tp"] = run("reference", True, STEPS)
    out["tp_single"] = run("reference", False, STEPS)
    # the compiled CPU backend on the same shards (unit sums of a unit spanning ranks
    # all-reduced between its passes); None without the extension
    from fastsched.optim import _cpu

    out["tp_cpu"] = run("cpu", True, STEPS) if _cpu.available() else None

    # the Triton kernels (interpreted) on local shards: the per-tensor sums all-reduced between
    # the reduce and finalize launches. ALLoRA units spanning ranks are refused there.
    ps = [distribute_tensor(f.clone(), mesh, [pl]) for f, (_, pl, _) in zip(fulls, shapes)]
    o = fastsched.AdamW([{"params": ps[:1], "allora_eta": 1.5, "allora_unit": "column"}],
                        backend="triton", max_grad_norm=1.0)
    ps[0].grad = distribute_tensor(grads[0][0].clone(), mesh, [Shard(0)])
    before = full(ps[0]).clone()
    out["column_units_error"] = refusal(o.step)
    out["column_units_unchanged"] = torch.equal(full(ps[0]), before)

    def triton_run(dtensors):
        ps = [distribute_tensor(f.clone(), mesh, [pl]) if dtensors else f.clone()
              for f, (_, pl, _) in zip(fulls, shapes)]
        o = fastsched.AdamW([{"params": ps[:4]}, {"params": ps[4:], "allora_eta": 1.5}],
                            lr=1e-2, max_grad_norm=5.0, stats=True, backend="triton")
        rec = []
        for k in range(3):
            for p, gr in zip(ps, grads[k]):
                p.grad = distribute_tensor(gr.clone(), mesh, p.placements) if dtensors \
                    else gr.clone()
            o.step()
            rec.append(o.stats_dict())
        return {"params": host(ps), "stats": rec, "distributed": o.distributed,
                "passes": [launch["pass"] for launch in o.launches()]}

    out["triton"], out["triton_single"] = triton_run(True), triton_run(False)

    # unsupported layouts: errors naming the parameter (the last one of each list), at
    # construction
    named = [("w", distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))]
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("one", "all"))
    own = init_device_mesh("cpu", (world, 1), mesh_dim_names=("all", "one"))["one"]
    cases = [
        named + [("mine", distribute_tensor(torch.ones(4), own, [Shard(0)]))],
        [("w2d", distribute_tensor(torch.ones(4, 4), mesh2, [Replicate(), Shard(0)]))],
        [("part", torch.distributed.tensor.DTensor.from_local(torch.ones(2), mesh, [Partial()]))],
        named + [("plain", torch.nn.Parameter(torch.ones(3)))],
    ]
    out["refused"] = {params[-1][0]: refusal(lambda params=params: fastsched.AdamW(params))
                      for params in cases}
    # rows of 128 elements hold no whole 256-element block: float32 states, with a warning
    # naming the parameter (FSDP2 with whole-block rows: fsdp_8bit)
    q8 = [("q8", distribute_tensor(torch.ones(64, 128), mesh, [Shard(0)]))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o8 = fastsched.AdamW(q8, state_dtype="8bit")
    out["q8_warnings"] = [str(w.message) for w in caught]
    out["q8_storage"] = str(o8._storage(q8[0][1], o8.param_groups[0]))
    return out


#: layer widths of the 8-bit model: a weight of 48 rows of 512 (8-bit: 24 rows a rank at world
#: size 2, 12 at 4), one of 256 rows of 48 and the biases (float32 states)
ROWS8 = (512, 48, 256)


def make_model8(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(ROWS8[0], ROWS8[1]), torch.nn.Tanh(),
                               torch.nn.Linear(ROWS8[1], ROWS8[2]))


def train8(model, opt, steps, start=0):
    dt = next(model.parameters()).dtype
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(2000 + s)
        x, y = torch.randn(8, ROWS8[0], generator=g), torch.randn(8, ROWS8[2], generator=g)
        torch.nn.functional.mse_loss(model(x.to(dt)), y.to(dt)).backward()
        opt.step()
        opt.zero_grad()


def opt8(model, backend="auto"):
    """8-bit AdamW states for the 48 x 512 weight, float32 for the rest (the 256 x 48 weight
    would keep float32 states under FSDP2 anyway: the one-process run must store alike), with a
    schedule (elementwise only: no global norms, so that FSDP2 and one process compute every
    element alike)."""
    ps = list(model.parameters())
    return fastsched.AdamW([{"params": ps[:1], "state_dtype": "8bit"}, {"params": ps[1:]}],
                           lr=1e-2, weight_decay=0.1, backend=backend,
                           schedule=Cosine(total_steps=40, warmup_steps=3))


def codes_of(opt):
    """Full (gathered) 8-bit codes and scales of every parameter, in parameter order."""
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state[p]
            out.append({k: full(v.detach()).cpu().clone() for k, v in sorted(st.items())
                        if k.endswith(("_code", "_scale"))})
    return out


def fsdp_8bit(rank, world, tmp):
    """8-bit states under FSDP2 (world size 2) against one process, 10 steps: full parameters,
    codes and scales (bitwise: the blocks are the same rows' blocks); the state types; a DCP
    checkpoint, then 5 more steps (what the loading runs must reproduce)."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for backend in ("auto", "reference"):
        model, ref_model = shard(make_model8()), make_model8()
        opt, ref = opt8(model, backend), opt8(ref_model, backend)
        train8(model, opt, 10)
        train8(ref_model, ref, 10)
        out[backend] = {
            "params": params_of(model), "ref_params": params_of(ref_model),
            "codes": codes_of(opt), "ref_codes": codes_of(ref),
            "state_types": sorted({(k, type(v).__name__) for st in opt.state.values()
                                   for k, v in st.items() if k != "step"})}
        if backend == "auto":
            # the one-process optimizer's full state dict, for loading into FSDP2 shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            osd = get_optimizer_state_dict(ref_model, ref,
                                           options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                torch.save({"optim": osd, "model": ref_model.state_dict()},
                           tmp / "ref-8bit-osd.pt")
            dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp / "ckpt-8bit"))
            train8(model, opt, MORE, start=10)
            final = params_of(model)
            if rank == 0:
                torch.save(final, tmp / "after-8bit.pt")
    # bf16 parameters with float32 masters and 8-bit states: the checkpoint of the masters
    model = shard(make_model8().to(torch.bfloat16))
    opt = master8(model)
    train8(model, opt, 3)
    dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp / "ckpt-master"))
    out["masters"] = masters_of(opt)
    return out


def master8(model):
    ps = list(model.parameters())
    return fastsched.AdamW([{"params": ps[:1], "state_dtype": "8bit"}, {"params": ps[1:]}],
                           lr=1e-2, master_weights=True)


def masters_of(opt):
    return [full(opt.state[p]["master_param"].detach()).cpu().clone()
            for g in opt.param_groups for p in g["params"]]


def fsdp_8bit_load(rank, world, tmp):
    """The world-size-2 8-bit checkpoint at this world size: codes and scales as saved, then 5
    more steps (the test compares them with the uninterrupted run)."""
    model = shard(make_model8(seed=5))
    opt = opt8(model)
    dcp_load(model, opt, tmp / "ckpt-8bit")
    res = {"codes": codes_of(opt), "clock": int(opt.clock.item())}
    train8(model, opt, MORE, start=10)
    res["params"] = params_of(model)
    model = shard(make_model8(seed=5).to(torch.bfloat16))
    opt = master8(model)
    dcp_load(model, opt, tmp / "ckpt-master")
    res["masters"] = masters_of(opt)
    res["master_codes"] = codes_of(opt)
    # the one-process run's full state dict into FSDP2 shards: codes and scales resharded by
    # rows (set_optimizer_state_dict shards the flat tensors it is given by elements)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = shard(make_model8(seed=5))
    opt = opt8(model)
    sd = torch.load(tmp / "ref-8bit-osd.pt", weights_only=False)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd["model"], options=full)
    set_optimizer_state_dict(model, opt, sd["optim"], options=full)
    train8(model, opt, MORE, start=10)
    res["full_sd_params"] = params_of(model)
    return res


def nccl_no_sync(rank, world, tmp):
    """One GPU, NCCL: the fused kernels launch on the DTensor shards with no host sync (a sync
    raises, failing the rank). Returns the backend, state types, last statistics and parameters
    of the sharded run and of the unsharded one."""
    torch.cuda.set_device(0)
    model = shard(make_model().cuda())
    opt = fused(model)
    ref_model = make_model().cuda()
    ref = fused(ref_model)
    backend = opt.backend
    for s in range(6):
        x, y = batch(s)
        for m, o in ((model, opt), (ref_model, ref)):
            torch.nn.functional.mse_loss(m(x.cuda()), y.cuda()).backward()
            torch.cuda.synchronize()
            if s >= 2:  # after the warm-up (tables built, kernels compiled)
                torch.cuda.set_sync_debug_mode("error")
            try:
                o.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            o.zero_grad()
    return {"backend": backend, "distributed": opt.distributed,
            "exp_avg_type": type(opt.state[model[0].weight]["exp_avg"]).__name__,
            "stats": opt.stats_dict(), "ref_stats": ref.stats_dict(),
            "params": params_of(model), "ref_params": params_of(ref_model)}
