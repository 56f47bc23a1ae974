"""What a software-pipelined update would hold in flight on an H100, from its compiled code:
``python bench/pipeline_probe.py [--all] [--jobs 2] [--json FILE]`` (triton 3.6, no GPU; run
without ``TRITON_INTERPRET``; ~18 minutes on 2 cores).

The shipped ``_update_kernel`` gives each program one block and keeps its loads in registers:
the bytes an SM has in flight are bounded by the registers its threads hold them in, and the
16-bit and 8-bit variants, which convert every element to fp32 working copies, stop at 32-120 KB
(``KNOWN_SHORT`` in bench/compile_check.py) against the 128 KB target. A program that owns a
run of whole blocks of one tensor, its table row and scalars loaded once, can loop over them
with ``tl.range(..., num_stages=STAGES)``: triton 3.6 then copies the next STAGES - 1 blocks
from global to shared memory with ``cp.async`` (SASS ``LDGSTS``; 16 bytes a thread per
instruction where the block allows) while the current one is computed, so the bytes in flight
live in shared memory (228 KB an SM), not in registers. (With the table loads left inside the
loop, one block per iteration as today, the pipeliner copies the table values through shared
memory too and the registers rose to 93-255: measured on a prototype of bf16 AdamW.)

This compiles, for each update variant the optimizers launch (``compile_check.variants``; by
default the keys of ``KNOWN_SHORT`` and fp32 / 16-bit AdamW for comparison; ``--all`` every one),
such a loop around the shipped arithmetic (``kernels.optim._apply``, full aligned blocks) at a
grid of BLOCK x STAGES x num_warps, and prints per variant the configuration with the most
bytes in flight per SM among those :func:`reject` lets count (no spills, no data load left in
registers, the copies 16-byte ``LDGSTS``): resident programs x (STAGES - 1) x the bytes a block
loads (the shared memory the copies take bounds the programs too), beside the shipped
kernel's figure (its SASS: 16-byte loads issued and not yet used x threads). Nothing runs: the
speed of either needs a GPU (``bench/gpu_check.sh``). The probe kernel is not launched by the
optimizers; the partial last block and unaligned tensors would keep the shipped masked path.
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


@triton.jit
def _pipe_kernel(tensors_ptr, runs_ptr, scal_ptr, ustat_ptr, n_full,
                 KIND: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 FLAG: tl.constexpr, STATS: tl.constexpr, SDTYPE: tl.constexpr,
                 MODE: tl.constexpr, L2: tl.constexpr, STAGES: tl.constexpr):
    """``n_full`` full aligned blocks of one tensor per program, from the element ``runs[pid]``
    on: the full-block path of ``_update_kernel`` (same loads, arithmetic and stores) in a
    loop the compiler pipelines STAGES deep. FLAG: every tensor of the launch has the
    optional state (amsgrad's ``max_exp_avg_sq``, SGD's momentum buffer), so that its load is
    not under the runtime branch ``has3`` of the shipped kernel, whose loads the pipeliner
    leaves in registers (``LDG.128`` in the loop: measured); a design that takes it would
    launch tensors without the state apart (groups with and without momentum: one launch
    more)."""
    pid = tl.program_id(0)
    tidx = tl.load(runs_ptr + pid * L.B_COLS + L.B_TENSOR)
    start = tl.multiple_of(tl.load(runs_ptr + pid * L.B_COLS + L.B_START), BLOCK)
    row = tensors_ptr + tidx * L.T_COLS
    pa = tl.load(row + L.T_P)
    ga = tl.load(row + L.T_G)
    s1 = tl.load(row + L.T_S1)
    s2 = tl.load(row + L.T_S2)
    s3 = tl.load(row + L.T_S3)
    has3 = (s3 if KIND == L.KIND_ADAM else s1) != 0
    if FLAG:  # every row of the launch has the optional state: its load out of the branch
        has3 = True
    grad_mul, c0, c1, c2, c3, c4, c5, c6, c7 = K._scalars(scal_ptr, tidx, KIND, STATS)
    wa = pa
    if (MODE & L.MODE_MASTER) != 0:
        wa = tl.load(row + L.T_MASTER)
    q1 = pa
    q2 = pa
    if SDTYPE == tl.uint8:
        q1 = tl.load(row + L.T_Q1)
        q2 = tl.load(row + L.T_Q2)
    sr_c, elem0 = K._sr_prologue(row, MODE)
    fp = K._typed(pa, DTYPE, True)
    fg = K._typed(ga, DTYPE, True)
    f1 = K._typed(s1, SDTYPE, True)
    f2 = K._typed(s2, SDTYPE, True)
    f3 = K._typed(s3, SDTYPE, True)
    fw = K._typed(wa, tl.float32, True)
    fq1 = K._typed(q1, tl.float32, False)
    fq2 = K._typed(q2, tl.float32, False)
    psq = tl.zeros([], dtype=tl.float32)
    usq = tl.zeros([], dtype=tl.float32)
    for k in tl.range(0, n_full, num_stages=STAGES):
        b0 = start + k * BLOCK
        if SDTYPE == tl.uint8:
            qrow = tl.arange(0, BLOCK // L.Q_BLOCK)
            offs = b0 + qrow[:, None] * L.Q_BLOCK + tl.arange(0, L.Q_BLOCK)[None, :]
            qoffs = b0 // L.Q_BLOCK + qrow
        else:
            offs = b0 + tl.arange(0, BLOCK)
            qoffs = offs
        a, b = K._apply(fp, fg, f1, f2, f3, has3, offs, offs, 1.0, 1.0, grad_mul, c0, c1, c2,
                        c3, c4, c5, c6, c7, fw, fq1, fq2, qoffs, qoffs, sr_c, elem0, KIND, DTYPE,
                        False, FLAG, STATS, SDTYPE, MODE, L2)
        psq += a
        usq += b
    K._add_stats(ustat_ptr + tidx * L.US_COLS, psq, usq, STATS)


_LDGSTS = re.compile(r"\bLDGSTS(\.[A-Z0-9_.]+)?")
_VS: list = []
#: (BLOCK, STAGES, num_warps): the copies in flight take (STAGES - 1) x the block's bytes of
#: shared memory a program (two stages, one block in flight, cannot reach 128 KB in 228);
#: 2 warps and 512-element blocks left out (on a prototype of bf16 AdamW, 27 configurations of
#: 512-2048 elements, 2-4 stages and 2-8 warps: none held more than these)
GRID = list(itertools.product((1024, 2048), (3, 4), (4, 8)))


def _init(every: bool) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import compile_check as cc

    vs, _ = cc.variants(lowp=True)
    keep = {k for k in cc.KNOWN_SHORT if k[0] == "_update_kernel"}
    vs = [v for v in vs if v.name == "_update_kernel"]
    if not every:
        vs = [v for v in vs if cc.short_key(v) in keep or (
            not cc.is_lowp(v) and v.constexprs["KIND"] == L.KIND_ADAM
            and not v.constexprs["FLAG"] and not v.constexprs["L2"])]
    _VS[:] = vs


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

    c = dict(v.constexprs)
    if c["SDTYPE"] == tl.uint8 and block % L.Q_BLOCK:
        return None
    c.pop("SPLIT", None)
    c.update(BLOCK=block, STAGES=stages)
    sig = {n: v.signature.get(n, "i32") for n in ("tensors_ptr", "scal_ptr", "ustat_ptr")}
    sig.update(runs_ptr=v.signature["blocks_ptr"], n_full="i32")
    p = cc.Variant(**{**v.__dict__, "fn": _pipe_kernel, "signature": sig, "constexprs": c,
                      "options": dict(v.options, num_warps=warps)})
    ck = cc.compile_variant(p, GPUTarget("cuda", 90, 32))
    code = cc.read_code(ck)
    with tempfile.TemporaryDirectory() as d:  # (read_code keeps counts, not the listing)
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([cc._bin("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    cp = ldgsts(sass)
    programs = code.programs
    nbytes = cc.program_bytes(cc.Variant(**{**v.__dict__,
                                            "constexprs": dict(v.constexprs, BLOCK=block)}))
    return dict(cfg=(block, stages, warps), regs=code.regs, spill=code.spill, smem=code.smem,
                programs=programs, cp=cp, ldg128=code.ops.get("LDG.128", 0),
                ops=code.ops, inflight=programs * (stages - 1) * nbytes)


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

    return cc.read_code(cc.compile_variant(_VS[i], GPUTarget("cuda", 90, 32))).inflight


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
    with multiprocessing.get_context("fork").Pool(args.jobs, _init, (args.all,)) as pool:
        res = pool.map(_one, jobs, chunksize=4)
        shipped = pool.map(_shipped, range(len(_VS)))
    best: dict = {}
    why: dict = {}
    for i, r in res:
        bad = None if r is not None else "does not compile"
        if r is not None:
            bad = reject(r)
        if bad:
            why.setdefault(i, bad)
            continue
        if i not in best or (r["inflight"], -r["regs"] * r["cfg"][2]) > (
                best[i]["inflight"], -best[i]["regs"] * best[i]["cfg"][2]):
            best[i] = r
    reach = 0
    rows = []
    print(f"{'variant (short_key, STATS, L2)':66s} shipped pipelined BLOCK STAGES warps "
          "regs  smem programs")
    for i, v in enumerate(_VS):
        c = v.constexprs
        name = f"{cc.short_key(v)[1:]} STATS={c['STATS']} L2={c['L2']}"
        b = best.get(i)
        rows.append(dict(variant=name, shipped=shipped[i], best=b, why=why.get(i)))
        if b is None:
            print(f"{name:66s} {shipped[i] // 1024:4d} KB  none: {why.get(i)}")
            continue
        reach += b["inflight"] >= cc.MIN_INFLIGHT
        print(f"{name:66s} {shipped[i] // 1024:4d} KB {b['inflight'] // 1024:6d} KB "
              f"{b['cfg'][0]:5d} {b['cfg'][1]:6d} {b['cfg'][2]:5d} {b['regs']:4d} "
              f"{b['smem']:5d} {b['programs']:8d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows,
                           all=[dict(variant=i, **r) for i, r in res if r is not None]), f,
                      indent=1, default=str)
    held = sum(s >= cc.MIN_INFLIGHT for s in shipped)
    print(f"at {cc.MIN_INFLIGHT // 1024} KB or more: shipped {held}, pipelined {reach} "
          f"of {len(_VS)} (triton {triton.__version__}, sm_90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
