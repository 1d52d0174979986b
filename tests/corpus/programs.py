"""Hypothesis strategies for a corpus of attention-like programs (issue 34).

Each drawn `Program` is the Python source of a small `torch.nn.Module` (class `Attn`), compiled with
`exec`, so a failing case prints exactly the program that failed. Programs come in two kinds:

  attention   softmax(Q·Kᵀ·scale + mask)·V written one of many ways: layouts (B,H,S,D), (B,S,H,D)
              transposed in, (B·H,S,D), projections from hidden states; products matmul / @ / bmm /
              baddbmm / einsum; the scale on the scores, folded into q, split as d^-¼ over q and k, from
              a constant tensor, or absent; masks from inputs (bool or additive), causal masks built in
              forward from sizes (arange, triu, tril), ALiBi-like biases; casts around the softmax; GQA
              by repeat_interleave / expand+reshape / broadcasting one KV head; dropout (eval and
              train); cross attention (Sq != Sk both ways); and SDPA calls.
  lookalike   something that looks like attention and must not be rewritten: softmax over another
              dim, a data-dependent scale, the scores or probabilities used twice, no V, log_softmax,
              soft-capped logits, top-k renormalised or gated probabilities, a mask added after softmax.

Some attention programs carry masks that look causal and are not (off by one, top-left with
Sq != Sk, a window, a causal mask passed in or held in a buffer): they may be rewritten, but never
as causal, which the tests check with inputs (and buffers) that differ from the ones traced.

Every choice is recorded in `Program.features` (flat str -> str), which the tests use to classify
misses; `Program.describe()` prints features, sizes and source. The generator never builds a row
whose keys are all masked with -inf (eager gives NaN there; the kernels give 0 by design, see the
README), so eager output is always finite and any difference is the rewrite's.
"""
from __future__ import annotations

import math
import random
import textwrap
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_BUFFER_LEN = 32  # a causal buffer (GPT-2 style) is built this long and sliced to the lengths


@dataclass(frozen=True)
class Sizes:
    b: int
    h: int
    hkv: int
    sq: int
    sk: int
    d: int

    @property
    def e(self) -> int:
        """Hidden size of the projection layout."""
        return self.h * self.d

    def value(self, symbol: str) -> int:
        return {"B": self.b, "H": self.h, "Hkv": self.hkv, "Sq": self.sq, "Sk": self.sk, "D": self.d, "E": self.e,
                "BH": self.b * self.h, "BHkv": self.b * self.hkv, "1": 1, "Smax": MAX_BUFFER_LEN}[symbol]


@dataclass(frozen=True)
class InputSpec:
    """One forward argument: its dims as size symbols (see Sizes.value) and what it holds.
    kind: x (random normal), keep (bool, True = attend, key 0 always kept), masked (bool, True = removed, key 0
    never removed), additive (random float bias), gate (positive float), causal_keep (bool: the causal pattern
    when traced, a random keep mask on fresh inputs: a causal-looking mask passed in)."""
    name: str
    dims: tuple
    kind: str = "x"

    def make(self, sizes: Sizes, gen: torch.Generator, fresh: bool) -> torch.Tensor:
        shape = [sizes.value(d) for d in self.dims]
        if self.kind == "x":
            return torch.randn(shape, generator=gen)
        if self.kind == "additive":
            return torch.randn(shape, generator=gen) * 2
        if self.kind == "gate":
            return torch.rand(shape, generator=gen) + 0.5
        if self.kind == "causal_keep" and not fresh:
            sq, sk = shape[-2], shape[-1]
            return causal_keep(sq, sk, bottom_right=sq <= sk).expand(shape).clone()
        keep = torch.rand(shape, generator=gen) > 0.4
        keep[..., 0] = True
        return ~keep if self.kind == "masked" else keep


def causal_keep(sq: int, sk: int, bottom_right: bool = True) -> torch.Tensor:
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(sk)[None, :]
    return cols <= rows + ((sk - sq) if bottom_right else 0)


@dataclass
class Program:
    source: str
    inputs: list
    kind: str                      # "attention" | "lookalike"
    sizes: Sizes
    features: dict = field(default_factory=dict)
    causal: bool = False           # the program applies a bottom-right causal mask, built from sizes, on its own
    static_only: bool = False      # sizes written into the source: runs at the traced sizes only
    training: bool = False         # run in train mode (dropout active)
    dropout_p: float = 0.0         # the dropout the program applies in train mode
    buffer: Optional[str] = None   # a mask buffer the tests overwrite after tracing (must stay a mask)

    def module(self) -> torch.nn.Module:
        namespace = {"torch": torch, "F": F, "math": math, "nn": torch.nn}
        exec(compile(self.source, "<corpus program>", "exec"), namespace)
        torch.manual_seed(0)  # projection weights
        model = namespace["Attn"]()
        return model.train() if self.training else model.eval()

    def make_inputs(self, sizes: Optional[Sizes] = None, seed: int = 0, fresh: bool = False) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        return tuple(spec.make(sizes or self.sizes, gen, fresh) for spec in self.inputs)

    def alt_sizes(self) -> Optional[Sizes]:
        """Other lengths to run a dynamic compile at (same relation of Sq to Sk), or None when the program
        cannot run at other lengths or its traced lengths are 0/1 (which dynamo specialises)."""
        s = self.sizes
        if self.static_only or min(s.sq, s.sk) < 2:
            return None
        delta = 3 if max(s.sq, s.sk) <= 24 else -3
        if min(s.sq, s.sk) + delta < 2:
            return None
        return replace(s, sq=s.sq + delta, sk=s.sk + delta)

    def __repr__(self) -> str:  # hypothesis prints the failing example with this
        return self.describe()

    def describe(self) -> str:
        feats = ", ".join(f"{k}={v}" for k, v in sorted(self.features.items()))
        specs = ", ".join(f"{i.name}{tuple(self.sizes.value(d) for d in i.dims)}:{i.kind}" for i in self.inputs)
        mode = "train" if self.training else "eval"
        return (f"--- corpus program ({self.kind}, {mode}, causal={self.causal}) ---\n{feats}\n"
                f"sizes {self.sizes}\ninputs {specs}\n{self.source}")


