"""Parameter shape sets of real models, scaled copies of them, and user-given shape lists."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["ShapeSet", "SHAPE_SETS", "get_shape_set", "parse_shapes", "parse_set_names",
           "scale_shape", "ShapeError"]


class ShapeError(ValueError):
    """A shape-set name or a shape list that cannot be used."""


@dataclass(frozen=True)
class ShapeSet:
    """A list of parameter shapes with a name and a sentence saying where it comes from."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str
    scale: float = 1.0
    full: dict = field(default_factory=dict)  # params / tensors before scaling

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def scaled(self, scale: float) -> ShapeSet:
        """The same tensors with about ``scale`` times the elements each (at least 1)."""
        if scale == 1.0:
            return self
        return ShapeSet(self.name, tuple(scale_shape(s, scale) for s in self.shapes),
                        self.description, scale,
                        self.full or {"params": self.params, "tensors": self.tensors})


def scale_shape(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """Scale a shape's element count by ``scale``, leading dimensions first, >= 1 element.

    ``(50257, 768)`` at 0.01 gives ``(503, 767)``; ``(16, 4096)`` gives ``(1, 655)``: a dimension
    that cannot shrink further passes the rest of the factor to the next one, so rows stay rows
    where they can (ALLoRA's per-row units need 2-d parameters).
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    out = []
    f = scale
    for d in shape:
        if abs(f - 1.0) < 0.02:
            out.append(d)
            continue
        nd = max(1, round(d * f))
        f = f * d / nd
        out.append(nd)
    return tuple(out)


def _gpt2_small() -> ShapeSet:
    # HF GPT2LMHeadModel ("gpt2"): Conv1D weights are (in, out); lm_head is tied to wte
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                    # ln_1 weight, bias
                   (d, 3 * d), (3 * d,),          # attn.c_attn
                   (d, d), (d,),                  # attn.c_proj
                   (d,), (d,),                    # ln_2
                   (d, 4 * d), (4 * d,),          # mlp.c_fc
                   (4 * d, d), (d,)]              # mlp.c_proj
    shapes += [(d,), (d,)]                        # ln_f
    return ShapeSet("gpt2", tuple(shapes),
                    "GPT-2 small (HF gpt2): wte 50257x768, wpe 1024x768, 12 blocks of "
                    "ln_1, c_attn 768x2304, c_proj 768x768, ln_2, c_fc 768x3072, c_proj 3072x768 "
                    "(weights and biases), ln_f; lm_head tied")


def _llama_1b() -> ShapeSet:
    # A Llama-style decoder with full multi-head attention and an untied output layer:
    # 2 * 32000 * 2048 + 2048 + 16 * (4 * 2048^2 + 3 * 2048 * 5632 + 2 * 2048) = 953,223,168
    d, v, hidden, layers = 2048, 32000, 5632, 16
    shapes: list[tuple[int, ...]] = [(v, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (d, d), (d, d), (d, d),       # attention_norm, wq, wk, wv, wo
                   (d,), (hidden, d), (d, hidden), (hidden, d)]  # ffn_norm, w1, w2, w3
    shapes += [(d,), (v, d)]                                      # norm, output
    return ShapeSet("llama-1b", tuple(shapes),
                    "Llama-style 1B: vocab 32000, dim 2048, 16 layers of attention_norm, "
                    "wq/wk/wv/wo 2048x2048, ffn_norm, w1/w3 5632x2048, w2 2048x5632; "
                    "tok_embeddings, norm, untied output")


def _lora_7b() -> ShapeSet:
    # Llama-2-7B projections (in -> out): q, k, v, o 4096 -> 4096; gate, up 4096 -> 11008;
    # down 11008 -> 4096. LoRA rank 16: A is (r, in), B is (out, r)
    r, d, hidden, layers = 16, 4096, 11008, 32
    proj = [(d, d), (d, d), (d, d), (d, d), (d, hidden), (d, hidden), (hidden, d)]
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        for fan_in, fan_out in proj:
            shapes += [(r, fan_in), (fan_out, r)]
    return ShapeSet("lora-7b", tuple(shapes),
                    "LoRA rank 16 on q, k, v, o, gate, up, down of the 32 layers of a 7B Llama "
                    "(dim 4096, hidden 11008): A is r x in, B is out x r")


def _many_small() -> ShapeSet:
    return ShapeSet("many-small", tuple([(4096,)] * 2000), "2000 tensors of 4096 elements")


SHAPE_SETS: dict[str, ShapeSet] = {s.name: s for s in
                                   (_gpt2_small(), _llama_1b(), _lora_7b(), _many_small())}


def get_shape_set(name: str) -> ShapeSet:
    try:
        return SHAPE_SETS[name]
    except KeyError:
        raise ShapeError(f"unknown shape set {name!r}; expected one of "
                         f"{', '.join(SHAPE_SETS)}") from None


def parse_set_names(text: str) -> list[str]:
    """``"gpt2,lora-7b"`` -> names, checked against :data:`SHAPE_SETS` (``all``: every set)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ShapeError(f"no shape set named in {text!r}; expected a comma-separated list of "
                         f"{', '.join(SHAPE_SETS)} (or all)")
    if names == ["all"]:
        return list(SHAPE_SETS)
    for n in names:
        get_shape_set(n)
    return list(dict.fromkeys(names))


_DIMS = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*)*$")


def parse_shapes(text: str, name: str = "custom") -> ShapeSet:
    """``"1024x1024,4096,3x3"`` -> a :class:`ShapeSet` of three tensors."""
    items = [t.strip().lower() for t in text.split(",")]
    shapes = []
    for item in items:
        if not _DIMS.match(item):
            raise ShapeError(f"malformed shape {item!r} in {text!r}; expected comma-separated "
                             "shapes of positive integers joined by x, like 1024x1024,4096,3x3")
        shapes.append(tuple(int(d) for d in item.split("x")))
    return ShapeSet(name, tuple(shapes), f"user-given shapes: {text}")
