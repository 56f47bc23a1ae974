"""The examples run and train: finite, decreasing losses (no claim about which method wins)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_allora_lora_example(capsys):
    curves = _load("allora_lora").main(steps=60, every=20)
    out = capsys.readouterr().out
    assert "LoRA" in out and "ALLoRA" in out and len(out.strip().splitlines()) == 5
    assert set(curves) == {"lora", "allora"}
    for losses in curves.values():
        assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
        first, last = losses[0], sum(losses[-5:]) / 5
        assert last < 0.2 * first
    # both start from the same model output (B = 0): the same first loss
    assert curves["lora"][0] == curves["allora"][0]
