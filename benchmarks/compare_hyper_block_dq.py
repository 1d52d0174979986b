"""Hyper backward, the blocks' dq row-major ("rows", the default) against float32 atomics ("atomic"): causal
forward+backward at 32K, h16 d128 and h32 d64, alternating in one process (PYTHONPATH=. python benchmarks/compare_hyper_block_dq.py)."""
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.getcwd())
from longattn.kernels.hyper import hyper_attention  # noqa: E402
from longattn.kernels.hyper import triton_backward as tb  # noqa: E402

for h, d in ((16, 128), (32, 64)):
    q, k, v = (torch.randn(1, h, 32768, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for mode in ("rows", "atomic", "rows", "atomic"):
        tb.BLOCK_DQ = mode
        def fn():
            o = hyper_attention(q, k, v, causal=True)[0]
            return torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        print(json.dumps({"h": h, "d": d, "block_dq": mode, "ms": ms}), flush=True)
