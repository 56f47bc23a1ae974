"""Fused drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``."""

from ._base import BACKENDS, FusedOptimizer
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "FusedOptimizer", "BACKENDS"]
