"""fastsched: fused Triton optimizer steps with on-device learning-rate schedules."""

from . import schedules

__version__ = "0.1.0"
__all__ = ["schedules", "__version__"]
