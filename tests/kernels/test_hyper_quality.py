"""longattn.quality: capture of attention calls and error measures, checked with known answers."""
import torch

from longattn.kernels import Band, encode_plan
from longattn.kernels.flash import flash_attention_reference
from longattn.kernels.hyper import hyper_attention
from longattn.quality import capture_attention, error_table, site_errors

SMALL = dict(block_size=4, sample_size=5, lsh_bits=3, min_seq_len=8, sink_tokens=2, local_window=3)


def _two_layer_model(q, k, v):
    x = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return torch.nn.functional.scaled_dot_product_attention(x, k, v, attn_mask=keep, scale=0.5)


def test_capture_records_each_sdpa_call_and_recognises_a_materialised_causal_mask():
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    with capture_attention() as sites:
        _two_layer_model(q, k, v)
    assert [s.index for s in sites] == [0, 1]
    assert all(s.causal and s.skipped is None for s in sites)
    assert sites[1].scale == 0.5 and torch.equal(sites[0].q, q)


def test_capture_marks_arbitrary_masks_as_not_comparable():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    with capture_attention() as sites:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(6, 6) > 0.5)
    assert sites[0].skipped


def test_capture_sees_the_longattn_op():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with capture_attention() as sites:
        torch.ops.longattn.attention(q, k, v, None, 0.3, True, 0.0, None, encode_plan([Band("flash")]))
    assert len(sites) == 1 and sites[0].causal and sites[0].scale == 0.3


def test_exact_attention_has_zero_error_and_hyper_with_small_blocks_does_not():
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    with capture_attention() as sites:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    exact = site_errors(sites[0], flash_attention_reference)
    assert max(exact["out_rel_err"]) < 1e-6 and max(exact["rowsum_rel_err"]) < 1e-6
    hyper = lambda q_, k_, v_, **kw: hyper_attention(q_, k_, v_, variant="paper", **SMALL, **kw)
    rows = error_table(sites, hyper)
    assert len(rows[0]["out_rel_err"]) == 2 and rows[0]["out_rel_err_mean"] > 1e-3
    assert rows[0]["rowsum_rel_err_mean"] > 1e-3
