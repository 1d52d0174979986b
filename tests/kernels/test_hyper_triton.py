"""Triton HyperAttention (interpreter on CPU) vs the reference on the same pattern."""
import pytest
import torch

from longattn.kernels import Band, encode_plan
from longattn.kernels.hyper import build_pattern, hyper_attention, hyper_attention_from_pattern
from longattn.kernels.hyper.pattern import local_pattern, lsh_rank

triton = pytest.importorskip("triton")
from longattn.kernels.hyper.triton_attention import hyper_forward_triton  # noqa: E402
from longattn.kernels.hyper.triton_backward import exact_rows_by_key_tile, hyper_backward_triton  # noqa: E402
from longattn.kernels.hyper.triton_hash import lsh_rank_triton  # noqa: E402

SMALL = dict(block_size=8, sample_size=5, lsh_bits=3, min_seq_len=16, sink_tokens=2, local_window=3)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _qkv(b=1, hq=4, hkv=2, sq=37, sk=37, d=16, dv=16, dtype=torch.float32, grad=False):
    mk = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(grad)
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant,sampling", [("paper", "uniform"), ("default", "uniform"), ("default", "importance")])
@pytest.mark.parametrize("causal,sq,sk", [(False, 37, 37), (False, 19, 45), (True, 37, 37), (True, 23, 45)])
def test_kernel_equals_reference_on_the_same_pattern(dtype, variant, sampling, causal, sq, sk):
    q, k, v = _qkv(b=2, sq=sq, sk=sk, dtype=dtype)
    pattern = build_pattern(q, k, causal=causal, variant=variant, sampling=sampling, seed=4, **SMALL)
    assert len(pattern.levels) >= (2 if causal else 1)  # several launches run
    out, lse = hyper_forward_triton(q, k, v, pattern, scale=0.3, causal=causal)
    ref, ref_lse = hyper_attention_from_pattern(q.double(), k.double(), v.double(), pattern, scale=0.3, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,sq,sk", [(False, 37, 37), (True, 70, 83)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_without_sinks_and_window_rectangles_skip_no_keys_and_match(causal, sq, sk, dtype):
    """The default variant with sinks and window off: exact keys (causal leaves) never lie in a row's
    rectangles, so the block loop runs its full key tiles unmasked and, non-causally, the exact part is
    skipped and the one level writes q's dtype directly."""
    q, k, v = _qkv(sq=sq, sk=sk, dtype=dtype)
    params = dict(SMALL, block_size=32, min_seq_len=16, sink_tokens=0, local_window=0)  # full 16-key tiles
    pattern = build_pattern(q, k, causal=causal, seed=5, **params)
    assert pattern.exact_apart
    assert not build_pattern(q, k, causal=causal, seed=5, **dict(params, sink_tokens=1)).exact_apart
    out, lse = hyper_forward_triton(q, k, v, pattern, scale=0.3, causal=causal)
    ref, ref_lse = hyper_attention_from_pattern(q.double(), k.double(), v.double(), pattern, scale=0.3, causal=causal)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,window,sq,sk", [(True, 5, 140, 140), (True, 40, 50, 83), (False, 45, 70, 70)])
def test_exact_part_interior_tiles_run_unmasked_and_still_match(causal, window, sq, sk):
    """Long causal leaves and a wide window: key tiles that every row of a query tile takes run without
    masks (the 16-wide interpreter tiles see several of them), the edges around them with masks."""
    q, k, v = _qkv(sq=sq, sk=sk)
    params = dict(SMALL, min_seq_len=80, local_window=window)
    pattern = build_pattern(q, k, causal=causal, seed=2, **params)
    out, lse = hyper_forward_triton(q, k, v, pattern, scale=0.3, causal=causal)
    ref, ref_lse = hyper_attention_from_pattern(q.double(), k.double(), v.double(), pattern, scale=0.3, causal=causal)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,window,sq,sk", [(True, 5, 140, 140), (True, 40, 50, 83), (False, 45, 70, 70)])
def test_exact_part_backward_interior_tiles_run_unmasked_and_still_match(causal, window, sq, sk):
    """The backward's exact part skips masks on the same interiors: row-major for dq, and key-major for
    dk / dv (row tiles whose ranges hold the whole key tile)."""
    q, k, v = _qkv(sq=sq, sk=sk, grad=True)
    pattern = build_pattern(q, k, causal=causal, seed=2, **dict(SMALL, min_seq_len=80, local_window=window))
    _assert_backward_kernels_match_reference(q, k, v, pattern, causal)


def _assert_backward_kernels_match_reference(q, k, v, pattern, causal):
    """The Triton backward of the Triton forward's (out, lse), for random output and lse gradients, equals the
    reference's autograd gradients on the same pattern."""
    out, lse = hyper_forward_triton(q.detach(), k.detach(), v.detach(), pattern, scale=0.3, causal=causal)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = hyper_backward_triton(q.detach(), k.detach(), v.detach(), out, lse, g, g_lse, pattern, scale=0.3,
                                causal=causal)
    ref, ref_lse = hyper_attention_from_pattern(q, k, v, pattern, scale=0.3, causal=causal)
    want = torch.autograd.grad((ref, ref_lse), (q, k, v), (g, g_lse))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("block_dq", ["rows", "atomic"])
@pytest.mark.parametrize("causal", [False, True])
def test_blocks_dq_by_rows_or_by_atomics_gives_the_reference_gradients(monkeypatch, block_dq, causal):
    from longattn.kernels.hyper import triton_backward
    monkeypatch.setattr(triton_backward, "BLOCK_DQ", block_dq)
    q, k, v = _qkv(hq=4, hkv=2, sq=45, sk=45, grad=True)
    pattern = build_pattern(q, k, causal=causal, seed=4, **dict(SMALL, min_seq_len=16))
    _assert_backward_kernels_match_reference(q, k, v, pattern, causal)


@pytest.mark.parametrize("causal,sq,sk,window", [(True, 140, 140, 5), (True, 50, 83, 40), (False, 70, 70, 45),
                                                 (False, 33, 70, 0)])
def test_key_tiles_interior_rows_hold_the_whole_tile_and_every_row_of_the_tile_is_walked(causal, sq, sk, window):
    q, k, _ = _qkv(sq=sq, sk=sk)
    pattern = build_pattern(q, k, causal=causal, seed=2, **dict(SMALL, min_seq_len=80, local_window=window))
    lo, hi = pattern.exact_lo, pattern.exact_hi
    row_lo, row_hi, full_lo, full_hi = exact_rows_by_key_tile(pattern, sq, sk, 16, causal)
    pos = torch.arange(sq) + sk - sq
    for t, start in enumerate(range(0, sk, 16)):
        keys = torch.arange(start, min(start + 16, sk))
        # which rows' exact sets (sinks causally up to the row, and the range) hold which keys of the tile
        in_range = (keys >= lo[:, None]) & (keys < hi[:, None]) & (keys >= pattern.sinks)
        sinks = (keys < pattern.sinks) & (~torch.tensor(causal) | (keys <= pos[:, None]))
        holds = in_range | sinks
        walked = torch.zeros(sq, dtype=torch.bool)
        walked[row_lo[t]:row_hi[t]] = True
        assert not (holds.any(1) & ~walked).any(), f"tile {t}: a row holding one of its keys is not walked"
        inside = torch.zeros(sq, dtype=torch.bool)
        inside[full_lo[t]:max(full_lo[t], full_hi[t])] = True
        assert (keys.numel() == 16) or not inside.any()
        assert in_range[inside].all(), f"tile {t}: a row marked inside skips a key of it"
    assert (full_hi > full_lo).any() or window == 0


def test_kernel_handles_head_dims_that_are_not_powers_of_two_and_dv_unlike_d():
    q, k, v = _qkv(hq=3, hkv=1, sq=29, sk=29, d=12, dv=20)
    pattern = build_pattern(q, k, causal=True, **SMALL)
    out, lse = hyper_forward_triton(q, k, v, pattern, scale=0.3, causal=True)
    ref, ref_lse = hyper_attention_from_pattern(q, k, v, pattern, scale=0.3, causal=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@pytest.mark.parametrize("group", [1, 3])
def test_hash_kernel_equals_torch_hash(group):
    x = torch.randn(2, 2 * group, 50, 24)
    planes = torch.randn(2, 24, 7)
    assert torch.equal(lsh_rank_triton(x, planes, group), lsh_rank(x, planes, group))


@pytest.mark.parametrize("causal,sq,sk,variant,heads,dims", [
    (False, 30, 30, "default", (4, 2), (16, 16)), (True, 30, 30, "default", (4, 2), (16, 16)),
    (False, 19, 45, "paper", (2, 2), (16, 16)), (True, 23, 45, "default", (3, 1), (12, 20)),
    (True, 30, 30, "importance", (4, 2), (16, 16))])
def test_backward_kernels_equal_reference_gradients_for_out_and_lse(causal, sq, sk, variant, heads, dims):
    q, k, v = _qkv(hq=heads[0], hkv=heads[1], sq=sq, sk=sk, d=dims[0], dv=dims[1], grad=True)
    params = dict(SMALL, variant=variant) if variant != "importance" else dict(SMALL, sampling="importance")
    out, lse = hyper_attention(q, k, v, causal=causal, scale=0.25, **params)
    pattern = build_pattern(q, k, causal=causal, scale=0.25, **params)
    ref, ref_lse = hyper_attention_from_pattern(q, k, v, pattern, scale=0.25, causal=causal)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v), (g, g_lse))
    want = torch.autograd.grad((ref, ref_lse), (q, k, v), (g, g_lse))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_backward_kernels_in_half_precision_follow_the_float64_gradients():
    q, k, v = _qkv(sq=30, sk=30, dtype=torch.float16, grad=True)
    out, lse = hyper_attention(q, k, v, causal=True, **SMALL)
    pattern = build_pattern(q, k, causal=True, **SMALL)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = hyper_attention_from_pattern(q64, k64, v64, pattern, scale=0.25, causal=True)
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.half())
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-2)


