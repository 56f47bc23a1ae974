"""The tools' examples run end to end at a reduced size."""

import importlib.util
import math
from pathlib import Path

import pytest

from fastsched.schedules import Table

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lawfit_predict_example(capsys):
    r = _load("lawfit_predict").main(steps=200)
    out = capsys.readouterr().out
    assert "predicted final loss" in out and "actual final loss" in out
    assert f"{r['predicted_final']:.4f}" in out and f"{r['actual_final']:.4f}" in out
    assert len(r["ranked"]) == 7 and all(math.isfinite(v) for _, v in r["ranked"])
    assert [v for _, v in r["ranked"]] == sorted(v for _, v in r["ranked"])


def test_autolrs_demo(capsys):
    r = _load("autolrs_demo").main(steps=60, tau=30, tau_max=60)
    out = capsys.readouterr().out
    ctl = r["controller"]
    assert out.count("stage at step") == len(ctl.stages) == 2
    assert "chosen schedule" in out and isinstance(r["schedule"], Table)
    assert ctl.step == 60 and all(1e-4 <= s.lr <= 1e-1 for s in ctl.stages)
    assert math.isfinite(r["final"]) and set(r["baselines"]) == {1e-3, 1e-2}


@pytest.mark.skipif(not HAS_MPL, reason="plot extra")
def test_make_tool_plots(tmp_path):
    r = _load("make_tool_plots").main(out=str(tmp_path), steps=300, lawfit_steps=200,
                                      verbose=False)
    for key in ("refine", "lawfit"):
        assert Path(r[key]).read_bytes()[:4] == b"\x89PNG"
    assert len(r["history"]["grad_norm"]) == 300
    assert r["schedule"].steps[-1] == 299
