"""benchmarks/gpu_check_status.py: the CI line about the newest GPU check, on fake results and a fake checkout."""
import json
import shutil
import subprocess

import pytest

from benchmarks import gpu_check_status
from benchmarks.kernel_hash import kernel_file_hashes, kernel_hash


@pytest.fixture
def checkout(tmp_path):
    """A tree with longattn/kernels/ sources (and files the hash must ignore) and an empty results folder."""
    root = tmp_path / "repo"
    (root / "longattn/kernels/flash/__pycache__").mkdir(parents=True)
    (root / "longattn/kernels/__init__.py").write_text("")
    (root / "longattn/kernels/flash/fwd.py").write_text("KERNEL = 1\n")
    (root / "longattn/kernels/flash/NOTES.md").write_text("notes are not kernels\n")
    (root / "longattn/kernels/flash/__pycache__/fwd.cpython-312.pyc").write_bytes(b"\0")
    (root / "benchmarks/results").mkdir(parents=True)
    return root


def record(root, name="2026-12-07-h100-gpu-check.json", **fields):
    data = {"kind": "gpu-check", "date": "2026-12-07", "finished_utc": "2026-12-07T12:00:00Z", "commit": "0" * 40,
            "device": "NVIDIA H100 80GB HBM3", "kernel_hash": kernel_hash(str(root)),
            "kernel_files": kernel_file_hashes(str(root)),
            "verdict": "failed", "tests": {"totals": {"passed": 7, "failed": 1, "errors": 0, "skipped": 2}}, **fields}
    (root / "benchmarks/results" / name).write_text(json.dumps(data))
    return data


def line(root):
    return gpu_check_status.status_line(str(root / "benchmarks/results"), str(root))


def test_the_hash_covers_kernel_sources_only(checkout):
    assert list(kernel_file_hashes(str(checkout))) == ["longattn/kernels/__init__.py", "longattn/kernels/flash/fwd.py"]
    before = kernel_hash(str(checkout))
    (checkout / "longattn/kernels/flash/NOTES.md").write_text("edited\n")
    (checkout / "longattn/kernels/flash/__pycache__/x.py").write_text("cached\n")
    assert kernel_hash(str(checkout)) == before
    (checkout / "longattn/kernels/flash/fwd.py").write_text("KERNEL = 2\n")
    assert kernel_hash(str(checkout)) != before


def test_no_record_says_so(checkout, capsys):
    assert line(checkout) == "gpu-check: no GPU check recorded (no *gpu-check.json in benchmarks/results)"
    assert gpu_check_status.main(["--results", str(checkout / "benchmarks/results"), "--root", str(checkout)]) == 0
    assert "no GPU check recorded" in capsys.readouterr().out


def test_unchanged_kernels_name_the_checked_commit_device_and_date(checkout):
    record(checkout, commit="abcdef0123456789" * 2 + "abcdef01")
    assert line(checkout) == ("gpu-check: abcdef012345 checked on NVIDIA H100 80GB HBM3 2026-12-07 (failed: 7 passed, "
                              "1 failed, 2 skipped; 2026-12-07-h100-gpu-check.json); longattn/kernels unchanged since")


def test_the_newest_record_is_the_one_reported(checkout):
    record(checkout, name="2026-12-07-h100-gpu-check.json", device="old", finished_utc="2026-12-07T09:00:00Z")
    record(checkout, name="2026-12-07-h200-gpu-check.json", device="new", finished_utc="2026-12-07T18:00:00Z")
    (checkout / "benchmarks/results/2026-12-08-h100-gpu-check.json").write_text("{not json")  # ignored
    assert " checked on new " in line(checkout)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_changed_kernels_are_listed_by_git_when_it_knows_the_commit(checkout):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=checkout, check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", "longattn")
    git("commit", "-q", "-m", "kernels")
    record(checkout, commit=git("rev-parse", "HEAD"), kernel_files=None)
    (checkout / "longattn/kernels/flash/fwd.py").write_text("KERNEL = 2\n")
    assert line(checkout).endswith("; longattn/kernels changed since: longattn/kernels/flash/fwd.py")


def test_without_the_commit_the_recorded_file_hashes_name_the_changes(checkout):
    record(checkout, commit="f" * 40)  # not a repository: git cannot answer
    (checkout / "longattn/kernels/flash/fwd.py").write_text("KERNEL = 2\n")
    (checkout / "longattn/kernels/new.py").write_text("")
    assert line(checkout).endswith("; longattn/kernels changed since (commit ffffffffffff unknown here; by file "
                                   "hashes): longattn/kernels/flash/fwd.py, longattn/kernels/new.py")


def test_without_the_commit_or_file_hashes_it_says_the_kernel_hash_differs(checkout):
    record(checkout, commit="f" * 40, kernel_files=None)
    (checkout / "longattn/kernels/flash/fwd.py").write_text("KERNEL = 2\n")
    assert line(checkout).endswith("; kernel hash differs from the checked one (commit ffffffffffff unknown here: "
                                   "cannot list the files)")


def test_it_never_fails(checkout, capsys):
    record(checkout)
    shutil.rmtree(checkout / "longattn")  # not a checkout any more: the hash cannot be computed
    assert gpu_check_status.main(["--results", str(checkout / "benchmarks/results"), "--root", str(checkout)]) == 0
    assert capsys.readouterr().out.startswith("gpu-check: status unavailable: FileNotFoundError: kernel_hash: no ")
