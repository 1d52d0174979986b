"""The ONNX front end: find attention sites in an ONNX graph, as the FX front end does in FX.

One matcher walking back from each Softmax (nodes read through `onnx_ops.canonical`, so the
TorchScript and dynamo exporters' spellings are one thing), collecting scale factors and mask
terms on the way to the Q·Kᵀ MatMul and forward to the P·V MatMul; fused nodes (ONNX
`Attention`, com.microsoft `MultiHeadAttention`) become sites directly, and the fused forms we do
not rewrite (com.microsoft `Attention`, `GroupQueryAttention`, ...) are reported skipped with the
reason. Value references in the `AttentionSite` are tensor names; `replaced` holds node names.
"""
from __future__ import annotations

import math
from typing import Optional

import onnx

from .onnx_graph import GraphView, NotStatic, attributes, layer_name, resolve, size_choices
from .onnx_masks import is_zero_mask, prove_causal
from .onnx_ops import FLOAT_TYPES, canonical, fill_kind
from .record import AttentionSite, MaskTerm

MS = "com.microsoft"
UNSUPPORTED_FUSED = {
    "Attention": "com.microsoft Attention packs the Q/K/V projections into the op; not rewritten",
    "GroupQueryAttention": "com.microsoft GroupQueryAttention carries a KV cache (seqlens_k, "
                           "total_sequence_length) and rotary embedding inside the op; not rewritten",
    "PackedMultiHeadAttention": "packed (token_offset) attention is not rewritten",
    "PackedAttention": "packed (token_offset) attention is not rewritten",
    "SparseAttention": "block-sparse attention is already approximate; not rewritten",
    "PagedAttention": "paged KV-cache attention is not rewritten",
    "DecoderMaskedMultiHeadAttention": "decoding attention with a KV cache is not rewritten",
}


class Skip(Exception):
    """Raised inside the matcher with the reason a site is not rewritten."""


def find_attention_sites(view: GraphView) -> list[AttentionSite]:
    """Every softmax-attention or fused attention site of the graph, in graph order; skipped ones
    carry a reason. Run shape inference first (`longattn.onnx` does) so shapes are known."""
    sites = []
    for node in view.graph.node:
        site = None
        try:
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                site = AttentionSite(layer=layer_name(node), pattern="softmax")
                _match_softmax(view, node, site)
            elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                site = AttentionSite(layer=layer_name(node), pattern="Attention")
                _match_onnx_attention(view, node, site)
            elif node.domain == MS and node.op_type == "MultiHeadAttention":
                site = AttentionSite(layer=layer_name(node), pattern="com.microsoft.MultiHeadAttention")
                _match_ms_mha(view, node, site)
            elif node.domain == MS and node.op_type in UNSUPPORTED_FUSED:
                site = AttentionSite(layer=layer_name(node), pattern=f"com.microsoft.{node.op_type}",
                                     skip_reason=UNSUPPORTED_FUSED[node.op_type])
        except Skip as reason:
            site.skip_reason = str(reason)
        if site is not None:
            sites.append(site)
    return sites


# --- helpers -------------------------------------------------------------------------------

def _shape(view: GraphView, name: str) -> tuple:
    shape = view.shape(name)
    if shape is None:
        raise Skip(f"no shape known for {name} (run shape inference)")
    return shape


def same_size(a, b) -> bool:
    return a is not None and b is not None and a == b


def _single_user(view: GraphView, name: str, what: str) -> onnx.NodeProto:
    users = view.users(name)
    if len(users) != 1 or users[0] == "<output>":
        names = ", ".join(u if isinstance(u, str) else u.name for u in users)
        raise Skip(f"{what} ({name}) has other users ({names}), e.g. output_attentions=True")
    return users[0]


def _swaps_last_two(perm, rank: int) -> bool:
    return perm is not None and [p % rank for p in perm] == list(range(rank - 2)) + [rank - 1, rank - 2]


def _peel_scales(view: GraphView, name: str, factors: list) -> str:
    """Strip single-use constant scale factors off q or k (scale folded into q, d**-0.25 on both)."""
    while True:
        op = canonical(view, name)
        if op is None or op.name != "scale" or op["factor"] is None or len(view.users(name)) != 1:
            return name
        factors.append(1.0 / op["factor"] if op["divide"] else op["factor"])
        name = op.args[0]


