"""The `longattn` command line.

    longattn explain MODEL_SPEC [--policy p.yaml] [--seq-len N] [--json report.json]
    longattn policy check p.yaml
    longattn convert INPUTS... --out DIR [--policy p.yaml] [--check] ...
    longattn calibrate smollm2 --layers 20-29 --feature-map hedgehog --out calib.safetensors
    longattn export-mlir MODEL_SPEC --out model.mlir [--policy p.yaml] [--output-type raw|torch|linalg-on-tensors|...]

One module per subcommand (explain.py, policy.py, convert.py, calibrate.py, export_mlir.py), each adding its
parser; each imports what it runs (torch, onnx, transformers, torch-mlir) only when it runs.
"""
from __future__ import annotations

import argparse
import sys

from . import bench, calibrate, convert, explain, export_mlir, policy
from .errors import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longattn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (explain, policy, convert, calibrate, bench, export_mlir):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CliError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"longattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; 130 as a shell reports SIGINT
        print("longattn: interrupted", file=sys.stderr)
        return 130
