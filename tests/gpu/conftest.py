"""What the CUDA-only tests share. They run where benchmarks/gpu_check.sh runs them: on a GPU, with
LONGATTN_TEST_CUDA=1, so that tests/conftest.py leaves TRITON_INTERPRET unset and Triton compiles real kernels.

Everywhere else (the CPU suite, or a GPU machine without LONGATTN_TEST_CUDA, where the kernels would run in the
interpreter) every test collected under tests/gpu/ is skipped, new files included, so none of them needs its own
skip mark and the CPU suite pays only for collecting them. Collection must therefore not touch CUDA.

The checks compare a kernel's outputs and the gradients of Σ output·cotangent with a float64 reference computed
on the GPU from the same inputs, by relative error (‖x − ref‖ / ‖ref‖).
"""
import os

import pytest
import torch

from longattn.kernels.flash import flash_attention_reference

from ..kernels.test_flash import relative_error

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
SKIP_REASON = "needs a CUDA device and compiled Triton kernels (run with LONGATTN_TEST_CUDA=1: benchmarks/gpu_check.sh)"
HERE = os.path.dirname(os.path.abspath(__file__))
# relative error against float64: fp32 runs products at about fp32 accuracy (flash and the delta rule as three tf32
# passes, hyper in ieee fp32; the linear additive kernels' single tf32 pass gets its own bound), bf16 rounds what
# enters the tensor cores and the output to 8 bits of mantissa
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DEVICE = "cuda"  # where `randn` puts its tensors; the tests derive every other device from their inputs


def pytest_configure(config):
    config.addinivalue_line("markers", "spread: a long test (a whole-model compile); on a GPU the collection spreads "
                                       "these evenly, so that pytest-xdist's workers do not get them back to back")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        spread_long_tests(items)
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)


def spread_long_tests(items):
    """Place the tests marked `spread` at even intervals among the others. xdist hands each worker a contiguous
    run of the collection (and steals from its end), so adjacent long tests would run one after another on one
    worker while the others idle. Deterministic: every worker must collect the same order."""
    long = [item for item in items if item.get_closest_marker("spread")]
    if not long:
        return
    rest = [item for item in items if not item.get_closest_marker("spread")]
    step = len(rest) / len(long)
    for n, item in enumerate(reversed(long)):  # from the back, so that earlier positions stay put
        rest.insert(round((len(long) - 1 - n) * step), item)
    items[:] = rest


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    """Random normal tensor on DEVICE in dtype (drawn in float32: the dtype does not change the distribution)."""
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def outputs_and_grads(fn, inputs, cotangents, dtype=None):
    """fn(*leaves) with leaves = inputs (cast to dtype if given) that require grad; returns (outputs as a tuple,
    gradients of Σ output·cotangent w.r.t. the leaves). A None cotangent leaves its output out of the sum."""
    leaves = [(t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_() for t in inputs]
    with torch.enable_grad():
        outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outputs, cotangents) if c is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs])
    return tuple(o.detach() for o in outputs), grads


def float64_flash_reference(q, k, v, g_out, g_lse, *, scale, causal, max_scores=1 << 26):
    """(out, lse, (dq, dk, dv)) in float64 from longattn's reference (`flash_attention_reference`), key heads a few
    at a time: its autograd keeps every key block's scores, so at 8K keys all heads at once would hold tens of GB.
    A key head's gradients depend only on its own group of query heads, so the chunks are independent."""
    B, Hq, Sq = q.shape[:3]
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    per_chunk = max(1, max_scores // max(1, B * group * Sq * Sk))
    parts = []
    for h0 in range(0, Hkv, per_chunk):
        h1 = min(Hkv, h0 + per_chunk)
        rows = slice(h0 * group, h1 * group)
        (out, lse), grads = outputs_and_grads(
            lambda q_, k_, v_: flash_attention_reference(q_, k_, v_, scale=scale, causal=causal),
            (q[:, rows], k[:, h0:h1], v[:, h0:h1]), (g_out[:, rows], g_lse[:, rows]), dtype=torch.float64)
        parts.append((out, lse.double(), *grads))
    out, lse, dq, dk, dv = (torch.cat(p, dim=1) for p in zip(*parts))
    return out, lse, (dq, dk, dv)


def assert_all_close(names, got, want, tol):
    """Each relative error ‖got − want‖ / ‖want‖ (want in float64) below tol; all are computed first, so that a
    failure lists every one of them."""
    errors = {n: relative_error(g, w) for n, g, w in zip(names, got, want)}
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors (allowed < {tol:.0e}): " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
