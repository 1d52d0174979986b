"""The linear kind's PyTorch forms against each other and against their definitions, in float64."""
import math

import pytest
import torch

from longattn.kernels.flash import flash_attention_reference
from longattn.kernels.linear import (apply_feature_map, linear_attention, linear_attention_quadratic,
                                     linear_attention_reference, linear_attention_step)

F64 = dict(rtol=1e-9, atol=1e-10)


def _qkv(b=1, hq=4, hkv=2, sq=11, sk=11, d=4, dv=3, dtype=torch.float64, grad=False):
    return (torch.randn(b, hq, sq, d, dtype=dtype, requires_grad=grad),
            torch.randn(b, hkv, sk, d, dtype=dtype, requires_grad=grad),
            torch.randn(b, hkv, sk, dv, dtype=dtype, requires_grad=grad))


def _hedgehog_params(hq=4, hkv=2, d=4, f=3):
    g = torch.Generator().manual_seed(7)
    return {"q_weight": torch.randn(hq, d, f, generator=g, dtype=torch.float64),
            "k_weight": torch.randn(hkv, d, f, generator=g, dtype=torch.float64),
            "k_bias": torch.randn(hkv, f, generator=g, dtype=torch.float64)}


MAPS = ["elu", "relu", "favor", "taylor2", "identity", "hedgehog"]
SHAPES = [(11, 11), (5, 11), (11, 6)]  # self, decode-like (Sq < Sk), Sq > Sk (causal: early rows see nothing)


def _opts(feature_map, **kw):
    opts = dict(feature_map=feature_map, num_features=8, seed=3, **kw)
    if feature_map == "hedgehog":
        opts["feature_params"] = _hedgehog_params()
    return opts


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_recurrent_and_quadratic_forms_agree_for_every_map(feature_map, causal, normalize):
    for sq, sk in SHAPES:
        q, k, v = _qkv(sq=sq, sk=sk)
        if feature_map == "identity" and normalize:  # keep φ(q)·Σφ(k) away from 0
            q, k = q.abs(), k.abs()
        opts = _opts(feature_map, causal=causal, normalize=normalize)
        dense = linear_attention_quadratic(q, k, v, **opts)
        chunked = linear_attention_reference(q, k, v, chunk_size=4, **opts)
        recurrent = linear_attention_reference(q, k, v, form="recurrent", **opts)
        torch.testing.assert_close(chunked, dense, **F64)
        torch.testing.assert_close(recurrent, dense, **F64)


@pytest.mark.parametrize("feature_map", ["elu", "favor", "none"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sinks,window", [(2, 3), (0, 4), (3, 0), (20, 1)])
def test_hybrid_forms_agree_with_the_dense_classification_of_keys(feature_map, causal, sinks, window):
    for sq, sk in SHAPES:
        q, k, v = _qkv(sq=sq, sk=sk)
        opts = _opts(feature_map, causal=causal, sink_tokens=sinks, local_window=window)
        dense = linear_attention_quadratic(q, k, v, **opts)
        torch.testing.assert_close(linear_attention_reference(q, k, v, chunk_size=4, **opts), dense, **F64)
        torch.testing.assert_close(linear_attention_reference(q, k, v, form="recurrent", **opts), dense, **F64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(9, 9), (4, 9), (9, 20)])
def test_local_window_covering_every_key_is_exact_softmax_attention(causal, sq, sk):
    q, k, v = _qkv(sq=sq, sk=sk)
    ref, _ = flash_attention_reference(q, k, v, causal=causal, scale=0.4)
    for fmap in ("elu", "favor", "none"):
        out = linear_attention(q, k, v, causal=causal, scale=0.4, feature_map=fmap, local_window=sk, eps=0.0)
        torch.testing.assert_close(out, ref, **F64)


def test_zero_far_scale_equals_sinks_and_window_alone():
    q, k, v = _qkv(sq=13, sk=13)
    opts = dict(causal=True, sink_tokens=2, local_window=3, eps=0.0)
    silenced = linear_attention(q, k, v, feature_map="favor", feature_params={"far_scale": [0.0] * 4}, **opts)
    torch.testing.assert_close(silenced, linear_attention(q, k, v, feature_map="none", **opts), **F64)
    louder = linear_attention(q, k, v, feature_map="favor", feature_params={"far_scale": 3.0}, **opts)
    assert (louder - silenced).abs().max() > 1e-3


def test_query_heads_share_their_key_head_as_if_repeated():
    q, k, v = _qkv(hq=6, hkv=2)
    opts = dict(causal=True, feature_map="elu", sink_tokens=1, local_window=2, chunk_size=4)
    grouped = linear_attention(q, k, v, **opts)
    repeated = linear_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), **opts)
    torch.testing.assert_close(grouped, repeated, **F64)


