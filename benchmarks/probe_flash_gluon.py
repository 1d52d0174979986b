"""Probe: FA3's intra-warpgroup overlap written by hand in Gluon (Triton's explicit layout/async language) for
Hopper: does it close the forward's gap to cuDNN where Triton 3.6's compiler-scheduled loops did not
(`probe_flash_pipelined.py`)? Minimal non-causal forward, lengths a multiple of the tiles, bf16:
- K/V tiles stream through a STAGES-deep shared-memory ring by TMA, one mbarrier a stage;
- PIPE 0: per tile, S = Q·Kᵀ (wgmma, waited), softmax, O += P·V (wgmma, waited);
- PIPE 1: per tile j, S_j = Q·K_jᵀ and O += P_{j-1}·V_{j-1} are both issued asynchronously, the softmax of S_j
  runs while the second is still on the tensor cores, then O is rescaled (FA3's Algorithm 2, one warpgroup
  role; no producer warp and no ping-pong between warpgroups).
Each config runs in its own process under a time limit; cuDNN SDPA and our dispatched forward are timed in the
parent, same run.

    PYTHONPATH=. OUT=DIR python benchmarks/probe_flash_gluon.py [--lengths 8192,32768]
Rows go to $OUT/gluon.jsonl.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, row, tile, n_tiles, STAGES: gl.constexpr):
    stage = tile % STAGES
    BN: gl.constexpr = k_desc.block_type.shape[0]
    live = tile < n_tiles
    mbarrier.expect(bars.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=live)
    tma.async_copy_global_to_shared(k_desc, [row + tile * BN, 0], bars.index(stage), k_smem.index(stage), pred=live)
    tma.async_copy_global_to_shared(v_desc, [row + tile * BN, 0], bars.index(stage), v_smem.index(stage), pred=live)


@gluon.jit
def _softmax(s, m, l, qk_scale):
    """One online-softmax step on a score tile (base 2): new max, the probabilities, the old rows' factor."""
    m_new = gl.maximum(m, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m - m_new)
    return p, m_new, l * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def attn_fwd(q_desc, k_desc, v_desc, o_desc, S, qk_scale, PIPE: gl.constexpr, STAGES: gl.constexpr,
             num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    q_row = gl.program_id(1) * S + gl.program_id(0) * BM
    kv_row = gl.program_id(1) * S
    n_tiles = S // BN

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row, i, n_tiles, STAGES)
    mbarrier.wait(q_bar, 0)

    m = gl.full([BM], float("-inf"), gl.float32, s_rows)
    l = gl.zeros([BM], gl.float32, s_rows)
    acc = gl.zeros([BM, D], gl.float32, o_layout)
    s_zero = gl.zeros([BM, BN], gl.float32, s_layout)
    if PIPE == 0:
        for j in range(n_tiles):
            stage = j % STAGES
            mbarrier.wait(kv_bars.index(stage), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
            p, m, l, alpha = _softmax(s, m, l, qk_scale)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row, j + STAGES, n_tiles, STAGES)
    else:
        mbarrier.wait(kv_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, m, l, alpha = _softmax(s, m, l, qk_scale)
        p = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(kv_bars.index(stage), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))           # the scores; P·V may still run
            p_new, m, l, alpha = _softmax(s, m, l, qk_scale)
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row, j - 1 + STAGES, n_tiles, STAGES)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        acc = warpgroup_mma(p, v_smem.index((n_tiles - 1) % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

    out = acc / gl.expand_dims(gl.convert_layout(l, o_rows), 1)
    q_smem.store(out.to(dtype))   # Q is no longer read: its buffer stages the output for the TMA store
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))


def gluon_attention(q, k, v, cfg):
    b, h, s, d = q.shape
    q2, k2, v2 = (t.reshape(b * h * s, d) for t in (q, k, v))
    o = torch.empty_like(q2)
    q_layout = gl.NVMMASharedLayout.get_default_for([cfg["BM"], d], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([cfg["BN"], d], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(q2, [cfg["BM"], d], q_layout)
    o_desc = TensorDescriptor.from_tensor(o, [cfg["BM"], d], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [cfg["BN"], d], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [cfg["BN"], d], kv_layout)
    grid = (s // cfg["BM"], b * h)

    def call():
        attn_fwd[grid](q_desc, k_desc, v_desc, o_desc, s, d ** -0.5 * LOG2E, PIPE=cfg["pipe"], STAGES=cfg["stages"],
                       num_warps=cfg["warps"])
    return call, o.view(b, h, s, d)


def flops(h, s, d):
    return 4 * h * s * s * d


def inputs(h, s, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def child(cfg):
    h, s, d = cfg["h"], cfg["s"], cfg["d"]
    q, k, v = inputs(h, s, d)
    fn, o = gluon_attention(q, k, v, cfg)
    fn()
    torch.cuda.synchronize()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = ((o.float() - ref).norm() / ref.norm()).item()
    ms = triton.testing.do_bench(fn, warmup=100, rep=400)
    return {**cfg, "err": err, "ms": ms, "tflops": flops(h, s, d) / ms / 1e9}


def configs(h, s, d):
    """(pipe, BM, BN, warps, stages)."""
    grid = {64: [(0, 128, 128, 8, 3), (1, 128, 128, 8, 3), (1, 128, 64, 8, 4), (1, 128, 128, 4, 3),
                 (1, 64, 128, 4, 3)],
            128: [(0, 128, 128, 8, 2), (1, 128, 128, 8, 2), (1, 128, 128, 8, 3), (1, 128, 64, 8, 3),
                  (1, 64, 128, 4, 2)]}[d]
    for pipe, bm, bn, warps, stages in grid:
        yield {"h": h, "s": s, "d": d, "BM": bm, "BN": bn, "pipe": pipe, "warps": warps, "stages": stages}


def parent(lengths, shapes):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from longattn.kernels.flash import flash_attention
    out = open(os.path.join(os.environ.get("OUT", "."), "gluon.jsonl"), "a")
    dev = torch.cuda.get_device_name()
    for h, d in shapes:
        for s in lengths:
            q, k, v = inputs(h, s, d)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=100, rep=400)
            base = {"h": h, "d": d, "s": s, "device": dev, "triton": triton.__version__, "torch": torch.__version__}
            rows = [{**base, "impl": "cudnn", "ms": ms}]
            ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, scale=d ** -0.5, causal=False),
                                         warmup=100, rep=400)
            rows.append({**base, "impl": "ours", "ms": ms})
            for cfg in configs(h, s, d):
                try:
                    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], timeout=120,
                                       capture_output=True, text=True)
                    line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
                    row = json.loads(line) if line else {**cfg, "failed": (r.stderr or "")[-600:]}
                except subprocess.TimeoutExpired:
                    row = {**cfg, "failed": "timeout (hang?)"}
                rows.append({**base, "impl": "gluon", **row})
            for r in rows:
                if "ms" in r:
                    r["tflops"] = flops(h, s, d) / r["ms"] / 1e9
                    r["vs_cudnn"] = rows[0]["ms"] / r["ms"]
                print(json.dumps(r), flush=True)
                out.write(json.dumps(r) + "\n")
            out.flush()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--shapes", default="32x64,16x128", help="heads x head dim, comma-separated")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
    else:
        parent([int(x) for x in a.lengths.split(",")],
               [tuple(int(v) for v in hd.split("x")) for hd in a.shapes.split(",")])
