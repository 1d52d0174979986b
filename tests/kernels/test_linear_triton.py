"""The Triton chunked kernels of the linear kind (run in the interpreter on CPU) against the float64 reference."""
import pytest
import torch

from longattn.kernels.linear import linear_attention, linear_attention_reference
from longattn.kernels.linear.reference import far_chunked
from longattn.kernels.linear.triton_additive import far_additive_torch, far_additive_triton
from longattn.kernels.linear.triton_chunk import far_chunked_triton, runs_on, triton

pytestmark = pytest.mark.skipif(triton is None, reason="triton is not installed")

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _features(rule, B=1, Hq=4, Hkv=2, Sq=37, L=45, F=20, V=9):
    fq, fk, vals = torch.rand(B, Hq, Sq, F), torch.rand(B, Hkv, L, F), torch.randn(B, Hkv, L, V)
    if rule == "delta":  # the delta rule runs on unit-length features
        fq, fk = torch.nn.functional.normalize(fq, dim=-1), torch.nn.functional.normalize(fk, dim=-1)
    return fq, fk, vals, (torch.rand(B, Hkv, L) if rule == "delta" else None)


@pytest.mark.parametrize("rule", ["add", "delta"])
@pytest.mark.parametrize("causal,offset", [(True, 0), (True, -5), (True, 7), (False, None)],
                         ids=["aligned", "queries-after-keys", "keys-ahead", "non-causal"])
def test_far_kernels_equal_the_pytorch_chunked_form(rule, causal, offset):
    fq, fk, vals, beta = _features(rule)
    out = far_chunked_triton(fq, fk, vals, beta, causal=causal, offset=offset, update_rule=rule, chunk=16)
    ref = far_chunked(fq.double(), fk.double(), vals.double(), None if beta is None else beta.double(),
                      causal=causal, offset=offset, update_rule=rule, chunk=16)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


OFFSETS = {"aligned": (True, 0), "queries-after-keys": (True, -21), "keys-ahead": (True, 9), "non-causal": (False, None)}
# every offset with the commonest map and mode, every map and mode with the hardest offsets
COMBOS = [("elu", "divide", o) for o in OFFSETS] + [
    (m, d, o) for m, d in (("relu", "unnormalised"), ("features", "num-den"), ("elu", "num-den"))
    for o in ("queries-after-keys", "non-causal")]


