"""Fixtures of the optimizer tests shared between modules."""

from __future__ import annotations

import math

import pytest
import torch

from fastsched.optim import _reference


@pytest.fixture
def exact(monkeypatch):
    """The reference with correctly rounded float32 sqrt and float64 ALLoRA unit sums, as the
    compiled executor computes them (torch's CPU float32 sqrt is off by up to 0.75 ulp; its
    float32 unit sums round otherwise): every difference left is a bug."""
    sqrt = torch.Tensor.sqrt

    def sqrt_rn(self):
        if self.dtype == torch.float32:
            return sqrt(self.double()).float()
        return sqrt(self)

    def allora_scales(p, unit, inv_eta2, reduce=None):
        p64 = p.to(torch.float32).double()
        if p.dim() < 2 or unit == "tensor":
            n = (p64 * p64).sum().float()
            return (1.0 / sqrt_rn(n + inv_eta2)).expand(p.shape).contiguous()
        cols = math.prod(p.shape[1:])
        v = p64.reshape(p.shape[0], cols)
        n = (v * v).sum(1 if unit == "row" else 0, keepdim=True).float()
        return (1.0 / sqrt_rn(n + inv_eta2)).expand_as(v).reshape(p.shape).contiguous()

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt_rn)
    monkeypatch.setattr(_reference, "allora_scales", allora_scales)
