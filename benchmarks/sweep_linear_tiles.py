"""Tile / warp / pipelining sweep of the linear kind's forward kernels, one kernel at a time, on the GPU.

    python benchmarks/sweep_linear_tiles.py [--s 32768] [--h 32] [--d 64] [--kernels states,output,...]
                                            [--budget-s 360] [--out DIR]

Each kernel is launched directly with explicit meta-parameters on the inputs its launcher gives it (bf16,
batch 1, causal, q/k/v as (B, S, H, D) storage seen through .transpose(1, 2), as the benchmarks call the op)
and timed by triton.testing.do_bench (median). Kernels: `states` and `output` (the raw identity path, the
fla `chunk_linear_attn` twin), `delta-inverse`, `delta-wu`, `delta-h`, `delta-output` (the delta rule).
Writes <date>-<device>-linear-tiles.{jsonl,md}: every config's time, registers and spills, and the
fastest per kernel, which is what the launchers' autotune lists and fixed tiles are chosen from.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.linear import triton_additive as add  # noqa: E402
from longattn.kernels.linear import triton_delta as delta  # noqa: E402


# the interpreter (TRITON_INTERPRET=1) runs the script on the CPU at tiny sizes: a check of the launches only
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def bench_ms(fn):
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def grid_configs(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


class Sweep:
    def __init__(self, out_dir, tag, budget_s):
        os.makedirs(out_dir, exist_ok=True)
        self.stem = os.path.join(out_dir, f"{datetime.date.today().isoformat()}-{tag}-linear-tiles")
        self.jsonl = open(self.stem + ".jsonl", "w")
        self.rows = []
        self.deadline = time.time() + budget_s

    def write(self, row):
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        print(json.dumps(row), flush=True)

    def run(self, kernel_name, launch, configs, produced=None, expected=None):
        """launch(cfg) -> the compiled kernel; times every config until the budget ends. produced() -> the
        tensors the launch wrote, compared with `expected` (a reference): a fast config that computes
        something else is worthless, and the relative error says so."""
        for cfg in configs:
            if time.time() > self.deadline:
                self.write({"kernel": kernel_name, **cfg, "skipped": "budget"})
                continue
            row = {"kernel": kernel_name, **cfg}
            try:
                compiled = launch(cfg)
                if expected is not None:
                    row["rel_err"] = max(rel_err(a, b) for a, b in zip(produced(), expected))
                row["ms"] = bench_ms(lambda: launch(cfg))
                row["regs"] = getattr(compiled, "n_regs", None)
                row["spills"] = getattr(compiled, "n_spills", None)
            except Exception as e:  # out of shared memory / registers: recorded, not fatal  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            self.write(row)


def additive_launchers(s, h, d):
    q, k, v = (torch.randn(1, s, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    P, shift, N, nq = add.chunk_geometry(s, s, True, 0, 64)
    H = torch.empty(h, N + 1, d, d, dtype=torch.bfloat16, device=DEVICE)
    Z = torch.empty(h, N + 1, 1, dtype=torch.float32, device=DEVICE)
    out = torch.empty(1, h, s, d, dtype=torch.bfloat16, device=DEVICE)

    def states(cfg):
        return add._states_kernel[(triton.cdiv(d, cfg["BK"]), triton.cdiv(d, cfg["BV"]), h)](
            k, v, H, Z, Z, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), h, s, P, N, d,
            d, N, 1, d * d, FMAP=0, HAS_DEN=False, BF16=True, C=64, BK=cfg["BK"], BV=cfg["BV"], num_warps=cfg["warps"],
            num_stages=cfg["stages"])

    def output(cfg):
        return add._output_kernel[(triton.cdiv(d, cfg["BV"]), nq, h)](
            q, k, v, H, Z, out, out, H, Z, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, 1, s, s, P, N, d, d, shift, 0.0, N, FMAP=0, HAS_DEN=False, DIVIDE=False, BF16=True, C=64,
            BK=cfg["BK"], BV=cfg["BV"], num_warps=cfg["warps"], num_stages=cfg["stages"])

    states({"BK": 64, "BV": 64, "warps": 4, "stages": 2})  # H for the output kernel, and the states' reference
    h_ref = H.clone()
    ref = add.far_additive_torch(q, k, v, fmap="identity", causal=True, offset=0, chunk=64, normalize=False,
                                 divide=True, eps=0.0, out_dtype=torch.float32)
    return (states, lambda: (H,), (h_ref,)), (output, lambda: (out,), (ref,))


def backward_launchers(s, h, d):
    """The raw identity path's backward kernels (`triton_additive_bwd`), references in float32 PyTorch."""
    from longattn.kernels.linear import triton_additive_bwd as bwd
    C = 64
    q, k, v = (torch.randn(1, s, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    do = torch.randn(1, h, s, d, device=DEVICE, dtype=torch.bfloat16)
    P, shift, N, nq = add.chunk_geometry(s, s, True, 0, C)
    H, Z = add.launch_states(k, v, fmap_id=0, normalize=False, bf16=True, chunk=C, P=P, N=N)
    R = torch.zeros(h, nq + 1, d, d, dtype=torch.bfloat16, device=DEVICE)
    RZ = torch.empty(h, nq + 1, 1, dtype=torch.float32, device=DEVICE)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dummy = torch.empty(1, dtype=torch.float32, device=DEVICE)
    flags = dict(FMAP=0, HAS_DEN=False, HAS_RS=False, BF16=True, C=C)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))

    def meta(cfg):
        return dict(BK=cfg["BK"], BV=cfg["BV"], num_warps=cfg["warps"], num_stages=cfg["stages"])

    def rev(cfg):
        return bwd._rev_states_kernel[(triton.cdiv(d, cfg["BK"]), triton.cdiv(d, cfg["BV"]), h)](
            q, do, dummy, dummy, R, RZ, q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1),
            do.stride(2), h, s, nq, d, d, **flags, **meta(cfg))

    def dq_(cfg):
        return bwd._dq_kernel[(triton.cdiv(d, cfg["BK"]), nq, h)](
            q, k, v, H, Z, do, dummy, dummy, dq, H, Z, *strides, h, 1, s, s, P, N, d, d, shift, **flags, **meta(cfg))

    def dkv(want_dk):
        def launch(cfg):
            tiles = triton.cdiv(d, cfg["BK"] if want_dk else cfg["BV"])
            return bwd._dkv_kernel[(tiles, N, h)](
                q, k, v, do, dummy, dummy, R, RZ, dk, dv, *strides, h, 1, s, s, P, N, nq, d, d, shift,
                WANT_DK=want_dk, **flags, **meta(cfg))
        return launch

    # references: R by reversed chunk sums, the gradients by autograd through the float32 PyTorch form
    per_chunk = torch.einsum("hncf,hncv->hnfv", q[0].float().reshape(h, nq, C, d), do[0].float().reshape(h, nq, C, d))
    r_ref = per_chunk.flip(1).cumsum(1).flip(1)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = add.far_additive_torch(*leaves, fmap="identity", causal=True, offset=0, chunk=C, normalize=False,
                                 divide=True, eps=0.0, out_dtype=torch.float32)
    grads = torch.autograd.grad(out, leaves, do.float())
    del out, leaves
    rev({"BK": 64, "BV": 32, "warps": 4, "stages": 3})  # R for the dk/dv kernels
    return ((rev, lambda: (R[:, :nq],), (r_ref,)), (dq_, lambda: (dq,), (grads[0],)),
            (dkv(True), lambda: (dk,), (grads[1],)), (dkv(False), lambda: (dv,), (grads[2],)))


