"""ALLoRA groups built from a real PEFT model: LoRA factors of linear and embedding layers with
ALLoRA, modules_to_save plain, frozen weights left out; the step runs and scales by unit."""

import pytest
import torch

import fastsched
from fastsched.integrations.peft import allora_param_groups, is_lora_factor

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(self.emb(x)))).mean(1)


def _model():
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, target_modules=["fc1", "emb"], modules_to_save=["head"])
    return peft.get_peft_model(Tiny(), cfg)


def test_groups_split_lora_factors_from_the_rest():
    model = _model()
    groups = allora_param_groups(model, eta=4.0, lr=2e-3)
    lora = [n for n, _ in groups[0]["params"]]
    other = [n for n, _ in groups[1]["params"]]
    kinds = sorted(next(part for part in n.split(".") if part.startswith("lora_")) for n in lora)
    assert kinds == ["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"]
    assert groups[0]["allora_eta"] == 4.0 and groups[0]["lr"] == 2e-3
    assert all("modules_to_save" in n for n in other) and len(other) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lora) | set(other) == trainable  # frozen base weights left out
    assert not is_lora_factor("base_model.model.fc1.base_layer.weight")


def test_step_scales_lora_units_and_leaves_the_head_plain():
    """One SGD step: each row of a LoRA factor moves by lr * g / sqrt(||row||^2 + 1/eta^2),
    the head by lr * g."""
    model = _model()
    eta, lr = 4.0, 0.1
    opt = fastsched.SGD(allora_param_groups(model, eta=eta), lr=lr)
    x = torch.randint(0, 50, (6, 5))
    model(x).square().mean().backward()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in named.items() if p.requires_grad}
    opt.step()
    for n, p0 in before.items():
        g = grads[n]
        if is_lora_factor(n):
            rows = p0.reshape(p0.shape[0], -1)
            scale = 1.0 / torch.sqrt((rows * rows).sum(1, keepdim=True) + 1.0 / eta ** 2)
            expect = p0 - lr * (g.reshape(rows.shape) * scale).reshape(p0.shape)
        else:
            expect = p0 - lr * g
        torch.testing.assert_close(named[n].detach(), expect, rtol=1e-5, atol=1e-7)


def test_no_lora_factor_is_an_error():
    with pytest.raises(ValueError, match="model: no trainable LoRA factor"):
        allora_param_groups(torch.nn.Linear(3, 2), eta=1.0)