# --- the source builder ---------------------------------------------------------------------

class Builder:
    """Collects __init__ lines, forward lines and inputs, and renders the module source."""

    def __init__(self):
        self.init: list[str] = []
        self.body: list[str] = []
        self.inputs: list[InputSpec] = []
        self.features: dict[str, str] = {}
        self.returns = "o"

    def arg(self, name: str, dims: tuple, kind: str = "x") -> str:
        self.inputs.append(InputSpec(name, dims, kind))
        return name

    def line(self, text: str) -> None:
        self.body.append(text)

    def source(self) -> str:
        args = ", ".join(["self"] + [i.name for i in self.inputs])
        init = "\n".join(["def __init__(self):", "    super().__init__()"] + [f"    {x}" for x in self.init])
        fwd = "\n".join([f"def forward({args}):"] + [f"    {x}" for x in self.body + [f"return {self.returns}"]])
        return "class Attn(torch.nn.Module):\n" + textwrap.indent(init + "\n\n" + fwd, "    ") + "\n"


def _fmt(x: float) -> str:
    return repr(float(x))


# --- sizes --------------------------------------------------------------------------------

def sizes_for(c: "Choices", cross: bool, gqa: bool) -> Sizes:
    b = c.int(1, 2)
    h = c.pick([2, 4, 1, 3])
    hkv = h
    if gqa:
        hkv = c.pick([d for d in (1, 2) if h % d == 0 and d < h] or [h])
    d = c.pick([8, 16, 4])
    sq = c.int(2, 24)
    sk = sq
    if cross:
        sk = c.pick([x for x in range(1, 25) if x != sq])
    if c.int(0, 9) == 0:
        sq = 1  # one query (a decode step)
        sk = sk if cross else 1
    return Sizes(b, h, hkv, sq, sk, d)


# --- attention programs ---------------------------------------------------------------------

LAYOUTS = ["bhsd", "bshd", "3d", "3d_from_4d", "proj"]
QK_PRODUCTS_4D = ["matmul", "at", "einsum", "bmm_reshaped", "einsum_ellipsis"]
QK_PRODUCTS_3D = ["bmm", "matmul", "at", "einsum", "baddbmm"]
KT_SPELLINGS = ["transpose(-2, -1)", "transpose(-1, -2)", "mT", "permute", "swapaxes"]
SCALES = ["scores_mul", "scores_div", "q_folded", "split", "none", "scores_rmul", "rsqrt_tensor", "imul"]
SOFTMAXES = ["torch.softmax", "F.softmax", "method", "module", "positive_dim"]
MASKS = ["none", "input_bool", "input_additive", "causal_arange", "causal_triu", "causal_tril", "causal_float",
         "alibi", "alibi_causal", "causal_and_padding", "bad_fill"]
GQAS = ["repeat_interleave", "expand_reshape", "broadcast_one", "repeat_interleave_fn"]


