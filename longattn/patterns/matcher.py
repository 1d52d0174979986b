"""The attention matcher, written once for every graph kind.

A front end hands the matcher an `AttentionGraph`: a small read-only view in which every value
has a canonical op (one vocabulary with normalised arguments), users, a shape and maybe a
constant value. The matcher walks back from a softmax to the Q·Kᵀ product and forward to the P·V
product, collecting scale factors and mask terms on the way, and fills an `AttentionSite`.
Anything it does not understand raises `Skip` with the reason. Values are whatever handles the
graph uses (`fx.Node`, ONNX value names): the matcher only compares them and hands them back.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from .masks import is_zero_mask, prove_causal
from .record import AttentionSite, MaskTerm, fill_kind_of

# How a view lists a graph output among a value's users.
OUTPUT = "<output>"


class Skip(Exception):
    """Raised inside the matcher with the reason a site is not rewritten."""


@dataclass
class Op:
    """A value's op in the shared vocabulary. Attributes, the same for every graph kind: softmax
    `dim`; scale `factor` (a float, or None and `ref` the runtime scalar) and `divide`; dropout `p`
    (None at run time) and `training` (None at run time); transpose `perm` (None if unknown);
    unsqueeze `axes`; masked_fill `value`; einsum `equation`. `cast` is float to float only."""
    name: str
    args: tuple
    attrs: dict
    node: Any = None  # what AttentionSite.replaced lists for this op

    def __getitem__(self, key):
        return self.attrs.get(key)


class AttentionGraph(Protocol):
    """What the matcher reads of a graph (see fx_attention.FxGraph, onnx_attention.OnnxGraph)."""
    rewrites_dropout: bool  # whether a training-mode dropout can be carried into the rewrite

    def op(self, x) -> Optional[Op]: ...
    def users(self, x) -> list: ...                     # the values its readers compute; OUTPUT for a graph output
    def describe(self, x) -> str: ...                   # a value, for a skip reason
    def describe_op(self, x) -> str: ...                # the op computing it, for a skip reason
    def shape(self, x) -> Optional[tuple]: ...          # dims: int, symbolic, or None where unknown
    def scalar(self, x) -> Optional[float]: ...         # a constant with one element
    def is_float_tensor(self, x) -> bool: ...
    def equal_when_it_runs(self, a, b) -> bool: ...     # two sizes the attention's own ops require to be equal
    def expanded_shape(self, expand: Op, x, src_shape: tuple) -> Optional[tuple]: ...
    def nan_guard(self, x) -> Optional[tuple[list, Any]]: ...   # (replaced ops, guarded value) or None
    # evaluating shape-only values, for the causal proofs (masks.py)
    def data_dependencies(self, x) -> list[str]: ...   # the inputs, parameters, ... whose values x reads
    def is_constant(self, x) -> bool: ...
    def size_choices(self, x) -> list: ...              # the sizes a value is evaluated at (masks.Unprovable)
    def proof_sizes(self, x, q_len, k_len) -> list: ...  # ... and those a mask is proven at (masks.Unprovable)
    def size(self, dim, sizes) -> Optional[int]: ...
    def evaluate(self, x, sizes): ...                   # a numpy array (float as float64), or None


def same_size(a, b) -> bool:
    """Two dims known to be equal: the same int, or the same symbol (a SymInt, an ONNX dim_param)."""
    return a is not None and b is not None and (a is b or str(a) == str(b))


def shape_of(g: AttentionGraph, x) -> tuple:
    shape = g.shape(x)
    if shape is None:
        raise Skip(f"no shape known for {g.describe(x)}")
    return shape


def _single_user(g: AttentionGraph, x, what: str):
    users = g.users(x)
    if len(users) != 1 or users[0] == OUTPUT:
        names = ", ".join(g.describe(u) for u in users)
        raise Skip(f"{what} ({g.describe(x)}) has other users ({names}), e.g. output_attentions=True")
    return users[0]


def _not_understood(g: AttentionGraph, x) -> Skip:
    return Skip(f"op {g.describe_op(x)} between Q·Kᵀ and softmax is not understood (e.g. logit soft-capping)")


def _value_text(g: AttentionGraph, x) -> str:
    value = g.scalar(x)
    return repr(value) if value is not None else g.describe(x)


def _swaps_last_two(perm, rank: int) -> bool:
    return perm is not None and [p % rank for p in perm] == list(range(rank - 2)) + [rank - 1, rank - 2]


def _untransposed(g: AttentionGraph, kt, rank: int):
    """k where kt is its single-use transpose of the last two dims, else None."""
    op = g.op(kt)
    if op is not None and op.name == "transpose" and _swaps_last_two(op["perm"], rank) and len(g.users(kt)) == 1:
        return op.args[0]
    return None


def _peel_scales(g: AttentionGraph, x, factors: list):
    """Strip single-use constant scale factors off q or k (scale folded into q, d**-0.25 on both)."""
    while True:
        op = g.op(x)
        if op is None or op.name != "scale" or op["factor"] is None or len(g.users(x)) != 1:
            return x
        factors.append(1.0 / op["factor"] if op["divide"] else op["factor"])
        x = op.args[0]


def _inserts_axis_2(index) -> bool:
    """x[:, :, None] (and x[:, :, None, :, :])."""
    return isinstance(index, tuple) and len(index) >= 3 and index[2] is None \
        and all(i == slice(None) for i in index[:2] + index[3:])


def _peel_repeat_kv(g: AttentionGraph, x) -> tuple[Any, int]:
    """See through GQA repeats: x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D) (also spelt
    unsqueeze(2)) and x.repeat_interleave(n, dim=1) both mean query head h reads key head h // n."""
    op = g.op(x)
    if op is None:
        return x, 1
    if op.name == "repeat_interleave" and isinstance(op["repeats"], int) and op["dim"] in (1, -3):
        s_src = g.shape(op.args[0])
        return (op.args[0], op["repeats"]) if s_src is not None and len(s_src) == 4 else (x, 1)
    if op.name != "reshape":
        return x, 1
    expand = g.op(op.args[0])
    if expand is None or expand.name != "expand":
        return x, 1
    grown = g.op(expand.args[0])
    if grown is None or not (grown.name == "unsqueeze" and grown["axes"] in ([2], [-3])
                             or grown.name == "index" and _inserts_axis_2(grown["index"])):
        return x, 1
    src = grown.args[0]
    s_src, s_out = g.shape(src), g.shape(x)
    if s_src is None or s_out is None or len(s_src) != 4 or len(s_out) != 4:
        return x, 1
    s_exp = g.expanded_shape(expand, op.args[0], s_src)
    if s_exp is None or len(s_exp) != 5 or not isinstance(s_exp[2], int) or not same_size(s_exp[1], s_src[1]) \
            or not all(same_size(a, b) for a, b in zip(s_out[2:], s_src[2:])):
        return x, 1
    return src, s_exp[2]


