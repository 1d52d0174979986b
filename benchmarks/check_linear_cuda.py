"""Linear attention's Triton kernels on a GPU against the float64 PyTorch reference: output and gradients.

    PYTHONPATH=. python benchmarks/check_linear_cuda.py

bf16, B1 H4 S1000 d64, causal, random inputs scaled by 0.5; the identity map unnormalised (the kernels
write the output directly) and normalised, elu normalised, the elu hybrid (64 sinks + 256-key window), and the
delta rule (identity map, per-token β), its gradients by the float32 PyTorch recompute (LONGATTN_DELTA_BWD=torch)
and then by the Triton backward (the default; identity and elu maps). Prints the
relative error of the output and of dq / dk / dv (results: `results/2026-12-01-h200-linear.md`, notes).
"""
import functools

import torch

from harness import rel_err
from longattn.kernels.linear import linear_attention
from longattn.kernels.linear.reference import linear_attention_reference

rel = functools.partial(rel_err, dtype=torch.float64)


def main():
    import os
    torch.manual_seed(0)
    for kw in (dict(feature_map="identity", normalize=False), dict(feature_map="identity", normalize=True),
               dict(feature_map="elu", normalize=True), dict(feature_map="elu", sink_tokens=64, local_window=256),
               dict(feature_map="identity", update_rule="delta", normalize=False, recompute=True),
               dict(feature_map="identity", update_rule="delta", normalize=False),
               dict(feature_map="elu", update_rule="delta", normalize=False)):
        os.environ["LONGATTN_DELTA_BWD"] = "torch" if kw.pop("recompute", False) else "triton"
        if kw.get("update_rule") == "delta":
            print(f"LONGATTN_DELTA_BWD={os.environ['LONGATTN_DELTA_BWD']}:", end=" ")
        q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16) * 0.5 for _ in range(3))
        beta = torch.rand(1, 4, 1000, device="cuda") if kw.get("update_rule") == "delta" else None
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = linear_attention(*leaves, causal=True, beta=beta, **kw)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref = linear_attention_reference(*ref_leaves, causal=True, beta=None if beta is None else beta.double(), **kw)
        ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
        print(kw, "out", f"{rel(out, ref):.1e}", "dq/dk/dv", [f"{rel(a, b):.1e}" for a, b in zip(grads, ref_grads)])
    check_decode()


def check_decode(steps=300):
    """The fused decode step (its programs merged by the last one to finish, through a counter) against the
    PyTorch step, token by token past a full window, GQA 9/3 and 32/32 (elu), 9/3 with a hedgehog map (random
    weights, F = 64, per head, with biases): output and the state it carries."""
    from longattn.kernels.linear import linear_attention_step, linear_attention_step_reference
    for hq, hkv, fmap in ((9, 3, "elu"), (32, 32, "elu"), (9, 3, "hedgehog")):
        torch.manual_seed(hq)
        params = {"q_weight": torch.randn(hq, 64, 64) / 8, "k_weight": torch.randn(hkv, 64, 64) / 8,
                  "q_bias": torch.randn(hq, 64), "k_bias": torch.randn(hkv, 64)} if fmap == "hedgehog" else None
        opts = dict(causal=True, feature_map=fmap, sink_tokens=64, local_window=256, feature_params=params)
        s = 64 + 256 + steps
        q, k, v = (torch.randn(1, h, s, 64, device="cuda", dtype=torch.bfloat16) * 0.5 for h in (hq, hkv, hkv))
        with torch.no_grad():
            _, fast = linear_attention_step_reference(q[:, :, :320], k[:, :, :320], v[:, :, :320], None, **opts)
            slow, worst = fast, 0.0
            for t in range(320, s):
                x = (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
                out, fast = linear_attention_step(*x, fast, **opts)
                ref, slow = linear_attention_step_reference(*x, slow, **opts)
                worst = max(worst, rel(out, ref))
        state = max(rel(getattr(fast, n), getattr(slow, n)) for n in ("far", "window_k", "window_v"))
        print(f"decode {fmap} {hq}/{hkv}, {steps} steps past a full window: worst output rel err {worst:.1e}, "
              f"state {state:.1e}")


if __name__ == "__main__":
    main()
