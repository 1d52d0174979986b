"""Fitted parameters of the linear kind's far part, in a file: how a policy's `feature_params` reaches the op.

A calibration file (written by `longattn calibrate`, `longattn.calibrate`) is a safetensors file (or a
`torch.save` of a {name: tensor} dict when the name does not end in `.safetensors`) whose tensors are named

    layers.<i>.<name>      i: the layer index (the first integer of the site's module path)

with <name> one of the keys `feature_params` takes (see `__init__.py`): `far_scale` (Hq,), `q_weight`
(Hq, D, F), `k_weight` (Hkv, D, F), `q_bias`, `k_bias`, `weight`, `bias`. Its string metadata records how
it was fitted (`format`, `feature_map`, `sink_tokens`, `local_window`, the model, the text, ...).

A file written by a distillation with adapters (`distill_model(adapter_rank=r)`) also holds low-rank
corrections of the converted layers' projections, `adapters.<i>.<projection>.A` (r, in) and `.B` (out, r),
`.S` (out,) the row sums of the weight they were trained on (so a merge can check it), and the metadata key
`adapters`: the far part was trained on the projections W + B·A, so the model needs them merged (`longattn.calibrate.merge_adapters(model, FILE)`) before it is rewritten. They are no section.

A *reference* names a file and one section: "path/to/calib.safetensors#layers.21". The policy writes the
path; the rewriter appends "#layers.<i>" for the site it rewrites (the op sees only its band's params, not
the layer). A reference without "#" picks the file's only section, or tensors stored without a section
prefix. Files are read once per (path, size, mtime); errors name the file and the key.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Optional

import torch

from ...files import atomic_path  # a stdlib-only leaf module

FORMAT = "longattn-linear-calibration/1"
PARAM_NAMES = ("far_scale", "weight", "bias", "q_weight", "k_weight", "q_bias", "k_bias")
ADAPTERS = "adapters."


def section_name(layer_index: int) -> str:
    return f"layers.{int(layer_index)}"


def split_reference(ref: str) -> tuple[str, Optional[str]]:
    path, sep, section = ref.partition("#")
    return path, (section or None) if sep else None


@functools.lru_cache(maxsize=32)
def _load(path: str, size: int, mtime_ns: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError(f"linear_attention: reading {path} needs `pip install safetensors`") from None
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"linear_attention: cannot read calibration file {path}: {e}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"linear_attention: cannot read calibration file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"linear_attention: calibration file {path} must hold a dict of tensors")
    meta = data.pop("__metadata__", {}) if isinstance(data.get("__metadata__"), dict) else {}
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {k: str(v) for k, v in meta.items()}


def load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a calibration file, cached by path, size and modification time."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"linear_attention: calibration file not found: {path} "
                                "(feature_params; run `longattn calibrate` to write it)") from None
    return _load(path, st.st_size, st.st_mtime_ns)


def sections(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Section prefixes present ("layers.20", ...), in layer order."""
    found = {name.rsplit(".", 1)[0] for name in tensors if "." in name and not name.startswith(ADAPTERS)}
    return sorted(found, key=lambda s: (len(s), s))


def feature_params_from_file(ref: str) -> dict[str, torch.Tensor]:
    """The feature_params mapping named by a reference "path[#section]" (see the module docstring).
    Cached: every call of a site returns the same tensors (a fresh dict) until the file changes."""
    path, section = split_reference(ref)
    path = os.path.abspath(path)
    load_file(path)  # not-found error
    st = os.stat(path)
    return dict(_select(path, section, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=256)
def _select(path: str, section: Optional[str], size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    tensors, _ = _load(path, size, mtime_ns)
    present = sections(tensors)
    if section is None:
        bare = {k: v for k, v in tensors.items() if "." not in k}
        if bare:
            return bare
        if len(present) != 1:
            raise ValueError(f"linear_attention: {path} holds {len(present)} sections ({_list(present)}); "
                             "name one as feature_params: 'FILE#layers.N'")
        section = present[0]
    prefix = section + "."
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"linear_attention: calibration file {path} has no section {section!r} "
                         f"(it has: {_list(present) or 'none'}); calibrate this layer or map it to another kind")
    unknown = sorted(set(picked) - set(PARAM_NAMES))
    if unknown:
        raise ValueError(f"linear_attention: {path}#{section}: unknown parameter(s) {unknown} "
                         f"(known: {', '.join(PARAM_NAMES)})")
    return picked


def resolve_feature_params(value):
    """feature_params as the kernels take it: a reference string is loaded, anything else passes through."""
    return feature_params_from_file(value) if isinstance(value, str) else value


def file_metadata(path: str) -> dict[str, str]:
    return dict(load_file(path)[1])


def adapters_from_file(path: str) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """{layer index: {projection: (A, B, S)}} of a calibration file; empty when it has none."""
    tensors, _ = load_file(path)
    out: dict = {}
    for name, t in tensors.items():
        if name.startswith(ADAPTERS):
            layer, projection, factor = name[len(ADAPTERS):].split(".")
            out.setdefault(int(layer), {}).setdefault(projection, {})[factor] = t
    bad = [f"{i}.{p}" for i, ps in out.items() for p, ab in ps.items() if set(ab) != {"A", "B", "S"}]
    if bad:
        raise ValueError(f"linear_attention: {path}: adapter(s) {bad} lack one of A, B, S")
    return {i: {p: (ab["A"], ab["B"], ab["S"]) for p, ab in ps.items()} for i, ps in sorted(out.items())}


def save_file(path: str, layers: Mapping[int, Mapping[str, torch.Tensor]], metadata: Mapping[str, str],
              adapters: Optional[Mapping[int, Mapping[str, tuple]]] = None) -> None:
    """Write {layer index: {name: tensor}} (and {layer index: {projection: (A, B, S)}}) atomically (a temporary
    file in the same folder, then a rename)."""
    tensors = {}
    for layer, projections in (adapters or {}).items():
        for projection, factors in projections.items():
            for factor, t in zip("ABS", factors):
                tensors[f"{ADAPTERS}{int(layer)}.{projection}.{factor}"] = t.detach().to("cpu", torch.float32).contiguous()
    for layer, params in layers.items():
        for name, t in params.items():
            if name not in PARAM_NAMES:
                raise ValueError(f"save_file: unknown parameter {name!r} (known: {', '.join(PARAM_NAMES)})")
            tensors[f"{section_name(layer)}.{name}"] = torch.as_tensor(t).detach().to("cpu", torch.float32) \
                .contiguous()
    meta = {"format": FORMAT, **{str(k): str(v) for k, v in metadata.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file as st_save
            st_save(tensors, tmp, metadata=meta)
        else:
            torch.save({**tensors, "__metadata__": meta}, tmp)


def _list(names) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 6 else ", ".join(names[:3]) + f", ... ({len(names)} in all)"
