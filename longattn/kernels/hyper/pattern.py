"""What HyperAttention decides before it attends: hashes, sort orders, blocks, samples, exact ranges.

Both the reference and the Triton kernels read one `HyperPattern`, so a test can give them the
same pattern and compare the arithmetic alone, and can rebuild the dense weight matrix from it.

The approximation, per query row i (key position p_i = i + Sk - Sq, as the bottom-right causal
convention aligns it):

* exact part X_i: the first `sinks` keys and the contiguous key range [exact_lo[i], exact_hi[i]),
  each key once (causal: only keys j <= p_i). For `variant="paper"` this is empty non-causally and
  the diagonal leaf of the causal recursion causally; the default variant adds the local window.
* one term per *rectangle* (queries [qs, qs+ql) x keys [ks, ks+kl)) containing the row: queries and
  keys of the rectangle are each stably sorted by LSH bucket (Gray-code order); the sorted order is cut
  into nb = ceil(kl / block_size) blocks, key block b = sorted ranks [b*kl//nb, (b+1)*kl//nb), query
  block b = sorted ranks [b*ql//nb, (b+1)*ql//nb) (balanced, so no padding keys are needed: a block
  never exceeds block_size keys). A query attends its block's keys with weight 1, and `sample_size`
  keys drawn uniformly with replacement from the rectangle with weight kl/m each (the default
  variant stratifies them: one uniform draw in each of m equal slices), skipping samples that lie
  in its own block. Keys in X_i are skipped in both, so no key is counted twice.
  `sampling="importance"` (the default variant's default) draws the samples from
  p = ½·softmax(scale·q̄·k) + ½/kl over the rectangle's keys instead (q̄: the mean of the rectangle's
  queries over the key head's group), by the same stratified
  uniforms pushed through p's inverse CDF, and weights each by 1/(m·p): still an unbiased estimate of the
  rectangle's sum, with far less variance where attention concentrates on keys the block misses. The
  weights are part of the pattern: like the hashes, they are chosen in the forward pass and held fixed
  (the backward is exact for the pattern, it does not differentiate the choice).

Causal attention is the paper's recursive halving: a segment of length L > min_seq_len splits at
h = L // 2 into two causal halves and one rectangle (the second half's queries against the first
half's keys); segments of at most min_seq_len are exact leaves (part of X_i), as in the authors'
code (so at 8K with min_seq_len 4096 only the 4096 x 4096 off-diagonal quarter is approximated). With Sq < Sk the Sk - Sq keys before
the square part form one more rectangle seen by every query. Rectangles of one recursion level have
disjoint query and key ranges, so a level is one batched launch with one sort of q and one of k.

GQA: the hyperplanes and the samples belong to the key/value head; the query heads of a group are
hashed with their key head's hyperplanes (LSH must share planes between queries and keys). Keys are
then hashed, sorted and sampled once per key head instead of once per query head, and no K/V copy
is made. Randomness comes from a local CPU generator seeded with `seed`, so CPU and GPU, forward
and recomputed backward draw the same hyperplanes and samples.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

VARIANTS = ("default", "paper")
SAMPLINGS = ("uniform", "importance")


@dataclass
class HyperLevel:
    """One recursion level: rectangles with disjoint query and key ranges.

    rects: (R, 4) int64 (q_start, q_len, k_start, k_len), on the inputs' device.
    q_order: (B, Hq, Sq) int64; entries [q_start, q_start + q_len) hold the original indices of the
        rectangle's queries, sorted by bucket (stable). Entries outside every rectangle are unused.
    k_order: (B, Hkv, Sk) int64, the same for keys.
    samples: (B, Hkv, R, m) int64 original key indices drawn from each rectangle's keys.
    sample_block: (B, Hkv, R, m) int64, the block each sample falls in within its rectangle.
    sample_logw: (B, Hkv, R, m) float32, the natural log of each sample's weight: the number of keys it
        stands for, log(kl / m) for uniform draws, -log(m·p) for importance draws.
    q_start: None, or in a pattern restricted to some rows (`local_pattern`): (B, Hq, R, nb_max + 1) int64;
        q_order then holds local rows only, and block j of rectangle r is its entries [q_start[.., r, j],
        q_start[.., r, j + 1]).
    """
    rects: torch.Tensor
    rect_list: list
    q_order: torch.Tensor
    k_order: torch.Tensor
    samples: torch.Tensor
    sample_block: torch.Tensor
    sample_logw: torch.Tensor
    q_start: Optional[torch.Tensor] = None


@dataclass
class HyperPattern:
    """planes (Hkv, D, lsh_bits) float32; q_rank (B, Hq, Sq) / k_rank (B, Hkv, Sk) int64 Gray ranks;
    exact_lo / exact_hi (Sq,) int64; sinks: number of leading keys attended exactly.
    rows: None, or for a pattern restricted to some query rows (`local_pattern`) their global indices (n,):
    the per-row tensors then have n rows, in that order.
    exact_apart: no sinks and no window, so a row's exact keys (its causal leaf, if any) never lie in a rectangle
    it belongs to: the rectangle kernels need not skip them, and non-causally there are none."""
    block_size: int
    sample_size: int
    planes: torch.Tensor
    q_rank: torch.Tensor
    k_rank: torch.Tensor
    exact_lo: torch.Tensor
    exact_hi: torch.Tensor
    sinks: int
    levels: list
    rows: Optional[torch.Tensor] = None
    exact_apart: bool = False


def resolve_sampling(variant, sampling):
    """The sampling a call runs: the given one, or by default the variant's own (the paper's algorithm samples
    uniformly; the default variant by importance, which measured a fraction of the error at the same budget)."""
    if sampling is None:
        return "uniform" if variant == "paper" else "importance"
    return sampling


def check_params(*, block_size, sample_size, lsh_bits, min_seq_len, sink_tokens, local_window, variant,
                 sampling=None):
    for name, value, low in (("block_size", block_size, 1), ("sample_size", sample_size, 0),
                             ("lsh_bits", lsh_bits, 1), ("min_seq_len", min_seq_len, 0),
                             ("sink_tokens", sink_tokens, 0), ("local_window", local_window, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"hyper_attention: {name} must be an integer >= {low}, got {value!r}")
    if lsh_bits > 16:
        raise ValueError(f"hyper_attention: lsh_bits must be at most 16, got {lsh_bits}")
    if variant not in VARIANTS:
        raise ValueError(f"hyper_attention: variant must be one of {VARIANTS}, got {variant!r}")
    if sampling is not None and sampling not in SAMPLINGS:
        raise ValueError(f"hyper_attention: sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "importance" and variant == "paper":
        raise ValueError("hyper_attention: variant='paper' samples uniformly (the paper's algorithm); "
                         "sampling='importance' needs variant='default'")


def gray_rank(code: torch.Tensor) -> torch.Tensor:
    """Position of each code word along the binary reflected Gray sequence (inverse Gray code):
    buckets adjacent in this order differ in one hyperplane, i.e. are angular neighbours."""
    rank = code.clone()
    shift = 1
    while shift < 16:
        rank = rank ^ (rank >> shift)
        shift *= 2
    return rank


def lsh_rank(x: torch.Tensor, planes: torch.Tensor, group: int) -> torch.Tensor:
    """x (B, H, S, D) with H = group * Hkv, planes (Hkv, D, r) -> (B, H, S) int64 Gray rank of the bucket."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = planes.to(device=x.device, dtype=dtype).repeat_interleave(group, dim=0)  # (H, D, r), tiny
    proj = torch.einsum("bhsd,hdr->bhsr", x.detach().to(dtype), p)
    bits = (proj > 0).to(torch.int64)
    code = (bits << torch.arange(bits.shape[-1], device=x.device)).sum(-1)
    return gray_rank(code)


