"""The ``fastsched`` command: ``bench``, ``profile``, ``demo``, ``refine`` and ``lawfit``.

``fastsched <command> [options]`` is the way to start every command (``python -m fastsched`` runs
the same program where the console script is not on ``PATH``); ``fastsched <command> --help``
lists the shape sets, configurations, contenders and schedule kinds from their registries.

Every subcommand follows one convention, through the parser class and the argument types defined
here (``fastsched.tools.cli`` registers ``refine`` and ``lawfit`` with them): bad input ends with
one line on stderr, ``fastsched <command>: error: argument NAME: what was wrong; what is
expected``, and exit status 2 (``SystemExit(2)``, no traceback). A command that ran and failed
returns 1.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

__all__ = ["main", "build_parser", "Parser", "fail", "positive_float", "int_at_least",
           "positive_int", "fraction", "one_of", "list_of", "directory", "described",
           "name_subcommands"]


# -- the convention: one parser class, one way to fail ------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Formatter(argparse.HelpFormatter):
    """Descriptions are wrapped; a text of several lines (the generated lists) is kept as is;
    names such as torch-fused-graph are not split at their hyphens."""

    def _split_lines(self, text, width):
        return textwrap.wrap(_one_line(text), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return textwrap.fill(_one_line(text), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exits with status 2; its
    subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {_one_line(message)}\n")
        sys.exit(2)


def fail(prog: str, arg: str, message: str) -> NoReturn:
    """Bad input found after parsing: one line naming ``arg``, then ``SystemExit(2)``."""
    sys.stderr.write(f"{prog}: error: argument {arg}: {_one_line(message)}\n")
    raise SystemExit(2)


def name_subcommands(subparsers) -> None:
    """Name the registered subcommands in usage and in the 'required'/'invalid choice' errors."""
    subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"


# -- argument types: each raises ArgumentTypeError saying what is expected ---------------------

def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_float(text: str) -> float:
    v = _number(text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    v = _number(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int = int_at_least(1)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, duplicates dropped (``"1,2"``)."""
    out = []
    for item in text.split(","):
        v = positive_int(item.strip())
        if v not in out:
            out.append(v)
    return out


positive_ints.__name__ = "comma-separated integers >= 1"


def one_of(choices: Iterable[str], what: str,
           aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    """One name out of ``choices`` (``aliases`` map other spellings onto them)."""
    choices = list(choices)
    aliases = aliases or {}

    def parse(text: str) -> str:
        name = aliases.get(text.strip(), text.strip())
        if name not in choices:
            if "," in text:
                raise argparse.ArgumentTypeError(f"expected one {what}, got {text!r}; one of "
                                                 f"{', '.join(choices)}")
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; expected one of "
                                             f"{', '.join(choices)}")
        return name
    parse.__name__ = what
    return parse


def list_of(choices: Iterable[str], what: str, aliases: dict[str, str] | None = None,
            everything: str | None = None) -> Callable[[str], list[str]]:
    """A comma-separated list of names out of ``choices``, duplicates dropped; ``everything``
    (e.g. ``"all"``) stands for all of them."""
    choices = list(choices)
    aliases = aliases or {}
    expected = f"a comma-separated list of {', '.join(choices)}" + (
        f" (or {everything})" if everything else "")

    def parse(text: str) -> list[str]:
        items = [aliases.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
        if everything is not None and items == [everything]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r}; expected {expected}")
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} in {text!r}; expected {expected}")
        return list(dict.fromkeys(items))
    parse.__name__ = what
    return parse


def directory(text: str) -> Path:
    """An output directory: created when needed, so it must not be an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a directory (created "
                                         "when missing)")
    return path


def described(title: str, entries: Iterable[tuple[str, str]], width: int | None = None) -> str:
    """A help-text section: ``title``, then one wrapped paragraph per ``(name, text)`` (as wide
    as argparse's own help by default)."""
    entries = list(entries)
    if width is None:
        width = max(60, min(100, shutil.get_terminal_size().columns - 2))
    pad = max(len(n) for n, _ in entries) + 2
    lines = textwrap.wrap(title, width, break_on_hyphens=False)
    for name, text in entries:
        lines += textwrap.wrap(_one_line(text), width, initial_indent=f"  {name:<{pad}}",
                               subsequent_indent=" " * (pad + 2), break_on_hyphens=False)
    return "\n".join(lines)


def _device(text: str) -> str:
    import torch

    if text not in ("cpu", "cuda") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} requested but no CUDA device is available; "
                                         "expected cpu")
    return text


