"""The FX front end: find attention sites in a dynamo or pre-dispatch ATen graph.

One matcher, not a template per model: every op is first read through `fx_ops.canonical`
(so matmul/@/bmm/einsum, transpose/permute/mT, mul/div, casts and views are each one thing),
then the matcher walks back from each softmax to the Q·Kᵀ product and forward to the P·V
product, collecting scale factors and mask terms on the way. SDPA calls become sites directly.
Anything it does not understand makes the site skipped, with the reason.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from .fx_canonicalize import expand_multihead_attention
from .fx_eval import hint, is_symbolic, meta_value
from .fx_ops import Op, canonical, fill_kind, real_users, scalar_value
from .masks import is_zero_mask, prove_causal
from .record import AttentionSite, MaskTerm


class Skip(Exception):
    """Raised inside the matcher with the reason a site is not rewritten."""


def find_attention_sites(gm: fx.GraphModule, frame_path: str = "") -> list[AttentionSite]:
    """Every softmax-attention or SDPA site of the graph, in graph order; skipped ones carry a reason.
    Canonicalises the graph first (expands nn.MultiheadAttention calls), so it may change `gm`
    without changing what it computes. frame_path: see `layer_name`."""
    sites = [AttentionSite(layer=layer_name(node, frame_path), pattern=getattr(node.target, "__name__", str(node.target)),
                           skip_reason=reason) for node, reason in expand_multihead_attention(gm)]
    for node in list(gm.graph.nodes):
        op = canonical(node)
        if op is None or op.name not in ("softmax", "sdpa"):
            continue
        site = AttentionSite(layer=layer_name(node, frame_path), pattern=op.name)
        try:
            if op.name == "softmax":
                _match_softmax(node, op, site)
            else:
                _match_sdpa(node, op, site)
        except Skip as reason:
            site.skip_reason = str(reason)
        sites.append(site)
    return sites


# --- layer names ---------------------------------------------------------------------------

def layer_name(node: fx.Node, frame_path: str = "") -> str:
    """Innermost module path from the node's module stack, as a dotted path (model.layers.7.self_attn).
    Dynamo's paths start at the compiled frame's `self` (L['self']); frame_path is that module's own path
    in the model, when the frame is an inner module's forward (compiled on its own after a graph break)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return frame_path or "<root>"
    raw = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"][^'\"]*['\"]\](\[\d+\])*\.?", "", raw)   # dynamo: L['self'] / L['args'][0]
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
    if frame_path and re.match(r"^L\[['\"]self['\"]\]", raw):
        path = f"{frame_path}.{path}" if path else frame_path
    return path or "<root>"


# --- helpers -------------------------------------------------------------------------------

def _shape(node) -> tuple:
    val = meta_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Skip(f"no shape known for {getattr(node, 'name', node)}")
    return tuple(val.shape)


def _single_user(node: fx.Node, what: str):
    if len(real_users(node)) != 1:
        users = ", ".join(u.name for u in real_users(node))
        raise Skip(f"{what} ({node.name}) has other users ({users}), e.g. output_attentions=True")


def _same_size(a, b) -> bool:
    return a is b or str(a) == str(b)


