import pytest
import torch

from longattn.kernels import Band, band_for_length, encode_plan
from longattn.kernels.flash import flash_attention_reference


def _qkv(b=1, hq=4, hkv=2, sq=9, sk=9, d=8, dtype=torch.float64):
    return (torch.randn(b, hq, sq, d, dtype=dtype, requires_grad=True),
            torch.randn(b, hkv, sk, d, dtype=dtype, requires_grad=True),
            torch.randn(b, hkv, sk, d, dtype=dtype, requires_grad=True))


def test_band_for_length_picks_first_band_whose_bound_exceeds_the_length():
    plan = encode_plan([Band("flash", below=16), Band("exact", below=64), Band("flash")])
    assert band_for_length(plan, 15).kind == "flash"
    assert band_for_length(plan, 16).kind == "exact"
    assert band_for_length(plan, 10**6).below is None


@pytest.mark.parametrize("bad", ["[]", "not json", '[{"kind": "flash", "below": 4}]', '[{"kind": "nope", "below": null}]',
                                 '[{"kind": "flash", "below": "4"}, {"kind": "flash", "below": null}]',
                                 '[{"kind": "flash", "below": -4}, {"kind": "flash", "below": null}]'])
def test_malformed_plan_is_rejected_with_its_text(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="plan|kind"):
        torch.ops.longattn.attention(q, k, v, None, 0.3, False, 0.0, None, bad)


def test_op_gradients_equal_reference_gradients_including_the_additive_mask():
    q, k, v = _qkv()
    mask = torch.randn(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    plan = encode_plan([Band("flash")])
    out = torch.ops.longattn.attention(q, k, v, mask, 0.3, True, 0.0, None, plan)
    ref, _ = flash_attention_reference(q, k, v, attn_mask=mask, scale=0.3, causal=True)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, mask), g), torch.autograd.grad(ref, (q, k, v, mask), g)):
        torch.testing.assert_close(a, b)


def test_opcheck_passes_for_masked_and_unmasked_calls():
    q, k, v = _qkv()
    plan = encode_plan([Band("flash", below=5), Band("exact")])
    torch.library.opcheck(torch.ops.longattn.attention.default, (q, k, v, None, 0.3, True, 0.0, None, plan))
    keep = torch.rand(1, 1, 9, 9) > 0.3
    keep[..., 0] = True
    torch.library.opcheck(torch.ops.longattn.attention.default, (q, k, v, keep, 0.3, False, 0.0, None, plan))


def test_dropout_is_replayed_identically_in_backward():
    q, k, v = _qkv(hq=2, hkv=1, sq=5, sk=6, d=4)  # gradcheck perturbs every input element: keep them few
    seed = torch.tensor(1234)
    plan = encode_plan([Band("flash")])
    out = torch.ops.longattn.attention(q, k, v, None, 0.3, False, 0.5, seed, plan)
    again = torch.ops.longattn.attention(q, k, v, None, 0.3, False, 0.5, seed, plan)
    torch.testing.assert_close(out, again)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: torch.ops.longattn.attention(q_, k_, v_, None, 0.3, False, 0.5, seed, plan), (q, k, v))


def test_op_rejects_keys_and_values_of_different_lengths():
    q, k, _ = _qkv()
    v = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="differ in batch/heads/seq"):
        torch.ops.longattn.attention(q, k, v, None, 0.3, False, 0.0, None, encode_plan([Band("flash")]))


@pytest.mark.parametrize("what", ["mask on another device", "int64 mask", "dropout 1.5", "dropout -0.5"])
def test_the_op_called_directly_refuses_what_sdpa_refuses(what):
    q, k, v = _qkv()
    mask, dropout = None, 0.0
    if what == "mask on another device":
        mask = torch.zeros(9, 9, dtype=torch.float64, device="meta")
    elif what == "int64 mask":
        mask = torch.zeros(9, 9, dtype=torch.int64)
    else:
        dropout = float(what.split()[1])
    with pytest.raises((ValueError, TypeError), match="attn_mask|dropout_p"):
        torch.ops.longattn.attention(q, k, v, mask, 0.3, False, dropout, None, encode_plan([Band("flash")]))


def test_dropout_of_one_gives_zeros_as_eager_does():
    q, k, v = _qkv()
    out, _ = flash_attention_reference(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_a_context_parallel_band_naming_a_mesh_dim_is_ignored_without_distributed():
    """The README: without torch.distributed the key is ignored; a mesh_dim once looked up a DeviceMesh anyway."""
    q, k, v = _qkv()
    plan = encode_plan([Band("flash", None, {"context_parallel": {"mesh_dim": "cp", "load_balance": "zigzag"}})])
    out = torch.ops.longattn.attention(q, k, v, None, 0.3, True, 0.0, None, plan)
    torch.testing.assert_close(out, flash_attention_reference(q, k, v, scale=0.3, causal=True)[0])


@pytest.mark.parametrize("kind,params", [
    ("hyper", {"block_size": 16, "sample_size": 4, "min_seq_len": 0, "sink_tokens": 2, "local_window": 4}),
    ("linear", {"feature_map": "elu", "sink_tokens": 2, "local_window": 4}),
    ("linear", {"feature_map": "favor", "num_features": 16, "sink_tokens": 0, "local_window": 0})])
def test_approximate_kinds_through_the_op_give_the_kernels_own_output_and_gradients(kind, params):
    """What a compiled model trains through: the op's forward and its recomputing backward must be exactly the
    kind's function, called directly (the model-level tests can only see finite numbers)."""
    from longattn.kernels.hyper import hyper_attention
    from longattn.kernels.linear import linear_attention
    q, k, v = _qkv(sq=40, sk=40)
    out = torch.ops.longattn.attention(q, k, v, None, 0.3, True, 0.0, None, encode_plan([Band(kind, None, params)]))
    if kind == "hyper":
        direct, _ = hyper_attention(q, k, v, scale=0.3, causal=True, **params)
    else:
        direct = linear_attention(q, k, v, scale=0.3, causal=True, **params)
    torch.testing.assert_close(out, direct)
    assert (out - flash_attention_reference(q, k, v, scale=0.3, causal=True)[0]).abs().max() > 1e-4  # approximate
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(direct, (q, k, v), g)):
        torch.testing.assert_close(a, b)