def attention_program(c: "Choices", lookalike: Optional[str] = None, mask_lookalike: Optional[str] = None) -> Program:
    """softmax(Q·Kᵀ·scale + mask)·V in one of many spellings (see the module docstring); `lookalike` twists it
    into something that must be left alone, `mask_lookalike` gives it a causal-looking mask that is not causal."""
    b = Builder()
    sdpa = lookalike is None and mask_lookalike is None and c.int(0, 4) == 4
    layout = c.pick(LAYOUTS)
    four_d = layout not in ("3d", "3d_from_4d")
    cross = c.flag()
    if mask_lookalike == "top_left_cross":
        cross = True
    gqa = four_d and layout != "proj" and c.int(0, 3) == 0
    sizes = sizes_for(c, cross, gqa)
    if mask_lookalike in ("triu_diag0", "triu_diag2", "window", "top_left_cross") and sizes.sq > sizes.sk:
        sizes = replace(sizes, sq=sizes.sk, sk=sizes.sq)  # these need every row to keep a key
    if mask_lookalike == "top_left_cross" and sizes.sq == sizes.sk:
        sizes = replace(sizes, sk=sizes.sk + 3)
    if mask_lookalike == "buffer_causal" and sizes.sq > sizes.sk:
        sizes = replace(sizes, sq=sizes.sk, sk=sizes.sq)
    if mask_lookalike == "window" and sizes.sk < 2:
        sizes = replace(sizes, sk=sizes.sk + 2)  # a window narrower than the keys: not causal at these sizes
    if mask_lookalike == "triu_diag2" and sizes.sq < 2:
        sizes = replace(sizes, sq=2, sk=max(2, sizes.sk))  # one query: one key too many is every key, causal
    size_style = c.pick(["shape", "shape", "literal"])
    b.features.update(layout=layout, cross=str(sizes.sq != sizes.sk), size_style=size_style)
    static_only = size_style == "literal"

    _layout_lines(b, c, layout, sizes, size_style)
    if gqa and sizes.hkv < sizes.h:
        gqa_kind = "sdpa_enable_gqa" if sdpa and c.flag() else c.pick(
            [g for g in GQAS if g != "broadcast_one" or sizes.hkv == 1])
        b.features["gqa"] = gqa_kind
        if gqa_kind != "sdpa_enable_gqa":
            _gqa_lines(b, gqa_kind, sizes)
    else:
        gqa_kind = "none"

    if sdpa:
        causal, mask_feats = _sdpa_lines(b, c, sizes, four_d, gqa_kind)
        b.features.update(mask_feats)
        program = Program(b.source(), b.inputs, "attention", sizes, b.features, causal=causal,
                          static_only=static_only, dropout_p=0.25 if mask_feats["dropout"] == "dropout" else 0.0)
        _maybe_train(c, program, mask_feats["dropout"])
        return program

    # --- Q·Kᵀ and the scale --------------------------------------------------------------------
    qk = c.pick(QK_PRODUCTS_4D if four_d else QK_PRODUCTS_3D)
    if qk == "bmm_reshaped" and gqa_kind == "broadcast_one":
        qk = "matmul"
    if qk == "einsum_ellipsis" and gqa_kind == "broadcast_one":
        qk = "at"
    scale_value = c.pick(["inv_sqrt_d", "inv_sqrt_d", "const"])
    value = sizes.d ** -0.5 if scale_value == "inv_sqrt_d" else c.pick([0.125, 0.3, 0.5, 1.0, 2.0])
    scale = c.pick(SCALES)
    if scale == "split" and scale_value != "inv_sqrt_d":
        scale = "q_folded"
    if qk == "baddbmm":
        scale = c.pick(["baddbmm_alpha", "baddbmm_alpha", "scores_mul", "none"])
    kt = c.pick(KT_SPELLINGS)
    b.features.update(qk=qk, scale=scale, scale_value=scale_value, kt=kt)
    d_expr = _d_expr(b, c, sizes, size_style)
    _scale_on_operands(b, scale, value, d_expr)
    mask = c.pick(MASKS) if mask_lookalike is None else mask_lookalike
    baddbmm_bias = None
    if qk == "baddbmm" and mask in ("alibi", "input_additive") and c.flag():
        baddbmm_bias = mask  # Bloom: the bias goes in as baddbmm's input, beta=1
    _qk_lines(b, qk, kt, four_d, sizes, scale, value, baddbmm_bias)
    order = "scale_then_mask"
    if scale in ("scores_mul", "scores_div") and mask != "none" and c.int(0, 5) == 0:
        order = "mask_then_scale"
    b.features["order"] = order
    if order == "scale_then_mask":
        _scale_on_scores(b, scale, value, d_expr)
    causal = _mask_lines(b, c, mask, sizes, four_d, lookalike, baddbmm_bias)
    if order == "mask_then_scale":
        _scale_on_scores(b, scale, value, d_expr)
    if lookalike in ("softcap", "data_scale_tensor", "data_scale_rows", "data_scale_item", "extra_user_scores"):
        _twist_scores(b, lookalike, c)

    # --- softmax, casts, dropout, P·V --------------------------------------------------------------
    cast = c.pick(["none", "none", "float_and_back", "softmax_dtype", "double_and_back"])
    b.features["cast"] = cast
    if cast in ("float_and_back", "double_and_back"):
        target = "torch.float64" if cast == "double_and_back" else "torch.float32"
        b.line(c.pick([f"s = s.to({target})", "s = s.float()" if cast == "float_and_back"
                                     else "s = s.double()"]))
    _softmax_line(b, c, four_d, cast, lookalike)
    if cast in ("float_and_back", "double_and_back"):
        b.line(c.pick(["p = p.to(q.dtype)", "p = p.type_as(v)", "p = p.to(v.dtype)"]))
    if cast == "softmax_dtype":
        b.line("p = p.to(q.dtype)")
    if lookalike in ("topk", "gate", "mask_after_softmax", "mask_after_softmax_fill", "extra_user_probs"):
        _twist_probabilities(b, lookalike, c, sizes, four_d)
    dropout = "none" if lookalike else c.pick(["none", "none", "none", "F.dropout", "module",
                                                              "torch.dropout"])
    dropout_p = c.pick([0.1, 0.25, 0.5]) if dropout != "none" else 0.0
    b.features["dropout"] = dropout
    if dropout == "F.dropout":
        b.line(f"p = F.dropout(p, p={dropout_p}, training=self.training)")
    elif dropout == "module":
        b.init.append(f"self.drop = nn.Dropout({dropout_p})")
        b.line("p = self.drop(p)")
    elif dropout == "torch.dropout":
        b.line(f"p = torch.dropout(p, {dropout_p}, self.training)")
    if lookalike == "no_v":
        b.returns = "p"
    else:
        pv = c.pick(["matmul", "at", "einsum"] + ([] if four_d else ["bmm"]))
        b.features["pv"] = pv
        _pv_lines(b, pv, four_d)
        _output_lines(b, layout, sizes)
    kind = "lookalike" if lookalike else "attention"
    if lookalike:
        b.features["lookalike"] = lookalike
    if mask_lookalike:
        b.features["mask_lookalike"] = mask_lookalike
    program = Program(b.source(), b.inputs, kind, sizes, b.features, causal=causal, static_only=static_only,
                      buffer="causal_buf" if mask_lookalike == "buffer_causal" else None)
    if dropout != "none":
        program.dropout_p = dropout_p
        _maybe_train(c, program, dropout)
    return program


