"""Probe: tiles of the Gluon Hopper forward (`longattn/kernels/flash/gluon_fwd.py`) against cuDNN SDPA, the FA2
backend and our Triton forward, in one run. Each (shape, causal, config) compiles and runs in its own process
under a time limit (a bad config can hang a GPU); the baselines are timed in the parent.

    PYTHONPATH=. OUT=DIR python benchmarks/probe_flash_gluon.py [--lengths 8192,32768] [--shapes 32x64,16x128]
Rows go to $OUT/gluon.jsonl. `--host` prints where an eager call's host time goes instead.

The first version of this probe (git history) also tried FA3's intra-warpgroup overlap (S_j = Q·K_jᵀ issued
while P_{j-1}·V_{j-1} runs); on the H100 it was 10-25% slower than the plain loop the library now ships.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton

# per head dim: tiles and launch settings (smem and registers checked for sm_90 offline); WS = the warp-specialised
# kernel (one producer warp, two consumer warp groups of BLOCK_M/2 rows, CONSUMER_REGS registers each), PINGPONG:
# the consumers take turns at the tensor cores
def _cfg(bm, bn, warps, stages, **kw):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "STAGES": stages, **kw}


WS = {"WS": True, "CONSUMER_REGS": 240, "maxnreg": 168}
PP = {**WS, "PINGPONG": True}
CONFIGS = {64: [_cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 128, 4, 4, **WS), _cfg(128, 128, 4, 4, **PP)],
           128: [_cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(128, 128, 4, 2, **WS), _cfg(128, 128, 4, 2, **PP),
                 _cfg(128, 128, 4, 3, **PP)]}


def flops(h, s, d, causal):
    return 4 * h * s * s * d / (2 if causal else 1)


def inputs(h, s, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=100, rep=400)


def child(job):
    from longattn.kernels.flash.gluon_fwd import flash_forward_gluon, gluon
    h, d, causal, cfg = job["h"], job["d"], job["causal"], job["cfg"]
    rows = []
    for s in job["lengths"]:
        q, k, v = inputs(h, s, d)
        assert gluon is not None, "no Gluon in this Triton"
        fn = lambda: flash_forward_gluon(q, k, v, d ** -0.5, causal, config=cfg)
        o, lse = fn()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        err = ((o.float() - ref).norm() / ref.norm()).item()
        rows.append({"s": s, "err": err, "ms": bench(fn)})
    return rows


def parent(lengths, shapes):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from longattn.kernels.flash import flash_attention
    out = open(os.path.join(os.environ.get("OUT", "."), "gluon.jsonl"), "a")
    dev = torch.cuda.get_device_name()
    meta = {"device": dev, "triton": triton.__version__, "torch": torch.__version__}
    for h, d in shapes:
        for causal in (False, True):
            rows = []
            for s in lengths:
                q, k, v = inputs(h, s, d)
                base = {**meta, "h": h, "d": d, "s": s, "causal": causal}
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(backend):
                        rows.append({**base, "impl": name, "ms": bench(
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))})
                os.environ["LONGATTN_FLASH_GLUON"] = "0"
                rows.append({**base, "impl": "triton", "ms": bench(
                    lambda: flash_attention(q, k, v, scale=d ** -0.5, causal=causal))})
                del os.environ["LONGATTN_FLASH_GLUON"]
                del q, k, v
            for cfg in CONFIGS[d]:
                job = {"h": h, "d": d, "causal": causal, "cfg": cfg, "lengths": lengths}
                name = "gluon " + " ".join(f"{k}{v}" for k, v in cfg.items())
                try:
                    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], timeout=90,
                                       capture_output=True, text=True)
                    line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
                    got = json.loads(line) if line else [{"s": s, "failed": (r.stderr or "")[-600:]} for s in lengths]
                except subprocess.TimeoutExpired:
                    got = [{"s": s, "failed": "timeout (hang?)"} for s in lengths]
                rows += [{**meta, "h": h, "d": d, "causal": causal, "impl": name, **g} for g in got]
            cudnn = {r["s"]: r["ms"] for r in rows if r["impl"] == "cudnn"}
            for r in rows:
                if "ms" in r:
                    r["tflops"] = flops(h, r["s"], d, causal) / r["ms"] / 1e9
                    r["vs_cudnn"] = cudnn[r["s"]] / r["ms"]
                print(json.dumps(r), flush=True)
                out.write(json.dumps(r) + "\n")
            out.flush()


def host_cost(s=1024, reps=200):
    """Where an eager call's host time goes (the bench's eager rows: ~0.25 ms for the Gluon path, ~0.1 ms for the
    Triton one, ~0.05 ms for cuDNN): µs per call of each stage, enqueue only (a short shape, no sync inside)."""
    import time
    from longattn.kernels.flash import flash_attention, gluon_fwd
    rows = []
    for h, d in ((32, 64), (16, 128)):
        q, k, v = inputs(h, s, d)
        cfg = gluon_fwd.GLUON_CONFIGS[(d, False)]
        stages = {
            "sdpa (cudnn default)": lambda: F.scaled_dot_product_attention(q, k, v),
            "flash_attention (dispatch; small: Triton)": lambda: flash_attention(q, k, v),
            "gluon_applies": lambda: gluon_fwd.gluon_applies(q, k, v, None, False),
            "flash_forward_gluon (prep + launch)": lambda: gluon_fwd.flash_forward_gluon(q, k, v, 0.125, False, cfg),
        }
        for name, fn in stages.items():
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            host = (time.perf_counter() - t) / reps * 1e6
            torch.cuda.synchronize()
            rows.append({"h": h, "d": d, "s": s, "stage": name, "host_us": host})
            print(json.dumps(rows[-1]), flush=True)
        profile_calls(stages["flash_forward_gluon (prep + launch)"], reps)
    return rows


def profile_calls(fn, reps, top=25):
    """cProfile of `reps` calls: the functions where the host time goes, by own time and by cumulative time."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    for order in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=sys.stdout).sort_stats(order).print_stats(top)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--shapes", default="32x64,16x128", help="heads x head dim, comma-separated")
    ap.add_argument("--host", action="store_true", help="only the host-cost breakdown of one eager call")
    a = ap.parse_args()
    if a.host:
        host_cost()
    elif a.child:
        print(json.dumps(child(json.loads(a.child))))
    else:
        parent([int(x) for x in a.lengths.split(",")],
               [tuple(int(v) for v in hd.split("x")) for hd in a.shapes.split(",")])
