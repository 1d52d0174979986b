"""Rewrite FX attention sites into `torch.ops.longattn.attention` calls, by policy.

For each site found by the FX front end: ask the policy for its length bands, adapt them to
what the site allows, emit one op call, then verify it: the matched subgraph and the new call
run on the same random inputs (the exact kind standing in for approximate ones) and must
agree before the old subgraph's users are moved over. A mismatch leaves the site as it was.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401  (registers torch.ops.longattn.attention, which the rewritten graph calls)
from ..patterns.fx_attention import find_attention_sites
from ..patterns.fx_ops import metadata_asserts
from ..patterns.fx_eval import ancestors, concrete_shape, evaluate, generic_sizes, hint, meta_value
from ..patterns.record import AttentionSite, MaskTerm
from ..plan import Band, encode_plan
from .bands import fit_bands
from .report import Report, SiteReport
from .verification import MAX_VERIFY_SCORES, RewriteRejected

if TYPE_CHECKING:
    from .policy import Policy

# Verification runs at the traced sizes up to this many scores, above it at small lengths where the subgraph
# computes the same thing there (quicker), else at the traced sizes up to MAX_VERIFY_SCORES.
PREFER_TRACED_SCORES = 1 << 22


def rewrite_graph(gm: fx.GraphModule, policy: "Policy", *, verify: bool = True, frame_path: str = "") -> Report:
    """Rewrite `gm` in place; return the report of every site found. frame_path: the module path, in the
    model, of the compiled frame's `self` (see `patterns.fx_attention.layer_name`)."""
    sites = find_attention_sites(gm, frame_path)
    indices = [s.layer_index for s in sites if s.layer_index is not None]
    num_layers = max(indices) + 1 if indices else None
    report = Report(policy=policy.source)
    replaced = set()  # the rewritten sites' old chains
    for site in sites:
        if site.skipped:
            report.sites.append(SiteReport.from_site(site, status="skipped", reason=site.skip_reason))
            continue
        decision = policy.decide(site.layer, site.layer_index, num_layers)
        bands, notes = fit_bands(list(decision.bands), site)
        row = SiteReport.from_site(site, bands=bands, rule=decision.source, notes=notes)
        if all(b.kind == "exact" for b in bands):
            row.status = "exact"
            report.sites.append(row)
            continue
        try:
            emit(gm, site, bands, verify=verify)
            row.status = "rewritten"
            replaced.update(site.replaced)
        except RewriteRejected as e:
            row.status, row.reason = "skipped", str(e)
        report.sites.append(row)
    # an unused op of a replaced chain goes even where FX's DCE would keep it: it keeps aten.dropout (a random op, so
    # "impure"), and with it the S x S softmax of an exported graph (eval-mode dropout included). Only once every
    # site is emitted: a later site may read a node of an earlier one's chain.
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in replaced and n.is_impure())
    gm.graph.lint()
    gm.recompile()
    return report


# --- emission ------------------------------------------------------------------------------

def _combine_masks(graph: fx.Graph, terms: list[MaskTerm]):
    """One mask for the op: a bool keep-mask when there is a single boolean term, else a float sum."""
    if not terms:
        return None
    parts = []
    for t in terms:
        if t.kind == "boolean":
            keep = t.node if t.masked_when is False else graph.call_function(torch.logical_not, (t.node,))
            if len(terms) == 1:
                return keep
            parts.append(graph.call_function(torch.where, (keep, 0.0, -math.inf)))
        elif t.fill is not None:  # masked_fill / where with the dtype minimum: additive, exactly
            args = (t.node, t.fill, 0.0) if t.masked_when else (t.node, 0.0, t.fill)
            parts.append(graph.call_function(torch.where, args))
        else:
            parts.append(t.node)
    total = parts[0]
    for p in parts[1:]:
        total = graph.call_function(operator.add, (total, p))
    return total


def emit(gm: fx.GraphModule, site: AttentionSite, bands: list[Band], *, verify: bool) -> fx.Node:
    graph = gm.graph
    rank = len(concrete_shape(site.q) or ())
    with graph.inserting_before(site.output):
        q, k, v = site.q, site.k, site.v
        if site.scale_ref is not None:
            q = graph.call_function(operator.mul, (q, site.scale_ref))
        if site.k_transposed:
            k = graph.call_method("transpose", (k, -2, -1))
        mask = _combine_masks(graph, site.masks)
        if rank == 3:  # (B·H, S, D) from bmm-style code: one batch of B·H heads
            q, k, v = (graph.call_method("unsqueeze", (t, 0)) for t in (q, k, v))
            if mask is not None:
                mask = graph.call_method("unsqueeze", (mask, 0))
        seed = None
        if site.dropout_p > 0:
            seed = graph.call_function(torch.randint, (0, 2**62, ()))
        out = graph.call_function(torch.ops.longattn.attention.default,
                                  (q, k, v, mask, float(site.scale), bool(site.causal), float(site.dropout_p),
                                   seed, encode_plan(bands)))
        out.meta["longattn_layer"] = site.layer  # which report row the call is: the MLIR export names its op
        result = out
        if rank == 3:
            result = graph.call_method("squeeze", (result, 0))
        want = meta_value(site.output).dtype
        if want != meta_value(site.q).dtype:
            result = graph.call_method("to", (result, want))
    if verify:
        try:
            check_equivalent(site, result, out)
        except RewriteRejected:
            _erase_unused(graph, result)
            raise
    site.output.replace_all_uses_with(result)
    for node in site.replaced:  # metadata checks would keep the old subgraph alive
        for check in metadata_asserts(node):
            graph.erase_node(check)
    return result


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Remove `node` and the nodes only it used, if nothing else uses them (undo an emission)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


