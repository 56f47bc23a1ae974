"""Choose the launch configuration (SPLIT, num_warps) of every update variant from its compiled
code: ``python bench/launch_sweep.py [--kernel units] [--jobs 2]`` (triton 3.6, no GPU; run
without ``TRITON_INTERPRET``), about 15 minutes a kernel on 2 cores.

Each variant that ``bench/compile_check.py`` finds (every dtype, flag, statistics, weight term
and unit class the optimizers launch per block: the pipelined ones, ``_RUN_LAUNCH``, are
``bench/run_sweep.py``'s) is compiled for sm_90 at SPLIT 1 and 2 (the block in one
piece, or in two halves whose loads are all issued before the first half's stores) and 1, 2, 4 and 8
warps (units: 1, 2, 4). Per launch key (``compile_check.short_key``: kind, dtypes, mode, flag;
the statistics and unit-class variants behind a key are taken at their worst) the choice is:
no spills; then the most loads in flight per SM as the SASS shows them (compile_check's
``iss``: 16-byte data loads a thread has issued and not yet used, times the threads an SM
holds); then, within 5% of that, the fewest registers x warps. Prints each key's figures
before (the tables in ``kernels/optim.py``) and after, and the table to paste there.

``--l2 false`` takes only the variants without the weight term in the gradient (``L2=False``:
AdamW, groups with weight_decay 0), whose register allocation differs from the variants with
it (the tables' choice) enough that some spill or hold less in flight at that choice; with
``--key`` (a key as printed, repeatable) only those keys: the overrides ``_NO_L2_LAUNCH`` /
``_NO_L2_UNITS`` in ``kernels/optim.py``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_VS: list = []


def _init(kernel: str, l2: str = "any", keys: tuple = ()) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import compile_check as cc

    vs, _ = cc.variants(lowp=True)
    _VS[:] = [v for v in vs if v.name == kernel
              and (l2 == "any" or v.constexprs["L2"] == (l2 == "true"))
              and (not keys or str(cc.short_key(v)[1:]) in keys)]


def _one(job: tuple) -> dict | None:
    import compile_check as cc
    from triton.backends.compiler import GPUTarget

    i, split, warps = job
    v = _VS[i]
    cur = (v.constexprs["SPLIT"], v.options["num_warps"])
    v = cc.Variant(**{**v.__dict__, "constexprs": dict(v.constexprs, SPLIT=split),
                      "options": dict(v.options, num_warps=warps)})
    try:
        code = cc.read_code(cc.compile_variant(v, GPUTarget("cuda", 90, 32)))
    except Exception as e:  # noqa: BLE001 (a configuration that does not compile is skipped)
        print(f"skipped {v.constexprs} at {warps} warps: {type(e).__name__}", file=sys.stderr)
        return None
    return dict(key=cc.short_key(v), cfg=(split, warps), cur=cur, spill=code.spill,
                regs=code.regs, kb=code.programs * cc.program_bytes(v) / 1024,
                iss=code.programs * code.issued * 32 * code.warps / 1024)


_KIND = {0: "L.KIND_ADAM", 1: "L.KIND_SGD"}


def _entries(key: tuple) -> list[tuple]:
    """(kind, parameter dtype, state storage, mode, flag) rows of a short_key."""
    if len(key) == 4:  # (name, kind, 2-byte, flag): the state in the parameter's dtype
        return [(key[1], d, d, 0, key[3]) for d in (("bf16", "fp16") if key[2] else ("fp32",))]
    return [(key[1], key[2], key[3], key[4], key[5])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("update", "units"), default="update")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=0,
                    help="only the first N variants (a quick look; the table needs them all)")
    ap.add_argument("--l2", choices=("any", "true", "false"), default="any",
                    help="only the variants with (true) or without (false) the weight term")
    ap.add_argument("--key", action="append", default=[],
                    help="only this key, as printed (e.g. \"(0, True, False)\"); repeatable")
    args = ap.parse_args(argv)
    kernel = "_update_kernel" if args.kernel == "update" else "_units_update_kernel"
    warps = (1, 2, 4, 8) if args.kernel == "update" else (1, 2, 4)
    sel = (args.l2, tuple(args.key))
    _init(kernel, *sel)
    if args.kernel == "units" and not args.key:
        # the variants without statistics (216 -> 108 compiled): check the table with
        # `compile_check.py --require`, which compiles them all (one key's statistics variant
        # spilled 20 bytes at the choice made without it: set by hand); with --key all of them
        keep = [i for i, v in enumerate(_VS) if not v.constexprs["STATS"]]
    else:
        keep = list(range(len(_VS)))
    if args.limit:
        keep = keep[:args.limit]
    jobs = list(itertools.product(keep, (1, 2), warps))
    print(f"{len(keep)} variants x {len(jobs) // max(1, len(keep))} configurations",
          file=sys.stderr)
    with multiprocessing.Pool(args.jobs, _init, (kernel, *sel)) as pool:
        rows = [r for r in pool.imap_unordered(_one, jobs, chunksize=4) if r]
    agg: dict = collections.defaultdict(
        lambda: dict(spill=0, kb=float("inf"), iss=float("inf"), regs=0))
    cur: dict = {}
    for r in rows:
        a = agg[r["key"], r["cfg"]]
        a["spill"] = max(a["spill"], r["spill"])
        a["regs"] = max(a["regs"], r["regs"])
        a["kb"] = min(a["kb"], r["kb"])
        a["iss"] = min(a["iss"], r["iss"])
        cur[r["key"]] = r["cur"]
    show = lambda a: (f"{'spill' if a['spill'] else '     '} {a['regs']:3d} regs "  # noqa: E731
                      f"{a['kb']:4.0f} KB blocks {a['iss']:4.0f} KB issued")
    table, tot = [], collections.Counter()
    for key in sorted(cur, key=str):
        cfgs = {c: a for (k, c), a in agg.items() if k == key}
        pool_ = [c for c in cfgs if not cfgs[c]["spill"]] or list(cfgs)
        top = max(cfgs[c]["iss"] for c in pool_)
        best = min((c for c in pool_ if cfgs[c]["iss"] >= 0.95 * top),
                   key=lambda c: (cfgs[c]["regs"] * c[1], c[1]))
        before = cfgs.get(cur[key])
        for tag, a in (("before", before), ("after", cfgs[best])):
            if a:
                tot[tag, "keys"] += 1
                tot[tag, "no spill"] += not a["spill"]
                tot[tag, ">= 128 KB issued"] += a["iss"] >= 128
                tot[tag, "KB issued (sum)"] += round(a["iss"])
        print(f"{str(key[1:]):44s} {cur[key]} {show(before) if before else '-':48s} -> "
              f"{best} {show(cfgs[best])}")
        table += [(e, best) for e in _entries(key)]
    for tag in ("before", "after"):
        print(tag + ": " + ", ".join(f"{k[1]} {v}" for k, v in tot.items() if k[0] == tag))
    print("{" + ",\n ".join(f"({_KIND[k]}, {d!r}, {s!r}, {m}, {f}): {b}"
                            for (k, d, s, m, f), b in sorted(table)).replace("'", '"') + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
