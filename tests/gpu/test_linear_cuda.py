"""The linear kind's Triton kernels on CUDA at 8K tokens against the float64 reference: output and gradients.

`linear_attention` (the additive kernels with their backward, the exact sinks/window kernels, the delta rule's
chunked kernels and backward) against `linear_attention_reference` in float64 on the same inputs: batch 1, 8
query / 2 key heads of 64, inputs scaled by 0.5 as in benchmarks/check_linear_cuda.py, which measured on an H200
at 1000 tokens (bf16): output 2e-3, gradients up to 1.1e-2, the delta rule with the elu map 1.7e-2 (output) and
1.4e-2 (gradients). Every feature map family the kernels treat differently: fused in the kernel (identity, elu),
features handed in (favor, hedgehog), the exact part alone (feature_map "none"), and the delta rule.
"""
import pytest
import torch

from longattn.kernels.linear import HYBRID_DEFAULTS, linear_attention, linear_attention_reference

from .conftest import TOLERANCE, assert_all_close, outputs_and_grads, randn

S, HQ, HKV, D = 8192, 8, 2, 64
BF16, FP32 = torch.bfloat16, torch.float32
DELTA = dict(update_rule="delta", normalize=False)  # per-token β drawn by the test
# name -> (linear_attention keywords, dtype, relative tolerance or None for the dtype's default)
CASES = {
    "identity-raw": (dict(feature_map="identity", normalize=False), BF16, None),
    "identity-norm": (dict(feature_map="identity"), BF16, None),
    "elu-norm": (dict(feature_map="elu"), BF16, None),
    "elu-norm-noncausal": (dict(feature_map="elu", causal=False), BF16, None),
    "elu-hybrid": (dict(HYBRID_DEFAULTS), BF16, None),
    "favor": (dict(feature_map="favor", num_features=256), BF16, None),
    "hedgehog-hybrid": (dict(HYBRID_DEFAULTS, feature_map="hedgehog"), BF16, None),
    "window-only": (dict(HYBRID_DEFAULTS, feature_map="none"), BF16, None),
    "delta-identity": (dict(DELTA, feature_map="identity"), BF16, None),
    "delta-elu": (dict(DELTA, feature_map="elu"), BF16, 3e-2),  # 1.7e-2 at 1000 tokens
    # float32 runs the additive products as one tf32 pass (about 5e-4 per product), the delta rule as three
    "elu-hybrid-fp32": (dict(HYBRID_DEFAULTS), FP32, 2e-3),
    # three tf32 passes: measured on an H100 at 8K, out 1.7e-3, dq 1.1e-3, dk 9e-4 (2026-12-08)
    "delta-identity-fp32": (dict(DELTA, feature_map="identity"), FP32, 3e-3),
}


def hedgehog_params(device):
    """A learned map as calibration would give one: per-head weights (D -> 64 features) and biases, random."""
    g = torch.Generator().manual_seed(3)
    params = {"q_weight": torch.randn(HQ, D, 64, generator=g) / 8, "q_bias": torch.randn(HQ, 64, generator=g),
              "k_weight": torch.randn(HKV, D, 64, generator=g) / 8, "k_bias": torch.randn(HKV, 64, generator=g)}
    return {name: t.to(device) for name, t in params.items()}


@pytest.mark.parametrize("name", CASES)
def test_triton_path_matches_float64_reference(name):
    kwargs, dtype, tol = CASES[name]
    kwargs = dict(kwargs, causal=kwargs.get("causal", True))
    q, k, v = (randn(1, h, S, D, dtype=dtype, scale=0.5) for h in (HQ, HKV, HKV))
    if kwargs.get("update_rule") == "delta":
        kwargs["beta"] = torch.rand(1, HKV, S, device=q.device)
    if kwargs["feature_map"] == "hedgehog":
        kwargs["feature_params"] = hedgehog_params(q.device)
    g = randn(1, HQ, S, D, dtype=dtype)
    (out,), got = outputs_and_grads(lambda *x: linear_attention(*x, **kwargs), (q, k, v), (g,))
    (ref,), want = outputs_and_grads(lambda *x: linear_attention_reference(*x, **kwargs), (q, k, v), (g,),
                                     dtype=torch.float64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_all_close(["out", "dq", "dk", "dv"], [out, *got], [ref, *want], tol or TOLERANCE[dtype])
