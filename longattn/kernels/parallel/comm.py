"""Process groups, sequence sharding and the collectives the context-parallel kinds use.

Sharding: the global sequence (length S) is cut into `n` equal chunks; "contiguous" gives rank r
chunk r (n = W), "zigzag" gives rank r chunks r and 2W-1-r (n = 2W), so every rank holds one early
and one late chunk and causal work is balanced. A rank's local tensor is its chunks concatenated in
that order.

The collectives are `torch.library` custom ops inside `autograd.Function`s with `setup_context`, so
they differentiate under plain autograd *and* under torch.func (the dispatcher's backward runs
`torch.func.vjp`, which hands wrapped tensors to the Function's backward; the custom op it calls sees
plain tensors). A group travels to an op by its name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

LOAD_BALANCE = ("contiguous", "zigzag")
_MESH = None  # the DeviceMesh a policy's `mesh_dim` refers to (see `set_device_mesh`)


def set_device_mesh(mesh) -> None:
    """Register the DeviceMesh whose dimension a policy's `context_parallel.mesh_dim` names."""
    global _MESH
    _MESH = mesh


def resolve_group(group=None, mesh=None, mesh_dim=None):
    """The process group: `group` if given, else `mesh.get_group(mesh_dim)` (mesh defaults to the one
    registered by `set_device_mesh`), else WORLD."""
    if group is not None:
        return group
    if mesh_dim is not None:
        mesh = mesh if mesh is not None else _MESH
        if mesh is None:
            raise ValueError("context_parallel: mesh_dim given but no DeviceMesh registered; call "
                             "longattn.kernels.parallel.set_device_mesh(mesh) first")
        return mesh.get_group(mesh_dim)
    if mesh is not None:
        return mesh.get_group()
    return dist.group.WORLD


def is_sharded(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def chunk_ids(rank: int, world: int, load_balance: str) -> list[int]:
    """Global chunk indices held by `rank`, in local order."""
    if load_balance == "contiguous":
        return [rank]
    if load_balance == "zigzag":
        return [rank, 2 * world - 1 - rank]
    raise ValueError(f"context_parallel: load_balance must be one of {LOAD_BALANCE}, got {load_balance!r}")


def num_chunks(world: int, load_balance: str) -> int:
    return world * len(chunk_ids(0, world, load_balance))


def shard_sequence(x: torch.Tensor, rank: int, world: int, dim: int = 2, load_balance: str = "contiguous"):
    """The local shard of a full-sequence tensor (a view for contiguous, a copy for zigzag)."""
    n = num_chunks(world, load_balance)
    if x.shape[dim] % n:
        raise ValueError(f"context_parallel: sequence length {x.shape[dim]} is not a multiple of {n} chunks "
                         f"({world} ranks, {load_balance})")
    c = x.shape[dim] // n
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, load_balance)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(x: torch.Tensor, world: int, dim: int = 2, load_balance: str = "contiguous"):
    """Global order from the rank shards concatenated in rank order along `dim` (as all-gather gives)."""
    if load_balance == "contiguous":
        return x
    n = num_chunks(world, load_balance)
    c = x.shape[dim] // n
    owner = {}  # global chunk -> position in the gathered tensor
    for r in range(world):
        for j, g in enumerate(chunk_ids(r, world, load_balance)):
            owner[g] = r * len(chunk_ids(r, world, load_balance)) + j
    return torch.cat([x.narrow(dim, owner[g] * c, c) for g in range(n)], dim)


def group_name(group) -> str:
    return group.group_name


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


# ------------------------------------------------------------------------------------ differentiable collectives

@torch.library.custom_op("longattn_cp::all_gather", mutates_args=())
def _all_gather(x: torch.Tensor, group: str) -> torch.Tensor:
    """(W, *x.shape): every rank's x, stacked in rank order."""
    pg = _group(group)
    world = dist.get_world_size(pg)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]) if x.dim() else (world,))
    dist.all_gather_into_tensor(out, x.reshape(-1) if not x.dim() else x, group=pg)
    return out.view(world, *x.shape)


@_all_gather.register_fake
def _(x, group):
    return x.new_empty((dist.get_world_size(_group(group)), *x.shape))


@torch.library.custom_op("longattn_cp::reduce_scatter", mutates_args=())
def _reduce_scatter(x: torch.Tensor, group: str) -> torch.Tensor:
    """x (W, *shape) on every rank -> (shape): the sum over ranks of x[rank]."""
    pg = _group(group)
    x = x.contiguous()
    if dist.get_backend(pg) == "nccl" and x.dim() > 1:
        out = x.new_empty(x.shape[1:])
        dist.reduce_scatter_tensor(out, x.view(-1, *x.shape[2:]), group=pg)
        return out
    # gloo has no reduce-scatter: all-reduce the whole stack (W times the bytes; CPU tests only)
    x = x.clone()
    dist.all_reduce(x, group=pg)
    return x[dist.get_rank(pg)].clone()


@_reduce_scatter.register_fake
def _(x, group):
    return x.new_empty(x.shape[1:])


class _AllGather(torch.autograd.Function):
    """Autograd around the custom ops (with setup_context, so torch.func transforms accept it; under them
    the backward sees wrapped tensors, which the custom op unwraps as any operator does)."""

    @staticmethod
    def forward(x, group):
        return _all_gather(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: (W, *x.shape); the backward reduce-scatters (sums) the gradients."""
    return _AllGather.apply(x, group_name(group))


def gather_many(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """All-gather several tensors in one collective: [(W, *t.shape) for t in tensors]; differentiable."""
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    got = all_gather(flat, group)  # (W, total)
    out, at = [], 0
    for t in tensors:
        out.append(got[:, at:at + t.numel()].reshape(got.shape[0], *t.shape).to(t.dtype))
        at += t.numel()
    return out


def keep_in_graph(out: torch.Tensor, *gathered: torch.Tensor) -> torch.Tensor:
    """`out` plus a zero that depends on each gathered tensor. A collective's backward must run on every
    rank, also where this rank's output happens not to read what it gathered (rank 0 never reads the
    state before it), or the other ranks would wait for it forever."""
    for g in gathered:
        if g is not None and g.requires_grad:
            out = out + 0 * g.reshape(-1)[:1].sum().to(out.dtype)
    return out


def gather_sequence(x: torch.Tensor, group, dim: int = 2, load_balance: str = "contiguous") -> torch.Tensor:
    """The full sequence, in global order, from every rank's shard; differentiable."""
    world = dist.get_world_size(group)
    g = all_gather(x, group)  # (W, ...)
    g = torch.cat(g.unbind(0), dim=dim)
    return unshard_sequence(g, world, dim, load_balance)


def ring_shift(tensors: list[torch.Tensor], group, reverse: bool = False) -> tuple[list[torch.Tensor], list]:
    """Post a send of each tensor to the next rank and a receive from the previous one (previous/next
    swapped when `reverse`). Returns (receive buffers, requests); wait on the requests before reading."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if reverse:
        nxt, prv = prv, nxt
    nxt_g, prv_g = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    bufs = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, b in zip(tensors, bufs):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), nxt_g, group))
        ops.append(dist.P2POp(dist.irecv, b, prv_g, group))
    return bufs, dist.batch_isend_irecv(ops)


def wait(requests: Optional[list]) -> None:
    for r in requests or ():
        r.wait()
