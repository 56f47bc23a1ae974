"""The ``fastsched`` command line: bad input ends with one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastsched.cli import main

BAD = [
    (["bench", "--sets", "gpt3"], "--sets", "gpt2"),
    (["bench", "--sets", ""], "--sets", "expected"),
    (["bench", "--shapes", "10xx3"], "--shapes", "positive integers"),
    (["bench", "--shapes", "1024x1024,,3"], "--shapes", "expected"),
    (["bench", "--shapes", "4x0"], "--shapes", "expected"),
    (["bench", "--scale", "0"], "--scale", "> 0"),
    (["bench", "--scale", "-0.5"], "--scale", "> 0"),
    (["bench", "--scale", "abc"], "--scale", "> 0"),
    (["bench", "--scale", "nan"], "--scale", "> 0"),
    (["bench", "--dtypes", "fp64"], "--dtypes", "fp32"),
    (["bench", "--configs", "adam"], "--configs", "adamw"),
    (["bench", "--contenders", "torch-jit"], "--contenders", "torch-fused"),
    (["bench", "--compile-budget", "0"], "--compile-budget", "> 0"),
    (["bench", "--readme", "no/such/results.json"], "--readme", "results JSON"),
    (["profile", "--set", "gpt2,lora-7b"], "--set", "one shape set"),
    (["profile", "--set", "bert"], "--set", "expected one of"),
    (["profile", "--scale", "0"], "--scale", "> 0"),
    (["profile", "--steps", "0"], "--steps", "> 0"),
    (["profile", "--dtype", "int8"], "--dtype", "fp32"),
    (["profile", "--config", "lamb"], "--config", "adamw"),
    (["profile", "--contender", "apex"], "--contender", "fastsched"),
    (["profile", "--model", "nocolon"], "--model", "module:callable"),
    (["profile", "--model", "no_such_module_xyz:make"], "--model", "cannot import"),
    (["profile", "--model", "fastsched:no_such_attr"], "--model", "no attribute"),
    (["profile", "--model", "fastsched:__version__"], "--model", "not a callable"),
    (["profile", "--model", "clitarget:returns_int"], "--model", "returned int"),
    (["profile", "--model", "clitarget:returns_module"], "--model", "returned Linear"),
    (["profile", "--model", "clitarget:returns_strings"], "--model", "str items"),
    (["profile", "--model", "clitarget:empty"], "--model", "no items"),
    (["profile", "--model", "clitarget:raises"], "--model", "raised RuntimeError"),
    (["profile", "--model", "clitarget:bad_loss"], "--model", "loss_fn(model) failed"),
    (["profile", "--set", "gpt2", "--model", "clitarget:empty"], "--model", "not allowed"),
    (["frobnicate"], "invalid choice", "bench"),
    ([], "required", "bench"),
]

TARGET = '''
import torch

def returns_int():
    return 42

def returns_module():
    return torch.nn.Linear(2, 2)

def returns_strings():
    return ["a", "b"]

def empty():
    return []

def raises():
    raise RuntimeError("boom")

def bad_loss():
    return torch.nn.Linear(2, 2), lambda m: "not a tensor"
'''


@pytest.fixture
def target_module(tmp_path, monkeypatch):
    (tmp_path / "clitarget.py").write_text(TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("clitarget", None)
    yield
    sys.modules.pop("clitarget", None)


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, arg, expected", BAD, ids=[" ".join(a[0]) or "none" for a in BAD])
def test_bad_input_one_line_exit_2(argv, arg, expected, capsys, target_module):
    assert _run(argv) == 2
    cap = capsys.readouterr()
    err = cap.err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and cap.out == ""
    assert err.startswith("fastsched")
    assert arg in err and expected in err, err


def test_bad_input_from_a_fresh_process():
    # python -m fastsched is the fastsched command: still one line and status 2
    r = subprocess.run([sys.executable, "-m", "fastsched", "bench", "--scale", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--scale" in r.stderr and "Traceback" not in r.stderr


def test_help_exits_0(capsys):
    for argv in (["--help"], ["bench", "--help"], ["profile", "--help"], ["demo", "--help"]):
        assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "--scale" in out and "--model" in out and "--readme" in out


def test_demo_calls_demo_main(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("fastsched.demo")
    fake.main = lambda outdir: calls.append(outdir)
    monkeypatch.setitem(sys.modules, "fastsched.demo", fake)
    import fastsched

    monkeypatch.setattr(fastsched, "demo", fake, raising=False)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert calls == [Path(tmp_path / "d")]


def test_demo_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastsched.demo", None)  # import fails
    import fastsched

    monkeypatch.delattr(fastsched, "demo", raising=False)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo" in err


def test_schedule_tools_are_subcommands(tmp_path, capsys):
    """refine and lawfit are reachable from the main command; bad input: one line, exit 2."""
    missing = tmp_path / "missing.csv"
    for argv in (["refine", str(missing)], ["lawfit", "fit", str(missing)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    log = tmp_path / "norms.csv"
    log.write_text("step,grad_norm\n" + "".join(f"{i},{1.0 + 0.01 * i}\n" for i in range(200)))
    out = tmp_path / "sched.json"
    assert main(["refine", str(log), "--out", str(out)]) == 0
    import json

    from fastsched.schedules import Table, from_dict

    sched = from_dict(json.loads(out.read_text()))
    assert isinstance(sched, Table) and sched(0) == pytest.approx(1.0)
