"""Fused drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``.

Layout: :mod:`._base` (torch's face: groups, validation, options, state dicts, clock,
schedule), :mod:`._tables` (the table builder), :mod:`.functional` (one functional step per
optimizer kind, every backend behind it), :mod:`._reference` (the PyTorch executor and oracle),
:mod:`._stats` (the one statistics view); the kernels and the table layout live in
``fastsched.kernels``.
"""

from . import functional
from ._base import BACKENDS, FusedOptimizer
from ._hostext import status as host_helper_status
from ._tables import UNIT_CLASSES
from .adam import Adam, AdamW
from .functional import StepOptions
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "FusedOptimizer", "BACKENDS", "StepOptions", "functional",
           "UNIT_CLASSES", "host_helper_status"]
