"""Tables, Markdown, the README performance section and the bar chart, all from a results dict.

Everything here reads the results (as :func:`fastsched.bench.harness.run_bench` returns them or
as they were saved to JSON); nothing is measured or typed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["render_markdown", "render_readme", "print_table", "plot_results", "fmt_time",
           "table_rows", "render_bytes_table", "columns_for"]

_NAMES = {"gpt2": "GPT-2 small", "llama-1b": "Llama-like 1B", "lora-7b": "LoRA r16 on a 7B Llama",
          "many-small": "many small tensors"}


def fmt_time(s: float | None) -> str:
    """Seconds as a short human string: ``"1.36 ms"``, ``"84.2 us"``, ``"2.31 s"``."""
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    if n >= 1e6:
        return f"{n / 1e6:.4g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_bpp(x: float | None) -> str:
    """Bytes per parameter: ``28``, ``16.06``, ``2.03``; ``-`` for none."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _gbps(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:.3g} TB/s" if x >= 1e3 else f"{x:.3g} GB/s"


def _threads(t) -> str:
    return "" if not t else f", {t} thread{'s' if t > 1 else ''}"


def _groups(results: dict[str, Any]) -> list[tuple[dict, str, list[dict]]]:
    """(shape set, dtype and thread count as a label, entries) in run order."""
    sets = {s["name"]: s for s in results["shape_sets"]}
    order: list[tuple[str, str, Any]] = []
    by: dict[tuple[str, str, Any], list[dict]] = {}
    for r in results["results"]:
        k = (r["set"], r["dtype"], r.get("threads"))
        if k not in by:
            by[k] = []
            order.append(k)
        by[k].append(r)
    return [(sets[s], d + _threads(t), by[(s, d, t)]) for s, d, t in order]


def _set_title(s: dict) -> str:
    name = _NAMES.get(s["name"], s["name"])
    t = f"{name}: {_fmt_params(s['params'])} params, {s['tensors']} tensors"
    if s.get("scale", 1.0) != 1.0:
        t += f" (scale {s['scale']:g} of {_fmt_params(s['full_params'])})"
    return t


def _ms(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e3:.3g}"


def _config_title(configs: dict, r: dict) -> str:
    return configs[r["config"]]["title"]


def table_rows(entries: Iterable[dict], configs: dict,
               columns: list[str] | None = None) -> list[list[str]]:
    """One row of strings per entry, in the order of ``columns`` (default :data:`COLUMNS`); a
    contender that did not run shows its status in the time column (the reasons:
    :func:`table_notes`)."""
    columns = COLUMNS if columns is None else columns
    rows = []
    for r in entries:
        cfg = _config_title(configs, r)
        if r["status"] != "ok":
            cells = {"configuration": cfg, "contender": r["title"], "ms/step": r["status"]}
            rows.append([cells.get(c, "") for c in columns])
            continue
        b, lat = r["b2b_s"], r["latency_s"]
        first = fmt_time(r.get("first_step_s"))
        if r.get("compile_shared"):
            first += " (compiled above)"
        elif r.get("compile_s") is not None:
            first += " (compile)"
        cells = {
            "configuration": cfg, "contender": r["title"], "ms/step": _ms(b["median"]),
            "p10-p90": f"{_ms(b['p10'])}-{_ms(b['p90'])}", "sync'd ms": _ms(lat["median"]),
            "B/param": fmt_bpp(r.get("bytes_per_param")), "GB/s": _gbps(r["gbps"]),
            "% of copy": f"{r['pct_copy']:.1f}%", "% of stream": _pct(r.get("pct_stream")),
            "speedup": _speedup(r.get("speedup")), "vs fp32 AdamW": _speedup(r.get("vs_fp32")),
            "vs plain step": _speedup(r.get("vs_plain")),
            "state B/param": fmt_bpp(r.get("state_bytes_per_param")),
            "peak mem": _fmt_bytes(r.get("peak_mem_bytes")), "first step": first,
        }
        rows.append([cells[c] for c in columns])
    return rows


