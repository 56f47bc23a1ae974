"""Benchmark and profiling harness: fastsched against torch's optimizers, side by side.

``fastsched bench`` times every contender of every configuration on real models' parameter
shapes and reports GB/s against the copy bandwidth measured in the same run; ``fastsched
profile`` runs steps under torch.profiler. Their ``--help`` lists the shape sets
(:data:`SHAPE_SETS`), configurations (:data:`CONFIGS`) and contenders (:data:`CONTENDERS`).
"""

from .contenders import CONFIGS, CONTENDERS, contenders_for
from .harness import BenchOptions, derive, load_results, run_bench, save_results
from .profile import ProfileOptions, run_profile
from .report import plot_results, print_table, render_markdown, render_readme
from .shapes import SHAPE_SETS, ShapeSet, parse_shapes, scale_shape

__all__ = [
    "BenchOptions", "run_bench", "derive", "save_results", "load_results", "ProfileOptions",
    "run_profile", "render_markdown", "render_readme", "print_table", "plot_results",
    "SHAPE_SETS", "ShapeSet", "parse_shapes", "scale_shape", "CONFIGS", "CONTENDERS",
    "contenders_for",
]
