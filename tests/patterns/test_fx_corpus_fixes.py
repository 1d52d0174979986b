"""Spellings the generated corpus (tests/corpus) found missed, now read, each with the look-alikes that must
stay alone: a scale held in a constant 0-d tensor (the issue's `einsum(...) * torch.rsqrt(torch.tensor(d))`),
einsum with an ellipsis, Bloom's baddbmm with its ALiBi bias, and 4-D scores viewed from a 3-D bmm."""
import pytest
import torch

from longattn.rewriter.fx_rewrite import rewrite_graph
from tests.policies import ALL_FLASH

B, H, S, D = 2, 4, 10, 8


def _qkv():
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


def _rewrite(fn, *args, dynamic=False):
    """(sites, output of fn compiled with the rewrite, eager output)."""
    reports = []

    def backend(gm, example_inputs):
        reports.append(rewrite_graph(gm, ALL_FLASH))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
        return [s for r in reports for s in r.sites], out, fn(*args)


CONSTANT_SCALES = {
    # the spelling: einsum(...) * torch.rsqrt(torch.tensor(d))
    "rsqrt_of_a_tensor": lambda q, k, v: torch.softmax(
        torch.einsum("bhqd,bhkd->bhqk", q, k) * torch.rsqrt(torch.tensor(float(D))), -1) @ v,
    "divided_by_a_tensor_sqrt": lambda q, k, v: torch.softmax(q @ k.mT / torch.tensor(float(D)).sqrt(), -1) @ v,
    "tensor_on_the_left": lambda q, k, v: torch.softmax(torch.tensor(0.3) * (q @ k.mT), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(CONSTANT_SCALES))
@pytest.mark.parametrize("dynamic", [False, True])
def test_scale_from_a_constant_tensor_is_read_as_the_scale(name, dynamic):
    sites, out, ref = _rewrite(CONSTANT_SCALES[name], *_qkv(), dynamic=dynamic)
    assert [s.status for s in sites] == ["rewritten"], sites
    assert sites[0].scale == pytest.approx(0.3 if "left" in name else D ** -0.5, rel=1e-6)
    torch.testing.assert_close(out, ref)


NOT_CONSTANT_SCALES = {
    # values of an input: another scale every call
    "scale_from_the_data": lambda q, k, v: torch.softmax(q @ k.mT * (q.abs().mean() + 0.5), -1) @ v,
    # a random 0-d tensor: a new value every call, though built from no input
    "random_scale": lambda q, k, v: torch.softmax(q @ k.mT * (torch.rand(()) + 0.5), -1) @ v,
    # a one-element tensor with a dim: not a scalar (it could broadcast the scores to another shape)
    "one_element_vector": lambda q, k, v: torch.softmax(q @ k.mT * torch.tensor([0.3]), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(NOT_CONSTANT_SCALES))
def test_tensor_scales_that_are_not_constants_are_left_alone(name):
    fn = NOT_CONSTANT_SCALES[name]
    torch.manual_seed(0)
    sites, out, _ = _rewrite(fn, *_qkv())
    assert [s.status for s in sites] == ["skipped"], sites
    assert "not understood" in sites[0].reason
    if name != "random_scale":
        torch.testing.assert_close(out, fn(*_qkv()))


def test_scale_from_the_runtime_head_dim_is_not_taken_for_a_constant():
    """Under dynamic=True, torch.tensor(float(q.shape[-1])) reads a size: a constant at one head dim only."""
    def attn(q, k, v):
        return torch.softmax(q @ k.mT * torch.rsqrt(torch.tensor(float(q.shape[-1]))), -1) @ v

    sites, _, _ = _rewrite(attn, *_qkv(), dynamic=True)
    assert [s.status for s in sites] == ["skipped"], sites


def test_einsum_with_an_ellipsis_is_read_as_both_products():
    def attn(q, k, v):
        s = torch.einsum("...qd,...kd->...qk", q, k) * 0.3
        return torch.einsum("...qk,...kd->...qd", torch.softmax(s, -1), v)

    for dynamic in (False, True):
        sites, out, ref = _rewrite(attn, *_qkv(), dynamic=dynamic)
        assert [s.status for s in sites] == ["rewritten"], sites
        torch.testing.assert_close(out, ref)


EINSUM_LOOKALIKES = {
    # scores laid out (.., k, q): the softmax runs over the queries
    "scores_transposed": lambda q, k, v: torch.einsum(
        "...kq,...kd->...qd", torch.softmax(torch.einsum("...qd,...kd->...kq", q, k), -1), v),
    # a letter repeated within a term is a diagonal, not a product: each query's own weight times its value row
    "diagonal_of_the_probabilities": lambda q, k, v: torch.einsum(
        "bhqq,bhqd->bhqd", torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1), v),
    # q·qᵀ's diagonal times k·qᵀ: no sum over the head dim at all
    "diagonal_scores": lambda q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", torch.softmax(torch.einsum("bhqq,bhkq->bhqk", q @ q.mT, k @ q.mT), -1), v),
    # one key matrix shared by every batch and head, broadcast by the ellipsis
    "shared_keys_of_lower_rank": lambda q, k, v: torch.einsum(
        "...qk,...kd->...qd", torch.softmax(torch.einsum("...qd,...kd->...qk", q, k[0, 0]), -1), v),
}


@pytest.mark.parametrize("name", sorted(EINSUM_LOOKALIKES))
def test_ellipsis_einsums_that_are_not_attention_products_are_left_alone(name):
    sites, out, ref = _rewrite(EINSUM_LOOKALIKES[name], *_qkv())
    assert [s.status for s in sites] == ["skipped"], sites
    torch.testing.assert_close(out, ref)


def _merged(t):
    """(B, H, S, D) -> (B·H, S, D): heads merged into the batch."""
    return t.reshape(-1, *t.shape[-2:])


def _alibi(k_len: int) -> torch.Tensor:
    """Bloom's bias: a slope per head times the key position, (B·H, 1, Sk), the same for every query."""
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, H + 1) / H)
    return (slopes[:, None, None] * torch.arange(k_len)[None, None, :]).repeat(B, 1, 1)


