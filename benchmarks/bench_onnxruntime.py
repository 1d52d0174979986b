"""CPU attention in onnxruntime, one run: our ai.longattn nodes (custom-op library) against
com.microsoft MultiHeadAttention and the same attention as decomposed ONNX ops.

    python benchmarks/bench_onnxruntime.py [--lengths 1024,2048,...] [--heads 8] [--kv-heads 8] [--dim 64]
        [--causal] [--kinds flash,hyper,linear] [--library NAME=PATH ...] [--out FILE]

Batch 1, fp32, no mask, all intra-op threads of the machine; non-causal unless --causal
(MultiHeadAttention's unidirectional=1). Each graph is its own model with the attention alone
(MultiHeadAttention takes (B, S, H·D); the others (B, H, S, D)). With --kv-heads below --heads
(GQA), MultiHeadAttention, which has no GQA, runs on K and V repeated to every query head (the
repeat done beforehand, outside the timing); our nodes take the K/V heads as they are.
The library is built from this checkout with LONGATTN_ORT_CXXFLAGS (default -O3 -march=native)
into a folder of its own per flags; --library NAME=PATH adds our nodes from another built library
(an older build, another vector width) to the same run, named ai.longattn.<Node>[NAME].
Timing: after one warm-up each, rounds that run every case once in turn (so load from other
processes on a shared machine falls on all of them alike); median and min over rounds. Writes one JSON object
a line (the first line is the environment) and prints a table; ratios are only meaningful
within one run. The hyper and linear rows run the kernels' default parameters (HyperAttention's
default variant: 64 exact sink keys and a 256-key local window, LSH blocks of 256, 256 samples,
7 bits, exact below 4096 keys; linear: elu+1 features, no sinks or window): approximations.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads must not spin beside the kernels
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F = TensorProto.FLOAT
OPSET = 17


def mha_model(S, H, D, causal=False):
    ins = [helper.make_tensor_value_info(n, F, [1, S, H * D]) for n in "qkv"]
    node = helper.make_node("MultiHeadAttention", list("qkv"), ["out"], domain="com.microsoft", num_heads=H,
                            unidirectional=int(causal))
    g = helper.make_graph([node], "mha", ins, [helper.make_tensor_value_info("out", F, [1, S, H * D])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def decomposed_model(S, H, D):  # non-causal, MHA only
    ins = [helper.make_tensor_value_info(n, F, [1, H, S, D]) for n in "qkv"]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["out"])]
    g = helper.make_graph(nodes, "decomposed", ins, [helper.make_tensor_value_info("out", F, [1, H, S, D])],
                          [numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def longattn_model(kind, S, H, D, causal=False, Hkv=None):
    from longattn.kernels.dispatch import Band, encode_plan
    from longattn.rewriter.onnx_functions import NODE_FOR_KIND, attention_function
    op = NODE_FOR_KIND[kind]
    ins = [helper.make_tensor_value_info(n, F, [1, H if n == "q" else Hkv or H, S, D]) for n in "qkv"]
    node = helper.make_node(op, ["q", "k", "v", "mask"], ["out"], domain="ai.longattn", scale=D ** -0.5,
                            causal=int(causal), plan=encode_plan([Band(kind)]))
    g = helper.make_graph([node], op, ins, [helper.make_tensor_value_info("out", F, [1, H, S, D])],
                          [numpy_helper.from_array(np.array(0, np.float32), "mask")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.longattn", 1)])
    m.functions.append(attention_function(op, F, OPSET))
    return m


def time_session(sess, feeds, reps):
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


VECTOR_FEATURES = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "asimd", "sve")


def cpu_info():
    """The CPU's model name and the vector features this library's code paths care about (/proc/cpuinfo)."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return model, [v for v in VECTOR_FEATURES if v in flags]


def library_flags(path):
    """The compiler flags a library was built with, from the stamp the build writes beside it."""
    try:
        with open(path + ".build") as f:
            return " ".join(json.load(f)["flags"])
    except (OSError, ValueError, KeyError):
        return None


def environment(threads, library, args, others):
    cpu, features = cpu_info()
    return {"kind": "environment", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(), "cpu": cpu, "cpu_vector_features": features,
            "cores": os.cpu_count(), "intra_op_threads": threads,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "compiler": build_compiler_version(), "library": library,
            "library_flags": library_flags(library),
            "other_libraries": {n: {"path": p, "flags": library_flags(p)} for n, p in others.items()},
            "dtype": "float32", "batch": 1, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
            "causal": args.causal, "load_average_before": os.getloadavg()}


