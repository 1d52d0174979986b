"""Attention implementations. Each kind lives in its own folder with a plain PyTorch reference
beside its fast kernels; `dispatch` registers the one custom op rewritten graphs call.
Nothing here knows about graphs, policies or runtimes."""
from . import dispatch  # registers torch.ops.longattn.*
from .dispatch import Band, encode_plan, decode_plan, band_for_length
from .flash import flash_attention
from .lse import merge_by_lse

__all__ = ["Band", "encode_plan", "decode_plan", "band_for_length", "flash_attention", "merge_by_lse"]
