"""The canonical attention record: what every front end produces and every later stage reads.

The policy decides on an `AttentionSite` alone and the emitters rewrite from it, so the FX and
ONNX front ends never leak graph details into the policy. Value references (`q`, `k`, `v`,
`mask`, ...) are front-end handles: `torch.fx.Node` for FX, value names for ONNX.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional


def fill_kind_of(value: Optional[float]) -> Optional[str]:
    """How a masked_fill / where fill value can be expressed exactly, or None if it cannot.

    -inf is a plain boolean mask. A dtype's most negative finite value (HF's finfo.min) swallows
    the score it is added to, so `scores + fill` equals the fill even on rows where every key is
    masked: it is exact as an additive mask. Any other value (e.g. -1e4) changes fully masked
    rows, so such sites are not rewritten.
    """
    if value is None:
        return None
    if value == -math.inf:
        return "boolean"
    if value <= -1e30 or value == -65504.0:
        return "additive"
    return None


@dataclass
class MaskTerm:
    """One mask applied to the scores. `node` is a bool mask in which `masked_when` marks the
    removed positions, or an additive float mask (kind "additive"; `fill` is set when it came
    from masked_fill/where with the dtype minimum, in which case `masked_when` applies too)."""
    node: Any
    kind: str                           # "boolean" | "additive"
    masked_when: Optional[bool] = None
    fill: Optional[float] = None


@dataclass
class AttentionSite:
    layer: str                      # module path, e.g. "model.layers.7.self_attn"
    pattern: str                    # what was seen, e.g. "matmul·scale·add·softmax·matmul" or "sdpa"
    q: Any = None                   # (B, Hq, Sq, D) after canonicalisation
    k: Any = None                   # (B, Hkv, Sk, D), not repeated; (B, Hkv, D, Sk) if k_transposed
    k_transposed: bool = False
    v: Any = None                   # (B, Hkv, Sk, Dv)
    scale: Optional[float] = None   # multiplies q·kᵀ; None when `scale_ref` gives it at run time
    scale_ref: Any = None           # runtime scalar that multiplies the scores (dynamic-shape graphs)
    causal: bool = False            # bottom-right aligned causal mask, proven (see causal_proof)
    causal_proof: str = ""
    masks: list = field(default_factory=list)  # MaskTerms left once the causal part was taken out
    groups: int = 1                 # query heads per key/value head (GQA/MQA), repeat not materialised
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    q_len: Optional[int] = None     # lengths seen when the graph was traced (hints for dynamic graphs)
    k_len: Optional[int] = None
    dropout_p: float = 0.0
    layout: str = "bhsd"
    output: Any = None              # the value the replacement takes over
    replaced: list = field(default_factory=list)  # nodes that become dead once rewritten
    skip_reason: Optional[str] = None

    def set_operands(self, q, k, v, q_shape: tuple, k_shape: tuple, rank: int, k_transposed: bool,
                     groups: int) -> None:
        """Record the operands once a front end has checked them; k_shape is (.., Sk, D)."""
        self.q, self.k, self.v = q, k, v
        self.layout = "bhsd" if rank == 4 else "(b·h)sd"
        self.k_transposed = k_transposed
        self.groups = groups
        self.head_dim = q_shape[-1]
        self.q_len, self.k_len = q_shape[-2], k_shape[-2]
        if rank == 4:
            self.num_heads, self.num_kv_heads = q_shape[1], k_shape[1]
        else:
            self.num_heads = self.num_kv_heads = q_shape[0]

    @property
    def mask_kind(self) -> str:
        kinds = sorted({m.kind for m in self.masks})
        extra = "+".join(kinds) if kinds else "none"
        if self.causal:
            return "causal" if extra == "none" else f"causal+{extra}"
        return extra

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    @property
    def layer_index(self) -> Optional[int]:
        """First integer component of the module path (model.layers.7.self_attn -> 7)."""
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", self.layer)
        return int(match.group(1)) if match else None
