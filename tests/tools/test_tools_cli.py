"""The refine and lawfit subcommands (defined in fastsched.tools.cli), started as ``fastsched``
starts them."""

import importlib.util
import json

import numpy as np
import pytest

from fastsched.cli import main
from fastsched.schedules import REGISTRY, WSD, Constant, Cosine, from_dict
from fastsched.tools import lawfit, refine
from fastsched.tools.cli import parse_schedule

T, PEAK = 4000, 1e-3
TRUE = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 2.0}
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(argv):
    return main(argv)


def _fails(argv, capsys, *words):
    with pytest.raises(SystemExit) as e:
        _run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _write_run(path, schedule, every=20, noise=0.002, seed=0, fmt="csv"):
    lrs = lawfit.schedule_lrs(schedule, PEAK, T)
    s1, s2 = lawfit.areas(lrs)
    loss = lawfit.law(s1, s2, **TRUE) * (1 + noise * np.random.default_rng(seed).standard_normal(T))
    rows = [(t, float(lrs[t]), float(loss[t]) if (t + 1) % every == 0 else None)
            for t in range(T)]
    if fmt == "csv":
        path.write_text("step,lr,loss\n" + "".join(
            f"{t},{lr!r},{'' if lo is None else repr(lo)}\n" for t, lr, lo in rows))
    else:
        path.write_text(json.dumps([{"step": t, "lr": lr, "loss": lo} for t, lr, lo in rows]))
    return path


@pytest.fixture
def runs(tmp_path):
    return [str(_write_run(tmp_path / "constant.csv", Constant(1.0), seed=1)),
            str(_write_run(tmp_path / "cosine.json", Cosine(T, warmup_steps=200), seed=2,
                           fmt="json"))]


# -- lawfit ---------------------------------------------------------------------------------------

def test_fit_predict_rank(runs, tmp_path, capsys):
    law_path = tmp_path / "law.json"
    argv = ["lawfit", "fit", *runs, "--out", str(law_path)]
    if HAS_MPL:
        argv += ["--plot", str(tmp_path / "fit.png")]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "L(s) = " in out and "constant:" in out and "cosine:" in out
    law = lawfit.LawFit.from_dict(json.loads(law_path.read_text()))
    for k, v in TRUE.items():
        assert getattr(law, k) == pytest.approx(v, rel=0.05), k
    if HAS_MPL:
        assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"

    pred_csv = tmp_path / "pred.csv"
    assert _run(["lawfit", "predict", "--law", str(law_path), "--schedule",
                 "wsd:decay_fraction=0.2,warmup_steps=200", "--peak-lr", str(PEAK),
                 "--total-steps", str(T), "--out", str(pred_csv)]) == 0
    out = capsys.readouterr().out
    sched = WSD(warmup_steps=200, total_steps=T, decay_fraction=0.2)
    expect = law.predict(sched, PEAK, T)
    assert f"predicted final loss {expect[-1]:.6g}" in out
    table = np.loadtxt(pred_csv, delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 2], expect, rtol=1e-7)
    np.testing.assert_allclose(table[:, 1], lawfit.schedule_lrs(sched, PEAK, T), rtol=1e-7)

    assert _run(["lawfit", "rank", "--runs", *runs, "--schedule", "constant",
                 "--schedule", "cosine", "--schedule", "wsd:decay_fraction=0.3",
                 "--peak-lr", str(PEAK), "--total-steps", str(T)]) == 0
    out = capsys.readouterr().out
    order = [line.split()[1] for line in out.splitlines() if line.strip()[:2] in ("1.", "2.",
                                                                                   "3.")]
    assert order[-1] == "constant" and sorted(order) == ["constant", "cosine",
                                                          "wsd:decay_fraction=0.3"]


@pytest.mark.parametrize("content, words", [
    (None, ["argument RUN", "cannot read"]),
    ("", ["argument RUN", "is empty"]),
    ("step,lr,loss\n", ["argument RUN", "no rows"]),
    ("step,lr,loss\n0,0.1,nan\n1,0.1,2.0\n", ["argument RUN", "loss has non-finite"]),
    ("step,lr,loss\n0,inf,3.0\n1,0.1,2.0\n", ["argument RUN", "lr has non-finite"]),
    ("step,lr,loss\n0,0.1,,\n", ["argument RUN", "fields"]),
    ('{"step": [0, 1, 2], "lr": [0.1, 0.1], "loss": [3, 2, 1]}',
     ["argument RUN", "different lengths"]),
    ("step,lr\n0,0.1\n", ["argument RUN", "no 'loss' column"]),
    ("step,lr,loss\n0,0.1,3\n1,0.05,2.5\n2,0.02,2.4\n", ["argument RUN", "too few points"]),
    ("step,lr,loss\n1,0.1,3\n0,0.05,2.5\n", ["argument RUN", "increasing"]),
    ('{"step": [0, 1], "lr": ["a", 0.1], "loss": [3, 2]}', ["argument RUN", "not a number"]),
    ("{not json", ["argument RUN", "JSON"]),
])
def test_fit_bad_input(tmp_path, capsys, content, words):
    path = tmp_path / ("run.json" if content and content.startswith("{") else "run.csv")
    if content is not None:
        path.write_text(content)
    _fails(["lawfit", "fit", str(path)], capsys, "fastsched lawfit fit", *words)


def test_fit_needs_an_annealing_run(tmp_path, capsys):
    path = _write_run(tmp_path / "c.csv", Constant(1.0))
    _fails(["lawfit", "fit", str(path)], capsys, "argument RUN", "no curve anneals")


