"""The generated corpus through the ONNX front end: never a wrong rewrite (issue 34).

Each drawn program (tests/corpus/programs.py) is exported with `torch.onnx.export(..., dynamo=True)` in eval
mode (at opset 18, some at 23 where SDPA becomes an ONNX Attention node; some with dynamic lengths), converted
with `longattn.onnx.convert` and an all-flash policy, and the original and converted models run in stock
onnxruntime (the converted model's `ai.longattn` nodes through their function bodies, as
tests/patterns/test_onnx_zoo.py does) on the traced inputs, on fresh ones (a mask passed in changes then) and,
for dynamic exports, at other lengths. The outputs must agree; a look-alike must not be rewritten; true attention
that is not rewritten is a miss, classified by KNOWN_MISSES below, and a miss no entry explains fails the test.
A program the exporter refuses is counted and skipped.

LONGATTN_CORPUS_EXAMPLES=N sets the number of mixed programs (default 260, with two programs of each look-alike
kind and six idempotence checks: about 300 cases, some 8 minutes of one core).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import longattn.onnx as lo

from .judge import (ALL_FLASH, CHAIN_NOT_READ, KnownMiss, compare, corpus_settings, count_program, examples,
                    judge_sites, tally, wrong)
from .programs import LOOKALIKES, MASK_LOOKALIKES, Program, programs

# Known misses: true attention the ONNX front end does not rewrite (yet). Each entry says which programs (by their
# features and the run: static or dynamic export) and which skip reason; anything else not rewritten fails.
KNOWN_MISSES = [
    # 4-D scores as a Reshape of a 3-D product with GQA: the exporter merges the K/V head repeat (expand + reshape,
    # repeat_interleave) and the head merge into one Reshape, so no 4-D key tensor is left to read the site on
    KnownMiss("scores reshaped after a GQA product", {"qk": "bmm_reshaped", "gqa": ("expand_reshape", "repeat_interleave",
              "repeat_interleave_fn")}, r"not heads merged into the batch", "no 4-D key tensor in the graph"),
    # masked_fill / where with -1e4 or -1e9: exact only where no row is fully masked, so never rewritten (README)
    KnownMiss("fill value other than -inf / dtype min", {"mask": "bad_fill"}, r"where\(\) fill value",
              "the fill changes fully masked rows"),
    # (s + mask) * scale: the mask is scaled with the scores; the matcher does not divide it back out
    KnownMiss("additive mask scaled with the scores", {"order": "mask_then_scale"},
              r"additive mask is scaled together", "mask·scale is another mask; not rewritten"),
    # ... as is baddbmm's bias (Bloom's ALiBi, a mask passed in) when the scale comes after the baddbmm
    KnownMiss("baddbmm bias scaled with the scores", {"qk": "baddbmm", "scale": "scores_mul"},
              r"additive mask is scaled together", "mask·scale is another mask; not rewritten"),
    # a static export at one query and one key constant-folds a mask built from sizes to a scalar (0: softmax does
    # not see it), which the matcher refuses as any scalar shift
    KnownMiss("mask folded to a scalar at one key", {"one_key": "True", "run": "static"},
              r"scores shifted by a scalar", "a scalar shift is not read as a mask"),
    # SDPA exported at opset 23 as an ONNX Attention node with a mask input: the verifier runs the original node in
    # onnxruntime on its random inputs, and onnxruntime's Attention fails there (ComputeOutputShape)
    KnownMiss("Attention node with a mask input", {"qk": "sdpa", "opset": "23", "mask": ("input_bool", "input_additive")},
              r"could not verify the rewrite .*Attention node", "onnxruntime's Attention fails in verification"),
    # a dynamic export of cross attention gives Sq and Sk separate symbols, so the causal proof also meets sizes with
    # more queries than keys, whose first rows see no key (NaN in the original): it refuses rather than rewrite
    KnownMiss("causal proof at Sq > Sk (dynamic cross attention)", {"cross": "True", "run": "dynamic"},
              r"more queries than keys", "rows that see no key are not proven"),
]

LOG_QUIET = ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet():
    """The exporter reports its progress on stdout, warnings and several loggers; a corpus run wants none of it."""
    levels = {name: logging.getLogger(name).level for name in LOG_QUIET}
    for name in LOG_QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _dynamic_shapes(program: Program) -> tuple:
    """One torch.export Dim per length (one for both in self-attention, whose q and k lengths are one value)."""
    cross = program.sizes.sq != program.sizes.sk
    sq = torch.export.Dim("sq", min=2, max=64)
    sk = torch.export.Dim("sk", min=2, max=64) if cross else sq
    dims = {"Sq": sq, "Sk": sk}
    return tuple({i: dims[d] for i, d in enumerate(spec.dims) if d in dims} or None for spec in program.inputs)


def export(program: Program, path: str, opset: int, dynamic: bool) -> bool:
    """Export in eval mode; True when it worked."""
    model = program.module().eval()
    names = [spec.name for spec in program.inputs]
    kwargs = dict(dynamo=True, opset_version=opset, input_names=names, verbose=False)
    if dynamic:
        kwargs["dynamic_shapes"] = _dynamic_shapes(program)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, program.make_inputs(), path, **kwargs)
        return True
    except Exception:  # noqa: BLE001 - counted by the caller: the exporter's own limits, not ours
        return False


def _run(path: str, program: Program, inputs: tuple) -> list:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {spec.name: x.numpy() for spec, x in zip(program.inputs, inputs) if spec.name in names}
    return sess.run(None, feeds)


def checker_failure(t, program: Program, mode: str) -> None:
    """The converted model fails onnx.checker (full check) where the original passes: a broken output file."""
    wrong(t, program, mode, "the converted model fails onnx.checker (full check); the original passes")


def _passes_checker(path: str) -> bool:
    try:
        onnx.checker.check_model(path, full_check=True)
        return True
    except Exception:  # noqa: BLE001 - checker and shape-inference errors alike
        return False


def check_onnx(program: Program, tmp_path, opset: int, dynamic: bool) -> None:
    note(program.describe())
    t = tally("onnx")
    # ONNX models are inference graphs: exported in eval mode (train-mode dropout is an FX matter)
    program = replace(program, training=False, dropout_p=0.0, features=dict(program.features, opset=str(opset)))
    count_program(t, program)
    dynamic = dynamic and program.alt_sizes() is not None
    path, out = str(tmp_path / "model.onnx"), str(tmp_path / "converted.onnx")
    if dynamic and not export(program, path, opset, dynamic=True):
        t.counts["dynamic exports failed (exported static instead)"] += 1
        dynamic = False
    if not dynamic and not export(program, path, opset, dynamic=False):
        t.counts["exports failed (case skipped)"] += 1
        return
    mode = "dynamic" if dynamic else "static"
    t.counts[f"exported ({mode}, opset {opset})"] += 1
    with _quiet():
        converted, report = lo.convert(path, policy=ALL_FLASH)
    # an ONNX initializer is a constant of the model: a causal mask held in a buffer may be proven causal there
    judge_sites(t, program, mode, report.sites, KNOWN_MISSES, causal_allowed=program.buffer is not None)
    lo.save(converted, out)
    if _passes_checker(path) and not _passes_checker(out):  # the exporter's model fails it at times: no baseline
        checker_failure(t, program, mode)
    runs = [("traced inputs", program.make_inputs()), ("fresh inputs", program.make_inputs(seed=1, fresh=True))]
    if dynamic:
        alt = program.alt_sizes()
        runs.append((f"lengths {alt.sq}/{alt.sk}", program.make_inputs(alt, seed=2, fresh=True)))
    for what, inputs in runs:
        try:
            want = _run(path, program, inputs)
        except Exception:  # noqa: BLE001 - the exporter's model itself does not run: nothing to compare with
            t.counts[f"original model fails in onnxruntime ({what}; not compared)"] += 1
            continue
        got = _run(out, program, inputs)
        compare(t, program, mode, [torch.from_numpy(np.asarray(g)) for g in got],
                [torch.from_numpy(np.asarray(w)) for w in want], what)


ONNX_DEFAULT_EXAMPLES = 260


@corpus_settings(ONNX_DEFAULT_EXAMPLES)
@given(program=programs(), opset=st.sampled_from([18, 18, 18, 23]), dynamic=st.sampled_from([False, False, True]))
def test_onnx_corpus_never_rewrites_wrongly(tmp_path_factory, program, opset, dynamic):
    check_onnx(program, tmp_path_factory.mktemp("corpus"), opset, dynamic)


@pytest.mark.parametrize("qk,pv", [("einsum", None), ("einsum_ellipsis", None), (None, "einsum"), ("baddbmm", None),
                                   ("bmm_reshaped", None)])
def test_onnx_products_are_read(tmp_path_factory, qk, pv):
    """Einsum nodes (the dynamo exporter keeps torch.einsum as one), baddbmm (exported as a scaled MatMul plus
    beta·bias, folded to a zero constant for beta=0) and 4-D scores reshaped from a 3-D MatMul over heads merged into
    the batch: a few programs with each product."""
    wanted = programs(kind="attention").filter(lambda p: p.features.get("qk") == qk if qk else
                                               p.features.get("pv") == pv)

    @corpus_settings(max(2, examples(ONNX_DEFAULT_EXAMPLES) // 40))
    @given(program=wanted, dynamic=st.sampled_from([False, True]))
    def run(program, dynamic):
        check_onnx(program, tmp_path_factory.mktemp("corpus"), 18, dynamic)

    run()


@pytest.mark.parametrize("kind", LOOKALIKES + MASK_LOOKALIKES)
def test_onnx_every_lookalike_kind_is_left_alone(tmp_path_factory, kind):
    """A few programs of each look-alike kind, whatever the mixed corpus happened to draw."""
    fixed = {"lookalike": kind} if kind in LOOKALIKES else {"mask_lookalike": kind}

    @corpus_settings(max(2, examples(ONNX_DEFAULT_EXAMPLES) // 30))
    @given(program=programs(kind="attention", **fixed), dynamic=st.sampled_from([False, True]))
    def run(program, dynamic):
        check_onnx(program, tmp_path_factory.mktemp("corpus"), 18, dynamic)

    run()


@corpus_settings(6)
@given(program=programs(kind="attention"))
def test_onnx_converting_a_converted_model_changes_nothing(tmp_path_factory, program):
    """A converted model, converted again: no site is rewritten a second time, the graph stays as it was, and the
    outputs stay the same."""
    program = replace(program, training=False, dropout_p=0.0)
    tmp = tmp_path_factory.mktemp("idempotence")
    path, once, twice = str(tmp / "model.onnx"), str(tmp / "once.onnx"), str(tmp / "twice.onnx")
    if not export(program, path, 18, dynamic=False):
        return
    with _quiet():
        converted, _ = lo.convert(path, policy=ALL_FLASH)
        lo.save(converted, once)
        again, report = lo.convert(once, policy=ALL_FLASH)
    lo.save(again, twice)
    describe = program.describe()
    assert report.count("rewritten") == 0, f"{report}\n{describe}"
    assert [(n.op_type, n.domain, list(n.input), list(n.output)) for n in again.graph.node] == \
        [(n.op_type, n.domain, list(n.input), list(n.output)) for n in converted.graph.node], describe
    inputs = program.make_inputs()
    for a, b in zip(_run(once, program, inputs), _run(twice, program, inputs)):
        np.testing.assert_array_equal(a, b, err_msg=describe)
