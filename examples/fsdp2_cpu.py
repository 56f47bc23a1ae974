"""FSDP2 with fastsched.AdamW on CPU (gloo): sharded parameters, global-norm clipping and
statistics over all shards, and a torch.distributed.checkpoint save / load.

Run:  torchrun --nproc_per_node 2 examples/fsdp2_cpu.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import fastsched
from fastsched.schedules import Cosine


def build(steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)  # parameters are now DTensors sharded on dim 0
    opt = fastsched.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01, max_grad_norm=1.0,
                          stats=True, schedule=Cosine(total_steps=steps, warmup_steps=3))
    return model, opt


def main(steps: int = 60, checkpoint: str | None = None) -> list[float]:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        model, opt = build(steps)
        w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        losses = []
        for step in range(steps):
            x = torch.randn(32, 16, generator=data)
            loss = nn.functional.mse_loss(model(x), x @ w)
            loss.backward()
            opt.step()  # clip coefficient from the norm over all shards of all ranks
            opt.zero_grad()
            losses.append(loss.item())
            if step % 20 == 0 or step == steps - 1:
                s = opt.stats_dict()  # the same global numbers on every rank
                if rank == 0:
                    print(f"step {step:3d}  loss {loss.item():.4f}  grad norm "
                          f"{s['grad_norm']:.4f}  clip {s['clip_coef']:.3f}  lr {s['lr'][0]:.2e}")

        path = checkpoint or os.path.join(tempfile.gettempdir(), "fastsched_fsdp2_cpu")
        msd, osd = get_state_dict(model, opt)  # optimizer states are DTensors like the params
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        model2, opt2 = build(steps)
        sd = dict(zip(("model", "optim"), get_state_dict(model2, opt2)))
        dcp.load(sd, checkpoint_id=path)  # also at another world size
        set_state_dict(model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if rank == 0:
            print(f"reloaded from {path}: schedule clock {int(opt2.clock.item())}")
        return losses
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