def _peel_repeat_kv(view: GraphView, name: str) -> tuple[str, int]:
    """See through the exporters' GQA repeat: Reshape(Expand(Unsqueeze(x, 2), (B, Hkv, n, S, D)),
    (B, Hkv*n, S, D)) means query head h reads key head h // n."""
    op = canonical(view, name)
    if op is None or op.name != "reshape":
        return name, 1
    expand = canonical(view, op.args[0])
    if expand is None or expand.name != "expand":
        return name, 1
    grown = canonical(view, expand.args[0])
    if grown is None or grown.name != "unsqueeze" or grown["axes"] not in ([2], [-3]):
        return name, 1
    src = grown.args[0]
    s_src, s_exp, s_out = view.shape(src), view.shape(op.args[0]), view.shape(name)
    if s_src is None or s_exp is None or s_out is None or len(s_src) != 4 or len(s_exp) != 5 or len(s_out) != 4:
        return name, 1
    n = s_exp[2]
    if not isinstance(n, int) or any(d is None for d in s_exp):
        # shape inference lost the expanded shape (built with Where/ConstantOfShape): evaluate it,
        # and accept it only if axis 2 alone grows
        try:
            sizes = size_choices(view)[0]
            (target,) = view.evaluate([expand.args[1]], sizes)
            src_sizes = tuple(resolve(d, sizes) for d in s_src)
        except NotStatic:
            return name, 1
        target = [int(x) for x in target]
        if len(target) != 5 or None in src_sizes \
                or any(t not in (1, s) for t, s in zip(target[:2] + target[3:], src_sizes)):
            return name, 1
        n, s_exp = target[2], s_src[:2] + (target[2],) + s_src[2:]
    if not isinstance(n, int) or not same_size(s_exp[1], s_src[1]) \
            or not all(same_size(a, b) for a, b in zip(s_out[2:], s_src[2:])):
        return name, 1
    return src, n


def _reaches_product(view: GraphView, name: str, steps: int = 12) -> bool:
    """Does this score-chain operand lead back to a MatMul through chain ops only?"""
    for _ in range(steps):
        op = canonical(view, name)
        if op is None:
            return False
        if op.name == "matmul":
            return True
        if op.name in ("cast", "identity", "scale"):
            name = op.args[0]
        elif op.name == "add":
            return _reaches_product(view, op.args[0], steps) or _reaches_product(view, op.args[1], steps)
        elif op.name == "where":
            return _reaches_product(view, op.args[1], steps) or _reaches_product(view, op.args[2], steps)
        else:
            return False
    return False


def _is_float_tensor(view: GraphView, name: str) -> bool:
    return view.elem_type(name) in FLOAT_TYPES and view.scalar(name) is None


def additive_parts(view: GraphView, mask: str) -> list[MaskTerm]:
    """Split an additive mask into the parts it is built from, so each is judged on its own: a sum
    (T5: position bias + causal mask), where(keep, bias, dtype-min) = bias + where(keep, 0, min),
    and where(keep, 0, -inf) (the dynamo exporter's SDPA decomposition) = a boolean term."""
    op = canonical(view, mask)
    if op is not None and op.name in ("identity", "cast"):
        return additive_parts(view, op.args[0])
    if op is not None and op.name == "add" and all(_is_float_tensor(view, a) for a in op.args):
        return additive_parts(view, op.args[0]) + additive_parts(view, op.args[1])
    if op is not None and op.name == "where":
        cond, a, b = op.args
        for fill, other, masked_when in ((b, a, False), (a, b, True)):
            kind = fill_kind(view, fill)
            if kind is None:
                continue
            term = MaskTerm(cond, "additive", masked_when=masked_when, fill=view.scalar(fill))
            if view.scalar(other) == 0.0:
                return [term]
            if _is_float_tensor(view, other):
                return [term] + additive_parts(view, other)
    return [MaskTerm(mask, "additive")]


# --- softmax sites -------------------------------------------------------------------------

