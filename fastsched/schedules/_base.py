"""The ``Schedule`` base class: validation, evaluation, (de)serialisation, composition."""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
import warnings
from typing import Any, ClassVar

import torch

from ._core import Segment, evaluate_rows, evaluate_table, segments_to_table

__all__ = ["Schedule", "register", "from_dict", "REGISTRY", "FORMAT_VERSION"]

REGISTRY: dict[str, type[Schedule]] = {}

#: version of the :meth:`Schedule.to_dict` format, stored under ``"version"``. A dict without
#: the key was saved by fastsched before version 2 and is read with the values of that time
#: (see :attr:`Schedule.legacy_defaults`). Version 2 changed the defaults ``Power.a`` (4.6 ->
#: 4), ``Infinite.alpha`` (8 -> 10) and the length of a ``WSD`` decay given as a fraction
#: (rounded -> truncated, ``WSD.decay_rounding``).
FORMAT_VERSION = 2


def register(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: make a schedule constructible by name through :func:`from_dict`."""
    REGISTRY[cls.kind] = cls
    return cls


# -- validation ---------------------------------------------------------------------------------

def check_steps(name: str, value, *, allow_zero: bool = True, allow_none: bool = False):
    """An integer step count (``>= 0``, or ``> 0`` when ``allow_zero`` is False)."""
    if value is None and allow_none:
        return None
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_float(name: str, value, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite float inside ``[lo, hi]`` (ends excluded where ``*_open``)."""
    rng = (("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
           + ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_step(step) -> int:
    """A step for ``Schedule.__call__``: an integer (or integral float) ``>= 0``."""
    if isinstance(step, torch.Tensor):
        raise TypeError("use Schedule.evaluate(tensor) for tensors; __call__ takes a Python int")
    if isinstance(step, bool) or not isinstance(step, numbers.Real) \
            or not math.isfinite(step) or step != int(step):
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


# -- the base class -----------------------------------------------------------------------------

class Schedule(abc.ABC):
    """A learning-rate schedule: a map from a 0-based integer step to a multiplier of the base LR.

    Subclasses are frozen dataclasses that validate their parameters in ``__post_init__`` and
    implement :meth:`segments`. Everything else derives from the segment table:

    * ``sched(t)``: the value at a Python int (float64 arithmetic on the host);
    * ``sched.evaluate(steps)``: vectorised over a tensor of steps on any device;
    * ``sched.table(device)``: the ``(n, 8)`` float64 device representation that
      ``fastsched.kernels.schedule.schedule_value`` evaluates from a device step counter;
    * ``sched.to_dict()`` / ``fastsched.schedules.from_dict(d)``; a readable ``repr``;
    * ``sched * k`` scales the schedule, :class:`~fastsched.schedules.Join` composes schedules.

    Steps past the end of the last phase hold the final value; negative steps are an error
    (``ValueError`` from ``sched(t)`` and from ``evaluate`` on CPU tensors; see :meth:`evaluate`).
    """

    kind: ClassVar[str] = "schedule"

    #: ``{format version: {field: value}}``: the value a field absent from a dict of that
    #: format version had when it was saved (a field added later, or whose default changed).
    legacy_defaults: ClassVar[dict[int, dict[str, Any]]] = {}

    @abc.abstractmethod
    def segments(self) -> list[Segment]:
        """The segment table of this schedule (first segment starts at step 0)."""

    def phase_boundaries(self) -> list[float]:
        """Steps at which a new phase starts (for plots), excluding 0."""
        return sorted({s.start for s in self.segments() if s.start > 0})

    @property
    def end_step(self) -> float:
        """Step at which the last bounded phase ends (``inf`` for unbounded schedules)."""
        segs = self.segments()
        last = segs[-1]
        if last.shape == 0:  # a trailing constant holds forever: the schedule ends at its start
            return last.start
        return last.start + last.length

    # evaluation ------------------------------------------------------------------------------
    def table(self, device=None) -> torch.Tensor:
        cache = self.__dict__.setdefault("_tables", {})
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        if key not in cache:
            cache[key] = segments_to_table(self.segments(), device=device)
        return cache[key]

    def evaluate(self, steps: torch.Tensor) -> torch.Tensor:
        """Vectorised float64 evaluation at a tensor of non-negative integer steps.

        Returns a float64 tensor of the same shape on the same device. Negative steps raise
        ``ValueError`` for CPU tensors. On an accelerator the check would need a device-to-host
        synchronisation, so it is not made there: a negative step evaluates as step 0 (the table
        lookup and the local clock both clamp at 0), as it does in the Triton device function.
        """
        if not isinstance(steps, torch.Tensor):
            steps = torch.as_tensor(steps)
        if steps.is_floating_point() or steps.is_complex() or steps.dtype == torch.bool:
            raise ValueError(f"steps must be an integer tensor, got {steps.dtype}")
        if steps.device.type == "cpu" and steps.numel() and bool((steps < 0).any()):
            raise ValueError(f"steps must be >= 0, got minimum {int(steps.min())}")
        return evaluate_table(self.table(steps.device), steps)

    def __call__(self, step: int) -> float:
        """The value at one step (plain-Python float64 arithmetic, no tensors)."""
        step = check_step(step)
        rows = self.__dict__.get("_rows")
        if rows is None:
            rows = [s.as_row() for s in self.segments()]
            self.__dict__["_rows"] = rows
            self.__dict__["_starts"] = [r[0] for r in rows]
        return evaluate_rows(rows, self.__dict__["_starts"], float(step))

    # composition -----------------------------------------------------------------------------
    def __mul__(self, factor: float) -> Schedule:
        from ._named import Scaled

        return Scaled(self, factor)

    __rmul__ = __mul__

    # serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field (defaults included), the ``kind`` and the format ``version``."""
        out: dict[str, Any] = {"kind": self.kind, "version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Schedule:
        return cls(**{k: _decode(v) for k, v in fields.items()})

    def __repr__(self) -> str:
        # only the fields that differ from their defaults: WSD(warmup_steps=100, total_steps=1000)
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and _same(v, f.default):
                continue
            parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_tables", "_rows", "_starts"):
            state.pop(key, None)
        return state


def _same(a, b) -> bool:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return type(a) is type(b) and a == b


def _encode(v):
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, tuple | list):
        return [_encode(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


def _decode(v):
    if isinstance(v, dict) and "kind" in v:
        return from_dict(v)
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    if v == "inf":
        return math.inf
    return v


def from_dict(d: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output.

    A dict without a ``"version"`` key was saved before format version 2 (fastsched's
    ``FORMAT_VERSION``): fields it lacks take the values they had then
    (:attr:`Schedule.legacy_defaults`), so a checkpoint resumes with the values it was saved
    with. Where those values differ from what the current version would compute from the same
    dict, a ``UserWarning`` says so; add ``"version": 2`` to a hand-written dict to use the
    current defaults. A version newer than this fastsched's is an error.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"expected a dict with a 'kind' key, got {d!r}")
    kind = d["kind"]
    if kind not in REGISTRY:
        raise ValueError(f"kind must be one of {sorted(REGISTRY)}, got {kind!r}")
    version = d.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"this {kind!r} schedule was saved in format version {version}; this "
                         f"fastsched reads versions up to {FORMAT_VERSION} (upgrade fastsched)")
    cls = REGISTRY[kind]
    fields = {k: v for k, v in d.items() if k not in ("kind", "version")}
    filled = {}
    for v in range(version, FORMAT_VERSION):
        for name, value in cls.legacy_defaults.get(v, {}).items():
            if name not in fields and name not in filled:
                filled[name] = value
    sched = cls._from_fields({**fields, **filled})
    if filled:
        _warn_if_legacy_matters(cls, sched, fields, filled, version)
    return sched


def _warn_if_legacy_matters(cls, sched: Schedule, fields: dict, filled: dict,
                            version: int) -> None:
    """Warn when today's defaults would give ``fields`` a different schedule than ``sched``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            current = cls._from_fields(fields)
            same = current.segments() == sched.segments()
        except ValueError:
            same = False
    if same:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    then = ", ".join(f"{k}={v!r}" for k, v in filled.items())
    now = ", ".join(f"{k}={defaults.get(k)!r}" for k in filled)
    warnings.warn(
        f"{cls.kind!r} schedule dict without 'version' >= 2 (saved by an older fastsched, format "
        f"version {version}): it resumes with the values it was saved with ({then}); the current "
        f"defaults ({now}) would change the schedule. Add \"version\": {FORMAT_VERSION} to the "
        "dict to use the current defaults, or save the schedule again to keep these values "
        "without this warning.", UserWarning, stacklevel=3)
