"""HyperAttention reference vs exact attention and vs a brute-force rebuild of the weights from the pattern."""
import math

import pytest
import torch

from longattn.kernels.flash import flash_attention_reference
from longattn.kernels.hyper import build_pattern, hyper_attention, hyper_attention_reference
from longattn.kernels.hyper.pattern import gray_rank

F64 = torch.float64
# tiny settings that still exercise several blocks, samples and recursion levels
SMALL = dict(block_size=4, sample_size=5, lsh_bits=3, min_seq_len=8, sink_tokens=2, local_window=3)


def _qkv(b=1, hq=4, hkv=2, sq=21, sk=21, d=6, dv=5, dtype=F64, grad=False):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=grad)
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, dv)


def brute_force_weights(pattern, b, h, sq, sk, group, causal):
    """Dense (Sq, Sk) multiplicity of each key in each row's estimate, rebuilt from the definitions."""
    w = torch.zeros(sq, sk, dtype=F64)
    off = sk - sq
    kh = h // group
    exact = [set(range(min(pattern.sinks, sk))) | set(range(int(pattern.exact_lo[i]), int(pattern.exact_hi[i])))
             for i in range(sq)]
    for i in range(sq):
        for j in exact[i]:
            if not causal or j <= i + off:
                w[i, j] = 1.0
    for level in pattern.levels:
        for r, (qs, ql, ks, kl) in enumerate(level.rect_list):
            nb = math.ceil(kl / pattern.block_size)
            qbounds = [t * ql // nb for t in range(nb + 1)]
            kbounds = [t * kl // nb for t in range(nb + 1)]
            q_sorted = level.q_order[b, h, qs:qs + ql].tolist()
            k_sorted = level.k_order[b, kh, ks:ks + kl].tolist()
            assert sorted(q_sorted) == list(range(qs, qs + ql)) and sorted(k_sorted) == list(range(ks, ks + kl))
            samples = level.samples[b, kh, r].tolist()
            weights = level.sample_logw[b, kh, r].double().exp().tolist()  # kl / m when drawn uniformly
            for blk in range(nb):
                block_keys = k_sorted[kbounds[blk]:kbounds[blk + 1]]
                for i in q_sorted[qbounds[blk]:qbounds[blk + 1]]:
                    for j in block_keys:
                        if j not in exact[i]:
                            w[i, j] += 1.0
                    for j, weight in zip(samples, weights):
                        if j not in exact[i] and j not in block_keys:
                            w[i, j] += weight
    return w


def brute_force(q, k, v, pattern, scale, causal):
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=F64)
    lse = torch.zeros(B, Hq, Sq, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            w = brute_force_weights(pattern, b, h, Sq, Sk, group, causal)
            s = q[b, h] @ k[b, h // group].T * scale
            e = w * torch.exp(s)
            out[b, h] = e @ v[b, h // group] / e.sum(-1, keepdim=True)
            lse[b, h] = torch.log(e.sum(-1))
    return out, lse


@pytest.mark.parametrize("variant,sampling", [("paper", "uniform"), ("default", "uniform"), ("default", "importance")])
@pytest.mark.parametrize("causal,sq,sk", [(False, 21, 21), (False, 13, 22), (True, 21, 21), (True, 17, 26)])
def test_reference_equals_brute_force_rebuilt_from_the_pattern(variant, sampling, causal, sq, sk):
    q, k, v = _qkv(b=2, sq=sq, sk=sk)
    params = dict(SMALL, causal=causal, variant=variant, sampling=sampling, seed=3)
    pattern = build_pattern(q, k, **params)
    assert len(pattern.levels) >= (2 if causal else 1)
    out, lse = hyper_attention_reference(q, k, v, pattern=pattern, scale=0.4, causal=causal)
    ref_out, ref_lse = brute_force(q, k, v, pattern, 0.4, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.float())


@pytest.mark.parametrize("variant", ["paper", "default"])
@pytest.mark.parametrize("causal,sq,sk", [(False, 21, 21), (False, 9, 30), (True, 21, 21), (True, 12, 30)])
def test_blocks_as_long_as_the_keys_give_exact_attention(variant, causal, sq, sk):
    q, k, v = _qkv(sq=sq, sk=sk)
    out, lse = hyper_attention(q, k, v, causal=causal, **dict(SMALL, block_size=64, variant=variant))
    ref_out, ref_lse = flash_attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse)


def test_sinks_and_window_covering_every_key_give_exact_attention():
    q, k, v = _qkv(sq=20, sk=20)
    out, _ = hyper_attention(q, k, v, **dict(SMALL, local_window=64, sample_size=50))
    torch.testing.assert_close(out, flash_attention_reference(q, k, v)[0], rtol=1e-10, atol=1e-10)


def test_below_min_seq_len_is_exact_attention():
    q, k, v = _qkv(sq=7, sk=7)
    out, lse = hyper_attention(q, k, v, causal=True, **SMALL)
    ref_out, ref_lse = flash_attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("variant", ["paper", "default"])
def test_approximation_is_not_exact_with_small_blocks(variant):
    q, k, v = _qkv(sq=40, sk=40)
    out, _ = hyper_attention(q, k, v, **dict(SMALL, variant=variant))
    assert (out - flash_attention_reference(q, k, v)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["paper", "default"])
def test_causal_rows_ignore_later_keys_and_values(variant):
    q, k, v = _qkv(sq=30, sk=30)
    params = dict(SMALL, causal=True, variant=variant, seed=1)
    out, lse = hyper_attention(q, k, v, **params)
    t = 17
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t:] = torch.randn_like(k2[:, :, t:]) * 3
    v2[:, :, t:] = torch.randn_like(v2[:, :, t:]) * 3
    out2, lse2 = hyper_attention(q, k2, v2, **params)
    torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse2[:, :, :t], lse[:, :, :t])
    assert (out2[:, :, t:] - out[:, :, t:]).abs().max() > 1e-3


def test_same_seed_same_result_and_other_seed_other_result():
    q, k, v = _qkv(sq=30, sk=30)
    a, _ = hyper_attention(q, k, v, seed=5, **SMALL)
    b, _ = hyper_attention(q, k, v, seed=5, **SMALL)
    c, _ = hyper_attention(q, k, v, seed=6, **SMALL)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-6


def test_gqa_equals_repeated_kv_with_the_same_pattern():
    q, k, v = _qkv(hq=6, hkv=2, sq=25, sk=25)
    group = 3
    for causal in (False, True):
        pattern = build_pattern(q, k, causal=causal, seed=2, **SMALL)
        out, lse = hyper_attention_reference(q, k, v, pattern=pattern, causal=causal)
        rep = lambda t: t.repeat_interleave(group, dim=1)
        pattern.k_rank = rep(pattern.k_rank)
        for level in pattern.levels:
            level.k_order, level.samples, level.sample_block, level.sample_logw = map(
                rep, (level.k_order, level.samples, level.sample_block, level.sample_logw))
        out_rep, lse_rep = hyper_attention_reference(q, rep(k), rep(v), pattern=pattern, causal=causal)
        torch.testing.assert_close(out, out_rep, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, lse_rep)


def test_query_heads_of_a_group_share_their_key_heads_hyperplanes():
    q, k, _ = _qkv(hq=4, hkv=2, sq=12, sk=12)
    q[:, 1] = q[:, 0]  # heads 0 and 1 belong to key head 0
    q[:, 2] = q[:, 0]  # head 2 belongs to key head 1
    pattern = build_pattern(q, k, **SMALL)
    assert torch.equal(pattern.q_rank[:, 0], pattern.q_rank[:, 1])
    assert not torch.equal(pattern.q_rank[:, 0], pattern.q_rank[:, 2])


def test_gray_rank_orders_codes_so_neighbours_differ_in_one_bit():
    codes = torch.arange(128)
    order = torch.argsort(gray_rank(codes))
    flips = order[1:] ^ order[:-1]
    assert torch.all((flips & (flips - 1)) == 0) and torch.all(flips > 0)
    assert sorted(gray_rank(codes).tolist()) == list(range(128))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_through_the_reference(causal):
    q, k, v = _qkv(b=1, hq=2, hkv=1, sq=12, sk=12, d=4, dv=3, grad=True)
    pattern = build_pattern(q, k, causal=causal, **SMALL)
    fn = lambda q_, k_, v_: hyper_attention_reference(q_, k_, v_, pattern=pattern, causal=causal)
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[0], (q, k, v))
    # the pattern drawn from the same inputs is the same, so the plain call has the same gradient
    g = torch.randn(1, 2, 12, 3, dtype=F64)
    plain = hyper_attention_reference(q, k, v, causal=causal, **SMALL)[0]
    for a, b in zip(torch.autograd.grad(plain, (q, k, v), g), torch.autograd.grad(fn(q, k, v)[0], (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad,match", [(dict(block_size=0), "block_size"), (dict(lsh_bits=17), "lsh_bits"),
                                       (dict(variant="fast"), "variant"), (dict(sample_size=-1), "sample_size"),
                                       (dict(sampling="lsh"), "sampling"),
                                       (dict(sampling="importance", variant="paper"), "sampling='importance'")])
def test_bad_parameters_are_named(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        hyper_attention(q, k, v, **{**SMALL, **bad})


def test_causal_with_more_queries_than_keys_is_rejected():
    q, k, v = _qkv(sq=20, sk=12)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        hyper_attention(q, k, v, causal=True, **SMALL)


@pytest.mark.parametrize("causal", [False, True])
def test_default_variant_counts_sinks_and_window_once_and_nothing_twice(causal):
    q, k, _ = _qkv(sq=26, sk=26)
    pattern = build_pattern(q, k, causal=causal, **dict(SMALL, sample_size=0))
    for h in range(4):
        w = brute_force_weights(pattern, 0, h, 26, 26, 2, causal)
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        for i in range(26):
            window = range(max(0, i - 2), i + 1) if causal else range(max(0, i - 1), min(26, i + 2))
            sinks = [j for j in (0, 1) if j <= i or not causal]
            assert all(w[i, j] == 1 for j in [*sinks, *window])
            if causal:
                assert w[i, i + 1:].sum() == 0


def test_uniform_sampling_draws_one_sample_in_each_equal_slice_of_a_rectangle():
    q, k, _ = _qkv(sq=40, sk=40)
    pattern = build_pattern(q, k, causal=True, sampling="uniform", **SMALL)
    for level in pattern.levels:
        for r, (_, _, ks, kl) in enumerate(level.rect_list):
            offsets = level.samples[0, 0, r] - ks
            m = offsets.numel()
            slot = torch.arange(m)
            assert torch.all(offsets >= torch.floor(slot * kl / m))
            assert torch.all(offsets < torch.ceil((slot + 1) * kl / m)) and torch.all(offsets < kl)


def test_pattern_from_given_query_ranks_is_the_pattern_from_q():
    """Context parallelism hashes q rows with `hyperplanes` and passes the gathered ranks: same pattern."""
    from longattn.kernels.hyper.pattern import hyperplanes, lsh_rank, rect_query_means
    q, k, _ = _qkv(b=2, sq=21, sk=29)
    want = build_pattern(q, k, causal=True, seed=5, **SMALL)
    planes = hyperplanes(2, q.shape[-1], SMALL["lsh_bits"], 5, "cpu")
    assert torch.equal(planes, want.planes)
    with pytest.raises(ValueError, match="q_means"):
        build_pattern(None, k, causal=True, seed=5, q_rank=lsh_rank(q, planes, 2), **SMALL)
    got = build_pattern(None, k, causal=True, seed=5, q_rank=lsh_rank(q, planes, 2),
                        q_means=lambda rects: rect_query_means(q, rects, 2), **SMALL)
    assert torch.equal(got.q_rank, want.q_rank) and torch.equal(got.exact_lo, want.exact_lo)
    for a, b in zip(got.levels, want.levels, strict=True):
        for name in ("q_order", "k_order", "samples", "sample_block", "sample_logw"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_uniform_samples_stand_for_kl_over_m_keys_each():
    q, k, _ = _qkv(sq=40, sk=40)
    for variant, sampling in (("default", "uniform"), ("paper", None)):
        for level in build_pattern(q, k, causal=True, variant=variant, sampling=sampling, **SMALL).levels:
            for r, (_, _, _, kl) in enumerate(level.rect_list):
                want = torch.full_like(level.sample_logw[:, :, r], math.log(kl / SMALL["sample_size"]))
                torch.testing.assert_close(level.sample_logw[:, :, r], want)


def _rectangle_sum_estimates(q, k, sampling, seeds, scale=0.5):
    """Per seed, the non-causal one-rectangle estimate sum_i w_i exp(scale q0.k_{j_i}) of row 0's softmax
    normaliser from the samples alone, and the exact sum."""
    exact = torch.exp(scale * k[0, 0] @ q[0, 0, 0]).sum()
    estimates = []
    for seed in range(seeds):
        level = build_pattern(q, k, seed=seed, scale=scale, sampling=sampling,
                              **dict(SMALL, sample_size=8, sink_tokens=0, local_window=0)).levels[0]
        j, logw = level.samples[0, 0, 0], level.sample_logw[0, 0, 0].double()
        estimates.append((logw.exp() * torch.exp(scale * k[0, 0, j] @ q[0, 0, 0])).sum())
    return torch.stack(estimates), exact


def test_importance_samples_are_unbiased_and_beat_uniform_where_attention_concentrates():
    """The weights make the samples an unbiased estimate of the rectangle's sum; drawn where the rectangle's
    mean query looks, they estimate it with far less spread than uniform draws when a few keys dominate."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 64, 6, generator=g, dtype=F64) * 0.3 + 2.0   # queries alike: their mean is a good proxy
    k = torch.randn(1, 1, 96, 6, generator=g, dtype=F64) * 0.3
    k[0, 0, ::17] += 1.5                                                # a few keys the queries favour
    imp, exact = _rectangle_sum_estimates(q, k, "importance", 400)
    uni, _ = _rectangle_sum_estimates(q, k, "uniform", 400)
    for est in (imp, uni):  # unbiased: the mean of 400 draws within 4 standard errors of the exact sum
        assert abs(est.mean() - exact) < 4 * est.std() / 20 + 1e-9 * exact
    assert imp.std() < 0.5 * uni.std()


def test_importance_sampling_draws_from_the_mean_querys_softmax():
    """Samples are drawn from p = softmax(scale·q̄·k)/2 + 1/(2 kl) and weighted 1/(m p): recompute p from q̄
    (the weights use p's float32 CDF steps, so they match to float32 rounding of a sum, not bit for bit)."""
    from longattn.kernels.hyper.pattern import rect_query_means
    q, k, _ = _qkv(hq=4, hkv=2, sq=30, sk=30)
    pattern = build_pattern(q, k, causal=True, scale=0.7, **SMALL)  # the default variant's default sampling
    m = SMALL["sample_size"]
    for level in pattern.levels:
        means = rect_query_means(q, level.rects, 2).double()
        for r, (_, _, ks, kl) in enumerate(level.rect_list):
            for kh in range(2):
                p = 0.5 * torch.softmax(0.7 * k[0, kh, ks:ks + kl] @ means[0, kh, r], 0) + 0.5 / kl
                j = level.samples[0, kh, r] - ks
                assert torch.all((j >= 0) & (j < kl))
                torch.testing.assert_close(level.sample_logw[0, kh, r].double(), -torch.log(m * p[j]),
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sq,transposed", [(64, False), (64, True), (61, False)])  # 64: equal rectangles per level
def test_rectangle_key_scores_read_each_rectangles_keys(sq, transposed):
    """The mean-query scores behind importance sampling, by the strided view of k (equal rectangles at a constant
    stride) or by the general gather, are q̄_r·k_j for exactly the keys j of rectangle r."""
    from longattn.kernels.hyper.pattern import _rect_key_scores, plan_rectangles
    k = torch.randn(2, 3, sq, 5, dtype=F64)
    if transposed:  # models hand k as a (B, S, H, D) buffer seen through .transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    levels, _ = plan_rectangles(sq, sq, True, 8)
    assert len(levels) >= 2
    for rect_list in levels:
        rects = torch.tensor(rect_list).view(-1, 4)
        means = torch.randn(2, 3, len(rect_list), 5, dtype=F64)
        width = max(r[3] for r in rect_list)
        got = _rect_key_scores(k, rects, rect_list, means, width)
        for r, (_, _, ks, kl) in enumerate(rect_list):
            want = torch.einsum("bhkd,bhd->bhk", k[:, :, ks:ks + kl], means[:, :, r])
            torch.testing.assert_close(got[:, :, r, :kl], want)
