"""MLIR export through torch-mlir (`longattn.mlir`, `longattn export-mlir`) on models of the test zoo.

Site-preserving outputs (raw, torch) must hold one annotated longattn op per rewritten site and none of the
softmax / batched-matmul chain those sites had; lowered outputs must verify, and the linalg one, JIT-run on the
CPU (`mlir_cpu.py`), must give the PyTorch model's outputs within 1e-4 in float32.
"""
import json
import re
from collections import Counter

import pytest

pytest.importorskip("torch_mlir.fx", reason="torch-mlir is not installed (pip install \"longattn[mlir]\")")

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import longattn  # noqa: E402
import longattn.mlir as lm  # noqa: E402
from longattn.backends.mlir.attributes import longattn_ops  # noqa: E402
from longattn.cli import main  # noqa: E402
from longattn.cli.export_mlir import OUTPUT_TYPES as CLI_OUTPUT_TYPES  # noqa: E402
from tests.backends import mlir_cpu  # noqa: E402
from tests.zoo import ZOO_BY_NAME  # noqa: E402

FLASH = {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}
EXACT = {"version": 1, "rules": [{"layers": "*", "use": "exact"}]}
MODELS = ["llama", "bert", "t5"]  # a decoder (GQA, causal), an encoder (padding mask), an encoder-decoder


def _model(name):
    model, inputs = ZOO_BY_NAME[name].build("eager")  # eager: the baseline keeps softmax and bmm, not SDPA
    if hasattr(model.config, "use_cache"):
        inputs = dict(inputs, use_cache=False)  # torch.export cannot return a cache object
    return model, inputs


def _aten_ops(module) -> Counter:
    return Counter(re.findall(r"torch\.aten\.([A-Za-z_.0-9]+)", str(module)))


def _tensors(tree):
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _check_kept_sites(module, report, sites):
    """One annotated longattn op per rewritten site, matching its report row, and no softmax / bmm left."""
    assert report.count("rewritten") == sites, str(report)
    ops = longattn_ops(module)
    assert len(ops) == sites
    after = _aten_ops(module)
    assert after["_softmax"] == after["bmm"] == after["matmul"] == 0, after
    rows = {r.layer: r for r in report.sites}
    assert sorted(op.attributes["longattn.layer"].value for op in ops) == sorted(rows)
    for op in ops:
        row = rows[op.attributes["longattn.layer"].value]
        attr = op.attributes
        assert attr["longattn.kind"].value == "flash" and attr["longattn.version"].value == 1
        assert attr["longattn.kv_groups"].value == row.heads // row.kv_heads
        assert attr["longattn.causal"].value == row.mask.startswith("causal")
        assert attr["longattn.scale"].value == pytest.approx(row.scale)
        assert attr["longattn.dropout_p"].value == 0.0
        assert str(attr["longattn.bands"]) == '[{kind = "flash", params = {}}]'
        assert len(op.operands) == 9
    assert all(n.startswith("mlir: kept as torch.operator") for r in report.sites for n in r.notes)
    return after


@pytest.mark.parametrize("name", MODELS)
def test_raw_output_keeps_one_annotated_op_per_site_and_none_of_its_chain(name):
    model, inputs = _model(name)
    module, report = lm.export(model, inputs, policy=FLASH, output_type="raw")
    after = _check_kept_sites(module, report, ZOO_BY_NAME[name].attention_modules)
    if name == "llama":  # what the sites were, and the rest of the model as torch-mlir gives it
        baseline, _ = lm.export(model, inputs, policy=EXACT, output_type="raw")
        before = _aten_ops(baseline)
        assert before["_softmax"] == 2 and before["bmm"] == 4 and not longattn_ops(baseline)
        assert after["mm"] == before["mm"] > 0


def test_torch_output_keeps_them_through_the_backend_pipeline():
    model, inputs = _model("t5")  # self, causal self and cross attention; T5's position bias as a mask operand
    module, report = lm.export(model, inputs, policy=FLASH, output_type="torch")
    _check_kept_sites(module, report, ZOO_BY_NAME["t5"].attention_modules)
    masks = [str(op.operands[3].type) for op in longattn_ops(module)]
    assert all(m.startswith("!torch.vtensor<[") for m in masks), masks


