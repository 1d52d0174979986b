"""The Triton flash kernels against the float64 reference.

Without a GPU they run in the Triton interpreter on tiny shapes (tests/conftest.py sets
TRITON_INTERPRET=1) with 16×16 tiles, so every shape below spans several query and key tiles and
ends mid-tile. With LONGATTN_TEST_CUDA=1 the same tests run on CUDA at real sizes.
"""
import os

import pytest
import torch

from longattn.kernels.flash import flash_attention, flash_attention_reference, triton_supports
from longattn.kernels.flash.triton_decode import decode_splits

ON_CUDA = bool(os.environ.get("LONGATTN_TEST_CUDA"))
DEVICE = "cuda" if ON_CUDA else "cpu"
# bf16 tl.dot is unreliable in the interpreter: CPU runs fp32 and fp16; CUDA fp32 and bf16 (fp16 takes bf16's path)
DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}  # relative, vs float64

# (batch, q heads, kv heads, q len, k len, head dim)
if ON_CUDA:
    # each shape compiles its own kernels (several seconds each on the GPU): keep the list short
    SHAPES = [(2, 8, 8, 1024, 1024, 64), (1, 16, 4, 1000, 1537, 128), (2, 6, 2, 777, 513, 80),
              (1, 2, 2, 256, 384, 256)]
else:
    SHAPES = [(1, 2, 2, 32, 32, 16), (2, 4, 2, 19, 37, 24), (1, 6, 2, 33, 17, 40), (1, 2, 1, 21, 21, 80)]


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_qkv(b, hq, hkv, sq, sk, d, dtype, dv=None):
    gen = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype).requires_grad_()
    return gen(b, hq, sq, d), gen(b, hkv, sk, d), gen(b, hkv, sk, dv or d)


def reference(q, k, v, **kw):
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention_reference(qd, kd, vd, attn_mask=mask, **kw)
    return (qd, kd, vd), out, lse.double()  # the reference gives lse in float32 whatever its input