def plan_rectangles(sq: int, sk: int, causal: bool, min_seq_len: int):
    """Rectangles per level and causal leaves (query start, length) of the recursion."""
    if not causal:
        return [[(0, sq, 0, sk)]], []
    if sq > sk:
        raise ValueError(f"hyper_attention: causal needs Sq <= Sk (bottom-right aligned), got Sq={sq}, Sk={sk}")
    off = sk - sq
    levels, leaves = [], []
    if off > 0:
        levels.append([(0, sq, 0, off)])
    segments = [(0, sq)] if sq > 0 else []
    while segments:
        level, nxt = [], []
        for start, length in segments:
            # as the authors' code does: a causal segment of at most min_seq_len is one exact leaf
            if length <= max(min_seq_len, 1):
                leaves.append((start, length))
                continue
            h = length // 2
            level.append((start + h, length - h, off + start, h))
            nxt += [(start, h), (start + h, length - h)]
        if level:
            levels.append(level)
        segments = nxt
    return levels, leaves


def exact_ranges(sq, sk, causal, leaves, local_window, device="cpu"):
    """(exact_lo, exact_hi) (Sq,) int64: the contiguous key range each row attends exactly."""
    off = sk - sq
    pos = torch.arange(sq, dtype=torch.int64) + off
    if causal:
        lo = torch.empty(sq, dtype=torch.int64)
        for start, length in leaves:
            lo[start:start + length] = off + start
        if local_window > 0:
            lo = torch.minimum(lo, pos - local_window + 1)
        hi = pos + 1
    elif local_window > 0:
        lo = pos - local_window // 2
        hi = lo + local_window
    else:
        lo = torch.zeros(sq, dtype=torch.int64)
        hi = torch.zeros(sq, dtype=torch.int64)
    lo, hi = lo.clamp(0, sk), hi.clamp(0, sk)
    hi = torch.maximum(lo, hi)
    return lo.to(device), hi.to(device)