def _maybe_train(c, program: Program, dropout: str) -> None:
    if dropout == "none" or program.dropout_p == 0.0:
        program.features["dropout_mode"] = "eval"
        return
    program.training = c.flag()
    program.features["dropout_mode"] = "train" if program.training else "eval"
    if not program.training:
        program.dropout_p = 0.0


def _layout_lines(b: Builder, c, layout: str, s: Sizes, size_style: str) -> None:
    """Inputs, and the lines that bring them to (B, H, S, D) or (B·H, S, D); defines sq, sk (and b, h)."""
    if layout == "proj":
        b.init += [f"self.wq = nn.Linear({s.e}, {s.h * s.d}, bias=False)",
                   f"self.wk = nn.Linear({s.e}, {s.hkv * s.d}, bias=False)",
                   f"self.wv = nn.Linear({s.e}, {s.hkv * s.d}, bias=False)",
                   f"self.wo = nn.Linear({s.h * s.d}, {s.e}, bias=False)"]
        b.arg("x", ("B", "Sq", "E"))
        src = "x"
        if s.sq != s.sk:
            src = b.arg("mem", ("B", "Sk", "E"))
        if size_style == "literal":
            b.line(f"b, sq, sk = {s.b}, {s.sq}, {s.sk}")
        else:
            b.line(f"b, sq, sk = x.shape[0], x.shape[1], {src}.shape[1]")
        b.line(f"q = self.wq(x).view(b, sq, {s.h}, {s.d}).transpose(1, 2)")
        b.line(f"k = self.wk({src}).view(b, sk, {s.hkv}, {s.d}).transpose(1, 2)")
        b.line(f"v = self.wv({src}).view(b, sk, {s.hkv}, {s.d}).transpose(1, 2)")
        return
    if layout == "3d":
        b.arg("q", ("BH", "Sq", "D"))
        b.arg("k", ("BH", "Sk", "D"))
        b.arg("v", ("BH", "Sk", "D"))
    elif layout == "bshd":
        b.arg("q", ("B", "Sq", "H", "D"))
        b.arg("k", ("B", "Sk", "Hkv", "D"))
        b.arg("v", ("B", "Sk", "Hkv", "D"))
        b.line(c.pick(["q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)",
                                     "q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))"]))
    else:
        b.arg("q", ("B", "H", "Sq", "D"))
        b.arg("k", ("B", "Hkv", "Sk", "D"))
        b.arg("v", ("B", "Hkv", "Sk", "D"))
    if size_style == "literal":
        b.line(f"b, sq, sk = {s.b if layout != '3d' else s.b * s.h}, {s.sq}, {s.sk}")
    else:
        b.line(c.pick(["b, sq, sk = q.shape[0], q.shape[-2], k.shape[-2]",
                                     "b, sq, sk = q.size(0), q.size(-2), k.size(-2)"]))
    if layout == "3d_from_4d":
        h = "q.shape[1]" if size_style == "shape" else str(s.h)
        b.line(f"q, k, v = q.reshape(b * {h}, sq, -1), k.reshape(b * {h}, sk, -1), v.reshape(b * {h}, sk, -1)")


def _gqa_lines(b: Builder, kind: str, s: Sizes) -> None:
    n = s.h // s.hkv
    if kind == "repeat_interleave":
        b.line(f"k, v = k.repeat_interleave({n}, dim=1), v.repeat_interleave({n}, dim=1)")
    elif kind == "repeat_interleave_fn":
        b.line(f"k, v = torch.repeat_interleave(k, {n}, dim=1), torch.repeat_interleave(v, {n}, dim=1)")
    elif kind == "expand_reshape":
        for t in ("k", "v"):
            b.line(f"{t} = {t}[:, :, None, :, :].expand(b, {s.hkv}, {n}, sk, {t}.shape[-1])"
                   f".reshape(b, {s.h}, sk, {t}.shape[-1])")
    # broadcast_one: one KV head broadcasts against the query heads in the products


def _d_expr(b: Builder, c, s: Sizes, size_style: str) -> str:
    """How the program spells the head dim: from q's shape (symbolic under dynamic=True), a module
    attribute (a constant even then), or a literal."""
    style = "literal" if size_style == "literal" else c.pick(["attr", "shape", "literal"])
    b.features["d_style"] = style
    if style == "attr":
        b.init.append(f"self.head_dim = {s.d}")
        return "self.head_dim"
    if style == "shape":
        b.line("d = q.shape[-1]")
        return "d"
    return str(s.d)


def _scale_on_operands(b: Builder, scale: str, value: float, d_expr: str) -> None:
    inv = b.features.get("scale_value") == "inv_sqrt_d"
    if scale == "q_folded":
        b.line(f"q = q * {d_expr} ** -0.5" if inv else f"q = q * {_fmt(value)}")
    elif scale == "split":
        b.line(f"q = q * {d_expr} ** -0.25")
        b.line(f"k = k / {d_expr} ** 0.25")


def _scale_expr(value: float, d_expr: str, divide: bool, is_inv_sqrt_d: bool) -> str:
    if is_inv_sqrt_d:
        return f"math.sqrt({d_expr})" if divide else f"{d_expr} ** -0.5"
    return _fmt(1.0 / value) if divide else _fmt(value)


