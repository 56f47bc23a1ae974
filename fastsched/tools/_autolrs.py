"""AutoLRS: learning rates chosen online by Bayesian optimisation over short trials
(Jin, Zhou, Wang, Zhang, Ganger, Lin, Chen, Zhao; "AutoLRS: Automatic Learning-Rate Schedule by
Bayesian Optimization on the Fly", ICLR 2021, arXiv 2105.10762; reference code
``YuchenJin/autolrs``, ``autolrs_server.py``).

Training runs in stages of :math:`\\tau` steps, each at one constant learning rate. A stage:

1. checkpoints the model and the optimizer;
2. tries ``n_trials`` = 10 learning rates proposed by a Gaussian-process surrogate with the LCB
   acquisition over a log-uniform range. Each trial restores the checkpoint, trains
   :math:`\\tau' = \\tau/10` steps, fits :math:`L(x) = a e^{bx} + c` (:math:`b < 0`) to the
   trial's loss series and reports the forecast :math:`L(\\tau)`;
3. restores the checkpoint and trains :math:`\\tau` steps at the trial LR with the lowest
   forecast.

After each stage :math:`(\\tau', \\tau)` double while :math:`\\tau' < \\tau_{max}/10`; then, with a
validation loss, the forecasts use it instead of the training loss.

The optimizer's learning rate is changed between steps through ``param_groups[i]["lr"]``; a
fastsched optimizer picks the new value up at its next step without recompiling anything, and
the in-memory checkpoints are restored in place (same tensor storage), so the device tables it
built over the parameters and their states are kept (see :class:`Checkpoint` for the one
exception).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..schedules import Table

__all__ = ["AutoLRS", "Checkpoint", "GaussianProcess", "exp_forecast", "denoise",
           "Stage"]


# -- the loss forecaster --------------------------------------------------------------------------

def _quadratic_smooth(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Least-squares quadratic through (x, y), evaluated at ``at``.

    Stands in for the reference's ``scipy.interpolate.UnivariateSpline(x, y, k=2)`` with its
    default smoothing ``s = len(x)``: that spline adds knots only while the sum of squared
    residuals exceeds ``len(x)``, i.e. a mean squared residual of 1, which a loss series with
    residuals below 1 never reaches, so it is the single quadratic piece computed here (a
    series noisier than that, e.g. a diverging trial, would get a bendier spline there).
    """
    if x.size < 3:
        return np.full(at.shape, float(np.mean(y)))
    c = np.polyfit(x, y, 2)
    return np.polyval(c, at)


def denoise(xs, ys, is_training: bool = True, filter_ratio: float = 0.03, bound: float = 0.5):
    """Outlier removal before the exponential fit (AutoLRS, arXiv 2105.10762, reference
    ``spline_iter``): ``10`` passes (training loss) or ``1`` (validation loss), each fitting a
    quadratic smoother and dropping the points of largest residual (the top 3% for training
    loss, the single largest for validation loss) that lie in the first half of the window.

    Returns the kept ``(xs, ys)``. (The reference drops every point of the first half when 3% of
    the window rounds to 0 points, below 17 points; none is dropped here then.)
    """
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    limit = xs[int((len(xs) - 1) * bound)]
    passes = 10 if is_training else 1
    for _ in range(passes):
        if xs.size < 4:
            break
        dys = np.abs(ys - _quadratic_smooth(xs, ys, xs))
        k = int(round(len(dys) * filter_ratio)) if is_training else 1
        if k <= 0:
            break
        worst = np.argsort(dys, kind="stable")[-k:]
        drop = worst[xs[worst] < limit]
        if drop.size == 0:
            break
        keep = np.ones(xs.size, dtype=bool)
        keep[drop] = False
        xs, ys = xs[keep], ys[keep]
    return xs, ys


