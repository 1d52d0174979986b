"""Each spelling of attention is found, rewritten, and computes what it computed before;
each look-alike is left alone with a reason."""
import math

import pytest
import torch
import torch.nn.functional as F

from longattn.rewriter.fx_rewrite import rewrite_graph
from tests.policies import ALL_FLASH

B, H, S, D = 2, 4, 10, 8


def _qkv(hk=H, s=S):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, H, s, D, generator=g), torch.randn(B, hk, s, D, generator=g),
            torch.randn(B, hk, s, D, generator=g))


def _compile_and_report(fn, *args):
    """Run fn under torch.compile with the rewrite; return (output, eager output, [SiteReport])."""
    reports = []

    def backend(gm, example_inputs):
        reports.append(rewrite_graph(gm, ALL_FLASH))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, fn(*args), [s for r in reports for s in r.sites]


def causal_tril(s):
    return torch.tril(torch.ones(s, s, dtype=torch.bool))


SPELLINGS = {
    "matmul_transpose_div_sqrt": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v,
    "matmul_mT_mul_pow": lambda q, k, v: torch.matmul(torch.softmax(torch.matmul(q, k.mT) * D ** -0.5, dim=-1), v),
    "permute_constant_scale": lambda q, k, v: F.softmax(q.matmul(k.permute(0, 1, 3, 2)) * 0.2, dim=3).matmul(v),
    "scale_folded_into_q": lambda q, k, v: (q * D ** -0.5 @ k.transpose(2, 3)).softmax(-1) @ v,
    "scale_split_over_q_and_k": lambda q, k, v: torch.softmax((q * D ** -0.25) @ (k * D ** -0.25).transpose(-1, -2), -1) @ v,
    "no_scale_t5": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
    "einsum_both_products": lambda q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D), -1), v),
    "bmm_3d": lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * 0.3,
                                                      -1), v.flatten(0, 1)),
    "fp32_softmax_with_casts": lambda q, k, v: torch.softmax((q.half() @ k.half().mT).float() * 0.3, -1).to(
        torch.half) @ v.half(),
    "sdpa_default": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa_scale_and_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7),
    "causal_from_tril_masked_fill": lambda q, k, v: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(~causal_tril(q.shape[-2]), float("-inf")), -1) @ v,
    "causal_from_triu_where": lambda q, k, v: torch.softmax(torch.where(
        torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"), q @ k.mT * 0.3), -1) @ v,
    "causal_from_arange_additive": lambda q, k, v: torch.softmax(q @ k.mT * 0.3 + torch.where(
        torch.arange(S)[None, :] <= torch.arange(S)[:, None], 0.0, torch.finfo(torch.float32).min), -1) @ v,
    "causal_sdpa_bool_mask": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(S, S, dtype=torch.bool).tril()),
}
HALF = {"fp32_softmax_with_casts"}
CAUSAL = {"sdpa_scale_and_causal", "causal_from_tril_masked_fill", "causal_from_triu_where",
          "causal_from_arange_additive", "causal_sdpa_bool_mask"}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_is_found_rewritten_and_unchanged(name):
    out, ref, sites = _compile_and_report(SPELLINGS[name], *_qkv())
    assert [s.status for s in sites] == ["rewritten"], [(s.status, s.reason) for s in sites]
    assert ("causal" in sites[0].mask) == (name in CAUSAL), sites[0]
    tol = 2e-3 if name in HALF else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_found_scale_is_the_true_scale_whether_folded_or_split():
    for name in ("matmul_transpose_div_sqrt", "scale_folded_into_q", "scale_split_over_q_and_k"):
        _, _, sites = _compile_and_report(SPELLINGS[name], *_qkv())
        assert sites[0].scale == pytest.approx(D ** -0.5), name


