"""`longattn convert`: rewrite a batch of ONNX models by one policy.

    longattn convert INPUTS... --out DIR [--policy p.yaml] [--check] [--check-length N]
                     [--jobs N] [--report report.json] [--no-verify]

INPUTS are .onnx files, directories (every *.onnx below them, other files ignored) and globs.
Each model is written to DIR (under its path relative to the directory it was found in)
atomically; inputs are never modified. A model that fails is reported with its reason and the
batch goes on; the exit status is 1 if any model failed, 2 if the command line itself is wrong.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from ..files import atomic_path

STAGES = ("load", "rewrite", "save", "check", "done")
LIBRARY_SUFFIX = " (library)"  # checks[name + this]: the output's error when our custom-op library runs it


@dataclass
class Job:
    source: str
    target: str
    error: Optional[str] = None      # set when the job cannot even start (e.g. a name clash)


@dataclass
class Outcome:
    source: str
    target: str
    ok: bool
    reason: Optional[str] = None
    report: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0


class UsageError(ValueError):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to the `longattn` parser (sets `run` to `cmd_convert`)."""
    p = subparsers.add_parser("convert", help="rewrite the attention of ONNX models by a policy",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".onnx files, directories or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--policy", help="YAML policy (default: the built-in policy)")
    p.add_argument("--check", action="store_true",
                   help="check the converted model (onnx.checker, full) and compare it with the original on "
                        "random inputs; report the max error per output")
    p.add_argument("--check-length", type=int, default=16, metavar="N",
                   help="length given to symbolic dims for --check (default 16)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="models converted in parallel (processes)")
    p.add_argument("--report", metavar="FILE", help="write every model's report as JSON")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the per-site numerical verification at conversion time (large static models)")
    p.set_defaults(run=cmd_convert)
    return p


# --- finding the models ----------------------------------------------------------------------

def collect_jobs(inputs: list[str], out_dir: str) -> tuple[list[Job], list[str]]:
    """(jobs, notes): every model named by the inputs with its output path; notes for inputs
    that matched nothing or files ignored in directories."""
    jobs: list[Job] = []
    notes: list[str] = []
    seen_sources, seen_targets = set(), {}
    # real paths: a symlinked --out (or input) must not hide that the output would land on an input
    out_abs = os.path.realpath(out_dir)

    def add(source: str, relative: str):
        source_abs = os.path.realpath(source)
        if source_abs in seen_sources:  # the same file reached twice (a symlink loop, a glob and a directory)
            return
        seen_sources.add(source_abs)
        target = os.path.join(out_dir, relative)
        job = Job(source, target)
        target_abs = os.path.realpath(target)
        if target_abs == source_abs:
            job.error = "the output would overwrite the input (choose another --out)"
        elif os.path.isdir(target_abs):
            job.error = f"the output path {target} is a directory"
        elif target_abs in seen_targets:
            job.error = f"output name clashes with {seen_targets[target_abs]}"
        seen_targets.setdefault(target_abs, source)
        jobs.append(job)

    for item in inputs:
        if os.path.isdir(item):
            found = 0
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != out_abs)
                for f in sorted(files):
                    path = os.path.join(root, f)
                    if f.endswith(".onnx"):
                        add(path, os.path.relpath(path, item))
                        found += 1
                    elif not f.endswith(".data") and not f.startswith("."):
                        notes.append(f"{path}: not an .onnx file, ignored")
            if not found:
                notes.append(f"{item}: no .onnx files in this directory")
        elif os.path.isfile(item):
            add(item, os.path.basename(item))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                notes.append(f"{item}: no such file, directory or matching glob")
            for path in matches:
                if os.path.isfile(path):
                    add(path, os.path.basename(path))
    return jobs, notes


# --- one model -------------------------------------------------------------------------------

