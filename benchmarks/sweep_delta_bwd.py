"""Launch settings of the delta rule's Triton backward (`triton_delta_bwd.py`), swept on the GPU.

    LONGATTN_DELTA_BWD=triton python benchmarks/sweep_delta_bwd.py [--s 32768] [--budget-s 240] [--out DIR]

One knob at a time (coordinate descent from the current settings): LOCAL_TILE (value tile, warps) of the walk's
parallel part, WALK_TILE of the reverse walk, DK_WARPS of the UT inverse's backward, DKV_TILE of dKn / dV,
DQ_TILE of dq. Each config runs in its own
subprocess, because on triton 3.6 some launch settings fault with an illegal address, which poisons the rest
of a process. A child times forward+backward of `linear_attention(update_rule="delta")` (bf16, h32 d64, batch 1,
causal, do_bench median) and compares its gradients with the current settings' (relative error): a config
that is fast but wrong is reported as wrong. Writes <date>-<device>-delta-bwd-sweep.{jsonl,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

CANDIDATES = {  # the first of each: the settings triton 3.6 runs now (the baseline)
    "LOCAL_TILE": [(64, 4), (32, 4), (64, 8)],
    "WALK_TILE": [(32, 4), (16, 4), (64, 4)],
    "DK_WARPS": [4, 8],
    "DKV_TILE": [(32, 4), (32, 8)],
    "DQ_TILE": [(64, 4), (64, 8)],
}


def child(config, s, ref_path):
    import torch
    import triton.testing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from longattn.kernels.linear import linear_attention
    from longattn.kernels.linear import triton_delta_bwd as bwd
    for name, value in config.items():
        setattr(bwd, name, tuple(value) if isinstance(value, list) else value)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 32, s, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    beta = torch.rand(1, 32, s, device="cuda", dtype=torch.bfloat16, generator=g).sigmoid()
    do = torch.randn(1, 32, s, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = lambda: torch.autograd.grad(linear_attention(q, k, v, causal=True, feature_map="identity",  # noqa: E731
                                                      update_rule="delta", beta=beta, normalize=False), (q, k, v), do)
    grads = [x.float() for x in fn()]
    torch.cuda.synchronize()
    row = {"config": config, "ms": triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")}
    if os.path.exists(ref_path):
        ref = torch.load(ref_path)
        row["rel_err"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
    else:
        torch.save(grads, ref_path)
    print("RESULT " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, default=32768)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    ref_path = os.path.join(a.out, ".delta-bwd-reference.pt")
    if a.child is not None:
        return child(json.loads(a.child), a.s, ref_path)
    import torch
    import triton
    os.makedirs(a.out, exist_ok=True)
    if os.path.exists(ref_path):
        os.remove(ref_path)
    deadline = time.time() + a.budget_s
    best = {name: values[0] for name, values in CANDIDATES.items()}
    rows = []
    stem = os.path.join(a.out, f"{datetime.date.today().isoformat()}-{torch.cuda.get_device_name().split()[-1].lower()}"
                               "-delta-bwd-sweep")

    def run(config):
        cmd = [sys.executable, __file__, "--s", str(a.s), "--out", a.out, "--child", json.dumps(config)]
        left = deadline - time.time()
        if left < 20:
            return {"config": config, "error": "budget spent"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return {"config": config, "error": "timed out"}
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return {"config": config, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}

    base = run(best)
    rows.append(base)
    print(json.dumps(base), flush=True)
    best_ms = base.get("ms", float("inf"))
    for name, values in CANDIDATES.items():
        for value in values[1:]:
            row = run(dict(best, **{name: value}))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row.get("ms", float("inf")) < best_ms and row.get("rel_err", 1.0) < 1e-2:
                best_ms, best = row["ms"], dict(best, **{name: value})
    with open(stem + ".jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"# Delta rule backward: launch settings, {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today().isoformat()}; "
             f"forward+backward of the delta rule, bf16, h32 d64, S={a.s}, batch 1, causal. Generated by "
             "`benchmarks/sweep_delta_bwd.py`; rel_err: largest relative error of dq/dk/dv against the first "
             "config's.", "", "| config | ms | rel_err |", "|---|---|---|"]
    for row in rows:
        cells = f"{row['ms']:.3f} | {row.get('rel_err', 0.0):.1e}" if "ms" in row else f"— | {row['error']}"
        lines.append(f"| `{json.dumps(row['config'])}` | {cells} |")
    lines += ["", f"Fastest correct: `{json.dumps(best)}` at {best_ms:.3f} ms."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if os.path.exists(ref_path):
        os.remove(ref_path)


if __name__ == "__main__":
    sys.exit(main())
