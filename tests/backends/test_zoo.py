"""The real-model zoo through torch.compile(backend="longattn"): every attention module is found,
an all-flash rewrite changes nothing beyond rounding, causal masks are proven and dropped."""
import pytest
import torch

import longattn
from tests.zoo import ZOO, SEQ

ALL_FLASH = {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}
CASES = [(m, impl) for m in ZOO for impl in m.implementations]


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.last_hidden_state


@pytest.fixture(autouse=True)
def _no_native_fastpath():
    # nn.TransformerEncoderLayer's fused eval path hides attention from any graph pass
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.parametrize("zoo_model,impl", CASES, ids=[f"{m.name}-{i}" for m, i in CASES])
def test_every_attention_module_is_rewritten_and_outputs_match_eager(zoo_model, impl):
    model, inputs = zoo_model.build(impl)
    longattn.clear_reports()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = _first_tensor(model(**inputs))
        compiled = torch.compile(model, backend="longattn", options={"policy": ALL_FLASH, "inner": "aot_eager"})
        got = _first_tensor(compiled(**inputs))
    report = longattn.Report()  # every graph's sites: some transformers versions split encoder-decoders
    for graph_report in longattn.reports():
        report.extend(graph_report)
    assert len(report) == zoo_model.attention_modules, str(report)
    assert report.count("rewritten") == zoo_model.attention_modules, str(report)
    assert sum("causal" in s.mask for s in report) == zoo_model.causal_sites, str(report)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_causal_decoder_keeps_no_square_mask_in_the_rewritten_graph(name):
    zoo_model = next(m for m in ZOO if m.name == name)
    model, inputs = zoo_model.build("eager")
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    from longattn.backends import torch_compile as backend_module
    torch._dynamo.reset()
    original = backend_module.compile_inner
    backend_module.compile_inner = lambda gm, example_inputs, inner: keep_graph(gm, example_inputs)
    try:
        with torch.no_grad():
            torch.compile(model, backend="longattn", options={"policy": ALL_FLASH})(**inputs)
    finally:
        backend_module.compile_inner = original
    (gm,) = graphs
    square = []
    for node in gm.graph.nodes:
        val = node.meta.get("example_value")
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and tuple(val.shape[-2:]) == (SEQ, SEQ):
            square.append(node.name)
    assert square == [], f"S x S tensors left in the graph: {square}"
    assert sum(n.target is torch.ops.longattn.attention.default for n in gm.graph.nodes) == zoo_model.attention_modules
