"""Probe: does Triton's Hopper warp specialisation (tl.range(warp_specialize=True), descriptors built on the
device) speed up the flash forward? A minimal kernel, timed with and without it, against cuDNN and our kernel."""
import itertools, json, os, sys, time
import torch, triton, triton.language as tl
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.flash import flash_attention

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def probe(Q, K, V, O, N, H, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr,
          CAUSAL: tl.constexpr, FOURD: tl.constexpr):
    pid = tl.program_id(0)
    hz = tl.program_id(1)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    rows = hz * N
    if FOURD:
        dk4 = tl.make_tensor_descriptor(K, [1, H, N, D], [H * N * D, N * D, D, 1], [1, 1, BN, D])
        dv4 = tl.make_tensor_descriptor(V, [1, H, N, D], [H * N * D, N * D, D, 1], [1, 1, BN, D])
    else:
        dk = tl.make_tensor_descriptor(K, [N * H, D], [D, 1], [BN, D])
        dv = tl.make_tensor_descriptor(V, [N * H, D], [D, 1], [BN, D])
    do = tl.make_tensor_descriptor(O, [N * H, D], [D, 1], [BM, D])
    dq = tl.make_tensor_descriptor(Q, [N * H, D], [D, 1], [BM, D])
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    q = dq.load([rows + pid * BM, 0])
    m_i = tl.zeros([BM], tl.float32) - float("inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if CAUSAL:
        hi = (pid + 1) * BM
    else:
        hi = N
    for s in tl.range(0, hi, BN, warp_specialize=WS):
        if FOURD:
            k = dk4.load([0, hz, s, 0]).reshape(BN, D)
        else:
            k = dk.load([rows + s, 0])
        qk = tl.dot(q, k.T)
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= (s + offs_n)[None, :], qk, -float("inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FOURD:
            v = dv4.load([0, hz, s, 0]).reshape(BN, D)
        else:
            v = dv.load([rows + s, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    acc = acc / l_i[:, None]
    do.store([rows + pid * BM, 0], acc.to(O.dtype.element_ty))


def bench(fn, reps=30):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(out_dir):
    rows = []
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"))
    print(env, flush=True)
    for (h, d), S, causal in itertools.product([(32, 64), (16, 128)], [8192, 32768], [False, True]):
        q, k, v = (torch.randn(1, h, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d ** -0.5
        flops = 4 * S * S * d * h / (2 if causal else 1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t_cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        t_ours = bench(lambda: flash_attention(q, k, v, scale=scale, causal=causal))
        base = dict(h=h, d=d, S=S, causal=causal, cudnn_ms=t_cudnn, ours_ms=t_ours,
                    cudnn_tflops=flops / t_cudnn / 1e9, ours_tflops=flops / t_ours / 1e9)
        print(json.dumps(base), flush=True)
        rows.append(base)
        variants = [(True, bn, st, 4, False) for bn in (64, 128) for st in (2, 3)]
        variants += [(True, 128, 2, 4, True), (False, 128, 2, 8, False), (False, 64, 3, 4, False)]
        for ws, bn, stages, warps, fourd in variants:
            o = torch.empty_like(q)
            grid = (S // 128, h)
            def run():
                probe[grid](q, k, v, o, S, h, scale * 1.4426950408889634, D=d, BM=128, BN=bn, WS=ws, CAUSAL=causal,
                            FOURD=fourd, num_warps=warps, num_stages=stages)
            try:
                run(); torch.cuda.synchronize()
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                t = bench(run)
                r = dict(h=h, d=d, S=S, causal=causal, ws=ws, bn=bn, stages=stages, warps=warps, fourd=fourd,
                         ms=t, tflops=flops / t / 1e9, vs_cudnn=t_cudnn / t, err=err)
            except Exception as e:
                r = dict(h=h, d=d, S=S, causal=causal, ws=ws, bn=bn, stages=stages, warps=warps, fourd=fourd,
                         error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(r), flush=True)
            rows.append(r)
            with open(os.path.join(out_dir, "probe_flash_ws.jsonl"), "w") as f:
                f.write(json.dumps(env) + "\n" + "".join(json.dumps(x) + "\n" for x in rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
