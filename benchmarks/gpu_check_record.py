"""The record of one gpu_check.sh run: what was checked (commit, kernel hash), where, with what, and the outcome.

    python benchmarks/gpu_check_record.py --junit OUT/junit.xml --smoke OUT/smoke.jsonl [--rc tests=0 ...]
                                          [--started EPOCH] [--out benchmarks/results]

Writes <out>/<UTC date>-<device>-gpu-check.json (device: h100, h200, ... from the CUDA device's name; "cpu"
without one) and prints a summary. The lead copies it into benchmarks/results/, where gpu_check_status.py finds
the newest one and compares its kernel hash with the tree CI tests. Fields:
  commit         LONGATTN_COMMIT, else `git rev-parse HEAD` (the GPU machine usually gets the tree without .git)
  kernel_hash    kernel_hash.py's hash of longattn/kernels/, and kernel_files, the per-file digests behind it
  device, versions (python, torch, triton, transformers, CUDA, cuDNN)
  steps          each step's exit status, as gpu_check.sh passes them (124: its time cap was hit)
  tests          from pytest's junit xml: totals and per-file counts (passed, failed, errors, skipped) and the
                 ids of the failed tests (failures and errors)
  verdict        "passed", "failed" or "incomplete" (the tests did not all run, or ran none)
  smoke          gpu_smoke.py's rows: its environment line and the timings
  wall_s         seconds since --started (gpu_check.sh's start)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_hash import REPO_ROOT, hash_of, kernel_file_hashes  # noqa: E402

OUTCOMES = ("passed", "failed", "errors", "skipped")


def commit() -> str | None:
    """The commit checked: LONGATTN_COMMIT, else git's HEAD where the tree has .git, else None."""
    if os.environ.get("LONGATTN_COMMIT"):
        return os.environ["LONGATTN_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _module_file(dotted: str, root: str = REPO_ROOT) -> str:
    """The test file of a dotted class name ("tests.gpu.test_x.TestY"): its longest prefix that is a file."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if os.path.isfile(os.path.join(root, path)):
            return path
    return dotted.replace(".", "/") + ".py"


def _case_file_and_id(case) -> tuple[str, str]:
    """(test file, pytest node id) of a junit <testcase>: xunit1 (gpu_check.sh's) gives the file; otherwise (xunit2,
    or a collection error, whose name is the module) it comes from the dotted class name, whose tail past the module
    is the class."""
    name, classname, file = case.get("name", "?"), case.get("classname") or "", case.get("file")
    if not classname:  # a collection error: name is the module
        return file or _module_file(name), file or _module_file(name)
    file = file or _module_file(classname)
    module = file[:-3].replace("/", ".")
    inner = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
    return file, "::".join(part for part in (file, *inner.split("."), name) if part)


def _outcome(case) -> str:
    if case.find("failure") is not None:
        return "failed"
    if case.find("error") is not None:
        return "errors"
    return "skipped" if case.find("skipped") is not None else "passed"


def junit_results(path: str) -> dict:
    """Totals, per-file counts and failed ids from pytest's junit xml; {"error": why} when it is missing or broken."""
    if not os.path.exists(path):
        return {"error": f"no junit xml at {path}: the test step did not get to write it"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit xml {path}: {e}"}
    files, failed = {}, []
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # what an interrupted xdist worker leaves: no test
        file, node_id = _case_file_and_id(case)
        outcome = _outcome(case)
        files.setdefault(file, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
        if outcome in ("failed", "errors"):
            failed.append(node_id)
    totals = {o: sum(counts[o] for counts in files.values()) for o in OUTCOMES}
    return {"totals": totals, "files": dict(sorted(files.items())), "failed": failed}


def smoke_rows(path: str) -> dict:
    """gpu_smoke.py's output: {"env": its environment row, "rows": the timings}, or {"error": why}."""
    if not os.path.exists(path):
        return {"error": f"no smoke output at {path}"}
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by the time cap
    env = next((r for r in rows if r.get("kind") == "env"), None)
    return {"env": env, "rows": [r for r in rows if r.get("kind") != "env"]}


def device_and_versions() -> tuple[str, str, dict]:
    """(device name, its slug for the file name, versions)."""
    import torch
    import triton
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
                else None}
    try:
        import transformers
        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = None
    if not torch.cuda.is_available():
        return "none (no CUDA device)", "cpu", versions
    from harness import device_slug
    name = torch.cuda.get_device_name()
    return name, device_slug(name), versions


def verdict(tests: dict, steps: dict) -> str:
    totals = tests.get("totals")
    if not totals or steps.get("tests") in (124, 137) or sum(totals.values()) == 0:
        return "incomplete"
    return "failed" if totals["failed"] or totals["errors"] else "passed"


def build_record(junit: str, smoke: str, steps: dict, started: float | None, now: datetime.datetime) -> dict:
    device, slug, versions = device_and_versions()
    files = kernel_file_hashes()
    tests = junit_results(junit)
    return {"kind": "gpu-check", "format": 1, "date": now.date().isoformat(),
            "finished_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit(), "kernel_hash": hash_of(files),
            "device": device, "device_slug": slug, "versions": versions, "steps": steps,
            "verdict": verdict(tests, steps), "tests": tests, "smoke": smoke_rows(smoke),
            "wall_s": round(time.time() - started, 1) if started else None, "kernel_files": files}


def summary(record: dict, path: str) -> str:
    tests = record["tests"]
    lines = [f"gpu-check record: {path}",
             f"  {record['verdict']}: commit {record['commit'] or 'unknown'}, {record['device']}, "
             f"kernel hash {record['kernel_hash'][:16]}, steps {record['steps']}, {record['wall_s']} s"]
    if "error" in tests:
        lines.append(f"  tests: {tests['error']}")
    else:
        lines.append("  tests: " + ", ".join(f"{n} {c}" for n, c in tests["totals"].items()))
        for file, counts in tests["files"].items():
            lines.append(f"    {file}: " + ", ".join(f"{n} {c}" for n, c in counts.items() if c))
        lines += [f"  FAILED {node_id}" for node_id in tests["failed"]]
    for row in record["smoke"].get("rows", []):
        figure = f"{row['ms']:.3f} ms ({row.get('vs_cudnn', '?')}x cuDNN)" if "ms" in row else row.get("error")
        lines.append(f"  smoke {row['case']} {row['s']}: {row['impl']}: {figure}")
    if "error" in record["smoke"]:
        lines.append(f"  smoke: {record['smoke']['error']}")
    return "\n".join(lines)


def _step(text: str) -> tuple[str, int]:
    name, sep, rc = text.partition("=")
    if not sep or not rc.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"--rc takes NAME=EXIT_STATUS, got {text!r}")
    return name, int(rc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", required=True, help="pytest's --junitxml output")
    parser.add_argument("--smoke", required=True, help="gpu_smoke.py's --out")
    parser.add_argument("--rc", type=_step, action="append", default=[], metavar="STEP=STATUS",
                        help="a step's exit status (repeatable)")
    parser.add_argument("--started", type=float, help="the run's start, seconds since the epoch")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results"), help="folder")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    record = build_record(args.junit, args.smoke, dict(args.rc), args.started, now)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{record['date']}-{record['device_slug']}-gpu-check.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(summary(record, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