def _heads_as_batch(q, k, v):
    return tuple(_merged(t) for t in (q, k, v))


BADDBMM = {  # (program, its scale, whether a mask term stays)
    "alibi_beta_1": (lambda q, k, v: torch.bmm(torch.softmax(
        torch.baddbmm(_alibi(k.shape[1]), q, k.transpose(1, 2), beta=1.0, alpha=0.3), -1), v), 0.3, True),
    "mask_input_alpha_1": (lambda q, k, v: torch.bmm(torch.softmax(
        torch.baddbmm(torch.tril(torch.ones(S, S)).log().expand(B * H, S, S), q, k.transpose(1, 2)), -1), v),
        1.0, True),
    # GPT-NeoX: an empty bias and beta=0, which baddbmm does not read (NaN in it does not propagate)
    "zero_beta_nan_bias": (lambda q, k, v: torch.bmm(torch.softmax(
        torch.baddbmm(torch.full((B * H, S, S), float("nan")), q, k.transpose(1, 2), beta=0.0, alpha=0.5), -1), v),
        0.5, False),
}


@pytest.mark.parametrize("name", sorted(BADDBMM))
@pytest.mark.parametrize("dynamic", [False, True])
def test_baddbmm_is_read_as_a_scaled_product_plus_a_bias(name, dynamic):
    fn, scale, masked = BADDBMM[name]
    sites, out, ref = _rewrite(fn, *_heads_as_batch(*_qkv()), dynamic=dynamic)
    assert [s.status for s in sites] == ["rewritten"], sites
    assert sites[0].scale == pytest.approx(scale, rel=1e-6)
    assert (sites[0].mask != "none") == masked, sites[0].mask
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_baddbmm_with_another_beta_is_left_alone_with_the_reason():
    """beta·bias with beta ∉ {0, 1} scales the mask: not read, and said so."""
    def fn(q, k, v):
        return torch.bmm(torch.softmax(torch.baddbmm(_alibi(k.shape[1]), q, k.transpose(1, 2), beta=0.5), -1), v)

    sites, out, ref = _rewrite(fn, *_heads_as_batch(*_qkv()))
    assert [s.status for s in sites] == ["skipped"] and "baddbmm" in sites[0].reason, sites
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


SPLIT_VIEWS = {
    "k_transposed_after_the_merge": lambda q, k, v, m: torch.softmax(
        torch.bmm(_merged(q), _merged(k).transpose(1, 2)).view(q.shape[0], -1, S, S) * 0.3 + m, -1) @ v,
    "k_transposed_before_the_merge": lambda q, k, v, m: torch.softmax(
        torch.bmm(_merged(q), _merged(k.transpose(-1, -2))).view(q.shape[0], -1, S, S) * 0.3 + m, -1) @ v,
}


@pytest.mark.parametrize("name", sorted(SPLIT_VIEWS))
@pytest.mark.parametrize("dynamic", [False, True])
def test_scores_viewed_from_a_bmm_over_merged_heads_are_read_as_4d(name, dynamic):
    mask = torch.randn(B, 1, S, S)
    sites, out, ref = _rewrite(SPLIT_VIEWS[name], *_qkv(), mask, dynamic=dynamic)
    assert [s.status for s in sites] == ["rewritten"], sites
    assert (sites[0].heads, sites[0].scale) == (H, pytest.approx(0.3)), sites
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scores_split_other_than_the_merge_are_left_alone():
    """q merged as (2, 4) heads, the scores split as (4, 2): still a product of the same rows, but not of q's heads;
    not read, and said so."""
    q, k = torch.randn(2, 4, S, D), torch.randn(2, 4, S, D)
    v = torch.randn(4, 2, S, D)

    def fn(q, k, v):
        return torch.softmax(torch.bmm(_merged(q), _merged(k).transpose(1, 2)).view(4, 2, S, S), -1) @ v

    sites, out, ref = _rewrite(fn, q, k, v)
    assert [s.status for s in sites] == ["skipped"] and "not heads merged" in sites[0].reason, sites
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