def _scale_on_scores(b: Builder, scale: str, value: float, d_expr: str) -> None:
    inv = b.features.get("scale_value") == "inv_sqrt_d"
    if scale == "scores_mul":
        b.line(f"s = s * {_scale_expr(value, d_expr, False, inv)}")
    elif scale == "scores_rmul":
        b.line(f"s = {_scale_expr(value, d_expr, False, inv)} * s")
    elif scale == "imul":
        b.line(f"s *= {_scale_expr(value, d_expr, False, inv)}")
    elif scale == "scores_div":
        b.line(f"s = s / {_scale_expr(value, d_expr, True, inv)}")
    elif scale == "rsqrt_tensor":
        base = f"float({d_expr})" if inv else _fmt(1.0 / value ** 2)
        b.line(f"s = s * torch.rsqrt(torch.tensor({base}))")


def _kt(kt: str, four_d: bool) -> str:
    if kt == "mT":
        return "k.mT"
    if kt == "permute":
        return "k.permute(0, 1, 3, 2)" if four_d else "k.permute(0, 2, 1)"
    if kt == "swapaxes":
        return "k.swapaxes(-1, -2)"
    return f"k.{kt}"


def _qk_lines(b: Builder, qk: str, kt: str, four_d: bool, s: Sizes, scale: str, value: float,
              baddbmm_bias: Optional[str]) -> None:
    kt_expr = _kt(kt, four_d)
    if qk == "matmul":
        b.line(f"s = torch.matmul(q, {kt_expr})")
    elif qk == "at":
        b.line(f"s = q @ {kt_expr}")
    elif qk == "bmm":
        b.line(f"s = torch.bmm(q, {kt_expr})")
    elif qk == "einsum":
        b.line('s = torch.einsum("bhqd,bhkd->bhqk", q, k)' if four_d else 's = torch.einsum("bqd,bkd->bqk", q, k)')
    elif qk == "einsum_ellipsis":
        b.line('s = torch.einsum("...qd,...kd->...qk", q, k)')
    elif qk == "bmm_reshaped":
        b.line(f"s = torch.bmm(q.reshape(-1, sq, q.shape[-1]), k.reshape(-1, sk, k.shape[-1]).transpose(1, 2))"
               f".view(b, -1, sq, sk)")
    elif qk == "baddbmm":
        alpha = _fmt(value) if scale == "baddbmm_alpha" else "1.0"
        if baddbmm_bias is None:
            b.line(f"bias = torch.zeros(q.shape[0], sq, sk, dtype=q.dtype, device=q.device)")
            beta = "0.0"
        else:
            beta = "1.0"
            if baddbmm_bias == "alibi":  # Bloom: slopes x key position, (B·H, 1, Sk), added to every query row
                b.line(f"slopes = torch.pow(2.0, -8.0 * torch.arange(1, {s.h} + 1, device=q.device) / {s.h})")
                b.line("bias = (slopes[:, None, None] * torch.arange(sk, device=q.device)[None, None, :])"
                       f".repeat(q.shape[0] // {s.h}, 1, 1)")
            else:
                b.line("bias = " + b.arg("mask", ("BH", "Sq", "Sk"), "additive"))
        b.line(f"s = torch.baddbmm(bias, q, {kt_expr}, beta={beta}, alpha={alpha})")


# --- masks ----------------------------------------------------------------------------------

FILLS = {"-inf": 'float("-inf")', "min": "torch.finfo(s.dtype).min", "min32": "torch.finfo(torch.float32).min"}


def _apply_bool(b: Builder, c, var: str, polarity: str, fill: str) -> None:
    """Apply bool mask `var` (polarity keep: True = attend; masked: True = removed) to the scores s."""
    how = c.pick(["masked_fill", "where", "additive"])
    b.features["apply"] = how
    f = FILLS.get(fill, fill)
    removed = f"~{var}" if polarity == "keep" else var
    if how == "masked_fill":
        b.line(f"s = s.masked_fill({removed}, {f})")
    elif how == "where":
        b.line(f"s = torch.where({var}, s, {f})" if polarity == "keep" else f"s = torch.where({var}, {f}, s)")
    else:
        b.line(f"s = s + torch.where({var}, 0.0, {f})" if polarity == "keep"
               else f"s = s + torch.where({var}, {f}, 0.0)")


def _mask_dims(c, b: Builder, four_d: bool, full_ok: bool = True) -> tuple:
    if four_d:
        options = [("B", "1", "Sq", "Sk"), ("Sq", "Sk"), ("B", "1", "1", "Sk")]
        if full_ok and "gqa" not in b.features and b.features.get("layout") != "proj":
            options.append(("B", "H", "Sq", "Sk"))
        return c.pick(options)
    return c.pick([("BH", "Sq", "Sk"), ("Sq", "Sk")])