def _equal_when_it_runs(a, b) -> bool:
    """Sizes the attention's own ops require to be equal (k/v length, batch): the same, or two
    symbols equal at trace time, e.g. a KV cache's key and value lengths. The original ops fail
    when they differ (dynamo specialises sizes 0 and 1, so two symbols cannot broadcast), and so
    does our op (check_qkv): an error either way, never a different result. Not for is_causal's
    q_len == k_len, where a mismatch would silently change the alignment."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal_when_it_runs(x, y) for x, y in zip(a, b))
    return _same_size(a, b) or ((is_symbolic(a) or is_symbolic(b)) and hint(a) == hint(b))


def _swaps_last_two(op: Op, rank: int) -> bool:
    if op.name == "transpose":
        dims = {d % rank for d in op["dims"]}
        return dims == {rank - 2, rank - 1}
    if op.name == "permute":
        perm = [d % rank for d in op["dims"]]
        return perm == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _peel_scales(node, factors: list) -> fx.Node:
    """Strip single-use constant scale factors off q or k (scale folded into q, d**-0.25 on both)."""
    while isinstance(node, fx.Node):
        op = canonical(node)
        if op is None or op.name != "scale" or len(real_users(node)) != 1 or scalar_value(op["factor"]) is None:
            return node
        f = scalar_value(op["factor"])
        factors.append(1.0 / f if op["divide"] else f)
        node = op.args[0]
    return node


def _peel_repeat_kv(node) -> tuple[fx.Node, int]:
    """See through GQA repeats: x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)
    and x.repeat_interleave(n, dim=1) both mean query head h reads key head h // n."""
    op = canonical(node)
    if op is None:
        return node, 1
    if op.name == "repeat_interleave" and isinstance(op["repeats"], int) and op["dim"] in (1, -3):
        src = op.args[0]
        if len(_shape(src)) == 4:
            return src, op["repeats"]
    if op.name == "reshape":
        inner = canonical(op.args[0])
        if inner is not None and inner.name == "expand":
            grown = canonical(inner.args[0])
            src = None
            if grown is not None and grown.name == "unsqueeze" and grown["dim"] in (2, -3):
                src = grown.args[0]
            elif grown is not None and grown.name == "index":
                idx = grown["index"]
                if len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2]) \
                        and all(i == slice(None) for i in idx[3:]):
                    src = grown.args[0]
            if src is not None and len(_shape(src)) == 4:
                s_src, s_exp, s_out = _shape(src), _shape(op.args[0]), _shape(node)
                if len(s_exp) == 5 and len(s_out) == 4 and _same_size(s_exp[1], s_src[1]) \
                        and all(_same_size(a, b) for a, b in zip(s_out[2:], s_src[2:])):
                    n = s_exp[2]
                    if isinstance(n, int):
                        return src, n
    return node, 1


def _reaches_product(node, steps: int = 12) -> bool:
    """Does this score-chain operand lead back to a matmul/einsum through chain ops only?"""
    for _ in range(steps):
        op = canonical(node)
        if op is None:
            return False
        if op.name in ("matmul", "einsum"):
            return True
        if op.name in ("cast", "identity", "scale", "masked_fill"):
            node = op.args[0]
        elif op.name == "add":
            return _reaches_product(op.args[0], steps) or _reaches_product(op.args[1], steps)
        elif op.name == "where":
            return _reaches_product(op.args[1], steps) or _reaches_product(op.args[2], steps)
        else:
            return False
    return False


def _additive_parts(mask: fx.Node) -> list[MaskTerm]:
    """Split an additive mask into the parts it is built from, so each is judged on its own:
    a sum (T5 eager: position bias + causal mask) or where(keep, bias, dtype-min) (T5 SDPA),
    which equals bias + where(keep, 0, dtype-min) exactly."""
    op = canonical(mask)
    if op is not None and op.name == "identity":
        return _additive_parts(op.args[0])
    if op is not None and op.name == "add" and all(
            isinstance(a, fx.Node) and isinstance(meta_value(a), torch.Tensor) for a in op.args):
        return _additive_parts(op.args[0]) + _additive_parts(op.args[1])
    if op is not None and op.name == "where":
        cond, a, b = op.args
        for fill, other, masked_when in ((b, a, False), (a, b, True)):
            if fill_kind(fill) == "additive" and isinstance(other, fx.Node) \
                    and isinstance(meta_value(other), torch.Tensor) and meta_value(other).is_floating_point():
                part = MaskTerm(cond, "additive", masked_when=masked_when, fill=scalar_value(fill))
                return [part] + _additive_parts(other)
    return [MaskTerm(mask, "additive")]


_EINSUM_QK = re.compile(r"^((?:\.\.\.)?\w*)(\w)(\w),((?:\.\.\.)?\w*)(\w)(\w)->((?:\.\.\.)?\w*)(\w)(\w)$")