def convert_one(job: Job, policy, check: bool, check_length: int, verify: bool, progress=None) -> Outcome:
    """Convert one model; never raises (the failure is the outcome's reason)."""
    start = time.perf_counter()
    outcome = Outcome(job.source, job.target, ok=False)
    step = progress or (lambda stage: None)
    try:
        if job.error:
            raise UsageError(job.error)
        import onnx

        from .. import onnx as lo
        step("load")
        source = lo.load(job.source)  # graph only; fails early and clearly on a corrupt file
        had_external = lo.has_external_data(source)
        step("rewrite")
        converted, report = lo.convert(job.source, policy=policy, verify=verify)
        outcome.report = report.to_dict()
        step("save")
        os.makedirs(os.path.dirname(os.path.abspath(job.target)), exist_ok=True)
        lo.save(converted, job.target, external_data=had_external or None)
        if check:
            step("check")
            onnx.checker.check_model(job.target, full_check=True)
            outcome.checks = lo.compare_outputs(job.source, job.target, length=check_length)
            from ..backends.onnxruntime import library_path
            if library_path():  # also what users run: our kernels, not only the function bodies
                on_library = lo.compare_outputs(job.source, job.target, length=check_length, use_library=True)
                outcome.checks.update({name + LIBRARY_SUFFIX: err for name, err in on_library.items()})
        outcome.ok = True
    except Exception as e:  # the batch goes on: report what went wrong and where
        outcome.reason = _describe(e)
    outcome.seconds = time.perf_counter() - start
    step("done")
    return outcome


def _describe(e: Exception) -> str:
    if isinstance(e, PermissionError):
        return f"cannot write: {e.filename or e}: permission denied"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:400] if not isinstance(e, (UsageError, ValueError)) else text[:400]


def _worker(args):
    job, policy, check, length, verify, queue, index = args
    return index, convert_one(job, policy, check, length, verify,
                              progress=(lambda stage: queue.put((index, stage))) if queue is not None else None)


# --- the command -----------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    check_arguments(args)
    jobs, notes = collect_jobs(args.inputs, args.out)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if not jobs:
        console.print("[red]longattn convert: no ONNX models found in the inputs[/]")
        return 2
    policy = _load_policy(args.policy)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        console.print(f"[red]longattn convert: cannot create the output directory {args.out}: {e.strerror}[/]",
                      soft_wrap=True)
        return 1
    library_missing = None
    if args.check:  # built here once (first use), not by each worker
        from ..backends.onnxruntime import ensure_library
        library_missing = ensure_library()[1]
    outcomes: list[Optional[Outcome]] = [None] * len(jobs)
    columns = [TextColumn("{task.description}", justify="left"), BarColumn(), TextColumn("{task.fields[stage]}"),
               TimeElapsedColumn()]
    try:
        _convert_all(jobs, outcomes, policy, args, Progress(*columns, console=console, transient=False))
    except KeyboardInterrupt:  # Ctrl-C: each output is written whole or not at all (atomic_path), so say which
        done = sum(1 for o in outcomes if o is not None and o.ok)
        console.print(f"[red]longattn convert: interrupted; {done} of {len(jobs)} models converted (each of those "
                      f"written whole), the rest not written[/]", soft_wrap=True)
        return 130
    Console().print(summary_table(outcomes, args.check, library_missing))
    if args.report:
        write_report(args.report, outcomes, getattr(policy, "source", args.policy or ""))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(outcomes)} models failed[/]")
        return 1
    return 0


def _convert_all(jobs, outcomes, policy, args, progress) -> None:
    """Convert every job, filling `outcomes` in place (so an interrupted batch still tells what it finished)."""
    with progress:
        overall = progress.add_task(f"{len(jobs)} models", total=len(jobs), stage="")
        tasks = [progress.add_task(f"  {os.path.basename(j.source)}", total=len(STAGES) - 1, stage="waiting")
                 for j in jobs]

        def advance(index, stage):
            progress.update(tasks[index], completed=STAGES.index(stage), stage=stage)

        if args.jobs == 1:
            for i, job in enumerate(jobs):
                outcomes[i] = convert_one(job, policy, args.check, args.check_length, not args.no_verify,
                                          progress=lambda stage, i=i: advance(i, stage))
                progress.advance(overall)
            return
        import multiprocessing
        with multiprocessing.Manager() as manager:
            queue = manager.Queue()
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                try:
                    _gather(pool, jobs, outcomes, policy, args, queue, lambda: progress.advance(overall), advance)
                except KeyboardInterrupt:  # leaving the block would otherwise run every job still queued
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise


