"""`longattn explain` and `longattn policy check` as a user types them: exit status, what they print and write."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _longattn(*args, cwd=ROOT):
    """The command line in a process of its own, as a shell runs it (`python -m longattn.cli` = `longattn`)."""
    return subprocess.run([sys.executable, "-m", "longattn.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_policy_check_summarises_a_valid_policy():
    done = _longattn("policy", "check", "examples/policies/llama-long-context.yaml")
    assert done.returncode == 0, done.stderr
    assert "valid policy" in done.stdout and "rules[0]" in done.stdout


def test_policy_check_names_the_file_line_and_key_of_a_mistake(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - layers: '*'\n    by_length:\n      - {below: -5, use: flash}\n"
                    "      - {use: flash}\n")
    done = _longattn("policy", "check", str(path))
    assert done.returncode != 0
    assert f"{path}:5: rules[0].by_length[0].below must be a positive integer, got -5" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_explain_prints_every_site_and_writes_the_json_report(tmp_path):
    out = tmp_path / "report.json"
    done = _longattn("explain", "llama", "--policy", "examples/policies/all-flash.yaml", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "layers.0.self_attn" in done.stdout and "flash" in done.stdout
    report = json.loads(out.read_text())
    assert report["summary"]["sites"] == 4 and report["summary"]["rewritten"] == 4


def test_explain_of_an_unknown_model_says_what_it_expected():
    done = _longattn("explain", "no-such-model-type")
    assert done.returncode != 0 and "not module:factory and not a transformers model type" in done.stderr
    assert "Traceback" not in done.stderr


def test_python_dash_m_longattn_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "longattn", "policy", "check", "examples/policies/all-flash.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _longattn("policy", "check", "examples/policies/all-flash.yaml").stdout