def _einsum_operands(op: Op, kind: str):
    """Read an einsum as q·kᵀ ('bhqd,bhkd->bhqk') or p·v ('bhqk,bhkd->bhqd'); the batch dims may be an
    ellipsis ('...qd,...kd->...qk') when both operands have the result's rank (no broadcast over missing dims)."""
    eq = op["equation"].replace(" ", "")
    m = _EINSUM_QK.match(eq)
    if not m or len(op.args) != 2:
        raise Skip(f"einsum '{eq}' is not a batched product")
    b1, i1, j1, b2, i2, j2, b3, i3, j3 = m.groups()
    if not (b1 == b2 == b3):
        raise Skip(f"einsum '{eq}' mixes batch dims")
    if "..." in b1 and len({len(_shape(op.args[0])), len(_shape(op.args[1]))}) != 1:
        raise Skip(f"einsum '{eq}' broadcasts operands of different ranks")
    if kind == "qk" and j1 == j2 and i1 == i3 and i2 == j3 and i1 != i2:
        return op.args[0], op.args[1], False        # k given as (…, Sk, D): not transposed
    if kind == "pv" and j1 == i2 and i1 == i3 and j2 == j3:
        return op.args[0], op.args[1], None
    raise Skip(f"einsum '{eq}' is not a {kind} product")


# --- softmax sites -------------------------------------------------------------------------