def check_forward_and_backward(q, k, v, **kw):
    """Compare out, lse and the gradients of out·g_out + lse·g_lse with the float64 reference."""
    tol = TOLERANCE[q.dtype]
    out, lse = flash_attention(q, k, v, **kw)
    inputs, ref_out, ref_lse = reference(q, k, v, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    assert not out.isnan().any()
    assert relative_error(out, ref_out) < tol
    torch.testing.assert_close(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=tol * 10, rtol=tol)
    g_out = torch.randn_like(ref_out)
    g_lse = torch.where(seen, torch.randn_like(ref_lse), torch.zeros_like(ref_lse))
    safe = lambda t: torch.where(seen, t, torch.zeros_like(t))
    grads = torch.autograd.grad((out.double() * g_out).sum() + (safe(lse.double()) * g_lse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (safe(ref_lse) * g_lse).sum(), inputs)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype and not g.isnan().any(), name
        assert relative_error(g, rg) < 2 * tol, name


def make_in_layout(b, hq, hkv, sq, sk, d, layout, dtype):
    """q, k, v (B, H, S, D), contiguous ("bhsd") or viewed from (B, S, H, D) tensors ("bshd")."""
    def make(h, s):
        t = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype)
        return t.transpose(1, 2) if layout == "bshd" else t.transpose(1, 2).contiguous()
    return make(hq, sq), make(hkv, sk), make(hkv, sk)


def check_forward(out, lse, q, k, v, scale, causal):
    """out and lse against the float64 reference; rows that see no key give out 0 and lse -inf."""
    _, ref_out, ref_lse = reference(q, k, v, scale=scale, causal=causal)
    assert relative_error(out, ref_out) < TOLERANCE[q.dtype]
    torch.testing.assert_close(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=1e-2, rtol=1e-3)
    if causal and q.shape[2] > k.shape[2]:
        assert (~seen).any() and (out[~seen] == 0).all()


def test_the_triton_path_is_taken_for_supported_inputs():
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, torch.float32)
    assert triton_supports(q, k, v)
    assert not triton_supports(q, k, v, dropout_p=0.1)
    assert not triton_supports(q.double(), k.double(), v.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_and_gradients_match_float64_reference(shape, causal, dtype):
    if dtype == torch.float16 and not ON_CUDA and shape[3] != shape[4]:
        pytest.skip("fp16 in the interpreter: one shape is enough")
    check_forward_and_backward(*make_qkv(*shape, dtype), causal=causal, scale=0.7 / shape[-1] ** 0.5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_value_head_dim_may_differ_from_key_head_dim(causal):
    b, h, s = (1, 4, 300) if ON_CUDA else (1, 2, 20)
    check_forward_and_backward(*make_qkv(b, h, h // 2, s, s + 5, 32, torch.float32, dv=48), causal=causal)


@pytest.mark.parametrize("mask_shape", ["keys", "rows", "full"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_broadcast_masks_match_reference(kind, mask_shape):
    b, hq, hkv, sq, sk, d = (2, 8, 2, 500, 700, 64) if ON_CUDA else (2, 4, 2, 19, 35, 16)
    shape = {"keys": (b, 1, 1, sk), "rows": (sq, sk), "full": (b, hq, sq, sk)}[mask_shape]
    if kind == "bool":
        mask = torch.rand(shape, device=DEVICE) > 0.4
    else:
        mask = torch.randn(shape, device=DEVICE) * 2
        mask = mask.masked_fill(torch.rand(shape, device=DEVICE) < 0.2, float("-inf"))
    check_forward_and_backward(*make_qkv(b, hq, hkv, sq, sk, d, torch.float32), attn_mask=mask, causal=True)


@pytest.mark.parametrize("sq", [1, 13], ids=["decode", "tiled"])
def test_an_additive_mask_at_the_dtype_minimum_masks_as_eager_does(sq):
    """HF fills masked positions with finfo.min and adds: a row masked throughout gives the uniform mean of V,
    other rows ignore the filled keys. Scaled by log2 e inside the kernels, finfo.min once overflowed to -inf and
    such a row gave 0."""
    sk = 700 if ON_CUDA else 37
    q, k, v = make_qkv(1, 4, 2, sq, sk, 16, torch.float32)
    mask = torch.zeros(1, 1, sq, sk, device=DEVICE)
    mask[..., :, 5:9] = torch.finfo(torch.float32).min
    mask[..., -1, :] = torch.finfo(torch.float32).min  # the last row sees every key at the minimum
    out, lse = flash_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[..., -1, :], v.repeat_interleave(2, dim=1).mean(-2).detach(), atol=1e-4,
                               rtol=1e-4)
    inputs, ref_out, ref_lse = reference(q, k, v, attn_mask=mask)
    assert relative_error(out, ref_out) < TOLERANCE[q.dtype]
    # the other rows' lse and every gradient that does not pass through the masked-out row. Its own lse is
    # -3e38 + log(keys) in the reference, a number float32 cannot tell from -3e38 after the scaling to base 2
    torch.testing.assert_close(lse[..., :-1].double(), ref_lse[..., :-1], atol=1e-3, rtol=1e-3)
    g = torch.randn_like(ref_out)
    g[..., -1, :] = 0
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.to(out.dtype), retain_graph=True),
                    torch.autograd.grad(ref_out, inputs, g)):
        assert relative_error(a, b) < 2 * TOLERANCE[q.dtype]
    # with a gradient through that row too, everything stays finite (its probabilities are clamped at 1)
    assert all(t.isfinite().all() for t in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)))


def test_rows_that_see_no_key_give_zero_output_and_minus_inf_lse():
    # causal with more queries than keys: the first Sq - Sk queries see nothing; a bool mask row of False too
    sq, sk = (300, 200) if ON_CUDA else (30, 20)
    q, k, v = make_qkv(1, 2, 1, sq, sk, 32, torch.float32)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=DEVICE)
    mask[-1] = False
    out, lse = flash_attention(q, k, v, causal=True, attn_mask=mask)
    assert torch.isinf(lse[..., : sq - sk]).all() and torch.isinf(lse[..., -1]).all()
    assert (out[..., : sq - sk, :] == 0).all() and (out[..., -1, :] == 0).all()
    check_forward_and_backward(q, k, v, causal=True, attn_mask=mask)


