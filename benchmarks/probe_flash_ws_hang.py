"""Probe: which feature makes the warp-specialised forward hang on Triton 3.6 (H200)? One minimal kernel per
feature (and our kernel), each in its own process under a time limit; rows appended to $OUT/ws_hang.jsonl.
Result: `benchmarks/results/2026-12-04-h200-flash.md` (a 4-d Q descriptor hangs).

    PYTHONPATH=. OUT=DIR python benchmarks/probe_flash_ws_hang.py
"""
import json, os, subprocess, sys, time
import torch, triton, triton.language as tl
import torch.nn.functional as F

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def kern(Q, K, V, O, Lse, S, H, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
         Q4D: tl.constexpr, KV4D: tl.constexpr, O_PTR: tl.constexpr, LSE: tl.constexpr, WHERE: tl.constexpr):
    pid = tl.program_id(0)
    hz = tl.program_id(1)
    rows = hz * S
    if Q4D:
        dq4 = tl.make_tensor_descriptor(Q, [1, H, S, D], [H * S * D, S * D, D, 1], [1, 1, BM, D])
    else:
        dq = tl.make_tensor_descriptor(Q, [S * H, D], [D, 1], [BM, D])
    if KV4D:
        dk4 = tl.make_tensor_descriptor(K, [1, H, S, D], [H * S * D, S * D, D, 1], [1, 1, BN, D])
        dv4 = tl.make_tensor_descriptor(V, [1, H, S, D], [H * S * D, S * D, D, 1], [1, 1, BN, D])
    else:
        dk = tl.make_tensor_descriptor(K, [S * H, D], [D, 1], [BN, D])
        dv = tl.make_tensor_descriptor(V, [S * H, D], [D, 1], [BN, D])
    if Q4D:
        q = dq4.load([0, hz, pid * BM, 0]).reshape(BM, D)
    else:
        q = dq.load([rows + pid * BM, 0])
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    last = tl.zeros([BM], tl.int32) + (S - 1)
    m_i = tl.zeros([BM], tl.float32) - float("inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in tl.range(0, S, BN, warp_specialize=True):
        if KV4D:
            k = dk4.load([0, hz, s, 0]).reshape(BN, D)
        else:
            k = dk.load([rows + s, 0])
        qk = tl.dot(q, k.T)
        if WHERE:
            qk = tl.where((s + offs_n)[None, :] <= last[:, None], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if KV4D:
            v = dv4.load([0, hz, s, 0]).reshape(BN, D)
        else:
            v = dv.load([rows + s, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    acc = acc / l_i[:, None]
    if O_PTR:
        o_ptrs = O + (rows + offs_m)[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m < S)[:, None])
    else:
        do = tl.make_tensor_descriptor(O, [S * H, D], [D, 1], [BM, D])
        do.store([rows + pid * BM, 0], acc.to(O.dtype.element_ty))
    if LSE:
        tl.store(Lse + hz * S + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < S)


def one(flags):
    h, S, d = 16, 1024, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(1, h, S, device="cuda", dtype=torch.float32)
    kern[(S // 128, h)](q, k, v, o, lse, S, h, d ** -0.5 * 1.4426950408889634, D=d, BM=128, BN=128, **flags,
                        num_warps=4, num_stages=2)
    torch.cuda.synchronize()
    ref = F.scaled_dot_product_attention(q, k, v)
    return ((o.float() - ref.float()).norm() / ref.float().norm()).item()


def module(causal, sq, sk, hq=16, hkv=16):
    sys.path.insert(0, os.getcwd())
    from longattn.kernels.flash.triton_fwd_ws import flash_forward_ws
    q = torch.randn(1, hq, sq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, sk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    r = flash_forward_ws(q, k, v, 128 ** -0.5, causal)
    torch.cuda.synchronize()
    if r is None:
        return "None (build failed)"
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv) if sq == sk or not causal else None
    return None if ref is None else ((r[0].float() - ref.float()).norm() / ref.float().norm()).item()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        spec = json.loads(sys.argv[1])
        t = time.time()
        res = one(spec["flags"]) if "flags" in spec else module(**spec["module"])
        print(json.dumps({**spec, "err": res, "s": round(time.time() - t, 1)}), flush=True)
        sys.exit(0)
    base = dict(Q4D=False, KV4D=False, O_PTR=False, LSE=False, WHERE=False)
    specs = [{"flags": base}] + [{"flags": {**base, f: True}} for f in base]
    specs += [{"flags": {**base, "Q4D": True, "KV4D": True, "O_PTR": True, "LSE": True, "WHERE": True}}]
    specs += [{"module": dict(causal=False, sq=1024, sk=1024)}, {"module": dict(causal=True, sq=1024, sk=1024)},
              {"module": dict(causal=False, sq=1000, sk=1537, hkv=4)}]
    out = os.environ.get("OUT", ".")
    for spec in specs:
        try:
            r = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=35)
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else json.dumps({**spec, "rc": r.returncode, "stderr": r.stderr[-600:]})
        except subprocess.TimeoutExpired:
            line = json.dumps({**spec, "hang": True})
        print(line, flush=True)
        with open(os.path.join(out, "ws_hang.jsonl"), "a") as f:
            f.write(line + "\n")