@pytest.mark.parametrize("fmap,mode,where", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_additive_kernels_on_strided_inputs_equal_the_pytorch_form(fmap, mode, where):
    causal, offset = OFFSETS[where]
    # (B, S, H, D) storage seen as (B, H, S, D), as attention modules usually hand q/k/v over
    q = torch.randn(2, 37, 4, 12).transpose(1, 2)
    k, v = torch.randn(2, 45, 2, 12).transpose(1, 2), torch.randn(2, 45, 2, 10).transpose(1, 2)
    if fmap == "features":
        q, k = q.abs(), k.abs()
    opts = dict(fmap=fmap if fmap != "features" else "favor", causal=causal, offset=offset, chunk=16,
                normalize=mode != "unnormalised", divide=mode == "divide", eps=1e-6, out_dtype=torch.float32)
    out = far_additive_triton(q, k, v, **opts)
    ref = far_additive_torch(q.double(), k.double(), v.double(), **opts)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("fmap,mode,where", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_additive_backward_kernels_give_the_gradients_of_the_pytorch_form(fmap, mode, where):
    causal, offset = OFFSETS[where]
    from longattn.kernels.linear.triton_additive import far_additive
    q = torch.randn(2, 37, 4, 12).transpose(1, 2)
    k, v = torch.randn(2, 45, 2, 12).transpose(1, 2), torch.randn(2, 45, 2, 10).transpose(1, 2)
    if fmap == "features":
        q, k = q.abs(), k.abs()
    opts = dict(fmap=fmap if fmap != "features" else "favor", causal=causal, offset=offset, chunk=16,
                normalize=mode != "unnormalised", divide=mode == "divide", eps=1e-6, out_dtype=torch.float32)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = far_additive(*xs, **opts)
    g = torch.randn_like(out)
    ys = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = far_additive_torch(*ys, **opts)
    for a, b in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(ref, ys, g.double())):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("fmap,mode,where", COMBOS + [("elu", "num-den", "no-keys")],
                         ids=["-".join(c) for c in COMBOS] + ["elu-num-den-no-keys"])
def test_additive_kernels_from_an_incoming_state_and_the_fold(fmap, mode, where):
    """Context parallelism's additions: `init` (every query also reads a state over earlier keys), `states`
    (the walk reused from `fold_additive`) and the fold (the walk's last state), values and gradients."""
    from longattn.kernels.linear.triton_additive import far_additive, fold_additive, fold_additive_torch
    causal, offset = OFFSETS.get(where, (False, None))
    L = 0 if where == "no-keys" else 45
    q = torch.randn(2, 37, 4, 12).transpose(1, 2)
    k, v = torch.randn(2, L, 2, 12).transpose(1, 2), torch.randn(2, L, 2, 10).transpose(1, 2)
    if fmap == "features":
        q, k = q.abs(), k.abs()
    normalize = mode != "unnormalised"
    opts = dict(fmap=fmap if fmap != "features" else "favor", causal=causal, offset=offset, chunk=16,
                normalize=normalize, divide=mode == "divide", eps=1e-6, out_dtype=torch.float32)
    init = torch.rand(2, 2, 12, 10 + normalize)
    xs = [x.detach().requires_grad_() for x in (q, k, v, init)]
    fold, states = fold_additive(xs[1], xs[2], **{n: opts[n] for n in ("fmap", "causal", "offset", "chunk",
                                                                      "normalize", "out_dtype")})
    out = far_additive(*xs[:3], init=xs[3], states=states, **opts)
    ys = [x.detach().double().requires_grad_() for x in (q, k, v, init)]
    ref = far_additive_torch(*ys, **opts)
    fold_ref = fold_additive_torch(ys[1], ys[2], fmap=opts["fmap"], normalize=normalize)
    assert _rel(out, ref) < 1e-5 and (L == 0 or _rel(fold, fold_ref) < 1e-5)
    g, gf = torch.randn_like(out), torch.randn_like(fold)
    fast = torch.autograd.grad((out * g).sum() + (fold * gf).sum(), xs)
    slow = torch.autograd.grad((ref * g.double()).sum() + (fold_ref * gf.double()).sum(), ys)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and (b.numel() == 0 or _rel(a, b) < 1e-5)


@pytest.mark.parametrize("segments", [2, 3, 99])
@pytest.mark.parametrize("fmap,mode,where", COMBOS[:4] + [("elu", "num-den", "queries-after-keys")],
                         ids=["-".join(c) for c in COMBOS[:4]] + ["elu-num-den-queries-after-keys"])
def test_additive_kernels_with_the_walk_cut_into_segments(monkeypatch, segments, fmap, mode, where):
    """The walk in segments that start from zero, each segment's offset added by the output and dq kernels
    (99: one chunk per segment), with and without an incoming state: values and gradients against the float64
    PyTorch form."""
    from longattn.kernels.linear import triton_additive as add
    causal, offset = OFFSETS[where]
    walks = []
    real = add.launch_segmented_states
    monkeypatch.setattr(add, "walk_segments", lambda N, walks, device: segments)  # the forward's and backward's walk
    monkeypatch.setattr(add, "launch_segmented_states", lambda *a, **kw: walks.append(real(*a, **kw)) or walks[-1])
    q = torch.randn(2, 37, 4, 12).transpose(1, 2)
    k, v = torch.randn(2, 77, 2, 12).transpose(1, 2), torch.randn(2, 77, 2, 10).transpose(1, 2)
    normalize = mode != "unnormalised"
    opts = dict(fmap=fmap, causal=causal, offset=offset, chunk=16, normalize=normalize, divide=mode == "divide",
                eps=1e-6, out_dtype=torch.float32)
    for init in (None, torch.rand(2, 2, 12, 10 + normalize)):
        xs = [x.detach().requires_grad_() for x in (q, k, v, init) if x is not None]
        out = add.far_additive(*xs[:3], init=xs[3] if init is not None else None, **opts)
        ys = [x.detach().double().requires_grad_() for x in xs]
        ref = far_additive_torch(*ys, **opts)
        assert _rel(out, ref) < 1e-5
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(ref, ys, g.double())):
            assert _rel(a, b) < 1e-5
    assert len(walks) == 4  # forward and backward, with and without init
    for H, Z, SEG, offsets in walks:
        assert offsets is not None and offsets[0].shape[1] == min(segments, H.shape[1] - 1) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [
    dict(causal=True, feature_map="elu"),
    dict(causal=False, feature_map="favor", num_features=24, sq=20, sk=50),
    dict(causal=True, feature_map="taylor2", sink_tokens=3, local_window=5, sq=30, sk=41),
    dict(causal=True, feature_map="relu", normalize=False),
    dict(causal=True, feature_map="elu", update_rule="delta", beta=0.8, local_window=4),
    dict(causal=False, feature_map="elu", update_rule="delta", normalize=False),
    dict(causal=True, feature_map="identity", update_rule="delta", normalize=False, sq=20, sk=50),
    dict(causal=True, feature_map="favor", num_features=24, update_rule="delta", normalize=False, sq=50, sk=30),
], ids=["elu", "favor-cross", "taylor2-hybrid", "relu-unnormalised", "delta-hybrid", "delta-noncausal",
        "delta-decode-like", "delta-favor-more-queries"])
