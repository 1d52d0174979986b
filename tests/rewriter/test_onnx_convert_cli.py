"""`longattn convert` over a folder: progress, summary, atomic writes, failures reported while the
batch goes on, exit status, the JSON report."""
from __future__ import annotations

import json
import os
import stat

import onnx
import pytest

from longattn import cli
from longattn.cli import convert as convert_cli
from tests.patterns.test_onnx_spellings import SCALE, attention
from tests.patterns.test_onnx_zoo import ALL_FLASH


@pytest.fixture(autouse=True)
def _policy(monkeypatch):
    # the YAML policy engine is exercised by its own tests; here every layer goes to flash
    monkeypatch.setattr(convert_cli, "_load_policy", lambda spec: ALL_FLASH)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "models"
    (src / "nested").mkdir(parents=True)
    onnx.save(attention(SCALE), str(src / "plain.onnx"))
    onnx.save(attention(SCALE, opset=14), str(src / "nested" / "opset14.onnx"))
    (src / "README.txt").write_text("not a model")
    good = (src / "plain.onnx").read_bytes()
    (src / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (src / "garbage.onnx").write_bytes(b"\x00\xffthis is not protobuf" * 10)
    return src


def _snapshot(directory):
    return {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(directory) for p in fs}


def test_folder_is_converted_failures_reported_and_batch_goes_on(folder, tmp_path, capsys):
    before = _snapshot(folder)
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = cli.main(["convert", str(folder), "--out", str(out), "--report", str(report), "--check"])
    assert code == 1  # two broken files
    assert _snapshot(folder) == before  # inputs never modified
    assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == \
        ["nested/opset14.onnx", "plain.onnx"]  # nothing half-written, no temporaries left
    data = json.loads(report.read_text())
    by_name = {os.path.basename(m["input"]): m for m in data["models"]}
    assert data["summary"] == {"models": 4, "converted": 2, "failed": 2}
    assert by_name["plain.onnx"]["status"] == "ok" and by_name["plain.onnx"]["report"]["summary"]["rewritten"] == 1
    assert max(by_name["plain.onnx"]["checks"].values()) < 1e-4
    for broken in ("truncated.onnx", "garbage.onnx"):
        assert by_name[broken]["status"] == "failed" and "not a readable ONNX model" in by_name[broken]["reason"]
    text = capsys.readouterr()
    assert "README.txt: not an .onnx file, ignored" in text.err
    assert "2 of 4 models converted" in text.out
    converted = onnx.load(str(out / "plain.onnx"))
    onnx.checker.check_model(converted, full_check=True)
    assert any(n.domain == "ai.longattn" for n in converted.graph.node)


def test_parallel_jobs_and_globs(folder, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["convert", str(folder / "*.onnx"), str(folder / "nested"), "--out", str(out), "--jobs", "2",
                          "--report", str(tmp_path / "r.json")])
    assert code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == {"models": 4, "converted": 2, "failed": 2}
    assert (out / "plain.onnx").exists() and (out / "opset14.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_directory_fails_every_model_cleanly(folder, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = cli.main(["convert", str(folder / "plain.onnx"), "--out", str(out), "--report",
                              str(tmp_path / "r.json")])
    finally:
        out.chmod(stat.S_IRWXU)
    assert code == 1
    model = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert model["status"] == "failed" and "permission denied" in model["reason"]
    assert os.listdir(out) == []


def test_output_directory_that_cannot_be_created_is_a_clear_failure(folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = cli.main(["convert", str(folder / "plain.onnx"), "--out", str(blocker / "out")])
    assert code == 1
    assert "cannot create the output directory" in capsys.readouterr().err


def test_no_models_is_a_usage_error(tmp_path):
    assert cli.main(["convert", str(tmp_path / "missing*.onnx"), "--out", str(tmp_path / "o")]) == 2


def test_output_never_overwrites_the_input(folder):
    code = cli.main(["convert", str(folder / "plain.onnx"), "--out", str(folder)])
    assert code == 1


def test_yaml_policy_bands_reach_the_nodes(folder, tmp_path, monkeypatch):
    monkeypatch.undo()  # the real policy loader
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - layers: '*'\n    by_length:\n      - {below: 4096, use: flash}\n"
                      "      - {use: linear, sink_tokens: 64, local_window: 256}\n")
    out = tmp_path / "out"
    assert cli.main(["convert", str(folder / "plain.onnx"), "--out", str(out), "--policy", str(policy)]) == 0
    (node,) = [n for n in onnx.load(str(out / "plain.onnx")).graph.node if n.domain == "ai.longattn"]
    assert node.op_type == "LinearAttention"
    plan = json.loads(onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "plan")))
    assert plan == [{"below": 4096, "kind": "flash", "params": {}},
                    {"below": None, "kind": "linear", "params": {"sink_tokens": 64, "local_window": 256}}]


