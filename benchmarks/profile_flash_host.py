"""Where the host time of one eager flash call goes (GPU only).

For short calls (1K tokens) an eager flash forward is bound by the CPU work before the launch, not by
the GPU. This script measures, per shape, the host time per call (a loop of calls behind a long GPU
sleep, so that the queue never drains and only the CPU is timed), the eager event time as
bench_flash.py takes it, and prints cProfile's top functions for our path. Rows go to
$OUT/flash-host.jsonl (or --out).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import time_ms  # noqa: E402  (the eager event timing bench_flash reports)
from longattn.kernels.flash import flash_attention  # noqa: E402


def host_us_per_call(fn, calls=300):
    """CPU time per call while the GPU is kept busy (a sleep kernel in front), so no call waits."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles: the launches below only queue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def top_functions(fn, calls=300, n=18):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    return s.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions for ours")
    args = ap.parse_args()
    dev = "cuda"
    shapes = [  # (label, Hq, Hkv, Sq, Sk, D, causal)
        ("h32d64 1K", 32, 32, 1024, 1024, 64, False),
        ("h32d64 1K causal", 32, 32, 1024, 1024, 64, True),
        ("h16d128 1K", 16, 16, 1024, 1024, 128, False),
        ("h16d128 1K causal", 16, 16, 1024, 1024, 128, True),
        ("decode 9/3 8K", 9, 3, 1, 8192, 64, False),
    ]
    rows = []
    with open(os.path.join(args.out, "flash-host.jsonl"), "a") as log:
        for label, hq, hkv, sq, sk, d, causal in shapes:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(1, hq, sq, d, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, hkv, sk, d, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, hkv, sk, d, device=dev, dtype=torch.bfloat16, generator=g)
            fns = {
                "ours": lambda: flash_attention(q, k, v, causal=causal),
                "cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
                "fa2": lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal),
            }
            for name, fn in fns.items():
                try:
                    for _ in range(3):
                        fn()
                    row = dict(shape=label, impl=name, host_us=host_us_per_call(fn), event_ms=time_ms(fn, budget_ms=50, max_reps=50))
                except Exception as e:  # a backend that does not take this shape
                    row = dict(shape=label, impl=name, error=str(e).splitlines()[0][:160])
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                print(row, flush=True)
            if args.profile:
                print(f"--- cProfile, ours, {label}")
                print(top_functions(fns["ours"]))


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


if __name__ == "__main__":
    main()
