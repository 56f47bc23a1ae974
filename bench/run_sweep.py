"""Choose where the update runs pipelined, and how, from the compiled code:
``python bench/run_sweep.py [--all] [--jobs 2] [--json FILE]`` (triton 3.6, no GPU; run without
``TRITON_INTERPRET``; 7-15 minutes on 2 cores).

``_update_kernel`` gives each program one block and keeps its loads in registers: the bytes an
SM has in flight are bounded by the registers its threads hold them in, and the 16-bit and
8-bit variants, which convert every element to fp32 working copies, stop at 32-120 KB against
the 128 KB target. ``_run_update_kernel`` gives a program a run of whole blocks of one tensor,
its table row and scalars loaded once, and loops over them with ``tl.range(...,
num_stages=STAGES)``: triton 3.6 then copies the next STAGES - 1 blocks from global to shared
memory with ``cp.async`` (SASS ``LDGSTS``, 16 bytes a thread per instruction) while the current
one is computed, so the bytes in flight live in shared memory (228 KB an SM), not in registers.

For each flat update variant the optimizers launch (``compile_check.variants``; by default those of
``KNOWN_SHORT``'s and ``KNOWN_SHORT_NO_L2``'s keys and of the table ``_RUN_LAUNCH`` in
``kernels/optim.py``, plus fp32 / 16-bit AdamW for comparison; ``--all`` every one) this compiles
``_run_update_kernel`` at a grid of BLOCK x STAGES x num_warps (:data:`GRID`; :data:`DEEP`'s deeper
pipelines for the variants GRID leaves short of 128 KB) and prints the configuration with the most
bytes in flight per SM among those :func:`reject` lets count (no spills, no data load left in
registers, the copies 16-byte ``LDGSTS``): resident programs x (STAGES - 1) x the bytes a block
loads (the shared memory the copies take bounds the programs too), beside ``_update_kernel``'s
figure at its launch tables (compile_check's "iss"). A variant runs pipelined where that holds at
least :data:`GAIN` x the per-block kernel's figure; the table to paste into ``_RUN_LAUNCH`` closes
the output. Nothing runs: the speed of either needs a GPU (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastsched.kernels import layout as L  # noqa: E402
from fastsched.kernels import optim as K  # noqa: E402

from fastsched.optim._tables import DEFAULT_BLOCK, RUN_ELEMENTS  # noqa: E402

_LDGSTS = re.compile(r"\bLDGSTS(\.[A-Z0-9_.]+)?")
_VS: list = []
#: (BLOCK, STAGES, num_warps): the copies in flight take (STAGES - 1) x the block's bytes of
#: shared memory a program (two stages, one block in flight, cannot reach 128 KB in 228);
#: 2 warps and 512-element blocks left out (on a prototype of bf16 AdamW, 27 configurations of
#: 512-2048 elements, 2-4 stages and 2-8 warps: none held more than these; over 114 variants
#: at 4 and 8 warps, 8 was never the best)
GRID = list(itertools.product((1024, 2048), (3, 4), (4,)))
#: deeper pipelines, tried for the variants none of GRID brings to 128 KB: most are held to
#: 2-3 programs an SM by their registers (146-255: 8-bit states, stochastic rounding), and the
#: blocks they copy ahead sit in shared memory, not registers, so more stages hold more with
#: the same programs (bf16 Adam with 8-bit states and stochastic rounding: 72 KB at 4 stages,
#: 168 at 8; 2 programs of 90 KB of shared memory). Only for them: a deeper pipeline takes
#: more shared memory a program and a longer prologue a run, which the GPU has not timed
DEEP = list(itertools.product((1024, 2048), (6, 8), (4,)))
#: a variant runs pipelined where that holds this much more than the per-block kernel: within
#: 10% the per-block kernel stays (the design measured on an H100: 2.99 TB/s, 99.7% of copy,
#: at ~160 KB)
GAIN = 1.1
_TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def base(v) -> dict:
    """The constexprs that define an update variant, whichever kernel launched it."""
    return {k: v.constexprs[k] for k in ("KIND", "DTYPE", "FLAG", "STATS", "SDTYPE", "MODE", "L2")}


def table_key(c: dict) -> tuple:
    """The ``_RUN_LAUNCH`` key of an update variant's constexprs."""
    return (c["KIND"], K._TL_NAMES[c["DTYPE"]], K._TL_NAMES[c["SDTYPE"]], c["MODE"],
            bool(c["FLAG"]), bool(c["STATS"]), bool(c["L2"]))


