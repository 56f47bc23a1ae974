"""The ``fastsched`` command: ``bench``, ``profile`` and ``demo``.

Bad arguments end with one line on stderr naming the argument and what it expects, and exit
status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .tools.cli import add_subcommands as add_tool_subcommands

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        sys.exit(2)


def _fail(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    return 2


# -- argument types: each raises ArgumentTypeError with what is expected ------------------------

def _sets(text: str) -> list[str]:
    from .bench.shapes import ShapeError, parse_set_names

    try:
        return parse_set_names(text)
    except ShapeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _set(text: str) -> str:
    names = _sets(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one shape set name, got {text!r}")
    return names[0]


def _shapes(text: str):
    from .bench.shapes import ShapeError, parse_shapes

    try:
        return parse_shapes(text)
    except ShapeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _choices_list(text: str, choices, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"{'unknown ' + what + ' ' + repr(bad[0]) if bad else 'empty list'}; expected a "
            f"comma-separated list of {', '.join(choices)}")
    return list(dict.fromkeys(items))


def _dtypes(text: str) -> list[str]:
    from .bench.harness import _DTYPE_ALIASES, DTYPES

    items = [_DTYPE_ALIASES.get(t.strip(), t.strip()) for t in text.split(",")]
    return _choices_list(",".join(items), list(DTYPES), "dtype")


def _dtype(text: str) -> str:
    items = _dtypes(text)
    if len(items) != 1:
        raise argparse.ArgumentTypeError(f"expected one dtype, got {text!r}")
    return items[0]


def _configs(text: str) -> list[str]:
    from .bench.contenders import CONFIGS

    return _choices_list(text, list(CONFIGS), "configuration")


def _contenders(text: str) -> list[str]:
    from .bench.contenders import CONTENDERS

    return _choices_list(text, list(CONTENDERS), "contender")


def _single(text: str, choices, what: str) -> str:
    if text not in choices:
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; expected one of "
                                         f"{', '.join(choices)}")
    return text


def _config(text: str) -> str:
    from .bench.contenders import CONFIGS

    return _single(text, list(CONFIGS), "configuration")


def _contender(text: str) -> str:
    from .bench.contenders import CONTENDERS

    return _single(text, list(CONTENDERS), "contender")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return v


def _device(text: str) -> str:
    import torch

    if text not in ("cpu", "cuda") and not text.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} requested but no CUDA device is available")
    return text


def _model_spec(text: str) -> str:
    mod, sep, attr = text.partition(":")
    if not sep or not mod or not attr:
        raise argparse.ArgumentTypeError(
            f"expected module:callable returning (model, loss_fn) or an iterable of "
            f"parameters, got {text!r}")
    return text


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastsched", description="fastsched: fused optimizer steps with on-device "
                "learning-rate schedules")
    sub = p.add_subparsers(dest="command", metavar="{bench,profile,demo,refine,lawfit}",
                           parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("bench", help="time fastsched against torch's optimizers",
                       description="Time every contender of every configuration on the shape "
                       "sets, report GB/s against the copy bandwidth measured in the same run, "
                       "and write JSON, Markdown and a bar chart under --out. Without arguments: "
                       "the full shape sets on a GPU, a scaled run on the CPU.")
    b.add_argument("--sets", type=_sets, default=None, metavar="NAMES",
                   help="comma-separated shape sets: gpt2, llama-1b, lora-7b, many-small or all "
                   "(default: all, unless --shapes is given)")
    b.add_argument("--shapes", type=_shapes, default=None, metavar="LIST",
                   help='a shape set of your own, e.g. "1024x1024,4096,3x3"')
    b.add_argument("--dtypes", type=_dtypes, default=None, metavar="LIST",
                   help="comma-separated: fp32, bf16, fp16 (default: fp32,bf16 on a GPU, fp32 "
                   "on the CPU)")
    b.add_argument("--configs", type=_configs, default=None, metavar="LIST",
                   help="comma-separated: adamw, adamw-clip, allora, sgd "
                   "(default: adamw,adamw-clip,allora)")
    b.add_argument("--contenders", type=_contenders, default=None, metavar="LIST",
                   help="only these contenders (torch-forloop, torch-foreach, torch-fused, "
                   "torch-fused-graph, torch-compile, fastsched, fastsched-graph)")
    b.add_argument("--scale", type=_positive_float, default=None,
                   help="multiply every tensor's element count (tensor count kept, >= 1 "
                   "element); default 1 on a GPU, 0.01 on the CPU")
    b.add_argument("--quick", action="store_true",
                   help="fewer timed steps per contender and a smaller compile budget")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: on a GPU yes, on the CPU no)")
    b.add_argument("--compile-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="skip further torch.compile contenders once their compile time would "
                   "exceed this total (default 150; 60 with --quick)")
    b.add_argument("--compile-max-tensors", type=_positive_int, default=512, metavar="N",
                   help="skip torch.compile for shape sets with more tensors (default 512)")
    b.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="start no new contender after this many seconds (the rest is recorded "
                   "as skipped)")
    b.add_argument("--device", type=_device, default=None,
                   help="cpu or cuda (default: cuda when available)")
    b.add_argument("--out", type=Path, default=Path("bench/results"), metavar="DIR",
                   help="where results are written (default bench/results)")
    b.add_argument("--no-save", action="store_true", help="print only, write no files")
    b.add_argument("--no-plot", action="store_true", help="no PNG chart")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--copy-mib", type=_positive_int, default=None, metavar="MIB",
                   help="size of the copy that measures the bandwidth ceiling "
                   "(default 1024 on a GPU, 64 on the CPU)")
    b.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 on the CPU, unchanged on a GPU)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--readme", type=Path, default=None, metavar="RESULTS.json",
                   help="print the README performance section generated from a results file")
    b.add_argument("--report", type=Path, default=None, metavar="RESULTS.json",
                   help="print the tables of a results file and rewrite its .md and .png")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser("profile", help="profile N optimizer steps under torch.profiler",
                        description="Run N steps of one contender under torch.profiler: "
                        "per-kernel time, launches and host synchronisations per step, GB/s "
                        "against the copy bandwidth; writes a Chrome trace under --out.")
    what = pr.add_mutually_exclusive_group()
    what.add_argument("--set", type=_set, default=None, metavar="NAME",
                      help="shape set (default gpt2): gpt2, llama-1b, lora-7b, many-small")
    what.add_argument("--shapes", type=_shapes, default=None, metavar="LIST",
                      help='a shape set of your own, e.g. "1024x1024,4096,3x3"')
    what.add_argument("--model", type=_model_spec, default=None, metavar="MODULE:CALLABLE",
                      help="a callable returning (model, loss_fn) (loss_fn(model) -> scalar "
                      "loss) or an iterable of parameters")
    pr.add_argument("--dtype", type=_dtype, default="fp32", help="fp32, bf16 or fp16")
    pr.add_argument("--config", type=_config, default="adamw",
                    help="adamw, adamw-clip, allora or sgd (default adamw)")
    pr.add_argument("--contender", type=_contender, default="fastsched",
                    help="which implementation (default fastsched)")
    pr.add_argument("--steps", type=_positive_int, default=10, help="profiled steps")
    pr.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    pr.add_argument("--scale", type=_positive_float, default=None,
                    help="as for bench (default 1 on a GPU, 0.01 on the CPU)")
    pr.add_argument("--device", type=_device, default=None)
    pr.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="torch CPU threads (default: 1 on the CPU, unchanged on a GPU)")
    pr.add_argument("--top", type=int, default=15, help="kernels listed (0: all)")
    pr.add_argument("--out", type=Path, default=Path("bench/results"), metavar="DIR")
    pr.add_argument("--no-save", action="store_true", help="print only, write no files")
    pr.set_defaults(func=_cmd_profile)

    d = sub.add_parser("demo", help="run the demo and write its outputs",
                       description="Run fastsched.demo.main(outdir).")
    d.add_argument("--out", type=Path, default=Path("demo_out"), metavar="DIR")
    d.set_defaults(func=_cmd_demo)
    add_tool_subcommands(sub)  # refine, lawfit
    return p


# -- commands -----------------------------------------------------------------------------------

def _load(prog: str, flag: str, path: Path):
    from .bench.harness import load_results

    try:
        return load_results(path)
    except (OSError, ValueError) as e:
        _fail(prog, f"argument {flag}: cannot read {path} ({type(e).__name__}: {e}); expected a "
                    "results JSON written by fastsched bench")
        return None


def _cmd_bench(args, argv) -> int:
    prog = "fastsched bench"
    if args.readme is not None:
        res = _load(prog, "--readme", args.readme)
        if res is None:
            return 2
        from .bench.report import render_readme

        png = args.readme.with_suffix(".png")
        sys.stdout.write(render_readme(res, source=str(args.readme),
                                       image=str(png) if png.exists() else None))
        return 0
    if args.report is not None:
        res = _load(prog, "--report", args.report)
        if res is None:
            return 2
        from .bench.harness import save_results
        from .bench.report import print_table

        print_table(res)
        paths = save_results(res, args.report.parent, plot=not args.no_plot)
        print("\n".join(f"wrote {p}" for p in paths.values()))
        return 0
    from .bench.harness import BenchOptions, run_bench, save_json, save_results
    from .bench.report import print_table
    from .bench.shapes import SHAPE_SETS

    sets = args.sets if args.sets is not None else ([] if args.shapes is not None
                                                    else list(SHAPE_SETS))
    opts = BenchOptions(sets=sets, custom=args.shapes,
                        dtypes=args.dtypes,
                        configs=args.configs or ["adamw", "adamw-clip", "allora"],
                        contenders=args.contenders, scale=args.scale, quick=args.quick,
                        compile=args.compile, compile_budget_s=args.compile_budget,
                        compile_max_tensors=args.compile_max_tensors, device=args.device,
                        out=None if args.no_save else args.out, plot=not args.no_plot,
                        progress=not args.no_progress, seed=args.seed, copy_mib=args.copy_mib,
                        threads=args.threads, time_limit_s=args.time_limit,
                        argv=["fastsched", *argv])
    # the JSON is rewritten after every shape set and dtype: a run cut short leaves its data
    results = run_bench(opts, on_group=None if opts.out is None else
                        (lambda res: save_json(res, opts.out)))
    print_table(results)
    if opts.out is not None:
        paths = save_results(results, opts.out, plot=opts.plot)
        if opts.plot and "png" not in paths:
            print("no PNG: matplotlib is not installed (fastsched bench --report FILE draws it "
                  "later)")
        print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _cmd_profile(args, argv) -> int:
    from .bench.profile import ModelSpecError, ProfileOptions, print_profile, run_profile

    opts = ProfileOptions(set=args.set or "gpt2", custom=args.shapes, model=args.model,
                          dtype=args.dtype, config=args.config, contender=args.contender,
                          steps=args.steps, warmup=max(0, args.warmup), scale=args.scale,
                          device=args.device, out=None if args.no_save else args.out,
                          top=max(0, args.top), threads=args.threads,
                          argv=["fastsched", *argv])
    try:
        res = run_profile(opts)
    except ModelSpecError as e:
        return _fail("fastsched profile", f"argument --model: {e}")
    except Exception as e:  # noqa: BLE001 - the contender itself failed: say so in one line
        from .bench.contenders import Skipped, Unavailable

        kind = ("not available" if isinstance(e, Unavailable | Skipped)
                else type(e).__name__)
        sys.stderr.write(f"fastsched profile: {args.contender} ({args.config}) {kind}: "
                         f"{' '.join(str(e).split())}\n")
        return 1
    print_profile(res)
    return 0


def _cmd_demo(args, argv) -> int:
    try:
        from . import demo
    except ImportError as e:
        sys.stderr.write(f"fastsched demo: not available in this installation ({e})\n")
        return 1
    rc = demo.main(args.out)
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return args.func(args, argv)
