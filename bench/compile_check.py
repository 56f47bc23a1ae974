"""Compile every Triton kernel for a GPU target without a GPU (front end to PTX/cubin).

Catches what the interpreter never sees (non-constexpr globals, type errors in compiled
control flow, unsupported ops), e.g. ``python bench/compile_check.py --arch 90``. Run without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastsched.kernels import optim as ko  # noqa: E402
from fastsched.kernels import schedule as ks  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _compile(fn, signature, constexprs, target):
    missing = [n for n in fn.arg_names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"no type given for {missing}")
    sig = {n: "constexpr" if n in constexprs else signature[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v
                                                      for k, v in constexprs.items()})
    return triton.compile(src, target=target)


def cases():
    dt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    yield ks._schedule_eval_kernel, {"seg_ptr": "*fp64", "n_seg": "i32", "steps_ptr": "*i64",
                                     "out_ptr": "*fp64", "n_steps": "i32"}, \
        {"BLOCK": 256, "SEG_BLOCK": 64}
    for kind, stats, clip, guard, scaler, hist in itertools.product(
            (0, 1), (False, True), (False, True), (False, True), (False, True), (False, True)):
        if (clip or guard or hist) and not stats:
            continue
        yield ko._finalize_kernel, {
            "tensors_ptr": "*i64", "groups_ptr": "*fp64", "scal_ptr": "*fp32",
            "sched_ptr": "*fp64", "n_seg": "i32", "clock_ptr": "*i64", "n_tensors": "i32",
            "cfg_ptr": "*fp64", "tstat_ptr": "*fp64", "ustat_ptr": "*fp32", "gstat_ptr": "*fp64",
            "lr_out_ptr": "*fp64", "n_groups": "i32", "hist_ptr": "*fp64",
            "hist_pos_ptr": "*i64", "hist_len": "i32",
            "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}, {
            "KIND": kind, "STATS": stats, "CLIP": clip, "GUARD": guard, "SCALER": scaler,
            "HISTORY": hist, "BLOCK_T": 128, "SEG_BLOCK": 64}
    for dtype in dt.values():
        for aligned, mask_bad in itertools.product((False, True), (False, True)):
            yield ko._grad_stats_kernel, {"tensors_ptr": "*i64", "blocks_ptr": "*i64",
                                          "part_ptr": "*fp32"}, {
                "DTYPE": dtype, "BLOCK": 2048, "ALIGNED": aligned, "MASK_BAD": mask_bad}
        for kind, aligned, flag, stats in itertools.product((0, 1), (False, True), (False, True),
                                                            (False, True)):
            yield ko._update_kernel, {"tensors_ptr": "*i64", "blocks_ptr": "*i64",
                                      "scal_ptr": "*fp32", "ustat_ptr": "*fp32"}, {
                "KIND": kind, "DTYPE": dtype, "BLOCK": 2048, "ALIGNED": aligned, "FLAG": flag,
                "STATS": stats}
            for units, chunk in ((128, 16), (16, 128), (8, 256)):
                yield ko._units_update_kernel, {"tensors_ptr": "*i64", "blocks_ptr": "*i64",
                                                "scal_ptr": "*fp32", "ustat_ptr": "*fp32"}, {
                    "KIND": kind, "DTYPE": dtype, "UNITS": units, "CHUNK": chunk,
                    "FLAG": flag, "STATS": stats}
    yield ko._reduce_kernel, {"first_ptr": "*i64", "part_ptr": "*fp32", "tstat_ptr": "*fp64"}, \
        {"BLOCK_R": 256}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--first", action="store_true", help="stop at the first failure")
    ap.add_argument("--quick", action="store_true",
                    help="one variant of each kernel, the one with the most features on (CI)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    variants = {}
    for fn, sig, cex in cases():
        # --quick keeps the last variant generated for each kernel: every flag on
        key = fn.__name__ if args.quick else (fn.__name__, tuple(sorted(
            (k, str(v)) for k, v in cex.items())))
        variants[key] = (fn, sig, cex)
    failed = 0
    for fn, sig, cex in variants.values():
        try:
            _compile(fn, sig, cex, target)
        except Exception as e:  # report every failing variant, then exit non-zero
            failed += 1
            print(f"FAIL {fn.__name__} {cex}: {type(e).__name__}: {str(e)[:2000]}")
            if args.first:
                break
    print(f"{len(variants) - failed} compiled, {failed} failed (sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