def test_float_mask_that_requires_grad_gets_the_reference_gradient():
    s = 64 if ON_CUDA else 12
    q, k, v = make_qkv(1, 2, 1, s, s, 16, torch.float32)
    mask = torch.randn(1, 1, s, s, device=DEVICE, requires_grad=True)
    out, _ = flash_attention(q, k, v, attn_mask=mask)
    ref, _ = flash_attention_reference(q, k, v, attn_mask=mask)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, mask), g), torch.autograd.grad(ref, (q, mask), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


DECODE_CASES = [  # (batch, q heads, kv heads, q len, k len, head dim, causal, mask)
    (1, 9, 3, 1, 8192, 64, False, None), (2, 8, 8, 4, 5000, 128, True, None),
    (1, 32, 4, 16, 3000, 80, True, "float"), (2, 4, 1, 3, 4099, 64, False, "bool"),
] if ON_CUDA else [
    (1, 6, 2, 1, 77, 16, False, None), (2, 4, 2, 3, 70, 24, True, None),
    (1, 2, 1, 16, 40, 32, True, "float"), (1, 3, 1, 2, 50, 16, False, "bool"),
]


@pytest.fixture(params=[False, True], ids=["chunked", "interleaved"])
def key_order(request, monkeypatch):
    """Each split's keys as one contiguous chunk, or every num_splits-th tile."""
    from longattn.kernels.flash import triton_decode
    monkeypatch.setattr(triton_decode, "INTERLEAVED", request.param)
    return request.param


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "h{}kv{}q{}k{}d{}".format(*c[1:6]))
def test_decode_matches_reference(case, key_order):
    b, hq, hkv, sq, sk, d, causal, kind = case
    mask = None
    if kind == "bool":
        mask = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.5
    elif kind == "float":
        mask = torch.randn(1, hq, 1, sk, device=DEVICE)
    check_forward_and_backward(*make_qkv(b, hq, hkv, sq, sk, d, torch.float32), causal=causal, attn_mask=mask)


def test_decode_half_precision_matches_reference(key_order):
    dtype = torch.bfloat16 if ON_CUDA else torch.float16
    sk = 20000 if ON_CUDA else 60
    check_forward_and_backward(*make_qkv(1, 6, 2, 1, sk, 64, dtype), causal=True)


def test_decode_splits_give_several_programs_per_sm_and_cover_the_keys():
    for bh, sk in [(3, 8192), (3, 131072), (32, 131072), (1, 100)]:
        splits, keys = decode_splits(bh, sk, num_sms=132)
        assert splits * keys >= sk > (splits - 1) * keys and keys % 128 == 0
        assert splits * bh >= min(2 * 132, sk // 128)


def test_dispatched_op_differentiates_through_the_triton_path():
    from longattn.kernels import Band, encode_plan
    s = 256 if ON_CUDA else 18
    q, k, v = make_qkv(1, 4, 2, s, s, 16, torch.float32)
    plan = encode_plan([Band("flash")])
    out = torch.ops.longattn.attention(q, k, v, None, 0.25, True, 0.0, None, plan)
    inputs, ref, _ = reference(q, k, v, scale=0.25, causal=True)
    g = torch.randn_like(ref)
    assert relative_error(out, ref) < 1e-3
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, inputs, g)):
        assert relative_error(a, b) < 2e-3


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_forward_matches_reference_including_tiles_that_run_into_the_next_head(causal, monkeypatch):
    # the TMA path reads K/V as one (B·Hkv·Sk, D) matrix: a partial last tile reads the next head's rows
    from longattn.kernels.flash import triton_fwd
    if not ON_CUDA:
        monkeypatch.setattr(triton_fwd, "tma_allowed", lambda k, v: True)
    elif not triton_fwd.tma_allowed(torch.empty(1, 1, 16, 64, device=DEVICE), torch.empty(1, 1, 16, 64, device=DEVICE)):
        pytest.skip("no TMA on this GPU / Triton")
    b, hq, hkv, sq, sk, d, block = (2, 8, 2, 1000, 1100, 128, 128) if ON_CUDA else (2, 4, 2, 20, 37, 32, 16)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype)
    config = dict(BLOCK_M=block, BLOCK_N=block // 2, USE_TMA=True, num_warps=4 if ON_CUDA else 1,
                  num_stages=3 if ON_CUDA else 1)
    out, lse = triton_fwd.flash_forward(q.detach(), k.detach(), v.detach(), 0.1, causal, None, config=config)
    _, ref_out, ref_lse = reference(q, k, v, scale=0.1, causal=causal)
    assert relative_error(out, ref_out) < TOLERANCE[dtype]
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)