@pytest.mark.parametrize("name", MODELS)
def test_linalg_output_verifies_and_runs_like_the_model(name):
    from torch_mlir import ir
    model, inputs = _model(name)
    module, report = lm.export(model, inputs, policy=FLASH, output_type="linalg-on-tensors")
    assert report.count("rewritten") == ZOO_BY_NAME[name].attention_modules
    assert all("decomposed into exact attention" in r.notes[-1] for r in report.sites)
    text = str(module)
    assert "torch.operator" not in text and "linalg.generic" in text
    reparsed = ir.Module.parse(text, module.context)  # the text parses and verifies on its own
    assert reparsed.operation.verify()
    got = mlir_cpu.run(module, *(t.numpy() for t in _tensors(inputs)))
    with torch.no_grad():
        want = _tensors(model(**inputs))
    assert [g.shape for g in got] == [tuple(w.shape) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("output_type", ["stablehlo", "tosa"])
def test_stablehlo_and_tosa_outputs_verify(output_type):
    model, inputs = _model("llama")
    module, report = lm.export(model, inputs, policy=FLASH, output_type=output_type)
    text = str(module)
    assert report.count("rewritten") == 2 and "torch.operator" not in text and f"{output_type}." in text


LINEAR = {"version": 1, "rules": [{"layers": "*", "use": "linear", "feature_map": "elu", "sink_tokens": 2,
                                   "local_window": 4}]}


def test_a_linear_band_is_kept_with_its_parameters_and_lowered_as_its_dense_definition():
    model, inputs = _model("llama")
    raw, _ = lm.export(model, inputs, policy=LINEAR, output_type="raw")
    op = longattn_ops(raw)[0]
    assert op.attributes["longattn.kind"].value == "linear"
    params = op.attributes["longattn.params"]
    assert params["feature_map"].value == "elu" and params["sink_tokens"].value == 2
    assert params["local_window"].value == 4
    module, report = lm.export(model, inputs, policy=LINEAR, output_type="linalg-on-tensors")
    assert all("the linear kind's dense definition" in r.notes[-1] for r in report.sites)
    got = mlir_cpu.run(module, *(t.numpy() for t in _tensors(inputs)))
    gm, _ = longattn.rewrite(model, inputs, policy=LINEAR)  # the PyTorch graph running the linear kernel
    with torch.no_grad():
        want = _tensors(gm(**inputs))
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-4, atol=1e-4)


HYPER = {"version": 1, "rules": [{"layers": 1, "use": "hyper", "block_size": 64}, {"layers": "*", "use": "flash"}]}


def test_a_kind_without_a_standard_op_form_is_refused_naming_the_site_but_kept_in_raw():
    model, inputs = _model("llama")
    with pytest.raises(lm.MlirExportError, match=r"site layers\.1\.self_attn: its hyper band .*output_type='raw'"):
        lm.export(model, inputs, policy=HYPER, output_type="linalg-on-tensors")
    raw, _ = lm.export(model, inputs, policy=HYPER, output_type="raw")
    kinds = {op.attributes["longattn.layer"].value: op.attributes["longattn.kind"].value for op in longattn_ops(raw)}
    assert kinds == {"layers.0.self_attn": "flash", "layers.1.self_attn": "hyper"}
    (hyper,) = [op for op in longattn_ops(raw) if op.attributes["longattn.kind"].value == "hyper"]
    assert hyper.attributes["longattn.params"]["block_size"].value == 64


def test_the_command_line_writes_the_module_and_the_report(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - layers: '*'\n    use: flash\n")
    out, report = tmp_path / "llama.mlir", tmp_path / "report.json"
    assert main(["export-mlir", "llama", "--policy", str(policy), "--out", str(out), "--seq-len", "8",
                 "--json", str(report)]) == 0
    text = out.read_text()
    assert text.count('torch.operator "torch.longattn.attention"') == 4 and "longattn.layer" in text
    rows = json.loads(report.read_text())["sites"]
    assert [r["notes"][-1].split(" (")[0] for r in rows] == ['mlir: kept as torch.operator "torch.longattn.attention"'] * 4
    assert "kept as torch.operator" in capsys.readouterr().out
    assert main(["export-mlir", "llama", "--policy", str(policy), "--out", str(tmp_path / "no" / "x.mlir"),
                 "--seq-len", "8", "--output-type", "linalg-on-tensors"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert CLI_OUTPUT_TYPES == lm.OUTPUT_TYPES


def test_the_command_line_names_the_site_it_cannot_lower(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - layers: '*'\n    use: hyper\n")
    out = tmp_path / "m.mlir"
    assert main(["export-mlir", "llama", "--policy", str(policy), "--out", str(out), "--seq-len", "8",
                 "--output-type", "tosa"]) == 2
    err = capsys.readouterr().err
    assert "longattn: error: site layers.0.self_attn: its hyper band" in err and not out.exists()


def test_the_torch_backend_keeps_the_op_only_with_the_value_semantics_library():
    """Why `torch` needs the extra library: without it torch-mlir's pipeline refuses any custom op, and the
    error it reports reaches our message."""
    from longattn.backends import mlir as backend
    from longattn.plan import Band, encode_plan
    plan = encode_plan([Band("flash")])

    class Call(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.longattn.attention(q, k, v, None, 0.5, True, 0.0, None, plan)

    qkv = (torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    tm = backend.load_torch_mlir()
    program = torch.export.export(Call(), qkv)
    for keep in (False, True):
        module, diagnostics = backend._import(tm, program, None)
        if not keep:
            with pytest.raises(backend.MlirExportError, match="failed to legalize operation 'torch.operator'"):
                backend._to_torch_backend(tm, module, diagnostics, keep_sites=False)
        else:
            backend._to_torch_backend(tm, module, diagnostics, keep_sites=True)
            assert len(longattn_ops(module)) == 1
