"""The standard-op references the MLIR export lowers sites to (`longattn/backends/mlir/decompose.py`): the op's
semantics exactly, its conventions included, and a named refusal for what has no such form. Plain PyTorch: these
run without torch-mlir."""
import pytest
import torch

from longattn.backends.mlir import decompose
from longattn.kernels.flash import flash_attention_reference
from longattn.plan import Band, encode_plan

CASES = [  # (Hq, Hkv, Sq, Sk, causal, mask)
    (4, 4, 6, 6, False, None),
    (4, 2, 6, 6, True, None),          # GQA, causal
    (4, 1, 3, 7, True, None),          # MQA, fewer queries than keys: bottom-right causal
    (2, 2, 7, 3, True, None),          # more queries than keys: the first rows see no key (0, not NaN)
    (4, 2, 5, 5, False, "bool"),       # a keep-mask with whole rows masked
    (4, 2, 5, 5, True, "additive"),    # T5-like bias plus the dtype minimum
]


def _inputs(hq, hkv, sq, sk, mask, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 8, generator=g, dtype=dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, sq, sk, generator=g) > 0.4
        m[0, 0, 1] = False  # a row that sees nothing
    elif mask == "additive":
        m = torch.randn(1, hq, sq, sk, generator=g, dtype=dtype)
        m[..., 0, :2] = torch.finfo(dtype).min
    return q, k, v, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hq,hkv,sq,sk,causal,mask", CASES)
def test_exact_attention_is_the_flash_reference(hq, hkv, sq, sk, causal, mask, dtype):
    q, k, v, m = _inputs(hq, hkv, sq, sk, mask, dtype)
    want, _ = flash_attention_reference(q, k, v, scale=0.3, causal=causal, attn_mask=m)
    got = decompose.exact_attention(q, k, v, m, 0.3, causal)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_attention_reference_takes_the_ops_arguments_and_picks_the_band_by_key_length():
    q, k, v, _ = _inputs(4, 2, 6, 6, None, torch.float32)
    plan = encode_plan([Band("flash", 4), Band("linear", None, {"feature_map": "elu", "sink_tokens": 1,
                                                                 "local_window": 2})])
    want = torch.ops.longattn.attention(q, k, v, None, 0.3, True, 0.0, None, plan)  # the linear band: 6 keys
    got = decompose.attention_reference(q, k, v, None, 0.3, True, 0.0, None, plan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert decompose.check_site(decompose.band_at(plan, 6), q, k, v, None, 0.3, True) < 1e-5


@pytest.mark.parametrize("band,dropout,words", [
    (Band("hyper"), 0.0, "hyper: its key blocks come from a data-dependent LSH sort"),
    (Band("linear", None, {"update_rule": "delta"}), 0.0, "update_rule=delta"),
    (Band("linear", None, {"feature_map": "favor"}), 0.0, "feature_map=favor"),
    (Band("linear", None, {"feature_map": "none", "sink_tokens": 4}), 0.0, "feature_map=none"),
    (Band("flash"), 0.1, "dropout (p=0.1)"),
])
def test_what_has_no_standard_op_form_is_named(band, dropout, words):
    assert words in decompose.why_not(band, dropout, False)
    q, k, v, _ = _inputs(2, 2, 4, 4, None, torch.float32)
    with pytest.raises(ValueError, match="cannot write this attention in standard ops"):
        decompose.attention_reference(q, k, v, None, 0.5, False, dropout, None, encode_plan([band]))


def test_a_long_site_is_checked_at_a_shorter_length_with_its_offset():
    meta = torch.empty(1, 8, 5000, 16, device="meta"), torch.empty(1, 2, 6000, 16, device="meta")
    q_shape, k_shape, v_shape, m_shape = decompose._check_sizes(meta[0], meta[1], meta[1], None)
    assert (q_shape[2], k_shape[2], m_shape) == (1, 128, None)  # 1000 keys ahead of the queries: one row fits
    square = torch.empty(1, 8, 6000, 16, device="meta")
    mask = torch.empty(1, 1, 6000, 6000, device="meta", dtype=torch.bool)
    q_shape, k_shape, _, m_shape = decompose._check_sizes(square, square[:, :2], square[:, :2], mask)
    assert (q_shape[2], k_shape[2], tuple(m_shape)) == (128, 128, (1, 1, 128, 128))
