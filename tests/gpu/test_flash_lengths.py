"""Flash forward, backward and decode on CUDA at the lengths models meet, against float64.

tests/kernels/test_flash.py runs its own shapes on CUDA as well; these add lengths on both sides of the tile
sizes and the 8K scale: 1, 1000, 1024, 8000 and 8192 keys, causal and not, bf16 and fp32, heads × dim 32 × 64
and 16 × 128, batch 1. Forward and backward use as many queries as keys; decode 1 or 16 queries against those
keys (the decode kernels take at most 16 queries against at least 4x as many keys; with fewer keys the tiled
forward runs, and causal rows before the first key see nothing), and the GQA case whose decode tiles once
overflowed shared memory: 32 query / 4 key heads of 80, 16 queries. Every case checks out, lse and the
gradients of out·g + lse·g_lse for random g, g_lse.
"""
import pytest
import torch

from longattn.kernels.flash import autograd, flash_attention

from .conftest import DTYPE_IDS, TOLERANCE, assert_all_close, float64_flash_reference, outputs_and_grads, randn

LENGTHS = [1, 1000, 1024, 8000, 8192]
HEADS = [(32, 32, 64), (16, 16, 128)]  # (query heads, key heads, head dim)
DTYPES = [torch.bfloat16, torch.float32]
DECODE_QUERIES = [1, 16]
# 16 queries against 1 key: the tiled forward, 15 causal rows seeing nothing; (1 query, 1 key) is the forward test's
DECODE_CASES = [(*h, sq, sk) for h in HEADS for sq in DECODE_QUERIES for sk in LENGTHS if sq > 1 or sk > 1] + \
               [(32, 4, 80, 16, sk) for sk in LENGTHS]


def case_id(case):
    hq, hkv, d, sq, sk = case
    return f"h{hq}kv{hkv}d{d}-q{sq}k{sk}"


def check_against_float64(hq, hkv, d, sq, sk, causal, dtype):
    torch.manual_seed(sq * 7919 + sk)
    q, k, v = randn(1, hq, sq, d, dtype=dtype), randn(1, hkv, sk, d, dtype=dtype), randn(1, hkv, sk, d, dtype=dtype)
    # bottom-right causal: query i stands at key i + sk - sq and sees nothing before key 0 (lse -inf, out 0)
    seen = torch.arange(sq, device=q.device) + sk - sq >= 0 if causal else torch.ones(sq, dtype=torch.bool,
                                                                                       device=q.device)
    g_out = randn(1, hq, sq, d, dtype=dtype)
    g_lse = randn(1, hq, sq, dtype=torch.float32) * seen
    scale = d ** -0.5
    (out, lse), grads = outputs_and_grads(lambda *x: flash_attention(*x, scale=scale, causal=causal), (q, k, v),
                                          (g_out, g_lse))
    ref_out, ref_lse, ref_grads = float64_flash_reference(q, k, v, g_out.double(), g_lse.double(), scale=scale,
                                                          causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    assert torch.equal(torch.isinf(ref_lse[0, 0]), ~seen)  # the reference agrees with the rows assumed unseen
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse is -inf on other rows than the reference's"
    assert (out[:, :, ~seen] == 0).all(), "rows that see no key must give 0"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(lse.double()[..., seen], ref_lse[..., seen], atol=tol, rtol=tol)
    assert_all_close(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads], tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", LENGTHS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
def test_forward_and_backward_match_float64(heads, length, causal, dtype):
    check_against_float64(*heads, length, length, causal, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_decode_matches_float64(case, causal, dtype, monkeypatch):
    hq, hkv, d, sq, sk = case
    decoded = []
    real = autograd.decode_forward
    monkeypatch.setattr(autograd, "decode_forward", lambda *a, **kw: decoded.append(a[0].shape) or real(*a, **kw))
    check_against_float64(hq, hkv, d, sq, sk, causal, dtype)
    if sk > 1:  # the cases that exist to test the decode kernels must reach them
        assert decoded, f"{sq} queries against {sk} keys did not run the decode kernels"
