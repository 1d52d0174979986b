"""`torch.compile(model, backend="longattn", options={...})`.

Dynamo hands us each captured graph before autograd; we rewrite its attention sites into
`torch.ops.longattn.attention` by policy and pass the graph on to an inner backend (inductor
by default), which traces the op's registered autograd for training.

Options: `policy` (path, dict or Policy; default: the built-in policy), `inner` ("inductor",
"aot_eager", "eager" or any registered backend name), `verify` (check each rewrite on random
inputs at compile time; default True).
"""
from __future__ import annotations

import collections
import sys
import threading
import weakref

import torch

from ..rewriter.fx_rewrite import rewrite_graph
from ..rewriter.policy import load_policy
from ..rewriter.report import Report

_state = threading.local()
KNOWN_OPTIONS = ("policy", "inner", "verify")


def last_report() -> Report | None:
    """Report of the latest graph compiled with backend="longattn" in this thread."""
    return getattr(_state, "last", None)


def reports() -> list[Report]:
    """Reports of the graphs compiled with backend="longattn" in this thread since `clear_reports()`,
    oldest first (at most the last 1000): a model with graph breaks compiles one graph per piece."""
    return list(_history())


def clear_reports() -> None:
    _history().clear()


def _history() -> collections.deque:
    if not hasattr(_state, "history"):
        _state.history = collections.deque(maxlen=1000)
    return _state.history


def _remember(report: Report) -> None:
    _state.last = report
    _history().append(report)


def compile_inner(gm: torch.fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs)


# module -> its dotted path in the module whose paths name layers (`_root_module`)
_module_paths: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _root_module(inner: torch.nn.Module) -> torch.nn.Module:
    """The module whose paths the policy's layer names follow, found on the Python call stack (the frames
    running eagerly around the one dynamo compiles): the compiled module for `torch.compile(model)`, else
    the outermost module on the stack that contains `inner` (`model.forward = torch.compile(model.forward)`
    called from `model.generate`), else `inner` itself."""
    from torch._dynamo.eval_frame import OptimizedModule
    root, frame = inner, sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, OptimizedModule):
            compiled = owner._orig_mod
            return compiled if any(m is inner for m in compiled.modules()) else root
        if isinstance(owner, torch.nn.Module) and owner is not root and any(m is root for m in owner.modules()):
            root = owner
        frame = frame.f_back
    return root


def frame_path() -> str:
    """Path, in the model, of the module whose forward dynamo is compiling now ("" for the model itself).

    After a graph break inside a submodule, dynamo compiles that submodule's forward as a frame of its own
    (transformers 5.17 does this for T5's decoder), and the graph's module paths then start at that
    submodule: `block.0...` where the model says `decoder.block.0...`. The frame's module is looked up in
    the model found on the call stack (`_root_module`), whichever frame compiles first. Reads the frame
    through dynamo's private `InstructionTranslator.current_tx()`; without it (another torch), paths stay
    relative to the frame."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        frame_self = InstructionTranslator.current_tx().f_locals.get("self")
    except Exception:  # noqa: BLE001 - private API; relative paths are the fallback
        return ""
    if not isinstance(frame_self, torch.nn.Module):
        return ""
    if frame_self not in _module_paths:
        for name, module in _root_module(frame_self).named_modules(remove_duplicate=False):
            _module_paths.setdefault(module, name)
    return _module_paths.get(frame_self, "")


def longattn_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **_):
    options = dict(options or {})
    unknown = set(options) - set(KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"backend='longattn': unknown option(s) {sorted(unknown)}; known: {list(KNOWN_OPTIONS)}")
    policy = load_policy(options.get("policy"))
    report = rewrite_graph(gm, policy, verify=options.get("verify", True), frame_path=frame_path())
    _remember(report)
    return compile_inner(gm, example_inputs, options.get("inner", "inductor"))


def _register() -> None:
    """Make backend="longattn" work on `import longattn` too, not only through the pip entry
    point (e.g. when run from a source tree on PYTHONPATH)."""
    from torch._dynamo import list_backends, register_backend
    if "longattn" not in list_backends(exclude_tags=()):
        register_backend(longattn_backend, name="longattn")


_register()