def _causal_keep_lines(b: Builder, c, how: str, offset: str) -> tuple:
    """Lines defining a causal mask with the given diagonal offset (keys visible: j <= i + offset); returns
    (variable, polarity)."""
    dev = "device=s.device"
    if how == "causal_arange":
        style = c.pick(["index", "unsqueeze", "difference"])
        b.line(f"i = torch.arange(sq, {dev})")
        b.line(f"j = torch.arange(sk, {dev})")
        if style == "index":
            b.line(f"keep = j[None, :] <= i[:, None] + ({offset})")
        elif style == "unsqueeze":
            b.line(f"keep = j.unsqueeze(0) <= i.unsqueeze(-1) + ({offset})")
        else:
            b.line(f"keep = (j.view(1, -1) - i.view(-1, 1)) <= ({offset})")
        return "keep", "keep"
    if how == "causal_triu":
        b.line(f"masked = torch.triu(torch.ones(sq, sk, dtype=torch.bool, {dev}), diagonal=1 + ({offset}))")
        return "masked", "masked"
    if how == "causal_tril":
        style = c.pick(["bool", "float_eq"])
        if style == "bool":
            b.line(f"keep = torch.tril(torch.ones(sq, sk, dtype=torch.bool, {dev}), diagonal={offset})")
        else:
            b.line(f"keep = torch.ones(sq, sk, {dev}).tril({offset}) == 1")
        return "keep", "keep"
    raise ValueError(how)


def _offset(b: Builder, s: Sizes, bottom_right: bool, delta: int = 0) -> str:
    base = "sk - sq" if bottom_right else "0"
    return base if delta == 0 else f"{base} + {delta}" if delta > 0 else f"{base} - {-delta}"


def _mask_lines(b: Builder, c, mask: str, s: Sizes, four_d: bool, lookalike: Optional[str],
                baddbmm_bias: Optional[str]) -> bool:
    """The mask part of the scores; returns whether the program's mask includes a proper causal term."""
    b.features["mask"] = mask
    if baddbmm_bias is not None:
        return False  # applied inside baddbmm
    fill = c.pick(["-inf", "min", "min32"])
    if mask == "none":
        return False
    if mask in ("input_bool", "bad_fill"):
        polarity = c.pick(["keep", "masked"])
        var = b.arg("mask", _mask_dims(c, b, four_d), polarity)
        if mask == "bad_fill":
            fill = c.pick(["-10000.0", "-1e9"])
        b.features["fill"] = fill
        _apply_bool(b, c, var, polarity, fill)
        return False
    if mask == "input_additive":
        dims = _mask_dims(c, b, four_d)
        var = b.arg("mask", dims, "additive")
        if len(dims) == 4 and c.flag():
            var = f"{var}[:, :, :, :sk]"  # HF: attention_mask[:, :, :, : key_states.shape[-2]]
        b.line(f"s = s + {var}")
        return False
    if mask in ("alibi", "alibi_causal"):
        _alibi_lines(b, c, s, four_d)
        b.line("s = s + bias")
        if mask == "alibi":
            return False
        mask = c.pick(["causal_arange", "causal_triu", "causal_tril"])
        b.features["causal_how"] = mask
    if mask == "causal_float":
        if s.sq > s.sk:
            return _mask_lines(b, c, "causal_triu", s, four_d, lookalike, None)
        f = FILLS[fill]
        b.line(f"bias = torch.full((sq, sk), {f}, device=s.device).triu(1 + sk - sq)")
        b.line("s = s + bias")
        return True
    if mask == "causal_and_padding":
        var = b.arg("pad", ("B", "1", "1", "Sk") if four_d else ("BH", "1", "Sk"), "keep")
        bottom_right = s.sq <= s.sk
        how = c.pick(["causal_arange", "causal_tril"])
        cvar, _ = _causal_keep_lines(b, c, how, _offset(b, s, bottom_right))
        combine = c.pick(["and", "separate"])
        b.features["combine"] = combine
        b.features["fill"] = fill
        if combine == "and":
            b.line(f"keep = {cvar} & {var}")
            _apply_bool(b, c, "keep", "keep", fill)
            return False  # one mask that reads an input: stays a mask
        _apply_bool(b, c, cvar, "keep", fill)
        _apply_bool(b, c, var, "keep", fill)
        return bottom_right
    if mask in ("causal_arange", "causal_triu", "causal_tril"):
        # bottom-right when there are at least as many keys as queries; top-left otherwise (every row keeps key 0)
        bottom_right = s.sq <= s.sk and not (s.sq < s.sk and c.int(0, 3) == 0)
        b.features["aligned"] = "bottom_right" if bottom_right else "top_left"
        b.features["fill"] = fill
        var, polarity = _causal_keep_lines(b, c, mask, _offset(b, s, bottom_right))
        _apply_bool(b, c, var, polarity, fill)
        return s.sq == s.sk or (bottom_right and s.sq <= s.sk)
    return _mask_lookalike_lines(b, c, mask, s, four_d, fill)


def _alibi_lines(b: Builder, c, s: Sizes, four_d: bool) -> None:
    """An ALiBi-like bias, -slope_h * (distance of key j behind query i), built from aranges in forward."""
    b.line(f"slopes = torch.pow(2.0, -8.0 * torch.arange(1, {s.h} + 1, device=s.device) / {s.h})")
    b.line("rel = torch.arange(sk, device=s.device)[None, :] - torch.arange(sq, device=s.device)[:, None]")
    b.line("bias = slopes[:, None, None] * (rel - (sk - sq))[None].to(s.dtype)")
    if not four_d:
        b.line(f"bias = bias.repeat(s.shape[0] // {s.h}, 1, 1)")


MASK_LOOKALIKES = ["triu_diag0", "triu_diag2", "top_left_cross", "window", "input_causal", "buffer_causal"]


