"""The ai.longattn custom-op library: built from the repo, compared with the nodes' ONNX function
bodies (exact attention in stock onnxruntime) and with plain NumPy references."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import longattn.onnx as lo
from longattn.kernels.dispatch import Band, encode_plan
from longattn.rewriter.onnx_functions import attention_function


@pytest.fixture(scope="module")
def library():
    from longattn.backends.onnxruntime import build
    try:
        build.compiler()
    except build.BuildError as e:
        pytest.skip(f"no C++ compiler to build the custom-op library: {e}")
    return build.build(quiet=True)  # a failure to compile fails the tests, with the reason


def node_model(op, q_shape, kv_shape, *, causal=False, bands=(Band("flash"),), mask_shape=None, scale=None):
    F = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", F, q_shape), helper.make_tensor_value_info("k", F, kv_shape),
           helper.make_tensor_value_info("v", F, kv_shape)]
    inits = []
    if mask_shape is not None:
        ins.append(helper.make_tensor_value_info("mask", F, mask_shape))
    else:
        inits.append(numpy_helper.from_array(np.array(0, np.float32), "mask"))
    node = helper.make_node(op, ["q", "k", "v", "mask"], ["out"], domain="ai.longattn",
                            scale=scale or q_shape[-1] ** -0.5, causal=int(causal), plan=encode_plan(list(bands)))
    out_shape = list(q_shape[:-1]) + [kv_shape[-1]]
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("out", F, out_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.longattn", 1)],
                          ir_version=9)
    m.functions.append(attention_function(op, F, 17))
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds_for(q_shape, kv_shape, mask_shape=None, seed=0):
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal(q_shape, dtype=np.float32), "k": rng.standard_normal(kv_shape, dtype=np.float32),
         "v": rng.standard_normal(kv_shape, dtype=np.float32)}
    if mask_shape is not None:
        f["mask"] = rng.standard_normal(mask_shape, dtype=np.float32)
    return f


def with_library(m, feeds, **options):
    return lo.session(m.SerializeToString(), **options).run(None, feeds)[0]


def stock(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


CASES = [  # q shape, k/v shape, causal, mask shape
    ((1, 2, 100, 64), (1, 2, 300, 64), False, None),
    ((2, 4, 130, 64), (2, 2, 130, 64), True, None),          # GQA, causal
    ((1, 4, 50, 32), (1, 1, 333, 32), True, (1, 1, 50, 333)),  # MQA, causal bottom-right, full mask
    ((1, 2, 7, 16), (1, 2, 9, 16), False, (9,)),              # broadcast key mask
    ((1, 2, 600, 48), (1, 2, 600, 48), False, (1, 2, 600, 600)),
]


@pytest.mark.parametrize("q_shape,kv_shape,causal,mask_shape", CASES)
def test_flash_kernel_matches_the_function_body(library, q_shape, kv_shape, causal, mask_shape):
    m = node_model("FlashAttention", q_shape, kv_shape, causal=causal, mask_shape=mask_shape)
    feeds = feeds_for(q_shape, kv_shape, mask_shape)
    np.testing.assert_allclose(with_library(m, feeds, intra_op_num_threads=2), stock(m, feeds), rtol=1e-4, atol=1e-5)


def _phi(x):
    return np.where(x > 0, x + 1, np.exp(x))


def linear_reference(q, k, v, causal):
    """elu+1 linear attention (Katharopoulos et al. 2020), bottom-right causal, float64."""
    fq, fk = _phi(q.astype(np.float64)), _phi(k.astype(np.float64))
    a = fq @ np.swapaxes(fk, -1, -2)
    if causal:
        sq, sk = a.shape[-2:]
        a = a * (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)
    return (a @ v) / a.sum(-1, keepdims=True)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_kernel_matches_numpy(library, causal):
    shape = (1, 2, 200, 32)
    m = node_model("LinearAttention", shape, shape, causal=causal, bands=(Band("linear", None, {"chunk_size": 16}),))
    feeds = feeds_for(shape, shape)
    expected = linear_reference(feeds["q"], feeds["k"], feeds["v"], causal)
    np.testing.assert_allclose(with_library(m, feeds), expected, rtol=1e-4, atol=1e-5)


def test_plan_bands_choose_the_kernel_by_key_length(library):
    bands = (Band("flash", 64), Band("linear"))
    short, long = (1, 2, 32, 16), (1, 2, 96, 16)
    m_short = node_model("LinearAttention", short, short, bands=bands)
    f = feeds_for(short, short)
    np.testing.assert_allclose(with_library(m_short, f), stock(m_short, f), rtol=1e-4, atol=1e-5)  # exact below 64
    m_long = node_model("LinearAttention", long, long, bands=bands)
    f = feeds_for(long, long)
    np.testing.assert_allclose(with_library(m_long, f), linear_reference(f["q"], f["k"], f["v"], False),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_kernel_is_exact_below_min_seq_len_and_finds_the_heavy_keys_above(library, causal):
    shape = (1, 2, 1024, 32)
    feeds = feeds_for(shape, shape)
    # each query points along its own key: one heavy entry per row, which angular LSH puts in the
    # query's own block (Gaussian inputs alone have no large entries to find)
    feeds["q"] = 2.0 * feeds["k"]
    exact = stock(node_model("FlashAttention", shape, shape, causal=causal), feeds)
    below = node_model("HyperAttention", shape, shape, causal=causal, bands=(Band("hyper", None, {"min_seq_len": 4096}),))
    np.testing.assert_allclose(with_library(below, feeds), exact, rtol=1e-4, atol=1e-5)
    params = {"min_seq_len": 256, "block_size": 64, "sample_size": 64, "lsh_bits": 4}
    approx = with_library(node_model("HyperAttention", shape, shape, causal=causal, bands=(Band("hyper", None, params),)),
                          feeds)
    assert np.isfinite(approx).all()
    assert np.abs(approx - exact).mean() < 0.2 * np.abs(exact).mean()  # a broken merge gives ~1x


@pytest.mark.parametrize("variant", ["default", "paper"])
@pytest.mark.parametrize("causal", [False, True])
def test_hyper_pattern_covers_every_key_once(library, variant, causal):
    # one LSH block per rectangle and no samples: sinks, window, causal leaves and blocks must then
    # add up to exact attention, each key counted once
    shape = (1, 4, 700, 32)
    kv = (1, 2, 700, 32)
    feeds = feeds_for(shape, kv)
    params = {"min_seq_len": 100, "block_size": 100000, "sample_size": 0, "variant": variant, "sink_tokens": 5,
              "local_window": 40}
    got = with_library(node_model("HyperAttention", shape, kv, causal=causal, bands=(Band("hyper", None, params),)),
                       feeds)
    np.testing.assert_allclose(got, stock(node_model("FlashAttention", shape, kv, causal=causal), feeds),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal,sampling,kv_heads", [(False, "paper", 2), (True, "paper", 2), (False, "importance", 2),
                                                      (True, "importance", 2), (True, "importance", 1),
                                                      (True, "uniform", 2)])
def test_hyper_samples_estimate_the_keys_outside_the_blocks(library, causal, sampling, kv_heads):
    shape = (1, 2, 600, 16)
    kv = (1, kv_heads, 600, 16)  # one key head: the group's mean query steers the draws
    feeds = feeds_for(shape, kv)
    exact = stock(node_model("FlashAttention", shape, kv, causal=causal), feeds)
    params = {"min_seq_len": 64, "block_size": 32, "lsh_bits": 4, "variant": "paper"} if sampling == "paper" else \
        {"min_seq_len": 64, "block_size": 32, "lsh_bits": 4, "sink_tokens": 0, "local_window": 0, "sampling": sampling}
    errors = []
    for samples in (16, 4096):
        got = with_library(node_model("HyperAttention", shape, kv, causal=causal,
                                      bands=(Band("hyper", None, dict(params, sample_size=samples)),)), feeds)
        errors.append(np.abs(got - exact).mean())
    assert errors[1] < 0.5 * errors[0]  # more samples, a better estimate of the far keys


# Stratified uniform samples with sample_size a multiple of every sampled rectangle's key count draw each key the
# same number of times, each weighing its share: the blocks plus samples then add up to exact attention. Non-causal,
# the one rectangle has 512 keys; causal (min_seq_len 64), the recursion's off-diagonal rectangles 256, 128, 64.
EXACT_SAMPLES = {"min_seq_len": 64, "block_size": 32, "lsh_bits": 4, "sink_tokens": 0, "local_window": 0,
                 "sampling": "uniform", "sample_size": 512}


def _hyper_with_exact_samples_error(library_run, causal: bool, kv_heads: int) -> float:
    shape, kv = (1, 2, 512, 16), (1, kv_heads, 512, 16)
    feeds = feeds_for(shape, kv)
    exact = stock(node_model("FlashAttention", shape, kv, causal=causal), feeds)
    got = library_run(node_model("HyperAttention", shape, kv, causal=causal, bands=(Band("hyper", None, EXACT_SAMPLES),)),
                      feeds)
    return float(np.abs(got - exact).max())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_hyper_samples_that_cover_every_key_evenly_give_exact_attention(library, causal, kv_heads):
    """The sampled part checked to float32 rounding, not to a loose error: a wrong sample weight, a key counted
    twice or missed by the block filter shows here (doubling the weights gives errors of 0.2-0.3)."""
    assert _hyper_with_exact_samples_error(with_library, causal, kv_heads) < 1e-5


def test_hyper_exactness_check_catches_doubled_sample_weights(library, tmp_path, monkeypatch):
    """A committed mutation check: the library built from a copy of csrc/ whose sample weights are doubled must
    fail the exactness test above (it passed the looser tests of this file once)."""
    import shutil

    from longattn.backends.onnxruntime import build
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(os.path.dirname(build.__file__), "csrc"), csrc, ignore=shutil.ignore_patterns("onnx*"))
    header = csrc / "attention.h"
    text = header.read_text()
    anchor = "      sample_log2w[lv].push_back(std::move(lw));"
    assert text.count(anchor) == 1, "the mutation's anchor moved: update this test"
    header.write_text(text.replace(anchor, "      for (float& w : lw) w += 1.f;\n" + anchor))
    monkeypatch.setenv("LONGATTN_ORT_CXXFLAGS", "-O1")  # a quicker build; the mutant is run once
    mutant = build.build(str(tmp_path / "lib"), force=True, quiet=True, source_dir=str(csrc))

    def run_mutant(m, feeds):
        options = ort.SessionOptions()
        options.register_custom_ops_library(mutant)
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    assert _hyper_with_exact_samples_error(run_mutant, True, 2) > 0.05


@pytest.mark.parametrize("op,band", [
    ("FlashAttention", Band("flash")),
    ("HyperAttention", Band("hyper", None, {"min_seq_len": 64, "block_size": 32, "sample_size": 16, "lsh_bits": 4})),
    ("LinearAttention", Band("linear", None, {"sink_tokens": 2, "local_window": 8})),
], ids=["flash", "hyper", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_and_inf_inputs_give_eager_nan_rows_not_numbers(library, op, band, causal):
    """A NaN or inf input once came out as a row of zeros: the fast paths' exponentials clamp their arguments.
    Such calls now run plain exact attention, for every kind: eager's result, NaN rows included."""
    shape = (1, 2, 300, 16)
    feeds = feeds_for(shape, shape)
    feeds["q"][0, 1, 100, 3] = np.nan
    feeds["q"][0, 0, 200, 5] = np.inf
    got = with_library(node_model(op, shape, shape, causal=causal, bands=(band,)), feeds)
    want = stock(node_model("FlashAttention", shape, shape, causal=causal), feeds)
    assert np.isnan(want[0, 1, 100]).all() and np.isnan(want[0, 0, 200]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-4, atol=1e-5)