def delta_launchers(s, h, d):
    C = 64
    q, k, v = (torch.randn(1, s, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    beta = torch.rand(1, s, h, device=DEVICE, dtype=torch.bfloat16).sigmoid().transpose(1, 2)
    P, shift, N, nq = add.chunk_geometry(s, s, True, 0, C)
    bf = dt = torch.bfloat16
    KN = torch.empty(h, N * C, d, dtype=bf, device=DEVICE)
    WT, UT, UNEW = torch.empty_like(KN), torch.empty_like(KN), torch.empty_like(KN)
    TT = torch.empty(h, N * C, C, dtype=dt, device=DEVICE)
    H = torch.empty(h, N + 1, d, d, dtype=bf, device=DEVICE)
    out = torch.empty(1, h, s, d, dtype=bf, device=DEVICE)

    def inverse(cfg):
        return delta._delta_inverse_kernel[(N, h)](
            k, beta, KN, TT, k.stride(0), k.stride(1), k.stride(2), beta.stride(0), beta.stride(1), beta.stride(2),
            h, s, P, N, d, FMAP=0, C=C, BF=d, PRECISION=cfg["precision"], num_warps=cfg["warps"],
            num_stages=cfg["stages"])

    def wu(cfg):
        return delta._delta_wu_kernel[(N, h)](
            KN, v, TT, WT, UT, v.stride(0), v.stride(1), v.stride(2), h, s, P, N, d, d, C=C, BF=d, BV=cfg["BV"],
            PRECISION="tf32", num_warps=cfg["warps"], num_stages=cfg["stages"])

    def walk(cfg):
        return delta._delta_h_kernel[(triton.cdiv(d, cfg["BV"]), h)](
            KN, WT, UT, H, UNEW, N, d, d, BF16=True, C=C, BF=d, BV=cfg["BV"], num_warps=cfg["warps"],
            num_stages=cfg["stages"])

    def output(cfg):
        return add._output_kernel[(triton.cdiv(d, cfg["BV"]), nq, h)](
            q, KN, UNEW, H, H, out, out, H, H, q.stride(0), q.stride(1), q.stride(2), h * N * C * d, N * C * d, d,
            h * N * C * d, N * C * d, d, out.stride(0), out.stride(1), out.stride(2), h, 1, s, N * C, 0, N, d, d,
            shift, 0.0, N, FMAP=0, HAS_DEN=False, DIVIDE=False, BF16=True, C=C, BK=cfg["BK"], BV=cfg["BV"], KMAP=0,
            QL2=True, num_warps=cfg["warps"], num_stages=cfg["stages"])

    # the inputs of each later kernel, once, by the configs verified before this sweep: their tensors are the
    # references of the intermediate kernels; the output's is the PyTorch form in float32
    inverse({"precision": "tf32", "warps": 8, "stages": 2})
    wu({"BV": 64, "warps": 4, "stages": 2})
    walk({"BV": 32, "warps": 4, "stages": 2})
    refs = {n: t.clone() for n, t in dict(KN=KN, TT=TT, WT=WT, UT=UT, H=H, UNEW=UNEW).items()}
    ref = delta.far_delta_torch(q, k, v, beta.float(), fmap="identity", causal=True, offset=0, chunk=C,
                                out_dtype=torch.float32, pure=True)
    return ((inverse, lambda: (KN, TT), (refs["KN"], refs["TT"])), (wu, lambda: (WT, UT), (refs["WT"], refs["UT"])),
            (walk, lambda: (H, UNEW), (refs["H"], refs["UNEW"])), (output, lambda: (out,), (ref,)))


def markdown(rows, env):
    lines = [f"# Linear kernels: tile sweep on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; S={env['s']} h{env['h']} d{env['d']} bf16 "
             "causal, batch 1. Generated by `benchmarks/sweep_linear_tiles.py` (do_bench median).", ""]
    kernels = []
    for r in rows:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    for name in kernels:
        timed = sorted((r for r in rows if r["kernel"] == name and "ms" in r), key=lambda r: r["ms"])
        failed = [r for r in rows if r["kernel"] == name and "error" in r]
        lines += [f"## {name}: {len(timed)} configs timed, {len(failed)} failed to build", "",
                  "| config | ms | regs | spills | rel. error |", "|---|---|---|---|---|"]
        for r in timed[:6] + ([timed[-1]] if len(timed) > 6 else []):
            cfg = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kernel", "ms", "regs", "spills", "rel_err"))
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
            lines.append(f"| {cfg} | {r['ms']:.4f} | {r['regs']} | {r['spills']} | {err} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--s", type=int, default=32768)
    ap.add_argument("--h", type=int, default=32)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--kernels", default="states,output,delta-output,delta-inverse,delta-h,delta-wu")
    ap.add_argument("--budget-s", type=float, default=360)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    tag = name.split()[-1].lower().strip("()")
    env = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "s": args.s, "h": args.h, "d": args.d}
    sweep = Sweep(args.out, tag, args.budget_s)
    sweep.jsonl.write(json.dumps({"kind": "env", **env}) + "\n")
    wanted = args.kernels.split(",")
    tiles = grid_configs(BK=(32, 64), BV=(32, 64), warps=(2, 4, 8), stages=(1, 2, 3))
    if "states" in wanted or "output" in wanted:
        states, output = additive_launchers(args.s, args.h, args.d)
        if "states" in wanted:
            sweep.run("states", states[0],
                      grid_configs(BK=(32, 64), BV=(32, 64), warps=(2, 4, 8), stages=(3, 4, 5)), *states[1:])
        if "output" in wanted:
            sweep.run("output", output[0], tiles, *output[1:])
        del states, output
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
    if any(w.startswith("bwd") for w in wanted):
        rev, dq, dk, dv = backward_launchers(args.s, args.h, args.d)
        bwd_tiles = grid_configs(BK=(32, 64), BV=(32, 64), warps=(4, 8), stages=(1, 2, 3))
        for name, launcher in (("bwd-dq", dq), ("bwd-dk", dk), ("bwd-dv", dv)):
            if name in wanted:
                sweep.run(name, launcher[0], bwd_tiles, *launcher[1:])
        if "bwd-rev" in wanted:
            sweep.run("bwd-rev", rev[0], grid_configs(BK=(32, 64), BV=(32, 64), warps=(2, 4, 8), stages=(3, 4, 5)),
                      *rev[1:])
        del rev, dq, dk, dv
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
    if any(w.startswith("delta") for w in wanted):
        inverse, wu, walk, output = delta_launchers(args.s, args.h, args.d)
        if "delta-output" in wanted:  # unit φ(q) rows: one feature tile, BK = F
            sweep.run("delta-output", output[0], [cfg for cfg in tiles if cfg["BK"] >= args.d], *output[1:])
        if "delta-inverse" in wanted:
            sweep.run("delta-inverse", inverse[0], grid_configs(precision=("tf32",), warps=(4, 8), stages=(1, 2)),
                      *inverse[1:])
        if "delta-wu" in wanted:
            sweep.run("delta-wu", wu[0], grid_configs(BV=(32, 64), warps=(2, 4, 8), stages=(1, 2, 3)), *wu[1:])
        if "delta-h" in wanted:  # last: 16-wide tiles at 4+ warps hit an illegal address (triton 3.6, sm_90)
            sweep.run("delta-h", walk[0], [cfg for cfg in grid_configs(BV=(16, 32, 64), warps=(1, 2, 4, 8),
                                                                       stages=(1, 2, 3, 4))
                                           if cfg["BV"] > 16 or cfg["warps"] < 4], *walk[1:])
    with open(sweep.stem + ".md", "w") as f:
        f.write(markdown(sweep.rows, env))
    print(markdown(sweep.rows, env))


if __name__ == "__main__":
    main()
