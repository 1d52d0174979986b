"""Linear attention on one GPU, one run: our chunked Triton kernels against flash-linear-attention
(`chunk_linear_attn`, `chunk_delta_rule`) when it imports, and recurrent decode against exact decode.

    PYTHONPATH=. python benchmarks/bench_linear.py [--out DIR] [--lengths 4096,...]
        [--decode-lengths 32768,131072] [--skip fwd,fwdbwd,decode]

bf16, batch 1, causal, random normal inputs (fresh per shape) stored (B, S, H, D) as both libraries'
modules produce them: fla reads that layout, ours reads the (B, H, S, D) view of the same storage.
  fwd / fwdbwd, heads×dim 32×64 and 16×128:
    ours-identity-raw   feature_map="identity", normalize=False  ~ fla chunk_linear_attn(normalize=False, scale=1)
    ours-identity-norm  feature_map="identity", normalize=True   ~ fla chunk_linear_attn(normalize=True, scale=1)
    ours-elu-norm       feature_map="elu" (the kind's default), normalised; no fla twin (fla applies maps outside)
    ours-elu-hybrid     64 exact sinks + 256-key exact window + elu far part, one normaliser (HYBRID_DEFAULTS)
    ours-delta          update_rule="delta", identity map (unit-normalised q/k), per-token β, unnormalised
                        ~ fla chunk_delta_rule(use_qk_l2norm_in_kernel=True, scale=1)
    rel_err compares each of ours with its fla twin (same function up to rounding) where there is one.
    Backward: Triton kernels for the additive far part, the exact sinks/window and the delta rule
    (`triton_delta_bwd.py`). --only keeps the named contenders (ours and fla's alike).
  decode, one new token per call against a context of S tokens, h32 d64 (and GQA 9/3):
    ours-linear-step    linear_attention_step, pure elu linear attention (state 64×65 per head)
    ours-hybrid-step    linear_attention_step, 64 sinks + 256-key window exact + elu far part
    flash-decode        longattn flash_attention, one query against S cached keys
    sdpa-cudnn / sdpa-flash
    timed as CUDA-graph replays (no Python launch gaps) and eagerly; tokens/s per layer = 1000 / ms.
Timing (device METHOD.md): CUDA events after warm-up (which also runs autotuning), median of repeats.
Writes <date>-<device>-linear.jsonl (first line: environment) and .md (table) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.linear import (LinearAttentionState, linear_attention, linear_attention_step,  # noqa: E402
                                     linear_attention_step_reference)

import harness  # noqa: E402  (benchmarks/harness.py)

try:
    import fla
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.linear_attn import chunk_linear_attn
except Exception as e:  # not installed, or built for another torch/triton
    fla, FLA_ERROR = None, f"{type(e).__name__}: {e}"[:200]
else:
    FLA_ERROR = None


# bench_linear's timing: 3 warm-up calls, at least 5 repeats; graphs captured after 3 side-stream calls only
time_ms = functools.partial(harness.time_ms, warmup=3, min_reps=5)
time_graph_ms = functools.partial(harness.time_graph_ms, side_warmup=3, first_call=False)
rel_err = harness.rel_err


# ----------------------------------------------------------------------------------------------- prefill

def contenders(beta):
    """name -> (fn(q, k, v) -> out in (B, S, H, D) storage order or ours' (B, H, S, D), fla twin name or None).
    q, k, v are (B, S, H, D); ours take .transpose(1, 2) views."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ours = {
        "ours-identity-raw": (lambda q, k, v: linear_attention(t(q), t(k), t(v), causal=True, feature_map="identity",
                                                               normalize=False), "fla-linear-raw"),
        "ours-identity-norm": (lambda q, k, v: linear_attention(t(q), t(k), t(v), causal=True,
                                                                feature_map="identity"), "fla-linear-norm"),
        "ours-elu-norm": (lambda q, k, v: linear_attention(t(q), t(k), t(v), causal=True, feature_map="elu"), None),
        "ours-elu-hybrid": (lambda q, k, v: linear_attention(t(q), t(k), t(v), causal=True, feature_map="elu",
                                                             sink_tokens=64, local_window=256), None),
        "ours-delta": (lambda q, k, v: linear_attention(t(q), t(k), t(v), causal=True, feature_map="identity",
                                                        update_rule="delta", beta=t(beta),
                                                        normalize=False), "fla-delta"),
    }
    fla_fns = {}
    if fla is not None:
        fla_fns = {
            "fla-linear-raw": lambda q, k, v: t(chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]),
            "fla-linear-norm": lambda q, k, v: t(chunk_linear_attn(q, k, v, scale=1.0, normalize=True)[0]),
            "fla-delta": lambda q, k, v: t(_fla_delta(q, k, v, beta)),
        }
    return ours, fla_fns