def test_a_config_that_does_not_fit_the_gpu_falls_back_to_smaller_tiles():
    from longattn.kernels.flash.triton_fwd import OutOfResources, fallback_configs, launch_first_that_fits
    launched = []

    class FakeKernel:  # "compiles" only tiles of at most 64×32, like fp32 with d128 on a real GPU
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, **meta):
                if BLOCK_M * BLOCK_N > 64 * 32:
                    raise OutOfResources(300000, 232448, "shared memory")
                launched.append((grid, BLOCK_M, BLOCK_N))
            return run

    first = {"BLOCK_M": 128, "BLOCK_N": 128, "USE_TMA": False, "num_warps": 8, "num_stages": 3}
    cfg = launch_first_that_fits(FakeKernel(), lambda c: (c["BLOCK_M"],), (), {}, fallback_configs(first))
    assert launched == [((cfg["BLOCK_M"],), cfg["BLOCK_M"], cfg["BLOCK_N"])]
    assert cfg["BLOCK_M"] * cfg["BLOCK_N"] == 64 * 32


def test_a_tuned_config_is_kept_per_key_and_launched_on_the_plain_kernel_with_its_even_flags():
    from longattn.kernels.flash.triton_fwd import ChosenConfigs
    calls = []

    class FakeTuner:  # the autotuner: picks a config per call, remembers it as best_config
        def __getitem__(self, grid):
            def run(*args, **meta):
                self.best_config = type("Cfg", (), {"all_kwargs": lambda s: {"BLOCK_M": 64, "BLOCK_N": 32}})()
                calls.append(("tune", grid(meta), args))
            return run

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("launch", grid, args, kw))

    chosen = ChosenConfigs(FakeTuner(), FakeKernel())
    grid = lambda c: (c.get("BLOCK_M", 0),)
    args_for = lambda cfg: ("tuner",) if cfg is None else ("chosen", cfg["BLOCK_N"])
    chosen.launch(("key", 1), grid, args_for, {"CAUSAL": True}, (128, 100))
    chosen.launch(("key", 1), grid, args_for, {"CAUSAL": True}, (128, 100))
    chosen.launch(("key", 2), grid, args_for, {"CAUSAL": False}, (128, 96))
    assert calls[0][0] == "tune" and calls[0][2] == ("tuner",)
    assert calls[1] == ("launch", (64,), ("chosen", 32),
                        {"CAUSAL": True, "BLOCK_M": 64, "BLOCK_N": 32, "EVEN_M": True, "EVEN_N": False})
    assert calls[2][0] == "tune"  # a new key tunes again


