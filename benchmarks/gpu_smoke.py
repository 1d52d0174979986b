"""A one-minute speed smoke for gpu_check.sh: is each kernel family still about as fast as it was, next to cuDNN?

    PYTHONPATH=. python benchmarks/gpu_smoke.py [--out smoke.jsonl]

Not a benchmark and not a test: a few forward calls, bf16, batch 1, 32 heads of 64, causal, random normal inputs,
each timed by its own benchmark's timer (imported, so the figures compare with those tables) after a warm-up:
  flash-fwd   8K:  longattn flash (bench_flash.ours) vs cuDNN SDPA             bench_flash.time_ms (CUDA events)
  hyper-fwd   32K: longattn hyper, default and variant="paper" vs cuDNN SDPA   bench_hyper.bench (do_bench median)
  linear-fwd  32K: longattn linear (identity raw/normalised, elu) vs fla's     bench_linear.time_ms (CUDA events)
                   chunk_linear_attn when `import fla` works, and cuDNN SDPA
A call that fails is recorded with its error and the rest go on. Rows, one JSON object a line, to --out and stdout:
first {"kind": "env", ...} (device, versions, fla's version or why it is missing), then per call {"kind": "smoke",
"case", "impl", "s", "h", "d", "causal", "ms", "vs_cudnn": ms / cuDNN's ms in the same case} and, where a twin
computes the same function (ours vs cuDNN for flash, ours vs fla for linear), "rel_err" against it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import bench_flash  # noqa: E402 - this folder is sys.path[0] when run as a script
import bench_hyper  # noqa: E402
import bench_linear  # noqa: E402

H, D = 32, 64
FLASH_S, LONG_S = 8192, 32768  # flash's length; hyper's and linear's
DEVICE = "cuda"


def bf16(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16)


def flash_case():
    s = FLASH_S
    q, k, v = bf16(1, H, s, D), bf16(1, H, s, D), bf16(1, H, s, D)
    calls = {"longattn-flash": lambda: bench_flash.ours(q, k, v, True),
             "sdpa-cudnn": lambda: bench_flash.sdpa("cudnn", q, k, v, True)}
    return "flash-fwd", s, calls, {"longattn-flash": "sdpa-cudnn"}, bench_flash.time_ms


def hyper_case():
    s = LONG_S
    runners = bench_hyper.runners(H, D, s, causal=True, backward=False)  # the benchmark's inputs and defaults
    calls = {"longattn-hyper": runners["hyper"][0], "longattn-hyper-paper": runners["hyper_paper"][0],
             "sdpa-cudnn": runners["sdpa_cudnn"][0]}
    return "hyper-fwd", s, calls, {}, bench_hyper.bench


def linear_case():
    s = LONG_S
    q, k, v = bf16(1, s, H, D), bf16(1, s, H, D), bf16(1, s, H, D)  # (B, S, H, D) storage, as bench_linear
    beta = torch.rand(1, s, H, device=DEVICE, dtype=torch.bfloat16)
    ours, fla = bench_linear.contenders(beta)
    calls = {name.replace("ours", "longattn-linear"): (lambda fn=fn: fn(q, k, v))
             for name, (fn, _) in ours.items() if name in ("ours-identity-raw", "ours-identity-norm", "ours-elu-norm")}
    twins = {}
    for name in ("fla-linear-raw", "fla-linear-norm"):
        if name in fla:
            calls[name.replace("fla-linear", "fla-chunk-linear-attn")] = lambda fn=fla[name]: fn(q, k, v)
    if fla:
        twins = {"longattn-linear-identity-raw": "fla-chunk-linear-attn-raw",
                 "longattn-linear-identity-norm": "fla-chunk-linear-attn-norm"}
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - SDPA reads the (B, H, S, D) view of the same storage
    calls["sdpa-cudnn"] = lambda: bench_flash.sdpa("cudnn", t(q), t(k), t(v), True)
    return "linear-fwd", s, calls, twins, bench_linear.time_ms


def run_case(make_case):
    """Rows of one case: each call warmed up (compiles, autotunes) and timed; failures recorded."""
    torch.manual_seed(0)
    name, s, calls, twins, timer = make_case()
    rows, outs = {}, {}
    for impl, fn in calls.items():
        row = {"kind": "smoke", "case": name, "impl": impl, "s": s, "h": H, "d": D, "causal": True}
        try:
            with torch.no_grad():
                outs[impl] = fn()
                row["ms"] = round(timer(fn), 4)
        except Exception as e:  # noqa: BLE001 - one failing call must not end the smoke
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            torch.cuda.empty_cache()
        rows[impl] = row
    cudnn = rows.get("sdpa-cudnn", {}).get("ms")
    for impl, row in rows.items():
        if cudnn and "ms" in row:
            row["vs_cudnn"] = round(row["ms"] / cudnn, 3)
        twin = twins.get(impl)
        if twin in outs and impl in outs:
            row["rel_err"] = float(f"{bench_flash.rel_err(outs[impl], outs[twin]):.3g}")
            row["rel_err_vs"] = twin
    return list(rows.values())


def environment():
    props = torch.cuda.get_device_properties(0)
    env = {"kind": "env", "device": torch.cuda.get_device_name(), "sms": props.multi_processor_count,
           "torch": torch.__version__, "triton": bench_hyper.triton.__version__, "cuda": torch.version.cuda,
           "fla": getattr(bench_linear.fla, "__version__", "unknown") if bench_linear.fla else None}
    if bench_linear.fla is None:
        env["fla_missing"] = bench_linear.FLA_ERROR
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON lines file (default: stdout only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA device (torch.cuda.is_available() is False); nothing timed", file=sys.stderr)
        return 2
    sink = open(args.out, "w") if args.out else None
    start = time.time()

    def write(row):
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    env = environment()
    write(env)
    if env["fla"] is None:
        print(f"gpu_smoke: fla is missing ({env['fla_missing']}): linear is timed against cuDNN only", flush=True)
    for case in (flash_case, hyper_case, linear_case):
        for row in run_case(case):
            write(dict(row, elapsed_s=round(time.time() - start, 1)))
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
