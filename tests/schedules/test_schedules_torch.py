"""The LRScheduler adapter and plotting."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from fastsched.schedules import (
    REX,
    WSD,
    Constant,
    Cosine,
    Infinite,
    InverseSqrt,
    Join,
    LinearWarmup,
    OneCycle,
    Rewarm,
    ScheduleLR,
    Table,
    plot,
)

SCHEDULES = [
    Cosine(60, warmup_steps=10, min_ratio=0.1),
    WSD(warmup_steps=5, total_steps=60, decay_shape="1-sqrt"),
    Join((LinearWarmup(8), REX(50)), (8,)),
    Infinite(5, 20, 0.3, anneal_start=40, anneal_steps=10),
]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _groups(model):
    # two parameter groups with different base learning rates
    return [{"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "lr": 3e-3}]


def _train(make_opt, make_sched, steps=70, seed=0):
    model = _model(seed)
    opt = make_opt(_groups(model))
    sched = make_sched(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    lrs = []
    for _ in range(steps):
        lrs.append([group["lr"] for group in opt.param_groups])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lrs, [p.detach().clone() for p in model.parameters()]


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9),
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: type(s).__name__)
def test_schedule_lr_matches_lambda_lr(opt_name, sched):
    make_opt = OPTIMIZERS[opt_name]
    lrs_a, params_a = _train(make_opt, lambda o: ScheduleLR(o, sched))
    lrs_b, params_b = _train(make_opt, lambda o: LambdaLR(o, sched))
    assert lrs_a == lrs_b
    assert lrs_a[20] == [1e-2 * sched(20), 3e-3 * sched(20)]
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_schedule_lr_updates_a_tensor_learning_rate_in_place():
    sched = Cosine(20, warmup_steps=5)
    p = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.1)
    opt = torch.optim.AdamW([p], lr=lr, foreach=False)
    s = ScheduleLR(opt, sched)
    seen = []
    for _ in range(25):
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        seen.append(float(opt.param_groups[0]["lr"]))
        p.grad = torch.ones_like(p)
        opt.step()
        s.step()
    assert seen == pytest.approx([0.1 * sched(t) for t in range(25)], rel=1e-6)


def test_state_dict_round_trip_restores_clock_and_schedule():
    sched = WSD(warmup_steps=5, total_steps=60, decay_shape="cosine", min_ratio=0.1)

    def fresh(schedule):
        model = _model()
        opt = torch.optim.AdamW(_groups(model))
        return opt, ScheduleLR(opt, schedule)

    opt, s = fresh(sched)
    for _ in range(37):
        opt.step()
        s.step()
    state = s.state_dict()
    # the state is plain data: it survives torch.save / torch.load(weights_only=True) and JSON
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert json.loads(json.dumps(state["schedule"])) == state["schedule"]

    opt2, s2 = fresh(Constant(0.5))  # a different schedule, replaced by the checkpoint's
    opt2.load_state_dict(opt.state_dict())
    s2.load_state_dict(loaded)
    assert s2.schedule == sched
    assert s2.last_epoch == s.last_epoch == 37
    assert s2.get_last_lr() == s.get_last_lr()
    for _ in range(30):
        opt.step()
        s.step()
        opt2.step()
        s2.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert s.get_last_lr() == [1e-2 * sched(67), 3e-3 * sched(67)]


def test_schedule_lr_rejects_non_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="schedule must be a fastsched Schedule"):
        ScheduleLR(opt, lambda t: 1.0)


# -- plot ---------------------------------------------------------------------------------------

def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_one_a_list_and_a_dict(tmp_path):
    pytest.importorskip("matplotlib")
    one = plot(Cosine(1000, warmup_steps=100, min_ratio=0.1), str(tmp_path / "one.png"))
    assert one == str(tmp_path / "one.png") and _is_png(tmp_path / "one.png")
    plot([WSD(warmup_steps=100, total_steps=1000), REX(1000), OneCycle(1000)],
         str(tmp_path / "list.png"), title="three schedules")
    assert _is_png(tmp_path / "list.png")
    plot({"inverse sqrt": InverseSqrt(100), "table": Table((0, 500), (1.0, 0.1)),
          "re-warm": Rewarm((400, 400), warmup_steps=(40, 40))},
         str(tmp_path / "dict.png"), steps=1200, base_lr=3e-4, logy=True, mark_phases=False)
    assert _is_png(tmp_path / "dict.png")


def test_plot_rejects_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="at least one schedule"):
        plot([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="is not a fastsched Schedule"):
        plot({"f": lambda t: 1.0}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        plot(Cosine(10), str(tmp_path / "x.png"), steps=0)
