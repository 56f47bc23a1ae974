"""The ``refine`` and ``lawfit`` subcommands of the ``fastsched`` command.

``add_subcommands(subparsers)`` registers them on an ``argparse`` subparsers object; each sets
``func(args, argv=None) -> int``. Bad input (an unreadable file, an empty or non-finite curve,
mismatched lengths, too few points to fit, a bad schedule) ends with one line on stderr naming
the argument, and exit status 2 (``SystemExit(2)``, no traceback): the convention of every
``fastsched`` command, through the parser class and argument types of :mod:`fastsched.cli`.

Input logs are CSV (a header row naming the columns) or JSON (``{"step": [...], "lr": [...],
"loss": [...]}``, or a list of such records). ``lawfit`` reads ``step``, ``lr`` and ``loss``:
rows may leave ``loss`` empty (JSON ``null``) to give the learning rate of a step whose loss was
not measured; the LR between logged steps is interpolated linearly, and before the first logged
step it is the first logged LR. ``refine`` reads ``grad_norm`` (``grad_norm_l1`` with
``--norm l1``, or ``--column``) and optionally ``step``; a file of bare numbers also works.

Schedules are given as ``KIND[:key=value,...]`` with a kind of ``fastsched.schedules.REGISTRY``
(``cosine``, ``wsd:decay_fraction=0.2``, ``linear_decay:warmup_steps=100``, ``constant``; a
``total_steps`` field defaults to ``--total-steps``), as a JSON object
(``Schedule.to_dict()``), or as ``@file.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ..cli import described, fail, fraction, int_at_least, name_subcommands, one_of, positive_float

__all__ = ["add_subcommands", "read_log", "read_curve", "parse_schedule"]


class InputError(ValueError):
    """Bad input for one argument: ``str(e)`` is the message, ``e.arg`` the argument name."""

    def __init__(self, arg: str, message: str):
        super().__init__(message)
        self.arg = arg


# -- reading logs -------------------------------------------------------------------------------

def _cell(v) -> float:
    """A CSV/JSON cell as a float; empty and null are NaN (missing)."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    if isinstance(v, int | float):
        return float(v)
    s = str(v).strip()
    if s == "":
        return math.nan
    return float(s)


def read_log(path: str | Path, arg: str = "FILE") -> dict[str, np.ndarray]:
    """Columns of a CSV or JSON log as float arrays (empty cells and JSON nulls are NaN).
    Raises :class:`InputError` naming ``arg``."""
    return _read(path, arg)[0]


