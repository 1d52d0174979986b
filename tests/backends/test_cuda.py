"""torch.compile(backend="longattn") on a CUDA model (runs where a GPU is: LONGATTN_TEST_CUDA=1).
Rewriting reads the model's device: verification inputs and causal proofs must follow it."""
import os

import pytest
import torch

import longattn

# under the Triton interpreter (the CPU suite) inductor's own kernels would run interpreted on CUDA tensors
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device and compiled Triton kernels (LONGATTN_TEST_CUDA=1)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_cuda_llama_rewrites_every_layer_and_matches_eager(dtype):
    from transformers import LlamaConfig, LlamaModel
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaModel(config).to("cuda", dtype).eval()
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="longattn", dynamic=True, options={
        "policy": {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}})
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).last_hidden_state
        expected = model(input_ids=ids, use_cache=False).last_hidden_state
    report = longattn.last_report()
    assert report.count("rewritten") == 2 and all(s.mask == "causal" for s in report), str(report)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < tol
