"""MLIR export of a rewritten graph through torch-mlir (`longattn.mlir` is the public face).

    module = to_mlir(gm, report, args, kwargs, output_type="raw")

`gm` is `longattn.rewrite`'s graph. It is exported again (static shapes, its non-tensor inputs fixed, so the MLIR
function takes the tensor inputs in order) and imported by torch-mlir's FX importer:

- `raw` and `torch` keep every rewritten site as one `torch.operator "torch.longattn.attention"` carrying
  `longattn.*` attributes (`attributes.py`). `torch` runs torch-mlir's FX-to-torch-backend pipeline with an
  extra library declaring the op value-semantic, which is what its ReduceOpVariants pass asks of a custom op to
  leave it alone (without it: "failed to legalize operation 'torch.operator'").
- `linalg-on-tensors`, `stablehlo`, `tosa` cannot carry an op torch-mlir does not know, so each site is first
  replaced by its reference computation in standard ops (`decompose.py`), checked against the op on random
  inputs, and refused with the site named where its kind has no such form.

Each rewritten site's report row gets a note saying which path it took. torch-mlir is imported here, lazily,
and nowhere else in longattn (a contract in pyproject.toml).
"""
from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import torch
import torch.utils._pytree as pytree

from ...rewriter.report import Report
from . import decompose
from .attributes import OP_NAME, KeptSite, annotate, longattn_ops

OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "stablehlo", "tosa")
KEEPS_SITES = ("raw", "torch")
INSTALL_HINT = 'MLIR export needs torch-mlir: pip install "longattn[mlir]" (or pip install torch-mlir)'
NOTE = "mlir: "  # the prefix of the report note that says what became of a site

# torch-mlir's ReduceOpVariants leaves a torch.operator alone only when this library says it has value semantics
_VALUE_SEMANTICS_LIBRARY = ('module {\n  func.func @"__torch_mlir_has_value_semantics_fn.%s"() {\n    return\n  }\n}\n'
                            % OP_NAME)
# FX import -> torch backend, as torch_mlir.fx runs it; %s: the pipeline's options
_TO_TORCH = ("builtin.module(func.func(torch-match-quantized-custom-ops), "
             "torchdynamo-export-to-torch-backend-pipeline%s)")
_LOWER = {  # torch backend -> the output type (the pipelines torch_mlir.compiler_utils runs)
    "linalg-on-tensors": "builtin.module(torch-backend-to-linalg-on-tensors-backend-pipeline{allow-non-finites=true})",
    "stablehlo": "builtin.module(torch-backend-to-stablehlo-backend-pipeline{allow-non-finites=true})",
    "tosa": "builtin.module(torch-backend-to-tosa-backend-pipeline)",
}


class MlirExportError(ValueError):
    pass


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"longattn.mlir: output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def load_torch_mlir() -> SimpleNamespace:
    """The torch-mlir modules export uses; ImportError saying how to install it when it is missing."""
    try:
        from torch_mlir import fx, ir, passmanager
        from torch_mlir.dialects import torch as torch_dialect
        from torch_mlir.extras.fx_importer import FxImporter
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return SimpleNamespace(fx=fx, ir=ir, passmanager=passmanager, torch_dialect=torch_dialect, FxImporter=FxImporter)


# --- the program torch-mlir imports -------------------------------------------------------------