def sort_within_ranges(rank: torch.Tensor, bounds: torch.Tensor, bits: int) -> torch.Tensor:
    """Stable sort of positions by (piece, rank), pieces cut at the sorted `bounds` (1-D int64 tensor on
    rank's device): (B, H, S) -> original indices. Positions keep their piece, so the entries of a
    range [start, start+len) whose ends are in `bounds` are that range's positions sorted by rank."""
    piece = torch.bucketize(torch.arange(rank.shape[-1], device=rank.device), bounds, right=True)
    key = (piece << bits) + rank
    # the narrowest integer type that holds the key: a radix sort's passes scale with the key width
    for dtype, limit in ((torch.int16, 2**15), (torch.int32, 2**31)):
        if (bounds.numel() + 1) << bits < limit:
            key = key.to(dtype)
            break
    return torch.argsort(key, dim=-1, stable=True)


def block_of_rank(rank, length, nb):
    """Block (of nb balanced blocks over `length` sorted items) holding sorted rank `rank`:
    block b holds ranks [b*length//nb, (b+1)*length//nb)."""
    return ((rank + 1) * nb - 1) // length


def _draw_planes(g, Hkv, D, lsh_bits):
    return torch.randn(Hkv, D, lsh_bits, generator=g, dtype=torch.float32)  # the generator's first draw


@functools.lru_cache(maxsize=64)
def hyperplanes(Hkv, D, lsh_bits, seed, device) -> torch.Tensor:
    """(Hkv, D, lsh_bits) float32 on `device`: the hyperplanes `build_pattern` draws from `seed`, to hash
    queries outside it (context parallelism: each rank its own rows). Cached and shared: never modify."""
    return _draw_planes(torch.Generator().manual_seed(seed), Hkv, D, lsh_bits).to(device)


def _bits(x32):
    """float32 -> int64 holding its bits, so floats travel in the one int64 host-to-device copy."""
    return x32.contiguous().view(torch.int32).to(torch.int64)


def _floats(bits):
    return bits.to(torch.int32).view(torch.float32)


MEAN_ROWS = 256  # query rows per rectangle behind its mean query (a proposal need only be close)


def mean_query_rows(rects):
    """(R, MEAN_ROWS) int64: the evenly spaced query rows of each rectangle that its mean query averages."""
    at = (torch.arange(MEAN_ROWS, device=rects.device, dtype=torch.float64) + 0.5) / MEAN_ROWS
    return rects[:, 0, None] + (at * rects[:, 1, None].double()).to(torch.int64)