def test_linear_attention_on_triton_matches_the_float64_reference(dtype, opts):
    opts = dict(opts)
    sq, sk = opts.pop("sq", 40), opts.pop("sk", 40)
    q, k, v = torch.randn(1, 4, sq, 8), torch.randn(1, 2, sk, 8), torch.randn(1, 2, sk, 8)
    assert runs_on(q.to(dtype))
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), chunk_size=16, **opts)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), chunk_size=16, **opts)
    assert out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("rule,hybrid", [("add", True), ("delta", True), ("delta", False)])
def test_triton_path_gradients_equal_the_reference_gradients(rule, hybrid):
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True), torch.randn(1, 1, 20, 8, requires_grad=True),
               torch.randn(1, 1, 20, 8, requires_grad=True))
    opts = dict(causal=True, feature_map="elu", update_rule=rule, chunk_size=16)
    opts.update(dict(sink_tokens=1, local_window=3) if hybrid else dict(normalize=False, beta=0.7))
    g = torch.randn(1, 2, 20, 8)
    fast = torch.autograd.grad(linear_attention(q, k, v, **opts), (q, k, v), g)
    slow = torch.autograd.grad(linear_attention_reference(q, k, v, **opts), (q, k, v), g)
    for a, b in zip(fast, slow):
        assert _rel(a, b) < 1e-5


def test_float64_and_odd_chunk_sizes_stay_on_pytorch():
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    assert not runs_on(q)
    fq, fk, vals, _ = _features("add", Sq=10, L=10)
    out = far_chunked_triton(fq, fk, vals, None, causal=True, offset=0, update_rule="add", chunk=5)
    torch.testing.assert_close(out, far_chunked(fq, fk, vals, None, causal=True, offset=0, update_rule="add", chunk=5))


