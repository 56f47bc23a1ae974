"""Framework glue against the real packages: HF Trainer (transformers + accelerate), PEFT,
Lightning, and checkpoints exchanged with torch under LR schedulers. Tiny models built from
configs; nothing is downloaded."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastsched
from fastsched.integrations import ScheduleAdapter, unwrap
from fastsched.schedules import Cosine, ScheduleLR

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fastsched.integrations.hf")
pytest.importorskip("accelerate")

STEPS = 6
LR = 3e-3
SCHED = Cosine(total_steps=STEPS, warmup_steps=2, min_ratio=0.1)


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _data(n=24, length=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _trainer(model, tmp_path, optimizers, callbacks=None, **args):
    kw = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
              disable_tqdm=True, dataloader_num_workers=0, seed=0)
    kw.update(args)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**kw),
                                train_dataset=_data(), optimizers=optimizers,
                                callbacks=callbacks)


def _train_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_schedule_adapter_applies_and_logs_the_scheduled_lr(tmp_path):
    """fastsched.AdamW(schedule=) + ScheduleAdapter + attach(): the run equals torch AdamW +
    the same schedule as a torch scheduler (Trainer clipping there, the optimizer here), and
    the logs hold the applied lr, the optimizer's grad norm, clip coefficient, skipped steps."""
    ref_model = _model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, foreach=False)
    ref = _trainer(ref_model, tmp_path / "ref", (ref_opt, ScheduleLR(ref_opt, SCHED)),
                   max_grad_norm=0.5)
    ref_logs = _train_logs(ref)

    model = _model()
    opt = fastsched.AdamW(model.parameters(), lr=LR, schedule=SCHED, max_grad_norm=0.5,
                          backend="reference")
    trainer = _trainer(model, tmp_path / "ours", (opt, ScheduleAdapter(opt)), max_grad_norm=0)
    hf.attach(trainer)
    assert trainer.callback_handler.callbacks[0].__class__.__name__ == "FastschedCallback"
    logs = _train_logs(trainer)

    expected = [LR * SCHED(k) for k in range(STEPS)]
    assert [h["learning_rate"] for h in ref_logs] == pytest.approx(expected, rel=1e-12)
    assert [h["learning_rate"] for h in logs] == pytest.approx(expected, rel=1e-6)
    assert len(set(h["learning_rate"] for h in logs)) > 3  # not a flat base lr
    assert [h["grad_norm"] for h in logs] == pytest.approx([h["grad_norm"] for h in ref_logs],
                                                           rel=1e-4)
    for h in logs:
        assert h["clip_coef"] == pytest.approx(min(1.0, 0.5 / (h["grad_norm"] + 1e-6)),
                                               rel=1e-5)
        assert h["skipped_steps"] == 0
    assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in ref_logs], rel=1e-4)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # trap 4: the Trainer holds accelerate's wrapper; unwrap reaches the optimizer
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    inner = fastsched.unwrap(trainer.optimizer)
    assert inner is opt and int(inner.clock.item()) == STEPS
    assert inner.stats_dict()["grad_norm"] == pytest.approx(logs[-1]["grad_norm"])
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([logs[-1]["learning_rate"]])


def test_trainer_default_scheduler_with_schedule_is_an_error(tmp_path):
    """Trainer's own (linear) scheduler on an optimizer with schedule=: a clear error naming
    the fixes instead of two schedules multiplied; lr_scheduler_type="constant" is one fix."""
    model = _model()
    opt = fastsched.AdamW(model.parameters(), lr=LR, schedule=SCHED, backend="reference")
    trainer = _trainer(model, tmp_path / "a", (opt, None))
    with pytest.raises(RuntimeError, match=r"lr_scheduler_type=\"constant\".*ScheduleAdapter"):
        trainer.train()

    model = _model()
    opt = fastsched.AdamW(model.parameters(), lr=LR, schedule=SCHED, backend="reference")
    trainer = _trainer(model, tmp_path / "b", (opt, None), lr_scheduler_type="constant",
                       max_steps=3)
    trainer.train()
    assert opt.param_groups[0]["lr"] == LR and int(opt.clock.item()) == 3
    # without schedule= the Trainer's scheduler drives the optimizer as it drives torch's
    model = _model()
    opt = fastsched.AdamW(model.parameters(), lr=LR, backend="reference")
    trainer = _trainer(model, tmp_path / "c", (opt, None), max_steps=3)
    logs = _train_logs(trainer)
    assert [h["learning_rate"] for h in logs] == pytest.approx([LR, LR * 2 / 3, LR / 3])