def test_longattn_command_has_convert(folder, tmp_path, capsys):
    out = tmp_path / "via-cli"
    assert cli.main(["convert", str(folder / "plain.onnx"), "--out", str(out), "--check"]) == 0
    assert (out / "plain.onnx").exists()
    assert "1 of 1 models converted" in capsys.readouterr().out


def test_check_without_the_library_says_why_its_column_is_empty(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGATTN_ORT_LIBRARY", str(tmp_path / "missing.so"))
    assert cli.main(["convert", str(folder / "plain.onnx"), "--out", str(tmp_path / "out"), "--check"]) == 0
    out = "".join(capsys.readouterr().out.split())  # the caption wraps, also inside the path
    assert "".join(f"err lib: no custom-op library (LONGATTN_ORT_LIBRARY={tmp_path / 'missing.so'} does not exist)"
                   .split()) in out


def test_an_output_folder_that_is_a_symlink_to_the_input_never_overwrites_it(folder, tmp_path):
    """`--out link` where link -> the input folder: every output would land on its input. Refused per model,
    inputs untouched (the check once compared the paths as written, not where they lead)."""
    link = tmp_path / "outlink"
    link.symlink_to(folder, target_is_directory=True)
    before = _snapshot(folder)
    code = cli.main(["convert", str(folder / "plain.onnx"), "--out", str(link)])
    assert code == 1
    assert _snapshot(folder) == before


def test_an_input_symlinked_into_the_output_folder_is_not_overwritten(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plain.onnx").symlink_to(folder / "plain.onnx")
    before = _snapshot(folder)
    assert cli.main(["convert", str(out / "plain.onnx"), "--out", str(out)]) == 1
    assert _snapshot(folder) == before


def test_a_symlink_loop_reaches_each_model_once(folder, tmp_path):
    (folder / "self").symlink_to(folder, target_is_directory=True)
    jobs, _ = convert_cli.collect_jobs([str(folder / "**" / "plain.onnx")], str(tmp_path / "out"))
    assert len(jobs) == 1 and jobs[0].error is None


def test_outputs_get_the_normal_permissions_of_new_files(folder, tmp_path):
    """0666 less the umask, like any other tool's output: not the 0600 of the temporary files they start as."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    cli.main(["convert", str(folder / "plain.onnx"), "--out", str(out), "--report", str(report)])
    from longattn.files import UMASK
    for path in (out / "plain.onnx", report):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~UMASK, path


def test_external_data_gets_the_normal_permissions_too(tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    from longattn import onnx as lo
    from longattn.files import UMASK
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # over the 1 KiB external threshold
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    lo.save(helper.make_model(graph), str(tmp_path / "m.onnx"), external_data=True)
    for name in ("m.onnx", "m.onnx.data"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~UMASK, name


def test_an_empty_file_is_not_reported_as_converted(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"")
    code = cli.main(["convert", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "out")])
    assert code == 1 and not (tmp_path / "out" / "x.onnx").exists()


@pytest.mark.parametrize("what", ["report in a file", "report is a folder", "check length 0", "out is a file",
                                  "output is a folder"])
def test_arguments_that_could_only_fail_late_are_refused_first_or_per_model(what, folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(folder / "plain.onnx"), "--out", str(out)]
    (tmp_path / "afile").write_text("x")
    if what == "report in a file":
        args += ["--report", str(tmp_path / "afile" / "r.json")]
    elif what == "report is a folder":
        args += ["--report", str(tmp_path)]
    elif what == "check length 0":
        args += ["--check", "--check-length", "0"]
    elif what == "out is a file":
        args[3] = str(tmp_path / "afile")
    else:
        (out / "plain.onnx").mkdir(parents=True)
    code = cli.main(args)
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert code in (1, 2)
    assert ".longattn-" not in err and "Traceback" not in err  # the user's paths, never a temporary's
    if what != "output is a folder":
        assert code == 2 and not out.exists()  # nothing converted
    else:
        assert "is a directory" in err


def test_check_gives_a_symbolic_hidden_size_the_weights_size(folder, tmp_path):
    """--check used to give every symbolic dim not named like a batch the check length, so a valid model with a
    symbolic hidden size failed its check."""
    import numpy as np
    from onnx import helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", "hidden"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 64])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "hidden.onnx"))
    assert cli.main(["convert", str(tmp_path / "hidden.onnx"), "--out", str(tmp_path / "out"), "--check"]) == 0