def _fla_delta(q, k, v, beta):
    try:
        return chunk_delta_rule(q, k, v, beta, scale=1.0, use_qk_l2norm_in_kernel=True)[0]
    except TypeError:  # an fla without in-kernel normalisation: normalise first (one extra pass, charged to it)
        return chunk_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta, scale=1.0)[0]


args_only = None  # set from --only in main(): the contenders timed (all when None)


def bench_prefill(rec, mode, lengths, shapes):
    for h, d in shapes:
        for s in lengths:
            torch.manual_seed(s + d)
            q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            beta = torch.rand(1, s, h, device="cuda", dtype=torch.bfloat16).sigmoid()
            ours, fla_fns = contenders(beta)
            outs = {}
            for name, fn in list(ours.items()) + [(n, (f, None)) for n, f in fla_fns.items()]:
                if args_only is not None and name not in args_only:
                    continue
                fn = fn[0]
                row = {"kind": mode, "impl": name, "h": h, "d": d, "s": s, "causal": True}
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            outs[name] = fn(q, k, v).float()
                            ms = time_ms(lambda: fn(q, k, v))
                    else:
                        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                        g = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
                        ms = time_ms(lambda: fn(qg, kg, vg).backward(g), budget_ms=500, max_reps=30)
                    row["ms"] = ms
                    row["Mtok_per_s"] = s / ms / 1e3
                except Exception as e:  # one contender failing must not end the run  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    torch.cuda.empty_cache()
                rec.write(row)
            if mode == "fwd":
                for name, (_, twin) in ours.items():
                    if twin in outs and name in outs:
                        rec.write({"kind": "agreement", "impl": name, "twin": twin, "h": h, "d": d, "s": s,
                                   "rel_err": rel_err(outs[name], outs[twin])})
            del q, k, v, outs
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- decode

def decode_state(hkv, d, sinks, window, feature_dim, s):
    """A state as after prefilling s tokens: the far state's content does not change the work done."""
    dt = torch.float32
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=dt)  # noqa: E731
    far = rnd(1, hkv, feature_dim, d + 1).abs()
    return LinearAttentionState(position=s, far=far, sink_k=rnd(1, hkv, sinks, d), sink_v=rnd(1, hkv, sinks, d),
                                window_k=rnd(1, hkv, window, d), window_v=rnd(1, hkv, window, d),
                                window_beta=torch.ones(1, hkv, window, device="cuda", dtype=dt))


