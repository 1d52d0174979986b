"""The onnxruntime backend: a C++ custom-op library with CPU kernels for the `ai.longattn` nodes.

`ensure_library()` builds it on first use (compiles `csrc/register.cc` against the vendored onnxruntime API
headers with the system C++ compiler, for this CPU) and reuses it after; `longattn.onnx.session` and
`longattn convert --check` call it. `python -m longattn.backends.onnxruntime.build` builds it ahead of time
(packagers, machines without a compiler at run time); LONGATTN_ORT_AUTOBUILD=0 turns the build on use off.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from typing import Optional

LIBRARY_NAME = "liblongattn_ort.so"


def cpu_key() -> str:
    """This CPU's kind and instruction-set extensions, short: the library is built with -march=native, so one
    built on an AVX-512 machine must not load on an AVX2 one that shares the cache folder (a home on NFS)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def default_build_dir() -> str:
    """Where the build puts the library: $LONGATTN_ORT_BUILD_DIR, else ~/.cache/longattn/onnxruntime/<cpu_key>
    (outside the source tree, so a checkout stays clean and an installed package can build too)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("LONGATTN_ORT_BUILD_DIR") or os.path.join(cache, "longattn", "onnxruntime", cpu_key())


def library_path() -> Optional[str]:
    """Path of the built custom-op library ($LONGATTN_ORT_LIBRARY overrides), or None if not built."""
    explicit = os.environ.get("LONGATTN_ORT_LIBRARY")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    path = os.path.join(default_build_dir(), LIBRARY_NAME)
    return path if os.path.exists(path) else None


def ensure_library() -> tuple[Optional[str], Optional[str]]:
    """(path, None) for a library built for this CPU and these sources, building it now when it is missing or
    stale; else (None, why not). $LONGATTN_ORT_LIBRARY is taken as given; LONGATTN_ORT_AUTOBUILD=0 only looks."""
    explicit = os.environ.get("LONGATTN_ORT_LIBRARY")
    if explicit:
        return (explicit, None) if os.path.exists(explicit) else (None, f"LONGATTN_ORT_LIBRARY={explicit} does not exist")
    if os.environ.get("LONGATTN_ORT_AUTOBUILD", "1") == "0":
        path = library_path()
        return (path, None) if path else (None, "not built, and LONGATTN_ORT_AUTOBUILD=0 "
                                                "(python -m longattn.backends.onnxruntime.build)")
    from .build import BuildError, build, up_to_date
    try:
        if not up_to_date():
            print("longattn: building the onnxruntime custom-op library for this CPU (once, about half a minute) ...",
                  file=sys.stderr, flush=True)
        return build(quiet=True), None
    except BuildError as e:
        return None, f"the library could not be built: {str(e).splitlines()[0]}"


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