def test_predict_bad_arguments(runs, tmp_path, capsys):
    base = ["--peak-lr", "1e-3", "--total-steps", "100"]
    _fails(["lawfit", "predict", "--runs", *runs, "--schedule", "nope", *base], capsys,
           "argument --schedule", "unknown schedule kind")
    _fails(["lawfit", "predict", "--runs", *runs, "--schedule", "cosine:warmup=3", *base],
           capsys, "argument --schedule", "no field 'warmup'")
    _fails(["lawfit", "predict", "--runs", *runs, "--schedule", "cosine", "--schedule",
            "constant", *base], capsys, "argument --schedule", "one schedule")
    bad_law = tmp_path / "law.json"
    bad_law.write_text('{"L0": 1.0}')
    _fails(["lawfit", "predict", "--law", str(bad_law), "--schedule", "cosine", *base], capsys,
           "argument --law", "missing")
    _fails(["lawfit", "predict", "--law", str(tmp_path / "none.json"), "--schedule", "cosine",
            *base], capsys, "argument --law", "cannot read")
    # the argument types' checks: the same one line and exit status 2
    _fails(["lawfit", "predict", "--runs", *runs, "--schedule", "cosine", "--peak-lr", "-1",
            "--total-steps", "100"], capsys, "fastsched lawfit predict: error: argument "
           "--peak-lr: expected a finite number > 0, got '-1'")
    _fails(["lawfit", "rank", "--runs", *runs, "--schedule", "cosine", "--lam", "1",
            *base], capsys, "fastsched lawfit rank: error: argument --lam:", "[0, 1)")
    _fails(["lawfit", "rank", "--runs", *runs, "--schedule", "cosine", "--schedule", "cosinus",
            *base], capsys, "fastsched lawfit rank: error: argument --schedule:",
           ", ".join(sorted(REGISTRY)))


def test_schedule_specs(tmp_path):
    assert parse_schedule("cosine", 500) == Cosine(500)
    assert parse_schedule("wsd:decay_fraction=0.2,decay_shape=linear", 500) == WSD(
        total_steps=500, decay_fraction=0.2, decay_shape="linear")
    spec = json.dumps(Cosine(100, warmup_steps=10).to_dict())
    assert parse_schedule(spec, 500) == Cosine(100, warmup_steps=10)
    f = tmp_path / "s.json"
    f.write_text(spec)
    assert parse_schedule("@" + str(f), None) == Cosine(100, warmup_steps=10)


# -- refine ---------------------------------------------------------------------------------------

def test_refine_writes_the_schedule(tmp_path, capsys):
    rng = np.random.default_rng(0)
    g = (1 + 3 * np.exp(-np.arange(2000) / 200)) * np.exp(0.2 * rng.standard_normal(2000))
    log = tmp_path / "norms.csv"
    log.write_text("step,grad_norm\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(g)))
    out_json = tmp_path / "sched.json"
    argv = ["refine", str(log), "--out", str(out_json)]
    if HAS_MPL:
        argv += ["--plot", str(tmp_path / "refine.png")]
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    assert "refined schedule over 2000 steps from 2000 gradient norms (l2)" in printed
    sched = from_dict(json.loads(out_json.read_text()))
    assert sched.to_dict() == refine(g).to_dict()
    if HAS_MPL:
        assert (tmp_path / "refine.png").read_bytes()[:4] == b"\x89PNG"
    # per-step CSV, a new length, L1 norms from a bare column of numbers
    bare = tmp_path / "l1.csv"
    bare.write_text("".join(f"{float(v)!r}\n" for v in g))
    out_csv = tmp_path / "sched.csv"
    assert _run(["refine", str(bare), "--norm", "l1", "--total-steps", "500", "--out",
                 str(out_csv)]) == 0
    table = np.loadtxt(out_csv, delimiter=",", skiprows=1)
    want = refine(g, norm="l1", total_steps=500)
    assert table.shape == (500, 2)
    np.testing.assert_allclose(table[:, 1], [want(t) for t in range(500)], rtol=1e-7,
                               atol=1e-12)


@pytest.mark.parametrize("content, argv, words", [
    (None, [], ["argument LOG", "cannot read"]),
    ("step,grad_norm\n", [], ["argument LOG", "no rows"]),
    ("step,grad_norm\n0,inf\n1,inf\n2,nan\n", [], ["argument LOG", "usable values"]),
    ("step,other\n0,1\n1,2\n", [], ["argument --column", "no 'grad_norm' column"]),
    ("step,grad_norm\n0,1\n1,2\n", ["--norm", "l1"], ["argument --column", "grad_norm_l1"]),
])
def test_refine_bad_input(tmp_path, capsys, content, argv, words):
    path = tmp_path / "norms.csv"
    if content is not None:
        path.write_text(content)
    _fails(["refine", str(path), *argv], capsys, "fastsched refine", *words)


@pytest.mark.parametrize("argv, words", [
    (["--norm", "l3"], ["argument --norm: unknown norm 'l3'; expected one of l2, l1"]),
    (["--tol", "-0.001"], ["argument --tol:", "[0, 1)"]),
    (["--total-steps", "1"], ["argument --total-steps:", ">= 2"]),
    (["--total-steps", "many"], ["argument --total-steps:", ">= 2"]),
])
def test_refine_bad_arguments(tmp_path, capsys, argv, words):
    log = tmp_path / "norms.csv"
    log.write_text("step,grad_norm\n0,1\n1,2\n")
    line = _fails(["refine", str(log), *argv], capsys, *words)
    assert line.startswith("fastsched refine: error: ")
