"""fastsched: fused Triton optimizer steps with on-device learning-rate schedules."""

from . import schedules
from .integrations import ScheduleAdapter, unwrap
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"
__all__ = ["schedules", "Adam", "AdamW", "SGD", "ScheduleAdapter", "unwrap", "__version__"]