class _TensorInputs(torch.nn.Module):
    """The rewritten graph with its non-tensor inputs (use_cache=False, ...) fixed: torch-mlir would make each one
    a function argument (!torch.bool), which the lowered outputs and their callers cannot take."""

    def __init__(self, gm: torch.fx.GraphModule, leaves: list, spec):
        super().__init__()
        self.graph_module = gm
        self._leaves, self._spec = leaves, spec

    def forward(self, *tensors):
        given = iter(tensors)
        leaves = [next(given) if isinstance(x, torch.Tensor) else x for x in self._leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return self.graph_module(*args, **kwargs)


def export_program(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    for module in gm.modules():
        # torch-mlir's frozen import looks every buffer up in the state dict, where non-persistent ones are not
        # (KeyError 'rotary_emb.inv_freq'); gm is longattn.rewrite's own copy, so they are made persistent here
        for name in list(module._non_persistent_buffers_set):
            module.register_buffer(name, module._buffers[name], persistent=True)
    try:
        return torch.export.export(_TensorInputs(gm, leaves, spec),
                                   tuple(x for x in leaves if isinstance(x, torch.Tensor)), strict=False)
    except Exception as e:
        raise MlirExportError(f"torch.export could not export the rewritten model ({type(e).__name__}: "
                              f"{str(e)[:400]})") from e


def op_nodes(graph: torch.fx.Graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is decompose.OP]


def _rows_in_op_order(gm: torch.fx.GraphModule, report: Report) -> list:
    """The report row of each op call of `gm`, in graph order (the rewriter tags each call with its layer)."""
    rows = [r for r in report.sites if r.status == "rewritten"]
    out = []
    for node in op_nodes(gm.graph):
        layer = node.meta.get("longattn_layer")
        row = next((r for r in rows if r.layer == layer and all(r is not o for o in out)), None)
        if row is None:
            raise MlirExportError(f"longattn.mlir: a longattn op in the graph ({node.name}) belongs to no rewritten "
                                  "site of the report; export models through longattn.mlir.export")
        out.append(row)
    return out


def _sites(program: torch.export.ExportedProgram, rows: list) -> list[KeptSite]:
    nodes = op_nodes(program.graph)
    if len(nodes) != len(rows):
        raise MlirExportError(f"longattn.mlir: the exported program has {len(nodes)} longattn ops for "
                              f"{len(rows)} rewritten sites")
    sites = []
    for node, row in zip(nodes, rows):
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]
        plan = node.args[8]
        sites.append(KeptSite(layer=row.layer, plan=plan, scale=float(node.args[4]), causal=bool(node.args[5]),
                              dropout_p=float(node.args[6]), kv_groups=int(q.shape[1]) // int(k.shape[1]),
                              key_length=int(k.shape[-2]), band=decompose.band_at(plan, int(k.shape[-2]))))
    return sites


# --- torch-mlir ------------------------------------------------------------------------------------

def _import(tm, program: torch.export.ExportedProgram, decompositions):
    """Raw import in a context that collects diagnostics (for our error messages) instead of printing them."""
    context = tm.ir.Context()
    tm.torch_dialect.register_dialect(context)
    diagnostics: list[str] = []

    def collect(d):
        diagnostics.append(d.message)
        return True
    context.attach_diagnostic_handler(collect)
    try:
        module = tm.fx.export_and_import(program, output_type="raw", fx_importer=tm.FxImporter(context=context),
                                         decomposition_table=decompositions)
    except Exception as e:
        raise MlirExportError(f"torch-mlir could not import the program ({type(e).__name__}: {str(e)[:400]})") from e
    return module, diagnostics


def _run(tm, module, pipeline: str, what: str, diagnostics: list) -> None:
    with module.context as context:
        context.emit_error_diagnostics = True  # as torch-mlir's own runner: failing passes report, not assert
        del diagnostics[:]
        try:
            tm.passmanager.PassManager.parse(pipeline).run(module.operation)
        except Exception as e:
            said = "; ".join(dict.fromkeys(diagnostics)) or str(e)
            raise MlirExportError(f"torch-mlir could not lower to {what}: {said[:800]}") from None


def _to_torch_backend(tm, module, diagnostics, keep_sites: bool) -> None:
    if not keep_sites:
        _run(tm, module, _TO_TORCH % "", "the torch backend", diagnostics)
        return
    fd, library = tempfile.mkstemp(prefix="longattn-", suffix=".mlir")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_VALUE_SEMANTICS_LIBRARY)
        _run(tm, module, _TO_TORCH % f"{{extra-library={library}}}", "the torch backend", diagnostics)
    finally:
        os.unlink(library)


