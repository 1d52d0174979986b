"""The `ai.longattn` ops and the ONNX function bodies that let stock onnxruntime run them.

Every rewritten site is one node `ai.longattn::{FlashAttention|HyperAttention|LinearAttention}`:

    inputs   q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq a multiple of Hkv,
             mask: additive, broadcastable to (B, Hq, Sq, Sk), same dtype as q (a scalar 0 when
             the site has no mask: softmax ignores any constant shift)
    output   out (B, Hq, Sq, Dv)
    attrs    scale (float, multiplies q·kᵀ), causal (int, bottom-right aligned: query i sees key
             j iff j <= i + Sk - Sq), plan (string: the policy's length bands as JSON, the same
             format as `torch.ops.longattn.attention`'s plan)

Length-dependent policies are a node attribute the kernel reads: the custom-op library picks the
band for the runtime key length from `plan`, so one node covers every length (no `If`).

The model carries one FunctionProto per op type used, with the same name and domain. The body is
**exact softmax attention for all three** (scale, GQA by repeating K/V, additive mask, causal,
rows that see no key give 0): a model run without our library is correct, only not approximate
and not fast. HyperAttention and LinearAttention approximate only in the library.
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "ai.longattn"
DOMAIN_VERSION = 1
NODE_FOR_KIND = {"exact": "FlashAttention", "flash": "FlashAttention", "hyper": "HyperAttention",
                 "linear": "LinearAttention"}
OP_TYPES = ("FlashAttention", "HyperAttention", "LinearAttention")


def _ref(name: str, ref: str, kind: int) -> AttributeProto:
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def _const(name: str, value, dtype=TensorProto.INT64) -> onnx.NodeProto:
    import numpy as np
    arr = np.array(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name))


def attention_function(op_type: str, elem_type: int, opset: int) -> onnx.FunctionProto:
    """FunctionProto `ai.longattn::op_type` computing exact attention in `elem_type`, written with
    ops whose meaning is the same in every default-domain opset from 13 on."""
    if opset < 13:
        raise ValueError(f"ai.longattn functions need default-domain opset >= 13, the model has {opset}")
    T = elem_type
    n = helper.make_node
    const_scale = n("Constant", [], ["scale_f"])
    const_scale.attribute.append(_ref("value_float", "scale", AttributeProto.FLOAT))
    const_causal = n("Constant", [], ["causal_i"])
    const_causal.attribute.append(_ref("value_int", "causal", AttributeProto.INT))
    nodes = [
        const_scale, n("Cast", ["scale_f"], ["scale_t"], to=T), n("Mul", ["q", "scale_t"], ["q_scaled"]),
        n("Shape", ["q"], ["shape_q"]), n("Shape", ["k"], ["shape_k"]), n("Shape", ["v"], ["shape_v"]),
        _const("i0", [0]), _const("i1", [1]), _const("i2", [2]), _const("i3", [3]),
        _const("s0", 0), _const("s1", 1), _const("s2", 2),
        n("Gather", ["shape_k", "i0"], ["b"]), n("Gather", ["shape_k", "i1"], ["hk"]),
        n("Gather", ["shape_k", "i2"], ["sk"]), n("Gather", ["shape_k", "i3"], ["d"]),
        n("Gather", ["shape_q", "i1"], ["hq"]), n("Gather", ["shape_v", "i3"], ["dv"]),
        n("Div", ["hq", "hk"], ["groups"]),
        # GQA: query head h reads key head h // groups; repeat K and V to Hq heads
        n("Unsqueeze", ["k", "i2"], ["k5"]), n("Concat", ["b", "hk", "groups", "sk", "d"], ["k5_shape"], axis=0),
        n("Expand", ["k5", "k5_shape"], ["k5_rep"]), n("Concat", ["b", "hq", "sk", "d"], ["k_shape"], axis=0),
        n("Reshape", ["k5_rep", "k_shape"], ["k_rep"]),
        n("Unsqueeze", ["v", "i2"], ["v5"]), n("Concat", ["b", "hk", "groups", "sk", "dv"], ["v5_shape"], axis=0),
        n("Expand", ["v5", "v5_shape"], ["v5_rep"]), n("Concat", ["b", "hq", "sk", "dv"], ["v_shape"], axis=0),
        n("Reshape", ["v5_rep", "v_shape"], ["v_rep"]),
        n("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_scaled", "k_t"], ["scores"]), n("Add", ["scores", "mask"], ["scores_masked"]),
        # causal, bottom-right aligned: key j is blocked for query i when j > i + Sk - Sq
        n("Gather", ["shape_q", "s2"], ["sq_s"]), n("Gather", ["shape_k", "s2"], ["sk_s"]),
        n("Range", ["s0", "sq_s", "s1"], ["rows"]), n("Sub", ["sk_s", "sq_s"], ["offset"]),
        n("Add", ["rows", "offset"], ["rows_shifted"]), n("Unsqueeze", ["rows_shifted", "i1"], ["rows_col"]),
        n("Range", ["s0", "sk_s", "s1"], ["cols"]), n("LessOrEqual", ["cols", "rows_col"], ["allowed"]),
        const_causal, n("Cast", ["causal_i"], ["causal_b"], to=TensorProto.BOOL),
        n("Not", ["allowed"], ["outside"]), n("And", ["outside", "causal_b"], ["blocked"]),
        _const("ninf_f", float("-inf"), TensorProto.FLOAT), n("Cast", ["ninf_f"], ["ninf"], to=T),
        n("Where", ["blocked", "ninf", "scores_masked"], ["scores_final"]),
        n("Softmax", ["scores_final"], ["probs_raw"], axis=-1),
        # a row that sees no key is all -inf: softmax gives NaN, the kernels give 0. Only those rows: a NaN or inf
        # input gives NaN rows, as in eager (TopK: the row maximum in every opset from 13 on; ReduceMax is not)
        n("TopK", ["scores_final", "i1"], ["row_max", "row_argmax"], axis=-1),
        n("Cast", ["row_max"], ["row_max_f"], to=TensorProto.FLOAT),  # IsInf takes float16 only from opset 20
        n("IsInf", ["row_max_f"], ["row_empty"], detect_positive=0),
        _const("zero_f", 0.0, TensorProto.FLOAT),
        n("Cast", ["zero_f"], ["zero"], to=T), n("Where", ["row_empty", "zero", "probs_raw"], ["probs"]),
        n("MatMul", ["probs", "v_rep"], ["out"]),
    ]
    defaults = [helper.make_attribute("scale", 1.0), helper.make_attribute("causal", 0),
                helper.make_attribute("plan", "")]
    return helper.make_function(DOMAIN, op_type, ["q", "k", "v", "mask"], ["out"], nodes,
                                [helper.make_opsetid("", opset)], attribute_protos=defaults,
                                doc_string=f"Exact softmax attention: the fallback body of {DOMAIN}::{op_type} "
                                           "(see longattn/rewriter/onnx_functions.py)")