def test_peft_lora_with_trainer(tmp_path):
    """A LoRA model (peft) trained by the Trainer with a scheduled fastsched optimizer over
    its trainable parameters: the adapters move, the base weights do not."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fastsched.AdamW(named, lr=1e-2, schedule=SCHED, stats=True, backend="reference")
    trainer = _trainer(model, tmp_path, (opt, ScheduleAdapter(opt)), max_steps=3,
                       max_grad_norm=0)
    hf.attach(trainer)
    logs = _train_logs(trainer)
    assert [h["learning_rate"] for h in logs] == pytest.approx([1e-2 * SCHED(k)
                                                                for k in range(3)])
    assert all(h["grad_norm"] > 0 for h in logs)
    trainable = {n for n, _ in named}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


# -- checkpoints under LR schedulers -----------------------------------------------------------

def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _steps(model, opt, batches, sched=None):
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _roundtrip(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_torch_checkpoint_with_a_scheduled_lr_resumes_at_the_same_lr():
    """torch AdamW under a scheduler stores the scheduled lr in "lr", the base in
    "initial_lr": fastsched(schedule=) takes the base and resumes at the same applied lr, and
    the continued run is torch's uninterrupted one."""
    sched = Cosine(total_steps=12, warmup_steps=3, min_ratio=0.05)
    data = _batches(10)
    ref_model = _linear()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    ref_sched = ScheduleLR(ref, sched)
    _steps(ref_model, ref, data[:5], ref_sched)
    sd = _roundtrip(ref.state_dict())
    assert sd["param_groups"][0]["lr"] == pytest.approx(1e-2 * sched(5))
    assert sd["param_groups"][0]["initial_lr"] == 1e-2

    model = _linear()
    model.load_state_dict(ref_model.state_dict())
    opt = fastsched.AdamW(model.parameters(), lr=1.0, schedule=sched, backend="reference")
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2  # the base
    assert opt.current_lr() == pytest.approx([ref.param_groups[0]["lr"]], rel=1e-12)
    _steps(model, opt, data[5:])
    _steps(ref_model, ref, data[5:], ref_sched)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fastsched_checkpoint_into_torch_with_a_scheduler_and_back():
    """fastsched(schedule=) stores "lr" as torch would under a scheduler (the next step's lr)
    and "initial_lr" as the base: torch AdamW continues at the scheduled lr, a torch scheduler
    resumed with last_epoch finds its base, and fastsched loads its own checkpoint back."""
    sched = Cosine(total_steps=12, warmup_steps=3, min_ratio=0.05)
    data = _batches(10)
    model = _linear()
    opt = fastsched.AdamW(model.parameters(), lr=1e-2, schedule=sched, backend="reference")
    _steps(model, opt, data[:5])
    sd = _roundtrip(opt.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2  # the live group keeps the base
    g = sd["param_groups"][0]
    assert g["initial_lr"] == 1e-2 and g["lr"] == pytest.approx(1e-2 * sched(5), rel=1e-12)

    ref_model = _linear()
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1.0, foreach=False)
    ref.load_state_dict(sd)
    assert ref.param_groups[0]["lr"] == pytest.approx(opt.current_lr()[0], rel=1e-12)
    ref_sched = ScheduleLR(ref, sched, last_epoch=4)  # needs "initial_lr"
    assert ref_sched.get_last_lr() == pytest.approx(opt.current_lr(), rel=1e-12)

    back = fastsched.AdamW(_linear().parameters(), lr=1.0, backend="reference")
    back.load_state_dict(sd)
    assert back.param_groups[0]["lr"] == 1e-2 and back.schedule == sched
    assert back.current_lr() == pytest.approx(opt.current_lr(), rel=1e-12)

    _steps(model, opt, data[5:])
    _steps(ref_model, ref, data[5:], ref_sched)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_old_fastsched_checkpoint_loads_as_saved():
    """A checkpoint of an earlier fastsched (no "initial_lr"; "lr" the base) loads with the
    behaviour it was saved with; without a schedule, "lr" is kept as stored."""
    sched = Cosine(total_steps=12, warmup_steps=3)
    model = _linear()
    opt = fastsched.AdamW(model.parameters(), lr=1e-2, schedule=sched, backend="reference")
    _steps(model, opt, _batches(4))
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # as the earlier versions wrote it
        g["lr"] = g.pop("initial_lr")
    other = fastsched.AdamW(_linear().parameters(), lr=1.0, backend="reference")
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-2
    assert other.current_lr() == opt.current_lr() == pytest.approx([1e-2 * sched(4)])

    # no schedule: a torch scheduler drives "lr"; its checkpoint keeps the scheduled lr
    model = _linear()
    plain = fastsched.AdamW(model.parameters(), lr=1e-2, backend="reference")
    ls = torch.optim.lr_scheduler.LinearLR(plain, 1.0, 0.5, total_iters=4)
    _steps(model, plain, _batches(2), ls)
    sd = plain.state_dict()
    assert "initial_lr" in sd["param_groups"][0]  # the torch scheduler's, kept as torch does
    again = fastsched.AdamW(_linear().parameters(), lr=1.0, backend="reference")
    again.load_state_dict(sd)
    assert again.param_groups[0]["lr"] == plain.param_groups[0]["lr"] != 1e-2