def test_dispatcher_op_runs_the_kernel_and_differentiates_it():
    q, k, v = _qkv(sq=30, sk=30, grad=True)
    plan = encode_plan([Band("flash", below=16), Band("hyper", params=SMALL)])
    out = torch.ops.longattn.attention(q, k, v, None, 0.25, True, 0.0, None, plan)
    want = hyper_attention(q, k, v, scale=0.25, causal=True, **SMALL)[0]
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_public_function_keeps_float64_on_the_reference_and_agrees_with_the_kernel():
    q, k, v = _qkv(sq=30, sk=30)
    out32, _ = hyper_attention(q, k, v, causal=True, **SMALL)
    out64, _ = hyper_attention(q.double(), k.double(), v.double(), causal=True, **SMALL)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, **TOL[torch.float32])


def test_kernels_read_transposed_views_as_models_produce_them():
    # (B, S, H, D) projections viewed as (B, H, S, D), as Hugging Face attention layers pass them
    q = torch.randn(1, 30, 4, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 30, 2, 16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 30, 2, 16).transpose(1, 2).requires_grad_()
    out, lse = hyper_attention(q, k, v, causal=True, **SMALL)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    ref, ref_lse = hyper_attention(qc, kc, vc, causal=True, **SMALL)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (qc, kc, vc), g)):
        torch.testing.assert_close(a, b)


