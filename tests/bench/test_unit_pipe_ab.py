"""bench/unit_pipe_ab.py runs end to end, writes its medians and leaves the extension's setting
as it found it. Nothing here asserts a timing."""

from __future__ import annotations

import json

import pytest

from fastsched.optim import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"no compiled CPU backend: "
                                                              f"{_cpu.reason()}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_runs_and_restores_the_setting(tmp_path, capsys, dtype, bench_script):
    ext = _cpu.ext()
    out = tmp_path / "ab.json"
    ext.unit_pipe(False)
    try:
        assert bench_script("unit_pipe_ab").main(["--scale", "0.002", "--rounds", "2",
                                                  "--dtype", dtype, "--json", str(out)]) == 0
        assert ext.unit_pipe(True) is False  # the setting it found
    finally:
        ext.unit_pipe(True)
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {"summed beside the update", "summed alone first",
                                    "stream ceiling"}
    assert all(t > 0 for t in res["median_s"].values())
    assert res["bytes_per_param"] == (28 if dtype == "fp32" else 14)
    assert res["ratio"] == pytest.approx(res["median_s"]["summed beside the update"]
                                         / res["median_s"]["summed alone first"])
    assert "% of stream" in capsys.readouterr().out
