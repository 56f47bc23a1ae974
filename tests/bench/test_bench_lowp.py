"""The benchmark's configurations below fp32 on the CPU: bytes per parameter, an end-to-end run on
tiny shapes, the state held measured against the formula, contenders that are not installed.

Nothing here asserts a timing; derived numbers are checked against the recorded timings.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import types

import pytest
import torch
from fastsched.kernels import layout as L

from fastsched.bench import contenders as C
from fastsched.bench.harness import LOWP_CONFIGS, BenchOptions, run_bench, save_results
from fastsched.bench.report import render_bytes_table, render_markdown
from fastsched.bench.shapes import parse_shapes
from fastsched.cli import main
from fastsched.optim._lowp import MIN_8BIT_SIZE

#: one tensor with 8-bit states (>= MIN_8BIT_SIZE elements, 32 scales) and one that keeps fp32
SHAPES = "64x128,300"
BIG, SMALL = 64 * 128, 300
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
#: the contenders that need no torch.compile (torchao's compile per shape takes ~10 s: below)
FAST = ["fp32-baseline", "torch-master", "torch-fused", "bnb-8bit", "fastsched"]


def _has(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as absent, as in the harness
        return False
    return True


def _tiny(**kw) -> BenchOptions:
    base = dict(sets=[], custom=parse_shapes(SHAPES), scale=1.0, quick=True, out=None,
                progress=False, plot=False, copy_mib=1, device="cpu", threads=1,
                dtypes=["fp32", "bf16"], configs=list(LOWP_CONFIGS))
    base.update(kw)
    return BenchOptions(**base)


# -- bytes per parameter from the configuration ---------------------------------------------------

def test_bytes_per_param_large_tensors():
    cf = C.CONFIGS
    scales = 4 / L.Q_BLOCK  # one fp32 scale per block, per state
    # fp32 AdamW: p r/w, g, m r/w, v r/w
    assert cf["adamw"].bytes_per_param(F32) == 28 and cf["adamw"].state_bytes_per_param(F32) == 8
    # bf16 + master: p written, g read, master r/w, fp32 m, v r/w
    assert cf["adamw-master"].bytes_per_param(BF16) == 2 + 2 + 8 + 16
    assert cf["adamw-master"].state_bytes_per_param(BF16) == 4 + 8
    assert cf["adamw-master"].bytes_per_param(F16) == 28
    assert cf["adamw-sr"].bytes_per_param(BF16) == 14
    assert cf["adamw-sr"].state_bytes_per_param(BF16) == 4
    assert cf["adamw-bf16-states"].bytes_per_param(F32) == 8 + 4 + 8
    assert cf["adamw-bf16-states"].state_bytes_per_param(F32) == 4
    assert cf["adamw-bf16-states"].bytes_per_param(BF16) == 14
    assert cf["adamw-8bit"].bytes_per_param(F32) == 12 + 2 * 2 * (1 + scales)
    assert cf["adamw-8bit"].bytes_per_param(BF16) == pytest.approx(10.0625)
    assert cf["adamw-sr-8bit"].bytes_per_param(BF16) == 6 + 2 * 2 * (1 + scales)
    for k in ("adamw-8bit", "adamw-sr-8bit"):
        assert cf[k].state_bytes_per_param(BF16) == 2 + 8 / 256
    # where a configuration does not run
    for k, d in (("adamw-master", F32), ("adamw-sr", F32), ("adamw-sr", F16),
                 ("adamw-sr-8bit", F32)):
        assert not cf[k].allows(d)
        assert cf[k].bytes_per_param(d) is None and cf[k].state_bytes_per_param(d) is None


def test_bytes_per_param_exact_for_a_shape_set():
    shapes = [(64, 128), (SMALL,)]
    n = BIG + SMALL
    blocks = math.ceil(BIG / L.Q_BLOCK)
    assert BIG >= MIN_8BIT_SIZE > SMALL
    cfg = C.CONFIGS["adamw-8bit"]
    # the small tensor keeps fp32 states (m, v: 8 B held, 16 B moved)
    held = (2 * (BIG + 4 * blocks) + 8 * SMALL) / n
    moved = (12 * n + 2 * 2 * (BIG + 4 * blocks) + 16 * SMALL) / n
    assert cfg.state_bytes_per_param(F32, shapes) == pytest.approx(held, rel=1e-15)
    assert cfg.bytes_per_param(F32, shapes) == pytest.approx(moved, rel=1e-15)
    # storage without 8-bit: the shape set changes nothing
    assert C.CONFIGS["adamw-master"].bytes_per_param(BF16, shapes) == 28


def test_state_nbytes_rules():
    shared = torch.zeros(256)
    states = [{"step": torch.zeros(()), "a": torch.zeros(10), "q": shared},
              {"step": torch.zeros(()), "a": torch.zeros(6, dtype=torch.bfloat16), "q": shared,
               "n": 3}]
    assert C.state_nbytes(states) == 40 + 12 + 1024  # step left out, shared map once


# -- an end-to-end run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lowp_run():
    return run_bench(_tiny(contenders=FAST))


def test_configurations_run_in_their_dtypes(lowp_run):
    seen = {(r["config"], r["dtype"]) for r in lowp_run["results"]}
    assert seen == {("adamw-master", "bf16"), ("adamw-sr", "bf16"),
                    ("adamw-bf16-states", "fp32"), ("adamw-bf16-states", "bf16"),
                    ("adamw-8bit", "fp32"), ("adamw-8bit", "bf16"), ("adamw-sr-8bit", "bf16")}
    for r in lowp_run["results"]:
        keys = [c.key for c in C.contenders_for(r["config"], cpu=True)]
        assert r["contender"] in keys and r["contender"] in FAST
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] != "ok":
            assert r["reason"], r


def test_fastsched_state_matches_formula(lowp_run):
    fs = [r for r in lowp_run["results"] if r["family"] == "fastsched"]
    assert len(fs) == 7 and all(r["status"] == "ok" for r in fs)
    n = BIG + SMALL
    blocks = math.ceil(BIG / L.Q_BLOCK)
    for r in fs:
        cfg = C.CONFIGS[r["config"]]
        dtype = {"fp32": F32, "bf16": BF16}[r["dtype"]]
        expect = cfg.state_bytes_per_param(dtype, [(64, 128), (SMALL,)])
        assert r["state_bytes_formula"] == expect
        assert r["state_bytes_per_param"] == pytest.approx(expect, rel=1e-12), r
        assert r["state_bytes"] == round(expect * n)
        if cfg.storage.states == "8bit":  # 2 B + 8/256 B of scales, the small tensor fp32
            assert r["state_bytes"] == 2 * (BIG + 4 * blocks) + 8 * SMALL
        if r["config"] == "adamw-master":  # m, v and the master, fp32
            assert r["state_bytes_per_param"] == 12
        assert r["backend"] in ("cpu", "reference")
        if r["backend"] == "reference" and (cfg.storage.master or cfg.storage.sr
                                            or cfg.storage.states == "8bit"):
            assert "reference backend" in r["note"]


def test_contenders_state_and_skips(lowp_run):
    by = {(r["config"], r["dtype"], r["contender"]): r for r in lowp_run["results"]}
    base = [r for r in lowp_run["results"] if r["contender"] == "fp32-baseline"]
    assert len(base) == 7
    for r in base:  # torch's fused fp32 AdamW, in every configuration, at its own bytes
        assert r["status"] == "ok" and r["family"] == "baseline"
        assert r["bytes_per_param"] == 28 and r["state_bytes_per_param"] == 8
        assert r["vs_fp32"] == 1.0 and r["speedup"] is None
    m = by[("adamw-master", "bf16", "torch-master")]
    assert m["status"] == "ok" and m["state_bytes_per_param"] == 12
    assert m["other_held_bytes_per_param"] == 4
    skipped = by[("adamw-bf16-states", "fp32", "torch-fused")]
    assert skipped["status"] == "skipped" and "bf16 states of fp32" in skipped["reason"]
    fused = by[("adamw-bf16-states", "bf16", "torch-fused")]
    assert fused["status"] == "ok" and fused["state_bytes_per_param"] == 4
    for dtype in ("fp32", "bf16"):
        b = by[("adamw-8bit", dtype, "bnb-8bit")]
        if _has("bitsandbytes"):
            assert b["status"] == "ok", b
            # 8-bit codes + one fp32 absmax per 256 + a shared 256-entry map per state for the
            # large tensor, fp32 states for the small one
            assert 2 * BIG + 8 * SMALL < b["state_bytes"] < 2 * BIG + 8 * SMALL + 4096
        else:
            assert b["status"] == "skipped" and "bitsandbytes" in b["reason"]


def test_derived_numbers(lowp_run):
    res = lowp_run
    ok = [r for r in res["results"] if r["status"] == "ok"]
    copy = res["copy"]["gbps"]
    for r in ok:
        gbps = r["bytes_per_param"] * r["params"] / r["b2b_s"]["median"] / 1e9
        assert r["gbps"] == pytest.approx(gbps, rel=1e-12)
        assert r["pct_copy"] == pytest.approx(100 * gbps / copy, rel=1e-12)
        dtype = {"fp32": F32, "bf16": BF16}[r["dtype"]]
        if r["family"] != "baseline":  # GB/s at the configuration's own bytes
            assert r["bytes_per_param"] == C.CONFIGS[r["config"]].bytes_per_param(
                dtype, [(64, 128), (SMALL,)])
        (base,) = [b for b in ok if b["family"] == "baseline" and
                   (b["config"], b["dtype"]) == (r["config"], r["dtype"])]
        assert r["vs_fp32"] == pytest.approx(base["b2b_s"]["median"] / r["b2b_s"]["median"],
                                             rel=1e-12)
        assert r["vs_fp32_source"] == "same rounds"
        peers = [p for p in ok if p["family"] in ("torch", "library") and
                 (p["config"], p["dtype"]) == (r["config"], r["dtype"])]
        if peers and r["family"] not in ("baseline", "ceiling"):
            best = min(peers, key=lambda p: p["b2b_s"]["median"])
            assert r["speedup"] == pytest.approx(best["b2b_s"]["median"]
                                                 / r["b2b_s"]["median"], rel=1e-12)
    assert res["meta"]["libraries"].keys() == {"torchao", "bitsandbytes"}
    assert res["configs"]["adamw-8bit"]["bytes_per_param"]["fp16"] is None
    assert res["configs"]["adamw-8bit"]["state_bytes_per_param"]["fp32"] == 2 + 8 / 256


def test_reports_and_table(lowp_run, tmp_path, capsys):
    paths = save_results(lowp_run, tmp_path, plot=False)
    md = paths["md"].read_text()
    assert "vs fp32 AdamW" in md and "state B/param" in md
    assert "## Below fp32: bytes per parameter, moved and held" in md
    assert md == render_markdown(lowp_run)
    assert main(["bench", "--table", str(paths["json"])]) == 0
    out = capsys.readouterr().out
    assert out == render_bytes_table(json.loads(paths["json"].read_text()))
    assert out.startswith("Bytes per parameter below fp32")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line
            for line in out.splitlines() if line.startswith("| AdamW")}
    assert "| 16.06 | 2.03 |" in rows[("AdamW, 8-bit states", "fp32", "8-bit + fp32 scale per 256")]
    assert "| 10.06 | 2.03 |" in rows[("AdamW, bf16 + SR + 8-bit states",
                                        "bf16, stochastic rounding",
                                        "8-bit + fp32 scale per 256")]
    assert "| 28 | 12 | 12 |" in rows[("AdamW, bf16 + fp32 master", "bf16 + fp32 master", "fp32")]
    assert "torch fused AdamW fp32 (baseline): 8" in out


# -- contenders that are not installed or cannot run -----------------------------------------------

def test_missing_libraries_are_skipped(monkeypatch):
    for name in ("torchao", "torchao.optim", "bitsandbytes"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    res = run_bench(_tiny(dtypes=["bf16"], configs=["adamw-sr", "adamw-8bit"],
                          contenders=["torchao-sr", "torchao-8bit", "bnb-8bit", "fastsched"]))
    by = {(r["config"], r["contender"]): r for r in res["results"]}
    assert len(by) == 5
    for key in (("adamw-sr", "torchao-sr"), ("adamw-8bit", "torchao-8bit"),
                ("adamw-8bit", "bnb-8bit")):
        r = by[key]
        lib = "bitsandbytes" if key[1].startswith("bnb") else "torchao"
        assert r["status"] == "skipped", r
        assert f"{lib} is not importable" in r["reason"] and f"pip install {lib}" in r["reason"]
    assert by[("adamw-8bit", "fastsched")]["status"] == "ok"
    assert by[("adamw-8bit", "fastsched")]["speedup"] is None  # no contender ran
    assert "not importable" in render_markdown(res)


def test_library_that_cannot_run_here_is_skipped(monkeypatch):
    class AdamW8bit(torch.optim.Optimizer):
        def __init__(self, params, lr, betas, eps, weight_decay):
            super().__init__(params, {"lr": lr})

        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.0-test"
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    res = run_bench(_tiny(dtypes=["fp32"], configs=["adamw-8bit"], contenders=["bnb-8bit"]))
    (r,) = res["results"]
    assert r["status"] == "skipped"
    assert "does not run on cpu tensors" in r["reason"] and "no kernel" in r["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not _has("torchao.optim"), reason="torchao is not installed")
def test_torchao_contenders():
    """torchao compiles one graph per shape: a single tensor, two contenders (~25 s cold)."""
    res = run_bench(_tiny(custom=parse_shapes("64x128"), dtypes=["bf16"],
                          configs=["adamw-sr", "adamw-sr-8bit"],
                          contenders=["torchao-sr", "torchao-8bit"]))
    by = {r["contender"]: r for r in res["results"]}
    assert set(by) == {"torchao-sr", "torchao-8bit"}
    for r in by.values():
        assert r["status"] == "ok", r
        assert r["family"] == "library" and r["speedup"] == 1.0
        assert "torch.compile" in r["note"]
    assert by["torchao-sr"]["state_bytes_per_param"] == 4  # bf16 m, v
    # codes, one fp32 scale per 256 and a 256-entry fp32 map per state: the subclass's inner
    # tensors, not its apparent bf16 dtype
    q = by["torchao-8bit"]["state_bytes"]
    assert 2 * BIG + 2 * 4 * (BIG // 256) <= q <= 2 * BIG + 2 * 4 * (BIG // 256) + 2 * 1024


# -- the command line -----------------------------------------------------------------------------

def test_cli_lowp_checks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--lowp", "--configs", "adamw", "--no-save"])
    assert e.value.code == 2
    assert "not below fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--configs", "adamw-sr", "--dtypes", "fp32", "--no-save"])
    assert e.value.code == 2
    assert "runs in bf16" in capsys.readouterr().err


def test_cli_table_needs_a_lowp_run(tmp_path, capsys):
    res = run_bench(_tiny(dtypes=["fp32"], configs=["adamw"], contenders=["torch-fused"]))
    paths = save_results(res, tmp_path, plot=False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--table", str(paths["json"])])
    assert e.value.code == 2 and "--lowp" in capsys.readouterr().err


def test_cli_lowp_run(tmp_path, capsys):
    rc = main(["bench", "--lowp", "--device", "cpu", "--shapes", SHAPES, "--quick",
               "--no-progress", "--threads", "1", "--configs", "adamw-8bit", "--dtypes", "fp32",
               "--contenders", "fp32-baseline,fastsched,stream", "--out", str(tmp_path),
               "--no-plot"])
    assert rc == 0
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    assert res["meta"]["configs"] == ["adamw-8bit"]
    base, fs, stream = res["results"]
    assert [r["contender"] for r in res["results"]] == ["fp32-baseline", "fastsched", "stream"]
    out = capsys.readouterr().out
    assert "vs fp32" in out and "Bytes per parameter below fp32" in out
    assert fs["vs_fp32"] > 0 and fs["bytes_per_param"] < 16.5
    # the stream ceiling moves AdamW's bytes of the dtype, whatever the configuration
    assert stream["bytes_per_param"] == 28 and stream["vs_fp32"] is None
    if stream["status"] == "ok":  # the compiled CPU extension is built
        assert fs["pct_stream"] == pytest.approx(100 * fs["gbps"] / stream["gbps"], rel=1e-12)


def test_profile_lowp(tmp_path, capsys):
    assert main(["profile", "--device", "cpu", "--shapes", SHAPES, "--config", "adamw-8bit",
                 "--steps", "2", "--warmup", "0", "--no-save"]) == 0
    assert "profile: fastsched / AdamW, 8-bit states" in capsys.readouterr().out
    assert main(["profile", "--device", "cpu", "--shapes", SHAPES, "--config", "adamw-sr",
                 "--steps", "2", "--no-save"]) == 1
    assert "runs in bf16" in capsys.readouterr().err


def test_target_line(lowp_run):
    from fastsched.bench.report import target_lines

    lines = target_lines(lowp_run)
    fs = [r for r in lowp_run["results"] if r["config"] in ("adamw-8bit", "adamw-sr-8bit")
          and r["family"] == "fastsched"]
    assert len(lines) == len(fs) == 3  # fp32 and bf16 8-bit, bf16 SR + 8-bit
    for line, r in zip(lines, fs):
        assert line.startswith("8-bit states with stochastic rounding no slower" if r["config"]
                               == "adamw-sr-8bit" else "8-bit states no slower")
        assert f"{r['vs_fp32']:.2f}x" in line
        assert line.endswith(": met" if r["vs_fp32"] >= 1 else ": not met")
        # timed in the same rounds as the baseline: its speed over theirs round by round too
        (base,) = [b for b in lowp_run["results"] if b["family"] == "baseline"
                   and (b["set"], b["dtype"], b["config"], b["threads"])
                   == (r["set"], r["dtype"], r["config"], r["threads"])]
        q = r["vs_fp32_rounds"]
        assert q["median"] == pytest.approx(statistics.median(
            [x / y for x, y in zip(base["rounds_s"], r["rounds_s"])]), rel=1e-12)
        assert f"; round by round p10-p90 {q['p10']:.2f}-{q['p90']:.2f}x" in line
    assert lines[0] in render_markdown(lowp_run)