@pytest.mark.skipif(not ON_CUDA, reason="the autotuner needs a GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autotuned_kernels_give_the_same_results_when_tuning_and_when_launching_the_chosen_config(causal, monkeypatch):
    from longattn.kernels.flash import triton_fwd
    monkeypatch.setenv("LONGATTN_FLASH_AUTOTUNE", "1")
    monkeypatch.setenv("LONGATTN_FLASH_WS", "0")  # the pointer kernel, which goes through the autotuner
    q, k, v = make_qkv(1, 4, 2, 1000, 1100, 64, torch.bfloat16)
    assert triton_fwd.autotuning()
    for _ in range(2):  # the first call of each kernel tunes, the second launches the chosen config directly
        check_forward_and_backward(q, k, v, scale=0.125, causal=causal)


# (batch, q heads, kv heads, q len, k len, head dim, layout): "bshd" = q/k/v viewed from (B, S, H, D)
WS_SHAPES = [(2, 8, 2, 1000, 1100, 128, "bhsd"), (1, 4, 4, 777, 1300, 128, "bshd"), (1, 2, 1, 600, 300, 128, "bhsd")] \
    if ON_CUDA else [(1, 2, 2, 32, 32, 16, "bhsd"), (2, 4, 2, 20, 37, 32, "bshd"), (1, 2, 1, 37, 20, 16, "bhsd")]


@pytest.mark.parametrize("shape", WS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_warp_specialised_forward_matches_reference(shape, causal):
    # uneven lengths (the last key tile masked, rows past Sq clipped), GQA, transposed layouts read through
    # 4-d descriptors, and under causal with Sq > Sk rows that see no key (out 0, lse -inf)
    from longattn.kernels.flash import triton_fwd_ws
    b, hq, hkv, sq, sk, d, layout = shape
    dtype = torch.bfloat16 if ON_CUDA else torch.float16
    q, k, v = make_in_layout(b, hq, hkv, sq, sk, d, layout, dtype)
    if ON_CUDA and not triton_fwd_ws.ws_applies(q, k, v, None, causal=False):
        pytest.skip("no warp-specialised path on this GPU / Triton")
    # causal is not dispatched here (measured no faster) but the kernel keeps it: tested all the same
    result = triton_fwd_ws.flash_forward_ws(q, k, v, 0.1, causal)
    if result is None:
        pytest.skip("this Triton cannot build the warp-specialised kernel (the pointer kernel runs instead)")
    check_forward(*result, q, k, v, 0.1, causal)


def test_flash_attention_takes_the_warp_specialised_kernel_where_it_applies_and_falls_back_when_it_cannot_build(
        monkeypatch):
    from longattn.kernels.flash import triton_fwd_ws
    if ON_CUDA:
        pytest.skip("dispatch checked in the interpreter")
    monkeypatch.setattr(triton_fwd_ws, "WS_HEAD_DIMS", (16,))
    monkeypatch.setattr(triton_fwd_ws, "_broken", set())
    calls = []
    real = triton_fwd_ws._flash_fwd_ws_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_fwd_ws, "_flash_fwd_ws_kernel", Spy())
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, torch.float16)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, _ = flash_attention(q, k, v)
    _, ref, _ = reference(q, k, v)
    assert len(calls) == 1 and relative_error(out, ref) < 5e-3
    out, _ = flash_attention(q, k, v, causal=True)  # causal: the pointer kernel
    assert len(calls) == 1 and relative_error(out, reference(q, k, v, causal=True)[1]) < 5e-3
    assert not triton_fwd_ws.ws_applies(q, k, v, torch.ones(40, 40, dtype=torch.bool), False)  # masks: pointer
    assert not triton_fwd_ws.ws_applies(q.float(), k.float(), v.float(), None, False)

    class FailsToBuild:  # what Triton 3.9's warp-specialisation pass does with this kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append("failed")
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(triton_fwd_ws, "_flash_fwd_ws_kernel", FailsToBuild())
    for _ in range(2):  # the failure is remembered: one attempt, then the pointer kernel directly
        out, _ = flash_attention(q, k, v)
        assert relative_error(out, ref) < 5e-3
    assert calls.count("failed") == 1


def test_gluon_descriptor_coordinates_address_each_head_in_both_layouts():
    # the Gluon kernel reads row b·rows_per_batch + h·rows_per_head + s, columns from h·cols_per_head
    from longattn.kernels.flash.gluon_fwd import _as_matrix
    b, h, s, d = 2, 3, 5, 4
    base = torch.arange(b * h * s * d, dtype=torch.float32)
    for t in (base.view(b, h, s, d), base.view(b, s, h, d).transpose(1, 2)):
        matrix, per_batch, per_head, cols = _as_matrix(t)
        for i, j, n in [(0, 0, 0), (1, 2, 4), (0, 1, 3), (1, 0, 2)]:
            assert torch.equal(matrix[i * per_batch + j * per_head + n, j * cols:j * cols + d], t[i, j, n])
    assert _as_matrix(base.view(b, h, s, d).transpose(2, 3)) is None  # other layouts: the Triton kernels


