"""The ONNX path: convert exported models by policy, save them safely, run them in onnxruntime.

    model, report = longattn.onnx.convert("model.onnx", policy="policy.yaml")
    longattn.onnx.save(model, "out/model.onnx")
    sess = longattn.onnx.session("out/model.onnx")          # our custom-op library registered

Converted models carry `ai.longattn` nodes and their ONNX function bodies (exact attention), so
they also run in a stock onnxruntime; `session` registers the native kernels (building the library for
this CPU on first use) and warns, saying why, when it falls back.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import onnx

from .files import give_normal_mode

if TYPE_CHECKING:  # the rewriter (and torch) load only when converting, not to run a model
    from .rewriter.report import Report

# Protobuf cannot serialise a message of 2 GiB or more: such models keep their weights outside.
PROTO_LIMIT = (1 << 31) - (1 << 26)


def _policy(policy):
    if hasattr(policy, "decide"):
        return policy
    from .rewriter.policy import load_policy
    return load_policy(policy)


def load(path: str) -> onnx.ModelProto:
    """Load the graph only (external data stays referenced, not read): cheap at any size."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200] or 'truncated?'})") \
            from None
    if model.ir_version == 0 or not model.HasField("graph"):  # an empty file parses as an empty message
        raise ValueError(f"{path}: not a readable ONNX model (no IR version or graph: empty or not ONNX)")
    return model


def convert(model_or_path: Union[str, os.PathLike, onnx.ModelProto], policy=None, check: bool = False, *,
            verify: bool = True, check_length: Optional[int] = None) -> tuple[onnx.ModelProto, "Report"]:
    """Rewrite every attention site of an ONNX model by `policy` (a path, dict, Policy or None for
    the built-in policy). Returns (converted model, report); the input is never modified. Models
    given by path may use external data (any size: the graph is rewritten before the weights are
    read; the returned model holds them in memory and `save` writes them out again). With `check`, the converted model must pass
    `onnx.checker.check_model(full_check=True)` and both models run on random inputs; the max
    error per output lands in `report.checks`."""
    from .backends.onnxruntime import library_notes
    from .rewriter.onnx_rewrite import rewrite_model
    policy = _policy(policy)
    if isinstance(model_or_path, onnx.ModelProto):
        source = onnx.ModelProto()
        source.CopyFrom(model_or_path)
        base_dir = ""
    else:
        path = os.fspath(model_or_path)
        source = load(path)
        base_dir = os.path.dirname(os.path.abspath(path))
    converted, report = rewrite_model(source, policy, verify=verify, base_dir=base_dir, band_notes=library_notes)
    if base_dir and has_external_data(converted):
        onnx.load_external_data_for_model(converted, base_dir)
    report.checks = {}
    if check:
        _check(model_or_path, converted, base_dir, report, check_length)
    return converted, report


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _check(original, converted, base_dir, report, length):
    with tempfile.TemporaryDirectory(prefix="longattn-check-") as tmp:
        conv_path = os.path.join(tmp, "converted.onnx")
        save(converted, conv_path)
        onnx.checker.check_model(conv_path, full_check=True)
        orig_path = original if not isinstance(original, onnx.ModelProto) else os.path.join(tmp, "original.onnx")
        if isinstance(original, onnx.ModelProto):
            save(original, orig_path)
        report.checks = compare_outputs(os.fspath(orig_path), conv_path, length=length)


def random_inputs(sess, length: Optional[int] = None, seed: int = 0, sizes: Optional[dict] = None) -> dict:
    """Random feeds for a session's declared inputs; symbolic dims take their value in `sizes` (by name), else
    1 for batch-like names and `length` (default 16) for the others."""
    rng = np.random.default_rng(seed)
    feeds = {}
    sizes = sizes or {}
    for inp in sess.get_inputs():
        shape = []
        for d in inp.shape:
            if isinstance(d, int):
                shape.append(d)
            elif d in sizes:
                shape.append(sizes[d])
            else:
                name = str(d).lower()
                shape.append(1 if "batch" in name else (length or 16))
        t = inp.type
        if "int" in t:
            feeds[inp.name] = rng.integers(0, 2 if "mask" in inp.name.lower() else 16, shape).astype(
                np.int64 if "int64" in t else np.int32)
            if "mask" in inp.name.lower():
                feeds[inp.name][..., 0] = 1
        elif "bool" in t:
            feeds[inp.name] = rng.random(shape) > 0.2
        else:
            dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(t, np.float32)
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compare_outputs(original_path: str, converted_path: str, *, length: Optional[int] = None,
                    use_library: bool = False) -> dict:
    """Run both models on the same random inputs; {output name: max abs error}."""
    import onnxruntime as ort
    a = ort.InferenceSession(original_path, providers=["CPUExecutionProvider"])
    b = session(converted_path) if use_library else ort.InferenceSession(converted_path,
                                                                          providers=["CPUExecutionProvider"])
    feeds, out_a = _runnable_inputs(a, original_path, length)
    out_b = b.run(None, feeds)
    return {o.name: float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            for o, x, y in zip(a.get_outputs(), out_a, out_b)}