def test_dispatcher_op_with_a_linear_band_trains_like_the_reference():
    from longattn.kernels import Band, encode_plan
    q, k, v = (torch.randn(1, 4, 20, 8, requires_grad=True), torch.randn(1, 2, 20, 8, requires_grad=True),
               torch.randn(1, 2, 20, 8, requires_grad=True))
    params = dict(feature_map="elu", sink_tokens=2, local_window=4, chunk_size=16)
    out = torch.ops.longattn.attention(q, k, v, None, 0.35, True, 0.0, None, encode_plan([Band("linear", params=params)]))
    ref = linear_attention_reference(q, k, v, scale=0.35, causal=True, **params)
    assert _rel(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel(a, b) < 1e-5


_GEN = torch.Generator().manual_seed(7)
# a learned map as calibration writes it (4 query heads, 2 key heads, head dim 8), F = 5: 2F = 10 feature rows
HEDGEHOG_PER_HEAD = {"q_weight": torch.randn(4, 8, 5, generator=_GEN), "k_weight": torch.randn(2, 8, 5, generator=_GEN),
                     "q_bias": torch.randn(4, 5, generator=_GEN), "k_bias": torch.randn(2, 5, generator=_GEN),
                     "far_scale": [0.5, 1.0, 2.0, 1.5]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [
    dict(feature_map="elu"),
    dict(feature_map="elu", sink_tokens=2, local_window=3),
    dict(feature_map="relu", normalize=False),
    dict(feature_map="identity", sink_tokens=1, local_window=2, feature_params={"far_scale": [0.5, 1.0, 2.0, 3.0]}),
    dict(feature_map="elu", sink_tokens=3, feature_params={"far_scale": 0.5}),  # sinks, then keys fold at once
    dict(feature_map="hedgehog", sink_tokens=2, local_window=3, feature_params=HEDGEHOG_PER_HEAD),
    dict(feature_map="hedgehog", feature_params={"weight": torch.randn(1, 8, 4, generator=_GEN)}),
], ids=["elu", "elu-hybrid", "relu-unnormalised", "identity-far-scale", "elu-sinks-no-window-scalar-scale",
        "hedgehog-hybrid-per-head", "hedgehog-shared-map"])
def test_fused_decode_kernel_steps_equal_the_float64_prefill(dtype, opts):
    from longattn.kernels.linear import linear_attention_step
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    if opts["feature_map"] == "identity":  # keep φ(q)·Σφ(k) away from 0, or half precision measures the conditioning
        q, k = q.abs(), k.abs()
    with torch.no_grad():
        ref = linear_attention(q.double(), k.double(), v.double(), causal=True, **opts)
        out, state = linear_attention_step(q[:, :, :5].to(dtype), k[:, :, :5].to(dtype), v[:, :, :5].to(dtype),
                                           None, **opts)
        outs = [out]
        for t in range(5, 12):
            out, state = linear_attention_step(q[:, :, t:t + 1].to(dtype), k[:, :, t:t + 1].to(dtype),
                                               v[:, :, t:t + 1].to(dtype), state, **opts)
            outs.append(out)
    assert outs[0].dtype == dtype
    assert _rel(torch.cat(outs, 2), ref) < TOL[dtype]


def test_fused_decode_continues_a_state_built_by_the_pytorch_step():
    from longattn.kernels.linear import linear_attention_step, linear_attention_step_reference
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    opts = dict(feature_map="elu", sink_tokens=1, local_window=2)
    with torch.no_grad():
        _, state = linear_attention_step_reference(q[:, :, :6], k[:, :, :6], v[:, :, :6], None, **opts)
        fast, _ = linear_attention_step(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state, **opts)
        slow, _ = linear_attention_step_reference(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state, **opts)
    assert _rel(fast, slow) < 1e-5


@pytest.mark.parametrize("heads,window,beta,fmap", [((4, 2), 3, None, "elu"), ((6, 2), 70, 0.25, "elu"),
                                                   ((2, 2), 1, None, "elu"), ((4, 2), 5, None, "hedgehog")])
def test_fused_decode_moves_a_full_window_along_itself_and_keeps_the_reference_state(heads, window, beta, fmap):
    """In steady state the kernel attends to the old window's rows 1..W-1 and the new key, folds row 0, and
    the group's programs write the next window (each a share, W = 70 spanning two 64-row chunks): output
    and every state tensor equal the PyTorch step's."""
    from longattn.kernels.linear import linear_attention_step, linear_attention_step_reference
    s = window + 9
    q, k, v = torch.randn(1, heads[0], s, 8), torch.randn(1, heads[1], s, 8), torch.randn(1, heads[1], s, 6)
    opts = dict(feature_map=fmap, sink_tokens=2, local_window=window, beta=beta,
                feature_params=HEDGEHOG_PER_HEAD if fmap == "hedgehog" else None)
    with torch.no_grad():
        _, state = linear_attention_step_reference(q[:, :, :window + 2], k[:, :, :window + 2], v[:, :, :window + 2],
                                                   None, **opts)
        fast_state = slow_state = state
        for t in range(window + 2, s):
            fast, fast_state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fast_state,
                                                     **opts)
            slow, slow_state = linear_attention_step_reference(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                                               slow_state, **opts)
            assert _rel(fast, slow) < 1e-5
    assert fast_state.position == slow_state.position
    for name in ("far", "sink_k", "sink_v", "window_k", "window_v", "window_beta"):
        a, b = getattr(fast_state, name), getattr(slow_state, name)
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("causal,sq,sk,sinks,window", [
    (True, 70, 70, 3, 5), (True, 20, 90, 2, 200), (True, 90, 40, 100, 0), (True, 1, 33, 0, 7),
    (False, 20, 90, 3, 5), (False, 70, 70, 0, 70)])
