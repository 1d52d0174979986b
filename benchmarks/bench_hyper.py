"""HyperAttention (Triton) against torch SDPA's cuDNN and flash backends and our flash kernel, one GPU run.

    python benchmarks/bench_hyper.py [--lengths 4096,...,131072] [--shapes 32x64,16x128] [--no-backward]
                                     [--extra '{"name": {param: value}}'] [--sweep-tiles] [--out-dir benchmarks/results]

bf16, batch 1, random normal inputs, block 256, 256 samples, 7 LSH bits, exact below 4096 keys,
64 sinks, window 256 (variant "default"; "paper" is timed too, forward only). Forward and
forward+backward (hyper's backward kernels; LONGATTN_HYPER_BACKWARD=reference times the
PyTorch reference's vjp instead). Times: triton.testing.do_bench median (CUDA events, warm-up first). Before
timing, every hyper output is checked against the float64 reference on the same pattern (at 8K,
both causal modes), and every timed output is checked finite. --extra times more hyper settings (PARAMS
updated by each entry, e.g. another sampling or key budget) beside the default, forward and forward+backward.
TFLOP/s counts exact attention's 4·S²·D·H (halved for causal) for every row, so for hyper it is "exact-equivalent" throughput.
Writes benchmarks/results/<date>-<device>-hyper.{md,jsonl}; ratios are only meaningful within one run.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import sys

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.flash import flash_attention  # noqa: E402
from longattn.kernels.hyper import build_pattern, hyper_attention, hyper_attention_from_pattern  # noqa: E402
from longattn.kernels.hyper import triton_attention  # noqa: E402
from longattn.kernels.hyper import triton_hash  # noqa: E402
from longattn.kernels.hyper.triton_hash import lsh_rank_triton  # noqa: E402

import harness  # noqa: E402  (benchmarks/harness.py)

PARAMS = dict(block_size=256, sample_size=256, lsh_bits=7, min_seq_len=4096, sink_tokens=64, local_window=256)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for --sweep-tiles
RECT_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2),
                   (256, 64, 8, 2)]
# (rows per program, warps, dot precision); the first is the float32 ("ieee") one the others are compared with
HASH_CANDIDATES = [(64, 4, "ieee"), (256, 8, "ieee"), (128, 4, "tf32x3"), (256, 8, "tf32x3"), (128, 4, "tf32"),
                   (256, 8, "tf32")]
EXACT_CANDIDATES = [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
                    (64, 128, 4, 2), (64, 128, 8, 2)]
# backward: (BLOCK_M, BLOCK_N, warps, stages); for dk / dv BLOCK_N is the resident key tile
DKDV_CANDIDATES = [(32, 128, 4, 2), (32, 128, 8, 2), (32, 128, 8, 1), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2),
                   (64, 64, 8, 2), (64, 32, 8, 1), (32, 32, 8, 1)]
DQ_CANDIDATES = [(128, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 32, 8, 1)]
BLOCKS_CANDIDATES = [(32, 128, 8, 1), (64, 64, 8, 1), (64, 32, 8, 1), (32, 64, 8, 1), (32, 64, 4, 2), (64, 64, 4, 2),
                     (32, 32, 8, 1)]
BWD_RECT_CANDIDATES = [(128, 32, 8, 1), (64, 32, 8, 1), (32, 32, 8, 1), (64, 64, 8, 1), (64, 32, 8, 2), (64, 32, 4, 2),
                       (128, 32, 4, 2)]
SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


device_slug = harness.device_slug


def bench(fn, long_ms_hint=None):
    """Median ms over CUDA-event-timed repetitions, after warm-up (do_bench's arguments are ms)."""
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def keep_fastest(records, base, candidates, apply, time_ms, extra=None):
    """Time each candidate setting: apply(c), then time_ms() (and extra(ms) -> more fields); record it
    (one that fails, e.g. a tile that does not fit in shared memory, is recorded with its error) and
    leave the fastest applied."""
    best = None
    for c in candidates:
        apply(c)
        rec = dict(base, candidate=list(c))
        try:
            rec["ms"] = time_ms()
            rec.update(extra(rec["ms"]) if extra else {})
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            rec["error"] = repr(e)[:200]
        else:
            best = min(best or (rec["ms"], c), (rec["ms"], c))
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if best:
        apply(best[1])


rel_err = functools.partial(harness.rel_err, dtype=torch.float64)


EXTRA = {}  # name -> PARAMS overrides, from --extra


def check_kernel_against_reference(h, d, s, causal, params):
    """Relative error of the bf16 kernel vs the float64 reference on the same pattern."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pattern = build_pattern(q, k, causal=causal, rank_fn=lsh_rank_triton, scale=d ** -0.5, **params)
    out, lse = triton_attention.hyper_forward_triton(q, k, v, pattern, scale=d ** -0.5, causal=causal)
    ref, ref_lse = hyper_attention_from_pattern(q.double(), k.double(), v.double(), pattern,
                                                scale=d ** -0.5, causal=causal)
    return rel_err(out, ref), (lse.double() - ref_lse.double()).abs().max().item()


def check_backward_against_reference(h, d, s, causal):
    """Relative errors of the bf16 backward kernels' dq/dk/dv vs the float64 reference's on the same pattern."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, _ = hyper_attention(q, k, v, causal=causal, **PARAMS)
    got = torch.autograd.grad(out, (q, k, v), do)
    pattern = build_pattern(q, k, causal=causal, rank_fn=lsh_rank_triton, scale=d ** -0.5, **PARAMS)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = hyper_attention_from_pattern(q64, k64, v64, pattern, scale=d ** -0.5, causal=causal)
    want = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    return {f"rel_err_d{n}": rel_err(a, b) for n, a, b in zip("qkv", got, want)}


def make_inputs(h, d, s, grad):
    mk = lambda: torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)
    return mk(), mk(), mk()


