"""MLIR export of rewritten models through torch-mlir (`pip install "longattn[mlir]"`).

    module, report = longattn.mlir.export(model, ids, policy="p.yaml", output_type="raw")
    longattn.mlir.save(module, "model.mlir")

`output_type` "raw" and "torch" keep each rewritten site as one `torch.operator "torch.longattn.attention"` with
`longattn.*` attributes (the op contract is in the README, "MLIR export"); "linalg-on-tensors", "stablehlo" and
"tosa" decompose each site into its reference computation in standard ops first, and refuse, naming the site, a
kind that has none. Each rewritten site's report row notes which path it took. The export is static: the
example inputs' shapes are the module's.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from .api import _as_args, rewrite
from .backends.mlir import (INSTALL_HINT, KEEPS_SITES, NOTE, OUTPUT_TYPES, MlirExportError, check_output_type,
                            load_torch_mlir, to_mlir)
from .files import atomic_path


def export(model, *example_inputs, policy=None, output_type: str = "raw", verify: bool = True):
    """Rewrite `model` by `policy` (as `longattn.rewrite`: an nn.Module with example inputs, a trailing dict taken
    as keyword arguments, or an ExportedProgram) and import it into MLIR. Returns (torch_mlir.ir.Module, Report).
    `verify`: the rewrite's per-site check, and for lowered outputs each decomposed site against the op."""
    check_output_type(output_type)
    load_torch_mlir()  # say how to install it before the rewrite, not after
    if isinstance(model, torch.export.ExportedProgram):
        args, kwargs = model.example_inputs or ((), {})
        if example_inputs:
            args, kwargs = _as_args(example_inputs)
    else:
        args, kwargs = _as_args(example_inputs)
    gm, report = rewrite(model, *example_inputs, policy=policy, verify=verify)
    module = to_mlir(gm, report, args, kwargs, output_type, verify=verify)
    return module, report


def save(module, path: Union[str, os.PathLike]) -> None:
    """Write the module's text (weights included) atomically: a failure never leaves a partial file."""
    with atomic_path(os.fspath(path)) as tmp, open(tmp, "w") as f:
        module.operation.print(file=f)


__all__ = ["export", "save", "load_torch_mlir", "OUTPUT_TYPES", "KEEPS_SITES", "NOTE", "INSTALL_HINT",
           "MlirExportError"]