def test_kernels_with_64_bit_offsets_give_the_same_result(monkeypatch):
    from longattn.kernels.hyper import triton_attention, triton_backward
    q, k, v = _qkv(sq=30, sk=30, grad=True)
    out, lse = hyper_attention(q, k, v, causal=True, **SMALL)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for module in (triton_attention, triton_backward):
        monkeypatch.setattr(module, "needs_wide_offsets", lambda *tensors: True)
    out64, lse64 = hyper_attention(q, k, v, causal=True, **SMALL)
    torch.testing.assert_close(out64, out)
    for a, b in zip(torch.autograd.grad(out64, (q, k, v), g), grads):
        torch.testing.assert_close(a, b)


def _row_subset(kind, sq):
    """Increasing query rows as a rank holds them: one chunk, two chunks (zigzag), or scattered."""
    c = sq // 4
    if kind == "contiguous":
        return torch.arange(c, 3 * c)
    if kind == "zigzag":
        return torch.cat([torch.arange(0, c), torch.arange(3 * c, sq)])
    return torch.randperm(sq)[: sq // 2].sort().values


@pytest.mark.parametrize("rows", ["contiguous", "zigzag", "scattered"])
@pytest.mark.parametrize("causal,sq,sk,params,heads", [
    (True, 37, 37, {}, (2, 1)), (True, 23, 45, dict(variant="paper"), (3, 1)),
    (False, 40, 40, dict(block_size=40), (2, 2)), (False, 40, 40, dict(block_size=40, variant="paper"), (2, 2))])  # one block: local blocks span several query tiles
def test_local_kernels_equal_the_full_kernels_rows(rows, causal, sq, sk, params, heads):
    """A pattern restricted to some rows (context parallelism) gives those rows' out / lse, their dq, and
    the dk / dv of their outputs, as the full-sequence kernels do."""
    q, k, v = _qkv(b=2, hq=heads[0], hkv=heads[1], sq=sq, sk=sk)
    pattern = build_pattern(q, k, causal=causal, seed=3, **dict(SMALL, **params))
    rows = _row_subset(rows, sq)
    local = local_pattern(pattern, rows)
    out, lse = hyper_forward_triton(q, k, v, pattern, scale=0.3, causal=causal)
    out_l, lse_l = hyper_forward_triton(q[:, :, rows], k, v, local, scale=0.3, causal=causal)
    torch.testing.assert_close(out_l, out[:, :, rows], **TOL[torch.float32])
    torch.testing.assert_close(lse_l, lse[:, :, rows], **TOL[torch.float32])
    # gradients flowing into these rows' outputs only
    mine = torch.zeros(sq, dtype=torch.bool)
    mine[rows] = True
    g = torch.randn_like(out) * mine[:, None]
    g_lse = torch.randn_like(lse) * mine
    want = hyper_backward_triton(q, k, v, out, lse, g, g_lse, pattern, scale=0.3, causal=causal)
    got = hyper_backward_triton(q[:, :, rows], k, v, out_l, lse_l, g[:, :, rows], g_lse[:, :, rows], local,
                                scale=0.3, causal=causal)
    torch.testing.assert_close(got[0], want[0][:, :, rows], **TOL[torch.float32])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
