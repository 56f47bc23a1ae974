"""Write the C++ header of ``kernels/layout.py``: every integer constant, under the same name.

Run by ``setup.py`` before the extension is compiled (``python setup_ext/gen_layout.py OUT``), so
the C++ executor and the Python tables read one declaration; ``fastsched.optim._cpu`` also
compares the compiled constants with layout.py at import and refuses a stale build.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUT = os.path.join(HERE, os.pardir, "kernels", "layout.py")


def constants(path: str = LAYOUT) -> dict[str, int]:
    """The integer constants of layout.py (it imports nothing, so it is executed as is)."""
    ns: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), ns)
    return {k: v for k, v in ns.items()
            if k.isupper() and isinstance(v, int) and not isinstance(v, bool)}


def header(consts: dict[str, int]) -> str:
    lines = ["// Generated from kernels/layout.py by setup_ext/gen_layout.py: do not edit.",
             "#pragma once", "#include <cstdint>", "", "namespace layout {"]
    lines += [f"constexpr int64_t {k} = {v};" for k, v in consts.items()]
    lines += ["", "struct Const { const char* name; int64_t value; };",
              "constexpr Const ALL[] = {"]
    lines += [f'    {{"{k}", {k}}},' for k in consts]
    lines += ["};", "}  // namespace layout", ""]
    return "\n".join(lines)


def write(out: str) -> None:
    text = header(constants())
    old = None
    if os.path.exists(out):
        with open(out) as f:
            old = f.read()
    if old != text:  # unchanged: keep the timestamp (no needless rebuild)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "generated", "layout.h"))