def _match_softmax(softmax: fx.Node, op: Op, site: AttentionSite) -> None:
    rank = len(_shape(softmax))
    if rank not in (3, 4):
        raise Skip(f"scores of rank {rank}; only 3-D and 4-D attention is understood")
    if op["dim"] is None or op["dim"] % rank != rank - 1:
        raise Skip(f"softmax over dim {op['dim']}, not the key dimension")
    chain: list[fx.Node] = [softmax]
    fwd_steps: list[str] = []   # after softmax, in data-flow order
    back_steps: list[str] = []  # before softmax, walking backwards

    # forward: probabilities -> P·V
    node, dropout_p = softmax, 0.0
    while True:
        _single_user(node, "attention probabilities")
        user = real_users(node)[0]
        uop = canonical(user)
        if uop is None:
            raise Skip(f"attention probabilities feed {user.target}, not a product with V")
        if uop.name in ("cast", "identity"):
            node = user
        elif uop.name == "dropout":
            p = scalar_value(uop["p"])
            if p is None or not isinstance(uop["training"], bool):
                raise Skip("dropout with a runtime probability or training flag")
            if uop["training"] and p > 0:
                dropout_p = p
                fwd_steps.append(f"dropout({p})")
            node = user
        elif uop.name == "matmul" and uop.args[0] is node and uop.args[1] is not node:
            v = uop.args[1]
            break
        elif uop.name == "einsum" and uop.args and uop.args[0] is node:
            _, v, _ = _einsum_operands(uop, "pv")
            break
        else:
            raise Skip(f"attention probabilities feed {uop.name} ({user.name}), not a product with V")
        chain.append(node)
    pv = user
    fwd_steps.append(uop.name)

    # backward: scores <- Q·Kᵀ, collecting scale factors and mask terms
    factors: list[float] = []
    runtime_scale = None
    terms: list[MaskTerm] = []
    node = op.args[0]
    while True:
        sop = canonical(node)
        if sop is None:
            raise Skip(f"op {node.target if isinstance(node, fx.Node) else node!r} between Q·Kᵀ and softmax "
                       "is not understood (e.g. logit soft-capping)")
        _single_user(node, "attention scores")
        chain.append(node)
        if sop.name in ("cast", "identity"):
            node = sop.args[0]
            continue
        if sop.name == "scale":
            f = scalar_value(sop["factor"])
            if f is not None and f <= 0:
                raise Skip(f"scores scaled by a non-positive factor {f}")
            if f is None:
                if runtime_scale is not None or sop["divide"]:
                    raise Skip("more than one runtime scale factor, or division by one")
                runtime_scale = sop["factor"]
            else:
                factors.append(1.0 / f if sop["divide"] else f)
            back_steps.append("scale")
            node = sop.args[0]
            continue
        if sop.name == "add":
            a, b = sop.args
            a_chain, b_chain = _reaches_product(a), _reaches_product(b)
            if a_chain == b_chain:
                raise Skip("cannot tell the scores from the mask in an addition")
            scores, mask = (a, b) if a_chain else (b, a)
            if not isinstance(mask, fx.Node) or not isinstance(meta_value(mask), torch.Tensor):
                raise Skip("scores shifted by a scalar")
            if factors or runtime_scale is not None:
                raise Skip("an additive mask is scaled together with the scores")
            terms.extend(_additive_parts(mask))
            back_steps.append("add")
            node = scores
            continue
        if sop.name == "masked_fill":
            kind = fill_kind(sop["value"])
            if kind is None:
                raise Skip(f"masked_fill with value {sop['value']!r}: only -inf or the dtype minimum is exact")
            terms.append(MaskTerm(sop.args[1], kind, masked_when=True, fill=scalar_value(sop["value"])))
            back_steps.append("masked_fill")
            node = sop.args[0]
            continue
        if sop.name == "where":
            cond, a, b = sop.args
            if _reaches_product(a) and not _reaches_product(b):
                fill, scores, masked_when = b, a, False
            elif _reaches_product(b) and not _reaches_product(a):
                fill, scores, masked_when = a, b, True
            else:
                raise Skip("where() whose branches are not scores and a fill value")
            kind = fill_kind(fill)
            if kind is None:
                raise Skip(f"where() fill value {fill!r}: only -inf or the dtype minimum is exact")
            terms.append(MaskTerm(cond, kind, masked_when=masked_when, fill=scalar_value(fill)))
            back_steps.append("where")
            node = scores
            continue
        if sop.name == "matmul":
            q, kt = sop.args
            k_transposed = True
            break
        if sop.name == "einsum":
            q, kt, k_transposed = _einsum_operands(sop, "qk")
            break
        raise Skip(f"op {sop.name} ({node.name}) between Q·Kᵀ and softmax is not understood")
    qk = node
    back_steps.append(sop.name)
    site.pattern = "·".join(list(reversed(back_steps)) + ["softmax"] + fwd_steps)

    if _shape(q)[:-2] != _shape(qk)[:-2] or len(_shape(q)) != rank:
        raise Skip("query batch dims are broadcast against the keys")
    # k: undo the transpose, then see through GQA repeats
    if k_transposed:
        kop = canonical(kt)
        if kop is not None and _swaps_last_two(kop, rank) and len(real_users(kt)) == 1:
            k, k_transposed = kop.args[0], False
        else:
            k = kt
    else:
        k = kt
    q = _peel_scales(q, factors)
    k = _peel_scales(k, factors)
    _fill_operands(site, q, k, v, rank, k_transposed)
    site.scale = 1.0
    for f in factors:
        site.scale *= f
    site.scale_ref = runtime_scale
    site.dropout_p = dropout_p
    site.output = pv
    site.replaced = chain + [qk, pv]
    _apply_masks(site, terms, _shape(qk))


def _fill_operands(site: AttentionSite, q, k, v, rank: int, k_transposed: bool) -> None:
    k_src, k_groups = _peel_repeat_kv(k) if not k_transposed and rank == 4 else (k, 1)
    v_src, v_groups = _peel_repeat_kv(v) if rank == 4 else (v, 1)
    if k_groups == v_groups and k_groups > 1:
        k, v, groups = k_src, v_src, k_groups
    else:
        groups = 1
    q_shape, v_shape = _shape(q), _shape(v)
    k_shape = _shape(k)
    if k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    if not _same_size(q_shape[-1], k_shape[-1]):
        raise Skip("q and k head dims differ")
    if rank == 4:
        hq, hk = q_shape[1], k_shape[1]
        if not _equal_when_it_runs(q_shape[0], k_shape[0]) or not _equal_when_it_runs(k_shape[:3], v_shape[:3]):
            raise Skip("q, k and v disagree in batch, heads or length")
        if groups == 1 and not _same_size(hq, hk):
            if hk == 1:
                groups = hq  # MQA by broadcasting one key head
            else:
                raise Skip(f"{hq} query heads against {hk} key heads")
    site.set_operands(q, k, v, q_shape, k_shape, rank, k_transposed, groups)


