"""The public Python API: explain, rewrite, last_report."""
from __future__ import annotations

import torch

from .backends.torch_compile import clear_reports, last_report, longattn_backend, reports
from .rewriter.fx_rewrite import rewrite_graph
from .rewriter.policy import load_policy
from .rewriter.report import Report


def _as_args(example_inputs):
    args, kwargs = [], {}
    for x in example_inputs:
        if isinstance(x, dict):
            kwargs.update(x)
        else:
            args.append(x)
    return tuple(args), kwargs


def explain(model: torch.nn.Module, *example_inputs, policy=None) -> Report:
    """Trace `model` on the inputs (a trailing dict is taken as keyword arguments) and report
    every attention site and what the policy would do with it. The model is run once under
    torch.compile with an eager inner backend (PyTorch's fused nn.Transformer fast path off);
    dynamo's caches are reset before and after."""
    policy = load_policy(policy)
    report = Report(policy=policy.source)

    def collect(gm, inputs):
        report.extend(rewrite_graph(gm, policy))
        return gm.forward

    args, kwargs = _as_args(example_inputs)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused nn.Transformer path hides attention
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=collect)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return report


def _export_kv_cache_support(model: torch.nn.Module) -> None:
    """torch.export cannot return transformers' DynamicCache (a causal LM returns its KV cache by
    default) until the class is a pytree: transformers' own export helper registers it (once)."""
    if not type(model).__module__.startswith("transformers."):
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return
    register_dynamic_cache_export_support()


def rewrite(module_or_program, *example_inputs, policy=None, verify: bool = True):
    """Export (pre-dispatch ATen graph, so training works through the op's backward), rewrite
    the attention sites, and return (GraphModule, Report). Accepts an nn.Module with example
    inputs or an ExportedProgram."""
    policy = load_policy(policy)
    if isinstance(module_or_program, torch.export.ExportedProgram):
        program = module_or_program
    else:
        args, kwargs = _as_args(example_inputs)
        _export_kv_cache_support(module_or_program)
        try:
            program = torch.export.export(module_or_program, args, kwargs, strict=False)
        except RuntimeError as err:
            if "Cache" in str(err) and "not a known type" in str(err):
                raise RuntimeError("torch.export cannot return the model's KV cache (transformers' Cache classes "
                                   "are not pytrees): pass use_cache=False among the example inputs") from err
            raise
    gm = program.module()
    report = rewrite_graph(gm, policy, verify=verify)
    return gm, report


__all__ = ["explain", "rewrite", "last_report", "reports", "clear_reports", "longattn_backend"]