def columns_for(entries: Iterable[dict]) -> list[str]:
    """:data:`COLUMNS`, with '% of stream', 'vs fp32 AdamW' and 'vs plain step' only where an
    entry has them."""
    entries = list(entries)
    drop = {col for col, key in (("% of stream", "pct_stream"), ("vs fp32 AdamW", "vs_fp32"),
                                 ("vs plain step", "vs_plain"))
            if not any(r.get(key) is not None for r in entries)}
    return [c for c in COLUMNS if c not in drop]


def table_notes(entries: Iterable[dict]) -> list[str]:
    """Why contenders did not run (one line per distinct reason) and per-entry notes."""
    by: dict[str, list[str]] = {}
    for r in entries:
        if r["status"] != "ok":
            by.setdefault(f"{r['status']}: {r['reason']}", []).append(r["title"])
        elif r.get("note"):
            by.setdefault(f"note: {r['note']}", []).append(r["title"])
    return [f"{why} ({', '.join(dict.fromkeys(who))})" for why, who in by.items()]


COLUMNS = ["configuration", "contender", "ms/step", "p10-p90", "sync'd ms", "B/param", "GB/s",
           "% of copy", "% of stream", "speedup", "vs fp32 AdamW", "vs plain step",
           "state B/param", "peak mem", "first step"]


def _header_lines(results: dict[str, Any]) -> list[str]:
    m, c = results["meta"], results["copy"]
    lines = [
        f"device: {m['device']} ({m['device_kind']})",
        "versions: " + ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "python",
                                                         "cuda_runtime", "driver") if m.get(k)),
        f"date: {m['date']}; command: `{m['command']}`; scale {m['scale']:g}"
        + (f"; git {m['git_commit']}" if m.get("git_commit") else "")
        + (f" with uncommitted changes to {', '.join(m['git_uncommitted'])}"
           if m.get("git_uncommitted") else ""),
        f"copy bandwidth ({_fmt_bytes(c['bytes_moved'] / 2)} copied, read + write): "
        f"{_gbps(c['gbps'])} (p10-p90 {_gbps(c['gbps_p10'])}-{_gbps(c['gbps_p90'])})"
        + (f"; at the end of the run {_gbps(results['copy_end']['gbps'])}"
           if "copy_end" in results else ""),
        f"peak memory: {m['peak_mem_method']}",
    ]
    libs = {k: v for k, v in (m.get("libraries") or {}).items()}
    if libs and any(r["family"] == "library" for r in results["results"]):
        lines.append("libraries: " + ", ".join(f"{k} {v or 'not installed'}"
                                               for k, v in libs.items()))
    if m.get("fastsched_cpu_lowp") is False and any(
            results["configs"].get(r["config"], {}).get("storage") and r["family"] == "fastsched"
            for r in results["results"]):
        lines.append("fastsched below fp32 on the CPU: the reference backend (the compiled CPU "
                     "executor does not run these options yet)")
    cpu = m.get("cpu")
    if cpu:
        llc = (f"; last-level cache (L{cpu['llc_level']}) {_fmt_bytes(cpu['llc_bytes'])}"
               if cpu.get("llc_bytes") else "")
        vec = ""
        if cpu.get("cpu_ext_simd") or cpu.get("torch_cpu_capability"):
            one = (" (built without OpenMP: one thread)"
                   if cpu.get("cpu_ext_openmp") is False else "")
            vec = (f"; vectors: fastsched's extension {cpu.get('cpu_ext_simd') or 'not built'}"
                   f"{one}, torch {cpu.get('torch_cpu_capability') or '?'}")
        lines.append(f"CPU: {cpu['cores']} cores{llc}{vec}; torch threads: "
                     + ", ".join(str(t) for t in m.get("threads") or [m["torch_threads"]])
                     + "; contenders of a configuration timed in interleaved rounds")
        lines += _cache_lines(results["shape_sets"], cpu.get("llc_bytes"))
    return lines


#: bytes of an fp32 AdamW step's tensors a parameter (p, g, exp_avg, exp_avg_sq)
_STATE_BYTES = 16


