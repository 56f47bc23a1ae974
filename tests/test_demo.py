"""The demo runs end to end: plot of the main schedules and a short AdamW training run."""

import importlib.util

from fastsched import demo


def test_demo_main(tmp_path, capsys):
    out = demo.main(str(tmp_path / "demo"))
    printed = capsys.readouterr().out
    assert "step  250" in printed and "loss" in printed
    losses, lrs, sched = out["losses"], out["lrs"], out["schedule"]
    assert len(losses) == len(lrs) == 300
    assert losses[-1] < 0.2 * losses[0]  # the model learns
    assert lrs == [3e-3 * sched(t) for t in range(300)]  # driven by the schedule
    if importlib.util.find_spec("matplotlib") is None:
        assert out["plot"] is None  # the plot extra is optional
    else:
        data = (tmp_path / "demo" / "schedules.png").read_bytes()
        assert out["plot"].endswith("schedules.png") and data[:4] == b"\x89PNG"


def test_demo_schedules_are_the_main_ones():
    names = " ".join(demo.main_schedules())
    for word in ("cosine", "WSD", "REX", "inverse sqrt", "one-cycle", "infinite", "re-warming"):
        assert word in names
