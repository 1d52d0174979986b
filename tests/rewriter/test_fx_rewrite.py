"""The FX rewriter: verification catches a wrong match, policies adapt to what a site allows."""
import torch

from longattn.kernels.dispatch import Band, decode_plan
from longattn.patterns import fx_attention
from longattn.rewriter.bands import fit_bands
from longattn.rewriter.fx_rewrite import rewrite_graph
from longattn.rewriter.policy import Policy
from tests.zoo import dynamo_graph

ALL_FLASH = Policy.from_dict({"version": 1, "rules": [{"layers": "*", "use": "flash"}]})


def _attention(q, k, v):
    return torch.softmax(q @ k.mT * 0.25, -1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 6, 4, generator=g) for _ in range(3)]


def test_verification_rejects_a_match_that_computes_something_else(monkeypatch):
    original = fx_attention._match_softmax

    def wrong_scale(node, op, site):
        original(node, op, site)
        site.scale *= 2.0  # a matcher bug: the replacement would compute different attention

    monkeypatch.setattr(fx_attention, "_match_softmax", wrong_scale)
    gm = dynamo_graph(_attention, *_qkv())
    args = _qkv()  # in the graph's placeholder order, whatever dynamo chose: compare the graph with itself
    expected = gm(*args)[0]
    report = rewrite_graph(gm, ALL_FLASH)
    (site,) = report.sites
    assert site.status == "skipped" and "disagrees" in site.reason
    assert not any(n.target is torch.ops.longattn.attention.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args)[0], expected, rtol=0, atol=0)


def test_rewritten_graph_carries_the_policy_bands_in_the_op_call():
    policy = Policy.from_dict({"version": 1, "rules": [{"layers": "*", "by_length": [
        {"below": 4096, "use": "flash"}, {"use": "hyper", "block_size": 64}]}]})
    gm = dynamo_graph(_attention, *_qkv())
    rewrite_graph(gm, policy)
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.longattn.attention.default]
    bands = decode_plan(call.args[-1])
    assert [(b.kind, b.below) for b in bands] == [("flash", 4096), ("hyper", None)]
    assert bands[1].params["block_size"] == 64


def test_masked_sites_fall_back_to_flash_for_kinds_that_take_no_mask():
    class Site:
        masks = ["a mask"]
        dropout_p = 0.0

    bands, notes = fit_bands([Band("flash", 100), Band("hyper", 1000, {"block_size": 64}), Band("linear")], Site())
    assert [b.kind for b in bands] == ["flash", "flash", "flash"]
    assert [b.below for b in bands] == [100, 1000, None]
    assert len(notes) == 2 and "hyper cannot take a mask" in notes[0]


def test_policy_choosing_exact_leaves_the_graph_untouched():
    policy = Policy.from_dict({"version": 1, "rules": [{"layers": "*", "use": "exact"}]})
    gm = dynamo_graph(_attention, *_qkv())
    before = [n.target for n in gm.graph.nodes]
    report = rewrite_graph(gm, policy)
    assert report.sites[0].status == "exact"
    assert [n.target for n in gm.graph.nodes] == before


def test_verification_above_the_traced_size_threshold_is_capped_by_the_shared_limit(monkeypatch):
    """Above PREFER_TRACED_SCORES a site is verified at other sizes where it can be, and never above
    MAX_VERIFY_SCORES (the limit both rewriters share): past it the site is left alone, with the reason."""
    from longattn.rewriter import fx_rewrite
    monkeypatch.setattr(fx_rewrite, "PREFER_TRACED_SCORES", 100)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(3))  # 4·6·6 = 144 scores
    gm = dynamo_graph(_attention, q, k, v)
    (site,) = rewrite_graph(gm, ALL_FLASH).sites
    assert site.status == "rewritten", site
    monkeypatch.setattr(fx_rewrite, "MAX_VERIFY_SCORES", 100)
    gm = dynamo_graph(_attention, q, k, v)
    (site,) = rewrite_graph(gm, ALL_FLASH).sites
    assert site.status == "skipped" and "too large to verify" in site.reason, site


class _EvalDropoutAttention(torch.nn.Module):
    def forward(self, q, k, v):
        p = torch.nn.functional.dropout(torch.softmax(q @ k.mT * 0.25, -1), 0.1, training=self.training)
        return p @ v


def test_each_op_call_is_tagged_with_its_sites_layer_and_the_replaced_chain_is_gone():
    """The MLIR export names each op by the tag; the chain behind an eval-mode dropout (which FX's DCE alone keeps:
    see test_fx_export_rewrite_leaves_none_of_the_original_attention in the corpus tests) is gone."""
    import longattn
    q, k, v = _qkv()
    model = _EvalDropoutAttention().eval()
    gm, report = longattn.rewrite(model, q, k, v, policy=ALL_FLASH)
    assert report.count("rewritten") == 1
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("softmax" in t or "dropout" in t or "matmul" in t for t in targets), targets
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.longattn.attention.default]
    assert op.meta["longattn_layer"] == report.sites[0].layer
    torch.testing.assert_close(gm(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