def runners(h, d, s, causal, backward):
    """name -> zero-argument callable to time."""
    q, k, v = make_inputs(h, d, s, backward)
    g = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
    out = {}

    def sdpa(backend):
        def fwd():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fwd

    def hyper(**params):
        return lambda: hyper_attention(q, k, v, causal=causal, **dict(PARAMS, **params))[0]

    fwds = {"hyper": hyper(), "hyper_paper": hyper(variant="paper"),
            **{name: hyper(**params) for name, params in EXTRA.items()},
            "flash": lambda: flash_attention(q, k, v, causal=causal)[0],  # our exact kernel
            "sdpa_cudnn": sdpa(SDPA["cudnn"]), "sdpa_flash": sdpa(SDPA["flash"])}
    if not backward:
        for name, fn in fwds.items():
            out[name] = (fn, None)
        return out
    for name in ("hyper", *EXTRA, "flash", "sdpa_cudnn", "sdpa_flash"):
        fn = fwds[name]
        out[name] = (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), g), fn)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--shapes", default="32x64,16x128", help="heads x head_dim")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--extra", default="", help='JSON {name: {param: value}}: more hyper settings to time')
    ap.add_argument("--sweep-tiles", action="store_true",
                    help="time forward tile candidates at 32K first, keep the best")
    ap.add_argument("--sweep-window-tiles", action="store_true",
                    help="the non-causal exact part's tiles (sinks + window), timed non-causal at 131K")
    ap.add_argument("--sweep-bwd-tiles", nargs="?", const="dkdv,dq,blocks,samples", default="",
                    help="the backward's tiles, timed causal forward+backward at 32K: the tables named (default all "
                         "of dkdv,dq,blocks,samples)")
    ap.add_argument("--sweep-hash", action="store_true",
                    help="time the LSH kernel's tile candidates at 131K, keep the best")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    EXTRA.update(json.loads(args.extra) if args.extra else {})
    lengths = [int(x) for x in args.lengths.split(",")]
    shapes = [tuple(int(y) for y in x.split("x")) for x in args.shapes.split(",")]
    name = torch.cuda.get_device_name()
    env = {"kind": "env", "device": name, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "params": PARAMS}
    records = [env]
    print(json.dumps(env), flush=True)

    for h, d in shapes:
        for causal in (False, True):
            for variant, params in (("default", PARAMS), ("paper", dict(PARAMS, variant="paper")),
                                    *((name, dict(PARAMS, **extra)) for name, extra in EXTRA.items())):
                rec = {"kind": "check", "h": h, "d": d, "s": 8192, "causal": causal, "variant": variant}
                try:  # a failure here is reported, and the timings still run
                    err, lse_err = check_kernel_against_reference(h, d, 8192, causal, params)
                    rec.update(rel_err_vs_reference=err, lse_max_abs_err=lse_err, ok=err < 2e-2 and lse_err < 5e-2)
                except Exception as e:
                    rec.update(error=repr(e)[:300], ok=False)
                records.append(rec)
                print(json.dumps(rec), flush=True)

    for h, d in shapes:
        for causal in (False, True):
            rec = {"kind": "check_backward", "h": h, "d": d, "s": 8192, "causal": causal}
            try:
                rec.update(check_backward_against_reference(h, d, 8192, causal))
                rec["ok"] = max(rec["rel_err_dq"], rec["rel_err_dk"], rec["rel_err_dv"]) < 3e-2
            except Exception as e:
                rec.update(error=repr(e)[:300], ok=False)
            records.append(rec)
            print(json.dumps(rec), flush=True)

    if args.sweep_tiles:
        for h, d in shapes:
            # the rectangle kernel first (the exact part at its current tiles), then the exact part
            for table, kind, candidates in ((triton_attention.TILES, "tiles", RECT_CANDIDATES),
                                            (triton_attention.TILES_EXACT, "tiles_exact", EXACT_CANDIDATES)):
                keep_fastest(records, dict(kind=kind, h=h, d=d, timed="forward at 32K, both causal modes, summed"),
                             candidates, lambda c, table=table: table.__setitem__(max(64, d), c),
                             lambda: sum(bench(runners(h, d, 32768, c, False)["hyper"][0]) for c in (False, True)))
    if args.sweep_window_tiles:
        for h, d in shapes:
            keep_fastest(records, dict(kind="tiles_window", h=h, d=d, timed="non-causal forward at 131K"),
                         EXACT_CANDIDATES, lambda c: triton_attention.TILES_WINDOW.__setitem__(max(64, d), c),
                         lambda: bench(runners(h, d, 131072, False, False)["hyper"][0]))
    if args.sweep_hash:
        for h, d in shapes:
            x = torch.randn(1, h, 131072, d, device="cuda", dtype=torch.bfloat16)
            planes = torch.randn(h, d, PARAMS["lsh_bits"], device="cuda")
            triton_hash.HASH_TILE = HASH_CANDIDATES[0]  # float32 products: the reference's buckets
            want = lsh_rank_triton(x, planes, 1)
            keep_fastest(records, dict(kind="hash_tile", h=h, d=d, timed="one 131K tensor"), HASH_CANDIDATES,
                         lambda c: setattr(triton_hash, "HASH_TILE", c),
                         lambda: bench(lambda: lsh_rank_triton(x, planes, 1)),
                         lambda ms: {"rows_unlike_ieee": int((lsh_rank_triton(x, planes, 1) != want).sum()),
                                     "gb_per_s": x.numel() * 2 / ms / 1e6})
    if args.sweep_bwd_tiles and not args.no_backward:
        tables = {"dkdv": (triton_attention.TILES_BWD_DKDV, DKDV_CANDIDATES),  # the exact part's, key-major
                  "dq": (triton_attention.TILES_BWD_DQ, DQ_CANDIDATES),  # the exact part's, row-major
                  "blocks": (triton_attention.TILES_BWD_BLOCKS, BLOCKS_CANDIDATES),  # key-major, dq atomics
                  "samples": (triton_attention.TILES_BWD, BWD_RECT_CANDIDATES)}  # row-major, dk / dv atomics
        for h, d in shapes:
            for table_name in args.sweep_bwd_tiles.split(","):
                table, candidates = tables[table_name]
                keep_fastest(records, dict(kind=f"tiles_bwd_{table_name}", h=h, d=d,
                                           timed="causal forward+backward at 32K"),
                             candidates, lambda c, table=table: table.__setitem__(max(64, d), c),
                             lambda: bench(runners(h, d, 32768, True, True)["hyper"][0]))

    rows = []
    for h, d in shapes:
        for s in lengths:
            for causal in (False, True):
                flops = 4 * s * s * d * h / (2 if causal else 1)
                for mode in ("fwd",) + (() if args.no_backward else ("fwd+bwd",)):
                    try:
                        cases = runners(h, d, s, causal, mode == "fwd+bwd")
                    except torch.OutOfMemoryError:
                        continue
                    for impl, (fn, fwd) in cases.items():
                        rec = {"kind": "time", "impl": impl, "mode": mode, "h": h, "d": d, "s": s, "causal": causal,
                               "hash_tile": list(triton_hash.HASH_TILE),
                               "tiles": list(triton_attention._tiles(d, d)),
                               "tiles_exact": list(triton_attention._tiles(d, d, triton_attention.TILES_EXACT)),
                               "tiles_window": list(triton_attention._tiles(d, d, triton_attention.TILES_WINDOW)),
                               "tiles_bwd": list(triton_attention._tiles(d, d, triton_attention.TILES_BWD)),
                               "tiles_bwd_dq": list(triton_attention._tiles(d, d, triton_attention.TILES_BWD_DQ)),
                               "tiles_bwd_dkdv": list(triton_attention._tiles(d, d, triton_attention.TILES_BWD_DKDV)),
                               "tiles_bwd_blocks": list(triton_attention._tiles(d, d, triton_attention.TILES_BWD_BLOCKS))}
                        try:
                            res = (fwd or fn)()
                            if not torch.isfinite(res).all():
                                raise RuntimeError("non-finite output")
                            rec["ms"] = bench(fn)
                            rec["tflops_exact_equiv"] = flops * (3.5 if mode == "fwd+bwd" else 1) / rec["ms"] / 1e9
                        except Exception as e:  # OOM, or a kernel that fails: recorded, the run goes on
                            rec["error"] = repr(e)[:200]
                        torch.cuda.empty_cache()
                        records.append(rec)
                        rows.append(rec)
                        print(json.dumps(rec), flush=True)
                        save(records, rows, env, args.out_dir, name)

    print(save(records, rows, env, args.out_dir, name))