# ----------------------------------------------------------------------------------------------- delta rule

def _delta_by_householder(fk, v, beta):
    """S_t = (I − β k kᵀ) S_{t−1} + β k vᵀ literally, returning every state."""
    S = torch.zeros(fk.shape[-1], v.shape[-1], dtype=fk.dtype)
    states = []
    for t in range(fk.shape[0]):
        kt = fk[t:t + 1].t()
        S = (torch.eye(fk.shape[-1], dtype=fk.dtype) - beta[t] * kt @ kt.t()) @ S + beta[t] * kt @ v[t:t + 1]
        states.append(S)
    return states


def test_delta_rule_reads_the_householder_recurrence_state():
    q, k, v = _qkv(b=1, hq=1, hkv=1, sq=7, sk=7)
    beta = torch.rand(1, 1, 7, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=True, update_rule="delta", beta=beta, normalize=False, chunk_size=4)
    feats = apply_feature_map(q, k, feature_map="elu", scale=0.5)
    fq = torch.nn.functional.normalize(feats.q[0, 0], dim=-1)
    fk = torch.nn.functional.normalize(feats.k[0, 0], dim=-1)
    states = _delta_by_householder(fk, v[0, 0], beta[0, 0])
    expected = torch.stack([states[t].t() @ fq[t] for t in range(7)])
    torch.testing.assert_close(out[0, 0], expected, **F64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("beta_kind", ["default", "per_head", "per_token"])
def test_delta_rule_chunked_equals_recurrent(causal, normalize, beta_kind):
    for sq, sk in SHAPES:
        q, k, v = _qkv(sq=sq, sk=sk)
        beta = {"default": None, "per_head": [0.3, 0.9],
                "per_token": torch.rand(1, 2, sk, dtype=torch.float64)}[beta_kind]
        opts = dict(causal=causal, normalize=normalize, update_rule="delta", beta=beta, feature_map="favor",
                    num_features=6)
        chunked = linear_attention_reference(q, k, v, chunk_size=4, **opts)
        torch.testing.assert_close(chunked, linear_attention_reference(q, k, v, form="recurrent", **opts), **F64)


def test_delta_rule_hybrid_chunked_equals_recurrent():
    for sq, sk in SHAPES:
        q, k, v = _qkv(sq=sq, sk=sk)
        for causal in (True, False):
            opts = dict(causal=causal, update_rule="delta", sink_tokens=2, local_window=3)
            torch.testing.assert_close(linear_attention_reference(q, k, v, chunk_size=4, **opts),
                                       linear_attention_reference(q, k, v, form="recurrent", **opts), **F64)


# ----------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("opts", [
    dict(feature_map="elu"),
    dict(feature_map="favor", num_features=8, sink_tokens=2, local_window=3),
    dict(feature_map="none", sink_tokens=1, local_window=2),
    dict(feature_map="taylor2", normalize=False),
    dict(feature_map="elu", update_rule="delta", local_window=2, sink_tokens=1),
], ids=["elu", "favor-hybrid", "sinks-window", "taylor2-unnormalised", "delta-hybrid"])
def test_decode_steps_equal_the_prefill_output_position_by_position(opts):
    q, k, v = _qkv(sq=10, sk=10)
    beta = torch.rand(1, 2, 10, dtype=torch.float64) if opts.get("update_rule") == "delta" else None
    prefill = linear_attention(q, k, v, causal=True, beta=beta, chunk_size=4, **opts)
    first, state = linear_attention_step(q[:, :, :4], k[:, :, :4], v[:, :, :4], None,
                                         beta=None if beta is None else beta[:, :, :4], **opts)
    outs = [first]
    for t in range(4, 10):
        out, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                           beta=None if beta is None else beta[:, :, t:t + 1], **opts)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), prefill, **F64)
    assert state.position == 10
    assert state.window_k.shape[2] <= opts.get("local_window", 0)
    assert state.sink_k.shape[2] <= opts.get("sink_tokens", 0)


