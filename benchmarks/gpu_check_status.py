"""One line for CI: what the newest GPU check verified, and whether longattn's kernels changed since.

    python benchmarks/gpu_check_status.py [--results benchmarks/results] [--root .]

CI runs on CPU only, so it cannot run the CUDA paths itself; `gpu_check.sh` runs them on a GPU machine and its
record (`benchmarks/results/<date>-<device>-gpu-check.json`, written by `gpu_check_record.py`) keeps the commit
and the kernel hash (`kernel_hash.py`) it checked. This line says which commit that was, on what device and when,
and which files under longattn/kernels/ differ from it: `git diff --name-only <commit> -- longattn/kernels` where
git knows that commit, else the record's per-file hashes. It is a notice, never a failure: it always exits 0.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_hash import KERNEL_DIR, REPO_ROOT, hash_of, kernel_file_hashes  # noqa: E402

PREFIX = "gpu-check:"
MAX_NAMES = 8  # files named on the line; the rest are counted


def newest_record(results_dir: str):
    """(path, record) of the newest *gpu-check.json in results_dir, or None. Newest by the record's finish time
    (then its date, then the file name): two devices may be checked on one day."""
    found = []
    for path in glob.glob(os.path.join(results_dir, "*gpu-check.json")):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # a broken file is not a check
        if isinstance(record, dict):
            key = (record.get("finished_utc") or "", record.get("date") or "", os.path.basename(path))
            found.append((key, path, record))
    if not found:
        return None
    _, path, record = max(found, key=lambda item: item[0])
    return path, record


def git_changed_files(root: str, commit: str):
    """Files under longattn/kernels that differ between commit and the working tree, per git; None when git
    cannot tell (no git, not a repository, or a commit it does not know)."""
    if not commit:
        return None
    try:
        done = subprocess.run(["git", "diff", "--name-only", commit, "--", KERNEL_DIR], cwd=root,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return [line for line in done.stdout.splitlines() if line]


def hashed_changed_files(recorded: dict, current: dict) -> list:
    """Paths whose recorded digest differs from the current one, or that exist on one side only."""
    return sorted(p for p in set(recorded) | set(current) if recorded.get(p) != current.get(p))


def names(files: list) -> str:
    shown = ", ".join(files[:MAX_NAMES])
    return shown + (f" and {len(files) - MAX_NAMES} more" if len(files) > MAX_NAMES else "")


def describe_tests(record: dict) -> str:
    """"passed: 7 passed, 0 failed, 2 skipped" (the record's verdict, then its counts)."""
    verdict = record.get("verdict", "no verdict")
    totals = (record.get("tests") or {}).get("totals")
    if not totals:
        return f"{verdict}: no test results"
    return (f"{verdict}: {totals.get('passed', 0)} passed, {totals.get('failed', 0) + totals.get('errors', 0)} "
            f"failed, {totals.get('skipped', 0)} skipped")


def kernel_news(record: dict, root: str) -> str:
    """Whether the kernels changed since the record, and which files."""
    current = kernel_file_hashes(root)
    if hash_of(current) == record.get("kernel_hash"):
        return "longattn/kernels unchanged since"
    commit = record.get("commit") or ""
    changed = git_changed_files(root, commit)
    if changed:
        return f"longattn/kernels changed since: {names(changed)}"
    recorded = record.get("kernel_files")
    why = "git shows no change (untracked files?)" if changed == [] else f"commit {commit[:12] or '?'} unknown here"
    if isinstance(recorded, dict):
        changed = hashed_changed_files(recorded, current)
        return f"longattn/kernels changed since ({why}; by file hashes): {names(changed)}"
    return f"kernel hash differs from the checked one ({why}: cannot list the files)"


def status_line(results_dir: str, root: str) -> str:
    found = newest_record(results_dir)
    if found is None:
        return f"{PREFIX} no GPU check recorded (no *gpu-check.json in {os.path.relpath(results_dir, root)})"
    path, record = found
    commit = (record.get("commit") or "unknown commit")[:12]
    head = (f"{PREFIX} {commit} checked on {record.get('device', 'an unknown device')} {record.get('date', '?')} "
            f"({describe_tests(record)}; {os.path.basename(path)})")
    return f"{head}; {kernel_news(record, root)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    parser.add_argument("--root", default=REPO_ROOT, help="the checkout whose kernels are compared")
    args = parser.parse_args(argv)
    try:
        print(status_line(os.path.abspath(args.results), os.path.abspath(args.root)))
    except Exception as e:  # noqa: BLE001 - a notice must never fail CI
        print(f"{PREFIX} status unavailable: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
