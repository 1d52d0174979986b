"""Whole-model prefill on the CPU, as a user calls it: eager PyTorch against `torch.compile(model, backend="longattn")`
(the README's call: static graph, built-in policy, inductor inside) and plain `torch.compile(model)`.

    PYTHONPATH=. python benchmarks/bench_cpu_prefill.py [--lengths 2048,8192] [--layers 4] [--out DIR]

A Llama shaped like SmolLM2-135M (hidden 576, 9 heads / 3 KV heads of 64), fewer layers, random weights, fp32,
batch 1, no KV cache, attention implementation "sdpa" (what transformers picks). Each variant is called once
(compile + first run, timed as compile_s), then timed as the best of --reps wall-clock calls; outputs are compared
with eager's. Writes <date>-cpu-prefill.{jsonl,md} to --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import build_model  # noqa: E402


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    import transformers

    import longattn
    env = {"kind": "env", "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
           "model": f"llama smollm2-135m shape, {args.layers} layers, random, fp32"}
    rows = [env]
    print(json.dumps(env), flush=True)
    model = build_model(args.layers, device="cpu", dtype=torch.float32)
    for s in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, 49152, (1, s), generator=torch.Generator().manual_seed(s))
        variants = {"eager": model, "longattn": torch.compile(model, backend="longattn", dynamic=False),
                    "inductor": torch.compile(model, dynamic=False)}
        reference = None
        for name, fn in variants.items():
            torch._dynamo.reset()
            call = lambda: fn(input_ids=ids, use_cache=False).last_hidden_state  # noqa: E731
            with torch.no_grad():
                start = time.perf_counter()
                out = call()
                row = {"kind": "prefill", "impl": name, "s": s, "compile_s": round(time.perf_counter() - start, 1),
                       "ms": round(best_of(call, args.reps) * 1e3, 1)}
            if reference is None:
                reference = out
            else:
                row["rel_err"] = ((out - reference).norm() / reference.norm()).item()
            if name == "longattn":
                report = longattn.last_report()
                row["sites"] = {k: report.count(k) for k in ("rewritten", "exact", "skipped")}
                row["bands"] = report.sites[0].choice if report.sites else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, args.out, env)
    return 0


def write(rows, out_dir, env):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{env['date']}-cpu-prefill")
    with open(stem + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    eager = {r["s"]: r["ms"] for r in rows if r.get("impl") == "eager"}
    lines = [f"# Whole-model prefill on the CPU, {env['date']}", "",
             f"{env['device']}, {env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}; "
             f"{env['model']}, batch 1, no KV cache. Best of the timed calls after a first (compiling) call. "
             "× eager = eager ms / this ms (higher is faster).", "",
             "| impl | S | ms | × eager | rel err vs eager | compile s | sites rewritten |", "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
        sites = f"{r['sites']['rewritten']} ({r['bands']})" if "sites" in r else "—"
        lines.append(f"| {r['impl']} | {r['s']} | {r['ms']} | {eager[r['s']] / r['ms']:.2f} | {err} | "
                     f"{r['compile_s']} | {sites} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