# --- verification --------------------------------------------------------------------------

@contextlib.contextmanager
def _exact_and_deterministic(site: AttentionSite, op_node: fx.Node):
    """During verification the op runs the exact kind and neither side applies dropout."""
    saved = [(op_node, op_node.args, op_node.kwargs)]
    args = list(op_node.args)
    args[6], args[8] = 0.0, encode_plan([Band("exact")])
    op_node.args = tuple(args)
    for n in site.replaced:
        if n.op == "call_function" and "dropout" in str(n.target):
            saved.append((n, n.args, n.kwargs))
            kw = dict(n.kwargs)
            if len(n.args) > 2:
                n.args = n.args[:2] + (False,) + n.args[3:]
            else:
                kw["training" if "training" in kw or n.target is torch.nn.functional.dropout else "train"] = False
            n.kwargs = kw
    try:
        yield
    finally:
        for n, a, kw in saved:
            n.args, n.kwargs = a, kw


def _random_like(node: fx.Node, sizes, gen: torch.Generator, masked_when: Optional[bool] = None):
    """Random values for `node` at `sizes`, on its device; drawn on the CPU from `gen` so the
    user's random streams (CPU and CUDA) are left alone."""
    val = meta_value(node)
    shape = [int(sizes(d)) for d in val.shape]
    if val.dtype == torch.bool:
        keep = torch.rand(shape, generator=gen) > 0.3
        keep[..., 0] = True  # every row keeps a key: fully masked rows are where kinds may differ
        return (keep if masked_when is False else ~keep).to(val.device)
    return torch.randn(shape, generator=gen).to(device=val.device, dtype=val.dtype)


def _scores(site: AttentionSite, sizes) -> int:
    scores = 1
    for d in (meta_value(site.q).shape[:-1]) + (meta_value(site.v).shape[-2],):
        scores *= int(sizes(d))
    return scores


def verification_sizes(site: AttentionSite):
    """The traced sizes when the scores are few enough to evaluate; else small lengths at which the matched
    subgraph computes the same thing (fx_eval.generic_sizes), for static and dynamic graphs alike."""
    traced = _scores(site, hint)
    if traced <= PREFER_TRACED_SCORES:
        return hint
    inputs = {site.q, site.k, site.v, site.scale_ref, *(t.node for t in site.masks)}
    subgraph = ancestors(site.output, stop=lambda n: n in inputs)
    other_dims = [d for t in (site.q, site.k, site.v) for d in (meta_value(t).shape[:-2] + meta_value(t).shape[-1:])]
    sizes = generic_sizes((site.q_len, site.k_len), subgraph, other_dims)
    if sizes is None:
        if traced <= MAX_VERIFY_SCORES:
            return hint
        raise RewriteRejected(f"too large to verify at the traced length ({traced} scores), and the length equals "
                              "another dim of q/k/v, so it cannot be verified at a small one")
    scores = _scores(site, sizes)
    if scores > MAX_VERIFY_SCORES:
        raise RewriteRejected(f"too large to verify even at small lengths ({scores} scores from length "
                              f"{sizes.smallest} on, above the subgraph's integer constants)")
    return sizes


def check_equivalent(site: AttentionSite, result: fx.Node, op_node: fx.Node) -> None:
    """Run the matched subgraph and the replacement on the same random inputs; raise if they differ."""
    sizes = verification_sizes(site)
    gen = torch.Generator().manual_seed(0)
    try:
        env = {n: _random_like(n, sizes, gen) for n in (site.q, site.k, site.v)}
        for t in site.masks:
            env[t.node] = _random_like(t.node, sizes, gen, masked_when=t.masked_when)
        if site.scale_ref is not None:
            env[site.scale_ref] = float(sizes(meta_value(site.scale_ref)))
        with _exact_and_deterministic(site, op_node), torch.no_grad():
            expected, got = evaluate([site.output, result], env, sizes)
    except RewriteRejected:
        raise
    except Exception as e:
        raise RewriteRejected(f"could not verify the rewrite ({type(e).__name__}: {e})") from None
    tol = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    if expected.shape != got.shape or not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol):
        err = (got.float() - expected.float()).abs().max().item() if expected.shape == got.shape else "shape"
        raise RewriteRejected(f"replacement disagrees with the original subgraph on random inputs (max err {err})")
