"""Per-token decode cost of one linear site through the op: kept state (`decode_state`) vs recomputing the
cached prefix, with exact attention over the cache beside them (the exact band: PyTorch's reference; the flash band: our
decode kernel on CUDA, the reference on CPU), at growing context lengths. One run.

    python benchmarks/bench_decode_state.py [--contexts 1024,4096,16384,65536] [--steps 32] [--device cpu]
                                            [--out benchmarks/results]

Shape of SmolLM2-135M's attention (9 query heads, 3 key/value heads, head dim 64), batch 1, float32 on
CPU (bfloat16 on CUDA), the hybrid defaults (64 sinks, 256-key window, elu). For each context n a cache
of n + steps keys is drawn once; step t attends one new query to the first n + t + 1 keys (views, no
copies), as a generation loop does. Times: wall clock per step (CUDA: synchronised), median over the
steps. Every kept-state output is compared with the recomputed one (max abs difference reported).
Writes <date>-<device>-decode-state.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels import Band, encode_plan  # noqa: E402
from longattn.kernels.linear import HYBRID_DEFAULTS, incremental  # noqa: E402
from harness import save_results  # noqa: E402  (benchmarks/harness.py)


def per_step_ms(fn, steps, sync):
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        fn(t)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    params = dict(HYBRID_DEFAULTS)
    op = torch.ops.longattn.attention
    plans = {"recompute": encode_plan([Band("linear", params=params)]),
             "kept state": encode_plan([Band("linear", params={**params, "site": "bench"})]),
             "exact": encode_plan([Band("exact")]), "flash": encode_plan([Band("flash")])}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    env = {"kind": "env", "device": name, "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "params": params,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    records = [env]
    g = torch.Generator().manual_seed(0)
    for n in [int(x) for x in a.contexts.split(",")]:
        S = n + a.steps
        q, k, v = (torch.randn(1, h, S, 64, generator=g).to(dev, dtype) for h in (9, 3, 3))
        row = {"kind": "decode", "context": n}
        with torch.no_grad():
            call = lambda plan, t: op(q[:, :, n + t:n + t + 1], k[:, :, :n + t + 1], v[:, :, :n + t + 1], None,
                                      0.125, True, 0.0, None, plan)
            for impl, plan in plans.items():
                incremental.clear()
                call(plan, 0)  # warm-up (and, for the kept state, the one-pass build from the prefix)
                if impl == "kept state":
                    incremental.clear()
                    call(plan, 0)  # the state now sits at n + 1: the timed steps continue it
                    row["max_abs_diff_vs_recompute"] = max(
                        (call(plan, t) - call(plans["recompute"], t)).abs().max().item() for t in range(1, 4))
                    incremental.clear()
                    call(plan, 0)
                row[impl] = per_step_ms(lambda t: call(plan, t + 1), a.steps - 1, sync)
        row["recompute / kept"] = row["recompute"] / row["kept state"]
        row["exact / kept"] = row["exact"] / row["kept state"]
        row["flash / kept"] = row["flash"] / row["kept state"]
        records.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# Linear decode through the op: kept state vs recompute ({name})", "",
             f"torch {env['torch']}, {env['threads']} threads, {env['dtype']}, {env['date']}; h9/kv3 d64, batch 1, "
             f"one site, hybrid defaults {params}. Median ms per generated token over {a.steps - 1} steps "
             "(`benchmarks/bench_decode_state.py`).", "",
             "| context | kept state | recompute | exact (reference) | flash | recompute / kept | exact / kept | "
             "flash / kept | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records[1:]:
        lines.append(f"| {r['context']} | {r['kept state']:.3f} | {r['recompute']:.3f} | {r['exact']:.3f} | "
                     f"{r['flash']:.3f} | {r['recompute / kept']:.1f} | {r['exact / kept']:.1f} | "
                     f"{r['flash / kept']:.1f} | {r['max_abs_diff_vs_recompute']:.1e} |")
    slug = "h200" if "H200" in name else "h100" if "H100" in name else dev.type
    save_results(os.path.join(a.out, f"{datetime.date.today().isoformat()}-{slug}-decode-state"), records,
                 "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