def _verify(module, what: str) -> None:
    try:
        ok = module.operation.verify()
    except Exception as e:  # newer bindings raise with the diagnostics
        raise MlirExportError(f"the {what} module does not verify: {str(e)[:800]}") from None
    if ok is False:
        raise MlirExportError(f"the {what} module does not verify")


# --- the two paths -----------------------------------------------------------------------------

def to_mlir(gm: torch.fx.GraphModule, report: Report, args: tuple, kwargs: dict, output_type: str = "raw", *,
            verify: bool = True):
    """The MLIR module (torch_mlir.ir.Module) of `longattn.rewrite`'s graph and report; the report's rewritten
    rows get a note on the path their site took. `verify`: check each decomposed site against the op first."""
    check_output_type(output_type)
    tm = load_torch_mlir()
    rows = _rows_in_op_order(gm, report)
    program = export_program(gm, args, kwargs)
    sites = _sites(program, rows)
    if output_type in KEEPS_SITES:
        module, diagnostics = _import(tm, program, None)  # None: torch-mlir's own decompositions, ours kept
        annotate(tm.ir, module, sites)
        if output_type == "torch":
            _to_torch_backend(tm, module, diagnostics, keep_sites=True)
            if len(longattn_ops(module)) != len(sites) or any("longattn.layer" not in op.attributes
                                                               for op in longattn_ops(module)):
                raise MlirExportError("longattn.mlir: the torch backend pipeline did not keep every longattn op "
                                      "with its attributes")
        for row, site in zip(rows, sites):
            row.notes.append(f"{NOTE}kept as torch.operator \"{OP_NAME}\" ({site.band.kind} band at "
                             f"{site.key_length} keys)")
    else:
        if sites:
            _decompose(gm, program, sites, verify)
            program = export_program(gm, args, kwargs)
        if op_nodes(program.graph):
            raise MlirExportError("longattn.mlir: a longattn op survived decomposition")
        module, diagnostics = _import(tm, program, None)
        _to_torch_backend(tm, module, diagnostics, keep_sites=False)
        _run(tm, module, _LOWER[output_type], output_type, diagnostics)
        for row, site in zip(rows, sites):
            form = "exact attention" if site.band.kind in ("exact", "flash") else "the linear kind's dense definition"
            row.notes.append(f"{NOTE}decomposed into {form} in standard ops ({site.band.kind} band at "
                             f"{site.key_length} keys)")
    _verify(module, output_type)
    return module


def _decompose(gm: torch.fx.GraphModule, program: torch.export.ExportedProgram, sites: list[KeptSite],
               verify: bool) -> None:
    """Refuse (naming the site) what has no standard-op form, check the rest, then swap the op calls of `gm` for
    `decompose.attention_reference`, which takes the same arguments."""
    nodes = op_nodes(program.graph)
    for node, site in zip(nodes, sites):
        reason = decompose.why_not(site.band, site.dropout_p, node.args[7] is not None)
        if reason is not None:
            raise MlirExportError(f"site {site.layer}: its {site.band.kind} band (key length {site.key_length}) "
                                  f"cannot be written in standard ops for a lowered output: {reason}. Export with "
                                  "output_type='raw' or 'torch' to keep the op, or map this layer to flash")
    if verify:
        for node, site in zip(nodes, sites):
            q, k, v, mask = (None if a is None else a.meta["val"] for a in node.args[:4])
            try:
                decompose.check_site(site.band, q, k, v, mask, site.scale, site.causal)
            except ValueError as e:
                raise MlirExportError(f"site {site.layer}: {e}") from None
    for node in op_nodes(gm.graph):
        node.target = decompose.attention_reference
    gm.recompile()


__all__ = ["OUTPUT_TYPES", "KEEPS_SITES", "INSTALL_HINT", "MlirExportError", "check_output_type", "load_torch_mlir",
           "to_mlir", "export_program"]