def _init(every: bool) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import compile_check as cc

    vs, _ = cc.variants(lowp=True)
    vs = [v for v in vs if v.name in ("_update_kernel", "_run_update_kernel")]
    seen, out = set(), []
    for v in vs:
        c = base(v)
        k = table_key(c)
        if k in seen:
            continue
        seen.add(k)
        per_block = ("_update_kernel",) + cc.short_key(v)[1:]
        short = per_block in cc.KNOWN_SHORT or per_block in cc.KNOWN_SHORT_NO_L2
        if every or short or k in K._RUN_LAUNCH or (
                not cc.is_lowp(v) and c["KIND"] == L.KIND_ADAM and not c["FLAG"]
                and not c["L2"]):
            out.append(v)
    _VS[:] = out


def run_variant(v, block: int, stages: int, warps: int):
    """``v`` (either kernel's) as a ``_run_update_kernel`` launch at this configuration."""
    import compile_check as cc

    c = dict(base(v), BLOCK=block, RUN=RUN_ELEMENTS // block, STAGES=stages,
             ALL3=bool(v.constexprs["FLAG"]))
    sig = {n: v.signature.get(n, "i32") for n in ("tensors_ptr", "scal_ptr", "ustat_ptr",
                                                   "clock_ptr", "advance")}
    sig["runs_ptr"] = v.signature.get("runs_ptr", v.signature.get("blocks_ptr"))
    return cc.Variant(**{**v.__dict__, "fn": K._run_update_kernel, "signature": sig,
                         "constexprs": c, "options": dict(v.options, num_warps=warps)})


def block_variant(v):
    """``v`` as the per-block ``_update_kernel`` launch its launch tables give."""
    import compile_check as cc
    import torch

    if v.name == "_update_kernel":
        return v
    c = base(v)
    dt = getattr(torch, _TORCH[K._TL_NAMES[c["DTYPE"]]])
    split, warps = K._launch(K._UPDATE_LAUNCH, K._UPDATE_FALLBACK, c["KIND"], dt,
                             DEFAULT_BLOCK, c["FLAG"], c["SDTYPE"], c["MODE"],
                             None if c["L2"] else K._UPDATE_NO_L2)
    sig = {n: v.signature.get(n, "i32") for n in ("tensors_ptr", "scal_ptr", "ustat_ptr",
                                                   "clock_ptr", "advance")}
    sig["blocks_ptr"] = v.signature["runs_ptr"]
    return cc.Variant(**{**v.__dict__, "fn": K._update_kernel, "signature": sig,
                         "constexprs": dict(c, BLOCK=DEFAULT_BLOCK, SPLIT=split),
                         "options": dict(v.options, num_warps=warps)})


