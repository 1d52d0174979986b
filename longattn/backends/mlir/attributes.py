"""The attributes each kept site's `torch.operator "torch.longattn.attention"` carries (the op contract, README
"MLIR export"): what a downstream compiler needs to map the site to its own kernel without parsing the plan.

torch-mlir's FX importer gives the op its operands and no attributes; they are set on the imported module here.
Every attribute is named `longattn.*`; a JSON value of the plan becomes the matching builtin attribute (object →
dictionary, list → array, string, bool, 64-bit integer, f64 float) and keys whose value is null are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...plan import Band, decode_plan

OP_NAME = "torch.longattn.attention"
CONTRACT_VERSION = 1
PLAN_OPERAND = 8  # q, k, v, attn_mask, scale, causal, dropout_p, seed, plan


@dataclass(frozen=True)
class KeptSite:
    """One op call of the exported program: its arguments, and the layer of the report row it came from."""
    layer: str
    plan: str
    scale: float
    causal: bool
    dropout_p: float
    kv_groups: int
    key_length: int
    band: Band            # the band the traced key length selects


def _attr(ir, value: Any):
    if isinstance(value, bool):
        return ir.BoolAttr.get(value)
    if isinstance(value, int):
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)
    if isinstance(value, float):
        return ir.FloatAttr.get_f64(value)
    if isinstance(value, str):
        return ir.StringAttr.get(value)
    if isinstance(value, (list, tuple)):
        return ir.ArrayAttr.get([_attr(ir, v) for v in value])
    if isinstance(value, dict):
        return ir.DictAttr.get({str(k): _attr(ir, v) for k, v in value.items() if v is not None})
    raise TypeError(f"longattn: a plan value of type {type(value).__name__} has no MLIR attribute form: {value!r}")


def band_dict(band: Band) -> dict:
    out = {"kind": band.kind, "params": band.params}
    if band.below is not None:
        out["below"] = band.below
    return out


def site_attributes(ir, site: KeptSite) -> dict:
    """{name: attribute} for one site; call inside the module's context."""
    values = {
        "longattn.version": CONTRACT_VERSION,
        "longattn.layer": site.layer,
        "longattn.scale": float(site.scale),
        "longattn.causal": bool(site.causal),
        "longattn.kv_groups": int(site.kv_groups),
        "longattn.dropout_p": float(site.dropout_p),
        "longattn.kind": site.band.kind,
        "longattn.params": site.band.params,
        "longattn.bands": [band_dict(b) for b in decode_plan(site.plan)],
    }
    return {name: _attr(ir, value) for name, value in values.items()}


def longattn_ops(module) -> list:
    """The `torch.operator "torch.longattn.attention"` ops of a module's functions, in order."""
    found = []
    for func in module.body.operations:
        for region in func.operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "torch.operator" and op.attributes["name"].value == OP_NAME:
                        found.append(op)
    return found


def annotate(ir, module, sites: list[KeptSite]) -> None:
    """Set each site's attributes on its op. The ops come in program order; each is matched to its site by the
    plan string it takes as an operand, so a mismatch is an error, never an attribute on the wrong op."""
    ops = longattn_ops(module)
    if len(ops) != len(sites):
        raise ValueError(f"longattn: the imported module has {len(ops)} longattn ops, the program {len(sites)} sites")
    with module.context:
        for op, site in zip(ops, sites):
            plan_def = op.operands[PLAN_OPERAND].owner
            plan = plan_def.attributes["value"].value if "value" in plan_def.attributes else None
            if plan != site.plan:
                raise ValueError(f"longattn: the op imported for {site.layer} does not take its plan "
                                 f"({plan!r} vs {site.plan!r})")
            for name, attr in site_attributes(ir, site).items():
                op.attributes[name] = attr