def _shapes(text: str):
    from .bench.shapes import ShapeError, parse_shapes

    try:
        return parse_shapes(text)
    except ShapeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_spec(text: str) -> str:
    mod, sep, attr = text.partition(":")
    if not sep or not mod or not attr:
        raise argparse.ArgumentTypeError(
            f"expected module:callable returning (model, loss_fn) or an iterable of "
            f"parameters, got {text!r}")
    return text


# -- help generated from the registries ---------------------------------------------------------

def _registries_help(sets_flag: str, configs_flag: str, contenders_flag: str) -> str:
    """The shape sets, configurations and contenders as the benchmark defines them."""
    from .bench.contenders import CONFIGS, CONTENDERS, DEFAULT_CONFIGS, contenders_for
    from .bench.shapes import SHAPE_SETS

    runs_in = {k: [c for c in CONFIGS if k in {x.key for x in contenders_for(c)}]
               for k in CONTENDERS}
    return "\n\n".join((
        described(f"shape sets ({sets_flag}; full size, before --scale):", (
            (s.name, f"{s.tensors:,} tensors, {s.params:,} parameters. {s.description}")
            for s in SHAPE_SETS.values())),
        described(f"configurations ({configs_flag}; the benchmark's default: "
                  f"{', '.join(DEFAULT_CONFIGS)}):", (
            (c.key, f"{c.title}. {c.description}. " + _bytes_help(c)) for c in CONFIGS.values())),
        described(f"contenders ({contenders_flag}):", (
            (c.key, c.description + (f" (configurations: {', '.join(runs_in[c.key])})"
                                     if runs_in[c.key] else "")) for c in CONTENDERS.values())),
    ))


