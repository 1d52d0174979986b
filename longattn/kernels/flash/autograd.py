"""The differentiable Triton path: a `torch.autograd.Function` around the forward (or decode) and
backward kernels. It defines `setup_context` so that torch.func transforms (the dispatcher's
`torch.func.vjp`) can differentiate through it as well as plain autograd.

Under torch.func the backward receives functorch-wrapped tensors, which a Triton launch cannot
read; the backward kernels therefore sit behind a custom op (`torch.ops.longattn_flash.backward`),
whose dispatch unwraps them like any other operator."""
from __future__ import annotations

from typing import Optional

import torch

from .triton_bwd import flash_backward
from .triton_decode import DECODE_MAX_QUERIES, decode_forward
from .gluon_fwd import flash_forward_gluon, gluon_applies
from .triton_fwd import flash_forward
from .triton_fwd_ws import flash_forward_ws, ws_applies


def forward_kernels(q, k, v, scale: float, causal: bool, attn_mask):
    """(out, lse) from the decode kernel for a few queries against many keys, else the tiled forward: on
    Hopper the Gluon kernel, else the warp-specialised one, where they apply and build; else the pointer
    kernel."""
    if q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] >= 4 * q.shape[2]:
        return decode_forward(q, k, v, scale, causal, attn_mask)
    if gluon_applies(q, k, v, attn_mask, causal):
        result = flash_forward_gluon(q, k, v, scale, causal)
        if result is not None:
            return result
    if ws_applies(q, k, v, attn_mask, causal):
        result = flash_forward_ws(q, k, v, scale, causal)
        if result is not None:
            return result
    return flash_forward(q, k, v, scale, causal, attn_mask)


@torch.library.custom_op("longattn_flash::backward", mutates_args=())
def flash_backward_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
                      causal: bool) -> list[torch.Tensor]:
    """(dq, dk, dv) of the Triton forward; see `flash_backward`."""
    return list(flash_backward(dout, dlse, q, k, v, out, lse, scale, causal, attn_mask))


@flash_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, attn_mask, scale, causal):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


class FlashAttentionFunction(torch.autograd.Function):
    """(q, k, v, attn_mask, scale, causal) -> (out, lse); attn_mask must not require grad."""

    @staticmethod
    def forward(q, k, v, attn_mask, scale, causal):
        return forward_kernels(q, k, v, scale, causal, attn_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, scale, causal = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.scale, ctx.causal = scale, causal

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        dq, dk, dv = flash_backward_op(dout, dlse, q, k, v, out, lse, attn_mask, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None