def _mask_lookalike_lines(b: Builder, c, mask: str, s: Sizes, four_d: bool, fill: str) -> bool:
    """Masks that look causal and are not; every row keeps at least one key (or is filled with the dtype
    minimum, which eager and the kernels both turn into a uniform row)."""
    if mask == "triu_diag0":  # masks the diagonal too: row 0 loses its only key when Sq == Sk
        if s.sq == s.sk:
            fill = c.pick(["min", "min32"])
        b.features["fill"] = fill
        var, polarity = _causal_keep_lines(b, c, c.pick(["causal_triu", "causal_arange"]),
                                           _offset(b, s, True, -1))
    elif mask == "triu_diag2":  # one key too many
        b.features["fill"] = fill
        var, polarity = _causal_keep_lines(b, c, c.pick(["causal_triu", "causal_tril"]),
                                           _offset(b, s, True, +1))
    elif mask == "top_left_cross":
        b.features["fill"] = fill
        var, polarity = _causal_keep_lines(b, c, c.pick(["causal_triu", "causal_arange"]),
                                           _offset(b, s, False))
    elif mask == "window":
        w = c.int(1, max(1, s.sk - 1))
        b.features["fill"] = fill
        b.line("i = torch.arange(sq, device=s.device)[:, None]")
        b.line("j = torch.arange(sk, device=s.device)[None, :]")
        b.line(f"keep = (j <= i + (sk - sq)) & (j > i + (sk - sq) - {w})")
        var, polarity = "keep", "keep"
    elif mask == "input_causal":
        b.features["fill"] = fill
        var = b.arg("mask", ("Sq", "Sk"), "causal_keep")
        polarity = "keep"
    elif mask == "buffer_causal":  # GPT-2: a causal buffer sliced to the lengths
        b.features["fill"] = fill
        b.init.append(f"self.register_buffer('causal_buf', torch.tril(torch.ones({MAX_BUFFER_LEN}, {MAX_BUFFER_LEN}, "
                      "dtype=torch.bool)))")
        b.line("keep = self.causal_buf[sk - sq:sk, :sk]")
        var, polarity = "keep", "keep"
    else:
        raise ValueError(mask)
    _apply_bool(b, c, var, polarity, fill)
    return False


# --- softmax, twists, P·V, output -------------------------------------------------------------

def _softmax_line(b: Builder, c, four_d: bool, cast: str, lookalike: Optional[str]) -> None:
    dim = "-1"
    if lookalike == "softmax_dim":
        dim = c.pick(["-2", "1"] if four_d else ["-2", "0"])
    if lookalike == "log_softmax":
        b.line(c.pick([f"p = torch.log_softmax(s, dim={dim})", f"p = F.log_softmax(s, dim={dim})"]))
        b.features["softmax"] = "log_softmax"
        return
    style = c.pick(SOFTMAXES)
    b.features["softmax"] = style
    if style == "positive_dim" and dim == "-1":
        dim = "3" if four_d else "2"
    dtype = ", dtype=torch.float32" if cast == "softmax_dtype" else ""
    if style == "module":
        b.init.append(f"self.softmax = nn.Softmax(dim={dim})")
        b.line("p = self.softmax(s)" if not dtype else f"p = F.softmax(s, dim={dim}{dtype})")
    elif style == "method":
        b.line(f"p = s.softmax(dim={dim}{dtype})")
    elif style == "F.softmax":
        b.line(f"p = F.softmax(s, dim={dim}{dtype})")
    else:
        b.line(f"p = torch.softmax(s, dim={dim}{dtype})")


def _twist_scores(b: Builder, twist: str, c) -> None:
    if twist == "softcap":
        cap = c.pick([5.0, 20.0, 50.0])
        b.line(f"s = torch.tanh(s / {cap}) * {cap}")
    elif twist == "data_scale_tensor":
        b.line("s = s * (q.abs().mean() + 0.5)")
    elif twist == "data_scale_rows":
        b.line("s = s / (q.norm(dim=-1, keepdim=True) + 1.0)")
    elif twist == "data_scale_item":
        b.line("s = s * (float(q.abs().mean()) + 0.5)")
    elif twist == "extra_user_scores":
        b.line("scores = s")
        b.returns = "o, scores"


def _twist_probabilities(b: Builder, twist: str, c, s: Sizes, four_d: bool) -> None:
    if twist == "topk":
        kk = c.int(1, max(1, s.sk - 1))
        kk = min(kk, s.sk)
        b.line(f"top, idx = p.topk(min({kk}, p.shape[-1]), dim=-1)")
        b.line("p = torch.zeros_like(p).scatter(-1, idx, top)")
        b.line("p = p / p.sum(dim=-1, keepdim=True)")
    elif twist == "gate":
        dims = ("B", "H", "Sq", "1") if four_d else ("BH", "Sq", "1")
        if four_d and "gqa" in b.features or b.features.get("layout") == "proj":
            dims = ("B", "1", "Sq", "1")
        gate = b.arg("gate", dims, "gate")
        b.line(c.pick([f"p = p * {gate}", f"p = {gate} * p"]))
    elif twist == "mask_after_softmax":
        m = b.arg("post", ("Sq", "Sk"), "additive")
        b.line(f"p = p + 0.1 * {m}")
    elif twist == "mask_after_softmax_fill":
        m = b.arg("post", ("Sq", "Sk"), "keep")
        b.line(f"p = p.masked_fill(~{m}, 0.0)")
    elif twist == "extra_user_probs":
        b.line("probs = p")
        b.returns = "o, probs"