def _broadcasts(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    return all(a == 1 or _same_size(a, b) for a, b in zip(reversed(shape), reversed(target)))


def _apply_masks(site: AttentionSite, terms: list[MaskTerm], scores_shape: tuple) -> None:
    remaining = []
    for term in terms:
        shape = _shape(term.node)
        if not _broadcasts(shape, scores_shape):
            raise Skip(f"mask {term.node.name} of shape {shape} does not broadcast to the scores {scores_shape}")
        if is_zero_mask(term):
            continue
        proven, why = prove_causal(term, site.q_len, site.k_len) if len(shape) >= 2 else (False, "scalar")
        if proven and not site.causal:
            site.causal, site.causal_proof = True, why
        else:
            remaining.append(term)
            if not site.causal and not site.causal_proof.startswith("not causal"):
                site.causal_proof = f"not causal: {why}"
    site.masks = remaining


# --- SDPA sites ----------------------------------------------------------------------------

def _match_sdpa(node: fx.Node, op: Op, site: AttentionSite) -> None:
    q, k, v = op.args
    rank = len(_shape(q))
    if rank != 4:
        raise Skip(f"SDPA on rank-{rank} inputs; only 4-D is rewritten")
    if not isinstance(op["is_causal"], bool) or scalar_value(op["dropout_p"]) is None:
        raise Skip("SDPA with a runtime is_causal or dropout_p")
    site.pattern = "sdpa" + (" (is_causal)" if op["is_causal"] else "") + (" (gqa)" if op["enable_gqa"] else "")
    k_src, k_groups = _peel_repeat_kv(k)
    v_src, v_groups = _peel_repeat_kv(v)
    if k_groups == v_groups and k_groups > 1:
        k, v = k_src, v_src
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not _equal_when_it_runs(ks[:3], vs[:3]) or not _equal_when_it_runs(qs[0], ks[0]):
        raise Skip("SDPA q, k and v disagree in batch, heads or length")
    hq, hk = qs[1], ks[1]
    groups = 1
    if not _same_size(hq, hk):
        if not isinstance(hq, int) or not isinstance(hk, int) or hq % hk:
            raise Skip(f"{hq} query heads against {hk} key heads")
        groups = hq // hk
    site.q, site.k, site.v = q, k, v
    site.k_transposed = False
    site.groups = groups
    site.num_heads, site.num_kv_heads, site.head_dim = hq, hk, qs[-1]
    site.q_len, site.k_len = qs[-2], ks[-2]
    scale = op["scale"]
    if scale is not None and scalar_value(scale) is None:
        site.scale, site.scale_ref = 1.0, scale
    else:
        d = qs[-1]
        site.scale = scalar_value(scale) if scale is not None else (float(d) ** -0.5 if isinstance(d, int) else None)
        if site.scale is None:
            raise Skip("SDPA default scale with a symbolic head dim")
    site.dropout_p = float(op["dropout_p"])
    site.output = node
    site.replaced = [node]
    if op["is_causal"]:
        if not _same_size(site.q_len, site.k_len):
            raise Skip("is_causal with q_len != k_len: SDPA aligns top-left, our kernels bottom-right")
        site.causal, site.causal_proof = True, "SDPA is_causal=True"
    terms = []
    mask = op["attn_mask"]
    if mask is not None:
        if not isinstance(mask, fx.Node):
            raise Skip("SDPA attn_mask is not a tensor")
        val = meta_value(mask)
        terms.extend([MaskTerm(mask, "boolean", masked_when=False)] if val.dtype == torch.bool
                     else _additive_parts(mask))
    _apply_masks(site, terms, (qs[0], qs[1], qs[2], ks[2]))