def test_lr_change_with_a_schedule_is_refused_unless_allowed():
    sched = Cosine(total_steps=10)
    model = _linear()
    data = _batches(3)
    opt = fastsched.AdamW(model.parameters(), lr=1e-2, schedule=sched, backend="reference")
    ls = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=4)
    _steps(model, opt, data[:1], ls)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="allow_lr_changes"):
        _steps(model, opt, data[1:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    opt.allow_lr_changes = True
    _steps(model, opt, data[1:2])
    assert opt.current_lr() == pytest.approx([opt.param_groups[0]["lr"] * sched(2)])

    # a warmup scheduler attached before the first step: refused at the first step already
    opt = fastsched.AdamW(_linear().parameters(), lr=1e-2, schedule=sched, backend="reference")
    torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=4)
    with pytest.raises(RuntimeError, match="initial_lr"):
        _steps(model, opt, data[:1])


def test_unwrap_and_adapter_basics():
    model = _linear()
    opt = fastsched.SGD(model.parameters(), lr=0.1, schedule=Cosine(total_steps=4))
    with pytest.raises(TypeError, match="no fastsched optimizer"):
        unwrap(torch.optim.SGD(model.parameters(), lr=0.1))
    from accelerate.optimizer import AcceleratedOptimizer

    assert unwrap(AcceleratedOptimizer(opt, device_placement=False)) is opt
    ad = ScheduleAdapter(opt)
    assert isinstance(ad, torch.optim.lr_scheduler.LRScheduler)
    assert ad.get_last_lr() == [0.1]
    _steps(model, opt, _batches(2), ad)
    assert opt.param_groups[0]["lr"] == 0.1
    assert ad.get_last_lr() == pytest.approx([0.1 * Cosine(total_steps=4)(1)])
    ad.load_state_dict(ad.state_dict())
    assert math.isfinite(ad.get_last_lr()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad.step()