def test_converted_model_runs_on_the_library_and_matches_the_original(library, tmp_path):
    from tests.patterns.test_onnx_zoo import ALL_FLASH, export, zoo_feeds
    path, _ = export("llama", "eager", False, 17, tmp_path)
    converted, _ = lo.convert(path, policy=ALL_FLASH)
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    feeds = zoo_feeds("llama", "eager")
    expected = stock_file(path, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library is there: no fallback warning
        got = lo.session(out).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_context_parallel_policy_converts_to_a_model_the_library_loads(library, tmp_path):
    """A band's context_parallel (a nested mapping) once reached the node's plan, which the C++ parser cannot
    read: the model converted, then failed to load. The ONNX op runs on one device: the key is dropped, with a
    note in the report."""
    from tests.patterns.test_onnx_zoo import export, zoo_feeds
    path, _ = export("llama", "eager", False, 17, tmp_path)
    policy = {"version": 1, "rules": [{"layers": "*", "use": "flash", "context_parallel": {"load_balance": "zigzag"}}]}
    converted, report = lo.convert(path, policy=policy)
    assert report.count("rewritten") == 2
    assert all("context_parallel" in " ".join(s.notes) for s in report)
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    feeds = zoo_feeds("llama", "eager")
    got = lo.session(out).run(None, feeds)[0]
    expected = stock_file(path, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def stock_file(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_session_without_the_library_warns_and_runs_the_function_body(monkeypatch):
    monkeypatch.setenv("LONGATTN_ORT_LIBRARY", "/nonexistent/liblongattn_ort.so")
    shape = (1, 2, 20, 16)
    m = node_model("HyperAttention", shape, shape, causal=True, bands=(Band("hyper"),))
    feeds = feeds_for(shape, shape)
    with pytest.warns(RuntimeWarning, match="LONGATTN_ORT_LIBRARY=/nonexistent/liblongattn_ort.so does not exist"):
        sess = lo.session(m.SerializeToString())
    np.testing.assert_allclose(sess.run(None, feeds)[0], stock(m, feeds), rtol=1e-6)


def test_the_first_session_builds_the_library_for_this_cpu_and_later_ones_reuse_it(monkeypatch, tmp_path, capfd):
    from longattn.backends.onnxruntime import build
    try:
        build.compiler()
    except build.BuildError as e:
        pytest.skip(f"no C++ compiler to build the custom-op library: {e}")
    monkeypatch.setenv("LONGATTN_ORT_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("LONGATTN_ORT_CXXFLAGS", "-O1")  # a quicker build; still the library's real code
    shape = (1, 2, 20, 16)
    m = node_model("FlashAttention", shape, shape, causal=True)
    feeds = feeds_for(shape, shape)
    sess = lo.session(m.SerializeToString())
    assert "building the onnxruntime custom-op library" in capfd.readouterr().err
    assert (tmp_path / "liblongattn_ort.so").exists()
    np.testing.assert_allclose(sess.run(None, feeds)[0], stock(m, feeds), rtol=1e-5, atol=1e-6)
    built = (tmp_path / "liblongattn_ort.so").stat().st_mtime_ns
    lo.session(m.SerializeToString())
    assert "building" not in capfd.readouterr().err and (tmp_path / "liblongattn_ort.so").stat().st_mtime_ns == built


def test_without_a_compiler_the_session_says_why_and_runs_the_function_body(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGATTN_ORT_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ either
    shape = (1, 2, 20, 16)
    m = node_model("FlashAttention", shape, shape)
    feeds = feeds_for(shape, shape)
    with pytest.warns(RuntimeWarning, match="could not be built: no C\\+\\+ compiler found"):
        sess = lo.session(m.SerializeToString())
    np.testing.assert_allclose(sess.run(None, feeds)[0], stock(m, feeds), rtol=1e-6)


def test_autobuild_off_only_looks(monkeypatch, tmp_path):
    from longattn.backends.onnxruntime import ensure_library
    monkeypatch.setenv("LONGATTN_ORT_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("LONGATTN_ORT_AUTOBUILD", "0")
    assert ensure_library() == (None, "not built, and LONGATTN_ORT_AUTOBUILD=0 "
                                      "(python -m longattn.backends.onnxruntime.build)")
    assert not list(tmp_path.iterdir())


def test_build_fails_clearly_without_headers(monkeypatch, tmp_path):
    from longattn.backends.onnxruntime import build
    monkeypatch.setenv("LONGATTN_ORT_HEADERS", str(tmp_path))
    with pytest.raises(build.BuildError, match="lacks onnxruntime_c_api.h"):
        build.build(str(tmp_path / "out"), force=True, quiet=True)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_favor_features_estimate_softmax_attention(library, causal):
    shape = (1, 2, 256, 16)
    feeds = feeds_for(shape, shape)
    feeds["q"] *= 0.5
    feeds["k"] *= 0.5
    params = {"feature_map": "favor", "num_features": 512, "seed": 3}
    got = with_library(node_model("LinearAttention", shape, shape, causal=causal, bands=(Band("linear", None, params),)),
                       feeds)
    exact = stock(node_model("FlashAttention", shape, shape, causal=causal), feeds)
    assert np.isfinite(got).all()
    # positive random features are unbiased for exp(q.k): close on small logits, far from a constant
    assert np.abs(got - exact).mean() < 0.5 * np.abs(exact - exact.mean(-2, keepdims=True)).mean()


def test_linear_settings_the_library_lacks_run_exact_attention(library):
    shape = (1, 2, 64, 16)
    m = node_model("LinearAttention", shape, shape, bands=(Band("linear", None, {"update_rule": "delta"}),))
    feeds = feeds_for(shape, shape)
    np.testing.assert_allclose(with_library(m, feeds), stock(m, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("params", [
    {"sink_tokens": 8, "local_window": 32},                            # the hybrid the default policy uses
    {"feature_map": "taylor2", "sink_tokens": 4, "local_window": 16},
    {"feature_map": "relu"},
    {"feature_map": "none", "sink_tokens": 4, "local_window": 16},    # sinks + sliding window alone
])
def test_linear_kernel_matches_the_pytorch_reference(library, causal, params):
    import torch
    from longattn.kernels.linear import linear_attention_reference
    q_shape, kv_shape = (1, 4, 150, 16), (1, 2, 200, 16)
    if causal:
        q_shape = (1, 4, 120, 16)
    feeds = feeds_for(q_shape, kv_shape)
    expected = linear_attention_reference(*(torch.from_numpy(feeds[n]).double() for n in "qkv"), scale=0.25,
                                          causal=causal, **params).numpy()
    m = node_model("LinearAttention", q_shape, kv_shape, causal=causal, scale=0.25, bands=(Band("linear", None, params),))
    np.testing.assert_allclose(with_library(m, feeds), expected, rtol=2e-4, atol=2e-5)


def test_float16_models_fall_back_to_the_function_body_with_a_warning(library):
    shape = (1, 2, 20, 16)
    m = node_model("FlashAttention", shape, shape)
    fp16 = onnx.helper.make_model(m.graph, opset_imports=m.opset_import, ir_version=9)
    for vi in list(fp16.graph.input) + list(fp16.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    fp16.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(0, np.float16), "mask"))
    fp16.functions.append(attention_function("FlashAttention", TensorProto.FLOAT16, 17))
    feeds = {k: v.astype(np.float16) for k, v in feeds_for(shape, shape).items()}
    with pytest.warns(RuntimeWarning, match="float32"):
        sess = lo.session(fp16.SerializeToString())
    got = sess.run(None, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), stock(m, {k: v.astype(np.float32) for k, v in feeds.items()}),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind,params", [("hyper", {"min_seq_len": 4}), ("linear", {"sink_tokens": 2, "local_window": 4})])
def test_converted_hyper_and_linear_models_run_on_the_library(library, tmp_path, kind, params):
    from tests.patterns.test_onnx_zoo import FixedPolicy, export, zoo_feeds
    path, zoo_model = export("qwen2", "eager", False, 17, tmp_path)
    converted, report = lo.convert(path, policy=FixedPolicy(Band(kind, None, params)))
    assert report.count("rewritten") == zoo_model.attention_modules
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    got = lo.session(out).run(None, zoo_feeds("qwen2", "eager"))[0]
    assert np.isfinite(got).all()


def test_hyper_importance_samples_beat_uniform_ones_where_the_queries_agree(library):
    """Queries alike and a few keys they all favour: samples drawn by the mean query find those keys, uniform
    ones mostly miss them (the same budget, the far keys estimated from 16 samples)."""
    shape = (1, 1, 1024, 16)
    feeds = feeds_for(shape, shape)
    rng = np.random.default_rng(3)
    feeds["q"] = (0.2 * rng.standard_normal(shape) + 1.0).astype(np.float32)
    feeds["k"][..., ::37, :] += 2.0
    exact = stock(node_model("FlashAttention", shape, shape, causal=False), feeds)
    errors = {}
    for sampling in ("uniform", "importance"):
        params = {"min_seq_len": 64, "block_size": 16, "lsh_bits": 1, "sink_tokens": 0, "local_window": 0,
                  "sample_size": 16, "sampling": sampling}
        got = with_library(node_model("HyperAttention", shape, shape, causal=False,
                                      bands=(Band("hyper", None, params),)), feeds)
        errors[sampling] = np.abs(got - exact).mean()
    assert errors["importance"] < 0.5 * errors["uniform"], errors


@pytest.mark.parametrize("params,match", [({"sampling": "lsh"}, "sampling 'lsh'"),
                                          ({"sampling": "importance", "variant": "paper"}, "needs 'default'")])
def test_hyper_bad_sampling_is_named(library, params, match):
    shape = (1, 2, 300, 16)
    model = node_model("HyperAttention", shape, shape, causal=False,
                       bands=(Band("hyper", None, dict(params, min_seq_len=64)),))
    with pytest.raises(Exception, match=match):
        with_library(model, feeds_for(shape, shape))


def test_the_build_is_redone_when_the_compiler_flags_change(tmp_path, monkeypatch):
    """A library compiled with other flags (another vector width) is stale even when newer than its sources."""
    from longattn.backends.onnxruntime import build
    try:
        build.compiler()
    except build.BuildError as e:
        pytest.skip(f"no C++ compiler to build the custom-op library: {e}")
    monkeypatch.setenv("LONGATTN_ORT_CXXFLAGS", "-O0")
    path = build.build(str(tmp_path), quiet=True)
    first = os.stat(path).st_mtime_ns
    assert build.build(str(tmp_path), quiet=True) == path and os.stat(path).st_mtime_ns == first  # up to date
    monkeypatch.setenv("LONGATTN_ORT_CXXFLAGS", "-O0 -DLONGATTN_FLAGS_CHANGED")
    os.utime(path, ns=(first, first))  # same mtime: only the flags differ
    build.build(str(tmp_path), quiet=True)
    assert os.stat(path).st_mtime_ns != first
    assert "-DLONGATTN_FLAGS_CHANGED" in open(path + ".build").read()


def softmax_attention_reference(q, k, v, scale):
    """Exact attention in float64."""
    s = (q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)


def test_flash_kernel_matches_numpy_with_wide_scores_and_odd_widths(library):
    """Scores spread over hundreds of units, so most exponentials fall below the vector exp2's flush to zero
    (2^-125 of the row's maximum); head widths that leave partial vectors and micro-kernel tiles on every
    vector width."""
    q_shape, kv_shape = (1, 2, 77, 24), (1, 2, 301, 24)
    m = node_model("FlashAttention", q_shape, kv_shape, scale=0.5)
    rng = np.random.default_rng(1)
    feeds = {n: (rng.standard_normal(q_shape if n == "q" else kv_shape) * (3 if n != "v" else 1)).astype(np.float32)
             for n in "qkv"}  # scores of standard deviation 22: a row spans well over 87 (2^-125 = e^-87)
    expected = softmax_attention_reference(feeds["q"], feeds["k"], feeds["v"], 0.5)
    np.testing.assert_allclose(with_library(m, feeds), expected, rtol=1e-4, atol=1e-5)
