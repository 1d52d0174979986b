"""Calibration of the linear kind's far part: fits improve their objectives on synthetic data whose softmax
weights are known, the file round-trips, a policy referencing it runs through torch.compile, and bad files or
sections give errors naming them."""
import pytest
import torch

import longattn
from longattn import calibrate as cal
from longattn.kernels.linear import linear_attention
from longattn.kernels.linear.params_file import feature_params_from_file, file_metadata, save_file
from tests.zoo import ZOO_BY_NAME


def _qkv(Hq=4, Hkv=2, S=192, D=16, seed=0, q_scale=1.0):
    """Keys with a few shared directions so that softmax over far keys is peaked, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, D, generator=g)
    k = (torch.randn(Hkv, S, 4, generator=g) @ basis + 0.3 * torch.randn(Hkv, S, D, generator=g))
    q = q_scale * (torch.randn(Hq, S, 4, generator=g) @ basis + 0.3 * torch.randn(Hq, S, D, generator=g))
    v = torch.randn(Hkv, S, D, generator=g)
    return q, k, v


OPTS = dict(sink_tokens=4, local_window=16, rows=96)


def test_far_scale_recovers_the_factor_a_map_is_off_by():
    # a "map" that is exp(s) divided by 7.3 per far key: the fitted far_scale must be 7.3 in every head
    q, k, _ = _qkv(S=96)
    rows = cal.fit._rows(q, k, scale=0.25, sink_tokens=4, local_window=16, rows=0, generator=torch.Generator())
    c, stats = cal.fit_far_scale(rows, torch.exp(rows.s) * rows.far / 7.3)
    torch.testing.assert_close(c, torch.full((4,), 7.3), rtol=1e-3, atol=0)
    assert stats["share_rms_fitted"] < 1e-4 < stats["share_rms_c1"]


def test_far_scale_is_near_one_where_the_map_is_near_exp():
    # taylor2 is exp's second-order expansion: for small scores φ(q)·φ(k) ≈ exp(q·k·scale)
    q, k, v = _qkv(q_scale=0.1)
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="taylor2", measure_output=False, **OPTS)
    assert torch.allclose(fit.params["far_scale"], torch.ones(4), rtol=0.1)


def test_far_scale_fit_reduces_the_far_share_error():
    q, k, v = _qkv()
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="elu", **OPTS)
    assert fit.params["far_scale"].shape == (4,)
    assert fit.stats["share_rms_fitted"] < 0.8 * fit.stats["share_rms_c1"]
    assert fit.stats["out_err_fitted"] < fit.stats["out_err_c1"]


def test_hedgehog_training_reduces_the_distillation_loss():
    q, k, v = _qkv()
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="hedgehog", steps=40, lr=3e-2, **OPTS)
    s = fit.stats
    assert s["far_ce_floor"] <= s["far_ce_trained"] < s["far_ce_init"] - 0.05
    p = fit.params
    assert p["q_weight"].shape == (4, 16, 16) and p["k_weight"].shape == (2, 16, 16)
    assert p["q_bias"].shape == (4, 16) and p["far_scale"].shape == (4,)
    # the hybrid-row stage lowers its own loss further
    fit2 = cal.fit_layer(q, k, v, scale=0.25, feature_map="hedgehog", steps=40, lr=3e-2, hybrid_steps=40,
                         measure_output=False, **OPTS)
    assert fit2.stats["hybrid_ce_trained"] < fit2.stats["hybrid_ce_start"]


def test_pure_linear_hedgehog_fit_has_no_dropped_baseline_and_beats_the_untrained_map():
    # no sinks, no window: every key is far, so "far keys dropped" would be an empty row and is not reported
    q, k, v = _qkv()
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="hedgehog", steps=40, lr=3e-2, sink_tokens=0,
                        local_window=0, rows=96)
    s = fit.stats
    assert "out_err_dropped" not in s
    # far_scale cancels in the normaliser here: it stays 1 (the search would otherwise run to its lower end)
    torch.testing.assert_close(fit.params["far_scale"], torch.ones(4))
    assert s["far_ce_trained"] < s["far_ce_init"] - 0.05
    assert 0 < s["out_err_fitted"] < 1
    assert "dropped" not in cal.describe(fit) and "fitted" in cal.describe(fit)


def test_far_distillation_loss_is_at_its_floor_when_the_map_is_exp():
    q, k, _ = _qkv(S=96)
    rows = cal.fit._rows(q, k, scale=0.25, sink_tokens=4, local_window=16, rows=0, generator=torch.Generator())
    exact_phi = torch.exp(rows.s) * rows.far
    loss = cal.far_distillation_loss(rows, exact_phi)
    assert abs(loss.item() - cal.fit._entropy_far(rows)) < 1e-4


def test_too_short_a_text_is_refused():
    q, k, v = _qkv(S=16)
    with pytest.raises(ValueError, match="no far keys"):
        cal.fit_layer(q, k, v, scale=0.25, feature_map="elu", sink_tokens=4, local_window=16)


def test_file_round_trips_and_runs_like_the_tensors(tmp_path):
    q, k, v = _qkv()
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="hedgehog", steps=5, measure_output=False, layer=3,
                        **OPTS)
    path = str(tmp_path / "c.safetensors")
    cal.save_calibration(path, {3: fit}, {"model": "synthetic"})
    loaded = feature_params_from_file(path + "#layers.3")
    assert set(loaded) == set(fit.params)
    for name, t in fit.params.items():
        torch.testing.assert_close(loaded[name], t.float())
    assert file_metadata(path)["model"] == "synthetic"
    assert feature_params_from_file(path).keys() == loaded.keys()  # the only section
    opts = dict(scale=0.25, causal=True, feature_map="hedgehog", sink_tokens=4, local_window=16)
    torch.testing.assert_close(linear_attention(q[None], k[None], v[None], feature_params=loaded, **opts),
                               linear_attention(q[None], k[None], v[None], feature_params=fit.params, **opts))
    # torch.save files too
    save_file(str(tmp_path / "c.pt"), {3: fit.params}, {})
    assert feature_params_from_file(str(tmp_path / "c.pt") + "#layers.3").keys() == loaded.keys()


def test_bad_paths_and_sections_name_the_file_and_key(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        feature_params_from_file(missing + "#layers.0")
    path = str(tmp_path / "c.safetensors")
    save_file(path, {1: {"far_scale": torch.ones(4)}, 2: {"far_scale": torch.ones(4)}}, {})
    with pytest.raises(ValueError, match=r"c\.safetensors has no section 'layers\.7' \(it has: layers\.1, layers\.2\)"):
        feature_params_from_file(path + "#layers.7")
    with pytest.raises(ValueError, match="holds 2 sections"):
        feature_params_from_file(path)
    with pytest.raises(ValueError, match="unknown parameter 'gamma'"):
        save_file(path, {1: {"gamma": torch.ones(1)}}, {})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read calibration file .*junk.safetensors"):
        feature_params_from_file(str(tmp_path / "junk.safetensors"))


def _llama():
    model, _ = ZOO_BY_NAME["llama"].build("sdpa")
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(3))
    return model, ids


def _calibrated(tmp_path, model, ids, layers=(0, 1)):
    with torch.enable_grad():
        fits = cal.calibrate_model(model, ids, layers, feature_map="hedgehog", sink_tokens=2, local_window=8,
                                   steps=5, rows=16, measure_output=False)
    path = tmp_path / "calib.safetensors"
    cal.save_calibration(str(path), fits, {})
    return path


def test_policy_with_a_calibration_file_runs_through_torch_compile(tmp_path):
    model, ids = _llama()
    path = _calibrated(tmp_path, model, ids)
    (tmp_path / "p.yaml").write_text("version: 1\nrules:\n  - {layers: '*', use: linear, feature_map: hedgehog, "
                                     "sink_tokens: 2, local_window: 8, feature_params: calib.safetensors}\n")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="longattn",
                             options={"policy": str(tmp_path / "p.yaml"), "inner": "aot_eager"})
    with torch.no_grad():
        got = compiled(input_ids=ids).last_hidden_state
    assert torch.isfinite(got).all()
    sites = longattn.last_report().sites
    refs = sorted(s.bands[0]["params"]["feature_params"] for s in sites)
    assert refs == [f"{path}#layers.0", f"{path}#layers.1"]
    # the same as running the kernel with each layer's tensors in eager mode
    from transformers import AttentionInterface

    from longattn.quality import attention_in_layers

    def fn(q, k, v, scale, layer):
        return linear_attention(q, k, v, scale=scale, causal=True, feature_map="hedgehog", sink_tokens=2,
                                local_window=8, feature_params=feature_params_from_file(f"{path}#layers.{layer}"))
    AttentionInterface.register("test_calibrated", attention_in_layers({0, 1}, fn))
    model.set_attn_implementation("test_calibrated")
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_policy_naming_a_layer_the_file_lacks_fails_at_compile_time(tmp_path):
    model, ids = _llama()
    path = _calibrated(tmp_path, model, ids, layers=(0,))
    policy = {"version": 1, "rules": [{"layers": "*", "use": "linear", "feature_map": "hedgehog",
                                       "feature_params": str(path)}]}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="longattn", options={"policy": policy, "inner": "aot_eager"})
    with pytest.raises(Exception, match=r"layers\.1.*calib\.safetensors has no section 'layers\.1'"):
        with torch.no_grad():
            compiled(input_ids=ids)


def test_linear_layers_of_a_policy_and_layer_ranges():
    from longattn.rewriter.policy import Policy
    policy = Policy.from_dict({"version": 1, "rules": [
        {"layers": {"last": 2}, "by_length": [{"below": 1024, "use": "flash"},
                                               {"use": "linear", "sink_tokens": 8, "local_window": 32}]}]})
    assert cal.linear_layers(policy, 6) == {4: {"sink_tokens": 8, "local_window": 32},
                                            5: {"sink_tokens": 8, "local_window": 32}}
    assert cal.parse_layers("20-22,25") == [20, 21, 22, 25]
    with pytest.raises(ValueError, match="20-29"):
        cal.parse_layers("twenty")


def test_cli_calibrate_needs_layers_or_a_policy(capsys):
    from longattn.cli import main
    assert main(["calibrate", "smollm2", "--out", "x.safetensors"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_rows_from_several_sequences_use_their_own_keys():
    (q1, k1, _), (q2, k2, _) = _qkv(S=96, seed=1), _qkv(S=96, seed=2)
    g = torch.Generator().manual_seed(0)
    r1, r2 = (cal.fit._rows(q, k, scale=0.25, sink_tokens=4, local_window=16, rows=20, generator=g, win=w)
              for w, (q, k) in enumerate(((q1, k1), (q2, k2))))
    both = cal.fit._Rows.cat([r1, r2])
    opts = dict(feature_map="elu", scale=0.25, num_features=0, seed=0, feature_params=None)
    phi = cal.fit._far_phi(both, torch.stack([k1, k2]), **opts)
    torch.testing.assert_close(phi, torch.cat([cal.fit._far_phi(r1, k1, **opts), cal.fit._far_phi(r2, k2, **opts)], 1))
    q, k, v = (torch.stack(x) for x in zip(_qkv(seed=1), _qkv(seed=2)))
    fit = cal.fit_layer(q, k, v, scale=0.25, feature_map="hedgehog", steps=5, hybrid_steps=5, output_steps=5, **OPTS)
    assert fit.stats["rows"] == 2 * OPTS["rows"] and fit.params["k_weight"].shape == (2, 16, 16)


def test_sequential_calibration_fits_each_layer_on_the_converted_model():
    model, ids = _llama()
    band = dict(feature_map="hedgehog", sink_tokens=2, local_window=8)
    opts = dict(steps=5, rows=16, measure_output=False)
    with torch.enable_grad():
        fits = cal.calibrate_model(model, ids, (0, 1), sequential=True, **band, **opts)
    exact = cal.capture_layers(model, ids, [1])[1]
    converted = cal.capture_layers(model, ids, [1], {0: (band, fits[0].params)})[1]
    assert not torch.allclose(exact[0], converted[0])  # layer 1's queries change once layer 0 runs linear
    with torch.enable_grad():  # layer 1 was fitted on those converted inputs: refitting on them reproduces it
        again = cal.fit_layer(*converted[:3], scale=converted[3], layer=1, **band, **opts)
        on_exact = cal.fit_layer(*exact[:3], scale=exact[3], layer=1, **band, **opts)
    for name, t in fits[1].params.items():
        torch.testing.assert_close(t, again.params[name])
    assert any(not torch.allclose(t, on_exact.params[name]) for name, t in fits[1].params.items())


def test_distillation_lowers_the_converted_models_kl_to_the_exact_model_and_leaves_the_model_as_it_was():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)).eval()
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(3))  # 2 windows
    with pytest.raises(ValueError, match="gives no logits"):
        cal.distill_model(_llama()[0], ids, {0: dict(sink_tokens=2, local_window=8)},
                          {0: cal.LayerFit(0, {"far_scale": torch.ones(4)})}, steps=1)
    band = dict(feature_map="hedgehog", sink_tokens=2, local_window=8)
    with torch.enable_grad():
        fits = cal.calibrate_model(model, ids, (0, 1), steps=5, rows=16, measure_output=False, **band)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    implementation = model.config._attn_implementation
    seen = []
    tuned = cal.distill_model(model, ids, {0: band, 1: band}, fits, steps=20, lr=3e-2,
                              progress=lambda step, loss: seen.append(loss))
    assert len(seen) == 20 and tuned[0].stats["kl_trained"] < 0.8 * tuned[0].stats["kl_start"]
    assert model.config._attn_implementation == implementation
    for n, p in model.named_parameters():
        assert p.requires_grad and torch.equal(p, weights[n]), n
    assert set(tuned[1].params) == set(fits[1].params) and (tuned[1].params["far_scale"] > 0).all()

    # the KL it reports is the converted model's, recomputed here from the returned params
    assert _converted_kl(model, ids, {i: f.params for i, f in tuned.items()}, band) == \
        pytest.approx(tuned[0].stats["kl_trained"], rel=1e-4)
    assert _converted_kl(model, ids, {i: f.params for i, f in fits.items()}, band) == \
        pytest.approx(tuned[0].stats["kl_start"], rel=1e-4)

    # with a top-k teacher (memory for long runs) it still lowers the full KL
    top = cal.distill_model(model, ids, {0: band, 1: band}, fits, steps=20, lr=3e-2, teacher_top_k=8)
    assert top[0].stats["kl_trained"] < 0.8 * top[0].stats["kl_start"]
    assert _converted_kl(model, ids, {i: f.params for i, f in top.items()}, band) < 0.8 * tuned[0].stats["kl_start"]


def test_top_k_teacher_kl_is_the_kl_of_the_coarsened_distributions():
    """teacher_kl of a top-k teacher = KL between teacher and student merged to those k tokens + "any other"
    (float64, by hand); never above the full KL, equal to it when the rest of the teacher has no mass to move."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(3 * torch.randn(5, 40, generator=g, dtype=torch.float64), -1)
    student = torch.log_softmax(3 * torch.randn(5, 40, generator=g, dtype=torch.float64), -1)
    k = 6
    top = cal.top_k_teacher(teacher, k)
    p, q = teacher.exp(), student.exp()
    index = p.argsort(-1, descending=True)[:, :k]
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, index, False)
    p_c = torch.cat([p.gather(-1, index), (p * rest).sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q.gather(-1, index), (q * rest).sum(-1, keepdim=True)], -1)
    by_hand = (p_c * (p_c.log() - q_c.log())).sum(-1).mean()
    full = cal.teacher_kl(teacher, student)
    torch.testing.assert_close(cal.teacher_kl(top, student), by_hand)
    assert cal.teacher_kl(top, student) < full
    # a student that differs from the teacher only by moving mass inside the rest: the coarse KL is 0
    shuffled = teacher.clone()
    tail = rest[0].nonzero()[:, 0]
    shuffled[0, tail] = teacher[0, tail.flip(0)]
    assert cal.teacher_kl(cal.top_k_teacher(teacher[:1], k), shuffled[:1]).abs() < 1e-12


