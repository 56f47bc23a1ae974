"""Tools that build, predict or choose learning-rate schedules.

* :func:`refine`: a schedule refined from the gradient norms of a previous run (Defazio et al.,
  arXiv 2310.07831), as a :class:`~fastsched.schedules.Table` the optimizers evaluate on the
  device;
* :mod:`~fastsched.tools.lawfit`: fit the scaling law with learning-rate annealing (Tissue et
  al., arXiv 2408.11029) to loss curves, predict the loss curve of any schedule, rank candidates;
* :class:`AutoLRS`: learning rates chosen online by Bayesian optimisation over short trials
  (Jin et al., ICLR 2021, arXiv 2105.10762), driving an optimizer through its group ``lr``;
* :mod:`~fastsched.tools.cli`: the ``refine`` and ``lawfit`` subcommands of the ``fastsched``
  command;
* :mod:`~fastsched.tools.toy`: a tiny synthetic training task for the examples and tests.
"""

from . import lawfit
from ._autolrs import AutoLRS, Checkpoint, GaussianProcess, Stage, denoise, exp_forecast
from ._refine import (
    closed_form_schedule,
    median_filter,
    plot_refined,
    refine,
    refine_curve,
    simplify,
)

__all__ = ["refine", "refine_curve", "closed_form_schedule", "median_filter", "simplify",
           "plot_refined", "lawfit", "AutoLRS", "Checkpoint", "GaussianProcess", "Stage",
           "exp_forecast", "denoise"]
