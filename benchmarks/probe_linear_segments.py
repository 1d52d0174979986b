"""Probe: the additive linear forward with its states walk cut into 1, 2, 4, ... segments, against fla's
`chunk_linear_attn` in the same run, and checked against the float32 PyTorch form.

    PYTHONPATH=. OUT=DIR python benchmarks/probe_linear_segments.py [--lengths 32768,131072] [--segments 1,2,4,8,16]

bf16, batch 1, causal, h32 d64, inputs stored (B, S, H, D) as in bench_linear.py. For each segment count (and
"auto", the library's choice) the identity map unnormalised (fla-linear-raw's twin) and the elu map normalised;
times by do_bench (GPU time; median) and eagerly with a sync per call (bench_linear.py's time_ms, host included).
Rows go to $OUT/linear_segments.jsonl.
"""
import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_linear import chunk_linear_attn, fla, rel_err, time_ms  # noqa: E402

from longattn.kernels.linear import linear_attention  # noqa: E402
from longattn.kernels.linear import triton_additive as add  # noqa: E402

VARIANTS = {"identity-raw": dict(feature_map="identity", normalize=False),
            "elu-norm": dict(feature_map="elu", normalize=True)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--segments", default="1,2,4,8,16,32")
    a = p.parse_args()
    out = open(os.path.join(os.environ.get("OUT", "."), "linear_segments.jsonl"), "a")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": getattr(fla, "__version__", None)}
    auto = add.walk_segments
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    for s in map(int, a.lengths.split(",")):
        torch.manual_seed(s)
        q, k, v = (torch.randn(1, s, 32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        rows = []
        with torch.no_grad():
            refs = {name: add.far_additive_torch(t(q), t(k), t(v), fmap=kw["feature_map"], causal=True, offset=0,
                                                 chunk=64, normalize=kw["normalize"], divide=True, eps=1e-6,
                                                 out_dtype=torch.float32)
                    for name, kw in VARIANTS.items()}
            if fla is not None:
                fn = lambda: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]  # noqa: E731
                rows.append({"impl": "fla-linear-raw", "err": rel_err(t(fn()), refs["identity-raw"]),
                             "ms": triton.testing.do_bench(fn), "ms_eager": time_ms(fn)})
            for seg in ["auto", *a.segments.split(",")]:
                add.walk_segments = auto if seg == "auto" else (lambda N, walks, dev, n=int(seg): n)
                for name, kw in VARIANTS.items():
                    fn = lambda: linear_attention(t(q), t(k), t(v), causal=True, **kw)  # noqa: E731
                    rows.append({"impl": name, "segments": seg, "err": rel_err(fn(), refs[name]),
                                 "ms": triton.testing.do_bench(fn), "ms_eager": time_ms(fn)})
            add.walk_segments = auto
        for r in rows:
            r.update(meta, s=s, h=32, d=64, auto_segments=auto(-(-s // 64), 64, q.device))
            out.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
        del q, k, v, refs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
