"""Linear decode through the op with a kept state (`linear/incremental.py`): the same numbers as recomputing
the whole sequence, and a kept state is never used for keys it does not belong to."""
import pytest
import torch

from longattn.kernels import Band, encode_plan
from longattn.kernels.linear import incremental, linear_attention
from longattn.kernels.linear.decode import linear_attention_step

HYBRID = dict(sink_tokens=2, local_window=5, chunk_size=16)


def _seq(S, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, S, d, generator=g), torch.randn(1, hkv, S, d, generator=g),
            torch.randn(1, hkv, S, d, generator=g))


@pytest.mark.parametrize("params", [dict(HYBRID, feature_map="elu"), dict(HYBRID, feature_map="relu"),
                                    dict(HYBRID, feature_map="favor", num_features=16),
                                    dict(HYBRID, feature_map="taylor2"), dict(HYBRID, feature_map="none"),
                                    dict(feature_map="elu", chunk_size=16), dict(feature_map="relu", chunk_size=16,
                                                                                  normalize=False),
                                    dict(HYBRID, feature_map="elu", update_rule="delta"),
                                    dict(feature_map="elu", chunk_size=16, update_rule="delta", normalize=False,
                                         beta=[0.3, 0.9])],
                         ids=["elu", "relu", "favor", "taylor2", "window-only", "pure", "unnormalised", "delta",
                              "delta-pure-per-head-beta"])
def test_state_built_in_one_pass_then_stepped_equals_the_whole_sequence(params):
    q, k, v = _seq(45)
    want = linear_attention(q, k, v, scale=0.4, causal=True, **params)[:, :, 40:]
    state = incremental.state_of(q[:, :, :40], k[:, :, :40], v[:, :, :40], scale=0.4, **params)
    got, state = linear_attention_step(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], state, scale=0.4, **params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert state.position == 45


def _op(site, q, k, v, params=dict(HYBRID, feature_map="elu")):
    plan = encode_plan([Band("linear", params={**params, "site": site})])
    return torch.ops.longattn.attention(q, k, v, None, 0.4, True, 0.0, None, plan)


@pytest.mark.parametrize("rule", ["add", "delta"])
def test_decode_steps_through_the_op_keep_a_state_and_match_recomputing(rule):
    incremental.clear()
    q, k, v = _seq(60)
    params = dict(HYBRID, feature_map="elu", update_rule=rule)
    want = linear_attention(q, k, v, scale=0.4, causal=True, **params)
    with torch.no_grad():
        outs = [_op("layers.0", q[:, :, :50], k[:, :, :50], v[:, :, :50], params)]   # prefill: recomputed
        assert "layers.0" not in incremental._states
        for t in range(50, 60):                                                # one token at a time
            outs.append(_op("layers.0", q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], params))
            assert incremental._states["layers.0"].position == t + 1          # the state moved on
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-5, atol=1e-5)


def test_a_kept_state_is_not_used_for_another_sequence_or_a_cropped_cache():
    incremental.clear()
    qa, ka, va = _seq(40, seed=1)
    qb, kb, vb = _seq(40, seed=2)
    with torch.no_grad():
        _op("s", qa[:, :, 38:39], ka[:, :, :39], va[:, :, :39])               # state of sequence A at 39
        got_b = _op("s", qb[:, :, 39:], kb, vb)                              # same position, other keys
        want_b = linear_attention(qb, kb, vb, scale=0.4, causal=True, **HYBRID)[:, :, 39:]
        torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-5)
        got_crop = _op("s", qb[:, :, 35:36], kb[:, :, :36], vb[:, :, :36])    # a cache cropped back
        want_crop = linear_attention(qb[:, :, :36], kb[:, :, :36], vb[:, :, :36], scale=0.4, causal=True,
                                     **HYBRID)[:, :, 35:]
        torch.testing.assert_close(got_crop, want_crop, rtol=1e-5, atol=1e-5)


def test_batches_and_training_recompute_without_keeping_state_and_the_delta_rule_keeps_one():
    incremental.clear()
    q, k, v = _seq(30)
    q2, k2, v2 = (torch.cat([t, t], 0) for t in (q, k, v))
    delta = dict(HYBRID, feature_map="elu", update_rule="delta")
    with torch.no_grad():
        _op("batch", q2[:, :, 29:], k2, v2)
        got = _op("delta", q[:, :, 29:], k, v, delta)
    assert set(incremental._states) == {"delta"}
    torch.testing.assert_close(got, linear_attention(q, k, v, scale=0.4, causal=True, **delta)[:, :, 29:],
                               rtol=1e-5, atol=1e-5)
    q.requires_grad_()
    out = _op("grad", q[:, :, 29:], k, v)
    out.sum().backward()  # the recomputing backward still runs
    assert q.grad is not None and "grad" not in incremental._states


def test_the_rewriter_names_the_site_for_torch_compile_and_drops_decode_state_for_onnx():
    from longattn.patterns.record import AttentionSite
    from longattn.rewriter.bands import fit_bands
    site = AttentionSite(layer="model.layers.3.self_attn", pattern="sdpa")
    band = Band("linear", params={"decode_state": True, "sink_tokens": 4})
    assert fit_bands([band], site)[0][0].params == {"site": "model.layers.3.self_attn", "sink_tokens": 4}
    onnx_bands, notes = fit_bands([band], site, keep_state=False)
    assert onnx_bands[0].params == {"sink_tokens": 4} and "keeps no state" in notes[0]
