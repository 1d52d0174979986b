"""What the benchmarks share: the CUDA timers, the error measure, the device slug, the environment record and the
results writers. Imported as `harness` (a script's own folder is first on sys.path); not part of the library.

Each benchmark keeps the timing it has always used: the timers take the few settings in which the scripts
differ (warm-up calls, the fewest repeats, a first call outside the graph) as arguments, and each script binds
its own (bench_flash: 2 warm-ups, at least 3 repeats, a first call before capture; bench_linear: 3, 5, none).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from longattn.files import atomic_path  # noqa: E402


def time_ms(fn, budget_ms=300.0, max_reps=100, warmup=2, min_reps=3):
    """Median ms of one call, CUDA events around each call, after `warmup` calls; as many repeats as fit in
    about `budget_ms` by a first timed call, at least `min_reps`, at most `max_reps`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(stop)
    reps = int(max(min_reps, min(max_reps, budget_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def time_graph_ms(fn, calls_per_replay=20, samples=15, side_warmup=2, first_call=True):
    """Median time of one call, from CUDA-graph replays of `calls_per_replay` calls (`side_warmup` calls on a
    side stream before capture, after one plain call and a sync when `first_call`)."""
    if first_call:
        fn()
        torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(side_warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_replay):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls_per_replay)
    return statistics.median(times)


def rel_err(x, ref, dtype=torch.float32):
    """‖x − ref‖ / ‖ref‖, both cast to `dtype` first."""
    x, ref = x.to(dtype), ref.to(dtype)
    return ((x - ref).norm() / ref.norm()).item()


def device_slug(name: str) -> str:
    """A short name for a GPU in results file names: h200, h100, ..."""
    for token in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if token in name.lower():
            return token
    return "".join(c for c in name.lower() if c.isalnum())[:16] or "gpu"


def gpu_env(date: str) -> dict:
    """The environment record that opens a GPU benchmark's rows."""
    import triton
    props = torch.cuda.get_device_properties(0)
    return {"kind": "env", "gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "date": date}


class Recorder:
    """Rows of one run to <out_dir>/<date>-<device_tag>-<name>.jsonl as they come (flushed, so a run cut short
    keeps them); rows of other kinds than `quiet` are also kept in .rows and printed. With `t0`, each row gets
    elapsed_s since then."""

    def __init__(self, out_dir, device_tag, name, quiet=("env",), t0=None):
        os.makedirs(out_dir, exist_ok=True)
        self.stem = os.path.join(out_dir, f"{datetime.date.today().isoformat()}-{device_tag}-{name}")
        self.jsonl = open(self.stem + ".jsonl", "w")
        self.rows = []
        self.quiet, self.t0 = quiet, t0

    def write(self, obj):
        if self.t0 is not None:
            obj.setdefault("elapsed_s", round(time.time() - self.t0, 1))
        self.jsonl.write(json.dumps(obj) + "\n")
        self.jsonl.flush()
        if obj.get("kind") not in self.quiet:
            self.rows.append(obj)
            print(json.dumps(obj), flush=True)


def save_results(base: str, records: list[dict], markdown: str) -> None:
    """Write a measurement as `base`.jsonl (one record a line, the environment first) and `base`.md."""
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with atomic_path(base + ".jsonl") as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    with atomic_path(base + ".md") as tmp, open(tmp, "w") as f:
        f.write(markdown)