def _bytes_help(c) -> str:
    import torch

    from .bench.harness import DTYPES
    from .bench.report import fmt_bpp

    if c.storage is None:
        return f"Bytes: {c.elements} elements per parameter ({c.bytes_note})"
    runs = [d for d in DTYPES if c.allows(d)]
    per = ", ".join(f"{d} {fmt_bpp(c.bytes_per_param(DTYPES[d]))} B moved, "
                    f"{fmt_bpp(c.state_bytes_per_param(DTYPES[d]))} B held" for d in runs)
    note = c.note_for(DTYPES[runs[0]] if runs else torch.float32)
    return f"Bytes: {c.elements} elements per parameter, each of its own size ({note}): {per}"


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .bench.contenders import CONFIGS, CONTENDERS, DEFAULT_CONFIGS
    from .bench.harness import (
        _DTYPE_ALIASES,
        CPU_DEFAULT_CONFIGS,
        CPU_DEFAULT_SCALE,
        CPU_DEFAULT_SETS,
        DTYPES,
        LOWP_CONFIGS,
    )
    from .bench.shapes import SHAPE_SETS
    from .tools.cli import add_subcommands as add_tool_subcommands

    sets, configs = ", ".join(SHAPE_SETS), ", ".join(CONFIGS)
    dtypes = ", ".join(DTYPES)
    p = Parser(prog="fastsched", description="fastsched: fused optimizer steps with on-device "
               "learning-rate schedules. 'fastsched COMMAND --help' describes each command.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time fastsched against torch's optimizers",
                       description="Time every contender of every configuration on the shape "
                       "sets, report GB/s against the copy bandwidth measured in the same run, "
                       "and write JSON, Markdown and a bar chart under --out. Without arguments: "
                       "the full shape sets on a GPU, a scaled run on the CPU.",
                       epilog=_registries_help("--sets", "--configs", "--contenders"))
    b.add_argument("--sets", type=list_of(SHAPE_SETS, "shape set", everything="all"),
                   default=None, metavar="NAMES",
                   help=f"comma-separated shape sets: {sets} or all (default: all on a GPU, "
                   f"{','.join(CPU_DEFAULT_SETS)} on the CPU; none with --shapes)")
    b.add_argument("--shapes", type=_shapes, default=None, metavar="LIST",
                   help='a shape set of your own, e.g. "1024x1024,4096,3x3"')
    b.add_argument("--dtypes", type=list_of(DTYPES, "dtype", _DTYPE_ALIASES), default=None,
                   metavar="LIST", help=f"comma-separated: {dtypes} (default: fp32,bf16)")
    b.add_argument("--configs", type=list_of(CONFIGS, "configuration"), default=None,
                   metavar="LIST", help=f"comma-separated configurations: {configs} (default: "
                   f"{','.join(DEFAULT_CONFIGS)} on a GPU, {','.join(CPU_DEFAULT_CONFIGS)} on "
                   "the CPU)")
    b.add_argument("--contenders", type=list_of(CONTENDERS, "contender"), default=None,
                   metavar="LIST", help=f"only these contenders: {', '.join(CONTENDERS)} "
                   "(default: every one that runs the configuration)")
    b.add_argument("--lowp", action="store_true",
                   help=f"the configurations below fp32 ({','.join(LOWP_CONFIGS)}; --configs "
                   "picks among them), each with torch's fused fp32 AdamW timed in the same "
                   "rounds (the 'vs fp32 AdamW' ratio) and the torch, torchao and bitsandbytes "
                   "optimizers that do the same job where they are installed; a configuration "
                   "runs in the dtypes it is for (bf16 + master: bf16, fp16; stochastic "
                   "rounding: bf16)")
    b.add_argument("--scale", type=positive_float, default=None,
                   help="multiply every tensor's element count (tensor count kept, >= 1 "
                   f"element); default 1 on a GPU, {CPU_DEFAULT_SCALE:g} on the CPU")
    b.add_argument("--quick", action="store_true",
                   help="fewer timed steps per contender and a smaller compile budget")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: on a GPU yes, on the CPU no)")
    b.add_argument("--compile-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="skip further torch.compile contenders once their compile time would "
                   "exceed this total (default 150; 60 with --quick)")
    b.add_argument("--compile-max-tensors", type=positive_int, default=512, metavar="N",
                   help="skip torch.compile for shape sets with more tensors (default 512)")
    b.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="start no new contender after this many seconds (the rest is recorded "
                   "as skipped)")
    b.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    b.add_argument("--out", type=directory, default=Path("bench/results"), metavar="DIR",
                   help="where results are written (default bench/results)")
    b.add_argument("--no-save", action="store_true", help="print only, write no files")
    b.add_argument("--no-plot", action="store_true", help="no PNG chart")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--copy-mib", type=positive_int, default=None, metavar="MIB",
                   help="size of the copy that measures the bandwidth ceiling "
                   "(default 1024 on a GPU, 64 on the CPU)")
    b.add_argument("--threads", type=positive_ints, default=None, metavar="N[,N...]",
                   help="torch CPU thread counts, each a run of its own (default: 1 and 2 on "
                   "the CPU, at most the number of cores; unchanged on a GPU)")
    b.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                   help="seed of the parameters and gradients (default 0)")
    b.add_argument("--readme", type=Path, default=None, metavar="RESULTS.json",
                   help="print the README performance section generated from a results file")
    b.add_argument("--report", type=Path, default=None, metavar="RESULTS.json",
                   help="print the tables of a results file and rewrite its .md and .png")
    b.add_argument("--table", type=Path, default=None, metavar="RESULTS.json",
                   help="print the Markdown table of bytes per parameter below fp32 (moved per "
                   "step, held as state: formula and measured) from a results file of a --lowp "
                   "run, for the README")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser("profile", help="profile N optimizer steps under torch.profiler",
                        description="Run N steps of one contender under torch.profiler: "
                        "per-kernel time, launches and host synchronisations per step, GB/s "
                        "against the copy bandwidth; writes a Chrome trace under --out.",
                        epilog=_registries_help("--set", "--config", "--contender"))
    what = pr.add_mutually_exclusive_group()
    what.add_argument("--set", type=one_of(SHAPE_SETS, "shape set"), default=None,
                      metavar="NAME", help=f"shape set: {sets} (default gpt2)")
    what.add_argument("--shapes", type=_shapes, default=None, metavar="LIST",
                      help='a shape set of your own, e.g. "1024x1024,4096,3x3"')
    what.add_argument("--model", type=_model_spec, default=None, metavar="MODULE:CALLABLE",
                      help="a callable returning (model, loss_fn) (loss_fn(model) -> scalar "
                      "loss) or an iterable of parameters")
    pr.add_argument("--dtype", type=one_of(DTYPES, "dtype", _DTYPE_ALIASES), default="fp32",
                    help=f"{dtypes} (default fp32)")
    pr.add_argument("--config", type=one_of(CONFIGS, "configuration"), default="adamw",
                    help=f"{configs} (default adamw)")
    pr.add_argument("--contender", type=one_of(CONTENDERS, "contender"), default="fastsched",
                    help=f"{', '.join(CONTENDERS)} (default fastsched)")
    pr.add_argument("--steps", type=positive_int, default=10, metavar="N",
                    help="profiled steps (default 10)")
    pr.add_argument("--warmup", type=int_at_least(0), default=3, metavar="N",
                    help="steps before profiling (default 3)")
    pr.add_argument("--scale", type=positive_float, default=None,
                    help=f"as for bench (default 1 on a GPU, {CPU_DEFAULT_SCALE:g} on the CPU)")
    pr.add_argument("--device", type=_device, default=None,
                    help="cpu, cuda or cuda:N (default: cuda when available)")
    pr.add_argument("--threads", type=positive_int, default=None, metavar="N",
                    help="torch CPU threads (default: 1 on the CPU, unchanged on a GPU)")
    pr.add_argument("--top", type=int_at_least(0), default=15, metavar="N",
                    help="kernels listed (default 15; 0: all)")
    pr.add_argument("--out", type=directory, default=Path("bench/results"), metavar="DIR",
                    help="where the summary and the trace are written (default bench/results)")
    pr.add_argument("--no-save", action="store_true", help="print only, write no files")
    pr.set_defaults(func=_cmd_profile)

    d = sub.add_parser("demo", help="run the demo and write its outputs",
                       description="Plot the main schedules into DIR/schedules.png and train a "
                       "small model with AdamW and a WSD schedule (fastsched.demo.main).")
    d.add_argument("--out", type=directory, default=Path("demo_out"), metavar="DIR",
                   help="where the plot is written (default demo_out)")
    d.set_defaults(func=_cmd_demo)
    add_tool_subcommands(sub)  # refine, lawfit
    name_subcommands(sub)
    return p


