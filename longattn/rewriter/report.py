"""What a rewrite did, site by site: printable as a table, stable as JSON."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..patterns.record import AttentionSite
from ..plan import Band, band_for_length, encode_plan

REPORT_VERSION = 1


def _plain(x):
    """Symbolic sizes (dynamic graphs) are reported by their traced value."""
    if x is None or isinstance(x, (int, float, str, bool)):
        return x
    try:
        return int(x.node.hint)
    except AttributeError:
        return str(x)


def describe_bands(bands) -> str:
    parts = []
    for b in bands:
        bound = f" <{b.below}" if b.below is not None else ""
        parts.append(f"{b.kind}{bound}")
    return ", ".join(parts)


@dataclass
class SiteReport:
    layer: str
    pattern: str
    status: str = "found"            # rewritten | exact | skipped
    reason: Optional[str] = None     # why skipped
    mask: str = "none"               # none | causal | additive | boolean | causal+...
    causal_proof: str = ""
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    q_len: Optional[int] = None
    k_len: Optional[int] = None
    scale: Optional[float] = None
    dropout_p: float = 0.0
    bands: list = field(default_factory=list)   # [{"kind", "below", "params"}]
    rule: Optional[str] = None
    notes: list = field(default_factory=list)

    @classmethod
    def from_site(cls, site: AttentionSite, *, status: str = "found", reason: Optional[str] = None,
                  bands=(), rule: Optional[str] = None, notes=()) -> "SiteReport":
        return cls(layer=site.layer, pattern=site.pattern, status=status, reason=reason, mask=site.mask_kind,
                   causal_proof=site.causal_proof, heads=_plain(site.num_heads), kv_heads=_plain(site.num_kv_heads),
                   head_dim=_plain(site.head_dim), q_len=_plain(site.q_len), k_len=_plain(site.k_len),
                   scale=None if site.scale_ref is not None else site.scale, dropout_p=site.dropout_p,
                   bands=[{"kind": b.kind, "below": b.below, "params": dict(b.params)} for b in bands],
                   rule=rule, notes=list(notes))

    @property
    def gqa(self) -> str:
        if self.heads is None:
            return "?"
        return f"{self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else f"{self.heads}"

    def kind_at(self, key_length: int) -> str:
        """What runs at this key length: the band's kind for a rewritten site, else "exact"/"skipped"."""
        if self.status != "rewritten":
            return self.status
        bands = [Band(b["kind"], b["below"], b["params"]) for b in self.bands]
        return band_for_length(encode_plan(bands), key_length).kind

    @property
    def choice(self) -> str:
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        return describe_bands([Band(b["kind"], b["below"], b["params"]) for b in self.bands])


@dataclass
class Report:
    policy: str = ""
    sites: list = field(default_factory=list)

    def __len__(self):
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def extend(self, other: "Report") -> None:
        self.sites.extend(other.sites)

    def count(self, status: str) -> int:
        return sum(1 for s in self.sites if s.status == status)

    @property
    def summary(self) -> str:
        return (f"{len(self.sites)} attention sites: {self.count('rewritten')} rewritten, "
                f"{self.count('exact')} left exact, {self.count('skipped')} skipped")

    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, "policy": self.policy, "summary": {
            "sites": len(self.sites), "rewritten": self.count("rewritten"), "exact": self.count("exact"),
            "skipped": self.count("skipped")}, "sites": [asdict(s) for s in self.sites]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self):
        from rich.table import Table
        t = Table(title=f"longattn: {self.summary}", caption=f"policy: {self.policy}" if self.policy else None)
        for col in ("layer", "pattern", "mask", "heads", "choice"):
            t.add_column(col, overflow="fold")
        for s in self.sites:
            t.add_row(s.layer, s.pattern, s.mask, s.gqa, s.choice)
        return t

    def __str__(self) -> str:
        from rich.console import Console
        console = Console(width=160, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()