def _reaches_product(g: AttentionGraph, x, steps: int = 12) -> bool:
    """Does this score-chain operand lead back to a matmul/einsum through chain ops only?"""
    for _ in range(steps):
        op = g.op(x)
        if op is None:
            return False
        if op.name in ("matmul", "einsum"):
            return True
        if op.name in ("cast", "identity", "scale", "masked_fill", "reshape"):
            x = op.args[0]
        elif op.name == "add":
            return _reaches_product(g, op.args[0], steps) or _reaches_product(g, op.args[1], steps)
        elif op.name == "where":
            return _reaches_product(g, op.args[1], steps) or _reaches_product(g, op.args[2], steps)
        else:
            return False
    return False


def additive_parts(g: AttentionGraph, mask) -> list[MaskTerm]:
    """Split an additive mask into the parts it is built from, so each is judged on its own: a sum
    (T5: position bias + causal mask), where(keep, bias, fill) = bias + where(keep, 0, fill) for a
    fill of -inf or the dtype minimum, and where(keep, 0, fill) (T5 SDPA, the dynamo exporter's SDPA
    decomposition) = a term with that fill."""
    op = g.op(mask)
    if op is not None and op.name in ("identity", "cast"):
        return additive_parts(g, op.args[0])
    if op is not None and op.name == "add" and all(g.is_float_tensor(a) for a in op.args):
        return additive_parts(g, op.args[0]) + additive_parts(g, op.args[1])
    if op is not None and op.name == "where":
        cond, a, b = op.args
        for fill, other, masked_when in ((b, a, False), (a, b, True)):
            if fill_kind_of(g.scalar(fill)) is None:
                continue
            term = MaskTerm(cond, "additive", masked_when=masked_when, fill=g.scalar(fill))
            if g.scalar(other) == 0.0:
                return [term]
            if g.is_float_tensor(other):
                return [term] + additive_parts(g, other)
    return [MaskTerm(mask, "additive")]