# -- commands -----------------------------------------------------------------------------------

def _load(prog: str, flag: str, path: Path):
    from .bench.harness import load_results

    try:
        return load_results(path)
    except (OSError, ValueError) as e:
        fail(prog, flag, f"cannot read {path} ({type(e).__name__}: {e}); expected a results "
                         "JSON written by fastsched bench")


def _cmd_bench(args, argv) -> int:
    prog = "fastsched bench"
    if args.readme is not None:
        res = _load(prog, "--readme", args.readme)
        from .bench.report import render_readme

        png = args.readme.with_suffix(".png")
        sys.stdout.write(render_readme(res, source=str(args.readme),
                                       image=str(png) if png.exists() else None))
        return 0
    if args.table is not None:
        res = _load(prog, "--table", args.table)
        from .bench.report import render_bytes_table

        if not any(c.get("storage") for k, c in res["configs"].items()
                   if k in res["meta"]["configs"]):
            fail(prog, "--table", f"{args.table} has no configuration below fp32; run "
                 "`fastsched bench --lowp` first")
        sys.stdout.write(render_bytes_table(res))
        return 0
    if args.report is not None:
        res = _load(prog, "--report", args.report)
        from .bench.harness import save_results
        from .bench.report import print_table

        print_table(res)
        paths = save_results(res, args.report.parent, plot=not args.no_plot)
        print("\n".join(f"wrote {p}" for p in paths.values()))
        return 0
    from .bench.harness import (
        LOWP_CONFIGS,
        BenchOptions,
        check_dtypes,
        run_bench,
        save_json,
        save_results,
    )
    from .bench.report import print_table

    # None: the device's default sets and configurations (the CPU runs fewer)
    sets = args.sets if args.sets is not None else ([] if args.shapes is not None else None)
    configs = args.configs
    if args.lowp:
        if configs is not None and (bad := [c for c in configs if c not in LOWP_CONFIGS]):
            fail(prog, "--configs", f"{', '.join(bad)} is not below fp32; with --lowp choose "
                 f"among {', '.join(LOWP_CONFIGS)}")
        configs = configs or list(LOWP_CONFIGS)
    if configs is not None:
        try:
            check_dtypes(configs, args.dtypes or ["fp32", "bf16"])
        except ValueError as e:
            fail(prog, "--dtypes", str(e))
    opts = BenchOptions(sets=sets, custom=args.shapes, dtypes=args.dtypes, configs=configs,
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
                          steps=args.steps, warmup=args.warmup, scale=args.scale,
                          device=args.device, out=None if args.no_save else args.out,
                          top=args.top, threads=args.threads, argv=["fastsched", *argv])
    try:
        res = run_profile(opts)
    except ModelSpecError as e:
        fail("fastsched profile", "--model", str(e))
    except Exception as e:  # noqa: BLE001 - the contender itself failed: say so in one line
        from .bench.contenders import Skipped, Unavailable

        kind = ("not available" if isinstance(e, Unavailable | Skipped)
                else type(e).__name__)
        sys.stderr.write(f"fastsched profile: {args.contender} ({args.config}) {kind}: "
                         f"{_one_line(e)}\n")
        return 1
    print_profile(res)
    return 0


def _cmd_demo(args, argv) -> int:
    try:
        from . import demo
    except ImportError as e:
        sys.stderr.write(f"fastsched demo: not available in this installation ({e})\n")
        return 1
    try:
        rc = demo.main(args.out)
    except OSError as e:
        fail("fastsched demo", "--out", f"cannot write under {args.out} ({type(e).__name__}: "
                                        f"{e})")
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fastsched`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status of a
    command that ran (0, or 1 when it failed), raises ``SystemExit(2)`` on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return args.func(args, argv)
