"""Learning-rate schedules that evaluate identically on the host, in torch and in Triton.

A schedule maps a 0-based integer step to a multiplier of the optimizer's base learning rate.
Every schedule compiles to a short table of segments (``Schedule.table()``); the same table is
evaluated by the host (``sched(t)``), by vectorised torch (``sched.evaluate(steps)``) and by the
``@triton.jit`` device function ``fastsched.kernels.schedule.schedule_value`` from a step counter
held in device memory. Steps past the end hold the final value; negative steps are an error.
"""

from ._base import FORMAT_VERSION, REGISTRY, Schedule, from_dict
from ._core import COLUMNS, Segment, Shape, evaluate_table, segments_to_table
from ._named import (
    DECAY_SHAPES,
    REX,
    WARMUP_SHAPES,
    WSD,
    Constant,
    Cosine,
    CosineRestarts,
    Exponential,
    Infinite,
    InverseSqrt,
    Join,
    LinearDecay,
    LinearWarmup,
    MultiStep,
    OneCycle,
    Polynomial,
    Power,
    Rewarm,
    Scaled,
    StepDecay,
    Table,
)
from ._plot import plot
from ._torch import ScheduleLR

__all__ = [
    "Schedule", "from_dict", "FORMAT_VERSION", "REGISTRY", "Segment", "Shape", "COLUMNS",
    "evaluate_table", "segments_to_table", "Constant", "LinearWarmup", "Cosine", "CosineRestarts",
    "LinearDecay", "Polynomial", "StepDecay", "MultiStep", "Exponential", "InverseSqrt",
    "OneCycle", "WSD", "REX", "Power", "Infinite", "Rewarm", "Table", "Join", "Scaled",
    "DECAY_SHAPES", "WARMUP_SHAPES", "plot", "ScheduleLR",
]
