"""Where the time goes, on the GPU: a kernel-by-kernel breakdown of hyper's forward at long lengths and
the host (Python + launch) cost of flash's forward at short lengths.

    python benchmarks/profile_gpu.py [--hyper-lengths 131072] [--linear-lengths 32768]
                                     [--flash-lengths 1024,4096,8192] [--out DIR]

Hyper: torch.profiler over a few forward calls (bf16, h32 d64, batch 1), CUDA time per kernel name, so a
speed-up can aim at the largest line. Linear: the same for our chunked forms and their
flash-linear-attention twins (bench_linear.py's contenders, when fla imports). Flash: per-call wall time
of back-to-back calls (host-bound when it exceeds the kernel time), the kernel time from the profiler,
and do_bench's median. Writes
<date>-<device>-profile.md to --out after every section (a diagnosis, not a results table: ratios in the
bench_* files).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import triton
import triton.testing
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.flash import flash_attention  # noqa: E402
from longattn.kernels.hyper import hyper_attention  # noqa: E402

PARAMS = dict(block_size=256, sample_size=256, lsh_bits=7, min_seq_len=4096, sink_tokens=64, local_window=256)


def kernel_table(fn, reps=3):
    """[(name, total CUDA ms per call, calls per call)] sorted by time, and the summed ms per call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        name = ev.name[:90]
        t, n = rows.get(name, (0.0, 0))
        rows[name] = (t + ev.device_time_total / 1e3, n + 1)  # us -> ms
    table = sorted(((n, t / reps, c / reps) for n, (t, c) in rows.items()), key=lambda r: -r[1])
    return table, sum(r[1] for r in table)


def host_us(fn, calls=200):
    """Wall time per call of `calls` back-to-back calls, synchronised once at the end."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hyper-lengths", default="131072")
    ap.add_argument("--linear-lengths", default="32768")
    ap.add_argument("--flash-lengths", default="1024,4096,8192")
    ap.add_argument("--hyper-settings", default='{"default": {}, "paper": {"variant": "paper"}}',
                    help="JSON {name: PARAMS overrides} of the hyper calls to profile")
    ap.add_argument("--hyper-shape", default="32x64", help="heads x head dim of the hyper calls")
    ap.add_argument("--hyper-causal", default="0,1", help="causal modes of the hyper calls (0, 1)")
    ap.add_argument("--hyper-grad", action="store_true", help="profile hyper's forward+backward")
    ap.add_argument("--linear-cases", default="ours-identity-raw,ours-delta,fla-linear-raw,fla-delta")
    ap.add_argument("--linear-grad", action="store_true", help="profile forward+backward instead of forward")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    lines = [f"# GPU profile: {dev}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, {datetime.datetime.now().isoformat()[:19]}", ""]
    os.makedirs(a.out, exist_ok=True)
    slug = "h200" if "H200" in dev else "h100" if "H100" in dev else "gpu"
    path = os.path.join(a.out, f"{datetime.date.today().isoformat()}-{slug}-profile.md")

    def save():  # after every section: a time cap that stops the run keeps what was done
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, dim = (int(x) for x in a.hyper_shape.split("x"))
    for s in [int(x) for x in a.hyper_lengths.split(",") if x]:
        q, k, v = (torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16, generator=g,
                               requires_grad=a.hyper_grad) for _ in range(3))
        for causal in [bool(int(c)) for c in a.hyper_causal.split(",")]:
            for name, extra in json.loads(a.hyper_settings).items():
                call = lambda: hyper_attention(q, k, v, causal=causal, **dict(PARAMS, **extra))[0]
                if a.hyper_grad:
                    fn = lambda: torch.autograd.grad(out := call(), (q, k, v), torch.ones_like(out))
                else:
                    fn = call
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                table, total = kernel_table(fn)
                mode = "forward+backward" if a.hyper_grad else "forward"
                lines += [f"## hyper S={s} h{heads} d{dim} causal={causal} {mode} {name} {json.dumps(extra)}: "
                          f"do_bench {ms:.3f} ms, "
                          f"kernels {total:.3f} ms, host/call {host_us(fn, 20) / 1e3:.3f} ms", "",
                          "| kernel | ms/call | launches/call |", "|---|---|---|"]
                lines += [f"| `{n}` | {t:.3f} | {c:.0f} |" for n, t, c in table[:14]]
                lines.append("")
                print("\n".join(lines[-18:]), flush=True)
                save()
        del q, k, v
    for s in [int(x) for x in a.linear_lengths.split(",") if x]:
        from bench_linear import contenders
        q, k, v = (torch.randn(1, s, 32, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        beta = torch.rand(1, s, 32, device="cuda", dtype=torch.bfloat16, generator=g).sigmoid()
        ours, fla_fns = contenders(beta)
        wanted = a.linear_cases.split(",")
        cases = {n: ours[n][0] for n in wanted if n in ours}
        cases.update({n: fla_fns[n] for n in wanted if n in fla_fns})
        q, k, v = (t.requires_grad_(a.linear_grad) for t in (q, k, v))
        for name, f in cases.items():
            if a.linear_grad:  # ours and fla's outputs differ in layout: a gradient of ones fits both
                fn = lambda: torch.autograd.grad(out := f(q, k, v), (q, k, v), torch.ones_like(out))
            else:
                fn = lambda: f(q, k, v)
            with torch.set_grad_enabled(a.linear_grad):
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                table, total = kernel_table(fn)
            mode = "forward+backward" if a.linear_grad else "forward"
            lines += [f"## linear {name} S={s} h32 d64 causal {mode}: do_bench {ms:.3f} ms, kernels {total:.3f} ms",
                      "", "| kernel | ms/call | launches/call |", "|---|---|---|"]
            lines += [f"| `{n}` | {t:.3f} | {c:.0f} |" for n, t, c in table[:14]]
            lines.append("")
            print("\n".join(lines[-18:]), flush=True)
            save()
    lines += ["## flash forward, h32 d64 bf16, host vs kernel", "",
              "| S | causal | grad | host us/call | kernel us/call | do_bench us | sdpa cudnn us |", "|---|---|---|---|---|---|---|"]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for s in [int(x) for x in a.flash_lengths.split(",") if x]:
        q, k, v = (torch.randn(1, 32, s, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        for causal in (False, True):
            for grad in (False, True):
                qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
                fn = lambda: flash_attention(qq, kk, vv, causal=causal)
                table, total = kernel_table(fn, reps=10)
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

                def sdpa():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
                ref = triton.testing.do_bench(sdpa, warmup=25, rep=100, return_mode="median")
                lines.append(f"| {s} | {causal} | {grad} | {host_us(fn):.0f} | {total * 1e3:.0f} | {ms * 1e3:.0f} | "
                             f"{ref * 1e3:.0f} |")
                print(lines[-1], flush=True)
        save()
    if not a.flash_lengths:
        return
    # where the host time of one no-grad call goes (Python, Triton's launcher), by cProfile
    import cProfile
    import io
    import pstats
    q, k, v = (torch.randn(1, 32, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for grad in (False, True):
        qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
        flash_attention(qq, kk, vv, causal=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            flash_attention(qq, kk, vv, causal=True)
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        lines += [f"## cProfile: 200 flash calls, S=1024 causal, grad={grad} (tottime order)", "", "```",
                  *[l for l in text.getvalue().splitlines() if l.strip()][:40], "```", ""]
        print("\n".join(lines[-44:]), flush=True)
        save()


if __name__ == "__main__":
    main()