def _read(path: str | Path, arg: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(columns, missing): ``missing[k]`` marks the empty/null cells of column ``k``, as
    opposed to explicit non-finite numbers."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(arg, f"cannot read {path} ({type(e).__name__}: {e})") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(arg, f"{path} is empty")
    cols: dict[str, list] = {}
    try:
        if path.suffix.lower() == ".json" or stripped[0] in "[{":
            data = json.loads(text)
            if isinstance(data, dict):
                lists = {k: v for k, v in data.items() if isinstance(v, list)}
                lengths = {k: len(v) for k, v in lists.items()}
                if len(set(lengths.values())) > 1:
                    raise InputError(arg, f"{path}: columns have different lengths "
                                          f"({', '.join(f'{k}: {n}' for k, n in lengths.items())})")
                cols = {k: list(v) for k, v in lists.items()}
            elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
                keys = list(dict.fromkeys(k for r in data for k in r))
                cols = {k: [r.get(k) for r in data] for k in keys}
            elif isinstance(data, list):
                cols = {"value": list(data)}
            else:
                raise InputError(arg, f"{path}: expected a JSON object of columns or a list, "
                                      f"got {type(data).__name__}")
        else:
            rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
            head = [c.strip() for c in rows[0]]
            try:
                [float(c) for c in head if c]
                numeric_head = True
            except ValueError:
                numeric_head = False
            if numeric_head:  # bare numbers, no header
                if any(len(r) != 1 for r in rows):
                    raise InputError(arg, f"{path}: a CSV without a header must have one "
                                          "column of numbers")
                cols = {"value": [r[0] for r in rows]}
            else:
                body = rows[1:]
                for i, r in enumerate(body):
                    if len(r) != len(head):
                        raise InputError(arg, f"{path}: row {i + 2} has {len(r)} fields, the "
                                              f"header {len(head)}")
                cols = {h: [r[j] for r in body] for j, h in enumerate(head)}
        out: dict[str, np.ndarray] = {}
        missing: dict[str, np.ndarray] = {}
        for k, v in cols.items():
            missing[k] = np.array([x is None or (isinstance(x, str) and not x.strip())
                                   for x in v], dtype=bool)
            try:
                out[k] = np.array([_cell(x) for x in v], dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise InputError(arg, f"{path}: column {k!r} has a value that is not a number "
                                      f"({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(arg, f"cannot parse {path} as JSON ({e})") from None
    except csv.Error as e:
        raise InputError(arg, f"cannot parse {path} as CSV ({e})") from None
    if not out or all(v.size == 0 for v in out.values()):
        raise InputError(arg, f"{path} has no rows")
    return out, missing


def _explicit_nonfinite(path, arg, name, raw_missing, values):
    bad = ~np.isfinite(values) & ~raw_missing
    if np.any(bad):
        raise InputError(arg, f"{path}: {name} has non-finite values (first at row "
                              f"{int(np.nonzero(bad)[0][0]) + 1})")


def read_curve(path: str | Path, arg: str = "RUN"):
    """A :class:`~fastsched.tools.lawfit.Curve` from a ``step, lr, loss`` log."""
    from .lawfit import Curve

    cols, raw = _read(path, arg)
    for need in ("lr", "loss"):
        if need not in cols:
            raise InputError(arg, f"{path}: no {need!r} column (columns: "
                                  f"{', '.join(sorted(cols))}); expected step, lr, loss")
    lr, loss = cols["lr"], cols["loss"]
    n = lr.size
    steps = cols.get("step")
    if steps is None:
        steps = np.arange(n, dtype=np.float64)
    if np.any(~np.isfinite(steps)) or np.any(steps != np.round(steps)) or np.any(steps < 0):
        raise InputError(arg, f"{path}: step must hold integers >= 0 on every row")
    if np.any(np.diff(steps) <= 0):
        raise InputError(arg, f"{path}: step must be strictly increasing")
    _explicit_nonfinite(path, arg, "lr", raw["lr"], lr)
    _explicit_nonfinite(path, arg, "loss", raw["loss"], loss)
    has_lr = np.isfinite(lr)
    if not np.any(has_lr):
        raise InputError(arg, f"{path}: lr is empty")
    if np.any(lr[has_lr] < 0):
        raise InputError(arg, f"{path}: lr must be >= 0")
    has_loss = np.isfinite(loss)
    if not np.any(has_loss):
        raise InputError(arg, f"{path}: loss is empty (no finite value)")
    total = int(steps[-1]) + 1
    per_step = np.interp(np.arange(total), steps[has_lr], lr[has_lr])
    try:
        return Curve(per_step, loss[has_loss], steps[has_loss].astype(np.int64),
                     name=Path(path).stem)
    except ValueError as e:
        raise InputError(arg, f"{path}: {e}") from None


def parse_schedule(text: str, total_steps: int | None, arg: str = "--schedule"):
    """A schedule from ``KIND[:k=v,...]``, a JSON object or ``@file.json``."""
    from ..schedules import REGISTRY, from_dict

    spec = text.strip()
    try:
        if spec.startswith("@"):
            try:
                d = json.loads(Path(spec[1:]).read_text())
            except OSError as e:
                raise InputError(arg, f"cannot read {spec[1:]} ({type(e).__name__}: {e})"
                                 ) from None
            return from_dict(d)
        if spec.startswith("{"):
            return from_dict(json.loads(spec))
        kind, _, rest = spec.partition(":")
        kind = kind.strip()
        if kind not in REGISTRY:
            raise InputError(arg, f"unknown schedule kind {kind!r}; expected one of "
                                  f"{', '.join(sorted(REGISTRY))}, a JSON object or @file.json")
        kwargs = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq:
                raise InputError(arg, f"expected key=value in {spec!r}, got {item!r}")
            try:
                kwargs[key.strip()] = json.loads(val)
            except json.JSONDecodeError:
                kwargs[key.strip()] = val.strip()
        fields = {f.name for f in dataclasses.fields(REGISTRY[kind])}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise InputError(arg, f"{kind} has no field {unknown[0]!r}; fields: "
                                  f"{', '.join(sorted(fields))}")
        if "total_steps" in fields and "total_steps" not in kwargs and total_steps is not None:
            kwargs["total_steps"] = total_steps
        return REGISTRY[kind](**kwargs)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise InputError(arg, f"bad schedule {spec!r} ({e})") from None


# -- refine -------------------------------------------------------------------------------------

def _cmd_refine(args, argv=None) -> int:
    from ._refine import refine, refine_curve

    prog = "fastsched refine"
    try:
        cols = read_log(args.log, "LOG")
    except InputError as e:
        fail(prog, e.arg, str(e))
    column = args.column or ("grad_norm_l1" if args.norm == "l1" else "grad_norm")
    if column not in cols:
        if set(cols) == {"value"}:
            column = "value"
        else:
            fail(prog, "--column", f"{args.log} has no {column!r} column (columns: "
                                   f"{', '.join(sorted(cols))})")
    norms = cols[column]
    if "step" in cols:
        if np.any(~np.isfinite(cols["step"])):
            fail(prog, "LOG", f"{args.log}: step must be a number on every row")
        src = {"step": cols["step"].tolist(), "grad_norm": norms.tolist()}
        if args.norm == "l1":
            src["grad_norm_l1"] = src.pop("grad_norm")
    else:
        src = norms
    try:
        curve = refine_curve(src, norm=args.norm)
        sched = refine(src, norm=args.norm, total_steps=args.total_steps, tol=args.tol)
    except ValueError as e:
        fail(prog, "LOG", f"{args.log}: {e}")
    total = int(sched.steps[-1]) + 1
    usable = int(np.sum(np.isfinite(norms) & (norms > 0)))
    peak_at = int(round(float(curve["progress"][int(np.argmax(curve["schedule"]))]) * (total - 1)))
    marks = ", ".join(f"{p}%: {sched(int(round(p / 100 * (total - 1)))):.3f}"
                      for p in (0, 10, 25, 50, 75, 90, 100))
    print(f"refined schedule over {total} steps from {usable} gradient norms "
          f"({args.norm}); peak at step {peak_at}; multiplier at {marks}")
    if args.out is not None:
        try:
            if args.out.suffix.lower() == ".csv":
                import torch

                t = torch.arange(total)
                vals = sched.evaluate(t).tolist()
                args.out.write_text("step,multiplier\n" + "".join(
                    f"{i},{v:.8g}\n" for i, v in enumerate(vals)))
            else:
                args.out.write_text(json.dumps(sched.to_dict()))
        except OSError as e:
            fail(prog, "--out", f"cannot write {args.out} ({type(e).__name__}: {e})")
        print(f"wrote {args.out}")
    if args.plot is not None:
        from ._refine import plot_refined

        try:
            plot_refined(src, str(args.plot), norm=args.norm, total_steps=args.total_steps,
                         tol=args.tol)
        except ImportError:
            fail(prog, "--plot", "matplotlib is not installed (pip install 'fastsched[plot]')")
        except OSError as e:
            fail(prog, "--plot", f"cannot write {args.plot} ({type(e).__name__}: {e})")
        print(f"wrote {args.plot}")
    return 0


# -- lawfit -------------------------------------------------------------------------------------

def _curves(prog: str, paths, arg: str):
    curves = []
    for p in paths:
        try:
            curves.append(read_curve(p, arg))
        except InputError as e:
            fail(prog, e.arg, str(e))
    return curves


def _fit(prog: str, curves, args, arg: str):
    from . import lawfit

    try:
        return lawfit.fit(curves, lam=args.lam, skip=args.skip)
    except ValueError as e:
        fail(prog, arg, str(e))


def _law(prog: str, args):
    """The law from --law, or fitted to --runs."""
    from .lawfit import LawFit

    if args.law is not None:
        try:
            return LawFit.from_dict(json.loads(args.law.read_text())), []
        except OSError as e:
            fail(prog, "--law", f"cannot read {args.law} ({type(e).__name__}: {e})")
        except (ValueError, TypeError, AttributeError) as e:
            fail(prog, "--law", f"{args.law} is not a fitted law written by 'fastsched lawfit "
                                f"fit --out' ({e})")
    curves = _curves(prog, args.runs, "--runs")
    return _fit(prog, curves, args, "--runs"), curves


def _print_law(law) -> None:
    print(f"L(s) = {law.L0:.6g} + {law.A:.6g} * S1^-{law.alpha:.6g} - {law.C:.6g} * S2   "
          f"(lambda {law.lam:g}; {law.n_points} points, rms log residual {law.rmse_log:.3g})")


def _schedules(prog: str, args):
    out = {}
    for spec in args.schedule:
        try:
            out[spec] = parse_schedule(spec, args.total_steps)
        except InputError as e:
            fail(prog, e.arg, str(e))
    return out


def _plot(prog, fn, path) -> None:
    try:
        fn()
    except ImportError:
        fail(prog, "--plot", "matplotlib is not installed (pip install 'fastsched[plot]')")
    except OSError as e:
        fail(prog, "--plot", f"cannot write {path} ({type(e).__name__}: {e})")
    print(f"wrote {path}")


def _cmd_fit(args, argv=None) -> int:
    from . import lawfit

    prog = "fastsched lawfit fit"
    curves = _curves(prog, args.runs, "RUN")
    law = _fit(prog, curves, args, "RUN")
    _print_law(law)
    for c in curves:
        pred = law.predict_lrs(c.lr)[c.steps]
        err = np.abs(pred / c.loss - 1.0)
        print(f"  {c.name}: {c.loss.size} points, final loss {c.loss[-1]:.6g} (law "
              f"{pred[-1]:.6g}), median |relative error| {float(np.median(err)):.3%}")
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(law.to_dict(), indent=1))
        except OSError as e:
            fail(prog, "--out", f"cannot write {args.out} ({type(e).__name__}: {e})")
        print(f"wrote {args.out}")
    if args.plot is not None:
        _plot(prog, lambda: lawfit.plot(law, str(args.plot), curves=curves), args.plot)
    return 0


def _cmd_predict(args, argv=None) -> int:
    from . import lawfit

    prog = "fastsched lawfit predict"
    scheds = _schedules(prog, args)  # cheap checks first, the fit after
    if len(scheds) != 1:
        fail(prog, "--schedule", f"predict takes one schedule, got {len(scheds)} (use "
                                 "'lawfit rank' for several)")
    law, curves = _law(prog, args)
    (name, sched), = scheds.items()
    pred = law.predict(sched, args.peak_lr, args.total_steps)
    lrs = lawfit.schedule_lrs(sched, args.peak_lr, args.total_steps)
    _print_law(law)
    marks = ", ".join(f"step {int(round(f * (args.total_steps - 1)))}: "
                      f"{pred[int(round(f * (args.total_steps - 1)))]:.6g}"
                      for f in (0.25, 0.5, 0.75))
    print(f"{name}: predicted final loss {pred[-1]:.6g} after {args.total_steps} steps at peak "
          f"lr {args.peak_lr:g} ({marks})")
    if args.out is not None:
        try:
            args.out.write_text("step,lr,predicted_loss\n" + "".join(
                f"{i},{lr:.8g},{p:.8g}\n" for i, (lr, p) in enumerate(zip(lrs, pred))))
        except OSError as e:
            fail(prog, "--out", f"cannot write {args.out} ({type(e).__name__}: {e})")
        print(f"wrote {args.out}")
    if args.plot is not None:
        _plot(prog, lambda: lawfit.plot(law, str(args.plot), curves=curves,
                                        predicted={name: sched}, peak_lr=args.peak_lr,
                                        total_steps=args.total_steps), args.plot)
    return 0


def _cmd_rank(args, argv=None) -> int:
    from . import lawfit

    prog = "fastsched lawfit rank"
    scheds = _schedules(prog, args)
    law, curves = _law(prog, args)
    ranked = lawfit.rank(law, scheds, args.peak_lr, args.total_steps)
    _print_law(law)
    width = max(len(n) for n, _ in ranked)
    print(f"predicted final loss after {args.total_steps} steps at peak lr {args.peak_lr:g}:")
    for i, (name, final) in enumerate(ranked, 1):
        print(f"  {i}. {name:<{width}}  {final:.6g}")
    if args.plot is not None:
        _plot(prog, lambda: lawfit.plot(law, str(args.plot), curves=curves, predicted=scheds,
                                        peak_lr=args.peak_lr, total_steps=args.total_steps),
              args.plot)
    return 0


# -- registration -------------------------------------------------------------------------------

def _spec_value(v) -> str:
    """A default as it is written in ``KIND:key=value``."""
    return v if isinstance(v, str) else json.dumps(v)


def _schedule_kinds_help() -> str:
    """The kinds of ``fastsched.schedules.REGISTRY`` and their fields, for ``--schedule``."""
    from ..schedules import REGISTRY

    def show(f) -> str:
        if f.default is not dataclasses.MISSING:
            return f"{f.name}={_spec_value(f.default)}"
        if f.default_factory is not dataclasses.MISSING:
            return f"{f.name}={_spec_value(f.default_factory())}"
        return f.name

    return described(
        "schedule kinds for --schedule KIND[:field=value,...] (fastsched.schedules; a field "
        "shown without a value is required, total_steps defaults to --total-steps):",
        ((kind, f"{cls.__name__}({', '.join(show(f) for f in dataclasses.fields(cls))})")
         for kind, cls in sorted(REGISTRY.items())))


def add_subcommands(subparsers) -> None:
    """Register ``refine`` and ``lawfit`` (``fit``, ``predict``, ``rank``) on ``subparsers``
    (the object ``ArgumentParser.add_subparsers()`` returns). Each parser's ``func(args, argv)``
    runs the command and returns 0; bad input raises ``SystemExit(2)`` after one line on
    stderr."""
    r = subparsers.add_parser(
        "refine", help="a schedule refined from the gradient norms of a previous run",
        description="Refine a learning-rate schedule from a gradient-norm log (Defazio et al., "
        "arXiv 2310.07831): median smoothing, w = G^-2 (l2) or G^-1 (l1), "
        "eta_t ~ w_t * sum_{p>t} w_p, peak 1. Prints a summary; writes the schedule as JSON "
        "(Schedule.to_dict) or CSV (step, multiplier) and a PNG.")
    r.add_argument("log", type=Path, metavar="LOG",
                   help="CSV or JSON with a grad_norm column (grad_norm_l1 with --norm l1) and "
                   "optionally step; or bare numbers")
    r.add_argument("--norm", type=one_of(("l2", "l1"), "norm"), default="l2", metavar="{l2,l1}",
                   help="l2: SGD-type, w = G^-2 (default); l1: Adam-type, w = G^-1 of L1 norms")
    r.add_argument("--column", default=None, help="the column holding the norms")
    r.add_argument("--total-steps", type=int_at_least(2), default=None, metavar="N",
                   help="length of the new run (default: the logged run's)")
    r.add_argument("--tol", type=fraction, default=1e-3,
                   help="largest deviation of the device table's linear interpolation from the "
                   "refined curve, as a fraction of its peak (default 1e-3; 0 keeps every "
                   "point)")
    r.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the schedule: .json (from_dict format) or .csv (per step)")
    r.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="plot norms, smoothed norms and the schedule")
    r.set_defaults(func=_cmd_refine)

    from ..schedules import REGISTRY

    kinds = ", ".join(sorted(REGISTRY))
    lf = subparsers.add_parser(
        "lawfit", help="fit the LR-annealing scaling law to loss curves; predict and rank "
        "schedules",
        description="L(s) = L0 + A*S1^-alpha - C*S2 (Tissue et al., arXiv 2408.11029): fit it "
        "to step,lr,loss logs, predict the loss curve of a schedule, rank schedules by "
        "predicted final loss.")
    sub = lf.add_subparsers(dest="lawfit_command", required=True)

    def fit_options(p):
        p.add_argument("--lam", type=fraction, default=0.999,
                       help="annealing momentum lambda (default 0.999, the paper's, for runs of "
                       "1e4-1e5 steps; about 1 - 20/steps for shorter runs)")
        p.add_argument("--skip", type=fraction, default=0.05,
                       help="fraction of each run's first steps left out of the fit "
                       "(default 0.05)")

    f = sub.add_parser("fit", help="fit the law to one or more runs",
                       description="Fit (L0, A, alpha, C) to the runs with a Huber loss on log "
                       "loss; print the parameters and per-run errors.")
    f.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="CSV or JSON logs with step, lr, loss")
    fit_options(f)
    f.add_argument("--out", type=Path, default=None, metavar="LAW.json",
                   help="write the fitted law (for predict/rank --law)")
    f.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="plot the runs and the fitted curves")
    f.set_defaults(func=_cmd_fit)

    for name, helptext, fn in (
            ("predict", "predict the loss curve of one schedule", _cmd_predict),
            ("rank", "rank schedules by predicted final loss", _cmd_rank)):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:]
                           + " from a fitted law (--law) or runs fitted first (--runs).",
                           epilog=_schedule_kinds_help())
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--law", type=Path, default=None, metavar="LAW.json",
                         help="a law written by 'lawfit fit --out'")
        src.add_argument("--runs", type=Path, nargs="+", default=None, metavar="RUN",
                         help="fit these step,lr,loss logs first")
        fit_options(p)
        p.add_argument("--schedule", action="append", required=True, metavar="SPEC",
                       help=f"KIND[:key=value,...] with KIND one of {kinds} (fields below; e.g. "
                       "cosine, wsd:decay_fraction=0.2), a JSON object (Schedule.to_dict()) or "
                       "@file.json" + ("; repeat for several" if name == "rank" else ""))
        p.add_argument("--peak-lr", type=positive_float, required=True, metavar="LR",
                       help="the learning rate the schedule multiplies")
        p.add_argument("--total-steps", type=int_at_least(1), required=True, metavar="N",
                       help="steps to predict (also the schedules' total_steps by default)")
        if name == "predict":
            p.add_argument("--out", type=Path, default=None, metavar="CSV",
                           help="write step, lr, predicted_loss")
        p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                       help="plot the fitted runs and the prediction(s)")
        p.set_defaults(func=fn)
    name_subcommands(sub)
