"""`longattn export-mlir MODEL_SPEC --out model.mlir [--policy p.yaml] [--output-type raw] [--seq-len N]
[--json report.json] [--no-verify]`: rewrite a model by a policy and write it as MLIR through torch-mlir.

MODEL_SPEC takes the forms `explain` takes (`package.module:factory` or a transformers model type, built small with
random weights). The output is written atomically; the table says what became of each attention site.
"""
from __future__ import annotations

import os

from .errors import CliError
from .explain import _write_atomically, load_model_spec

OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "stablehlo", "tosa")  # longattn.mlir.OUTPUT_TYPES


def _table(report):
    from rich.table import Table

    from ..mlir import NOTE
    t = Table(title=f"longattn export-mlir: {report.summary}")
    for col in ("layer", "choice", "in the MLIR module"):
        t.add_column(col, overflow="fold")
    for s in report.sites:
        path = next((n[len(NOTE):] for n in s.notes if n.startswith(NOTE)), "the model's own ops")
        t.add_row(s.layer, s.choice, path)
    return t


def cmd_export_mlir(args) -> int:
    from rich.console import Console

    from ..mlir import export, load_torch_mlir, save
    load_torch_mlir()  # before building the model: say how to install torch-mlir at once
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {args.out}: no folder {folder}")
    model, inputs = load_model_spec(args.model, args.seq_len)
    if ":" not in args.model and hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # our own model: a KV cache object is no tensor output torch.export takes
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    module, report = export(model, *inputs, policy=args.policy, output_type=args.output_type,
                            verify=not args.no_verify)
    try:
        save(module, args.out)
    except OSError as e:
        raise CliError(f"cannot write {args.out}: {e}") from None
    Console().print(_table(report))
    print(f"wrote {args.out} ({args.output_type})")
    if args.json:
        _write_atomically(args.json, report.to_json())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export-mlir", help="rewrite a model and write it as MLIR (torch-mlir)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="module:factory or a transformers model type (e.g. llama)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .mlir file to write")
    p.add_argument("--policy", help="YAML policy (default: the built-in policy)")
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="raw",
                   help="raw / torch keep each site as one longattn op; the others decompose sites into standard "
                        "ops (default raw)")
    p.add_argument("--seq-len", type=int, default=64, help="example length for transformers models")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--no-verify", action="store_true", help="skip the per-site numerical checks")
    p.set_defaults(run=cmd_export_mlir)
