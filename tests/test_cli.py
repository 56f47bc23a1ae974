"""The ``fastsched`` command line: one way to start each command, help generated from the
registries, and bad input ending with one line naming the argument and exit status 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastsched.bench.contenders import CONFIGS, CONTENDERS, DEFAULT_CONFIGS, contenders_for
from fastsched.bench.harness import DTYPES
from fastsched.bench.shapes import SHAPE_SETS, ShapeSet
from fastsched.cli import build_parser, main
from fastsched.schedules import REGISTRY, Cosine

ROOT = Path(__file__).resolve().parents[1]
FILE = str(Path(__file__).resolve())  # an existing file that is not a directory nor results
COMMANDS = ["bench", "profile", "demo", "refine", "lawfit"]

BAD = [
    (["bench", "--sets", "gpt3"], "--sets", "gpt2"),
    (["bench", "--sets", ""], "--sets", "expected"),
    (["bench", "--sets", "gpt2,all"], "--sets", "'all'"),
    (["bench", "--shapes", "10xx3"], "--shapes", "positive integers"),
    (["bench", "--shapes", "1024x1024,,3"], "--shapes", "expected"),
    (["bench", "--shapes", "4x0"], "--shapes", "expected"),
    (["bench", "--scale", "0"], "--scale", "> 0"),
    (["bench", "--scale", "-0.5"], "--scale", "> 0"),
    (["bench", "--scale", "abc"], "--scale", "> 0"),
    (["bench", "--scale", "nan"], "--scale", "> 0"),
    (["bench", "--scale", "inf"], "--scale", "finite"),
    (["bench", "--dtypes", "fp64"], "--dtypes", "fp32"),
    (["bench", "--configs", "adam"], "--configs", "adamw"),
    (["bench", "--contenders", "torch-jit"], "--contenders", "torch-fused"),
    (["bench", "--compile-budget", "0"], "--compile-budget", "> 0"),
    (["bench", "--compile-max-tensors", "0"], "--compile-max-tensors", ">= 1"),
    (["bench", "--copy-mib", "1.5"], "--copy-mib", ">= 1"),
    (["bench", "--threads", "0"], "--threads", ">= 1"),
    (["bench", "--seed", "-1"], "--seed", ">= 0"),
    (["bench", "--device", "gpu"], "--device", "cpu, cuda or cuda:N"),
    (["bench", "--out", FILE], "--out", "expected a directory"),
    (["bench", "--readme", "no/such/results.json"], "--readme", "results JSON"),
    (["bench", "--report", FILE], "--report", "results JSON"),
    (["profile", "--set", "gpt2,lora-7b"], "--set", "one shape set"),
    (["profile", "--set", "bert"], "--set", "expected one of"),
    (["profile", "--scale", "0"], "--scale", "> 0"),
    (["profile", "--steps", "0"], "--steps", ">= 1"),
    (["profile", "--warmup", "-1"], "--warmup", ">= 0"),
    (["profile", "--top", "x"], "--top", ">= 0"),
    (["profile", "--dtype", "int8"], "--dtype", "fp32"),
    (["profile", "--config", "lamb"], "--config", "adamw"),
    (["profile", "--contender", "apex"], "--contender", "fastsched"),
    (["profile", "--out", FILE], "--out", "expected a directory"),
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
    (["demo", "--out", FILE], "--out", "expected a directory"),
    (["demo", "--out"], "--out", "expected one argument"),
    (["refine"], "LOG", "required"),
    (["refine", "x.csv", "--norm", "l3"], "--norm", "l2, l1"),
    (["refine", "x.csv", "--tol", "1"], "--tol", "[0, 1)"),
    (["refine", "x.csv", "--total-steps", "1"], "--total-steps", ">= 2"),
    (["lawfit"], "{fit,predict,rank}", "required"),
    (["lawfit", "fitt"], "{fit,predict,rank}", "'fit', 'predict', 'rank'"),
    (["lawfit", "fit"], "RUN", "required"),
    (["lawfit", "fit", "x.csv", "--lam", "1.5"], "--lam", "[0, 1)"),
    (["lawfit", "fit", "x.csv", "--skip", "-0.1"], "--skip", "[0, 1)"),
    (["lawfit", "predict", "--law", "x.json", "--schedule", "cosine", "--peak-lr", "0",
      "--total-steps", "10"], "--peak-lr", "> 0"),
    (["lawfit", "rank", "--law", "x.json", "--schedule", "cosine", "--peak-lr", "1e-3",
      "--total-steps", "0"], "--total-steps", ">= 1"),
    (["lawfit", "rank", "--law", "x.json", "--peak-lr", "1e-3", "--total-steps", "10"],
     "--schedule", "required"),
    (["lawfit", "rank", "--law", "x.json", "--schedule", "cosinus", "--peak-lr", "1e-3",
      "--total-steps", "10"], "--schedule", "wsd"),
    (["frobnicate"], "invalid choice", "'bench', 'profile', 'demo', 'refine', 'lawfit'"),
    ([], "{bench,profile,demo,refine,lawfit}", "required"),
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
    prog = "fastsched"  # the (sub)command the error is about
    if argv[:1] and argv[0] in COMMANDS:
        prog += " " + argv[0]
        if argv[0] == "lawfit" and argv[1:2] and argv[1] in ("fit", "predict", "rank"):
            prog += " " + argv[1]
    assert err.startswith(f"{prog}: error: "), err
    assert arg in err and expected in err, err


# -- one way to start each command ----------------------------------------------------------------

def _console_script() -> str:
    script = Path(sys.executable).with_name("fastsched")
    found = str(script) if script.exists() else shutil.which("fastsched")
    # the README's install (pip install -e .) puts it beside the interpreter: its absence is a
    # packaging failure, not a reason to skip
    assert found is not None, "the fastsched console script is not installed (pip install -e .)"
    return found


def _process(argv, *, module: bool = False):
    cmd = [sys.executable, "-m", "fastsched", *argv] if module else [_console_script(), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("argv, arg", [
    (["bench", "--scale", "-1"], "--scale"),
    (["profile", "--config", "lamb"], "--config"),
    (["demo", "--out", FILE], "--out"),
    (["refine", "--norm", "l3", "norms.csv"], "--norm"),
    (["lawfit", "fit", "no/such/run.csv"], "RUN"),
], ids=COMMANDS)
def test_every_command_from_the_console_script(argv, arg):
    """The installed ``fastsched`` script, a fresh process: one line, status 2, no traceback."""
    r = _process(argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith(f"fastsched {argv[0]}") and f"argument {arg}:" in r.stderr


def test_python_m_fastsched_is_the_same_program():
    a = _process(["bench", "--sets", "gpt3"])
    b = _process(["bench", "--sets", "gpt3"], module=True)
    assert a.returncode == b.returncode == 2 and a.stderr == b.stderr
    r = _process(["--help"], module=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: fastsched ")


def test_no_other_way_to_start_the_benchmark():
    assert not (ROOT / "bench" / "run.py").exists()
    for mod in ("fastsched.bench.__main__", "fastsched.tools.__main__"):
        assert importlib.util.find_spec(mod) is None, mod
    assert "__main__" not in (ROOT / "fastsched" / "cli.py").read_text()


# -- help generated from the registries -----------------------------------------------------------

def _help(argv, capsys) -> str:
    assert _run([*argv, "--help"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    return " ".join(cap.out.split())  # wrapping undone


def test_help_exits_0(capsys):
    for argv in ([], ["bench"], ["profile"], ["demo"], ["refine"], ["lawfit"], ["lawfit", "fit"],
                 ["lawfit", "predict"], ["lawfit", "rank"]):
        out = _help(argv, capsys)
        assert out.startswith(f"usage: {' '.join(['fastsched', *argv])} "), out[:80]
    assert all(c in _help([], capsys) for c in COMMANDS)


@pytest.mark.parametrize("command, sets, configs, contenders", [
    ("bench", "--sets", "--configs", "--contenders"),
    ("profile", "--set", "--config", "--contender"),
])
def test_bench_help_lists_the_registries(command, sets, configs, contenders, capsys):
    out = _help([command], capsys)
    listed = out[out.index(f"shape sets ({sets}"):]
    for s in SHAPE_SETS.values():
        entry = f"{s.name} {s.tensors:,} tensors, {s.params:,} parameters. {s.description}"
        assert entry in listed, s.name
    listed = out[out.index(f"configurations ({configs}"):]
    for c in CONFIGS.values():
        assert f"{c.key} {c.title}. {' '.join(c.description.split())}." in listed, c.key
        assert f"{c.elements} elements per parameter" in listed
    assert f"the benchmark's default: {', '.join(DEFAULT_CONFIGS)}" in out
    listed = out[out.index(f"contenders ({contenders}"):]
    for k, c in CONTENDERS.items():
        runs_in = ", ".join(cfg for cfg in CONFIGS if c in contenders_for(cfg))
        assert f"{k} {' '.join(c.description.split())} (configurations: {runs_in})" in listed, k
    options = out[:out.index("shape sets (")]
    for names in (SHAPE_SETS, CONFIGS, CONTENDERS, DTYPES):
        assert ", ".join(names) in options


def test_help_and_choices_follow_the_registries(monkeypatch, capsys):
    """A new entry in each registry is listed and accepted without touching the command."""
    extra = ShapeSet("tiny-test", ((3, 5), (7,)), "a shape set added by the test")
    monkeypatch.setitem(SHAPE_SETS, extra.name, extra)
    monkeypatch.setitem(CONTENDERS, "test-contender", dataclasses.replace(
        CONTENDERS["fastsched"], key="test-contender", description="added by the test"))
    monkeypatch.setitem(REGISTRY, "cosine_test", Cosine)
    out = _help(["bench"], capsys)
    assert "tiny-test 2 tensors, 22 parameters. a shape set added by the test" in out
    assert "test-contender added by the test" in out
    args = build_parser().parse_args(["bench", "--sets", "gpt2,tiny-test", "--contenders",
                                      "test-contender"])
    assert args.sets == ["gpt2", "tiny-test"] and args.contenders == ["test-contender"]
    assert build_parser().parse_args(["profile", "--set", "tiny-test"]).set == "tiny-test"
    assert "cosine_test Cosine(total_steps, warmup_steps=0," in _help(["lawfit", "rank"], capsys)


@pytest.mark.parametrize("command", ["predict", "rank"])
def test_schedule_help_lists_the_schedule_registry(command, capsys):
    out = _help(["lawfit", command], capsys)
    assert f"KIND one of {', '.join(sorted(REGISTRY))} (fields below" in out
    listed = out[out.index("schedule kinds for --schedule"):]
    kinds = sorted(REGISTRY)
    starts = [listed.index(f" {kind} {REGISTRY[kind].__name__}(") for kind in kinds]
    for kind, a, b in zip(kinds, starts, [*starts[1:], len(listed)]):
        entry = listed[a:b]
        at = 0
        for f in dataclasses.fields(REGISTRY[kind]):  # in order; required ones without a value
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            m = re.compile(rf"[(,] {f.name}(?=[,)])" if required else rf"[(,] {f.name}=").search(
                entry.replace("(", "( "), at)
            assert m is not None, (kind, f.name, entry)
            at = m.end()


def test_bench_defaults_come_from_the_registries():
    """Unset lists stay None (the device's defaults apply); --threads takes a list."""
    from fastsched.bench.device import Device
    from fastsched.bench.harness import (
        CPU_DEFAULT_CONFIGS,
        CPU_DEFAULT_SETS,
        BenchOptions,
        _default_lists,
    )

    args = build_parser().parse_args(["bench"])
    assert args.configs is None and args.sets is None and args.threads is None
    cpu = _default_lists(BenchOptions(), Device("cpu"))
    assert cpu.sets == list(CPU_DEFAULT_SETS) and cpu.configs == list(CPU_DEFAULT_CONFIGS)
    given = _default_lists(BenchOptions(sets=["lora-7b"], configs=list(DEFAULT_CONFIGS)),
                           Device("cpu"))
    assert given.sets == ["lora-7b"] and given.configs == list(DEFAULT_CONFIGS)
    assert build_parser().parse_args(["bench", "--threads", "2,1,2"]).threads == [2, 1]
    assert build_parser().parse_args(["bench", "--sets", "all"]).sets == list(SHAPE_SETS)
    assert build_parser().parse_args(["bench", "--dtypes", "float32,bf16,fp32"]).dtypes == [
        "fp32", "bf16"]


def test_demo_calls_demo_main(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("fastsched.demo")
    fake.main = lambda outdir: calls.append(outdir)
    monkeypatch.setitem(sys.modules, "fastsched.demo", fake)
    import fastsched

    monkeypatch.setattr(fastsched, "demo", fake, raising=False)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert calls == [Path(tmp_path / "d")]


def test_demo_cannot_write(monkeypatch, tmp_path, capsys):
    fake = types.ModuleType("fastsched.demo")

    def refuse(outdir):
        raise PermissionError(13, "Permission denied", str(outdir))

    fake.main = refuse
    monkeypatch.setitem(sys.modules, "fastsched.demo", fake)
    import fastsched

    monkeypatch.setattr(fastsched, "demo", fake, raising=False)
    assert _run(["demo", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastsched demo: error: argument --out: ")
    assert "PermissionError" in err


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
