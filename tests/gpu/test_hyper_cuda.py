"""HyperAttention's Triton path on CUDA at 8K and 32K tokens against the float64 reference on the same pattern.

`hyper_attention` (the Triton hash, forward and backward kernels) is compared with
`hyper_attention_from_pattern` in float64 on a pattern built from the same inputs as the Triton path builds it
(`build_pattern` with the Triton hash), so the comparison is of arithmetic alone: the approximation's own error
is the quality benchmarks' business. Parameters are the kind's defaults (block 256, 256 samples, 7 LSH bits,
exact below 4096 keys, 64 sinks, window 256), default and paper variants. Measured on an H200 at 8K (bf16,
bench_hyper.py): forward 2.2e-3, backward 2.4e-3.

Forward cases run at full head counts; cases with gradients use fewer heads, because the reference's autograd
keeps every exact-part score of every row (the kernels' tiles and levels depend on the lengths, not the heads).
"""
import pytest
import torch

from longattn.kernels import Band, encode_plan
from longattn.kernels.flash import flash_attention
from longattn.kernels.hyper import build_pattern, hyper_attention, hyper_attention_from_pattern
from longattn.kernels.hyper.triton_hash import lsh_rank_triton

from .conftest import DTYPE_IDS, TOLERANCE, assert_all_close, outputs_and_grads, randn

BF16, FP32 = torch.bfloat16, torch.float32
# (length, query heads, key heads, head dim, causal, variant, dtype, gradients too)
CASES = [
    (8192, 32, 32, 64, False, "default", BF16, False), (8192, 32, 32, 64, True, "default", BF16, False),
    (8192, 32, 32, 64, False, "paper", BF16, False), (8192, 32, 32, 64, True, "paper", BF16, False),
    (8192, 32, 32, 64, True, "default", FP32, False),
    (32768, 32, 32, 64, True, "default", BF16, False), (32768, 32, 32, 64, True, "paper", BF16, False),
    (32768, 16, 4, 128, True, "default", BF16, False), (32768, 8, 8, 64, False, "default", BF16, False),
    (8192, 8, 2, 64, True, "default", BF16, True), (8192, 8, 8, 64, False, "default", BF16, True),
    (8192, 4, 4, 128, True, "paper", BF16, True), (8192, 4, 2, 64, True, "default", FP32, True),
    (32768, 2, 1, 64, True, "default", BF16, True),
]


def case_id(case):
    s, hq, hkv, d, causal, variant, dtype, grads = case
    return (f"s{s}-h{hq}kv{hkv}d{d}-{'causal' if causal else 'full'}-{variant}-{DTYPE_IDS[dtype]}"
            f"{'-grads' if grads else ''}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_path_matches_float64_reference_on_the_same_pattern(case):
    s, hq, hkv, d, causal, variant, dtype, grads = case
    torch.manual_seed(s + hq)
    q, k, v = randn(1, hq, s, d, dtype=dtype), randn(1, hkv, s, d, dtype=dtype), randn(1, hkv, s, d, dtype=dtype)
    scale = d ** -0.5
    pattern = build_pattern(q, k, causal=causal, variant=variant, scale=scale, rank_fn=lsh_rank_triton)
    kernel = lambda *x: hyper_attention(*x, scale=scale, causal=causal, variant=variant)  # noqa: E731
    reference = lambda *x: hyper_attention_from_pattern(*x, pattern, scale=scale, causal=causal)  # noqa: E731
    tol = TOLERANCE[dtype]
    if grads:
        cotangents = (randn(1, hq, s, d, dtype=dtype), randn(1, hq, s, dtype=FP32))
        (out, lse), got = outputs_and_grads(kernel, (q, k, v), cotangents)
        (ref, ref_lse), want = outputs_and_grads(reference, (q, k, v), cotangents, dtype=torch.float64)
    else:
        with torch.no_grad():
            out, lse = kernel(q, k, v)
            ref, ref_lse = reference(q.double(), k.double(), v.double())
        got = want = ()
    assert out.dtype == dtype and lse.dtype == FP32 and out.shape == ref.shape
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=tol, rtol=tol)
    assert_all_close(["out", "dq", "dk", "dv"][:1 + len(got)], [out, *got], [ref, *want], tol)


def test_the_dispatched_op_picks_flash_or_hyper_by_key_length_and_differentiates_both():
    """torch.ops.longattn.attention, as rewritten models call it: flash below 4096 keys, hyper from there; its
    backward recomputes the band's forward, so its gradients are the direct call's."""
    plan = encode_plan([Band("flash", below=4096), Band("hyper", params={"variant": "default"})])
    for s, direct in ((1000, lambda *x: flash_attention(*x, scale=0.125, causal=True)[0]),
                      (8192, lambda *x: hyper_attention(*x, scale=0.125, causal=True)[0])):
        q, k, v = randn(1, 8, s, 64), randn(1, 2, s, 64), randn(1, 2, s, 64)
        g = randn(1, 8, s, 64)
        op = lambda *x: torch.ops.longattn.attention(*x, None, 0.125, True, 0.0, None, plan)  # noqa: E731
        got = outputs_and_grads(op, (q, k, v), (g,))
        want = outputs_and_grads(direct, (q, k, v), (g,))
        assert_all_close([f"{s} keys: out", "dq", "dk", "dv"], [*got[0], *got[1]],
                         [x.double() for x in (*want[0], *want[1])], 1e-3)
