"""Exact attention on one GPU, one run: our Triton flash kernels against torch SDPA's cuDNN,
flash (FA2) and memory-efficient backends.

    PYTHONPATH=. python benchmarks/bench_flash.py [--out DIR] [--fwd-lengths 4096,...]
        [--bwd-lengths 4096,...] [--decode-lengths 8192,...] [--skip fwd,bwd,decode]

bf16, batch 1, random normal inputs (fresh per shape), no mask.
  fwd:    heads×dim 32×64 and 16×128, causal and not; TFLOP/s counts 4·S²·D·H (halved when causal);
          up to 8K also timed as CUDA-graph replays (graph_ms in the jsonl): eager calls that short
          measure each library's Python/launch overhead as much as its kernel.
  fwdbwd: the same shapes, forward + backward (out.backward(g)); TFLOP/s counts 3.5× the forward's
          FLOPs (backward = 2.5× forward, the FlashAttention convention); up to 8K also as CUDA-graph
          replays of forward + backward.
  decode: one query against S keys, d64, heads 32/32 and GQA 9/3 (SDPA with enable_gqa), effective
          bandwidth = K and V bytes read once / time; timed as CUDA-graph replays (so that all
          contenders are measured without Python launch gaps) and eagerly.
Timing (device METHOD.md): CUDA events, warm-up (which also runs our autotuning) then repeats up to
~0.3 s per case, median. Every contender's output is checked against cuDNN's (relative error).
Writes <date>-<device>-flash.jsonl (first line: environment) and .md (table) to --out.
On an H100 the default lengths take about 4 min for decode + forward (autotuning included) and about as
long again for forward+backward: within one 10-minute device call, or split with --skip.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.flash import flash_attention  # noqa: E402
from longattn.kernels.flash.gluon_fwd import gluon_applies  # noqa: E402

import harness  # noqa: E402  (benchmarks/harness.py)

T0 = time.time()
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


# bench_flash's timing: 2 warm-up calls, at least 3 repeats; graphs captured after one plain call
time_ms = functools.partial(harness.time_ms, warmup=2, min_reps=3)
time_graph_ms = functools.partial(harness.time_graph_ms, side_warmup=2, first_call=True)
rel_err = harness.rel_err


def sdpa(backend, q, k, v, causal, gqa=False):
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def ours(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal)[0]


def ours_triton(q, k, v, causal):
    """Our Triton kernels without the Gluon forward (what GPUs other than Hopper, or a Triton without Gluon, run)."""
    os.environ["LONGATTN_FLASH_GLUON"] = "0"
    try:
        return ours(q, k, v, causal)
    finally:
        del os.environ["LONGATTN_FLASH_GLUON"]


def bench_attention(rec, mode, lengths, shapes):
    """mode 'fwd' or 'fwdbwd'."""
    for h, d in shapes:
        for causal in (False, True):
            for s in lengths:
                torch.manual_seed(s + d)
                q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * s * s * d * h / (2 if causal else 1) * (3.5 if mode == "fwdbwd" else 1.0)
                fns = {"ours": lambda: ours(q, k, v, causal)}
                if mode == "fwd" and gluon_applies(q, k, v, None, causal):
                    fns["triton"] = lambda: ours_triton(q, k, v, causal)
                for name in BACKENDS:
                    if name == "efficient" and s > (16384 if mode == "fwdbwd" else 32768):
                        continue  # 1-4 s a call and far behind: not worth the device budget
                    fns[name] = (lambda name=name: sdpa(name, q, k, v, causal))
                ref = None
                with torch.no_grad():
                    try:
                        ref = sdpa("cudnn", q, k, v, causal)
                    except RuntimeError:
                        pass
                for name, fn in fns.items():
                    row = {"kind": mode, "impl": name, "h": h, "d": d, "s": s, "causal": causal}
                    try:
                        if mode == "fwd":
                            with torch.no_grad():
                                if ref is not None:
                                    row["rel_err_vs_cudnn"] = rel_err(fn(), ref)
                                ms = time_ms(fn)
                                if s <= 8192:  # short calls: also without Python launch gaps
                                    row["graph_ms"] = time_graph_ms(fn, calls_per_replay=5, samples=10)
                                    row["graph_tflops"] = flops / row["graph_ms"] / 1e9
                        else:
                            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                            g = torch.randn_like(q)
                            step = (lambda fn=fn, qg=qg, kg=kg, vg=vg, g=g, name=name:
                                    (ours(qg, kg, vg, causal) if name == "ours" else sdpa(name, qg, kg, vg, causal))
                                    .backward(g))
                            ms = time_ms(step)
                            if s <= 8192:  # short calls: also without Python launch gaps (autograd included)
                                try:
                                    row["graph_ms"] = time_graph_ms(step, calls_per_replay=5, samples=10)
                                    row["graph_tflops"] = flops / row["graph_ms"] / 1e9
                                except RuntimeError as e:  # a backend whose backward cannot be captured
                                    row["graph_error"] = str(e).splitlines()[0][:200]
                        row.update(ms=ms, tflops=flops / ms / 1e9)
                    except (RuntimeError, torch.OutOfMemoryError) as e:
                        row["error"] = str(e).splitlines()[0][:200]
                        torch.cuda.empty_cache()
                    rec.write(row)
                del q, k, v, ref
                torch.cuda.empty_cache()


def bench_decode(rec, lengths):
    for hq, hkv in ((32, 32), (9, 3)):
        for s in lengths:
            torch.manual_seed(s + hq)
            q = torch.randn(1, hq, 1, 64, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, hkv, s, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            gqa = hq != hkv
            nbytes = 2 * k.numel() * k.element_size()
            fns = {"ours": lambda: flash_attention(q, k, v)[0]}
            for name in BACKENDS:
                fns[name] = (lambda name=name: sdpa(name, q, k, v, False, gqa))
            with torch.no_grad():
                ref = sdpa("cudnn", q, k, v, False, gqa) if True else None
                for name, fn in fns.items():
                    row = {"kind": "decode", "impl": name, "hq": hq, "hkv": hkv, "d": 64, "s": s}
                    try:
                        row["rel_err_vs_cudnn"] = rel_err(fn(), ref)
                        ms = time_graph_ms(fn)
                        eager = time_ms(fn, budget_ms=100, max_reps=500)
                        row.update(ms=ms, GBps=nbytes / ms / 1e6, eager_ms=eager, eager_GBps=nbytes / eager / 1e6)
                    except RuntimeError as e:
                        row["error"] = str(e).splitlines()[0][:200]
                    rec.write(row)


def dump_autotune(rec):
    """The configs our autotuners chose, per key (for the notes; not timings)."""
    from longattn.kernels.flash import triton_bwd, triton_decode, triton_fwd
    for label, tuner in (("fwd", triton_fwd._fwd_tuned), ("dkdv", triton_bwd._dkdv_tuned),
                         ("dq", triton_bwd._dq_tuned), ("decode", triton_decode._decode_tuned)):
        for key, cfg in getattr(tuner, "cache", {}).items():
            rec.write({"kind": "autotune", "kernel": label, "key": [str(x) for x in key], "config": str(cfg)})


IMPLS = ("ours", "triton", "cudnn", "fa2", "efficient")  # the table's columns


def markdown(rec, env):
    lines = [f"# Flash attention benchmark, {env['date']}", "",
             f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. "
             "bf16, batch 1, random normal inputs. Generated by `benchmarks/bench_flash.py`; "
             "ratios are only meaningful within this run.", ""]
    for mode, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        rows = [r for r in rec.rows if r["kind"] == mode]
        if not rows:
            continue
        lines += [f"## {title} (TFLOP/s; up to 8K CUDA-graph replay with the eager call in brackets; "
                  "'triton': our Triton kernels, where ours takes the Gluon forward)", "",
                  "| h×d | causal | S | ours | triton | cuDNN | FA2 | mem-eff | ours/cuDNN | ours/FA2 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["h"], r["d"], r["causal"], r["s"]) for r in rows})
        for h, d, causal, s in keys:
            row = {r["impl"]: r for r in rows if (r["h"], r["d"], r["causal"], r["s"]) == (h, d, causal, s)}
            get = {n: r.get("graph_tflops", r.get("tflops")) for n, r in row.items()}  # ratios: graph where timed

            def fmt(name):
                r = row.get(name, {})
                if not r.get("tflops"):
                    return "–"
                return f"{r['graph_tflops']:.0f} ({r['tflops']:.0f})" if "graph_tflops" in r else f"{r['tflops']:.0f}"
            ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"
            lines.append(f"| {h}×{d} | {causal} | {s} | " + " | ".join(fmt(n) for n in IMPLS) + " | "
                         f"{ratio(get.get('ours'), get.get('cudnn'))} | {ratio(get.get('ours'), get.get('fa2'))} |")
        lines.append("")
    rows = [r for r in rec.rows if r["kind"] == "decode"]
    if rows:
        lines += ["## Decode, one query, d64 (GB/s of K+V read once; CUDA-graph replay, eager in brackets)", "",
                  "| heads q/kv | S | ours | cuDNN | FA2 | mem-eff |", "|---|---|---|---|---|---|"]
        for hq, hkv, s in sorted({(r["hq"], r["hkv"], r["s"]) for r in rows}):
            get = {r["impl"]: r for r in rows if (r["hq"], r["hkv"], r["s"]) == (hq, hkv, s)}
            cell = lambda r: f"{r['GBps']:.0f} ({r['eager_GBps']:.0f})" if r and "GBps" in r else "–"
            lines.append(f"| {hq}/{hkv} | {s} | " + " | ".join(cell(get.get(n)) for n in ("ours", "cudnn", "fa2",
                                                                                            "efficient")) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--fwd-lengths", default="1024,4096,8192,16384,32768,131072")
    ap.add_argument("--bwd-lengths", default="4096,8192,16384,32768")
    ap.add_argument("--decode-lengths", default="8192,32768,131072")
    ap.add_argument("--skip", default="")
    ap.add_argument("--head-dims", default="64,128", help="which of the anchor shapes (h32 d64, h16 d128) to time")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]
    env = harness.gpu_env(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))
    rec = harness.Recorder(args.out, harness.device_slug(env["gpu"]), "flash", quiet=("env", "autotune", "note"), t0=T0)
    rec.write(env)
    skip = set(args.skip.split(","))
    # `timeout` sends SIGTERM: turn it into an exception so that the tables below are still written
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    shapes = [(h, d) for h, d in ((32, 64), (16, 128)) if d in ints(args.head_dims)]
    try:
        if "decode" not in skip:
            bench_decode(rec, ints(args.decode_lengths))
        if "fwd" not in skip:
            bench_attention(rec, "fwd", ints(args.fwd_lengths), shapes)
        if "bwd" not in skip:
            bench_attention(rec, "fwdbwd", ints(args.bwd_lengths), shapes)
    except KeyboardInterrupt as e:
        rec.write({"kind": "note", "text": f"stopped early: {e}"})
    finally:
        dump_autotune(rec)
        text = markdown(rec, env)
        with open(rec.stem + ".md", "w") as f:
            f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