def mean_of_rows(picked, group):
    """picked (B, Hq, R * MEAN_ROWS, D): the `mean_query_rows` of q -> (B, Hkv, R, D) float32 mean per key head."""
    B, Hq, n, D = picked.shape
    return picked.float().view(B, Hq // group, group, n // MEAN_ROWS, MEAN_ROWS, D).mean(dim=(2, 4))


def rect_query_means(q, rects, group):
    """(B, Hkv, R, D) float32: each rectangle's mean query per key head, over the head's query group."""
    return mean_of_rows(q.detach()[:, :, mean_query_rows(rects).flatten()], group)


def _rect_key_scores(k, rects, rect_list, q_means, width):
    """(B, Hkv, R, width) q̄_r·k_j for the keys j of each rectangle r (padded to the widest; pads are garbage)."""
    B, Hkv, Sk, D = k.shape
    kd, qm = k.detach(), q_means.to(k.dtype)
    ks0, kl0 = rect_list[0][2], rect_list[0][3]
    stride = rect_list[1][2] - ks0 if len(rect_list) > 1 else 0
    if all(r[3] == kl0 and r[2] == ks0 + i * stride for i, r in enumerate(rect_list)):
        # equal rectangles at a constant stride (one rectangle, or a causal level of a power-of-two length): each
        # rectangle's keys are a strided view of k, read once
        view = kd.as_strided((B, Hkv, len(rect_list), kl0, D),
                             (kd.stride(0), kd.stride(1), stride * kd.stride(2), kd.stride(2), kd.stride(3)),
                             kd.storage_offset() + ks0 * kd.stride(2))
        return torch.matmul(view, qm.unsqueeze(-1)).squeeze(-1)
    keys = (rects[:, 2, None] + torch.arange(width, device=k.device)).clamp(max=Sk - 1)
    every = torch.einsum("bhsd,bhrd->bhrs", kd, qm)  # every key against every q̄, then each rectangle's own
    return every.gather(-1, keys.expand(B, Hkv, -1, -1))


def importance_samples(k, rects, rect_list, q_means, u, scale, uniform_share=0.5):
    """Draw each rectangle's samples from p = (1 - uniform_share)·softmax(scale·q̄·k) + uniform_share/kl over its
    keys, pushing the stratified uniforms u (B, Hkv, R, m) through p's inverse CDF. rect_list: the rectangles as
    host integers (`HyperLevel.rect_list`).
    Returns (samples (B, Hkv, R, m) int64 key indices, log-weights (B, Hkv, R, m) float32 = -log(m·p))."""
    m = u.shape[-1]
    ks, kl = rects[:, 2], rects[:, 3]
    width = max(r[3] for r in rect_list)
    valid = torch.arange(width, device=k.device) < kl[:, None]                        # (R, width)
    scores = _rect_key_scores(k, rects, rect_list, q_means, width).float() * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    p = (1 - uniform_share) * torch.softmax(scores, -1) + uniform_share * valid / kl[:, None]
    # float32 CDF (a float64 scan costs as much as the scores): a key's chance of being drawn is then exactly
    # its step of the CDF as rounded, so the weights take that step, not p, and the estimate stays unbiased
    cdf = p.cumsum(-1)
    total = cdf[..., -1:]
    local = torch.searchsorted(cdf, (u * total.double()).float(), right=True)
    local = torch.minimum(local, (kl - 1)[:, None])
    below = torch.where(local > 0, cdf.gather(-1, (local - 1).clamp(min=0)), 0.0)
    step = cdf.gather(-1, local) - below
    logw = torch.log(total) - torch.log(m * step)
    return ks[:, None] + local, logw


@functools.lru_cache(maxsize=64)
def _drawn_and_planned(B, Hkv, Sq, Sk, D, causal, sample_size, lsh_bits, min_seq_len, local_window, stratified,
                       seed, device):
    """Everything that depends on shapes, parameters and seed only: hyperplanes, recursion plan, exact
    ranges, samples, piece bounds. Drawn on the CPU and moved in one copy (a host-to-device copy of
    pageable memory waits for the queued GPU work), and cached, so a repeated call moves nothing.
    Returns (planes on CPU, rectangles per level, device tensors [planes bits, lo, hi, then per level:
    rects, samples, q bounds, k bounds, the uniforms' bits, the uniform samples' log-weight bits]). The device
    tensors are shared: never modify them in place."""
    g = torch.Generator().manual_seed(seed)
    planes = _draw_planes(g, Hkv, D, lsh_bits)
    level_rects, leaves = plan_rectangles(Sq, Sk, causal, min_seq_len)
    lo, hi = exact_ranges(Sq, Sk, causal, leaves, local_window, "cpu")
    host = [_bits(planes).flatten(), lo, hi]
    for rects in level_rects:
        rt = torch.tensor(rects, dtype=torch.int64).view(-1, 4)
        u = torch.rand(B, Hkv, len(rects), sample_size, generator=g, dtype=torch.float64)
        if stratified:
            # one sample in each of m equal slices of the keys: every key is still drawn with
            # probability m/kl (unbiased with weight kl/m), with less variance where attention drifts
            # with position
            u = (torch.arange(sample_size, dtype=torch.float64) + u) / max(sample_size, 1)
        samples = rt[:, 2, None] + torch.floor(u * rt[:, 3, None].double()).to(torch.int64)
        q_bounds = torch.unique(torch.cat([rt[:, 0], rt[:, 0] + rt[:, 1]]))
        k_bounds = torch.unique(torch.cat([rt[:, 2], rt[:, 2] + rt[:, 3]]))
        logw = torch.log(rt[:, 3, None].double() / max(sample_size, 1)).float().expand(u.shape)
        host += [rt.flatten(), samples.flatten(), q_bounds, k_bounds, u.view(torch.int64).flatten(),
                 _bits(logw).flatten()]
    sizes = [t.numel() for t in host]
    parts = tuple(torch.cat(host).to(device).split(sizes))
    return planes, level_rects, parts


def build_pattern(q, k, *, causal=False, block_size=256, sample_size=256, lsh_bits=7, min_seq_len=4096,
                  sink_tokens=64, local_window=256, variant="default", sampling=None, seed=0, scale=None,
                  rank_fn=None, q_rank=None, q_means=None) -> HyperPattern:
    """Draw hyperplanes and samples from `seed`, hash, and sort. q (B, Hq, Sq, D), k (B, Hkv, Sk, D).
    `scale` (default 1/sqrt(D)) is the attention's: importance sampling weighs keys by softmax(scale·q̄·k).

    rank_fn(x, planes, group) -> (B, H, S) int64 may replace the torch hash (the Triton path passes its kernel).
    q_rank (B, Hq, Sq) int64, the queries' ranks for `hyperplanes(Hkv, D, lsh_bits, seed, device)`, replaces
    hashing q (context parallelism gathers them from the ranks); q is then not read and may be None, and
    q_means(rects) -> (B, Hkv, R, D), `rect_query_means` of the full q, must come with it for importance sampling."""
    check_params(block_size=block_size, sample_size=sample_size, lsh_bits=lsh_bits, min_seq_len=min_seq_len,
                 sink_tokens=sink_tokens, local_window=local_window, variant=variant, sampling=sampling)
    sampling = resolve_sampling(variant, sampling)
    if q is None and q_means is None and sampling == "importance":
        raise ValueError("build_pattern: importance sampling without q needs q_means")
    B, Hq, Sq = q.shape[:3] if q_rank is None else q_rank.shape
    Hkv, Sk, D = k.shape[1:]
    group = Hq // Hkv
    dev = k.device
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    paper = variant == "paper"
    planes, level_rects, parts = _drawn_and_planned(B, Hkv, Sq, Sk, D, bool(causal), sample_size, lsh_bits,
                                                    min_seq_len, 0 if paper else local_window, not paper, int(seed),
                                                    str(dev))
    planes_dev = _floats(parts[0]).view(Hkv, D, lsh_bits)
    lo, hi = parts[1], parts[2]

    rank_fn = rank_fn or lsh_rank
    if q_rank is None:
        q_rank = rank_fn(q, planes_dev, group)
    k_rank = rank_fn(k, planes_dev, 1)
    levels = []
    for i, rects in enumerate(level_rects):
        rt, samples, q_bounds, k_bounds, u, logw = parts[3 + 6 * i: 9 + 6 * i]
        R = len(rects)
        rt = rt.view(R, 4)
        samples = samples.view(B, Hkv, R, sample_size)
        logw = _floats(logw).view(B, Hkv, R, sample_size)
        if sampling == "importance" and sample_size > 0:
            means = q_means(rt) if q_means is not None else rect_query_means(q, rt, group)
            samples, logw = importance_samples(k, rt, rects, means,
                                               u.view(torch.float64).view(B, Hkv, R, sample_size), scale)
        q_order = sort_within_ranges(q_rank, q_bounds, lsh_bits)
        k_order = sort_within_ranges(k_rank, k_bounds, lsh_bits)
        # sorted position of every key, to find which block a sample fell in
        where = torch.empty_like(k_order).scatter_(-1, k_order, torch.arange(Sk, device=dev).expand_as(k_order))
        pos = where.gather(-1, samples.flatten(2)).view_as(samples)
        ks, kl = rt[:, 2, None], rt[:, 3, None]
        nb = (kl + block_size - 1) // block_size
        sample_block = block_of_rank(pos - ks, kl, nb)
        levels.append(HyperLevel(rt, list(rects), q_order, k_order, samples, sample_block, logw))
    sinks = 0 if paper else min(sink_tokens, Sk)
    return HyperPattern(block_size, sample_size, planes, q_rank, k_rank, lo, hi, sinks, levels,
                        exact_apart=sinks == 0 and (paper or local_window == 0))


def num_blocks(k_len: int, block_size: int) -> int:
    return max(1, math.ceil(k_len / block_size))


def local_pattern(pattern: HyperPattern, rows: torch.Tensor) -> HyperPattern:
    """`pattern` restricted to query rows `rows` ((n,) increasing global indices, on the pattern's device):
    the same blocks and samples, for those rows only (context parallelism: a rank's shard). Per-row tensors
    keep the n rows; each level's q_order becomes the global sorted order filtered to these rows (local
    indices, order kept) and q_start marks where each block's share of it starts. No host sync."""
    n = rows.numel()
    local = torch.full_like(pattern.exact_lo, -1)
    local[rows] = torch.arange(n, device=rows.device)  # global row -> local row, -1 elsewhere
    levels = []
    for level in pattern.levels:
        loc = local[level.q_order]  # (B, Hq, Sq)
        mine = loc >= 0
        before = torch.nn.functional.pad(mine.cumsum(-1), (1, 0))  # local rows before each sorted rank
        # compact: a local row goes to its count of earlier local rows; the others to a dropped slot n
        slot = torch.where(mine, before[..., :-1], n)
        q_order = loc.new_empty(*loc.shape[:2], n + 1).scatter_(-1, slot, loc)[..., :n]
        # block j of rectangle r covers sorted ranks [qs + j*ql//nb, qs + (j+1)*ql//nb); j is clamped to nb
        qs, ql, kl = level.rects[:, 0, None], level.rects[:, 1, None], level.rects[:, 3, None]
        nb = (kl + pattern.block_size - 1) // pattern.block_size
        nb_max = max(num_blocks(r[3], pattern.block_size) for r in level.rect_list)
        j = torch.arange(nb_max + 1, device=rows.device)
        bounds = qs + (torch.minimum(j, nb) * ql) // nb  # (R, nb_max + 1)
        q_start = before[..., bounds.flatten()].view(*loc.shape[:2], *bounds.shape)
        levels.append(dataclasses.replace(level, q_order=q_order, q_start=q_start))
    return dataclasses.replace(pattern, q_rank=pattern.q_rank[..., rows], exact_lo=pattern.exact_lo[rows],
                               exact_hi=pattern.exact_hi[rows], levels=levels, rows=rows)
