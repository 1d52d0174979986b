"""The plan: the length bands a policy chose for one site, as data and as the string the op carries.

`torch.ops.longattn.attention` (kernels/dispatch.py) and the ONNX `ai.longattn` nodes (their `plan`
attribute, read by csrc/plan.h) take the same JSON list of bands, each naming a kind, an exclusive
upper bound on the key length and the kind's parameters; the last band is unbounded.

Standard library only: the policy, the report and both rewriters use it without loading torch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Optional

KINDS = ("exact", "flash", "hyper", "linear")


@dataclass(frozen=True)
class Band:
    kind: str
    below: Optional[int] = None  # exclusive upper bound on the key length; None = no bound
    params: dict[str, Any] = field(default_factory=dict)


def encode_plan(bands: list[Band]) -> str:
    """Serialise bands (ordered by `below`, last one unbounded) into the op's `plan` string."""
    return json.dumps([{"kind": b.kind, "below": b.below, "params": b.params} for b in bands], sort_keys=True)


@functools.lru_cache(maxsize=256)
def decode_plan(plan: str) -> tuple[Band, ...]:
    try:
        raw = json.loads(plan)
        bands = tuple(Band(kind=b["kind"], below=b["below"], params=dict(b.get("params", {}))) for b in raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"longattn::attention: malformed plan {plan!r}: {e}") from None
    if not bands or bands[-1].below is not None:
        raise ValueError(f"longattn::attention: plan must end with an unbounded band, got {plan!r}")
    for b in bands:
        if b.kind not in KINDS:
            raise ValueError(f"longattn::attention: unknown kind {b.kind!r} in plan (known: {', '.join(KINDS)})")
        if b.below is not None and (type(b.below) is not int or b.below <= 0):
            raise ValueError(f"longattn::attention: band 'below' must be a positive integer, got {b.below!r} "
                             f"in plan {plan!r}")
    return bands


def band_for_length(plan: str, key_length: int) -> Band:
    for band in decode_plan(plan):
        if band.below is None or key_length < band.below:
            return band
    raise AssertionError("unreachable: the last band is unbounded")