_EINSUM_QK = re.compile(r"^((?:\.\.\.)?\w*)(\w)(\w),((?:\.\.\.)?\w*)(\w)(\w)->((?:\.\.\.)?\w*)(\w)(\w)$")


def _einsum_operands(g: AttentionGraph, op: Op, kind: str):
    """Read an einsum as q·kᵀ ('bhqd,bhkd->bhqk', or 'bhqd,bhdk->bhqk' with k given transposed) or p·v
    ('bhqk,bhkd->bhqd'); the batch dims may be an ellipsis ('...qd,...kd->...qk') when both operands have the
    result's rank (no broadcast over missing dims). Every letter is one dim: none repeats within a term (a
    diagonal) and the contracted one is neither a batch dim nor in the result (no sum left out)."""
    eq = op["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    m = _EINSUM_QK.match(eq)
    if not m or len(op.args) != 2:
        raise Skip(f"einsum '{eq}' is not a batched product")
    b1, i1, j1, b2, i2, j2, b3, i3, j3 = m.groups()
    if not (b1 == b2 == b3):
        raise Skip(f"einsum '{eq}' mixes batch dims")
    batch = b1.replace("...", "")
    if any(len(set(t)) != len(t) for t in (batch + i1 + j1, batch + i2 + j2, batch + i3 + j3)):
        raise Skip(f"einsum '{eq}' repeats a letter within a term")
    if "..." in b1 and len({len(shape_of(g, op.args[0])), len(shape_of(g, op.args[1]))}) != 1:
        raise Skip(f"einsum '{eq}' broadcasts operands of different ranks")
    if kind == "qk" and i1 == i3 and i1 not in (i2, j2):
        if j1 == j2 and i2 == j3 and j1 != j3:
            return op.args[0], op.args[1], False    # k given as (…, Sk, D): not transposed
        if j1 == i2 and j2 == j3 and j1 != j3:
            return op.args[0], op.args[1], True     # k given as (…, D, Sk)
    if kind == "pv" and j1 == i2 and i1 == i3 and j2 == j3 and j1 not in (i1, j2):
        return op.args[0], op.args[1], None
    raise Skip(f"einsum '{eq}' is not a {kind} product")


def _same_shape(a: tuple, b: Optional[tuple]) -> bool:
    return b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _merged_heads(g: AttentionGraph, x, batch):
    """The 4-D tensor (B, H, S, D) that the 3-D x (B·H, S, D) is a reshape of, merging heads into the batch
    (row-major), where B is `batch` and S, D are x's own; else None. H is not compared: the reshape keeps the
    element count, so it is x's batch over B (dynamic graphs write it as different expressions)."""
    op = g.op(x)
    if op is None or op.name != "reshape":
        return None
    src, shape = op.args[0], g.shape(x)
    src_shape = g.shape(src)
    if shape is None or src_shape is None or len(shape) != 3 or len(src_shape) != 4:
        return None
    if not all(same_size(a, b) for a, b in zip(src_shape[:1] + src_shape[2:], (batch,) + shape[1:])):
        return None
    return src


def _product_of_split_heads(g: AttentionGraph, scores, product):
    """Scores (B, H, Sq, Sk) that are a reshape of the 3-D product q3 @ k3ᵀ, where q3 and k3 are (B, H, ·, D)
    tensors with heads merged into the batch: the same scores as the 4-D product of those tensors, so the site is
    read as 4-D attention on them: the scores' (B, H) split undoes q's merge when both have the same B (the element
    counts fix H), and the product's batch makes k's heads q's. Returns (q, kt, k_transposed)."""
    op, shape, p_shape = g.op(product), shape_of(g, scores), g.shape(product)
    if op is None or op.name != "matmul" or len(shape) != 4 or p_shape is None or len(p_shape) != 3 \
            or not all(same_size(a, b) for a, b in zip(shape[2:], p_shape[1:])):
        raise Skip("scores reshaped after a product that is not a batched Q·Kᵀ")
    q, kt = op.args
    q4 = _merged_heads(g, q, shape[0])
    k3 = _untransposed(g, kt, 3)
    if k3 is not None:
        k4, k_transposed = _merged_heads(g, k3, shape[0]), False
    else:
        k4, k_transposed = _merged_heads(g, kt, shape[0]), True
    if q4 is None or k4 is None:
        raise Skip("scores reshaped after the product, whose operands are not heads merged into the batch")
    return q4, k4, k_transposed


# --- softmax sites -------------------------------------------------------------------------

def match_softmax(g: AttentionGraph, softmax, site: AttentionSite) -> None:
    """Fill `site` from the softmax value `softmax`, or raise Skip."""
    sm = g.op(softmax)
    rank = len(shape_of(g, softmax))
    if rank not in (3, 4):
        raise Skip(f"scores of rank {rank}; only 3-D and 4-D attention is understood")
    if sm["dim"] is None or sm["dim"] % rank != rank - 1:
        raise Skip(f"softmax over dim {sm['dim']}, not the key dimension")
    chain: list = [sm.node]
    fwd_steps: list[str] = []   # after softmax, in data-flow order
    back_steps: list[str] = []  # before softmax, walking backwards

    # forward: probabilities -> P·V
    x, dropout_p = softmax, 0.0
    while True:
        guard = g.nan_guard(x)
        if guard is not None:
            replaced, x = guard
            chain.extend(replaced)
            fwd_steps.append("nan_to_num")
            continue
        user = _single_user(g, x, "attention probabilities")
        uop = g.op(user)
        if uop is not None and uop.name in ("cast", "identity"):
            pass
        elif uop is not None and uop.name == "dropout":
            p, training = uop["p"], uop["training"]
            if p is None or training is None:
                raise Skip("dropout with a runtime probability or training flag")
            if training and not g.rewrites_dropout:
                raise Skip(f"dropout in training mode (p={p}) in an inference graph")
            if training and p > 0:
                dropout_p = p
                fwd_steps.append(f"dropout({p})")
        elif uop is not None and uop.name == "matmul" and uop.args[0] == x and uop.args[1] != x:
            v = uop.args[1]
            break
        elif uop is not None and uop.name == "einsum" and uop.args and uop.args[0] == x:
            _, v, _ = _einsum_operands(g, uop, "pv")
            break
        else:
            raise Skip(f"attention probabilities feed {g.describe_op(user)}, not a product with V")
        chain.append(uop.node)
        x = user
    pv, pv_op = user, uop
    fwd_steps.append(uop.name)

    # backward: scores <- Q·Kᵀ, collecting scale factors and mask terms
    factors: list[float] = []
    runtime_scale = None
    terms: list[MaskTerm] = []
    x = sm.args[0]
    while True:
        sop = g.op(x)
        if sop is None:
            raise _not_understood(g, x)
        _single_user(g, x, "attention scores")
        chain.append(sop.node)
        if sop.name in ("cast", "identity"):
            x = sop.args[0]
            continue
        if sop.name == "scale":
            f = sop["factor"]
            if f is not None and f <= 0:
                raise Skip(f"scores scaled by a non-positive factor {f}")
            if f is None:
                if runtime_scale is not None or sop["divide"]:
                    raise Skip("more than one runtime scale factor, or division by one")
                runtime_scale = sop["ref"]
            else:
                factors.append(1.0 / f if sop["divide"] else f)
            back_steps.append("scale")
            x = sop.args[0]
            continue
        if sop.name == "add":
            a, b = sop.args
            a_chain, b_chain = _reaches_product(g, a), _reaches_product(g, b)
            if a_chain == b_chain:
                raise Skip("cannot tell the scores from the mask in an addition")
            scores, mask = (a, b) if a_chain else (b, a)
            if g.scalar(mask) is not None or g.shape(mask) is None:
                raise Skip("scores shifted by a scalar")
            parts = additive_parts(g, mask)
            if factors or runtime_scale is not None:
                parts = [t for t in parts if not is_zero_mask(g, t)]  # a scaled + 0 is still + 0
                if parts:
                    raise Skip("an additive mask is scaled together with the scores")
            terms.extend(parts)  # zero terms of the rest are dropped in apply_masks
            back_steps.append("add")
            x = scores
            continue
        if sop.name == "masked_fill":
            fill = g.scalar(sop["value"])
            kind = fill_kind_of(fill)
            if kind is None:
                raise Skip(f"masked_fill with value {_value_text(g, sop['value'])}: "
                           "only -inf or the dtype minimum is exact")
            terms.append(MaskTerm(sop.args[1], kind, masked_when=True, fill=fill))
            back_steps.append("masked_fill")
            x = sop.args[0]
            continue
        if sop.name == "where":
            cond, a, b = sop.args
            if _reaches_product(g, a) and not _reaches_product(g, b):
                fill, scores, masked_when = b, a, False
            elif _reaches_product(g, b) and not _reaches_product(g, a):
                fill, scores, masked_when = a, b, True
            else:
                raise Skip("where() whose branches are not scores and a fill value")
            kind = fill_kind_of(g.scalar(fill))
            if kind is None:
                raise Skip(f"where() fill value {_value_text(g, fill)}: only -inf or the dtype minimum is exact")
            terms.append(MaskTerm(cond, kind, masked_when=masked_when, fill=g.scalar(fill)))
            back_steps.append("where")
            x = scores
            continue
        if sop.name == "reshape":
            product = sop.args[0]
            _single_user(g, product, "attention scores")
            inner = g.op(product)
            if inner is not None and inner.name == "reshape" and _same_shape(shape_of(g, x), g.shape(inner.args[0])):
                # reshaped and back (the ONNX export of `s *= c` on a view): the same tensor
                chain.append(inner.node)
                x = inner.args[0]
                continue
            # (B·H, Sq, Sk) from a 3-D product, viewed as (B, H, Sq, Sk)
            q, kt, k_transposed = _product_of_split_heads(g, x, product)
            sop = g.op(product)
            chain.append(sop.node)
            back_steps.append("reshape")
            break
        if sop.name == "matmul":
            q, kt = sop.args
            k_transposed = True
            break
        if sop.name == "einsum":
            q, kt, k_transposed = _einsum_operands(g, sop, "qk")
            break
        raise _not_understood(g, x)
    qk_shape = shape_of(g, x)
    back_steps.append(sop.name)
    site.pattern = "·".join(list(reversed(back_steps)) + ["softmax"] + fwd_steps)

    q_shape = shape_of(g, q)
    if len(q_shape) != rank or not all(g.equal_when_it_runs(a, b) for a, b in zip(q_shape[:-2], qk_shape[:-2])):
        raise Skip("query batch dims are broadcast against the keys")
    # k: undo the transpose, then see through GQA repeats
    k = _untransposed(g, kt, rank) if k_transposed else None
    k, k_transposed = (kt, k_transposed) if k is None else (k, False)
    q = _peel_scales(g, q, factors)
    k = _peel_scales(g, k, factors)
    fill_operands(g, site, q, k, v, rank, k_transposed)
    site.scale = math.prod(factors, start=1.0)
    site.scale_ref = runtime_scale
    site.dropout_p = dropout_p
    site.output = pv
    site.replaced = list(dict.fromkeys(chain + [pv_op.node]))  # once each: one node may hold several ops (baddbmm)
    apply_masks(g, site, terms, qk_shape)


def fill_operands(g: AttentionGraph, site: AttentionSite, q, k, v, rank: int, k_transposed: bool,
                  native_gqa: bool = False) -> None:
    """Record q/k/v, seeing through GQA repeats; `native_gqa` when the op itself reads fewer K/V
    heads (SDPA, ONNX Attention)."""
    k_src, k_groups = _peel_repeat_kv(g, k) if not k_transposed and rank == 4 else (k, 1)
    v_src, v_groups = _peel_repeat_kv(g, v) if rank == 4 else (v, 1)
    if k_groups == v_groups and k_groups > 1:
        k, v, groups = k_src, v_src, k_groups
    else:
        groups = 1
    q_shape, k_shape, v_shape = shape_of(g, q), shape_of(g, k), shape_of(g, v)
    if len(k_shape) != rank or len(v_shape) != rank:
        raise Skip("q, k and v differ in rank")
    if k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    if not same_size(q_shape[-1], k_shape[-1]):
        raise Skip("q and k head dims differ")

    def agree(a: tuple, b: tuple) -> bool:
        return all(g.equal_when_it_runs(x, y) for x, y in zip(a, b))

    if rank == 4:
        hq, hk = q_shape[1], k_shape[1]
        if not agree(q_shape[:1], k_shape[:1]) or not agree(k_shape[:3], v_shape[:3]):
            raise Skip("q, k and v disagree in batch, heads or length")
        if groups == 1 and not same_size(hq, hk):
            if hk == 1 and isinstance(hq, int):
                groups = hq  # MQA by broadcasting one key head
            elif native_gqa and isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0:
                groups = hq // hk
            else:
                raise Skip(f"{hq} query heads against {hk} key heads")
    elif not agree(q_shape[:1], k_shape[:1]) or not agree(k_shape[:2], v_shape[:2]):
        raise Skip("q, k and v disagree in batch or length")
    site.set_operands(q, k, v, q_shape, k_shape, rank, k_transposed, groups)


def _broadcasts(g: AttentionGraph, shape: tuple, target: tuple) -> bool:
    # a dim ONNX shape inference lost (None) is let through: the rewrite's verification runs the original. Two
    # sizes equal when it runs (an ALiBi bias repeated to h·(B·H // h) rows) are let through too: where they differ
    # the original's addition fails, and where the mask's is 1 the op broadcasts it as the addition does.
    return len(shape) <= len(target) and all(
        a == 1 or a is None or g.equal_when_it_runs(a, b) for a, b in zip(reversed(shape), reversed(target)))


def apply_masks(g: AttentionGraph, site: AttentionSite, terms: list[MaskTerm], scores_shape: tuple) -> None:
    """Take the causal part out of the mask terms (proven, never guessed); the rest stay masks."""
    remaining = []
    for term in terms:
        shape = shape_of(g, term.node)
        if not _broadcasts(g, shape, scores_shape):
            raise Skip(f"mask {g.describe(term.node)} of shape {shape} does not broadcast to the scores "
                       f"{scores_shape}")
        if is_zero_mask(g, term):
            continue
        proven, why = prove_causal(g, term, site.q_len, site.k_len) if len(shape) >= 2 else (False, "scalar")
        if proven and not site.causal:
            site.causal, site.causal_proof = True, why
        else:
            remaining.append(term)
            if not site.causal:  # each term's reason: the one that looks causal may not come first
                site.causal_proof = f"{site.causal_proof}; {why}" if site.causal_proof.startswith("not causal") \
                    else f"not causal: {why}"
    site.masks = remaining


def flagged_causal(site: AttentionSite, flag: str, value, op: str) -> None:
    """A fused op's own causal flag: it aligns the mask top-left, our kernels bottom-right, which agree
    only when there are as many queries as keys."""
    if not same_size(site.q_len, site.k_len):
        raise Skip(f"{flag} with q_len != k_len: {op} aligns top-left, our kernels bottom-right")
    site.causal, site.causal_proof = True, f"{op} {flag}={value}"


def fused_scale(site: AttentionSite, scale: Optional[float], op: str) -> None:
    """A fused op's scale: the given one, else its default 1/sqrt(head dim)."""
    if scale is not None:
        site.scale = scale
    elif isinstance(site.head_dim, int):
        site.scale = float(site.head_dim) ** -0.5
    else:
        raise Skip(f"{op} default scale with a symbolic head dim")
