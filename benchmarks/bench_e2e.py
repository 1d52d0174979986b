"""Whole-model prefill on one GPU, one run: eager PyTorch vs torch.compile (inductor) vs
torch.compile(backend="longattn") with an all-flash policy and with the built-in default policy.

    PYTHONPATH=. python benchmarks/bench_e2e.py [--lengths 8192,32768,131072] [--inductor-lengths 8192,32768]
                                                [--out DIR]

The model is a Llama shaped like SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads of 64,
random weights, bf16), batch 1, prefill of S tokens without a KV cache (`use_cache=False`),
`LlamaModel` (no LM head), eager attention implementation "sdpa" (what transformers picks).
Each compiled variant is compiled once with a dynamic sequence length (so one compile serves every
length; compile_s is its first call), except longattn-default-static: `torch.compile(model, backend="longattn")`
as the README shows it, static, compiled once per length (compile_s at each length). Timing (device METHOD.md): CUDA events, one warm-up, median of
repeats (fewer at long lengths). Every variant's output is compared with eager's (relative error in
bf16: flash is exact, so it stays at rounding level; the default policy's hyper/linear bands are
approximations and their error says so). A variant that runs out of memory is recorded as "oom".
Writes <date>-<device>-e2e.{jsonl,md} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time

import torch

FLASH_POLICY = {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}


def build_model(layers: int = 30, device: str = "cuda", dtype=torch.bfloat16):
    """A Llama shaped like SmolLM2-135M, random weights, attention implementation "sdpa"."""
    from transformers import LlamaConfig, LlamaModel
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=262144,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaModel(config).to(device, dtype).eval()


def variants(model, inductor_lengths):
    def compiled(dynamic=True, **kw):
        c = torch.compile(model, dynamic=dynamic, **kw)
        return lambda ids: c(input_ids=ids, use_cache=False).last_hidden_state

    yield "eager", (lambda ids: model(input_ids=ids, use_cache=False).last_hidden_state), None
    yield "inductor", compiled(), inductor_lengths
    yield "longattn-flash", compiled(backend="longattn", options={"policy": FLASH_POLICY}), None
    yield "longattn-default", compiled(backend="longattn"), None
    # the README's call as a user makes it: a static graph per length (dynamic=False keeps dynamo from turning
    # the second length dynamic), the lengths written into its ops
    yield "longattn-default-static", compiled(dynamic=False, backend="longattn"), None
    # the rewrite alone, without inductor's fusions (and its compile time): aot_eager inner backend
    yield "longattn-flash-aot", compiled(backend="longattn", options={"policy": FLASH_POLICY, "inner": "aot_eager"}), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--inductor-lengths", default="8192,32768",
                    help="lengths for plain inductor (its S x S mask needs 32 GiB at 131K)")
    ap.add_argument("--variants", default="eager,inductor,longattn-flash,longattn-default,longattn-default-static",
                    help="also: longattn-flash-aot (inner backend aot_eager)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    chosen = set(args.variants.split(","))
    lengths = [int(x) for x in args.lengths.split(",")]
    inductor_lengths = {int(x) for x in args.inductor_lengths.split(",") if x}

    import transformers
    import triton

    import longattn
    from longattn.bench.measure import time_calls  # CUDA events around each call, the median
    env = {"kind": "env", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), "model": "llama smollm2-135m shape, 30 layers, random, bf16"}
    rows = [env]
    print(json.dumps(env), flush=True)
    model = build_model()
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = {s: torch.randint(0, 49152, (1, s), device="cuda", generator=g) for s in lengths}
    reference = {}
    with torch.no_grad():
        for name, fn, only in variants(model, inductor_lengths):
            if name not in chosen:
                continue
            first = True
            for s in lengths:
                if only is not None and s not in only:
                    continue
                row = {"kind": "prefill", "impl": name, "s": s}
                try:
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    out = fn(inputs[s])
                    torch.cuda.synchronize()
                    if first or name.endswith("-static"):
                        row["compile_s"] = round(time.perf_counter() - t0, 1)
                        first = False
                    reps = 10 if s <= 8192 else 5 if s <= 32768 else 3
                    row["ms"], _, _ = time_calls(lambda: fn(inputs[s]), torch.device("cuda"), reps, math.inf)
                    row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                    if name == "eager":
                        reference[s] = out.float()
                    elif s in reference:
                        ref = reference[s]
                        row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
                    if name.startswith("longattn"):
                        report = longattn.last_report()
                        row["sites"] = {k: report.count(k) for k in ("rewritten", "exact", "skipped")}
                    del out
                except torch.OutOfMemoryError as e:
                    row["error"] = "oom: " + str(e).split("\n")[0][:120]
                except Exception as e:  # record and go on: one variant must not sink the run
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows, args.out, env)
    return 0


def write(rows, out_dir, env):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{env['date']}-{env['device'].split()[1].lower()}-e2e")
    with open(stem + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    eager = {r["s"]: r["ms"] for r in rows if r.get("impl") == "eager" and "ms" in r}
    lines = [f"# Whole-model prefill, {env['device']}, {env['date']}",
             "", f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; {env['model']}, "
             "batch 1, no KV cache. Ratio = eager ms / this ms (higher is faster).", "",
             "| impl | S | ms | × eager | peak GB | rel err vs eager | compile s |", "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        if "ms" in r:
            ratio = f"{eager[r['s']] / r['ms']:.2f}" if r["s"] in eager else "—"
            err = f"{r['rel_err']:.2e}" if "rel_err" in r else "—"
            lines.append(f"| {r['impl']} | {r['s']} | {r['ms']:.1f} | {ratio} | {r['peak_GB']} | {err} | "
                         f"{r.get('compile_s', '')} |")
        else:
            lines.append(f"| {r['impl']} | {r['s']} | {r['error']} | | | | |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