def _match_softmax(view: GraphView, softmax: onnx.NodeProto, site: AttentionSite) -> None:
    sm = canonical(view, softmax.output[0])
    rank = view.rank(softmax.output[0])
    if rank not in (3, 4):
        raise Skip(f"scores of rank {rank}; only 3-D and 4-D attention is understood")
    if sm["axis"] % rank != rank - 1:
        raise Skip(f"softmax over axis {sm['axis']}, not the key dimension")
    chain: list[str] = [softmax.name]
    fwd_steps: list[str] = []
    back_steps: list[str] = []

    # forward: probabilities -> P·V
    name = softmax.output[0]
    while True:
        users = view.users(name)
        guard = _nan_guard(view, name, users)
        if guard is not None:  # where(isnan(p), 0, p): rows with no key give 0, as our kernels do
            chain.extend(guard)
            name = next(n for n in users if n.op_type == "Where").output[0]
            fwd_steps.append("nan_to_num")
            continue
        user = _single_user(view, name, "attention probabilities")
        uop = canonical(view, user.output[0])
        if uop.name in ("cast", "identity"):
            name = user.output[0]
        elif uop.name == "dropout":
            if uop["training"] is None:
                raise Skip("dropout with a runtime training flag")
            raise Skip(f"dropout in training mode (p={uop['p']}) in an inference graph")
        elif uop.name == "matmul" and uop.args[0] == name and uop.args[1] != name:
            v = uop.args[1]
            break
        else:
            raise Skip(f"attention probabilities feed {user.op_type} ({user.name}), not a product with V")
        chain.append(user.name)
    pv = user
    fwd_steps.append("matmul")

    # backward: scores <- Q·Kᵀ, collecting scale factors and mask terms
    factors: list[float] = []
    runtime_scale = None
    terms: list[MaskTerm] = []
    name = softmax.input[0]
    while True:
        sop = canonical(view, name)
        if sop is None:
            raise Skip(f"scores come from {name}, not a Q·Kᵀ product")
        _single_user(view, name, "attention scores")
        chain.append(sop.node.name)
        if sop.name in ("cast", "identity"):
            name = sop.args[0]
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
            name = sop.args[0]
            continue
        if sop.name == "add":
            a, b = sop.args
            a_chain, b_chain = _reaches_product(view, a), _reaches_product(view, b)
            if a_chain == b_chain:
                raise Skip("cannot tell the scores from the mask in an addition")
            scores, mask = (a, b) if a_chain else (b, a)
            if view.scalar(mask) is not None:
                raise Skip("scores shifted by a scalar")
            if factors or runtime_scale is not None:
                raise Skip("an additive mask is scaled together with the scores")
            terms.extend(additive_parts(view, mask))
            back_steps.append("add")
            name = scores
            continue
        if sop.name == "where":
            cond, a, b = sop.args
            if _reaches_product(view, a) and not _reaches_product(view, b):
                fill, scores, masked_when = b, a, False
            elif _reaches_product(view, b) and not _reaches_product(view, a):
                fill, scores, masked_when = a, b, True
            else:
                raise Skip("where() whose branches are not scores and a fill value")
            kind = fill_kind(view, fill)
            if kind is None:
                raise Skip(f"where() fill value {view.scalar(fill)!r}: only -inf or the dtype minimum is exact")
            terms.append(MaskTerm(cond, kind, masked_when=masked_when, fill=view.scalar(fill)))
            back_steps.append("where")
            name = scores
            continue
        if sop.name == "matmul":
            q, kt = sop.args
            break
        raise Skip(f"op {sop.node.op_type} ({sop.node.name}) between Q·Kᵀ and softmax is not understood "
                   "(e.g. logit soft-capping)")
    back_steps.append("matmul")
    site.pattern = "·".join(list(reversed(back_steps)) + ["softmax"] + fwd_steps)
    qk_shape = _shape(view, name)
    if len(_shape(view, q)) != rank or not all(same_size(a, b) for a, b in zip(_shape(view, q)[:-2], qk_shape[:-2])):
        raise Skip("query batch dims are broadcast against the keys")
    # k: undo the transpose, then see through GQA repeats
    kop = canonical(view, kt)
    k_transposed = True
    k = kt
    if kop is not None and kop.name == "transpose" and _swaps_last_two(kop["perm"], rank) \
            and len(view.users(kt)) == 1:
        k, k_transposed = kop.args[0], False
    q = _peel_scales(view, q, factors)
    if not k_transposed:
        k = _peel_scales(view, k, factors)
    fill_operands(view, site, q, k, v, rank, k_transposed)
    site.scale = math.prod(factors) if factors else 1.0
    site.scale_ref = runtime_scale
    site.output = pv.output[0]
    site.replaced = chain + [pv.name]
    apply_masks(view, site, terms, qk_shape)