def _converted_kl(model, ids, params, band, exact=None):
    """Mean over ids' windows of KL(exact || model with layers 0 and 1 converted with `params`), from position 10;
    `exact`: the exact log-probabilities, when the model's weights have changed since."""
    from transformers import AttentionInterface

    from longattn.quality import attention_in_layers

    def log_probs():
        with torch.no_grad():
            return [torch.log_softmax(model(ids[w:w + 1]).logits[0, 10:].float(), -1) for w in range(ids.shape[0])]
    exact = exact if exact is not None else log_probs()
    fn = lambda q, k, v, scale, layer: linear_attention(q, k, v, scale=scale, causal=True,
                                                        feature_params=params[layer], **band)
    implementation = model.config._attn_implementation
    AttentionInterface.register("longattn_test_kl", attention_in_layers({0, 1}, fn))
    model.set_attn_implementation("longattn_test_kl")
    try:
        got = log_probs()
    finally:
        model.set_attn_implementation(implementation)
    return sum((e.exp() * (e - g)).sum(-1).mean().item() for e, g in zip(exact, got)) / len(got)


def test_cli_calibrates_a_model_folder_sequentially(tmp_path):
    """`longattn calibrate FOLDER --sequential --distill-steps 2` end to end on a tiny random Llama with a
    word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from longattn.cli import main
    words = "the quick brown fox jumps over lazy dog .".split()
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog . " * 20)
    out = tmp_path / "calib.safetensors"
    assert main(["calibrate", str(tmp_path / "tiny"), "--layers", "0-1", "--sequential", "--sink-tokens", "2",
                 "--local-window", "8", "--tokens", "64", "--steps", "2", "--hybrid-steps", "2", "--rows", "8",
                 "--distill-steps", "2", "--distill-windows", "2", "--adapter-rank", "2",
                 "--text", str(tmp_path / "text.txt"), "--out", str(out)]) == 0
    for layer in (0, 1):
        params = feature_params_from_file(f"{out}#layers.{layer}")
        assert {"far_scale", "q_weight", "k_weight"} <= set(params)
    assert file_metadata(str(out))["sequential"] == "True" and file_metadata(str(out))["distill_windows"] == "2"
    from longattn.kernels.linear.params_file import adapters_from_file
    assert "adapters" in file_metadata(str(out)) and sorted(adapters_from_file(str(out))) == [0, 1]


def test_distillation_with_adapters_saves_them_and_merging_them_reproduces_the_reported_kl(tmp_path):
    """distill_model(adapter_rank=r): q/k/v/o corrections trained with the maps, the model left as it was; the
    file round-trips them; merge_adapters from the file gives the model whose converted KL is the reported
    one, and refuses a second merge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longattn.kernels.linear.params_file import adapters_from_file, feature_params_from_file, sections
    from longattn.kernels.linear.params_file import load_file
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)).eval()
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(3))
    band = dict(feature_map="hedgehog", sink_tokens=2, local_window=8)
    with torch.enable_grad():
        fits = cal.calibrate_model(model, ids, (0, 1), steps=5, rows=16, measure_output=False, **band)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = cal.distill_model(model, ids, {0: band, 1: band}, fits, steps=20, lr=3e-2, adapter_rank=4,
                              adapter_lr=1e-2)
    assert [n for n, _ in model.named_parameters()] == list(weights)  # parametrizations removed
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert set(tuned[1].adapters) == set(cal.ADAPTED_PROJECTIONS)
    a, b, _ = tuned[0].adapters["k_proj"]
    assert a.shape == (4, 32) and b.shape == (16, 4) and b.abs().max() > 0  # trained away from zero
    assert tuned[0].stats["kl_trained"] < 0.8 * tuned[0].stats["kl_start"]

    path = str(tmp_path / "calib.safetensors")
    cal.save_calibration(path, tuned)
    assert sections(load_file(path)[0]) == ["layers.0", "layers.1"]  # adapters are no section
    assert set(feature_params_from_file(f"{path}#layers.1")) == set(tuned[1].params)
    for layer, projections in adapters_from_file(path).items():
        for name, factors in projections.items():
            for got, want in zip(factors, tuned[layer].adapters[name]):
                assert torch.allclose(got, want)

    with torch.no_grad():
        exact = [torch.log_softmax(model(ids[w:w + 1]).logits[0, 10:].float(), -1) for w in range(2)]
    assert cal.merge_adapters(model, path) == 8
    with pytest.raises(ValueError, match="merged already"):
        cal.merge_adapters(model, path)
    kl = _converted_kl(model, ids, {i: f.params for i, f in tuned.items()}, band, exact=exact)
    assert kl == pytest.approx(tuned[0].stats["kl_trained"], rel=1e-4)

    other = LlamaForCausalLM(model.config).eval()
    with pytest.raises(ValueError, match="not the one the adapters were trained on"):
        cal.merge_adapters(other, path)


def test_the_rewriter_notes_a_calibration_fitted_with_adapters(tmp_path):
    from longattn.patterns.record import AttentionSite
    from longattn.rewriter.bands import fit_bands
    from longattn.rewriter.policy import Band
    site = AttentionSite(layer="model.layers.3.self_attn", pattern="sdpa")
    params = {"far_scale": torch.ones(4)}
    plain, adapted = str(tmp_path / "plain.safetensors"), str(tmp_path / "adapted.safetensors")
    cal.save_calibration(plain, {3: cal.LayerFit(3, params)})
    ab = (torch.zeros(2, 8), torch.zeros(8, 2), torch.zeros(8))
    cal.save_calibration(adapted, {3: cal.LayerFit(3, params, adapters={"q_proj": ab})})
    for path, noted in ((plain, False), (adapted, True)):
        bands, notes = fit_bands([Band("linear", params={"feature_params": path})], site)
        assert bands[0].params["feature_params"] == f"{path}#layers.3"
        assert any("merge_adapters" in n for n in notes) == noted