# (batch, q heads, kv heads, q len, k len, head dim, layout, config): GQA, Sq < Sk (chunked prefill), Sq > Sk
# (rows that see no key under causal), both layouts, the shipped configs and others (the warp-specialised
# kernel among them) given explicitly
_GLUON_WS = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "STAGES": 2, "WS": True, "CONSUMER_REGS": 240,
             "maxnreg": 168}
GLUON_SHAPES = [(2, 8, 2, 1024, 1024, 64, "bhsd", None), (1, 4, 4, 512, 1536, 64, "bshd", None),
                (1, 4, 2, 1024, 512, 64, "bhsd", None),
                (1, 4, 2, 768, 1280, 128, "bshd", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "STAGES": 2}),
                (2, 2, 1, 1024, 1024, 128, "bhsd", _GLUON_WS), (1, 4, 2, 1024, 512, 128, "bshd", _GLUON_WS),
                (2, 2, 1, 1024, 1024, 128, "bshd", {**_GLUON_WS, "PINGPONG": True}),
                (1, 2, 2, 512, 1536, 64, "bhsd", {**_GLUON_WS, "STAGES": 4, "PINGPONG": True})]


@pytest.mark.skipif(not ON_CUDA, reason="Gluon does not run in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GLUON_SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_forward_matches_reference(shape, causal, dtype):
    from longattn.kernels.flash import gluon_fwd
    b, hq, hkv, sq, sk, d, layout, config = shape
    q, k, v = make_in_layout(b, hq, hkv, sq, sk, d, layout, dtype)
    if gluon_fwd.gluon is None or not gluon_fwd._hopper(q.device.index or 0):
        pytest.skip("no Gluon path on this GPU / Triton")
    config = config or gluon_fwd.GLUON_CONFIGS[(d, causal)]
    result = gluon_fwd.flash_forward_gluon(q, k, v, 0.1, causal, config=config)
    assert result is not None, "the Gluon kernel did not build"
    check_forward(*result, q, k, v, 0.1, causal)


@pytest.mark.skipif(not ON_CUDA, reason="Gluon does not run in the Triton interpreter")
def test_flash_attention_takes_the_gluon_kernel_where_it_applies(monkeypatch):
    from longattn.kernels.flash import autograd, gluon_fwd
    monkeypatch.setattr(gluon_fwd, "MIN_WORK", 0)  # a test-sized call is worth the launch
    q, k, v = make_qkv(1, 4, 2, 1024, 1024, 64, torch.bfloat16)
    if not gluon_fwd.gluon_applies(q, k, v, None, True):
        pytest.skip("no Gluon path on this GPU / Triton")
    calls = []
    real = gluon_fwd.flash_forward_gluon
    monkeypatch.setattr(autograd, "flash_forward_gluon", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    check_forward_and_backward(q, k, v, scale=0.125, causal=True)  # backward: the Triton kernels on its lse
    assert calls == [True]
    assert not gluon_fwd.gluon_applies(q[:, :, :1000].contiguous(), k, v, None, True)  # not whole tiles
    assert not gluon_fwd.gluon_applies(q, k, v, torch.ones(1024, 1024, dtype=torch.bool, device=DEVICE), False)
    assert not gluon_fwd.gluon_applies(q.float(), k.float(), v.float(), None, False)


def test_only_calls_whose_work_repays_the_launch_take_the_gluon_kernel():
    from longattn.kernels.flash.gluon_fwd import worth_the_launch
    qkv = lambda h, s, d: (torch.empty(1, h, s, d), torch.empty(1, h, s, d))
    assert not worth_the_launch(*qkv(32, 4096, 64), causal=False)  # measured slower eagerly at 4K
    assert worth_the_launch(*qkv(32, 8192, 64), causal=False) and worth_the_launch(*qkv(32, 8192, 64), causal=True)
    assert not worth_the_launch(*qkv(16, 4096, 128), causal=True)
    assert worth_the_launch(*qkv(16, 8192, 128), causal=True)