def _nan_guard(view: GraphView, name: str, users: list) -> Optional[list[str]]:
    """Node names of Where(IsNaN(p), 0, p) when those are p's only users, else None."""
    if len(users) != 2 or "<output>" in users:
        return None
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    where = next((u for u in users if u.op_type == "Where"), None)
    if isnan is None or where is None or list(where.input[:1]) != [isnan.output[0]] \
            or where.input[2] != name or view.scalar(where.input[1]) != 0.0 or len(view.users(isnan.output[0])) != 1:
        return None
    return [isnan.name, where.name]


def fill_operands(view: GraphView, site: AttentionSite, q: str, k: str, v: str, rank: int, k_transposed: bool,
                  native_gqa: bool = False) -> None:
    """Record q/k/v, seeing through GQA repeats; `native_gqa` when the op itself reads fewer K/V
    heads (ONNX Attention)."""
    k_src, k_groups = _peel_repeat_kv(view, k) if not k_transposed and rank == 4 else (k, 1)
    v_src, v_groups = _peel_repeat_kv(view, v) if rank == 4 else (v, 1)
    if k_groups == v_groups and k_groups > 1:
        k, v, groups = k_src, v_src, k_groups
    else:
        groups = 1
    q_shape, v_shape = _shape(view, q), _shape(view, v)
    k_shape = _shape(view, k)
    if len(k_shape) != rank or len(v_shape) != rank:
        raise Skip("q, k and v differ in rank")
    if k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    if not same_size(q_shape[-1], k_shape[-1]):
        raise Skip("q and k head dims differ")
    if rank == 4:
        hq, hk = q_shape[1], k_shape[1]
        if not same_size(q_shape[0], k_shape[0]) or not all(same_size(a, b) for a, b in zip(k_shape[:3], v_shape[:3])):
            raise Skip("q, k and v disagree in batch, heads or length")
        if groups == 1 and not same_size(hq, hk):
            if hk == 1 and isinstance(hq, int):
                groups = hq  # MQA by broadcasting one key head
            elif native_gqa and isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0:
                groups = hq // hk
            else:
                raise Skip(f"{hq} query heads against {hk} key heads")
    elif not all(same_size(a, b) for a, b in zip(k_shape[:2], v_shape[:2])) or not same_size(q_shape[0], k_shape[0]):
        raise Skip("q, k and v disagree in batch or length")
    site.set_operands(q, k, v, q_shape, k_shape, rank, k_transposed, groups)


