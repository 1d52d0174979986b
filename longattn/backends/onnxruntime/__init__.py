"""The onnxruntime backend: a C++ custom-op library with CPU kernels for the `ai.longattn` nodes.

Build it with `python -m longattn.backends.onnxruntime.build` (compiles `csrc/register.cc` against the
vendored onnxruntime API headers with the system C++ compiler). `library_path()` finds the built
library; `longattn.onnx.session` registers it.
"""
from __future__ import annotations

import os
from typing import Optional

LIBRARY_NAME = "liblongattn_ort.so"


def default_build_dir() -> str:
    """Where the build puts the library: $LONGATTN_ORT_BUILD_DIR, else ~/.cache/longattn/onnxruntime
    (outside the source tree, so a checkout stays clean and an installed package can build too)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("LONGATTN_ORT_BUILD_DIR") or os.path.join(cache, "longattn", "onnxruntime")


def library_path() -> Optional[str]:
    """Path of the built custom-op library ($LONGATTN_ORT_LIBRARY overrides), or None if not built."""
    explicit = os.environ.get("LONGATTN_ORT_LIBRARY")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    path = os.path.join(default_build_dir(), LIBRARY_NAME)
    return path if os.path.exists(path) else None


def library_fallback_reason(kind: str, params: dict):
    """Why the library runs this band as exact attention instead of `kind`, or None when it runs the
    kind itself (mirrors linear_supported in csrc/register.cc)."""
    if kind != "linear":
        return None
    fmap = params.get("feature_map", "elu")
    if fmap not in ("elu", "relu", "identity", "favor", "taylor2", "none"):
        return f"feature_map={fmap}"
    if params.get("update_rule", "add") != "add":
        return f"update_rule={params['update_rule']}"
    if params.get("normalize", True) is False:
        return "normalize=false"
    if "feature_params" in params or "beta" in params:
        return "calibrated feature_params" if "feature_params" in params else "beta"
    return None


def library_notes(bands) -> list[str]:
    """The report's notes on the bands this library runs as exact attention (see library_fallback_reason)."""
    notes = []
    for b in bands:
        why = library_fallback_reason(b.kind, b.params)
        if why:
            notes.append(f"the onnxruntime library runs {b.kind} ({why}) as exact attention")
    return notes
