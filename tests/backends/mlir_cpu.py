"""Run a linalg-on-tensors module on the CPU with what the torch-mlir wheel ships.

The wheel has no `torch_mlir_e2e_test` (the reference backend's Python side), but it has MLIR's ExecutionEngine
(`torch_mlir.execution_engine`), the memref helpers (`torch_mlir.runtime`) and the reference backend's passes
(`refback-*`). This lowers the module to LLVM with those passes and upstream ones, in the order the reference
backend uses, and JIT-runs it. `refback-munge-calling-conventions` makes every argument an unranked memref and
hands the results to a callback named after their types, `refbackend_consume_func_return_<t1>_<t2>...`.
"""
from __future__ import annotations

import ctypes

import numpy as np

LLVM_PIPELINE = "builtin.module(" + ",".join([
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)", "convert-shape-to-std",
    "func.func(refback-generalize-tensor-pad)", "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize", "func.func(buffer-deallocation-pipeline)", "inline",
    "refback-munge-calling-conventions", "func.func(tm-tensor-to-loops)", "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)", "func.func(lower-affine)", "convert-scf-to-cf",
    "func.func(refback-expand-ops-for-llvm)", "func.func(arith-expand)", "func.func(convert-math-to-llvm)",
    "convert-math-to-libm", "expand-strided-metadata", "finalize-memref-to-llvm", "lower-affine", "convert-scf-to-cf",
    "convert-bufferization-to-memref", "finalize-memref-to-llvm", "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm", "convert-complex-to-llvm",
    "reconcile-unrealized-casts"]) + ")"

RETURN_PREFIX = "refbackend_consume_func_return_"
MEMREF_DTYPES = {"mrf16": np.float16, "mrf32": np.float32, "mrf64": np.float64, "mri1": np.bool_,
                 "mri8": np.int8, "mri16": np.int16, "mri32": np.int32, "mri64": np.int64}


def run(module, *inputs: np.ndarray, func: str = "main") -> list[np.ndarray]:
    """Lower `module` (linalg-on-tensors; lowered in place) to LLVM, run `func` on `inputs`, return its results."""
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import UnrankedMemRefDescriptor, get_unranked_memref_descriptor, unranked_memref_to_numpy

    with module.context:
        PassManager.parse(LLVM_PIPELINE).run(module.operation)
    names = [op.attributes["sym_name"].value for op in module.body.operations if "sym_name" in op.attributes]
    engine = ExecutionEngine(module, opt_level=0)
    results, callbacks = [], []
    for name in names:
        if not name.startswith(RETURN_PREFIX):
            continue
        types = name[len(RETURN_PREFIX):].split("_")
        if any(t not in MEMREF_DTYPES for t in types):
            raise NotImplementedError(f"{name}: only tensor results are handled here")

        def consume(*memrefs, types=types):  # copied at once: the module frees its buffers after the call
            results.extend(np.array(unranked_memref_to_numpy(m, MEMREF_DTYPES[t]), copy=True)
                           for m, t in zip(memrefs, types))
        callback = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(types))(consume)
        callbacks.append(callback)  # kept alive while the engine may call it
        engine.register_runtime(name, callback)
    arrays = [np.ascontiguousarray(x) for x in inputs]
    engine.invoke(func, *[ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))) for a in arrays])
    return results
