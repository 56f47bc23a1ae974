"""Schedules refined from the gradient norms of a previous run (Defazio, Cutkosky, Mehta and
Mishchenko, "When, Why and How Much? Adaptive Learning Rate Scheduling by Refinement",
arXiv 2310.07831).

The worst-case last-iterate bound of SGD-type methods is minimised, for a known sequence of
gradient norms :math:`G_t`, by the closed form

.. math::
    \\eta_t \\propto w_t \\sum_{p=t+1}^{T} w_p, \\qquad
    w_t = G_t^{-2}\\ (\\text{SGD}, \\ell_2\\text{ norms}) \\quad\\text{or}\\quad
    w_t = G_t^{-1}\\ (\\text{Adam}, \\ell_1\\text{ norms}),

which for constant norms is linear decay :math:`1 - t/T` (the paper's worst-case result).
Following the paper's code (``facebookresearch/adaptive_scheduling``, ``find_schedule.py`` and
``visual.py``) the norms are smoothed by a wide median filter before the mapping, and the result
is normalised to a peak of 1. :func:`refine` returns it as a fastsched
:class:`~fastsched.schedules.Table` that the fused optimizers evaluate on the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..schedules import Table

__all__ = ["refine", "refine_curve", "median_filter", "closed_form_schedule", "simplify",
           "plot_refined", "NORMS"]

NORMS = ("l2", "l1")


def median_filter(x, size: int) -> np.ndarray:
    """Running median of odd width ``size`` with the ``'nearest'`` boundary (edge values
    repeated), as ``scipy.ndimage.median_filter(x, size, mode='nearest')`` computes it for 1-D
    input: the filter the code of Defazio et al. (arXiv 2310.07831, ``visual.py``) smooths
    gradient norms with, here without SciPy.

    Computed in chunks of windows (numpy partition), about 0.4 s for 12,000 points of width
    1,001 on one core.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 1, got {size!r}")
    if x.size == 0 or size == 1:
        return x.copy()
    h = size // 2
    padded = np.pad(x, (h, h), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, size)
    out = np.empty_like(x)
    # chunks of ~4M elements: bounded memory, and np.median partitions each chunk in one call
    chunk = max(1, (1 << 22) // size)
    for lo in range(0, x.size, chunk):
        out[lo:lo + chunk] = np.median(windows[lo:lo + chunk], axis=1)
    return out


def closed_form_schedule(grad_norms, norm: str = "l2") -> np.ndarray:
    """The refined step sizes of Defazio et al. (arXiv 2310.07831, Theorem 8 and
    ``find_schedule.py::find_closed_form_schedule``), normalised to a peak of 1:

    .. math::
        w_t = G_t^{-2}\\ (\\ell_2) \\text{ or } G_t^{-1}\\ (\\ell_1), \\qquad
        \\eta_t = w_t \\sum_{p=t+1}^{T} w_p \\,/\\, w_T, \\qquad \\eta_T = 0, \\qquad
        \\eta \\leftarrow \\eta / \\max \\eta.

    (The division by :math:`w_T`, the reference code's ``tail_sums[-1]``, cancels in the
    normalisation.) ``grad_norms`` must be finite and > 0.
    """
    g = np.asarray(grad_norms, dtype=np.float64).reshape(-1)
    norm = _check_norm(norm)
    if g.size < 2:
        raise ValueError(f"grad_norms needs at least 2 values, got {g.size}")
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("grad_norms must be finite and > 0")
    w = g ** (-2.0 if norm == "l2" else -1.0)
    tail = np.cumsum(w[::-1])[::-1]  # tail[t] = sum_{p >= t} w_p
    eta = np.zeros_like(w)
    eta[:-1] = w[:-1] * tail[1:] / tail[-1]
    peak = float(np.max(eta))
    return eta / peak


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)} ('l2': SGD-type, w = G^-2; 'l1': "
                         f"Adam-type, w = G^-1 of L1 norms), got {norm!r}")
    return norm