def _broadcasts(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    return all(a == 1 or a is None or same_size(a, b) for a, b in zip(reversed(shape), reversed(target)))


def apply_masks(view: GraphView, site: AttentionSite, terms: list[MaskTerm], scores_shape: tuple) -> None:
    remaining = []
    for term in terms:
        shape = _shape(view, term.node)
        if not _broadcasts(shape, scores_shape):
            raise Skip(f"mask {term.node} of shape {shape} does not broadcast to the scores {scores_shape}")
        if is_zero_mask(view, term):
            continue
        proven, why = prove_causal(view, term, site.q_len, site.k_len) if len(shape) >= 2 else (False, "scalar")
        if proven and not site.causal:
            site.causal, site.causal_proof = True, why
        else:
            remaining.append(term)
            if not site.causal and not site.causal_proof.startswith("not causal"):
                site.causal_proof = f"not causal: {why}"
    site.masks = remaining


# --- fused sites ---------------------------------------------------------------------------

def _used_outputs(view: GraphView, node: onnx.NodeProto) -> list[int]:
    return [i for i, o in enumerate(node.output) if o and view.users(o)]


def _mask_terms(view: GraphView, mask: str) -> list[MaskTerm]:
    if view.elem_type(mask) == onnx.TensorProto.BOOL:
        return [MaskTerm(mask, "boolean", masked_when=False)]
    return additive_parts(view, mask)


def _match_onnx_attention(view: GraphView, node: onnx.NodeProto, site: AttentionSite) -> None:
    """ONNX Attention (opset 23): Q (B, Hq, Sq, D), K/V (B, Hkv, Sk, D), attn_mask bool (True =
    attend) or additive, is_causal aligned top-left."""
    ins = list(node.input) + [""] * (7 - len(node.input))
    a = attributes(node)
    if any(ins[4:]):
        raise Skip("Attention with past_key/past_value or nonpad_kv_seqlen (KV cache) is not rewritten")
    if _used_outputs(view, node) != [0]:
        raise Skip("Attention's present_key/value or qk_matmul_output are used")
    if a.get("softcap", 0.0):
        raise Skip(f"Attention with softcap={a['softcap']} (logit soft-capping) is not rewritten")
    q, k, v = ins[:3]
    rank = view.rank(q)
    if rank != 4:
        raise Skip("3-D Attention inputs (B, S, H·D) are not rewritten; 4-D (B, H, S, D) are")
    site.pattern = "Attention" + (" (is_causal)" if a.get("is_causal") else "")
    fill_operands(view, site, q, k, v, 4, False, native_gqa=True)
    qs, ks = _shape(view, site.q), _shape(view, site.k)
    if "scale" in a:
        site.scale = float(a["scale"])
    elif isinstance(qs[-1], int):
        site.scale = float(qs[-1]) ** -0.5
    else:
        raise Skip("Attention default scale with a dynamic head dim")
    site.output = node.output[0]
    site.replaced = [node.name]
    if a.get("is_causal"):
        if not same_size(site.q_len, site.k_len):
            raise Skip("is_causal with q_len != k_len: Attention aligns top-left, our kernels bottom-right")
        site.causal, site.causal_proof = True, "Attention is_causal=1"
    terms = _mask_terms(view, ins[3]) if ins[3] else []
    apply_masks(view, site, terms, (qs[0], qs[1], qs[2], ks[2]))


def _match_ms_mha(view: GraphView, node: onnx.NodeProto, site: AttentionSite) -> None:
    """com.microsoft MultiHeadAttention with separate 3-D query/key/value (B, S, H·D) and at most
    an attention_bias; the rewriter adds the head split and merge around our node."""
    ins = list(node.input) + [""] * (10 - len(node.input))
    a = attributes(node)
    if ins[3]:
        raise Skip("MultiHeadAttention with a packed bias input is not rewritten")
    if ins[4]:
        raise Skip("MultiHeadAttention with key_padding_mask is not rewritten")
    if any(ins[6:]):
        raise Skip("MultiHeadAttention with past key/value (KV cache) is not rewritten")
    if _used_outputs(view, node) != [0]:
        raise Skip("MultiHeadAttention's present key/value outputs are used")
    q, k, v = ins[:3]
    if not k or not v or any(view.rank(x) != 3 for x in (q, k, v)):
        raise Skip("packed or 4-D query/key/value layouts of MultiHeadAttention are not rewritten")
    heads = a.get("num_heads")
    qs, ks, vs = _shape(view, q), _shape(view, k), _shape(view, v)
    if not all(isinstance(x, int) for x in (qs[2], ks[2], vs[2])) or qs[2] % heads or vs[2] % heads:
        raise Skip("MultiHeadAttention hidden sizes must be static multiples of num_heads")
    d = qs[2] // heads
    site.q, site.k, site.v = q, k, v
    site.layout = "bshd"
    site.num_heads = site.num_kv_heads = heads
    site.head_dim = d
    site.q_len, site.k_len = qs[1], ks[1]
    site.scale = float(a["scale"]) if a.get("scale") else d ** -0.5
    site.output = node.output[0]
    site.replaced = [node.name]
    if a.get("unidirectional"):
        if not same_size(site.q_len, site.k_len):
            raise Skip("unidirectional with q_len != k_len is aligned differently from our kernels")
        site.causal, site.causal_proof = True, "MultiHeadAttention unidirectional=1"
    terms = additive_parts(view, ins[5]) if ins[5] else []
    apply_masks(view, site, terms, (qs[0], heads, qs[1], ks[1]))