def build_compiler_version():
    import subprocess

    from longattn.backends.onnxruntime.build import BuildError, compiler
    try:
        return subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except (BuildError, OSError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, help="K/V heads (GQA; default --heads)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--kinds", default="flash,hyper,linear", help="our nodes to time")
    p.add_argument("--library", action="append", default=[], metavar="NAME=PATH",
                   help="also time our nodes from this built library")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", help="JSONL file (default benchmarks/results/<date>-cpu-onnxruntime.jsonl)")
    args = p.parse_args(argv)
    from longattn.backends.onnxruntime import default_build_dir
    from longattn.backends.onnxruntime.build import build
    flags = os.environ.get("LONGATTN_ORT_CXXFLAGS", "-O3 -march=native")
    # a folder per flags: a bench of another vector width must not replace the library sessions load
    library = build(os.path.join(default_build_dir(), "bench", re.sub(r"[^\w.=-]+", "_", flags)), quiet=True)
    others = dict(item.split("=", 1) for item in args.library)
    H, D, Hkv = args.heads, args.dim, args.kv_heads or args.heads
    if H % Hkv:
        p.error("--heads must be a multiple of --kv-heads")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{datetime.date.today().isoformat()}-cpu-onnxruntime.jsonl")
    rows = [environment(args.threads, library, args, others)]
    print(json.dumps(rows[0]))
    warm = {n: np.ones((1, 512, H * D), np.float32) for n in "qkv"}  # first-run effects of the process
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    time_session(ort.InferenceSession(mha_model(512, H, D, args.causal).SerializeToString(), options,
                                      providers=["CPUExecutionProvider"]), warm, 3)
    for S in [int(x) for x in args.lengths.split(",")]:
        reps = 7 if S <= 2048 else 5 if S <= 4096 else 3
        rng = np.random.default_rng(0)
        bhsd = {n: rng.standard_normal((1, H if n == "q" else Hkv, S, D), dtype=np.float32) for n in "qkv"}
        full = {n: np.repeat(x, H // x.shape[1], axis=1) for n, x in bhsd.items()}  # K/V heads repeated (GQA)
        bsd = {n: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(1, S, H * D)) for n, x in full.items()}
        scores_bytes = H * S * S * 4
        cases = [("com.microsoft.MultiHeadAttention", mha_model(S, H, D, args.causal), bsd, 1.2 * scores_bytes, None)]
        if not args.causal:
            cases.append(("decomposed", decomposed_model(S, H, D), full, 3.2 * scores_bytes, None))
        for kind in args.kinds.split(","):
            op = {"flash": "FlashAttention", "hyper": "HyperAttention", "linear": "LinearAttention"}[kind]
            model = longattn_model(kind, S, H, D, args.causal, Hkv)
            cases.append((f"ai.longattn.{op}", model, bhsd, 0, library))
            cases += [(f"ai.longattn.{op}[{n}]", model, bhsd, 0, path) for n, path in others.items()]
        result = {"kind": "timing", "seq_len": S, "heads": H, "head_dim": D, "rounds": reps, "ms": {}, "ms_min": {}}
        sessions, outputs = {}, {}
        for name, model, feeds, needs, lib in cases:
            if needs > 0.8 * available_bytes():
                result["ms"][name] = result["ms_min"][name] = None
                result.setdefault("skipped", {})[name] = f"needs ~{needs / 2**30:.0f} GiB for the S x S scores"
                continue
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            # the sessions of one length stay alive to interleave their runs: idle pools must not spin
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if lib:
                options.register_custom_ops_library(lib)
            sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            outputs[name] = sess.run(None, feeds)[0]  # warm-up
            sessions[name] = (sess, feeds)
        mha_out = outputs.get("com.microsoft.MultiHeadAttention")
        if mha_out is not None:  # the exact nodes must agree with MultiHeadAttention, or their times mean nothing
            mha_out = mha_out.reshape(1, S, H, D).transpose(0, 2, 1, 3)
            result["max_abs_diff_vs_mha"] = {n: float(np.abs(o - mha_out).max()) for n, o in outputs.items()
                                             if n.startswith("ai.longattn.FlashAttention")}
        # rounds interleave the cases, so a neighbour's load on a shared machine hits them alike
        times = {name: [] for name in sessions}
        for _ in range(reps):
            for name, (sess, feeds) in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
        for name, t in times.items():
            result["ms"][name] = round(statistics.median(t), 2)
            result["ms_min"][name] = round(min(t), 2)
        del sessions
        mha = result["ms"]["com.microsoft.MultiHeadAttention"]
        result["speedup_vs_mha"] = {k: round(mha / v, 3) for k, v in result["ms"].items() if v and mha}
        mha_min = result["ms_min"]["com.microsoft.MultiHeadAttention"]
        result["speedup_vs_mha_min"] = {k: round(mha_min / v, 3) for k, v in result["ms_min"].items() if v and mha_min}
        rows.append(result)
        print(json.dumps(result), flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    print_table(rows)
    print(f"wrote {out}")
    return 0


def print_table(rows):
    names = list(rows[1]["ms"])
    short = {n: n.split(".")[-1] for n in names}
    print("| length | " + " | ".join(short[n] + " ms (x MHA)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in rows[1:]:
        cells = []
        for n in names:
            ms = r["ms"][n]
            cells.append("n/a" if ms is None else f"{ms:.1f} ({r['speedup_vs_mha'].get(n, float('nan')):.2f}x)")
        print(f"| {r['seq_len']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