def bench_decode(rec, lengths):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn.kernels.flash import flash_attention
    d = 64
    for hq, hkv in ((32, 32), (9, 3)):
        for s in lengths:
            torch.manual_seed(s + hq)
            q, k1, v1 = (torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
            K, V = (torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            fns = {}
            gen = torch.Generator(device="cuda").manual_seed(0)
            hedgehog = {f"{x}_weight": torch.randn(h, d, d, device="cuda", generator=gen) / d ** 0.5
                        for x, h in (("q", hq), ("k", hkv))}
            for name, sinks, window, fmap in (("ours-linear-step", 0, 0, "elu"), ("ours-hybrid-step", 64, 256, "elu"),
                                              ("ours-hybrid-hedgehog-step", 64, 256, "hedgehog"),
                                              ("torch-hybrid-hedgehog-step", 64, 256, "hedgehog")):
                state = decode_state(hkv, d, sinks, window, 2 * d if fmap == "hedgehog" else d, s)
                stepper = linear_attention_step_reference if name.startswith("torch") else linear_attention_step

                def step(state=state, sinks=sinks, window=window, fmap=fmap, stepper=stepper, copy_back=False):
                    out, new = stepper(q, k1, v1, state, causal=True, feature_map=fmap, sink_tokens=sinks,
                                       local_window=window, feature_params=hedgehog if fmap == "hedgehog" else None)
                    if copy_back:  # the state evolves across replays (three copies more per step)
                        state.far.copy_(new.far)
                        state.window_k.copy_(new.window_k)
                        state.window_v.copy_(new.window_v)
                    return out
                # every replay takes the same steady-state step from the same state (the work of any step);
                # "+copy-back" also writes the new state over the old, as runs before 2026-12-04 timed it
                fns[name] = step
                if fmap == "elu":
                    fns[name + "+copy-back"] = functools.partial(step, copy_back=True)
            fns["flash-decode"] = lambda: flash_attention(q, K, V)[0]
            for backend, tag in ((SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn"), (SDPBackend.FLASH_ATTENTION, "sdpa-flash")):
                def sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, K, V, enable_gqa=hq != hkv)
                fns[tag] = sdpa
            with torch.no_grad():
                for name, fn in fns.items():
                    row = {"kind": "decode", "impl": name, "hq": hq, "hkv": hkv, "d": d, "s": s}
                    try:
                        ms = time_graph_ms(fn)
                        eager = time_ms(fn, budget_ms=100, max_reps=300)
                        row.update(ms=ms, tok_per_s=1e3 / ms, eager_ms=eager, eager_tok_per_s=1e3 / eager)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rec.write(row)
            del K, V
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report

def markdown(rec, env):
    lines = [f"# Linear attention benchmark, {env['date']}", "",
             f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
             f"flash-linear-attention {env['fla']}. bf16, batch 1, causal, random normal inputs. "
             "Generated by `benchmarks/bench_linear.py`; ratios are only meaningful within this run.", ""]
    for mode, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        rows = [r for r in rec.rows if r["kind"] == mode]
        if not rows:
            continue
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        lines += [f"## {title} (ms)", "", "| h×d | S | " + " | ".join(impls) + " |",
                  "|---|---|" + "---|" * len(impls)]
        for h, d, s in dict.fromkeys((r["h"], r["d"], r["s"]) for r in rows):
            cells = []
            for impl in impls:
                r = next((r for r in rows if (r["impl"], r["h"], r["d"], r["s"]) == (impl, h, d, s)), None)
                cells.append("—" if r is None else (f"{r['ms']:.3f}" if "ms" in r else "err"))
            lines.append(f"| {h}×{d} | {s} | " + " | ".join(cells) + " |")
        lines.append("")
        ratios = []
        for ours, twin in (("ours-identity-raw", "fla-linear-raw"), ("ours-identity-norm", "fla-linear-norm"),
                           ("ours-delta", "fla-delta")):
            for r in rows:
                if r["impl"] == ours and "ms" in r:
                    t = next((x for x in rows if x["impl"] == twin and (x["h"], x["d"], x["s"]) ==
                              (r["h"], r["d"], r["s"]) and "ms" in x), None)
                    if t:
                        ratios.append(f"{ours} / {twin} at {r['h']}×{r['d']} S={r['s']}: {r['ms'] / t['ms']:.2f}×")
        if ratios:
            lines += [f"Time ratios ({title.lower()}; acceptance: ≤ 1.0× forward, ≤ 1.2× fwd+bwd):", ""]
            lines += [f"- {x}" for x in ratios] + [""]
    agree = [r for r in rec.rows if r["kind"] == "agreement"]
    if agree:
        lines += ["## Agreement with the fla twin (relative error, forward)", ""]
        lines += [f"- {r['impl']} vs {r['twin']}, {r['h']}×{r['d']} S={r['s']}: {r['rel_err']:.2e}" for r in agree]
        lines.append("")
    rows = [r for r in rec.rows if r["kind"] == "decode"]
    if rows:
        lines += ["## Decode: one token against S cached tokens (ms per call, graph replay / eager)", "",
                  "| heads | S | impl | ms (graph) | tokens/s | ms (eager) |", "|---|---|---|---|---|---|"]
        for r in rows:
            if "ms" in r:
                lines.append(f"| {r['hq']}/{r['hkv']} | {r['s']} | {r['impl']} | {r['ms']:.4f} | {r['tok_per_s']:.0f} "
                             f"| {r['eager_ms']:.4f} |")
            else:
                lines.append(f"| {r['hq']}/{r['hkv']} | {r['s']} | {r['impl']} | err: {r['error'][:60]} | | |")
        lines.append("")
    with open(rec.stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--decode-lengths", default="4096,32768,131072")
    ap.add_argument("--shapes", default="32x64,16x128")
    ap.add_argument("--skip", default="")
    ap.add_argument("--only", default="", help="comma-separated contenders to time (default: all)")
    args = ap.parse_args()
    global args_only
    args_only = set(args.only.split(",")) if args.only else None
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU")
    env = harness.gpu_env(datetime.date.today().isoformat())
    env["fla"] = getattr(fla, "__version__", "unknown") if fla is not None else f"not importable ({FLA_ERROR})"
    rec = harness.Recorder(args.out, harness.device_slug(env["gpu"]), "linear")
    rec.write(env)
    print(json.dumps(env), flush=True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    shapes = [tuple(int(y) for y in x.split("x")) for x in args.shapes.split(",") if x]
    skip = set(args.skip.split(","))
    for mode in ("fwd", "fwdbwd"):
        if mode not in skip:
            bench_prefill(rec, mode, lengths, shapes)
    if "decode" not in skip:
        bench_decode(rec, [int(x) for x in args.decode_lengths.split(",") if x])
    from longattn.kernels.linear import triton_additive
    for label, tuner in (("states", triton_additive._states_tuned), ("output", triton_additive._output_tuned)):
        for key, cfg in getattr(tuner, "cache", {}).items():  # what autotuning chose, for the notes
            rec.jsonl.write(json.dumps({"kind": "autotune", "kernel": label, "key": [str(x) for x in key],
                                        "config": str(cfg)}) + "\n")
    markdown(rec, env)


if __name__ == "__main__":
    main()
