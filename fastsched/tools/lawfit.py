"""Loss prediction with the scaling law with learning-rate annealing (Tissue et al., 2024).

The law (Tissue, Wang, Wang et al., "Scaling Law with Learning Rate Annealing",
arXiv 2408.11029) describes a whole loss curve from the learning rates that produced it:

.. math::
    L(s) = L_0 + A\\,S_1(s)^{-\\alpha} - C\\,S_2(s), \\qquad
    S_1(s) = \\sum_{i \\le s} \\eta_i, \\qquad
    m_i = \\lambda m_{i-1} + (\\eta_{i-1} - \\eta_i), \\qquad S_2(s) = \\sum_{i \\le s} m_i

with :math:`S_1` the forward area (area under the LR curve), :math:`S_2` the annealing area and
:math:`\\lambda = 0.999` the annealing momentum. Fitting :math:`(L_0, A, \\alpha, C)` to one or
two curves (e.g. constant + cosine) predicts the loss at every step of any other schedule with
the same peak LR, model and data.

Functions:

* :func:`areas` computes :math:`S_1, S_2` for an LR sequence;
* :func:`fit` fits the law to ``(lr or schedule, loss)`` curves with a Huber loss on the log loss
  (delta 1e-3, as the paper and the reproduction ``zkshan2002/ScalingLaw`` do);
* :meth:`LawFit.predict` / :func:`predict` return the loss curve of any schedule,
  :func:`rank` orders candidate schedules by predicted final loss, :func:`plot` draws fitted and
  predicted curves.

Conventions: ``lr[t]`` is the learning rate the optimizer applied at (0-based) step ``t`` and
``loss[t]`` the loss measured after that update, so :math:`S_1(t) = \\sum_{i=0}^{t} lr_i`; a
loss logged before the update of its step differs by one step, which matters only in the first
few steps (and the fit skips a short initial stretch anyway, see ``fit(skip=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..schedules import Schedule

__all__ = ["Curve", "LawFit", "areas", "law", "huber", "fit", "predict", "rank", "plot",
           "schedule_lrs", "LAMBDA", "HUBER_DELTA"]

#: annealing momentum of the paper (``MTL_LAMBDA`` in the reproduction)
LAMBDA = 0.999
#: Huber threshold on the log-loss residual (paper and reproduction)
HUBER_DELTA = 1e-3


# -- the law ------------------------------------------------------------------------------------

def schedule_lrs(schedule: Schedule, peak_lr: float, total_steps: int) -> np.ndarray:
    """``peak_lr * schedule(t)`` for ``t = 0 .. total_steps - 1`` (float64 numpy)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a fastsched Schedule, got {schedule!r}")
    if not (isinstance(peak_lr, int | float) and math.isfinite(peak_lr) and peak_lr > 0):
        raise ValueError(f"peak_lr must be a finite number > 0, got {peak_lr!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    t = torch.arange(total_steps, dtype=torch.int64)
    return float(peak_lr) * schedule.evaluate(t).numpy()


def areas(lrs, lam: float = LAMBDA, exclude_warmup: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Forward area :math:`S_1` and annealing area :math:`S_2` at every step (Tissue et al.,
    arXiv 2408.11029, eq. 1):

    .. math::
        S_1(s) = \\sum_{i=0}^{s} \\eta_i, \\qquad
        m_i = \\lambda m_{i-1} + (\\eta_{i-1} - \\eta_i),\\ m_0 = 0, \\qquad
        S_2(s) = \\sum_{i=0}^{s} m_i.

    ``m_0 = 0`` (no change before the first step; the reproduction ``zkshan2002/ScalingLaw``
    starts from ``m_0 = lr_0``, which adds a constant to every later momentum).
    With ``exclude_warmup`` (default) the LR increases of the initial warmup (the non-decreasing
    prefix of the schedule, up to its first decrease) do not enter the momentum: a warmup from
    0 to :math:`\\eta_{max}` would otherwise put :math:`-\\eta_{max}/(1-\\lambda)` into
    :math:`S_2` and predict a loss increase worth a thousand steps at the peak LR. Later
    increases (re-warming) are kept, with the negative annealing area the paper gives them.

    Returns two float64 arrays of ``len(lrs)``.
    """
    eta = np.asarray(lrs, dtype=np.float64).reshape(-1)
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {lam!r}")
    s1 = np.cumsum(eta)
    if eta.size == 0:
        return s1, s1.copy()
    delta = np.zeros_like(eta)
    delta[1:] = eta[:-1] - eta[1:]
    if exclude_warmup:
        down = np.nonzero(delta > 0)[0]
        first_decrease = int(down[0]) if down.size else eta.size
        delta[:first_decrease] = 0.0
    # m_i = lam m_{i-1} + delta_i, vectorised per block: inside a block of k steps,
    # m_{lo+j} = lam^(j+1) m_{lo-1} + lam^(j+1) sum_{i<=j} delta_{lo+i} lam^-(i+1). Blocks keep
    # lam^-k above 1e-100 (k = 512 at lam = 0.999, lam^-512 = 1.7) so the scaled sums never
    # overflow; lam = 0 has no memory at all.
    if lam == 0.0:
        m = delta
    else:
        block = int(max(1, min(512, math.floor(-100.0 / math.log10(lam)))))
        powers = lam ** np.arange(1, block + 1, dtype=np.float64)
        m = np.empty_like(eta)
        carry = 0.0
        for lo in range(0, eta.size, block):
            d = delta[lo:lo + block]
            pw = powers[:d.size]
            m[lo:lo + d.size] = pw * (carry + np.cumsum(d / pw))
            carry = m[lo + d.size - 1]
    s2 = np.cumsum(m)
    return s1, s2


def law(s1, s2, L0: float, A: float, alpha: float, C: float) -> np.ndarray:
    """:math:`L = L_0 + A\\,S_1^{-\\alpha} - C\\,S_2` (Tissue et al., arXiv 2408.11029);
    ``inf`` where :math:`S_1 = 0` (nothing learned yet)."""
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return L0 + A * np.power(s1, -alpha) - C * s2


def huber(r, delta: float = HUBER_DELTA):
    """Huber loss (Huber, Ann. Math. Statist. 35(1), 1964) :math:`\\tfrac12 r^2` for
    :math:`|r| \\le \\delta`, else :math:`\\delta(|r| - \\tfrac12\\delta)` (numpy or torch,
    elementwise): the objective of the fit on log-loss residuals in Tissue et al.
    (arXiv 2408.11029), delta 1e-3."""
    if isinstance(r, torch.Tensor):
        a = r.abs()
        return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


# -- curves -------------------------------------------------------------------------------------

@dataclass
class Curve:
    """One training run: the LR at every step and the loss at some of them.

    ``lr`` holds one value per step ``0 .. len(lr) - 1``; ``loss[k]`` was measured after the
    update of step ``steps[k]`` (default: every step, ``steps = 0 .. len(loss) - 1``).
    """

    lr: np.ndarray
    loss: np.ndarray
    steps: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        where = f"{self.name}: " if self.name else ""
        try:
            lr = _finite_array("lr", self.lr)
            loss = _finite_array("loss", self.loss)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        if np.any(lr < 0):
            raise ValueError(f"{where}lr must be >= 0")
        if np.any(loss <= 0):
            raise ValueError(f"{where}loss must be > 0 (the law is fitted to log loss)")
        if self.steps is None:
            if loss.size != lr.size:
                raise ValueError(f"{where}lr and loss have different lengths ({lr.size} and "
                                 f"{loss.size}); pass steps= for a loss logged at some steps "
                                 "only")
            steps = np.arange(lr.size)
        else:
            steps = np.asarray(self.steps).reshape(-1)
            if steps.size != loss.size:
                raise ValueError(f"{where}steps and loss have different lengths ({steps.size} "
                                 f"and {loss.size})")
            if not np.all(np.isfinite(steps)) or np.any(steps != np.round(steps)):
                raise ValueError(f"{where}steps must be integers")
            steps = steps.astype(np.int64)
            if steps.min() < 0 or steps.max() >= lr.size:
                raise ValueError(f"{where}steps must lie in [0, {lr.size - 1}] (one lr per "
                                 f"step), got [{steps.min()}, {steps.max()}]")
            if np.any(np.diff(steps) <= 0):
                raise ValueError(f"{where}steps must be strictly increasing")
        self.lr, self.loss, self.steps = lr, loss, steps

    @classmethod
    def from_schedule(cls, schedule: Schedule, loss, peak_lr: float, steps=None,
                      total_steps: int | None = None, name: str = "") -> Curve:
        """A curve whose LR is ``peak_lr * schedule(t)``; ``total_steps`` defaults to
        ``len(loss)`` (loss at every step) or ``max(steps) + 1``."""
        if total_steps is None:
            total_steps = (len(np.asarray(loss).reshape(-1)) if steps is None
                           else int(np.max(np.asarray(steps))) + 1)
        return cls(schedule_lrs(schedule, peak_lr, total_steps), loss, steps, name)


def _finite_array(name: str, x) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                   dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values (first at index "
                         f"{int(np.nonzero(~np.isfinite(a))[0][0])})")
    return a


def _as_curve(item, peak_lr: float | None, i: int) -> Curve:
    if isinstance(item, Curve):
        return item
    if isinstance(item, Mapping):
        return _as_curve((item["lr"], item["loss"], item.get("steps")), peak_lr, i)
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise ValueError(f"curves[{i}] must be a Curve or a (lr or schedule, loss[, steps]) "
                         f"pair, got {type(item).__name__}")
    lr, loss = item[0], item[1]
    steps = item[2] if len(item) == 3 else None
    if isinstance(lr, Schedule):
        if peak_lr is None:
            raise ValueError(f"curves[{i}] gives a schedule: pass peak_lr= to turn it into "
                             "learning rates")
        return Curve.from_schedule(lr, loss, peak_lr, steps, name=f"curves[{i}]")
    return Curve(lr, loss, steps, name=f"curves[{i}]")


# -- fitting ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LawFit:
    """Fitted parameters of :math:`L = L_0 + A S_1^{-\\alpha} - C S_2` (Tissue et al.,
    arXiv 2408.11029) and the settings they were fitted with.

    ``objective`` is the mean Huber loss of the log residuals at the solution, ``rmse_log`` the
    root-mean-square log residual (about the relative error of the fitted points), ``n_points``
    the number of loss values fitted, ``starts`` the L-BFGS runs that finished and ``history``
    one ``(grid objective, final objective, [L0, A, alpha, C])`` per run.
    """

    L0: float
    A: float
    alpha: float
    C: float
    lam: float = LAMBDA
    exclude_warmup: bool = True
    objective: float = math.nan
    rmse_log: float = math.nan
    n_points: int = 0
    starts: int = 0
    history: tuple = field(default=(), repr=False, compare=False)

    @property
    def params(self) -> dict[str, float]:
        return {"L0": self.L0, "A": self.A, "alpha": self.alpha, "C": self.C}

    def predict_lrs(self, lrs) -> np.ndarray:
        """Predicted loss after every step of the LR sequence ``lrs``."""
        s1, s2 = areas(_finite_array("lrs", lrs), self.lam, self.exclude_warmup)
        return law(s1, s2, self.L0, self.A, self.alpha, self.C)

    def predict(self, schedule: Schedule, peak_lr: float, total_steps: int) -> np.ndarray:
        """Predicted loss after each of the ``total_steps`` steps of ``peak_lr * schedule``."""
        return self.predict_lrs(schedule_lrs(schedule, peak_lr, total_steps))

    def to_dict(self) -> dict:
        return {"L0": self.L0, "A": self.A, "alpha": self.alpha, "C": self.C, "lam": self.lam,
                "exclude_warmup": self.exclude_warmup, "objective": self.objective,
                "rmse_log": self.rmse_log, "n_points": self.n_points}

    @classmethod
    def from_dict(cls, d: Mapping) -> LawFit:
        keys = ("L0", "A", "alpha", "C")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"a fitted law needs {', '.join(keys)}; missing {missing}")
        vals = {k: float(d[k]) for k in keys}
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"fitted law parameters must be finite, got {bad[0]}={d[bad[0]]!r}")
        return cls(**vals, lam=float(d.get("lam", LAMBDA)),
                   exclude_warmup=bool(d.get("exclude_warmup", True)),
                   objective=float(d.get("objective", math.nan)),
                   rmse_log=float(d.get("rmse_log", math.nan)),
                   n_points=int(d.get("n_points", 0)))


def _nnls3(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for 3 columns, exactly, by trying every active set."""
    best, best_r = np.zeros(X.shape[1]), float(np.sum(y * y))
    n = X.shape[1]
    for mask in range(1, 1 << n):
        cols = [j for j in range(n) if mask >> j & 1]
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if np.all(coef >= 0):
            full = np.zeros(n)
            full[cols] = coef
            r = float(np.sum((X @ full - y) ** 2))
            if r < best_r:
                best, best_r = full, r
    return best


#: exponents tried by the initial grid (the reproduction's grid is alpha in {0.2 .. 1.2})
ALPHA_GRID = tuple(np.round(np.concatenate([np.linspace(0.05, 1.2, 24), [1.5, 2.0, 3.0]]), 4))


def fit(curves: Sequence, *, peak_lr: float | None = None, lam: float = LAMBDA,
        delta: float = HUBER_DELTA, skip: float = 0.05, exclude_warmup: bool = True,
        starts: int = 4, max_iter: int = 500) -> LawFit:
    """Fit :math:`L(s) = L_0 + A S_1^{-\\alpha} - C S_2` (Tissue et al., arXiv 2408.11029) to
    one or more loss curves.

    Objective: the mean Huber loss (``delta`` = 1e-3) of :math:`\\log \\hat L - \\log L` over
    every fitted point of every curve, as in the paper and its reproduction
    (``zkshan2002/ScalingLaw``, ``main.py``).

    Optimiser (a deliberate choice, no SciPy): torch L-BFGS with a strong-Wolfe line search in
    float64 on :math:`(\\log L_0, \\log A, \\log\\alpha, \\log C)`. The log parametrisation keeps
    the four parameters positive, the constraint the reproduction's L-BFGS-B bounds express, and
    makes the problem independent of the loss and LR scales (the reproduction's bounds and grid,
    ``L0 in {1,2,4}``, ``A in {1,2,4}``, assume language-model losses and S1 summed every 100
    steps).

    Initial grid: for each :math:`\\alpha` in :data:`ALPHA_GRID` the law is linear in
    :math:`(L_0, A, C)`, solved exactly by non-negative least squares (relative residuals);
    L-BFGS then starts from the ``starts`` best grid points and the lowest objective wins.

    Args:
        curves: :class:`Curve` objects or ``(lr array or Schedule, loss[, steps])`` tuples.
        peak_lr: multiplies schedules given in ``curves``.
        lam: annealing momentum :math:`\\lambda` (0.999 in the paper, for runs of 10^4-10^5
            steps). Shorter runs want a shorter memory: ``1 - 20 / steps`` keeps the paper's
            ratio (0.999 = 1 - 20/20,000). On the 600-step toy runs of
            :func:`fastsched.tools.toy.lawfit_experiment` (three seeds) the WSD final loss was
            predicted within 0.0-0.5% at ``1 - 10/steps``, 0.4-1.0% at ``1 - 20/steps`` and
            1.1-1.4% at ``1 - 40/steps``.
        skip: fraction of each curve's steps left out at the start (the first steps of training
            follow the initialisation, not the law).
        exclude_warmup: see :func:`areas`.
        starts, max_iter: L-BFGS restarts and iterations per restart.

    Raises ``ValueError`` for empty, non-finite or mismatched curves, fewer than 8 usable
    points, and when no curve anneals (C is then not identifiable).
    """
    if isinstance(curves, Curve) or (isinstance(curves, tuple) and len(curves) in (2, 3)
                                     and not isinstance(curves[0], tuple | list | Curve)):
        curves = [curves]
    curves = [_as_curve(c, peak_lr, i) for i, c in enumerate(curves)]
    if not curves:
        raise ValueError("curves is empty: fit needs at least one (lr, loss) curve")
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip!r}")
    if not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    s1s, s2s, ys = [], [], []
    for c in curves:
        s1, s2 = areas(c.lr, lam, exclude_warmup)
        keep = (c.steps >= skip * c.lr.size) & (s1[c.steps] > 0)
        s1s.append(s1[c.steps][keep])
        s2s.append(s2[c.steps][keep])
        ys.append(c.loss[keep])
    S1, S2, Y = (np.concatenate(a) for a in (s1s, s2s, ys))
    if Y.size < 8:
        raise ValueError(f"too few points to fit the 4 parameters: {Y.size} usable loss values "
                         "(past the skipped start, where S1 > 0); need at least 8")
    if not np.any(S2 > 1e-12 * max(float(np.max(S1)), 1e-300)):
        raise ValueError("no curve anneals (its LR never decreases), so C is not identifiable: "
                         "add a curve with a decay (e.g. cosine or WSD)")
    logy = np.log(Y)

    # -- initial grid: exact non-negative least squares in (L0, A, C) per alpha -----------------
    w = 1.0 / Y  # relative residuals ~ log residuals
    grid = []
    for a in ALPHA_GRID:
        X = np.stack([np.ones_like(S1), S1 ** -a, -S2], axis=1)
        coef = _nnls3(X * w[:, None], Y * w)
        pred = X @ coef
        obj = float(np.mean(huber(np.log(np.maximum(pred, 1e-300)) - logy, delta)))
        grid.append((obj, float(a), coef))
    grid.sort(key=lambda g: g[0])

    # floors so that a zero from the grid can still move under the log parametrisation
    y_scale = float(np.median(Y))
    floors = np.array([1e-6 * y_scale, 1e-9 * y_scale, 1e-3,
                       1e-6 * y_scale / max(float(np.max(np.abs(S2))), 1e-300)])
    S1_t, S2_t, logy_t = (torch.as_tensor(a, dtype=torch.float64) for a in (S1, S2, logy))
    logS1 = torch.log(S1_t)

    def objective(u):
        L0, A, alpha, C = torch.exp(u).unbind()
        pred = L0 + A * torch.exp(-alpha * logS1) - C * S2_t
        r = torch.log(pred.clamp_min(1e-300)) - logy_t
        # scaled by 1/delta^2 so that the quadratic part is 0.5 (r/delta)^2 ~ 1: L-BFGS's
        # absolute tolerances then mean the same thing at any delta
        return huber(r, delta).mean() / (delta * delta)

    best = None
    history = []
    for obj0, a, coef in grid[:max(1, starts)]:
        x0 = np.maximum(np.array([coef[0], coef[1], a, coef[2]]), floors)
        u = torch.tensor(np.log(x0), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-10,
                                line_search_fn="strong_wolfe")

        def closure(u=u, opt=opt):
            opt.zero_grad()
            val = objective(u)
            val.backward()
            return val

        opt.step(closure)
        with torch.no_grad():
            val = float(objective(u))
        if not math.isfinite(val):
            continue
        val *= delta * delta  # back to the mean Huber loss
        history.append((obj0, val, np.exp(u.detach().numpy()).tolist()))
        if best is None or val < best[0]:
            best = (val, u.detach().clone())
    if best is None:
        raise ValueError("the fit diverged from every starting point (non-finite objective)")
    L0, A, alpha, C = (float(v) for v in torch.exp(best[1]))
    pred = law(S1, S2, L0, A, alpha, C)
    rmse = float(np.sqrt(np.mean((np.log(np.maximum(pred, 1e-300)) - logy) ** 2)))
    return LawFit(L0, A, alpha, C, lam=lam, exclude_warmup=exclude_warmup, objective=best[0],
                  rmse_log=rmse, n_points=int(Y.size), starts=len(history),
                  history=tuple(history))


# -- prediction, ranking, plots -----------------------------------------------------------------

def predict(fitted: LawFit, schedule: Schedule | np.ndarray, peak_lr: float | None = None,
            total_steps: int | None = None) -> np.ndarray:
    """Predicted loss at every step of a fastsched schedule (``peak_lr * schedule(t)`` for
    ``t < total_steps``) or of an explicit LR array, by the fitted law."""
    if isinstance(schedule, Schedule):
        if peak_lr is None or total_steps is None:
            raise ValueError("predicting a schedule needs peak_lr and total_steps")
        return fitted.predict(schedule, peak_lr, total_steps)
    return fitted.predict_lrs(schedule)


def rank(fitted: LawFit, candidates: Mapping[str, Schedule] | Sequence[Schedule],
         peak_lr: float, total_steps: int) -> list[tuple[str, float]]:
    """Candidate schedules sorted by predicted final loss (lowest first), as
    ``[(name, final_loss), ...]``; a list of schedules is named by their reprs."""
    items = (list(candidates.items()) if isinstance(candidates, Mapping)
             else [(repr(s), s) for s in candidates])
    if not items:
        raise ValueError("candidates is empty")
    out = [(name, float(fitted.predict(s, peak_lr, total_steps)[-1])) for name, s in items]
    return sorted(out, key=lambda kv: (not math.isfinite(kv[1]), kv[1]))


def plot(fitted: LawFit, path: str, *, curves: Sequence = (),
         predicted: Mapping[str, Schedule] | None = None, peak_lr: float | None = None,
         total_steps: int | None = None, actual: Mapping[str, Sequence] | None = None,
         title: str | None = None, logy: bool = False) -> str:
    """Plot fitted curves (observed loss as dots, the law as a line) and predicted schedules
    (dashed), with their learning rates below; writes a PNG to ``path`` and returns it.

    ``curves`` are the fitted :class:`Curve` objects (or pairs, as for :func:`fit`);
    ``predicted`` maps names to schedules predicted over ``total_steps`` at ``peak_lr``;
    ``actual`` optionally maps some of those names to measured ``(steps, loss)`` to overlay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [_as_curve(c, peak_lr, i) for i, c in enumerate(curves)]
    predicted = dict(predicted or {})
    if predicted and (peak_lr is None or total_steps is None):
        raise ValueError("predicted schedules need peak_lr and total_steps")
    fig, (ax, axl) = plt.subplots(2, 1, figsize=(8, 6), dpi=120, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ci = 0
    lows = []
    for c in curves:
        col = colors[ci % len(colors)]
        ci += 1
        label = c.name or f"curve {ci}"
        pred = fitted.predict_lrs(c.lr)
        t = np.arange(c.lr.size)
        ax.plot(c.steps, c.loss, ".", ms=2.5, color=col, alpha=0.5)
        ax.plot(t[1:], pred[1:], "-", color=col, lw=1.6, label=f"{label} (fitted)")
        axl.plot(t, c.lr, "-", color=col, lw=1.2)
        lows.append(float(np.min(c.loss)))
    for name, s in predicted.items():
        col = colors[ci % len(colors)]
        ci += 1
        lrs = schedule_lrs(s, peak_lr, total_steps)
        pred = fitted.predict_lrs(lrs)
        t = np.arange(total_steps)
        ax.plot(t[1:], pred[1:], "--", color=col, lw=1.8,
                label=f"{name} (predicted, final {pred[-1]:.4g})")
        axl.plot(t, lrs, "--", color=col, lw=1.2)
        lows.append(float(pred[-1]))
        if actual and name in actual:
            st, lo = actual[name]
            ax.plot(st, lo, ".", ms=2.5, color=col, alpha=0.5)
            ax.plot([], [], ".", color=col, label=f"{name} (measured, final {lo[-1]:.4g})")
            lows.append(float(np.min(lo)))
    # the law diverges at S1 -> 0: frame the part of the curves that carries information
    highs = [float(np.quantile(c.loss, 0.9)) for c in curves] or [max(lows) * 1.5]
    lo_y, hi_y = min(lows), max(highs)
    pad = 0.08 * (hi_y - lo_y if hi_y > lo_y else abs(hi_y) or 1.0)
    ax.set_ylim(lo_y - pad, hi_y + pad)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or (f"L = {fitted.L0:.4g} + {fitted.A:.3g}·S1^-{fitted.alpha:.3g}"
                           f" - {fitted.C:.3g}·S2   (λ = {fitted.lam:g})"), fontsize=9)
    axl.set_ylabel("lr")
    axl.set_xlabel("step")
    axl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
