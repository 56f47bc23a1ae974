"""examples/allora_peft.py runs in its quick mode: every variant trained, finite numbers, a plot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "allora_peft.py"


def _load():
    spec = importlib.util.spec_from_file_location("allora_peft", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_allora_peft_example_quick(tmp_path, capsys):
    out = tmp_path / "allora_peft.png"
    res = _load().main(quick=True, out=out)
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0
    assert str(out) in printed

    (lr, by_variant), = res["results"].items()  # quick: one learning rate
    names = set(by_variant)
    assert "lora" in names
    assert any(n.startswith("allora eta=") for n in names)
    assert any(n.startswith("allora-grad") for n in names)
    for name in names:
        assert name in printed
    assert f"AdamW lr {lr:g}" in printed

    for name, runs in by_variant.items():
        assert len(runs) == 2  # quick: two seeds
        for run in runs:
            for key in ("train", "test", "acc"):
                assert math.isfinite(run[key]), (name, key)
            steps = [s for s, _ in run["curve"]]
            assert steps[0] == 0 and steps[-1] == 60
            losses = [v for _, v in run["curve"]]
            assert all(math.isfinite(v) for v in losses)
            assert losses[-1] < losses[0]  # fine-tuning lowers the held-out loss
        # every variant starts from the same base model and B = 0 adapter
        assert runs[0]["curve"][0] == by_variant["lora"][0]["curve"][0]
    for stats in res["summary"][lr].values():
        assert all(math.isfinite(v) for v in stats.values())
    assert math.isfinite(res["seconds"])