def save(records, rows, env, out_dir, device_name):
    """Write <date>-<device>-hyper.jsonl and .md (called after every timing, so a run cut short by a time
    limit keeps what it measured); returns the table."""
    base = os.path.join(out_dir, f"{datetime.date.today().isoformat()}-{device_slug(device_name)}-hyper")
    os.makedirs(out_dir, exist_ok=True)
    with open(base + ".jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    table = format_table(rows, env, [r for r in records if r["kind"] in ("check", "check_backward")])
    with open(base + ".md", "w") as f:
        f.write(table)
    return table


def format_table(rows, env, checks):
    lines = [f"# HyperAttention vs SDPA on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; bf16, batch 1; "
             f"hyper: {json.dumps(PARAMS)}; more settings: {json.dumps(EXTRA)}. Times are medians in ms; "
             "'x cuDNN' = cuDNN time / each hyper setting's time in this run.",
             "", "Kernels vs the float64 reference on the same pattern (8K, relative error):", ""]
    for c in checks:
        what = f"h{c['h']}d{c['d']} {'causal' if c['causal'] else 'non-causal'}"
        if "error" in c:
            lines.append(f"- {c['kind']} {what}: FAILED {c['error']}")
        elif c["kind"] == "check":
            lines.append(f"- forward {what} {c['variant']}: out {c['rel_err_vs_reference']:.1e}, "
                         f"lse max abs {c['lse_max_abs_err']:.1e}")
        else:
            lines.append(f"- backward {what}: dq {c['rel_err_dq']:.1e}, dk {c['rel_err_dk']:.1e}, dv {c['rel_err_dv']:.1e}")
    lines.append("")
    key = lambda r: (r["h"], r["d"], r["mode"], r["causal"], r["s"])
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["impl"]] = r.get("ms", math.nan)
    ours = ["hyper", "hyper_paper", *EXTRA]
    impls = [*ours, "flash", "sdpa_cudnn", "sdpa_flash"]
    lines.append("| heads x dim | mode | causal | S | " + " | ".join(impls) + " | "
                 + " | ".join(f"{i} x cuDNN" for i in ours) + " | hyper x our flash |")
    lines.append("|---|---|---|---|" + "---|" * (len(impls) + len(ours) + 1))
    for (h, d, mode, causal, s), t in sorted(by.items()):
        ratios = " | ".join(f"{t.get('sdpa_cudnn', math.nan) / t.get(i, math.nan):.2f}" for i in ours)
        ratios += f" | {t.get('flash', math.nan) / t.get('hyper', math.nan):.2f}"
        cells = " | ".join(f"{t[i]:.3f}" if i in t and not math.isnan(t[i]) else "—" for i in impls)
        lines.append(f"| {h}x{d} | {mode} | {causal} | {s} | {cells} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
