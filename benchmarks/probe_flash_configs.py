"""Probe: forward tiles outside the autotuner's list against the tuned kernel and cuDNN, in one run.

    PYTHONPATH=. python benchmarks/probe_flash_configs.py [--out DIR] [--lengths 16384,32768]

bf16, batch 1, h32 d64 and h16 d128 (the anchor shapes), causal and not; CUDA-graph replays (bench_flash's
timer), TFLOP/s as bench_flash counts them. Each config (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA) is
launched through `flash_forward(config=...)`; "tuned" is the autotuned pointer kernel, "ws" the
warp-specialised one where it applies. Rows to DIR/flash-config-probe.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import time_graph_ms  # noqa: E402
from longattn.kernels.flash import flash_attention  # noqa: E402
from longattn.kernels.flash.triton_fwd import flash_forward  # noqa: E402

CONFIGS = {  # (BLOCK_M, BLOCK_N, warps, stages, TMA) beyond or beside the tuner's list
    64: [(128, 64, 8, 3, False), (128, 128, 8, 3, False), (256, 64, 8, 2, False), (256, 64, 8, 3, False),
         (256, 128, 8, 2, False), (128, 64, 8, 4, False), (256, 64, 8, 3, True), (128, 128, 4, 3, False)],
    128: [(128, 128, 8, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 8, 4, False),
          (128, 128, 8, 3, True), (128, 64, 8, 3, True), (128, 128, 4, 2, False)],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="16384,32768")
    args = ap.parse_args()
    log = open(os.path.join(args.out, "flash-config-probe.jsonl"), "a")
    for h, d in ((32, 64), (16, 128)):
        for causal in (False, True):
            for s in (int(x) for x in args.lengths.split(",")):
                q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * s * s * d * h / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                fns = {"cudnn": lambda: _cudnn(q, k, v, causal),
                       "tuned": lambda: flash_forward(q, k, v, d ** -0.5, causal)[0],
                       "ours": lambda: flash_attention(q, k, v, causal=causal)[0]}
                for cfg in CONFIGS[d]:
                    bm, bn, w, st, tma = cfg
                    c = dict(BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma, num_warps=w, num_stages=st)
                    fns["x".join(map(str, cfg[:4])) + ("-tma" if tma else "")] = \
                        lambda c=c: flash_forward(q, k, v, d ** -0.5, causal, config=c)[0]
                best = {}
                for name, fn in fns.items():
                    row = dict(h=h, d=d, s=s, causal=causal, impl=name)
                    try:
                        err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = time_graph_ms(fn, replays_per_sample=3, samples=7)
                        row.update(ms=ms, tflops=flops / ms / 1e9, rel_err=err)
                        best[name] = row["tflops"]
                    except Exception as e:  # a config that does not fit
                        row["error"] = str(e).splitlines()[0][:120]
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                cells = " ".join(f"{n}={t:.0f}" for n, t in best.items())
                print(f"h{h}d{d} causal={causal} S={s}: {cells}", flush=True)
                del q, k, v, ref
                torch.cuda.empty_cache()


def _cudnn(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


if __name__ == "__main__":
    main()