def _pv_lines(b: Builder, pv: str, four_d: bool) -> None:
    if pv == "matmul":
        b.line("o = torch.matmul(p, v)")
    elif pv == "at":
        b.line("o = p @ v")
    elif pv == "bmm":
        b.line("o = torch.bmm(p, v)")
    else:
        b.line('o = torch.einsum("bhqk,bhkd->bhqd", p, v)' if four_d else 'o = torch.einsum("bqk,bkd->bqd", p, v)')


def _output_lines(b: Builder, layout: str, s: Sizes) -> None:
    if layout == "bshd":
        b.line("o = o.transpose(1, 2).contiguous()")
    elif layout == "proj":
        b.line(f"o = self.wo(o.transpose(1, 2).reshape(b, sq, {s.h * s.d}))")
    elif layout == "3d_from_4d":
        b.line("o = o.view(b, -1, sq, o.shape[-1])")


# --- SDPA -------------------------------------------------------------------------------------

def _sdpa_lines(b: Builder, c, s: Sizes, four_d: bool, gqa_kind: str) -> tuple[bool, dict]:
    """An F.scaled_dot_product_attention call; returns (causal, features)."""
    feats = {"qk": "sdpa"}
    args = ["q", "k", "v"]
    causal = False
    mask = c.pick(["none", "is_causal", "input_bool", "input_additive", "built_causal", "alibi"])
    feats["mask"] = mask
    if mask == "is_causal":
        args.append("is_causal=True")
        causal = s.sq == s.sk
    elif mask == "input_bool":
        args.append("attn_mask=" + b.arg("mask", _mask_dims(c, b, four_d), "keep"))
    elif mask == "input_additive":
        args.append("attn_mask=" + b.arg("mask", _mask_dims(c, b, four_d), "additive"))
    elif mask == "built_causal":
        if s.sq <= s.sk:
            b.line("keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)")
            causal = True
        else:
            b.line("keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()")
        args.append("attn_mask=keep")
    elif mask == "alibi":
        b.line(f"slopes = torch.pow(2.0, -8.0 * torch.arange(1, {s.h} + 1, device=q.device) / {s.h})")
        b.line("rel = torch.arange(sk, device=q.device)[None, :] - torch.arange(sq, device=q.device)[:, None]")
        b.line("bias = slopes[:, None, None] * (rel - (sk - sq))[None].to(q.dtype)")
        if not four_d:
            b.line(f"bias = bias.repeat(q.shape[0] // {s.h}, 1, 1)")
        args.append("attn_mask=bias")
    scale = c.pick(["default", "explicit"])
    feats["scale"] = scale
    if scale == "explicit":
        args.append(f"scale={c.pick([0.125, 0.3, 1.0])}")
    dropout = c.pick(["none", "none", "dropout"])
    feats["dropout"] = dropout
    if dropout == "dropout":
        args.append("dropout_p=0.25 if self.training else 0.0")
    if gqa_kind == "sdpa_enable_gqa":
        args.append("enable_gqa=True")
    b.line(f"o = F.scaled_dot_product_attention({', '.join(args)})")
    _output_lines(b, b.features["layout"], s)
    return causal, feats


# --- the corpus -------------------------------------------------------------------------------

class Choices:
    """Every choice the generator makes goes through here, so one generator serves two sources of choices:
    hypothesis draws (shrinkable) or a seeded random.Random (see `programs`)."""

    def __init__(self, source):
        self.source = source

    def pick(self, options):
        options = list(options)
        return options[self.int(0, len(options) - 1)]

    def flag(self) -> bool:
        return self.int(0, 1) == 1

    def int(self, lo: int, hi: int) -> int:
        if isinstance(self.source, random.Random):
            return self.source.randint(lo, hi)
        return self.source(st.integers(lo, hi))


LOOKALIKES = ["softmax_dim", "data_scale_tensor", "data_scale_rows", "data_scale_item", "extra_user_scores",
              "extra_user_probs", "no_v", "log_softmax", "softcap", "topk", "gate", "mask_after_softmax",
              "mask_after_softmax_fill"]


def mixed_program(c: Choices) -> Program:
    """The corpus mix: about 60% attention, 20% attention with a causal-looking mask, 20% look-alikes."""
    pick = c.pick(["attention"] * 6 + ["mask_lookalike"] * 2 + ["lookalike"] * 2)
    if pick == "attention":
        return attention_program(c)
    if pick == "mask_lookalike":
        return attention_program(c, mask_lookalike=c.pick(MASK_LOOKALIKES))
    return attention_program(c, lookalike=c.pick(LOOKALIKES))


@st.composite
def programs(draw, kind: str = "mixed", **fixed) -> Program:
    """Programs drawn by a seeded random.Random whose seed hypothesis draws. Drawing every choice through
    hypothesis instead (kind="shrinkable" families below) shrinks failures to smaller programs, but its mutations
    repeat programs: 400 draws gave about 150 distinct feature sets, where seeded choices give about 400."""
    c = Choices(random.Random(draw(st.integers(0, 2 ** 64 - 1))))
    return mixed_program(c) if kind == "mixed" else attention_program(c, **fixed)


@st.composite
def shrinkable_programs(draw, **fixed) -> Program:
    """Programs with every choice drawn by hypothesis, so it can shrink a failing one choice by choice."""
    c = Choices(draw)
    return attention_program(c, **fixed) if fixed else mixed_program(c)