def _exp_residual(bp: float, x: np.ndarray, y: np.ndarray) -> float:
    X = np.stack([np.exp(-np.exp(bp) * x), np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = X @ coef - y
    return float(r @ r)


def exp_forecast(losses, at: float, is_training: bool = True,
                 guard: bool = False) -> tuple[float, float, float, float]:
    """Forecast of a loss series by :math:`L(x) = a e^{bx} + c`, :math:`b < 0` (AutoLRS,
    arXiv 2105.10762, Section 4.2; reference ``exp_forecast``).

    ``x`` counts the series' steps from 0; the series is denoised (:func:`denoise`), smoothed by
    the quadratic, :math:`b = -e^{b'}` minimises the least-squares residual of
    :math:`y \\sim [e^{bx}, 1]` with :math:`(a, c)` solved linearly for each :math:`b'`, then
    :math:`(a, c)` by linear least squares. The reference minimises over :math:`b'` with
    Nelder-Mead from 0 (``scipy.optimize.fmin``, xtol = ftol = 1e-5); here a grid of
    :math:`b' \\in [-14, 4]` (step 0.1: decay times from 0.02 to 1.2 million steps) is refined by
    golden-section search to 1e-5, which cannot stop in the wrong basin of a bumpy residual.

    A window whose loss falls ever faster (concave; common in the first steps from the
    initialisation) has no decaying-exponential fit: the least-squares :math:`b` tends to 0 and
    the forecast to a straight-line extrapolation, without bound (e.g. a loss going 1.39 to 1.15
    in 30 steps forecasts -1.07 at step 300). With ``guard``, a fit whose decay time
    :math:`1/|b|` exceeds the horizon ``at`` (the curve shows no sign of levelling off before
    the forecast point) reports the window's smoothed last value instead. The reference has no
    such guard (``guard=False``).

    Returns ``(forecast at x = at, a, b, c)``; a series with a non-finite value forecasts NaN.
    """
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if y.size == 0 or not np.all(np.isfinite(y)):
        return math.nan, math.nan, math.nan, math.nan
    if y.size < 3:
        c = float(y[-1])
        return c, 0.0, 0.0, c
    xs = np.arange(y.size, dtype=np.float64)
    xk, yk = denoise(xs, y, is_training)
    ys = _quadratic_smooth(xk, yk, xs)
    grid = np.arange(-14.0, 4.0 + 1e-9, 0.1)
    res = np.array([_exp_residual(b, xs, ys) for b in grid])
    i = int(np.argmin(res))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    a_, b_ = lo, hi
    c_, d_ = b_ - phi * (b_ - a_), a_ + phi * (b_ - a_)
    fc, fd = _exp_residual(c_, xs, ys), _exp_residual(d_, xs, ys)
    while b_ - a_ > 1e-5:
        if fc < fd:
            b_, d_, fd = d_, c_, fc
            c_ = b_ - phi * (b_ - a_)
            fc = _exp_residual(c_, xs, ys)
        else:
            a_, c_, fc = c_, d_, fd
            d_ = a_ + phi * (b_ - a_)
            fd = _exp_residual(d_, xs, ys)
    bp = 0.5 * (a_ + b_)
    if res[i] < min(fc, fd):
        bp = float(grid[i])
    b = -math.exp(bp)
    X = np.stack([np.exp(b * xs), np.ones_like(xs)], axis=1)
    (a, c), *_ = np.linalg.lstsq(X, ys, rcond=None)
    if guard and -b * at < 1.0:
        return float(ys[-1]), float(a), float(b), float(c)
    return float(a * math.exp(b * at) + c), float(a), float(b), float(c)


# -- the Gaussian-process surrogate ---------------------------------------------------------------

class GaussianProcess:
    """A 1-D Gaussian-process regressor (numpy): Matérn 5/2 kernel times an amplitude, plus white
    noise, on outputs normalised to mean 0 and variance 1; hyperparameters (length scale,
    amplitude, noise) by maximum marginal likelihood over a grid (the surrogate scikit-optimize
    builds for AutoLRS: ``ConstantKernel * Matern(nu=2.5) + WhiteKernel``, ``normalize_y``).

    Inputs are expected in [0, 1] (log learning rate rescaled to the search range).
    """

    LENGTH_SCALES = tuple(np.geomspace(0.01, 10.0, 31))
    AMPLITUDES = (0.1, 0.3, 1.0, 3.0, 10.0)
    NOISES = (1e-6, 1e-4, 1e-2, 1e-1)

    def __init__(self):
        self.x = np.zeros(0)
        self.length_scale = 1.0
        self.amplitude = 1.0
        self.noise = 1e-6

    @staticmethod
    def matern52(a: np.ndarray, b: np.ndarray, length_scale: float) -> np.ndarray:
        """:math:`k(r) = (1 + \\sqrt5 r/\\ell + 5r^2/3\\ell^2)\\, e^{-\\sqrt5 r/\\ell}`
        (Rasmussen & Williams, eq. 4.17)."""
        r = np.abs(a[:, None] - b[None, :]) * (math.sqrt(5.0) / length_scale)
        return (1.0 + r + r * r / 3.0) * np.exp(-r)

    def fit(self, x, y) -> GaussianProcess:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.x = x
        self.y_mean = float(np.mean(y)) if y.size else 0.0
        std = float(np.std(y)) if y.size > 1 else 0.0
        self.y_std = std if std > 0 else 1.0
        z = (y - self.y_mean) / self.y_std
        best = None
        for ls in self.LENGTH_SCALES:
            k0 = self.matern52(x, x, ls)
            for amp in self.AMPLITUDES:
                for noise in self.NOISES:
                    K = amp * k0 + (noise + 1e-10) * np.eye(x.size)
                    try:
                        L = np.linalg.cholesky(K)
                    except np.linalg.LinAlgError:
                        continue
                    alpha = np.linalg.solve(L.T, np.linalg.solve(L, z))
                    lml = -0.5 * z @ alpha - np.sum(np.log(np.diag(L)))
                    if best is None or lml > best[0]:
                        best = (lml, ls, amp, noise, L, alpha)
        _, self.length_scale, self.amplitude, self.noise, self._L, self._alpha = best
        return self

    def predict(self, xq) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the latent function (noise excluded, as
        scikit-optimize's ``return_std``), in the original output units."""
        xq = np.asarray(xq, dtype=np.float64).reshape(-1)
        ks = self.amplitude * self.matern52(xq, self.x, self.length_scale)
        mu = ks @ self._alpha
        v = np.linalg.solve(self._L, ks.T)
        var = np.maximum(self.amplitude - np.sum(v * v, axis=0), 0.0)
        return self.y_mean + self.y_std * mu, self.y_std * np.sqrt(var)


# -- checkpoints ----------------------------------------------------------------------------------

class Checkpoint:
    """In-memory checkpoint of a model and its optimizer, restored in place.

    ``save()`` clones the model's ``state_dict()`` tensors, every optimizer state tensor, the
    group hyperparameters and (for fastsched optimizers) the schedule clock. ``restore()``
    copies them back into the live tensors, so parameter and state addresses do not change (a
    fastsched optimizer keeps its device tables). When the
    optimizer's state no longer has the saved structure (e.g. it was empty at ``save()`` and
    the trial created it), ``restore()`` falls back to ``optimizer.load_state_dict`` of a deep
    copy taken at ``save()``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self._saved = None

    def save(self) -> None:
        opt = self.optimizer
        model_sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state = {}
        for p, st in opt.state.items():
            state[p] = {k: (v.detach().clone() if isinstance(v, torch.Tensor)
                            else copy.deepcopy(v)) for k, v in st.items()}
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                  for g in opt.param_groups]
        clock = opt.clock.detach().clone() if _is_fastsched(opt) else None
        self._saved = {"model": model_sd, "state": state, "groups": groups, "clock": clock,
                       "full": copy.deepcopy(opt.state_dict())}

    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("restore() before save()")
        s = self._saved
        self.model.load_state_dict(s["model"])  # copies into the existing tensors
        opt = self.optimizer
        if self._same_structure():
            with torch.no_grad():
                for p, st in s["state"].items():
                    live = opt.state[p]
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):
                            live[k].copy_(v)
                        else:
                            live[k] = copy.deepcopy(v)
            for g, saved in zip(opt.param_groups, s["groups"]):
                g.update(copy.deepcopy(saved))
            if s["clock"] is not None:
                opt.clock.copy_(s["clock"])
        else:
            opt.load_state_dict(copy.deepcopy(s["full"]))

    def _same_structure(self) -> bool:
        s = self._saved
        opt = self.optimizer
        if len(opt.state) != len(s["state"]) or len(opt.param_groups) != len(s["groups"]):
            return False
        for p, st in s["state"].items():
            live = opt.state.get(p)
            if live is None or set(live) != set(st):
                return False
            for k, v in st.items():
                lv = live[k]
                if isinstance(v, torch.Tensor) != isinstance(lv, torch.Tensor):
                    return False
                if isinstance(v, torch.Tensor) and (v.shape != lv.shape or v.dtype != lv.dtype):
                    return False
        return True


def _is_fastsched(opt) -> bool:
    from ..optim import FusedOptimizer

    return isinstance(opt, FusedOptimizer)


# -- the controller -------------------------------------------------------------------------------

@dataclass
class Stage:
    """One AutoLRS stage: where it started, its (tau', tau), the trials ``[(lr, forecast)]`` in
    the order tried and their loss series, the chosen learning rate and the losses of its
    exploitation steps."""

    start: int
    tau_prime: int
    tau: int
    trials: list[tuple[float, float]] = field(default_factory=list)
    trial_losses: list[list[float]] = field(default_factory=list, repr=False)
    lr: float = math.nan
    losses: list[float] = field(default_factory=list)
    validation: bool = False


class AutoLRS:
    """Online learning-rate search (Jin et al., ICLR 2021, arXiv 2105.10762) for a model trained
    by a fastsched (or any torch) optimizer.

    Each stage tries ``n_trials`` learning rates for ``tau_prime`` steps each from the same
    checkpoint, forecasts each trial's loss ``tau`` steps ahead with
    :math:`L(x) = a e^{bx} + c` (:func:`exp_forecast`), proposes the next trial by a Gaussian
    process (:class:`GaussianProcess`) with the lower-confidence-bound acquisition
    :math:`\\mu - \\kappa\\sigma` over :math:`\\log lr \\in [\\log lr_{min}, \\log lr_{max}]`
    (the first trial uniform at random in log space, as scikit-optimize's
    ``n_initial_points=1``), then restores the checkpoint and trains ``tau`` steps at the trial
    with the lowest forecast. After each stage ``tau_prime`` and ``tau`` double while
    ``tau < tau_max``. Then, if ``val_loss`` is given, the forecasts use the validation loss
    every ``tau_prime // 16`` steps, and a trial whose validation loss rose to the stage's
    initial loss reports its current loss instead of the forecast (the reference's
    validation stage).

    Defaults are the paper's: ``tau = 1000``, ``tau_prime = tau // 10``, ``tau_max = 8000``,
    ``n_trials = 10``, ``kappa = 1e6`` (the reference's LCB weight: at that weight the acquisition
    is the posterior standard deviation alone, so trials spread over the range; a small kappa,
    e.g. scikit-optimize's default 1.96, concentrates them near the best forecast). A NaN
    forecast is reported as 1e6.

    Args:
        model: the ``nn.Module`` being trained (checkpointed with its buffers).
        optimizer: a fastsched optimizer (or a torch one); all its groups get the stage's LR,
            scaled by each group's initial ``lr`` relative to group 0's.
        train_step: a callable doing one training step on the next batch and returning the
            training loss (a tensor, not synchronised until a trial ends, or a float).
        min_lr, max_lr: the log-uniform search range.
        val_loss: optional callable returning the validation loss (see above).
        checkpoint: an object with ``save()`` and ``restore()``; default :class:`Checkpoint`.
        seed: seeds the first trial of each stage.
        guard: forecasts of windows that show no levelling off report the current loss instead
            of a straight-line extrapolation (see :func:`exp_forecast`); ``False`` forecasts as
            the reference does.
        candidates: points of the log range the acquisition is minimised over.

    Example::

        opt = fastsched.AdamW(model.parameters(), lr=1e-3)
        ctl = AutoLRS(model, opt, step_fn, min_lr=1e-5, max_lr=1e-1, tau=500)
        ctl.run(5000)
        print(ctl.schedule())   # the chosen learning rates as a fastsched Table
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_step: Callable[[], torch.Tensor | float], *, min_lr: float,
                 max_lr: float, tau: int = 1000, tau_prime: int | None = None,
                 tau_max: int = 8000, n_trials: int = 10, kappa: float = 1e6,
                 val_loss: Callable[[], float] | None = None, checkpoint=None, seed: int = 0,
                 guard: bool = True, candidates: int = 2001):
        for name, v in (("min_lr", min_lr), ("max_lr", max_lr)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not min_lr < max_lr:
            raise ValueError(f"min_lr must be < max_lr, got {min_lr} and {max_lr}")
        tau_prime = tau // 10 if tau_prime is None and isinstance(tau, int) else tau_prime
        for name, v, lo in (("tau", tau, 1), ("tau_prime", tau_prime, 3),
                            ("tau_max", tau_max, 1), ("n_trials", n_trials, 1),
                            ("candidates", candidates, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(kappa, int | float) and math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")
        if not callable(train_step):
            raise ValueError("train_step must be a callable running one step and returning "
                             "the loss")
        self.model = model
        self.optimizer = optimizer
        self.train_step = train_step
        self.min_lr, self.max_lr = float(min_lr), float(max_lr)
        self.tau, self.tau_prime, self.tau_max = tau, tau_prime, tau_max
        self.n_trials = n_trials
        self.kappa = float(kappa)
        self.val_loss = val_loss
        self.guard = bool(guard)
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint(model, optimizer)
        self.rng = np.random.default_rng(seed)
        self._grid = np.linspace(0.0, 1.0, candidates)
        lr0 = float(optimizer.param_groups[0]["lr"])
        self._ratios = [float(g["lr"]) / lr0 if lr0 > 0 else 1.0
                        for g in optimizer.param_groups]
        self.validation_stage = False
        self.stages: list[Stage] = []
        self.step = 0  # exploitation steps taken (the model's progress)
        self.trial_steps = 0  # steps spent in trials (undone by restores)

    # the learning rate -----------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Set every group's lr (group 0 gets ``lr``, the others keep their initial ratios);
        takes effect at the next ``optimizer.step()``."""
        for g, r in zip(self.optimizer.param_groups, self._ratios):
            g["lr"] = lr * r

    def _to_unit(self, lr: float) -> float:
        return (math.log(lr) - math.log(self.min_lr)) / (math.log(self.max_lr)
                                                         - math.log(self.min_lr))

    def _from_unit(self, u: float) -> float:
        lr = math.exp(math.log(self.min_lr) + u * (math.log(self.max_lr)
                                                   - math.log(self.min_lr)))
        return min(max(lr, self.min_lr), self.max_lr)  # exp(log(x)) may round past the ends

    def propose(self, tried: list[tuple[float, float]]) -> float:
        """The next learning rate: uniform in log space for the first trial, then the minimum
        of the lower confidence bound :math:`\\mu - \\kappa\\sigma` (Srinivas et al., arXiv
        0912.3995; AutoLRS, arXiv 2105.10762, Section 4.1) of the Gaussian process over
        ``candidates`` points of
        the log range, excluding learning rates already tried (ties: the candidate farthest
        from the trials)."""
        if not tried:
            return self._from_unit(float(self.rng.uniform()))
        x = np.array([self._to_unit(lr) for lr, _ in tried])
        y = np.array([v for _, v in tried])
        gp = GaussianProcess().fit(x, y)
        mu, sd = gp.predict(self._grid)
        acq = mu - self.kappa * sd
        dist = np.min(np.abs(self._grid[:, None] - x[None, :]), axis=1)
        acq[dist < 0.5 / (self._grid.size - 1)] = np.inf
        # ties (a flat acquisition, e.g. the short length scale the marginal likelihood picks
        # for one or two points) go to the candidate farthest from every trial
        lo = float(np.min(acq))
        tied = np.nonzero(acq <= lo + 1e-9 * max(1.0, abs(lo)))[0]
        return self._from_unit(float(self._grid[tied[int(np.argmax(dist[tied]))]]))

    # running ---------------------------------------------------------------------------------
    def _run_steps(self, n: int, record_every: int | None = None) -> list[float]:
        """``n`` training steps; the losses (training, or validation every ``record_every``
        steps) are kept on the device and read once at the end."""
        out: list = []
        for i in range(n):
            loss = self.train_step()
            if record_every is None:
                out.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            elif (i + 1) % record_every == 0:
                out.append(self.val_loss())
        if out and all(isinstance(o, torch.Tensor) and o.device == out[0].device for o in out):
            # one device-to-host copy per trial, not one synchronisation per step
            return torch.stack([o.reshape(()).to(torch.float64) for o in out]).cpu().tolist()
        return [float(o) for o in out]

    def run_stage(self, max_steps: int | None = None) -> Stage:
        """One stage: ``n_trials`` trials, then ``tau`` steps (at most ``max_steps``) at the
        best learning rate."""
        val = self.validation_stage and self.val_loss is not None
        stage = Stage(self.step, self.tau_prime, self.tau, validation=val)
        val_every = max(1, self.tau_prime // 16)
        init_loss = float(self.val_loss()) if val else math.nan
        self.checkpoint.save()
        told: list[tuple[float, float]] = []
        for _ in range(self.n_trials):
            lr = self.propose(told)
            self.checkpoint.restore()
            self.set_lr(lr)
            losses = self._run_steps(self.tau_prime, val_every if val else None)
            self.trial_steps += self.tau_prime
            if val:
                forecast = exp_forecast(losses, self.tau / val_every, is_training=False,
                                        guard=self.guard)[0]
                if losses and max(losses) >= init_loss:
                    forecast = losses[-1]
            else:
                forecast = exp_forecast(losses, self.tau, is_training=True,
                                        guard=self.guard)[0]
            if not math.isfinite(forecast):
                forecast = 1e6
            told.append((lr, forecast))
            stage.trials.append((lr, forecast))
            stage.trial_losses.append(losses)
        best = min(told, key=lambda t: t[1])[0]
        self.checkpoint.restore()
        self.set_lr(best)
        stage.lr = best
        n = self.tau if max_steps is None else max(0, min(self.tau, int(max_steps)))
        stage.losses = self._run_steps(n)
        self.step += n
        self.stages.append(stage)
        # the reference doubles (tau', tau) while tau' < tau_max / 10, then moves on to the
        # validation-loss stage
        if self.tau_prime < self.tau_max / 10:
            self.tau_prime *= 2
            self.tau *= 2
        else:
            self.validation_stage = True
        return stage

    def run(self, total_steps: int) -> list[Stage]:
        """Run stages until ``total_steps`` exploitation steps are done (the last stage's
        exploitation is cut to fit). Returns the stages."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        end = self.step + total_steps
        while self.step < end:
            self.run_stage(end - self.step)
        return self.stages

    def schedule(self) -> Table:
        """The chosen learning rates as a fastsched :class:`~fastsched.schedules.Table` of
        absolute values over the exploitation steps (piecewise constant at integer steps): a
        multiplier of ``lr=1.0`` to replay the schedule."""
        if not self.stages:
            raise RuntimeError("no stage has run yet")
        steps, vals = [], []
        for s in self.stages:
            n = len(s.losses) or s.tau
            first, last = float(s.start), float(s.start + n - 1)
            steps.append(first)
            vals.append(s.lr)
            if last > first:
                steps.append(last)
                vals.append(s.lr)
        return Table(tuple(steps), tuple(vals))
