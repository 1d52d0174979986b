"""torch.compile(backend="longattn") on a small random-weight Llama on CUDA, as a user would run it.

bf16, 2 layers, hidden 256, 4 query / 2 key heads of 64, transformers' default attention ("sdpa"), the built-in
policy (flash below 64K keys), inductor behind it; 1000 and 8192 tokens, compiled static (plain
`torch.compile(model, backend="longattn")`) and with `dynamic=True`. A user expects every attention site to be
rewritten and the result to be eager's up to bf16 rounding, at every length: the prefill of the whole model, and
`generate()` with transformers' KV cache through the compiled forward (greedy, a few new tokens: the prefill
graph and the decode steps' graphs, one query against the cache). tests/backends/test_cuda.py checks a
300-token `LlamaModel` with a flash-only policy; tests/backends/test_torch_compile.py checks generate on CPU.
"""
import pytest
import torch

import longattn

from ..zoo import _hf
from .conftest import assert_all_close

pytestmark = pytest.mark.spread  # each test compiles the model with inductor: tens of seconds

LAYERS, VOCAB = 2, 256
LENGTHS = [1000, 8192]
MODES = {"static": {}, "dynamic": {"dynamic": True}}  # torch.compile keywords
NEW_TOKENS = 4
TOL = 3e-2  # relative error of logits against eager's, both bf16 (tests/backends/test_cuda.py's bound)
TIE = 2e-2  # greedy may pick another token only where eager's two candidates lie this close (relative): 4 bf16 ulps


def llama(device="cuda", dtype=torch.bfloat16):
    build = _hf("LlamaConfig", "LlamaForCausalLM", dict, vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=16384)
    model, _ = build("sdpa")
    return model.to(device, dtype)


def token_ids(length, device="cuda"):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def fresh_compile():
    torch._dynamo.reset()
    longattn.clear_reports()


def compiled_sites():
    """Every attention site of every graph compiled since `fresh_compile`: graph breaks and recompiles make
    several graphs, and dynamo may call the backend twice for one graph (it restarts its analysis after
    specialising float scalars with dynamic=True)."""
    return [site for report in longattn.reports() for site in report]


def describe(sites):
    return "; ".join(f"{s.layer} (q {s.q_len}, k {s.k_len}): {s.status}" + (f": {s.reason}" if s.reason else "")
                     for s in sites) or "no attention site found"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_prefill_rewrites_every_site_and_matches_eager(mode, length):
    model, ids = llama(), token_ids(length)
    fresh_compile()
    compiled = torch.compile(model, backend="longattn", **MODES[mode])
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False).logits
    sites = compiled_sites()
    assert len(longattn.last_report() or ()) == LAYERS, describe(sites)  # the graph that ran: one site per layer
    assert all(s.status == "rewritten" for s in sites), describe(sites)
    assert_all_close(["logits"], [got], [want.double()], TOL)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", MODES)
def test_generate_through_the_compiled_forward_rewrites_every_site_and_follows_eager(mode, length):
    model, ids = llama(), token_ids(length)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                   return_dict_in_generate=True)
    want = model.generate(ids, **options)
    fresh_compile()
    model.forward = torch.compile(model.forward, backend="longattn", **MODES[mode])
    got = model.generate(ids, **options)
    sites = compiled_sites()
    assert sites and all(s.status == "rewritten" for s in sites), describe(sites)
    assert any(s.q_len == 1 for s in sites), f"no decode step ran through a compiled graph: {describe(sites)}"
    assert_follows_eager(got, want)


def assert_follows_eager(got, want):
    """Each step's logits close to eager's, and the same greedy tokens, unless eager's choice and the compiled
    model's were a near tie at that step; after a (tied) divergence the contexts differ, so checking stops."""
    got_tokens, want_tokens = got.sequences[0, -NEW_TOKENS:].tolist(), want.sequences[0, -NEW_TOKENS:].tolist()
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        g, w = g[0].double(), w[0].double()
        assert_all_close([f"logits of new token {step}"], [g], [w], TOL)
        ours, eager = got_tokens[step], want_tokens[step]
        if ours != eager:
            margin = (w[eager] - w[ours]).item()
            assert margin <= TIE * w[eager].abs().item(), (
                f"new token {step}: {ours} where eager picks {eager}, which leads by {margin:.3g} "
                f"(tokens {got_tokens} vs eager {want_tokens})")
            return
