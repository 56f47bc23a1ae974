"""bench/grad_stats_read.py runs end to end, writes its medians and puts the extension module
back. Nothing here asserts a timing."""

from __future__ import annotations

import json

import pytest

from fastsched.optim import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"no compiled CPU backend: "
                                                              f"{_cpu.reason()}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_runs_and_writes_medians(tmp_path, capsys, dtype, bench_script):
    out = tmp_path / "gs.json"
    mod = bench_script("grad_stats_read")
    assert mod.main(["--scale", "0.002", "--rounds", "2", "--dtype", dtype,
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"fastsched grad_stats", "torch sum per tensor",
                                   "torch _foreach_norm"}
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in res["results"].values())
    assert res["bytes"] > 0 and res["dtype"] == dtype
    assert "GB/s" in capsys.readouterr().out
    assert not isinstance(_cpu.ext(), mod._Capture)  # the module, not the recording wrapper
