"""Context-parallel linear attention on the Triton kernels (the interpreter on CPU): gloo, 2 ranks, float32,
each rank's output and q/k/v gradients against the single-device `linear_attention` (also on the kernels).

`test_context_parallel.py` checks the float64 PyTorch forms at 1e-8; this checks that the sharded path
takes the kernels (exact part, additive fold and outputs from an incoming state) and that they agree.
On GPUs: LONGATTN_TEST_CUDA=1 LONGATTN_TEST_CP_CUDA=1 runs the same cases with NCCL, one GPU per rank
(tf32 products: relative error norms below 2e-3)."""
from __future__ import annotations

import datetime
import functools
import importlib
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longattn.kernels.linear.triton_chunk import triton

CUDA = os.environ.get("LONGATTN_TEST_CP_CUDA") == "1"
pytestmark = pytest.mark.skipif(triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs triton's interpreter (TRITON_INTERPRET=1, set by conftest) or GPUs")

WORLD = 2
S = 64  # contiguous: one chunk of 32 per rank; zigzag: two of 16 (chunk_size 16: several key chunks per segment)
OPTS = {
    "hybrid": dict(sink_tokens=3, local_window=6),
    "pure": dict(),  # no exact part: the kernel divides by the normaliser itself
    "wide-window": dict(sink_tokens=20, local_window=40),  # segments that fold no key, sinks past a segment
    "favor": dict(feature_map="favor", num_features=16, sink_tokens=2, local_window=5),  # features + log-scale
    "relu-unnormalised": dict(feature_map="relu", normalize=False),
    "window-only": dict(feature_map="none", sink_tokens=2, local_window=5),
    "delta": dict(update_rule="delta", beta=0.7, sink_tokens=2, local_window=5),  # PyTorch far part, Triton exact
}
CASES = {f"{name}-{'causal' if causal else 'full'}-{lb}": (name, causal, lb)
         for name in OPTS for causal in (True, False) for lb in ("contiguous", "zigzag")
         if causal or lb == "zigzag"}
# the custom op: its backward is torch.func.vjp, where the kernels' backward falls back to PyTorch
CASES["dispatch-hybrid-causal-zigzag"] = ("dispatch", True, "zigzag")


def _functions(name, causal, lb):
    """(single-device fn, sharded fn) of (q, k, v)."""
    from longattn.kernels.linear import linear_attention
    from longattn.kernels.parallel import linear_attention_cp
    if name == "dispatch":
        from longattn.kernels import Band, encode_plan
        params = dict(OPTS["hybrid"], chunk_size=16)
        plans = [encode_plan([Band("linear", params=p)])
                 for p in (params, dict(params, context_parallel={"load_balance": lb}))]
        return [lambda q, k, v, p=p: torch.ops.longattn.attention(q, k, v, None, 0.3, causal, 0.0, None, p)
                for p in plans]
    kw = dict(OPTS[name], scale=0.3, causal=causal, chunk_size=16)
    return (lambda q, k, v: linear_attention(q, k, v, **kw),
            lambda q, k, v: linear_attention_cp(q, k, v, load_balance=lb, **kw))


def _case(rank, name, causal, lb):
    from longattn.kernels.parallel import shard_sequence
    g = torch.Generator().manual_seed(1)
    dev = f"cuda:{rank}" if CUDA else "cpu"
    q, k, v, gout = (torch.randn(1, h, S, 8, generator=g).to(dev) for h in (4, 2, 2, 4))
    single, sharded = _functions(name, causal, lb)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = single(*full)
    ref_grads = torch.autograd.grad(ref, full, gout)
    local = [shard_sequence(t, rank, WORLD, 2, lb).clone().requires_grad_() for t in (q, k, v)]
    out = sharded(*local)
    grads = torch.autograd.grad(out, local, shard_sequence(gout, rank, WORLD, 2, lb))
    for n, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        b = shard_sequence(b, rank, WORLD, 2, lb)
        if CUDA:  # tf32 products, summed in other orders: compare norms (unnormalised sums are large)
            assert (a - b).norm() <= 2e-3 * b.norm() + 1e-6, n  # + 1e-6: shards with no exact key get 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def _worker(rank, port, path):
    torch.set_num_threads(1)
    importlib.import_module("tests.conftest")  # a spawned process: its interpreter shim for triton < 3.7
    if CUDA:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    failures = {}
    for case, args in CASES.items():
        try:
            _case(rank, *args)
        except Exception:  # noqa: BLE001 - reported per case
            failures[case] = f"rank {rank}: " + traceback.format_exc(limit=-4)
    torch.save(failures, f"{path}.{rank}")
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _run():
    from tests.kernels.test_context_parallel import _free_port
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "verdicts")
        mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
        merged = {}
        for r in range(WORLD):
            for name, err in torch.load(f"{path}.{r}").items():
                merged.setdefault(name, err)
        return merged


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_triton_path_matches_single_device(case):
    if CUDA and torch.cuda.device_count() < WORLD:
        pytest.skip(f"{WORLD} ranks need {WORLD} GPUs")
    failures = _run()
    if case in failures:
        pytest.fail(failures[case], pytrace=False)


def test_sharded_path_takes_the_kernels(monkeypatch):
    """float32 in the interpreter routes to the Triton exact part and additive far part, not the PyTorch forms."""
    if CUDA:
        pytest.skip("gloo on CPU tensors: the interpreter's check")
    from longattn.kernels.parallel import linear as cp
    called = []
    for name in ("exact_part_triton", "far_additive", "fold_additive"):
        fn = getattr(cp, name)
        monkeypatch.setattr(cp, name, lambda *a, _f=fn, _n=name, **kw: (called.append(_n), _f(*a, **kw))[1])
    monkeypatch.setattr(cp, "exact_part", None)  # would fail if called
    monkeypatch.setattr(cp, "_fold", None)
    port = __import__("tests.kernels.test_context_parallel", fromlist=["_free_port"])._free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
        cp.linear_attention_cp(q, k, v, causal=True, sink_tokens=2, local_window=4, chunk_size=16)
    finally:
        dist.destroy_process_group()
    assert set(called) == {"exact_part_triton", "far_additive", "fold_additive"}
