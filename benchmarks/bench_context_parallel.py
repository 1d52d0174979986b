"""Context parallel attention on N GPUs against one GPU and against torch's context-parallel SDPA.

    torchrun --nproc_per_node=N benchmarks/bench_context_parallel.py --lengths 131072 262144 524288 --out DIR
    (CPU smoke: torchrun --nproc_per_node=2 benchmarks/bench_context_parallel.py --device cpu --backend gloo
     --lengths 256 --out /tmp/cp)

Per length and kind, bf16, batch 1, heads x dim 32 x 64 (--heads/--head-dim), random inputs:
  flash causal (fwd and fwd+bwd): ours = ring attention (`ring_flash_attention`, zigzag shards);
      torch_cp = SDPA under `torch.distributed.tensor.experimental.context_parallel` (its load balancing
      on, its default rotate method) on a 1-D DeviceMesh; plus both kernels on one GPU (rank 0 alone).
  hyper causal (fwd): ours = `hyper_attention_cp` (k/v and query hash ranks all-gathered, the global pattern
      on every rank, local query rows computed).
  linear (fwd): ours = `linear_attention_cp`, the recommended hybrid (64 sinks, 256-key window, elu).
Timing: CUDA events (perf_counter on CPU), barrier before each repetition, warm-up, median of --reps;
a sharded time is the slowest rank's median. TFLOP/s (flash only) counts 2·S²·H·D per causal forward,
3.5x that for fwd+bwd. Scaling efficiency = T1 / (N · TN) against the same implementation on one GPU
(ours against our single-GPU kernel, torch_cp against single-GPU SDPA); "no T1" when T1 failed (OOM).
Each configuration fails soft: an OOM or error is recorded and the run goes on.
Rank 0 writes <date>-<device>-context-parallel-w<N>.jsonl (first line: environment) and .md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.kernels.flash import flash_attention  # noqa: E402
from longattn.kernels.hyper import hyper_attention  # noqa: E402
from longattn.kernels.linear import HYBRID_DEFAULTS, linear_attention  # noqa: E402
from longattn.kernels.parallel import (hyper_attention_cp, linear_attention_cp, ring_flash_attention,  # noqa: E402
                                       shard_sequence)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--kinds", nargs="+", default=["flash", "hyper", "linear"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backend", default=None, help="nccl (cuda) or gloo (cpu) by default")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="flash modes to time (hyper and linear: forward)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU baselines (T1)")
    p.add_argument("--no-torch-cp", action="store_true", help="skip torch's context-parallel SDPA")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args()


class Bench:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dev = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
            else torch.device("cpu")
        self.dtype = DTYPES[args.dtype]
        self.rows = []

    # ------------------------------------------------------------------------------------------ timing
    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def time_ms(self, fn, group_wide=True):
        """Median ms of fn over --reps after --warmup; group_wide: barrier before each repetition."""
        for _ in range(self.args.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.args.reps):
            if group_wide:
                dist.barrier()
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize(self.dev)
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)

    def inputs(self, S, seed, shard, lb, grad):
        """Random q, k, v (B=1, H, S or S/N, D); the same global tensors on every rank for a seed."""
        g = torch.Generator(device=self.dev).manual_seed(seed)
        H, D = self.args.heads, self.args.head_dim
        out = []
        for _ in range(3):
            x = torch.randn(1, H, S, D, generator=g, device=self.dev, dtype=self.dtype)
            if shard:
                x = shard_sequence(x, self.rank, self.world, 2, lb).contiguous()
            out.append(x.requires_grad_(grad))
        return out

    # ------------------------------------------------------------------------------------------ cases
    def measure(self, label, fn, all_ranks=True):
        """Run a timing on every rank (all_ranks) or rank 0 alone; returns ms (slowest rank), or a status string.
        Status is agreed by all ranks so nobody enters the next collective alone."""
        ms, status = float("nan"), "ok"
        if all_ranks or self.rank == 0:
            try:
                ms = self.time_ms(fn, group_wide=all_ranks)
            except torch.OutOfMemoryError:
                status = "oom"
            except Exception as e:  # noqa: BLE001 - fail soft, recorded
                status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                if self.rank == 0:
                    traceback.print_exc()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        flag = torch.tensor([0.0 if status == "ok" else 1.0, ms if status == "ok" else 0.0], device=self.dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if status == "ok" and flag[0] > 0:
            status = "failed on another rank"
        print(f"[{time.strftime('%H:%M:%S')}] rank {self.rank} {label}: {status} "
              f"{flag[1].item():.3f} ms", flush=True) if self.rank == 0 else None
        return float(flag[1]) if status == "ok" else status

    def fwd_bwd(self, fn, q, k, v):
        def run():
            out = fn(q, k, v)
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None
        return run

    def case(self, S, kind, impl, mode, single, fn, lb="zigzag"):
        """Time one configuration: fn(q, k, v) -> out, on shards (single=False) or the whole sequence on rank 0."""
        grad = mode == "fwd+bwd"
        label = f"S={S} {kind} {impl} {mode} {'1 GPU' if single else f'{self.world} ranks'}"

        def build():
            q, k, v = self.inputs(S, 0, not single, lb, grad)
            if grad:
                return self.fwd_bwd(fn, q, k, v)
            def run():
                with torch.no_grad():
                    fn(q, k, v)
            return run
        run = None
        if not single or self.rank == 0:
            try:
                run = build()
            except torch.OutOfMemoryError:
                run = _raise_oom
        res = self.measure(label, run, all_ranks=not single)
        del run
        self.record(S, kind, impl, mode, 1 if single else self.world, res)

    def record(self, S, kind, impl, mode, n, res):
        ms = res if isinstance(res, float) else None
        H, D = self.args.heads, self.args.head_dim
        flops = 2.0 * S * S * H * D * (3.5 if mode == "fwd+bwd" else 1.0) if kind == "flash" else None
        self.rows.append(dict(seq_len=S, kind=kind, impl=impl, mode=mode, gpus=n, heads=H, head_dim=D,
                              dtype=self.args.dtype, ms=ms, status="ok" if ms is not None else res,
                              tflops=(flops / (ms * 1e-3) / 1e12) if (ms and flops) else None))

    def torch_cp(self, S, mode, mesh):
        """SDPA under torch's context_parallel: buffers sharded in place by the context manager."""
        from torch.distributed.tensor.experimental import context_parallel
        grad = mode == "fwd+bwd"
        label = f"S={S} flash torch_cp {mode} {self.world} ranks"
        try:
            q, k, v = self.inputs(S, 0, False, None, False)
        except torch.OutOfMemoryError:
            self.record(S, "flash", "torch_cp", mode, self.world, self.measure(label, _raise_oom))
            return
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
            sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)
            if grad:
                run = self.fwd_bwd(sdpa, qs, ks, vs)
            else:
                def run():
                    with torch.no_grad():
                        sdpa(qs, ks, vs)
            res = self.measure(label, run)
        del q, k, v, qs, ks, vs
        self.record(S, "flash", "torch_cp", mode, self.world, res)

    def run(self):
        a = self.args
        mesh = None
        if not a.no_torch_cp:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(self.dev.type, (self.world,), mesh_dim_names=("cp",))
        hyper_kw = dict(causal=True)
        lin_kw = dict(HYBRID_DEFAULTS, causal=True)
        for S in a.lengths:
            if "flash" in a.kinds:
                for mode in a.modes:
                    self.case(S, "flash", "longattn", mode, False,
                              lambda q, k, v: ring_flash_attention(q, k, v, causal=True, load_balance="zigzag")[0])
                    if not a.no_torch_cp:
                        self.torch_cp(S, mode, mesh)
                    if not a.no_single:
                        self.case(S, "flash", "longattn", mode, True,
                                  lambda q, k, v: flash_attention(q, k, v, causal=True)[0])
                        self.case(S, "flash", "torch_sdpa", mode, True,
                                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            if "hyper" in a.kinds:
                self.case(S, "hyper", "longattn", "fwd", False,
                          lambda q, k, v: hyper_attention_cp(q, k, v, load_balance="zigzag", **hyper_kw)[0])
                if not a.no_single:
                    self.case(S, "hyper", "longattn", "fwd", True, lambda q, k, v: hyper_attention(q, k, v, **hyper_kw)[0])
            if "linear" in a.kinds:
                self.case(S, "linear", "longattn", "fwd", False,
                          lambda q, k, v: linear_attention_cp(q, k, v, load_balance="contiguous", **lin_kw),
                          lb="contiguous")
                if not a.no_single:
                    self.case(S, "linear", "longattn", "fwd", True, lambda q, k, v: linear_attention(q, k, v, **lin_kw))
        self.efficiency()

    def efficiency(self):
        """T1 / (N · TN) per sharded row, T1 = the same implementation on one GPU (torch_cp: single SDPA)."""
        for r in self.rows:
            if r["gpus"] == 1:
                continue
            base_impl = "torch_sdpa" if r["impl"] == "torch_cp" else r["impl"]
            t1 = next((b for b in self.rows if b["gpus"] == 1 and b["impl"] == base_impl and b["kind"] == r["kind"]
                       and b["mode"] == r["mode"] and b["seq_len"] == r["seq_len"]), None)
            if r["ms"] is None:
                r["efficiency"] = None
            elif t1 is None or t1["ms"] is None:
                r["efficiency"] = None
                r["note"] = "no T1 (" + (t1["status"] if t1 else "not measured") + ")"
            else:
                r["efficiency"] = t1["ms"] / (r["gpus"] * r["ms"])


def _raise_oom():
    raise torch.OutOfMemoryError("inputs")


def env_info(args, world, dev):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton_version, world_size=world, backend=dist.get_backend(),
                dtype=args.dtype, heads=args.heads, head_dim=args.head_dim, batch=1, reps=args.reps,
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))