def _norms_input(grad_norms, norm: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(norms, steps or None) from a sequence, a tensor, a history dict or an optimizer."""
    steps = None
    if hasattr(grad_norms, "grad_norm_history") and callable(grad_norms.grad_norm_history):
        grad_norms = grad_norms.grad_norm_history()
    if isinstance(grad_norms, Mapping):
        d = grad_norms
        key = "grad_norm_l1" if norm == "l1" else "grad_norm"
        if key not in d:
            if norm == "l1":
                raise ValueError("norm='l1' needs L1 gradient norms, but the history holds "
                                 "global L2 norms only ('grad_norm'): pass the L1 norms as a "
                                 "sequence (e.g. opt.stats['grad_norm_l1'] logged every step) "
                                 "or use norm='l2'")
            raise ValueError(f"grad_norms as a dict needs a {key!r} entry (the format of "
                             f"optimizer.grad_norm_history()), got keys {sorted(d)}")
        vals = np.asarray(d[key], dtype=np.float64).reshape(-1)
        if "step" in d:
            steps = np.asarray(d["step"], dtype=np.float64).reshape(-1)
            if steps.size != vals.size:
                raise ValueError(f"grad_norms: 'step' and {key!r} have different lengths "
                                 f"({steps.size} and {vals.size})")
        if "skipped" in d:
            skipped = np.asarray(d["skipped"], dtype=bool).reshape(-1)
            if skipped.size != vals.size:
                raise ValueError(f"grad_norms: 'skipped' and {key!r} have different lengths "
                                 f"({skipped.size} and {vals.size})")
            vals = np.where(skipped, np.inf, vals)  # a skipped step's norm is dropped below
        return vals, steps
    if isinstance(grad_norms, torch.Tensor):
        grad_norms = grad_norms.detach().to("cpu", torch.float64).numpy()
    try:
        vals = np.asarray(grad_norms, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grad_norms must be a sequence of numbers, a tensor, a history dict or "
                         f"an optimizer with history=N, got {type(grad_norms).__name__} ({e})"
                         ) from None
    return vals, steps


def refine_curve(grad_norms, *, norm: str = "l2", median_window: float = 0.1,
                 n: int = 10_000, trim: int = 2) -> dict[str, np.ndarray | int]:
    """The refined schedule on ``n`` points of progress, with the intermediate curves.

    The smoothing of the paper's code (``visual.py``, Defazio et al., arXiv 2310.07831):

    1. drop non-finite values (the code drops ``inf``; NaN and skipped steps go too) and values
       ``<= 0``, then the first and last ``trim`` = 2 values (logging artefacts);
    2. a log shorter than ``n`` = 10,000 points is linearly resampled up to ``n`` points;
    3. median filter of width ``2*(int(median_window*n)//2)+1`` (1,001: 10% of the run for a log
       of at most ``n`` points), on the log padded at its end by twice the width with
       ``np.pad(mode='reflect')``, filtered with the ``'nearest'`` boundary, then cropped;
    4. the filtered log is resampled to ``n`` points and mapped by
       :func:`closed_form_schedule` (``w = G^-2`` for ``'l2'``, ``G^-1`` for ``'l1'``).

    Values dropped in the middle of the log are bridged by linear interpolation at their steps
    (the paper's code closes the gap instead; the two agree when nothing in the middle is
    dropped). With steps (a history dict), the log is resampled by step, so a log taken every
    k steps is handled.

    Returns ``{"progress", "raw", "smoothed", "schedule"}`` (arrays of ``n`` points over
    progress 0..1; ``raw`` is the cleaned log resampled to ``n`` points), plus ``"first_step"``,
    ``"last_step"`` and ``"stride"`` of the whole log, dropped entries included (the stride is
    the median step between entries; 1 for a plain sequence). As in the paper's code, the
    trimmed log is stretched over the whole run (progress 0 to 1).
    """
    norm = _check_norm(norm)
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise ValueError(f"n must be an integer >= 16, got {n!r}")
    if not (isinstance(median_window, int | float) and 0 <= median_window < 1):
        raise ValueError(f"median_window must be a fraction in [0, 1), got {median_window!r}")
    if isinstance(trim, bool) or not isinstance(trim, int) or trim < 0:
        raise ValueError(f"trim must be an integer >= 0, got {trim!r}")
    vals, steps = _norms_input(grad_norms, norm)
    if vals.size == 0:
        raise ValueError("grad_norms is empty")
    if steps is None:
        steps = np.arange(vals.size, dtype=np.float64)
    order = np.argsort(steps, kind="stable")
    steps, vals = steps[order], vals[order]
    logged = steps[np.isfinite(steps)]  # the run's extent, dropped entries included
    if logged.size == 0:
        raise ValueError("grad_norms: no finite step")
    first, last = int(round(logged[0])), int(round(logged[-1]))
    stride = int(max(1, round(float(np.median(np.diff(logged)))))) if logged.size > 1 else 1
    keep = np.isfinite(vals) & (vals > 0) & np.isfinite(steps)
    steps, vals = steps[keep], vals[keep]
    if trim:
        steps, vals = steps[trim:-trim], vals[trim:-trim]
    if vals.size < 2:
        raise ValueError(f"grad_norms has {vals.size} usable values after dropping non-finite "
                         f"and non-positive ones and {trim} at each end; need at least 2")
    if steps[-1] <= steps[0]:
        raise ValueError("grad_norms: the kept steps must span more than one step")
    pos = (steps - steps[0]) / (steps[-1] - steps[0])
    glen = vals.size
    if glen < n:  # step 2: resample up to n points (by step position)
        g = np.interp(np.linspace(0.0, 1.0, n), pos, vals)
        pos_g = np.linspace(0.0, 1.0, n)
    elif np.allclose(np.diff(pos), 1.0 / (glen - 1), rtol=1e-6, atol=0.0):
        g, pos_g = vals, pos
    else:  # a long log with gaps: uniform in steps first (the filter assumes uniform spacing)
        pos_g = np.linspace(0.0, 1.0, glen)
        g = np.interp(pos_g, pos, vals)
    width = 2 * (int(median_window * n) // 2) + 1
    pad = 2 * width
    filtered = median_filter(np.pad(g, (0, pad), mode="reflect"), width)[:-pad]
    progress = np.linspace(0.0, 1.0, n)
    smoothed = np.interp(progress, pos_g, filtered)
    raw = np.interp(progress, pos_g, g)
    return {"progress": progress, "raw": raw, "smoothed": smoothed,
            "schedule": closed_form_schedule(smoothed, norm),
            "first_step": first, "last_step": last, "stride": stride}


def refine(grad_norms, *, norm: str = "l2", total_steps: int | None = None,
           median_window: float = 0.1, n: int = 10_000, trim: int = 2,
           tol: float = 1e-3) -> Table:
    """A learning-rate schedule refined from the gradient norms of a previous run
    (Defazio et al., "When, Why and How Much?", arXiv 2310.07831):

    .. math::
        \\eta_t \\propto w_t \\sum_{p>t} w_p, \\qquad w_t = G_t^{-2} \\text{ (l2, SGD-type)}
        \\text{ or } \\|g_t\\|_1^{-1} \\text{ (l1, Adam-type)},

    after the median smoothing of the paper's code (see :func:`refine_curve`), normalised to a
    peak of 1, as a :class:`~fastsched.schedules.Table` multiplier of the optimizer's lr. With
    constant norms this is linear decay from 1 at step 0 to 0 at the last step.

    Args:
        grad_norms: per-step gradient norms of a previous run: a list, array or tensor; the
            dict of ``optimizer.grad_norm_history()``; or a fastsched optimizer built with
            ``history=N`` (its ring buffer is read; skipped steps are dropped). The history holds
            global L2 and L1 norms (``"grad_norm"``, ``"grad_norm_l1"``).
        norm: ``'l2'`` (``w = G^-2``) or ``'l1'`` (``w = G^-1``).
        total_steps: length of the new run; the schedule spans steps ``0 .. total_steps - 1``
            (the last step has lr 0, as :math:`\\eta_T = 0` in the paper) and holds 0 after.
            Default: the run the norms came from: ``len(grad_norms)``, or for a dict with
            steps, ``last - first + stride``.
        median_window, n, trim: smoothing (see :func:`refine_curve`); defaults are the paper's.
        tol: the device table keeps few knots (Douglas-Peucker simplification, see
            :func:`simplify`) whose linear interpolation stays within ``tol`` (of the peak 1) of
            the refined curve at every one of its points (the ``n``-point curve, or every step
            when the run is shorter). The Triton row search scans the whole table, so fewer
            rows is a shorter lookup: 1e-3 keeps a few hundred knots for a noisy log, and 2
            for constant norms. ``0`` keeps every point.

    Example::

        opt = fastsched.AdamW(model.parameters(), lr=3e-4, history=10_000)
        ...  # a first run of 10,000 steps
        sched = fastsched.tools.refine(opt)      # or refine(opt.grad_norm_history())
        opt2 = fastsched.AdamW(model2.parameters(), lr=3e-4, schedule=sched)
    """
    curve = refine_curve(grad_norms, norm=norm, median_window=median_window, n=n, trim=trim)
    if total_steps is None:
        vals, steps = _norms_input(grad_norms, norm)
        if steps is None:
            total_steps = int(vals.size)
        else:
            total_steps = curve["last_step"] - curve["first_step"] + curve["stride"]
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
        raise ValueError(f"total_steps must be an integer >= 2, got {total_steps!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    last = total_steps - 1
    if total_steps <= curve["progress"].size:
        at = np.arange(total_steps, dtype=np.float64)  # every step of the run
        values = np.interp(at / last, curve["progress"], curve["schedule"])
    else:
        at = curve["progress"] * last
        values = curve["schedule"]
    keep = simplify(at, values, tol)
    return Table(tuple(at[keep].tolist()), tuple(np.maximum(values[keep], 0.0).tolist()))


def simplify(x, y, tol: float) -> np.ndarray:
    """Indices of the points to keep so that the polyline through them stays within ``tol``
    (vertically) of every point of ``(x, y)``; ``x`` increasing. Douglas and Peucker's
    algorithm (Cartographica 10(2), 1973) with the vertical distance: split each chord at its
    worst point until none exceeds ``tol``; the two ends are always kept."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n <= 2:
        return np.arange(n)
    keep = np.zeros(n, dtype=bool)
    keep[[0, n - 1]] = True
    stack = [(0, n - 1)]
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        xs, ys = x[lo + 1:hi], y[lo + 1:hi]
        chord = y[lo] + (y[hi] - y[lo]) * (xs - x[lo]) / (x[hi] - x[lo])
        dev = np.abs(ys - chord)
        j = int(np.argmax(dev))
        if dev[j] > tol:
            mid = lo + 1 + j
            keep[mid] = True
            stack.append((lo, mid))
            stack.append((mid, hi))
    return np.nonzero(keep)[0]


def plot_refined(grad_norms, path: str, *, norm: str = "l2", total_steps: int | None = None,
                 title: str | None = None, **kwargs) -> str:
    """Plot a gradient-norm log, its median-smoothed version and the refined schedule
    (Defazio et al., arXiv 2310.07831) against linear decay; writes a PNG and returns ``path``.
    ``kwargs`` go to :func:`refine`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refine_kw = {k: kwargs[k] for k in ("median_window", "n", "trim") if k in kwargs}
    curve = refine_curve(grad_norms, norm=norm, **refine_kw)
    sched = refine(grad_norms, norm=norm, total_steps=total_steps, **kwargs)
    T = int(sched.steps[-1]) + 1
    t = torch.arange(T)
    vals, steps = _norms_input(grad_norms, norm)
    if steps is None:
        steps = np.arange(vals.size)
    x_log = (steps - curve["first_step"]) / max(curve["last_step"] - curve["first_step"], 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    ok = np.isfinite(vals) & (vals > 0)
    a1.plot(100 * x_log[ok], vals[ok], lw=0.6, alpha=0.45, color="tab:gray",
            label=f"{'L1' if norm == 'l1' else 'L2'} gradient norm")
    a1.plot(100 * curve["progress"], curve["smoothed"], lw=1.8, color="tab:orange",
            label="median-filtered (10% window)")
    a1.set_xlabel("progress (%)")
    a1.set_ylabel("gradient norm")
    a1.set_yscale("log")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.plot(t.numpy(), sched.evaluate(t).numpy(), lw=1.8, color="tab:orange",
            label=f"refined ({'w = G^-1' if norm == 'l1' else 'w = G^-2'})")
    a2.plot(t.numpy(), 1.0 - t.numpy() / max(T - 1, 1), lw=1.0, ls="--", color="tab:blue",
            label="linear decay (constant norms)")
    a2.set_xlabel("step")
    a2.set_ylabel("multiplier of lr")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(title or "Schedule refined from gradient norms (Defazio et al. 2023)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
