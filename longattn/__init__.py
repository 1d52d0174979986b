"""longattn: rewrite softmax attention in traced models into long-context kernels.

The public names load on first use (PEP 562), so that loading a policy or converting an ONNX model
does not import torch and Triton. When torch is already imported (`import torch, longattn`), the
op `torch.ops.longattn.attention` and the torch.compile backend "longattn" are registered at once,
as the pip entry point would, for a source tree on PYTHONPATH and for loading saved programs.
"""
import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "explain": "api", "rewrite": "api", "last_report": "api", "reports": "api", "clear_reports": "api",
    "Policy": "rewriter.policy", "PolicyError": "rewriter.policy", "load_policy": "rewriter.policy",
    "Report": "rewriter.report",
}
__all__ = ["explain", "last_report", "reports", "clear_reports", "rewrite", "Policy", "PolicyError", "load_policy",
           "Report", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # a submodule: longattn.kernels, longattn.onnx, ... after a bare `import longattn`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if "torch" in sys.modules:
    from .backends import torch_compile  # noqa: F401,E402  (imports the kernels: the op and the backend)