def test_exact_part_kernel_equals_the_reference_softmax_pieces(causal, sq, sk, sinks, window):
    from longattn.kernels.linear.reference import exact_part
    from longattn.kernels.linear.triton_exact import exact_part_triton
    q, k, v = torch.randn(2, 4, sq, 16), torch.randn(2, 2, sk, 16), torch.randn(2, 2, sk, 12)
    xs = [x.requires_grad_() for x in (q.clone(), k.clone(), v.clone())]
    m, l, acc = exact_part_triton(*xs, scale=0.3, causal=causal, sink_tokens=sinks, local_window=window)
    ys = [x.double().requires_grad_() for x in (q, k, v)]
    m_ref, l_ref, acc_ref = exact_part(*ys, scale=0.3, causal=causal, sink_tokens=sinks, local_window=window)
    assert torch.equal(torch.isinf(m), torch.isinf(m_ref))  # the same rows see no exact key
    # compare e^m l and e^m acc: the pieces are relative to each one's own row maximum
    shift = torch.exp(torch.where(torch.isfinite(m), m, 0).double() - torch.where(torch.isfinite(m_ref), m_ref, 0))
    assert _rel(l * shift, l_ref) < 1e-5 and _rel(acc * shift[..., None], acc_ref) < 1e-5
    g_l, g_acc = torch.randn_like(l), torch.randn_like(acc)
    fast = torch.autograd.grad((l * g_l).sum() + (acc * g_acc).sum(), xs)
    slow = torch.autograd.grad((l_ref * g_l.double() * shift).sum() + (acc_ref * g_acc.double() * shift[..., None]).sum(), ys)
    for a, b in zip(fast, slow):
        assert _rel(a, b) < 1e-5


@pytest.fixture
def bf16_dot_in_the_interpreter(monkeypatch):
    """The interpreter keeps bfloat16 as raw uint16 bits and multiplies the bits in tl.dot; read them as
    floats first (test-only: the bfloat16 code paths are then checked on the CPU like the others)."""
    import numpy as np
    from triton.runtime import interpreter as interp
    original = interp.InterpreterBuilder.create_dot

    def as_float(handle):
        if handle.dtype.scalar == triton.language.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interp.TensorHandle(data, triton.language.float32)
        return handle

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *rest: original(self, as_float(a), as_float(b), d, *rest))


@pytest.mark.parametrize("opts", [
    dict(), dict(sink_tokens=3, local_window=8), dict(update_rule="delta", normalize=False),
    dict(feature_map="favor", num_features=32)], ids=["elu", "elu-hybrid", "delta", "favor"])
def test_bfloat16_paths_match_the_float64_reference(bf16_dot_in_the_interpreter, opts):
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = linear_attention(*xs, causal=True, chunk_size=16, **opts)
    ys = [x.double().requires_grad_() for x in (q, k, v)]
    ref = linear_attention_reference(*ys, causal=True, chunk_size=16, **opts)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 2e-2
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, xs, g.bfloat16()), torch.autograd.grad(ref, ys, g)):
        assert _rel(a, b) < 3e-2


