"""The kernels compile for an H100 target (no GPU needed): the interpreter never compiles them,
so this is what catches code that only the real compiler rejects (e.g. non-constexpr globals).

The compile check derives its signatures from the launches of the real host path; the tests
below check that this derivation reaches every kernel and every specialisation that matters.
They run in process under the interpreter (conftest sets ``TRITON_INTERPRET=1``): the launches
are recorded, never run, and the recorder works the same on interpreted kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastsched.kernels import layout as L
from fastsched.kernels import optim as ko
from fastsched.kernels import schedule as ks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cc(compile_check):
    return compile_check


@pytest.fixture(scope="module")
def derived(cc):
    vs, n_cfg = cc.variants()
    return vs, n_cfg


def _by_kernel(vs, name):
    return [v for v in vs if v.name == name]


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--quick"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failed" in r.stdout


def test_derived_signatures_cover_every_kernel(cc, derived):
    vs, n_cfg = derived
    # found independently of compile_check.kernels(): every jit kernel the modules define
    want = {name for m in (ko, ks) for name, v in vars(m).items()
            if name.endswith("_kernel") and hasattr(v, "arg_names") and hasattr(v, "run")}
    assert {"_grad_stats_kernel", "_reduce_kernel", "_finalize_kernel", "_update_kernel",
            "_units_update_kernel", "_schedule_eval_kernel"} <= want
    assert {v.name for v in vs} == want
    assert n_cfg == len(cc.configs()) + 1
    # every runtime argument typed, every constexpr given a value
    for v in vs:
        assert set(v.signature) | set(v.constexprs) == set(v.fn.arg_names), v.name
        assert not set(v.signature) & set(v.constexprs), v.name
    # the recorder was removed: the kernels launch again after the enumeration
    for f in cc.kernels():
        assert "run" not in vars(f), cc.kernel_name(f)


def test_derived_variants_span_every_specialisation(derived):
    vs, _ = derived
    import triton.language as tl

    dtypes = {str(d) for d in (tl.float32, tl.bfloat16, tl.float16)}
    for name in ("_update_kernel", "_units_update_kernel"):
        got = _by_kernel(vs, name)
        assert {v.constexprs["KIND"] for v in got} == {L.KIND_ADAM, L.KIND_SGD}, name
        assert {str(v.constexprs["DTYPE"]) for v in got} == dtypes, name
        for flag in ("FLAG", "STATS", "L2"):
            assert {v.constexprs[flag] for v in got} == {False, True}, (name, flag)
    upd = _by_kernel(vs, "_update_kernel")
    run = _by_kernel(vs, "_run_update_kernel")
    # 2 kinds x 3 dtypes x flag x stats x weight term (alignment is tested per tensor in the
    # kernel), each launched per block, pipelined or both (a FLAG variant whose tensors differ
    # in the optional state runs per block)
    base = ("KIND", "DTYPE", "FLAG", "STATS", "L2")
    keys = {tuple(str(v.constexprs[k]) for k in base) for v in upd + run}
    assert len(keys) == 48
    assert {v.constexprs["FLAG"] for v in upd} == {False, True}
    assert all("ALIGNED" not in v.constexprs for v in upd + run)
    # the pipelined launches: the table's configuration, runs of RUN_ELEMENTS, and a FLAG
    # variant only where every tensor has the optional state
    from fastsched.optim._tables import RUN_ELEMENTS

    for v in run:
        c = v.constexprs
        k = (c["KIND"], ko._TL_NAMES[c["DTYPE"]], ko._TL_NAMES[c["SDTYPE"]], c["MODE"],
             c["FLAG"], c["STATS"], c["L2"])
        assert (c["BLOCK"], c["STAGES"], v.options["num_warps"]) == ko._RUN_LAUNCH[k]
        assert c["RUN"] * c["BLOCK"] == RUN_ELEMENTS
        assert c["ALL3"] == c["FLAG"]
    # launch options: the (SPLIT, warps) of update_launch(), recorded per variant
    assert all((v.constexprs["SPLIT"], v.options["num_warps"]) == ko.update_launch(
        v.constexprs["KIND"], {"fp32": torch.float32, "bf16": torch.bfloat16,
                               "fp16": torch.float16}[str(v.constexprs["DTYPE"])], 2048,
        v.constexprs["FLAG"], l2=v.constexprs["L2"]) for v in upd)
    assert {v.constexprs["SPLIT"] for v in upd} == {1, 2}  # both code shapes compiled
    units = _by_kernel(vs, "_units_update_kernel")
    from fastsched.optim import UNIT_CLASSES

    assert {(v.constexprs["UNITS"], v.constexprs["CHUNK"]) for v in units} == \
        {(nu, chunk) for _, nu, chunk in UNIT_CLASSES}
    stats = _by_kernel(vs, "_grad_stats_kernel")
    assert {str(v.constexprs["DTYPE"]) for v in stats} == dtypes
    assert {v.constexprs["MASK_BAD"] for v in stats} == {False, True}
    fin = _by_kernel(vs, "_finalize_kernel")
    for flag in ("STATS", "CLIP", "GUARD", "SCALER", "HISTORY"):
        assert {v.constexprs[flag] for v in fin} == {False, True}, flag
    # clipping, the guard and the ring buffer need the statistics pass
    assert all(v.constexprs["STATS"] for v in fin
               if v.constexprs["CLIP"] or v.constexprs["GUARD"] or v.constexprs["HISTORY"])


def test_signatures_follow_the_launch_arguments(derived):
    """Types come from what the launchers pass, e.g. finalize gets the fp32 scal buffer in place
    of the float64 tstat when the statistics pass is off."""
    vs, _ = derived
    fin = _by_kernel(vs, "_finalize_kernel")
    assert {v.signature["tstat_ptr"] for v in fin if v.constexprs["STATS"]} == {"*fp64"}
    assert {v.signature["tstat_ptr"] for v in fin if not v.constexprs["STATS"]} == {"*fp32"}
    assert {v.signature["n_tensors"] for v in fin} == {"i32"}
    (ev,) = _by_kernel(vs, "_schedule_eval_kernel")
    assert ev.signature == {"seg_ptr": "*fp64", "n_seg": "i32", "steps_ptr": "*i64",
                            "out_ptr": "*fp64", "n_steps": "i32"}
    assert ev.constexprs["BLOCK"] == 256


def test_quick_picks_the_variant_with_most_features(cc, derived):
    vs, _ = derived
    quick = {v.name: v for v in cc.pick_quick(vs)}
    assert set(quick) == {v.name for v in vs}
    u = quick["_update_kernel"].constexprs
    assert (u["FLAG"], u["STATS"], u["L2"], str(u["DTYPE"])) == (True, True, True, "bf16")
    f = quick["_finalize_kernel"].constexprs
    assert all(f[k] for k in ("STATS", "CLIP", "GUARD", "SCALER", "HISTORY"))


def test_signature_typing(cc):
    """The typing rules themselves: pointers by dtype, scalars by Python type and range."""
    fn = ks._schedule_eval_kernel
    v = cc._variant(fn, (torch.zeros(2, 8, dtype=torch.float64), 3,
                         torch.zeros(4, dtype=torch.int32), torch.zeros(4), 2**40),
                    {"BLOCK": 64, "SEG_BLOCK": 16}, "test")
    assert v.signature == {"seg_ptr": "*fp64", "n_seg": "i32", "steps_ptr": "*i32",
                           "out_ptr": "*fp32", "n_steps": "i64"}
    assert v.constexprs == {"BLOCK": 64, "SEG_BLOCK": 16}
    assert cc._scalar_type(True) == "i1" and cc._scalar_type(0.5) == "fp32"
    with pytest.raises(TypeError, match="complex"):
        cc._variant(fn, (torch.zeros(2, 8, dtype=torch.complex64), 3, torch.zeros(4),
                         torch.zeros(4), 4), {"BLOCK": 64, "SEG_BLOCK": 16}, "test")


def test_reading_the_code(cc):
    """SASS counting and residency, as the --require check reads them (no compiler here)."""
    sass = """
        /*0100*/  LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/  LDG.E R8, desc[UR4][R2.64] ;
        /*0120*/  LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*0130*/  STG.E.128 desc[UR4][R2.64], R4 ;
        /*0140*/  REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0150*/  MEMBAR.ALL.GPU ;
        /*0160*/  CCTL.IVALL ;
        /*0170*/  REDUX.SUM R1, R2 ;
    """
    assert cc.sass_ops(sass) == {"LDG.128": 1, "LDG.32": 1, "LDG.16": 1, "STG.128": 1,
                                 "REDG": 1, "MEMBAR": 1, "CCTL": 1}
    # the figures of the issue: 230 registers at 4 warps -> 2 programs; 62-64 at 8 warps -> 4;
    # 48 at 8 warps -> 5; warps and programs per SM cap it too
    assert cc.residency(230, 4, 0) == 2
    assert cc.residency(64, 8, 0) == 4
    assert cc.residency(48, 8, 0) == 5
    assert cc.residency(16, 1, 0) == 32
    assert cc.residency(32, 16, 0) == 4


def test_issued_loads_follow_the_sass(cc):
    """16-byte loads (the blocks' data) count from their issue to the first instruction naming
    a destination register; narrower loads (table rows, scalars, masked elements) do not count;
    a load's own address registers and predicates are not loads."""
    sass = """
        /*0000*/  LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/  LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/  @!P0 LDG.E.U16 R12, desc[UR4][R14.64] ;
        /*0030*/  FADD R16, R20, R21 ;
        /*0040*/  FADD R17, R5, R5 ;
        /*0050*/  LDG.E R13, desc[UR4][R2.64+0x20] ;
        /*0060*/  STG.E.128 desc[UR4][R2.64], R8 ;
        /*0070*/  FADD R18, R12, R13 ;
    """
    assert cc.issued(sass) == 16 + 16  # R4's load used at 0x40, R8's at 0x60; U16 and E: 0
    # R4's load never used and a third 16-byte one at 0x50: three in flight there
    late = sass.replace("FADD R17, R5, R5", "FADD R17, R20, R20")
    assert cc.issued(late.replace("LDG.E R13", "LDG.E.128 R24")) == 48
    assert cc.issued("") == 0


def test_spills_are_the_stl_bytes(cc):
    """Spill stores are STL instructions (the kernels have no local arrays); their widths sum as
    ptxas -v's "bytes spill stores". cuobjdump's LOCAL, read before, is 0 for them."""
    sass = """
        /*0000*/  STL.64 [R1+0x10], R4 ;
        /*0010*/  STL [R1+0x18], R6 ;
        /*0020*/  @P0 STL.128 [R1+0x20], R8 ;
        /*0030*/  LDL.64 R4, [R1+0x10] ;
        /*0040*/  STG.E.128 desc[UR4][R2.64], R8 ;
    """
    assert cc.spill_bytes(sass) == 8 + 4 + 16
    assert cc.sass_ops(sass)["STL"] == 3 and cc.sass_ops(sass)["LDL"] == 1
    assert cc.spill_bytes("        /*0000*/  STG.E desc[UR4][R2.64], R8 ;") == 0


def test_requirements_flag_fences_scalar_blocks_and_occupancy(cc, derived):
    vs, _ = derived
    v = next(x for x in vs if x.name == "_update_kernel" and x.constexprs["KIND"] == L.KIND_ADAM
             and str(x.constexprs["DTYPE"]) == "fp32" and not x.constexprs["FLAG"])
    need = cc.program_bytes(v)  # 2048 x 4 arrays x 4 bytes
    assert need == 2048 * 16
    w = 4
    vec = need // (16 * 32 * w)  # 16-byte loads a thread covering a block
    # 88 registers at 4 warps: 5 programs, each thread with its whole block issued: 160 KB
    good = cc.Code(w, 88, 0, 0, {"LDG.128": vec, "STG.128": 6}, issued=16 * vec)
    assert good.inflight == 5 * 128 * 16 * vec == 160 * 1024
    assert cc.requirements(v, good) == []
    assert any("fences" in b for b in cc.requirements(
        v, cc.Code(w, 88, 0, 0, {"LDG.128": vec, "STG.128": 6, "MEMBAR": 2, "ATOMG": 2},
                   issued=16 * vec)))
    assert any("16-byte loads" in b for b in cc.requirements(
        v, cc.Code(w, 88, 0, 0, {"LDG.32": 4 * vec, "STG.32": 24}, issued=16 * vec)))
    # 230 registers: 2 programs (64 KB); or the loads issued in two rounds (80 KB)
    assert any("in flight" in b for b in cc.requirements(
        v, cc.Code(w, 230, 0, 0, {"LDG.128": vec, "STG.128": 6}, issued=16 * vec)))
    assert any("in flight" in b for b in cc.requirements(
        v, cc.Code(w, 88, 0, 0, {"LDG.128": vec, "STG.128": 6}, issued=8 * vec)))
    assert any("spill" in b for b in cc.requirements(
        v, cc.Code(w, 88, 16, 0, {"LDG.128": vec, "STG.128": 6}, issued=16 * vec)))


@pytest.mark.parametrize("skip", [False, True])
def test_clock_advances_without_update_programs(skip):
    """Only empty tensors: no update launch, so the one-program finalize advances the clock
    (with update launches the first of them does: the other tests' steps); a skipped step
    (GradScaler's found_inf) does not."""
    import fastsched

    p = torch.nn.Parameter(torch.zeros(0, 3))
    p.grad = torch.zeros(0, 3)
    opt = fastsched.AdamW([p], lr=1e-3, backend="triton")
    if skip:  # as torch.amp.GradScaler hands them over
        opt.grad_scale, opt.found_inf = torch.ones(1), torch.ones(1)
    opt.step()
    assert int(opt.clock.item()) == (0 if skip else 1)


def test_launch_tables_cover_every_update_variant(cc):
    """Every update and unit variant the optimizers launch has its own row in the launch
    tables of kernels/optim.py (none falls back to the default), and the rows launch_sweep.py
    prints for its key are the ones the launcher reads."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import launch_sweep
    finally:
        sys.path.remove(str(ROOT / "bench"))
    vs, _ = cc.variants(lowp=True)
    tables = {"_update_kernel": ko._UPDATE_LAUNCH, "_units_update_kernel": ko._UNITS_LAUNCH}
    pipelined = set()
    # the variants without the weight term: their own row where the table's does not hold
    no_l2 = {"_update_kernel": ko._UPDATE_NO_L2, "_units_update_kernel": ko._UNITS_NO_L2}
    seen, seen_no_l2 = set(), set()
    for v in vs:
        if v.name not in tables and v.name != "_run_update_kernel":
            continue
        c = v.constexprs
        mine = (c["KIND"], str(c["DTYPE"]), str(c["SDTYPE"]), c["MODE"], c["FLAG"])
        if v.name == "_run_update_kernel":
            # its per-block row is what FASTSCHED_UPDATE_RUNS=0 and a block_size of the
            # user's own launch
            assert mine in tables["_update_kernel"], mine
            seen.add(("_update_kernel", mine))
            if not c["L2"] and mine in no_l2["_update_kernel"]:
                seen_no_l2.add(("_update_kernel", mine))
            pipelined.add((c["KIND"], ko._TL_NAMES[c["DTYPE"]], ko._TL_NAMES[c["SDTYPE"]],
                           c["MODE"], c["FLAG"], c["STATS"], c["L2"]))
            continue
        rows = launch_sweep._entries(cc.short_key(v))
        assert mine in rows, (v.name, mine, rows)
        assert mine in tables[v.name], (v.name, mine)
        want = tables[v.name][mine]
        if not c["L2"] and mine in no_l2[v.name]:
            want = no_l2[v.name][mine]
            seen_no_l2.add((v.name, mine))
        assert (c["SPLIT"], v.options["num_warps"]) == want, (v.name, mine, c["L2"])
        seen.add((v.name, mine))
    # no stale rows: each one is launched by some configuration
    assert seen == {(n, k) for n, t in tables.items() for k in t}
    assert seen_no_l2 == {(n, k) for n, t in no_l2.items() for k in t}
    assert pipelined == set(ko._RUN_LAUNCH)


def test_run_sweep_reads_cp_async(bench_script):
    """bench/run_sweep.py: LDGSTS widths from a listing, and which compiled configurations
    count (no spills, no 16-byte load left in registers, cp.async copies mostly 16 bytes)."""
    pp = bench_script("run_sweep")
    sass = """
        /*0100*/  LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0110*/  @P0 LDGSTS.E.BYPASS.128 [R3+0x800], desc[UR4][R6.64] ;
        /*0120*/  LDGSTS.E.64 [R9], desc[UR4][R10.64] ;
        /*0130*/  LDGSTS.E [R12], desc[UR4][R14.64] ;
        /*0140*/  LDG.E.128 R16, desc[UR4][R2.64] ;
    """
    assert pp.ldgsts(sass) == {16: 2, 8: 1, 4: 1}
    ok = dict(spill=0, ldg128=0, cp={16: 60, 4: 2})
    assert pp.reject(ok) is None  # 8 of 968 bytes narrow: the 8-bit states' scales
    assert "spills" in pp.reject(dict(ok, spill=8))
    assert "LDG.128" in pp.reject(dict(ok, ldg128=4))
    assert "widths" in pp.reject(dict(ok, cp={16: 4, 8: 12}))
    assert "widths" in pp.reject(dict(ok, cp={}))


def test_run_sweep_picks_the_most_in_flight(bench_script):
    """bench/run_sweep.py's choice per variant: configurations that count, the most bytes in
    flight, then the fewest registers x warps; the first reason one did not count is kept.
    The deeper pipelines (DEEP) are only for what GRID leaves short, and GRID is not in DEEP."""
    pp = bench_script("run_sweep")
    ok = dict(spill=0, ldg128=0, cp={16: 8})

    def r(cfg, inflight, regs, **kw):
        return {**ok, "cfg": cfg, "inflight": inflight, "regs": regs, **kw}

    best, why = {}, {}
    pp._pick([(0, r((2048, 4, 4), 72 << 10, 200)), (0, r((2048, 3, 4), 72 << 10, 150)),
              (1, None), (1, r((1024, 3, 4), 90 << 10, 60, spill=4))], best, why)
    assert best[0]["cfg"] == (2048, 3, 4)  # the same bytes with fewer registers
    assert 1 not in best and why[1] == "does not compile"
    pp._pick([(0, r((2048, 8, 4), 168 << 10, 254)), (1, r((1024, 8, 4), 168 << 10, 80))],
             best, why)
    assert best[0]["cfg"] == (2048, 8, 4) and best[1]["cfg"] == (1024, 8, 4)
    assert why[1] == "does not compile"  # (kept: printed only for a variant with no choice)
    assert {s for _, s, _ in pp.DEEP} == {6, 8} and not set(pp.GRID) & set(pp.DEEP)


def test_requirements_of_the_pipelined_update(cc, derived):
    """A pipelined variant's full blocks are 16-byte cp.async copies (LDGSTS), nothing of them
    stays a register load, and its bytes in flight are the blocks copied ahead."""
    sass = """
        /*0100*/  LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0110*/  LDGSTS.E.BYPASS.128 [R3+0x800], desc[UR4][R6.64] ;
        /*0140*/  LDG.E.128 R16, desc[UR4][R2.64] ;
    """
    assert cc.sass_ops(sass) == {"LDGSTS.128": 2, "LDG.128": 1}
    vs, _ = derived
    v = next(x for x in vs if x.name == "_run_update_kernel"
             and x.constexprs["KIND"] == L.KIND_ADAM and str(x.constexprs["DTYPE"]) == "bf16"
             and str(x.constexprs["SDTYPE"]) == "bf16" and not x.constexprs["FLAG"]
             and not x.constexprs["MODE"])
    c = {k: v.constexprs[k] for k in ("KIND", "DTYPE", "FLAG", "STATS", "SDTYPE", "MODE", "L2")}
    run = cc.Variant(**{**v.__dict__, "fn": ko._run_update_kernel,
                        "constexprs": dict(c, BLOCK=2048, RUN=8, STAGES=4, ALL3=False)})
    need = cc.program_bytes(run)  # 2048 x 4 arrays x 2 bytes
    assert need == 2048 * 8
    w = 4
    vec = need // (16 * 32 * w)
    # 4 programs (125 registers, 3 x 16 KB of copies each) x 3 blocks ahead: 192 KB
    good = cc.Code(w, 125, 0, 49152, {"LDGSTS.128": 4 * vec, "STG.128": 6},
                   ahead=3 * need)
    assert good.programs == 4 and good.inflight == 192 * 1024
    assert cc.requirements(run, good) == []
    assert any("not pipelined" in b for b in cc.requirements(
        run, cc.Code(w, 125, 0, 49152, {"LDGSTS.128": 4 * vec, "LDG.128": 2, "STG.128": 6},
                     ahead=3 * need)))
    assert any("16-byte loads" in b for b in cc.requirements(
        run, cc.Code(w, 125, 0, 49152, {"LDG.16": 8, "STG.128": 6}, ahead=3 * need)))
    assert any("in flight" in b for b in cc.requirements(
        run, cc.Code(w, 125, 0, 49152, {"LDGSTS.128": 4 * vec, "STG.128": 6}, ahead=need)))
