"""The policy schema (rewriter/policy_schema.py) is the catalogue of kinds, parameters, defaults and feature maps.
Every other place that names them must agree with it: the plan, the op, the kernels' entry points, the ONNX
nodes and the C++ library."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import longattn.kernels.dispatch as dispatch
from longattn import plan
from longattn.backends.onnxruntime import library_fallback_reason
from longattn.kernels.hyper import hyper_attention
from longattn.kernels.hyper.pattern import build_pattern
from longattn.kernels.hyper.reference import hyper_attention_reference
from longattn.kernels.linear import HYBRID_DEFAULTS, linear_attention, linear_attention_reference, linear_attention_step
from longattn.kernels.linear.feature_maps import FEATURE_MAPS as KERNEL_FEATURE_MAPS
from longattn.kernels.parallel import linear_attention_cp
from longattn.rewriter.onnx_functions import NODE_FOR_KIND
from longattn.rewriter.policy import load_policy
from longattn.rewriter.policy_schema import FEATURE_MAPS, PARAMS, defaults

CSRC = Path(__file__).resolve().parents[2] / "longattn" / "backends" / "onnxruntime" / "csrc"
REGISTER = (CSRC / "register.cc").read_text()

# run_band passes a band's params to these; the others below take the same parameters and must default alike
OP_ENTRY = {"hyper": hyper_attention, "linear": linear_attention}
OTHER_ENTRIES = {"hyper": (hyper_attention_reference, build_pattern),
                 "linear": (linear_attention_reference, linear_attention_step, linear_attention_cp)}
NOT_KERNEL_PARAMS = {"context_parallel",  # taken by the dispatcher (kernels/parallel)
                     "decode_state"}      # turned into the band's `site` by the rewriter, taken by the dispatcher
KERNEL_ONLY = {"hyper": {"return_lse"}, "linear": {"beta"}}  # no policy key: a direct call's
CALL = {"q", "k", "v", "scale", "causal"}


def kernel_defaults(kind: str) -> dict:
    """The default a band gets where it leaves a key out: the schema's, and for a `written` key the kernel's own."""
    return {name: getattr(inspect.signature(OP_ENTRY[kind]).parameters[name], "default")
            if name in PARAMS[kind].written else value
            for name, value in defaults(kind).items() if name not in NOT_KERNEL_PARAMS}


def test_the_schema_the_plan_and_the_op_know_the_same_kinds():
    assert tuple(PARAMS) == plan.KINDS
    assert dispatch.KINDS is plan.KINDS
    assert set(NODE_FOR_KIND) == set(plan.KINDS)
    # the C++ library reads the kinds by name; every name it reads is a kind
    assert set(re.findall(r'kind == "(\w+)"', REGISTER)) <= set(plan.KINDS)


@pytest.mark.parametrize("kind", plan.KINDS)
def test_the_op_runs_every_kind(kind):
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    out = torch.ops.longattn.attention(q, k, v, None, 0.5, True, 0.0, None, plan.encode_plan([plan.Band(kind)]))
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["hyper", "linear"])
def test_the_op_entry_point_takes_exactly_the_schema_parameters(kind):
    taken = set(inspect.signature(OP_ENTRY[kind]).parameters) - CALL - KERNEL_ONLY[kind]
    assert taken == set(defaults(kind)) - NOT_KERNEL_PARAMS


@pytest.mark.parametrize("kind", ["hyper", "linear"])
def test_schema_defaults_are_the_kernel_entry_points_defaults(kind):
    expected = {name: value for name, value in defaults(kind).items() if name not in PARAMS[kind].written}
    for fn in (OP_ENTRY[kind], *OTHER_ENTRIES[kind]):
        params = inspect.signature(fn).parameters
        got = {name: params[name].default for name in expected if name in params}
        assert got == {name: expected[name] for name in got}, fn.__qualname__


def test_linear_policy_default_is_the_hybrid_and_the_kernel_default_plain_linear_attention():
    """The one documented difference: a policy's `use: linear` is the hybrid (64 sinks + a 256-key window), which a
    softmax-trained model needs; a direct kernel call defaults to plain linear attention (0 and 0). The policy
    writes the two keys into every linear band, so the kernel's default never applies through a policy."""
    assert PARAMS["linear"].written == ("sink_tokens", "local_window")
    assert PARAMS["hyper"].written == ()
    schema = defaults("linear")
    kernel = inspect.signature(linear_attention).parameters
    assert {name: schema[name] for name in PARAMS["linear"].written} == \
        {name: HYBRID_DEFAULTS[name] for name in PARAMS["linear"].written} == {"sink_tokens": 64, "local_window": 256}
    assert {name: kernel[name].default for name in PARAMS["linear"].written} == {"sink_tokens": 0, "local_window": 0}
    assert schema["feature_map"] == HYBRID_DEFAULTS["feature_map"]
    policy = load_policy({"version": 1, "rules": [{"layers": "*", "use": "linear", "feature_map": "none"}]})
    (band,) = policy.decide("model.layers.0.self_attn", 0, 1).bands
    assert band.params == {"feature_map": "none", "sink_tokens": 64, "local_window": 256}


def _cpp_defaults(text: str) -> dict:
    found = {}
    for name, value in re.findall(r'band\.number\("(\w+)", ([^)]+)\)', text):
        found.setdefault(name, float(value))
    for name, value in re.findall(r'band\.string\("(\w+)", "(\w+)"\)', text):
        found.setdefault(name, None if value == "null" else value)
    return found


@pytest.mark.parametrize("kind", ["hyper", "linear"])
def test_the_onnxruntime_library_reads_the_kernel_defaults(kind):
    hyper = REGISTER.index('if (kind == "hyper"')
    linear = REGISTER.index('if (kind == "linear"')
    supported = REGISTER.index("bool linear_supported(")
    text = REGISTER[hyper:linear] if kind == "hyper" else \
        REGISTER[supported:REGISTER.index("\n}\n", supported)] + REGISTER[linear:]
    cpp = _cpp_defaults(text)
    assert len(cpp) >= 6, f"the {kind} block of register.cc reads no parameters: has it moved?"
    ours = kernel_defaults(kind)
    for name, value in cpp.items():
        want = ours[name]
        assert (float(want) if isinstance(want, (bool, int, float)) else want) == value, name


def test_feature_maps_agree_between_the_schema_the_kernels_and_the_onnxruntime_library():
    assert set(FEATURE_MAPS) == set(KERNEL_FEATURE_MAPS)
    supported = REGISTER[REGISTER.index("bool linear_supported("):]
    supported = supported[:supported.index("\n}\n")]
    cpp = set(re.findall(r'map != "(\w+)"', supported))
    phi = (CSRC / "attention.h").read_text()
    assert set(re.findall(r'map == "(\w+)"', phi)) | {"elu"} == cpp  # elu is phi's last case, not named
    # learned maps need their fitted tensors, which the library does not read: it runs them as exact attention
    assert set(FEATURE_MAPS) - cpp == {"hedgehog"}
    assert {m for m in FEATURE_MAPS if library_fallback_reason("linear", {"feature_map": m})} == {"hedgehog"}