@pytest.mark.parametrize("geometry", [
    dict(Hq=2, Hkv=2, Sq=40, L=40, causal=True, offset=0, fmap="identity"),
    dict(Hq=4, Hkv=2, Sq=37, L=50, causal=True, offset=13, fmap="elu"),      # GQA, keys ahead of the queries
    dict(Hq=2, Hkv=1, Sq=20, L=45, causal=True, offset=-7, fmap="relu"),     # the first queries read nothing
    dict(Hq=2, Hkv=2, Sq=30, L=45, causal=False, offset=None, fmap="identity"),
], ids=["causal", "gqa-offset", "negative-offset", "non-causal"])
def test_delta_rule_triton_backward_matches_float64_autograd(geometry):
    """The Triton delta-rule backward (reverse walk, dq, dk/dv, the UT inverse's and β's gradients) against
    autograd through the float64 PyTorch form, for every input including β."""
    from longattn.kernels.linear.triton_delta import _FarDelta, far_delta_torch
    g = dict(geometry)
    Hq, Hkv, Sq, L = g.pop("Hq"), g.pop("Hkv"), g.pop("Sq"), g.pop("L")
    xs64 = [torch.randn(1, Hq, Sq, 16, dtype=torch.float64), torch.randn(1, Hkv, L, 16, dtype=torch.float64),
            torch.randn(1, Hkv, L, 8, dtype=torch.float64), torch.rand(1, Hkv, L, dtype=torch.float64)]
    opts = dict(g, chunk=16, out_dtype=torch.float32, pure=True)
    xs = [x.float().requires_grad_() for x in xs64]
    out = _FarDelta.apply(*xs, opts)[0]
    ys = [x.clone().requires_grad_() for x in xs64]
    ref = far_delta_torch(*ys, **dict(opts, out_dtype=torch.float64))
    assert _rel(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, xs, grad.float()), torch.autograd.grad(ref, ys, grad)):
        assert _rel(a, b) < 1e-5


def test_delta_rule_backward_env_var_picks_the_float32_recompute(monkeypatch):
    """LONGATTN_DELTA_BWD=torch: the delta rule's gradients come from the PyTorch recompute, not the Triton kernels
    (which run by default), and agree with them."""
    from longattn.kernels.linear import triton_delta_bwd
    from longattn.kernels.linear.triton_delta import _FarDelta
    xs = [torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8), torch.rand(1, 2, 40)]
    opts = dict(fmap="identity", causal=True, offset=0, chunk=16, out_dtype=torch.float32, pure=True)

    def grads():
        leaves = [x.clone().requires_grad_() for x in xs]
        return torch.autograd.grad(_FarDelta.apply(*leaves, opts)[0].sum(), leaves)

    by_kernels = grads()
    monkeypatch.setattr(triton_delta_bwd, "far_delta_backward", lambda *a, **k: pytest.fail("Triton backward ran"))
    monkeypatch.setenv("LONGATTN_DELTA_BWD", "torch")
    for a, b in zip(grads(), by_kernels):
        assert _rel(a, b) < 1e-5


def test_delta_rule_backward_reads_the_forwards_states_or_recomputes_them_alike():
    """The backward takes the chunk states the forward kept (the autograd path) or rebuilds them: same gradients."""
    from longattn.kernels.linear.triton_delta import far_delta_triton
    from longattn.kernels.linear.triton_delta_bwd import far_delta_backward
    xs = [torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8), torch.rand(1, 2, 40)]
    opts = dict(fmap="elu", causal=True, offset=0, chunk=16, out_dtype=torch.float32, pure=True)
    out, states = far_delta_triton(*xs, keep_states=True, **opts)
    assert torch.equal(out, far_delta_triton(*xs, **opts))
    grad = torch.randn_like(out)
    for a, b in zip(far_delta_backward(grad, *xs, states=states, **opts), far_delta_backward(grad, *xs, **opts)):
        torch.testing.assert_close(a, b)
