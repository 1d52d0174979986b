"""Context parallelism on CPU: gloo process groups of 2 and 4 ranks, each rank's output and q/k/v
gradients compared with the matching slices of the single-device result (float64 references).

One spawn per world size runs every case (process start-up dominates); each case is then its own
pytest item reading that run's verdicts. The hyper-triton cases run float32 through the Triton kernels
(the ranks inherit TRITON_INTERPRET=1 from tests/conftest.py) against single-device Triton at 1e-4.

On GPUs: LONGATTN_TEST_CP_CUDA=1 runs the same cases with NCCL, one GPU per rank, float32 inputs through the
Triton kernels, at float32 tolerances (world sizes above the GPU count are skipped)."""
from __future__ import annotations

import datetime
import functools
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLDS = (2, 4)
CUDA = os.environ.get("LONGATTN_TEST_CP_CUDA") == "1"
DTYPE = torch.float32 if CUDA else torch.float64
TOL = dict(rtol=2e-3, atol=2e-3) if CUDA else dict(rtol=1e-8, atol=1e-9)
# the hyper-triton cases: float32 Triton kernels (the interpreter on CPU) on both sides
TRITON_TOL = dict(rtol=2e-3, atol=2e-3) if CUDA else dict(rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(S, hq=4, hkv=2, d=16 if CUDA else 8, seed=0, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    dev = f"cuda:{dist.get_rank()}" if CUDA and dist.is_initialized() else "cpu"
    q, k, v = (torch.randn(1, h, S, d, generator=g, dtype=torch.float64).to(dev, dtype) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(1, hq, S, d, generator=g, dtype=torch.float64).to(dev, dtype)


def _check(full_fn, local_fn, S, lb, rank, world, tol=TOL, **shape):
    """full_fn(q, k, v) -> out on the whole sequence; local_fn(q, k, v) -> out of the local shards."""
    from longattn.kernels.parallel import shard_sequence
    q, k, v, gout = _inputs(S, **shape)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = full_fn(*full)
    ref_grads = torch.autograd.grad(ref, full, gout)
    local = [shard_sequence(t, rank, world, 2, lb).clone().requires_grad_() for t in (q, k, v)]
    out = local_fn(*local)
    grads = torch.autograd.grad(out, local, shard_sequence(gout, rank, world, 2, lb))
    torch.testing.assert_close(out, shard_sequence(ref, rank, world, 2, lb), **tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, shard_sequence(r, rank, world, 2, lb), **tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def _flash(rank, world, causal, lb):
    from longattn.kernels.flash import flash_attention
    from longattn.kernels.parallel import ring_flash_attention
    _check(lambda q, k, v: flash_attention(q, k, v, scale=0.4, causal=causal)[0],
           lambda q, k, v: ring_flash_attention(q, k, v, scale=0.4, causal=causal, load_balance=lb)[0],
           32, lb, rank, world)


def _flash_lse(rank, world):
    """lse is an output too: its gradient flows (dlse path of the ring backward)."""
    from longattn.kernels.flash import flash_attention
    from longattn.kernels.parallel import ring_flash_attention
    _check(lambda q, k, v: _with_lse(flash_attention(q, k, v, causal=True)),
           lambda q, k, v: _with_lse(ring_flash_attention(q, k, v, causal=True, load_balance="zigzag")),
           32, "zigzag", rank, world)


def _with_lse(res):
    out, lse = res
    return out + lse.unsqueeze(-1).to(out.dtype).sin()


LINEAR = {
    "pure_add": dict(sink_tokens=0, local_window=0),
    "hybrid_add": dict(sink_tokens=3, local_window=6),
    "hybrid_delta": dict(sink_tokens=3, local_window=6, update_rule="delta", beta=0.7),
    "pure_delta": dict(sink_tokens=0, local_window=0, update_rule="delta"),
    "window_only": dict(feature_map="none", sink_tokens=2, local_window=5),
}


def _linear(rank, world, name, causal, lb):
    from longattn.kernels.linear import linear_attention
    from longattn.kernels.parallel import linear_attention_cp
    kw = dict(LINEAR[name], scale=0.3, causal=causal, chunk_size=4)
    _check(lambda q, k, v: linear_attention(q, k, v, **kw),
           lambda q, k, v: linear_attention_cp(q, k, v, load_balance=lb, **kw), 32, lb, rank, world)


def _hyper(rank, world, causal, lb, sampling="uniform"):
    from longattn.kernels.hyper import hyper_attention
    from longattn.kernels.parallel import hyper_attention_cp
    kw = dict(scale=0.3, causal=causal, block_size=8, sample_size=4, lsh_bits=3, min_seq_len=16, sink_tokens=4,
              local_window=8, seed=7, sampling=sampling)
    _check(lambda q, k, v: hyper_attention(q, k, v, **kw)[0],
           lambda q, k, v: hyper_attention_cp(q, k, v, load_balance=lb, **kw)[0], 64, lb, rank, world)


def _hyper_triton(rank, world, causal, lb, heads, sampling="uniform"):
    """float32 through the Triton kernels (the interpreter on CPU): rank-local kernels against the single-device
    kernels, lse included (its gradient flows too)."""
    from longattn.kernels.hyper import _use_triton, hyper_attention
    from longattn.kernels.parallel import hyper_attention_cp
    # interpreter time grows with the grid: short, but with two causal levels of blocks and samples
    kw = dict(scale=0.3, causal=causal, block_size=8, sample_size=4, lsh_bits=3, min_seq_len=8, sink_tokens=2,
              local_window=4, seed=7, sampling=sampling)
    probe = _inputs(1, dtype=torch.float32)[0]
    assert _use_triton(probe, probe), "the Triton path is not taken (no TRITON_INTERPRET=1 on CPU?)"
    _check(lambda q, k, v: _with_lse(hyper_attention(q, k, v, **kw)),
           lambda q, k, v: _with_lse(hyper_attention_cp(q, k, v, load_balance=lb, **kw)), 32, lb, rank, world,
           tol=TRITON_TOL, hq=heads[0], hkv=heads[1], dtype=torch.float32)


def _dispatch(rank, world, kind, lb, dtype=DTYPE, **shape):
    """The custom op with a context_parallel band: its backward is the dispatcher's torch.func.vjp."""
    from longattn.kernels import Band, encode_plan
    params = {"linear": dict(sink_tokens=2, local_window=4, chunk_size=4), "hyper": dict(min_seq_len=16, block_size=8,
              sample_size=4, lsh_bits=3, sink_tokens=2, local_window=4)}.get(kind, {})
    cp = dict(params, context_parallel={"load_balance": lb})
    single, sharded = encode_plan([Band(kind, params=params)]), encode_plan([Band(kind, params=cp)])
    op = torch.ops.longattn.attention
    _check(lambda q, k, v: op(q, k, v, None, 0.35, True, 0.0, None, single),
           lambda q, k, v: op(q, k, v, None, 0.35, True, 0.0, None, sharded), 32, lb, rank, world,
           tol=TOL if dtype == DTYPE else TRITON_TOL, dtype=dtype, **shape)


def _dispatch_bands(rank, world):
    """Bands are chosen by the global key length (local length x world)."""
    from longattn.kernels import Band, encode_plan
    cp = {"context_parallel": {}}
    plan = encode_plan([Band("linear", below=32, params=dict(cp, local_window=4)), Band("flash", params=cp)])
    op = torch.ops.longattn.attention
    _check(lambda q, k, v: op(q, k, v, None, 0.35, True, 0.0, None, encode_plan([Band("flash")])),
           lambda q, k, v: op(q, k, v, None, 0.35, True, 0.0, None, plan), 32, "contiguous", rank, world)


CASES = {
    **{f"flash-{'causal' if c else 'full'}-{lb}": functools.partial(_flash, causal=c, lb=lb)
       for c in (True, False) for lb in ("contiguous", "zigzag")},
    "flash-lse-grad": _flash_lse,
    **{f"linear-{n}-causal-{lb}": functools.partial(_linear, name=n, causal=True, lb=lb)
       for n in LINEAR for lb in ("contiguous", "zigzag")},
    **{f"linear-{n}-full": functools.partial(_linear, name=n, causal=False, lb="zigzag")
       for n in ("hybrid_add", "hybrid_delta", "pure_add")},
    **{f"hyper-{'causal' if c else 'full'}-{lb}": functools.partial(_hyper, causal=c, lb=lb)
       for c, lb in ((True, "contiguous"), (True, "zigzag"), (False, "zigzag"))},
    # importance sampling: the rectangles' mean queries come from every rank's rows
    **{f"hyper-importance-{'causal' if c else 'full'}-{lb}": functools.partial(_hyper, causal=c, lb=lb,
                                                                              sampling="importance")
       for c, lb in ((True, "zigzag"), (False, "contiguous"))},
    "hyper-triton-importance-causal-zigzag-gqa": functools.partial(_hyper_triton, causal=True, lb="zigzag",
                                                                   heads=(2, 1), sampling="importance"),
    **{f"hyper-triton-{'causal' if c else 'full'}-{lb}-{'gqa' if heads[1] < heads[0] else 'mha'}":
       functools.partial(_hyper_triton, causal=c, lb=lb, heads=heads)  # few heads: the interpreter is slow
       for c, lb, heads in ((True, "zigzag", (2, 1)), (True, "contiguous", (2, 1)), (False, "zigzag", (2, 2)),
                            (False, "contiguous", (2, 1)))},
    **{f"dispatch-{kind}-{lb}": functools.partial(_dispatch, kind=kind, lb=lb)
       for kind, lb in (("flash", "zigzag"), ("linear", "contiguous"), ("hyper", "zigzag"))},
    "dispatch-hyper-triton-zigzag": functools.partial(_dispatch, kind="hyper", lb="zigzag", dtype=torch.float32, hq=2,
                                                      hkv=1),
    "dispatch-bands-global-length": _dispatch_bands,
}


def _worker(rank, world, port, path):
    os.environ["LONGATTN_FLASH_CPU"] = "reference"  # no Triton interpreter here: float64 takes the references
    torch.set_num_threads(1)
    # a failing rank leaves the others in a collective: the timeout turns that hang into an error
    if CUDA:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60 if not CUDA else 300))
    import longattn.kernels  # noqa: F401  (registers the op)
    failures = {}
    for name, fn in CASES.items():
        try:
            fn(rank=rank, world=world)
        except Exception:  # noqa: BLE001 - reported per case below
            failures[name] = f"rank {rank}: " + traceback.format_exc(limit=-4)
    torch.save(failures, f"{path}.{rank}")
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _run(world):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "verdicts")
        mp.spawn(_worker, args=(world, _free_port(), path), nprocs=world, join=True)
        merged = {}
        for r in range(world):
            for name, err in torch.load(f"{path}.{r}").items():
                merged.setdefault(name, err)
        return merged


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_single_device(case, world):
    if CUDA and world > torch.cuda.device_count():
        pytest.skip(f"{world} ranks need {world} GPUs")
    if "triton" in case and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton cases need CUDA or TRITON_INTERPRET=1")
    failures = _run(world)
    if case in failures:
        pytest.fail(failures[case], pytrace=False)


def test_shard_and_unshard_round_trip():
    from longattn.kernels.parallel import chunk_ids, shard_sequence, unshard_sequence
    x = torch.arange(48).view(1, 1, 48, 1)
    for world in (1, 2, 3):
        for lb in ("contiguous", "zigzag"):
            shards = [shard_sequence(x, r, world, 2, lb) for r in range(world)]
            assert torch.equal(unshard_sequence(torch.cat(shards, 2), world, 2, lb), x)
    assert chunk_ids(1, 4, "zigzag") == [1, 6]


def test_context_parallel_band_runs_single_device_without_a_process_group():
    """A policy with context_parallel works everywhere: no process group -> the normal kernel."""
    from longattn.kernels import Band, encode_plan
    from longattn.kernels.flash import flash_attention
    q, k, v, _ = _inputs(16)
    plan = encode_plan([Band("flash", params={"context_parallel": {"load_balance": "zigzag"}})])
    out = torch.ops.longattn.attention(q, k, v, None, 0.3, True, 0.0, None, plan)
    torch.testing.assert_close(out, flash_attention(q, k, v, scale=0.3, causal=True)[0])


def test_policy_schema_accepts_context_parallel_on_every_kind():
    from longattn.rewriter.policy_schema import validate_params
    for kind in ("exact", "flash", "hyper", "linear"):
        given, problems = validate_params(kind, {"context_parallel": {"mesh_dim": "cp", "load_balance": "zigzag"}})
        written = {"sink_tokens": 64, "local_window": 256} if kind == "linear" else {}  # the hybrid's, always written
        assert not problems and given == {"context_parallel": {"mesh_dim": "cp", "load_balance": "zigzag"}, **written}
    _, problems = validate_params("flash", {"context_parallel": {"load_balance": "ring"}})
    assert "must be one of 'contiguous', 'zigzag'" in problems[0][1]
    _, problems = validate_params("flash", {"context_parallel": {"mesh": 0}})
    assert "unknown key 'mesh' in context_parallel" in problems[0][1]


def test_benchmark_smoke_run_on_cpu(tmp_path):
    """benchmarks/bench_context_parallel.py starts, fails soft (torch CP has no CPU SDPA rule) and writes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(root, "benchmarks", "bench_context_parallel.py"), "--device", "cpu", "--backend", "gloo",
           "--lengths", "64", "--heads", "2", "--head-dim", "16", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    tables = list(tmp_path.glob("*-context-parallel-w2.md"))
    assert tables and "| 64 | flash | longattn | fwd | 2 |" in tables[0].read_text()