def test_decode_state_survives_a_round_trip_through_plain_tensors():
    from longattn.kernels.linear import LinearAttentionState
    q, k, v = _qkv(sq=6, sk=6)
    opts = dict(feature_map="elu", sink_tokens=1, local_window=2)
    _, state = linear_attention_step(q[:, :, :4], k[:, :, :4], v[:, :, :4], None, **opts)
    again = LinearAttentionState.from_tensors(state.as_tensors())
    a, _ = linear_attention_step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state, **opts)
    b, _ = linear_attention_step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], again, **opts)
    torch.testing.assert_close(a, b, **F64)
    fresh = LinearAttentionState.from_tensors(LinearAttentionState.empty(k, v).as_tensors())
    assert fresh.far is None and fresh.position == 0


# ----------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("opts", [
    dict(causal=True, feature_map="elu", sink_tokens=1, local_window=2),
    dict(causal=False, feature_map="favor", num_features=5),
    dict(causal=True, feature_map="taylor2"),
    dict(causal=True, feature_map="relu", update_rule="delta", beta=0.7, local_window=1),
], ids=["elu-hybrid", "favor-noncausal", "taylor2", "delta"])
def test_gradients_match_finite_differences(opts):
    q, k, v = _qkv(b=1, hq=2, hkv=1, sq=5, sk=6, d=3, dv=2, grad=True)
    assert torch.autograd.gradcheck(lambda q_, k_, v_: linear_attention(q_, k_, v_, chunk_size=2, **opts), (q, k, v))


# ----------------------------------------------------------------------------------------------- feature maps

def test_taylor2_features_give_the_second_order_expansion_of_exp():
    q, k, _ = _qkv(sq=6, sk=5, d=5)
    feats = apply_feature_map(q, k, feature_map="taylor2", scale=0.3)
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.view(1, 2, 2, 6, 5), k) * 0.3
    dot = torch.einsum("bhgqf,bhkf->bhgqk", feats.q.view(1, 2, 2, 6, -1), feats.k)
    torch.testing.assert_close(dot, 1 + s + s * s / 2, **F64)


def test_favor_features_estimate_exp_of_the_scaled_dot_product():
    q, k, _ = _qkv(hq=1, hkv=1, sq=4, sk=4, d=4)
    q, k = q * 0.5, k * 0.5
    feats = apply_feature_map(q, k, feature_map="favor", scale=0.5, num_features=40000, seed=1)
    estimate = (feats.q[0, 0] @ feats.k[0, 0].t()) * torch.exp(feats.q_log_scale[0, 0]).unsqueeze(-1)
    exact = torch.exp(q[0, 0] @ k[0, 0].t() * 0.5)
    assert ((estimate - exact).abs() / exact).max() < 0.05
    again = apply_feature_map(q, k, feature_map="favor", scale=0.5, num_features=40000, seed=1)
    assert torch.equal(again.k, feats.k)
    other = apply_feature_map(q, k, feature_map="favor", scale=0.5, num_features=40000, seed=2)
    assert not torch.equal(other.k, feats.k)


def test_hedgehog_without_learned_parameters_is_refused_with_a_hint():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="hedgehog.*calibrat"):
        linear_attention(q, k, v, feature_map="hedgehog")


@pytest.mark.parametrize("bad,match", [
    (dict(feature_map="cosine"), "feature_map"),
    (dict(update_rule="gated"), "update_rule"),
    (dict(local_window=-1), "local_window"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(normalize=False, sink_tokens=4), "normalize"),
    (dict(feature_map="none"), "none"),
    (dict(update_rule="delta", beta=3.0), "beta"),
    (dict(feature_params={"far_scale": [1.0, 2.0, 3.0]}), "far_scale"),
])
def test_bad_arguments_are_rejected_by_name(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **bad)


def test_half_precision_inputs_give_outputs_in_their_dtype_close_to_float64():
    q, k, v = _qkv(dtype=torch.float32, sq=40, sk=40)
    out = linear_attention(q.half(), k.half(), v.half(), causal=True, sink_tokens=2, local_window=5,
                           feature_map="favor")
    assert out.dtype == torch.float16
    ref = linear_attention(q.double(), k.double(), v.double(), causal=True, sink_tokens=2, local_window=5,
                           feature_map="favor")
    assert (out.double() - ref).norm() / ref.norm() < 5e-3
    assert math.isfinite(out.float().sum().item())
