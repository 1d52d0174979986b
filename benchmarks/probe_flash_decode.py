"""Probe: our split-K decode against cuDNN with more or fewer key splits (programs per SM), tiles and key orders.

    PYTHONPATH=. python benchmarks/probe_flash_decode.py [--out DIR]

One query, d64, bf16, CUDA-graph replays (bench_flash's timer); GB/s of K and V read once. For each
PROGRAMS_PER_SM in --factors, each decode tile (BLOCK_N, warps, stages) and each key order in --orders (a split's
keys as one chunk, or every num_splits-th tile), and with or without the merge as a programmatic dependent launch
(--pdl), the split kernel is launched with that config directly (no
autotuner), beside cuDNN in the same run, for each head shape in --heads. Rows to DIR/flash-decode-probe.jsonl.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import time_graph_ms  # noqa: E402
from longattn.kernels.flash import triton_decode  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--factors", default="2,3,4,6,8")
    ap.add_argument("--tiles", default="64x4x3,64x4x4,128x4x3,128x8x3,128x4x4,256x8x3")
    ap.add_argument("--orders", default="chunked,interleaved")
    ap.add_argument("--heads", default="9/3,32/32")
    ap.add_argument("--pdl", default="1", help="1,0: the merge launched as a programmatic dependent launch or not")
    args = ap.parse_args()
    orders = [{"chunked": False, "interleaved": True}[x] for x in args.orders.split(",")]
    pdls = [x == "1" for x in args.pdl.split(",")]
    can_pdl = triton_decode.programmatic_launch
    factors = [int(x) for x in args.factors.split(",")]
    tiles = [tuple(int(y) for y in x.split("x")) for x in args.tiles.split(",")]
    defaults = triton_decode.PROGRAMS_PER_SM, triton_decode.INTERLEAVED
    log = open(os.path.join(args.out, "flash-decode-probe.jsonl"), "a")
    for hq, hkv in (tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")):
        for s in (8192, 32768, 131072):
            q = torch.randn(1, hq, 1, 64, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, hkv, s, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            gb = 2 * k.numel() * k.element_size() / 1e9

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
            ref = cudnn()
            rows = [dict(hq=hq, hkv=hkv, s=s, impl="cudnn", GBps=gb / time_graph_ms(cudnn) * 1e3)]
            for interleaved, factor, (bn, w, st), pdl in itertools.product(orders, factors, tiles, pdls):
                triton_decode.PROGRAMS_PER_SM, triton_decode.INTERLEAVED = factor, interleaved
                triton_decode.programmatic_launch = can_pdl if pdl else (lambda device_index: False)
                cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
                fn = lambda: triton_decode.decode_forward(q, k, v, 0.125, False, config=cfg)[0]  # noqa: E731
                row = dict(hq=hq, hkv=hkv, s=s, impl="ours", factor=factor, tile=[bn, w, st],
                           interleaved=interleaved, pdl=pdl and can_pdl(0))
                try:
                    err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
                    row.update(GBps=gb / time_graph_ms(fn) * 1e3, rel_err=err)
                except Exception as e:  # a tile that does not fit
                    row.update(error=str(e).splitlines()[0][:120])
                rows.append(row)
            for r in rows:
                log.write(json.dumps(r) + "\n")
            for r in rows[1:]:
                print(f"{hq}/{hkv} S={s} {'interleaved' if r['interleaved'] else 'chunked'} factor {r['factor']} "
                      f"tile {r['tile']} pdl {r['pdl']}: {r.get('GBps', 0):.0f} GB/s, "
                      f"{r.get('GBps', 0) / rows[0]['GBps']:.3f}x cuDNN ({rows[0]['GBps']:.0f})", flush=True)
    triton_decode.PROGRAMS_PER_SM, triton_decode.INTERLEAVED = defaults
    triton_decode.programmatic_launch = can_pdl


if __name__ == "__main__":
    main()