def _runnable_inputs(sess, path: str, length: Optional[int]) -> tuple[dict, list]:
    """(feeds, outputs) of the first size assignment the original model runs with. A symbolic dim that is no
    sequence (a hidden size) must match the weights: if every non-batch dim at `length` does not run, such dims
    try the sizes the model's weights have, smallest first."""
    seq_like = ("seq", "len", "time", "past", "total", "token", "position", "step")
    free = sorted({d for i in sess.get_inputs() for d in i.shape
                   if isinstance(d, str) and "batch" not in d.lower() and not any(w in d.lower() for w in seq_like)})
    tries = [{}] + [{d: size for d in free} for size in (_weight_sizes(path) if free else [])][:16]
    import onnxruntime as ort
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a try that does not fit is expected, not an error to print
    first_error = None
    for sizes in tries:
        feeds = random_inputs(sess, length, sizes=sizes)
        try:
            return feeds, sess.run(None, feeds, quiet)
        except Exception as e:  # onnxruntime's shape errors: try the next assignment
            first_error = first_error or e
    raise ValueError(f"the original model does not run on random inputs with its symbolic dims at {length or 16} "
                     f"(or at its weights' sizes): {str(first_error)[:300]}")


def _weight_sizes(path: str) -> list[int]:
    """The distinct dims (> 1) of the model's initializers, smallest first."""
    graph = load(path).graph
    return sorted({int(d) for t in graph.initializer for d in t.dims if d > 1})


def save(model: onnx.ModelProto, path: Union[str, os.PathLike], *, external_data: Optional[bool] = None) -> None:
    """Write `model` atomically: into a temporary folder beside `path`, then renamed into place (the
    data file first, the model last), so a failure never leaves a half-written model. Weights go to
    `<name>.data` when asked to, or when the model would pass protobuf's 2 GiB limit."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if has_external_data(model):
        raise ValueError("save(): the model references external data not loaded; use the model convert() returned")
    if external_data is None:
        external_data = model.ByteSize() > PROTO_LIMIT
    if external_data:
        from .rewriter.onnx_rewrite import copy_model
        model = copy_model(model)  # onnx.save moves the tensors out of the proto it is given
    tmp = tempfile.mkdtemp(dir=directory, prefix=".longattn-")
    try:
        name = os.path.basename(path)
        location = name + ".data"
        onnx.save(model, os.path.join(tmp, name), save_as_external_data=external_data,
                  all_tensors_to_one_file=True, location=location, size_threshold=1024)
        if external_data and os.path.exists(os.path.join(tmp, location)):
            give_normal_mode(os.path.join(tmp, location))  # onnx writes it 0600
            os.replace(os.path.join(tmp, location), os.path.join(directory, location))
        give_normal_mode(os.path.join(tmp, name))
        os.replace(os.path.join(tmp, name), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def session(path: Union[str, os.PathLike, bytes], *, providers=None, sess_options=None, **ort_options):
    """An onnxruntime InferenceSession with the longattn custom-op library registered, so the
    `ai.longattn` nodes run our CPU kernels. Other keyword arguments set SessionOptions fields
    (e.g. intra_op_num_threads=2). The library is built on first use (`ensure_library`). If it cannot be
    built, or the model's attention is not float32 (the kernels' type), the model's function bodies (exact
    attention) run instead and a warning says why."""
    import onnxruntime as ort
    from .backends.onnxruntime import ensure_library
    options = sess_options or ort.SessionOptions()
    for key, value in ort_options.items():
        if not hasattr(options, key):
            raise TypeError(f"session(): onnxruntime.SessionOptions has no field {key!r}")
        setattr(options, key, value)
    lib, why_not = ensure_library()
    attention_type = _attention_elem_type(path)
    if lib is None:
        warnings.warn(f"longattn: no onnxruntime custom-op library ({why_not}); ai.longattn nodes run their "
                      "ONNX function bodies (exact attention, no approximation, not the fast kernels)",
                      RuntimeWarning, stacklevel=2)
    elif attention_type not in (None, onnx.TensorProto.FLOAT):
        warnings.warn(f"longattn: the custom-op kernels are float32; this model's attention is "
                      f"{onnx.TensorProto.DataType.Name(attention_type).lower()}: its ONNX function bodies run "
                      "(exact attention) instead", RuntimeWarning, stacklevel=2)
    else:
        options.register_custom_ops_library(lib)
    path = os.fspath(path) if not isinstance(path, bytes) else path
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


def _attention_elem_type(model) -> Optional[int]:
    """The float type the model's ai.longattn functions compute in (None when it has none)."""
    from .rewriter.onnx_functions import DOMAIN
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(os.fspath(model),
                                                                                        load_external_data=False)
    except Exception:
        return None
    for f in proto.functions:
        if f.domain == DOMAIN:
            for node in f.node:
                if node.op_type == "Cast" and node.output[0] == "scale_t":
                    return next(a.i for a in node.attribute if a.name == "to")
    return None


__all__ = ["convert", "save", "load", "session", "compare_outputs", "random_inputs"]
