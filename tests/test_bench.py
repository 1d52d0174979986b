"""`longattn bench` on the CPU: a tiny random-weight Llama (the `llama` model type, as `explain` builds it), eager
against an all-flash policy at two lengths, with --train, --generate and --ppl; and its errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longattn.bench.report import write_results
from longattn.bench.run import Settings, Variant, Workload, run_bench
from longattn.cli import main
from longattn.cli.bench import parse_lengths
from longattn.cli.errors import CliError

ROOT = Path(__file__).resolve().parent.parent
FLASH = "version: 1\nrules:\n  - layers: '*'\n    use: flash\n"
METRICS = ("prefill_ms", "prefill_reps", "peak_mb", "speedup", "ppl", "train_ms", "train_peak_mb", "train_speedup",
           "generate_tok_s", "generate_speedup")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the command as a user types it, in a process of its own; its output folder and stdout."""
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "flash.yaml").write_text(FLASH)
    (tmp / "text.txt").write_text((ROOT / "README.md").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    # a user's run: flash on ATen's CPU kernel, not on the Triton interpreter that conftest turns on for the tests
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "longattn", "bench", "llama", "--policy", str(tmp / "flash.yaml"),
                           "--lengths", "64,128", "--train", "--generate", "2", "--ppl", str(tmp / "text.txt"),
                           "--no-inductor", "--inner", "eager", "--repeats", "1", "--out", str(tmp / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp / "out", done.stdout


def test_every_length_and_variant_has_every_metric(bench):
    out, _ = bench
    record = json.loads((out / "bench.json").read_text())
    rows = {(r["length"], r["variant"]): r for r in record["rows"]}
    assert sorted(rows) == [(64, "eager"), (64, "flash"), (128, "eager"), (128, "flash")]
    for key, row in rows.items():
        for metric in METRICS:
            assert isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric]), (key, metric, row)
    assert rows[64, "flash"]["compile_s"] > 0 and "compile_s" not in rows[128, "flash"]  # dynamic: compiled once
    assert rows[64, "flash"]["sites"] == rows[128, "flash"]["sites"] == {"flash": 4}
    env = record["env"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["command"].startswith(
        "longattn bench llama --policy")
    assert record["settings"]["memory_method"].startswith("cpu:")


def test_flash_matches_eager(bench):
    out, _ = bench
    rows = {(r["length"], r["variant"]): r for r in json.loads((out / "bench.json").read_text())["rows"]}
    for length in (64, 128):
        flash, eager = rows[length, "flash"], rows[length, "eager"]
        assert flash["max_rel_err"] < 1e-4
        assert flash["ppl"] == pytest.approx(eager["ppl"], rel=1e-4)
        # the same tokens scored at every length: windows half a length apart over the first 128 tokens
        assert flash["ppl_tokens"] == eager["ppl_tokens"] == 127


def test_the_table_and_the_plot_are_written(bench):
    out, stdout = bench
    table = (out / "bench.md").read_text()
    assert "| length | variant | prefill ms | × eager |" in table
    assert sum(line.startswith(("| 64 |", "| 128 |")) for line in table.splitlines()) == 4
    assert "flash" in stdout and "prefill ms" in stdout  # the rich table on the terminal
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(str(out / "bench.png")).shape
    assert width > 2 * height > 0  # two panels side by side: speed-up and perplexity


@pytest.mark.parametrize("n, window", [(2048, 512), (1000, 512), (512, 512), (777, 100), (100, 512)])
def test_sliding_windows_score_every_token_once_with_half_a_window_before_it(n, window):
    from longattn.quality import perplexity_windows
    windows = perplexity_windows(n, window, window // 2)
    scored = [begin + i for begin, first in windows for i in range(first, window)]
    assert sorted(scored) == (list(range(1, n)) if n >= window else [])
    assert all(begin + window <= n for begin, _ in windows)
    assert all(first >= window // 2 for _, first in windows[1:])


def test_lengths_take_k_for_1024():
    assert parse_lengths("4k,8K,131k,100") == [100, 4096, 8192, 134144]
    for bad in ("4x", "0", "", "4k,4096", "-5"):
        with pytest.raises(CliError, match="--lengths"):
            parse_lengths(bad)


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "4x"], "--lengths: '4x' is not a length"),
    (["--lengths", "64", "--policy", "no-such-policy.yaml"], "--policy no-such-policy.yaml: no such file"),
    (["--lengths", "64", "--generate", "0"], "--generate: give at least 1 new token"),
    (["--lengths", "64", "--ppl", "no-such-text.txt"], "--ppl no-such-text.txt: no such file"),
])
def test_mistakes_are_named_before_the_model_loads(tmp_path, capsys, argv, message):
    assert main(["bench", "llama", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_perplexity_needs_a_causal_lm(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("some text " * 50)
    assert main(["bench", "bert", "--lengths", "64", "--ppl", str(tmp_path / "text.txt"), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--ppl needs a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _RunsOutOfMemory(torch.nn.Module):
    """Self-attention that 'runs out of memory' from 128 tokens on."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] >= 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        h = self.proj(x)
        return torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)


def test_out_of_memory_is_recorded_and_the_run_goes_on():
    features = torch.randn(1, 256, 8)
    work = Workload(_RunsOutOfMemory(), lambda n: features[:, :n], lambda x: {"x": x}, trained_context=100)
    rows = run_bench(work, [Variant("eager")], Settings(lengths=[64, 128, 256], device=torch.device("cpu"),
                                                        repeats=1, train=True))
    assert [r["length"] for r in rows] == [64, 128, 256]
    assert isinstance(rows[0]["prefill_ms"], float) and isinstance(rows[0]["train_ms"], float)
    assert all(r["prefill_ms"] == r["peak_mb"] == r["train_ms"] == "oom" for r in rows[1:])
    assert [r["past_trained_context"] for r in rows] == [False, True, True]


def test_an_out_of_memory_inside_a_compile_error_is_still_out_of_memory():
    from longattn.bench.measure import is_out_of_memory
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("backend='longattn' raised: ...") from e  # as dynamo wraps a backend's failure
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("a shape mismatch"))


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    record = {"env": {"device": "cpu", "torch": "x", "triton": None, "transformers": None, "date": "d",
                      "command": "longattn bench"},
              "settings": {"model": "m", "model_description": "M", "dtype": "float32", "inputs": "random",
                           "dynamic": True, "error_metric": "e", "memory_method": "m", "timing_method": "t"},
              "rows": [{"length": 64, "variant": "eager", "prefill_ms": 1.0, "speedup": 1.0}]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    notes = write_results(record, str(tmp_path))
    assert notes and "matplotlib" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]