def write(bench, env, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    dev_tag = env["device"].lower().replace("nvidia ", "").split()[0] if env["device"] != "cpu" else "cpu"
    stem = os.path.join(out_dir, f"{env['date'][:10]}-{dev_tag}-context-parallel-w{env['world_size']}")
    with open(stem + ".jsonl", "w") as f:
        f.write(json.dumps(dict(environment=env)) + "\n")
        for r in bench.rows:
            f.write(json.dumps(r) + "\n")
    lines = [f"# Context parallel: {env['device']} x {env['world_size']} ({env['backend']})", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}, {env['dtype']}, batch 1, "
             f"heads {env['heads']}, head dim {env['head_dim']}, median of {env['reps']}. "
             "Efficiency = T1 / (N · TN) against the same implementation on one GPU.", "",
             "| S | kind | impl | mode | GPUs | ms | TFLOP/s | efficiency | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        fmt = lambda x, p: "" if x is None else f"{x:.{p}f}"
        eff = fmt(r.get("efficiency"), 2) or r.get("note", "")
        lines.append(f"| {r['seq_len']} | {r['kind']} | {r['impl']} | {r['mode']} | {r['gpus']} | {fmt(r['ms'], 2)} | "
                     f"{fmt(r['tflops'], 1)} | {eff} | {r['status']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.jsonl and .md")


def main():
    args = parse()
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    bench = Bench(args)
    env = env_info(args, bench.world, bench.dev)
    try:
        bench.run()
    finally:
        if bench.rank == 0:
            write(bench, env, args.out)
    dist.barrier()  # leave together: a rank tearing gloo down while another still writes can abort it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