def ldgsts(sass: str) -> dict:
    """Counts of the LDGSTS (cp.async) instructions of a listing by bytes a thread."""
    out: dict = {}
    for m in _LDGSTS.finditer(sass):
        parts = (m.group(1) or "").split(".")
        w = next((int(x) // 8 for x in ("128", "64") if x in parts), 4)
        out[w] = out.get(w, 0) + 1
    return out


def _probe(v, block: int, stages: int, warps: int) -> dict | None:
    import compile_check as cc
    from triton.backends.compiler import GPUTarget

    if v.constexprs["SDTYPE"] == tl.uint8 and block % L.Q_BLOCK:
        return None
    p = run_variant(v, block, stages, warps)
    ck = cc.compile_variant(p, GPUTarget("cuda", 90, 32))
    code = cc.read_code(ck, p)
    with tempfile.TemporaryDirectory() as d:  # (read_code keeps counts, not the listing)
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([cc._bin("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    return dict(cfg=(block, stages, warps), regs=code.regs, spill=code.spill, smem=code.smem,
                programs=code.programs, cp=ldgsts(sass), ldg128=code.ops.get("LDG.128", 0),
                ops=code.ops, inflight=code.inflight)


def reject(r: dict) -> str | None:
    """Why a compiled configuration does not count (None: it does): spills; a 16-byte data
    load left in registers (``LDG.128``: the pipeliner does not reach loads under a runtime
    branch, e.g. the optional state's of the FLAG variants); or cp.async copies mostly
    narrower than 16 bytes (the 8-bit states' per-block scales, 4 bytes, are a few %)."""
    if r["spill"]:
        return f"spills {r['spill']} B"
    if r["ldg128"]:
        return f"LDG.128 x{r['ldg128']} not pipelined"
    total = sum(w * n for w, n in r["cp"].items())
    if not total or r["cp"].get(16, 0) * 16 < 0.9 * total:
        return f"cp.async widths {dict(sorted(r['cp'].items()))}"
    return None


def _one(job: tuple):
    i, block, stages, warps = job
    try:
        return i, _probe(_VS[i], block, stages, warps)
    except Exception as e:  # noqa: BLE001 (a configuration that does not compile is skipped)
        print(f"skipped variant {i} at {(block, stages, warps)}: {type(e).__name__}",
              file=sys.stderr)
        return i, None


def _shipped(i: int) -> int:
    import compile_check as cc
    from triton.backends.compiler import GPUTarget

    v = block_variant(_VS[i])
    return cc.read_code(cc.compile_variant(v, GPUTarget("cuda", 90, 32)), v).inflight


def _pick(res: list, best: dict, why: dict) -> None:
    """Keep per variant the configuration that counts (:func:`reject`) with the most in
    flight, then the fewest registers x warps; why[i]: the first reason one did not count."""
    for i, r in res:
        bad = reject(r) if r is not None else "does not compile"
        if bad:
            why.setdefault(i, bad)
            continue
        if i not in best or (r["inflight"], -r["regs"] * r["cfg"][2]) > (
                best[i]["inflight"], -best[i]["regs"] * best[i]["cfg"][2]):
            best[i] = r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every update variant, not only the short")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="write every configuration's figures here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this compiles the kernels", file=sys.stderr)
        return 2
    import compile_check as cc

    _init(args.all)
    jobs = [(i, *g) for i in range(len(_VS)) for g in GRID]
    print(f"{len(_VS)} update variants x {len(GRID)} configurations (BLOCK, STAGES, warps)",
          flush=True)
    best: dict = {}
    why: dict = {}
    with multiprocessing.get_context("fork").Pool(args.jobs, _init, (args.all,)) as pool:
        res = pool.map(_one, jobs, chunksize=4)
        _pick(res, best, why)
        deep = [i for i in range(len(_VS))
                if best.get(i, {}).get("inflight", 0) < cc.MIN_INFLIGHT]
        print(f"{len(deep)} short of {cc.MIN_INFLIGHT // 1024} KB x {len(DEEP)} deeper "
              "configurations", flush=True)
        more = pool.map(_one, [(i, *g) for i in deep for g in DEEP], chunksize=4)
        _pick(more, best, why)
        res += more
        shipped = pool.map(_shipped, range(len(_VS)))
    reach = picked = 0
    rows, table = [], {}
    print(f"{'variant (kind, dtype, states, mode, flag, stats, l2)':58s} per-block pipelined "
          "BLOCK STAGES warps regs  smem programs")
    for i, v in enumerate(_VS):
        key = table_key(base(v))
        b = best.get(i)
        rows.append(dict(variant=str(key), shipped=shipped[i], best=b, why=why.get(i)))
        held = shipped[i]
        if b is None:
            print(f"{str(key):58s} {shipped[i] // 1024:6d} KB   none: {why.get(i)}")
        else:
            use = b["inflight"] >= GAIN * shipped[i]
            if use:
                table[key] = b["cfg"]
                picked += 1
                held = b["inflight"]
            print(f"{str(key):58s} {shipped[i] // 1024:6d} KB {b['inflight'] // 1024:6d} KB "
                  f"{b['cfg'][0]:5d} {b['cfg'][1]:6d} {b['cfg'][2]:5d} {b['regs']:4d} "
                  f"{b['smem']:5d} {b['programs']:8d}" + ("  <- pipelined" if use else ""))
        reach += held >= cc.MIN_INFLIGHT
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows,
                           all=[dict(variant=i, **r) for i, r in res if r is not None]), f,
                      indent=1, default=str)
    before = sum(s >= cc.MIN_INFLIGHT for s in shipped)
    print(f"at {cc.MIN_INFLIGHT // 1024} KB or more: per-block {before}, with the pipelined "
          f"choice {reach} of {len(_VS)}; {picked} pipelined (triton {triton.__version__}, "
          "sm_90)")
    kinds = {L.KIND_ADAM: "L.KIND_ADAM", L.KIND_SGD: "L.KIND_SGD"}
    print("_RUN_LAUNCH = {\n    " + ",\n    ".join(
        f"({kinds[k[0]]}, {k[1]!r}, {k[2]!r}, {k[3]}, {k[4]}, {k[5]}, {k[6]}): {tuple(c)}"
        for k, c in sorted(table.items())).replace("'", '"') + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