def _gather(pool, jobs, outcomes, policy, args, queue, advance_overall, advance) -> None:
    futures = [pool.submit(_worker, (job, policy, args.check, args.check_length, not args.no_verify, queue, i))
               for i, job in enumerate(jobs)]
    pending = set(futures)
    while pending:
        while not queue.empty():
            advance(*queue.get())
        for f in [f for f in pending if f.done()]:
            pending.discard(f)
            try:
                index, outcome = f.result()
            except Exception as e:  # a worker that died (e.g. out of memory)
                index = futures.index(f)
                outcome = Outcome(jobs[index].source, jobs[index].target, False,
                                  f"worker failed: {type(e).__name__}: {e}")
            outcomes[index] = outcome
            advance(index, "done")
            advance_overall()
        time.sleep(0.05)
    while not queue.empty():
        advance(*queue.get())


def check_arguments(args) -> None:
    """Refuse, before any work, what would only fail after every model is converted."""
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if args.check_length < 1:
        raise UsageError(f"--check-length must be at least 1, got {args.check_length}")
    if args.report:
        folder = os.path.dirname(os.path.abspath(args.report))
        if os.path.isdir(args.report):
            raise UsageError(f"--report {args.report}: is a directory; name the JSON file to write")
        if not os.path.isdir(folder):
            raise UsageError(f"--report {args.report}: {folder} is not an existing directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")


def _load_policy(spec):
    from ..rewriter.policy import load_policy
    return load_policy(spec)


def summary_table(outcomes: list[Outcome], check: bool, library_missing: Optional[str] = None):
    """One row per model; with --check, `library_missing` says why the "err lib" column is empty."""
    from rich.table import Table
    ok = sum(o.ok for o in outcomes)
    caption = f"err lib: no custom-op library ({library_missing})" if check and library_missing else None
    t = Table(title=f"longattn convert: {ok} of {len(outcomes)} models converted", caption=caption)
    t.add_column("model", overflow="fold", min_width=16)
    t.add_column("rewr/exact/skip", justify="right", no_wrap=True)  # sites by outcome
    t.add_column("status", overflow="fold", min_width=6)
    if check:  # max error over the outputs: stock onnxruntime (function bodies) / our library
        t.add_column("err ort", justify="right", no_wrap=True)
        t.add_column("err lib", justify="right", no_wrap=True)
    t.add_column("time", justify="right", no_wrap=True)
    for o in outcomes:
        s = o.report.get("summary", {})
        counts = "/".join(str(s.get(k, "-")) for k in ("rewritten", "exact", "skipped"))
        status = "[green]ok[/]" if o.ok else f"[red]failed[/]: {o.reason}"
        row = [os.path.relpath(o.source), counts, status]
        if check:
            row += [_max_error(o.checks, library=False), _max_error(o.checks, library=True)]
        row.append(f"{o.seconds:.1f}s")
        t.add_row(*row)
    return t


def _max_error(checks: dict, library: bool) -> str:
    """The largest error over the outputs, run in stock onnxruntime (function bodies) or with our
    library; every output's error is in the JSON report."""
    errors = [err for name, err in checks.items() if name.endswith(LIBRARY_SUFFIX) == library]
    return f"{max(errors):.2e}" if errors else "-"


def write_report(path: str, outcomes: list[Outcome], policy: str) -> None:
    data = {"version": 1, "policy": policy,
            "summary": {"models": len(outcomes), "converted": sum(o.ok for o in outcomes),
                        "failed": sum(not o.ok for o in outcomes)},
            "models": [{"input": o.source, "output": o.target if o.ok else None, "status": "ok" if o.ok else "failed",
                        "reason": o.reason, "checks": o.checks, "seconds": round(o.seconds, 3), "report": o.report}
                       for o in outcomes]}
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)