def _cache_lines(sets: list[dict], llc: int | None) -> list[str]:
    """A line for each shape set whose fp32 AdamW tensors fit in the last-level cache: its
    steps may run from the cache (a server's L3 is shared by every core of the host, so how
    much of it a run gets is not known) rather than from memory, which the scaled CPU sets are
    meant to measure; the scale that exceeds it is named."""
    out = []
    for s in sets if llc else ():
        held = s["params"] * _STATE_BYTES
        if held > llc:
            continue
        scale = s.get("scale", 1.0) * 2 * llc / held  # (of the full set, as --scale)
        name = _NAMES.get(s["name"], s["name"])
        over = f"; --scale {scale:.2g} makes them twice its size" if scale <= 1 else ""
        out.append(f"{name}: its fp32 AdamW tensors (p, g, m, v: {_fmt_bytes(held)}) fit in "
                   f"the {_fmt_bytes(llc)} last-level cache: part of each step may run from the "
                   f"cache, not from memory{over}")
    return out


def print_table(results: dict[str, Any], file=None) -> None:
    """The results as terminal tables (rich when installed, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(results, file)
        return
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=160)
    for line in _header_lines(results):
        console.print(line.replace("`", ""), highlight=False, markup=False)
    for sset, dtype, entries in _groups(results):
        table = Table(title=f"{_set_title(sset)}, {dtype}", title_justify="left",
                      show_lines=False)
        columns = columns_for(entries)
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i < 2 else "right", overflow="fold")
        last = None
        for r, row in zip(entries, table_rows(entries, results["configs"], columns)):
            if last is not None and r["config"] != last:
                table.add_section()
            last = r["config"]
            style = "bold" if r["family"] == "fastsched" and r["status"] == "ok" else None
            if r["status"] != "ok":
                style = "dim"
            table.add_row(*row, style=style)
        console.print(table)
        for note in table_notes(entries):
            console.print(f"  {note}", highlight=False, markup=False, style="dim")
    allora = allora_lines(results)
    if allora:
        console.print("")
        for line in allora:
            console.print(line, highlight=False, markup=False)
    if _has_lowp(results):
        console.print("")
        for line in target_lines(results):
            console.print(line, highlight=False, markup=False)
        for line in render_bytes_table(results).splitlines():
            console.print(line, highlight=False, markup=False)


def _print_plain(results: dict[str, Any], file=None) -> None:
    import sys

    out = file or sys.stdout
    for line in _header_lines(results):
        print(line.replace("`", ""), file=out)
    for sset, dtype, entries in _groups(results):
        print(f"\n{_set_title(sset)}, {dtype}", file=out)
        columns = columns_for(entries)
        rows = [columns] + table_rows(entries, results["configs"], columns)
        widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        for note in table_notes(entries):
            print(f"  {note}", file=out)
    allora = allora_lines(results)
    if allora:
        print("", file=out)
        for line in allora:
            print(line, file=out)
    if _has_lowp(results):
        print("", file=out)
        for line in target_lines(results):
            print(line, file=out)
        print("\n" + render_bytes_table(results), file=out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(results: dict[str, Any], image: str | None = None) -> str:
    """The full results as Markdown: header, bytes per parameter, one table per set and dtype."""
    m = results["meta"]
    lines = [f"# fastsched benchmark: {m['device']}, {m['date'][:10]}", ""]
    lines += [f"- {line}" for line in _header_lines(results)]
    lines += [f"- wall time of the run: {fmt_time(m.get('wall_s'))}"
              + ("" if m.get("complete", True) else " (incomplete run)"), ""]
    if image:
        lines += [f"![results]({image})", ""]
    lines += ["## Bytes per parameter (the minimal one-pass step)", ""]
    dtypes = m["dtypes"]
    rows = [[c["title"], c["bytes_note"]] + [fmt_bpp(c["bytes_per_param"][d]) for d in dtypes]
            + [fmt_bpp((c.get("state_bytes_per_param") or {}).get(d)) for d in dtypes]
            for k, c in results["configs"].items() if k in m["configs"]]
    lines += _md_table(["configuration", "what is moved"] + [f"{d} B/param" for d in dtypes]
                       + [f"{d} state B/param" for d in dtypes], rows)
    if _has_lowp(results):
        targets = target_lines(results)
        if targets:
            lines += ["", "## The CPU target of 8-bit states", ""] + [f"- {t}" for t in targets]
        lines += ["", "## Below fp32: bytes per parameter, moved and held", ""]
        lines += render_bytes_table(results).splitlines()
    allora = allora_lines(results)
    if allora:
        lines += ["", "## ALLoRA rows against the plain step", ""] + [f"- {t}" for t in allora]
    lines += ["", "## Configurations", ""]
    lines += [f"- **{c['title']}**: {c['description']}" for k, c in results["configs"].items()
              if k in m["configs"]]
    lines += ["", "## Contenders", ""]
    lines += [f"- **{c['title']}**: {c['description']}"
              for c in results["contenders"].values()]
    lines += ["", "ms/step: median (p10-p90) of back-to-back steps, over blocks of steps "
              "synchronised once per block; sync'd ms: median of single steps with a "
              "synchronisation before and after (host launch time included). "
              "GB/s = bytes per parameter x parameters / back-to-back time; "
              "% of stream = GB/s / the stream ceiling's GB/s in the same set, dtype and thread "
              "count; speedup = the fastest torch (or torchao / bitsandbytes) contender's "
              "back-to-back time in the same configuration (and thread count) / this one's; "
              "vs fp32 AdamW = torch's fused fp32 AdamW's back-to-back time, timed in the same "
              "rounds, / this one's (above 1: faster); vs plain step (ALLoRA) = fastsched's "
              "AdamW without ALLoRA on the same tensors, timed in the same run: its "
              "back-to-back time / this one's; state B/param = bytes of the optimizer's "
              "state tensors (all but step) after the first step / parameters.",
              ""]
    for sset, dtype, entries in _groups(results):
        lines += [f"## {_set_title(sset)}, {dtype}", ""]
        columns = columns_for(entries)
        lines += _md_table(columns, table_rows(entries, results["configs"], columns)) + [""]
        notes = table_notes(entries)
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def render_readme(results: dict[str, Any], source: str = "RESULTS.json",
                  image: str | None = None) -> str:
    """The README's performance section, generated from a results file.

    ``image``: a path (as the README should link it) to the run's chart, shown under the text.
    Contenders measured in no dtype are listed with the reason instead of a table row.
    """
    m, c = results["meta"], results["copy"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda_runtime", "driver")
                         if m.get(k))
    lines = ["## Performance", "",
             f"Measured on {m['device']} on {m['date'][:10]} ({versions}) with "
             f"`{m['command']}`; this section is generated by "
             f"`fastsched bench --readme {source}`. The copy bandwidth measured in the same run, "
             f"{_gbps(c['gbps'])}, is the ceiling: an optimizer step moves at least the bytes per "
             "parameter below, so % of copy = bytes x parameters / time / copy bandwidth. "
             "Time is the median of back-to-back steps; speedup is against the fastest torch "
             "contender of the same configuration"
             + (" and thread count" if len(m.get("threads") or []) > 1 else "") + "."
             + (" % of stream: GB/s against the stream ceiling (the compiled CPU extension's "
                "in-place kernel with AdamW's access pattern, 4 reads and 3 writes per 32-bit "
                "word, no arithmetic) measured in the same run."
                if any(r["family"] == "ceiling" for r in results["results"]) else ""), ""]
    if m.get("cpu"):
        lines += [_header_lines(results)[-1] + ".", ""]
    if not m.get("complete", True):
        lines += ["**Incomplete run: the results file was written before the run ended.**", ""]
    if m.get("scale", 1.0) != 1.0:
        lines += [f"**Scaled run (--scale {m['scale']:g}): tensors shrunk, numbers not "
                  "representative of the full models.**", ""]
    if image:
        lines += [f"![% of copy bandwidth per contender]({image})", ""]
    dtypes = [d for d in m["dtypes"]]
    bytes_rows = [[cf["title"]] + [fmt_bpp(cf["bytes_per_param"][d]) for d in dtypes]
                  for k, cf in results["configs"].items() if k in m["configs"]]
    lines += _md_table(["configuration"] + [f"B/param {d}" for d in dtypes], bytes_rows) + [""]
    reasons: dict[str, None] = {}
    sets = {s["name"]: s for s in results["shape_sets"]}
    for name in dict.fromkeys(r["set"] for r in results["results"]):
        entries = [r for r in results["results"] if r["set"] == name]
        lines += [f"### {_set_title(sets[name])}", ""]
        threads = len({e.get("threads") for e in entries}) > 1
        stream = any(e["family"] == "ceiling" for e in entries)
        header = ["configuration", "contender"] + (["threads"] if threads else [])
        for d in dtypes:
            header += [f"{d} time", f"{d} % of copy"] + ([f"{d} % of stream"] if stream
                                                           else []) + [f"{d} speedup"]
        rows = []
        width = 4 if stream else 3
        for cfg, key, nt in dict.fromkeys((r["config"], r["contender"], r.get("threads"))
                                          for r in entries):
            mine = [e for e in entries if e["config"] == cfg and e["contender"] == key
                    and e.get("threads") == nt]
            if not any(e["status"] == "ok" for e in mine):
                for e in mine:
                    reasons[f"{e['title']} ({results['configs'][cfg]['title']}): "
                            f"{e['status']}, {e['reason']}"] = None
                continue
            row = [results["configs"][cfg]["title"], results["contenders"][key]["title"]]
            if threads:
                row.append(str(nt))
            for d in dtypes:
                r = next((e for e in mine if e["dtype"] == d), None)
                if r is None:
                    row += [""] * width
                elif r["status"] != "ok":
                    row += [r["status"]] + [""] * (width - 1)
                    reasons[f"{r['title']} ({results['configs'][cfg]['title']}): "
                            f"{r['status']}, {r['reason']}"] = None
                else:
                    row += ([fmt_time(r["b2b_s"]["median"]), f"{r['pct_copy']:.0f}%"]
                            + ([_pct(r.get("pct_stream"))] if stream else [])
                            + [_speedup(r.get("speedup"))])
            rows.append(row)
        lines += _md_table(header, rows) + [""]
    allora = allora_lines(results)
    if allora:
        lines += ["ALLoRA rows against fastsched's plain step (the same tensors without ALLoRA, "
                  "timed in the same run; built after the others):", ""]
        lines += [f"- {t}" for t in allora] + [""]
    if reasons:
        lines += ["Not measured:", ""] + [f"- {r}" for r in reasons] + [""]
    return "\n".join(lines)


#: the configurations with 8-bit states the CPU target holds, and how its line names them
_TARGET_8BIT = {"adamw-8bit": "8-bit states",
                "adamw-sr-8bit": "8-bit states with stochastic rounding"}


def target_lines(results: dict[str, Any]) -> list[str]:
    """The CPU target of 8-bit states, stated from the run: fastsched's 8-bit AdamW step (with
    or without stochastic rounding) against torch's fused fp32 AdamW timed in the same rounds,
    per shape set, dtype and thread count."""
    out = []
    for r in results["results"]:
        if r["config"] not in _TARGET_8BIT or r["family"] != "fastsched" \
                or r["status"] != "ok" or r.get("vs_fp32") is None:
            continue
        met = "met" if r["vs_fp32"] >= 1.0 else "not met"
        out.append(f"{_TARGET_8BIT[r['config']]} no slower than torch's fused fp32 AdamW "
                   f"({r['set']}, "
                   f"{r['dtype']} parameters{_threads(r.get('threads'))}, backend "
                   f"{r.get('backend', '?')}): {r['vs_fp32']:.2f}x its speed "
                   f"({fmt_time(r['b2b_s']['median'])} against "
                   f"{fmt_time(r['b2b_s']['median'] * r['vs_fp32'])}, "
                   f"{r['vs_fp32_source']}{_spread(r.get('vs_fp32_rounds'), 2)}): {met}")
    return out


def _spread(q: dict[str, float] | None, digits: int) -> str:
    """', round by round p10-p90 A-Bx' for the paired per-round ratio quantiles (or '')."""
    if not q:
        return ""
    return f"; round by round p10-p90 {q['p10']:.{digits}f}-{q['p90']:.{digits}f}x"


def allora_lines(results: dict[str, Any]) -> list[str]:
    """The target of ALLoRA rows, stated from the run: fastsched's ALLoRA step against its plain
    step timed in the same run (on the CPU in the same rounds), per shape set, dtype and thread
    count."""
    out = []
    for r in results["results"]:
        if r["config"] != "allora" or r["family"] != "fastsched" or r["status"] != "ok" \
                or r.get("vs_plain") is None:
            continue
        over = 1.0 / r["vs_plain"]
        met = "met" if over <= 1.10 else "not met"
        when = "same rounds" if r.get("timing") == "interleaved" else "same run"
        out.append(f"ALLoRA rows within 10% of the plain step ({r['set']}, {r['dtype']}"
                   f"{_threads(r.get('threads'))}, backend {r.get('backend', '?')}): "
                   f"{over:.3f}x its time ({fmt_time(r['b2b_s']['median'])} against "
                   f"{fmt_time(r['b2b_s']['median'] * r['vs_plain'])}, {when}"
                   f"{_spread(r.get('plain_ratio_rounds'), 3)}): {met}")
    return out


def _has_lowp(results: dict[str, Any]) -> bool:
    return any(results["configs"].get(r["config"], {}).get("storage")
               for r in results["results"])


def _weights(storage: dict, dtype: str) -> str:
    if storage.get("master"):
        return f"{dtype} + fp32 master"
    return f"{dtype}, stochastic rounding" if storage.get("sr") else dtype


def _states(storage: dict, dtype: str) -> str:
    st = storage.get("states")
    if st == "8bit":
        return "8-bit + fp32 scale per 256"
    if st is None:
        return "fp32" if storage.get("master") else dtype
    return st


def render_bytes_table(results: dict[str, Any]) -> str:
    """Markdown for the README: bytes per parameter of each configuration below fp32 (and of
    torch's fused fp32 AdamW), moved by a step and held as state: the formula for large tensors,
    and the state measured after a step of fastsched and of each contender on the run's first
    shape set (tensors under 4096 elements keep fp32 states under 8-bit)."""
    configs = results["configs"]
    sets = {s["name"]: s for s in results["shape_sets"]}
    ok = [r for r in results["results"] if r["status"] == "ok"
          and r.get("state_bytes_per_param") is not None]
    first_set = next((r["set"] for r in ok), None)
    ok = [r for r in ok if r["set"] == first_set]

    def measured(config: str | None, dtype: str, family: str | None = None,
                 contender: str | None = None) -> list[dict]:
        out: dict[str, dict] = {}
        for r in ok:
            if (config is None or r["config"] == config) and r["dtype"] == dtype \
                    and (family is None or r["family"] == family) \
                    and (contender is None or r["contender"] == contender):
                out.setdefault(r["contender"], r)
        return list(out.values())

    rows = []
    base = [r for r in ok if r["family"] == "baseline"]
    if base:
        b = base[0]
        a = configs["adamw"]
        rows.append(["AdamW (torch fused, the baseline)", "fp32", "fp32",
                     fmt_bpp(a["bytes_per_param"]["fp32"]),
                     fmt_bpp(a["state_bytes_per_param"]["fp32"]), "-",
                     f"{b['title']}: {fmt_bpp(b['state_bytes_per_param'])}"])
    seen = set()
    for r in results["results"]:
        cf = configs.get(r["config"], {})
        st = cf.get("storage")
        key = (r["config"], r["dtype"])
        if not st or key in seen:
            continue
        seen.add(key)
        fs = measured(r["config"], r["dtype"], family="fastsched")
        others = [e for e in measured(r["config"], r["dtype"])
                  if e["family"] in ("torch", "library")]
        rows.append([cf["title"], _weights(st, r["dtype"]), _states(st, r["dtype"]),
                     fmt_bpp(cf["bytes_per_param"][r["dtype"]]),
                     fmt_bpp(cf["state_bytes_per_param"][r["dtype"]]),
                     fmt_bpp(fs[0]["state_bytes_per_param"]) if fs else "-",
                     "; ".join(f"{e['title']}: {fmt_bpp(e['state_bytes_per_param'])}"
                               + (f" (+{fmt_bpp(e['other_held_bytes_per_param'])} fp32 "
                                  "master grads)" if e.get("other_held_bytes_per_param") else "")
                               for e in others) or "-"])
    head = ["configuration", "weights", "states", "moved B/param", "held B/param",
            "fastsched held (measured)", "contenders held (measured)"]
    where = (f"{_set_title(sets[first_set])}" if first_set in sets else "no run")
    lines = [f"Bytes per parameter below fp32: moved by one step (read + written: parameter, "
             f"gradient, master, states, 8-bit scales) and held as optimizer state (states, "
             f"scales, fp32 master), for large tensors (8-bit: 1 B per state + 4 B per 256 "
             f"elements); measured: the state tensors after a step, per parameter, on {where}, "
             f"where tensors under 4096 elements keep fp32 states under 8-bit. Generated by "
             f"`fastsched bench --table RESULTS.json`.", ""]
    lines += _md_table(head, rows)
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path) -> bool:
    """A bar chart of % of copy bandwidth per contender: a row per shape set, a column per dtype.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = _groups(results)
    if not groups:
        return False
    set_names = list(dict.fromkeys(g[0]["name"] for g in groups))
    dtypes = list(dict.fromkeys(g[1] for g in groups))
    cell = {(g[0]["name"], g[1]): g for g in groups}
    heights = [max(1, max(sum(r["status"] == "ok" for r in cell[(n, d)][2])
                          for d in dtypes if (n, d) in cell)) for n in set_names]
    fig, axes = plt.subplots(len(set_names), len(dtypes),
                             figsize=(8 * len(dtypes), 1.2 + 0.28 * sum(heights)
                                      + 0.6 * len(set_names)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"torch": "#8c8c8c", "fastsched": "#d9541e", "ceiling": "#4c72b0",
              "baseline": "#bcbcbc", "library": "#8172b3", "plain": "#f4a582"}
    copy = results["copy"]["gbps"]
    for i, name in enumerate(set_names):
        for j, dtype in enumerate(dtypes):
            ax = axes[i, j]
            if (name, dtype) not in cell:
                ax.axis("off")
                continue
            sset, _, entries = cell[(name, dtype)]
            ok = [r for r in entries if r["status"] == "ok"]
            labels = [f"{results['configs'][r['config']]['title']}: {r['title']}" for r in ok]
            vals = [r["pct_copy"] for r in ok]
            y = list(range(len(ok)))[::-1]
            ax.barh(y, vals, color=[colors.get(r["family"], "#4c72b0") for r in ok])
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=7)
            for yi, v, r in zip(y, vals, ok):
                ax.text(v, yi, f" {v:.0f}% ({fmt_time(r['b2b_s']['median'])})", va="center",
                        fontsize=6)
            ax.axvline(100, color="k", lw=0.6, ls="--")
            ax.set_title(f"{_set_title(sset)}, {dtype}", fontsize=8, loc="left")
            ax.set_xlim(0, max([100.0] + vals) * 1.25)
            ax.tick_params(axis="x", labelsize=7)
    for j in range(len(dtypes)):
        axes[-1, j].set_xlabel(f"% of the copy bandwidth measured in the same run "
                               f"({_gbps(copy)})", fontsize=8)
    m = results["meta"]
    fig.suptitle(f"fastsched bench: {m['device']}, {m['date'][:10]}, scale {m['scale']:g}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