@pytest.mark.parametrize("repeat", ["expand_reshape", "repeat_interleave"])
def test_gqa_repeat_is_recorded_not_materialised(repeat):
    def attn(q, k, v):
        if repeat == "expand_reshape":
            k = k[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
            v = v[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
        else:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.mT * 0.3, -1) @ v

    out, ref, sites = _compile_and_report(attn, *_qkv(hk=2))
    assert sites[0].status == "rewritten" and (sites[0].heads, sites[0].kv_heads) == (4, 2)
    torch.testing.assert_close(out, ref)


def test_dropout_in_training_is_kept_with_its_probability():
    def attn(q, k, v):
        return F.dropout(torch.softmax(q @ k.mT * 0.3, -1), p=0.25, training=True) @ v

    _, _, sites = _compile_and_report(attn, *_qkv())
    assert sites[0].status == "rewritten" and sites[0].dropout_p == 0.25


def test_causal_looking_mask_passed_as_input_stays_a_mask():
    def attn(q, k, v, mask):
        return torch.softmax((q @ k.mT).masked_fill(~mask, float("-inf")), -1) @ v

    mask = causal_tril(S)
    out, ref, sites = _compile_and_report(attn, *_qkv(), mask)
    assert sites[0].status == "rewritten" and sites[0].mask == "boolean"
    assert "depends on the values" in sites[0].causal_proof
    torch.testing.assert_close(out, ref)


def test_mask_built_from_sizes_but_not_causal_stays_a_mask():
    def attn(q, k, v):  # a sliding window of 3: built from aranges, not causal
        i = torch.arange(S)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
        return torch.softmax((q @ k.mT).masked_fill(~keep, float("-inf")), -1) @ v

    out, ref, sites = _compile_and_report(attn, *_qkv())
    assert sites[0].mask == "boolean" and "not the causal pattern" in sites[0].causal_proof
    torch.testing.assert_close(out, ref)


NEGATIVES = {
    "soft_capped_logits": (lambda q, k, v: torch.softmax(torch.tanh(q @ k.mT / 30.0) * 30.0, -1) @ v,
                           "not understood"),
    "softmax_over_queries": (lambda q, k, v: torch.softmax(q @ k.mT, dim=-2) @ v, "not the key dimension"),
    "probabilities_used_twice": (lambda q, k, v: (lambda p: (p @ v, p))(torch.softmax(q @ k.mT, -1)),
                                 "other users"),
    "scores_used_twice": (lambda q, k, v: (lambda s: (torch.softmax(s, -1) @ v, s.sum()))(q @ k.mT),
                          "other users"),
    "fill_value_not_minus_inf": (lambda q, k, v: torch.softmax((q @ k.mT).masked_fill(
        ~causal_tril(S), -1e4), -1) @ v, "masked_fill with value"),
    "softmax_of_a_linear_layer": (lambda q, k, v: torch.softmax(F.linear(q, torch.ones(D, D)), -1) @ v.mT,
                                  "not understood"),
    "probabilities_times_v_on_the_left": (lambda q, k, v: v.mT @ torch.softmax(q @ k.mT, -1).mT, "not a product"),
    # SDPA aligns is_causal top-left, our kernels bottom-right: equal only when q_len == k_len
    "sdpa_is_causal_with_fewer_queries_than_keys": (
        lambda q, k, v: F.scaled_dot_product_attention(q[:, :, :4], k, v, is_causal=True), "is_causal with q_len"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_look_alike_is_left_unchanged_and_reported(name):
    fn, reason = NEGATIVES[name]
    out, ref, sites = _compile_and_report(fn, *_qkv())
    assert len(sites) == 1 and sites[0].status == "skipped", sites
    assert reason in sites[0].reason
    torch.testing.assert_close(out, ref)


def test_random_softmax_matmul_graphs_without_attention_are_left_alone():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(D, D, generator=g)
    graphs = [
        lambda x: torch.softmax(x, -1) @ w,                        # softmax of an input
        lambda x: torch.softmax(x @ w, 0) @ w,                     # wrong dim
        lambda x: torch.softmax(x @ w + x, -1).sum(-1),            # no second product
        lambda x: torch.log_softmax(x @ w.T, -1) @ w,              # not softmax
    ]
    x = torch.randn(3, D, D, generator=g)
    for fn in graphs:
        out, ref, sites = _compile_and_report(fn, x)
        assert all(s.status == "skipped" for s in sites)
        torch.testing.assert_close(out, ref)


def test_layer_names_come_from_the_module_path():
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, q, k, v):
            return self.layers[1](self.layers[0](q, k, v), k, v)

    _, _, sites = _compile_and_report(Net(), *_qkv())
    assert [s.layer for s in sites] == ["layers.0", "layers.1"]
