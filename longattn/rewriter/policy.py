"""The policy engine: which implementation each attention site gets, by layer and by length.

A policy is a YAML file (or the same structure as a dict):

    version: 1
    rules:                                # tried in order, the first whose `layers` match wins
      - layers: "model.layers.0-3"
        use: exact                        # one kind for every length, its parameters inline
      - layers: "*"
        by_length:                        # or length bands, ordered by `below` (exclusive)
          - {below: 8192, use: flash}
          - {below: 65536, use: hyper, block_size: 256, sample_size: 256, lsh_bits: 7}
          - {use: linear, feature_map: favor, num_features: 256}   # the last band has no `below`

A site that no rule matches stays exact. `layers` selects by:
  - a module-path glob, fnmatch on the dotted path ("*", "model.layers.*", "encoder.*"), where a
    component written `a-b` matches an integer component in [a, b] ("*.layers.10-29"). A glob
    matches the module it names and everything below it: "model.layers.3" selects
    "model.layers.3.self_attn";
  - a layer index or an index range, 5 or "0-3" (the site's layer index: the first integer in
    its module path);
  - {first: N} or {last: N}, relative to the number of layers of the model. When the number of
    layers or the site's index is unknown these match nothing (the rule is skipped, not an error);
  - a list of these, matching any of them.

The parameters each kind takes are in `policy_schema.py`. A decision carries the parameters the
policy wrote and the kind's `written` ones (linear's sinks and window: a policy's linear is the
hybrid); the kernels' defaults are the schema's for the rest. Relative `feature_params` paths are
taken from the policy file's folder. Errors name the file, the line and the key path:
`p.yaml:12: rules[1].by_length[0].below must be a positive integer, got -5`.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..plan import KINDS, Band
from .policy_schema import validate_params

SUPPORTED_VERSIONS = (1,)
DEFAULT_POLICY = "policies/default.yaml"   # inside the longattn package


class PolicyError(ValueError):
    """An invalid policy. `errors` holds one line per problem found, in document order."""

    def __init__(self, errors: Union[str, list[str]]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Decision:
    """What a policy chose for one site: length bands (ordered by `below`, the last unbounded),
    the index of the rule that matched (None: no rule matched, the site stays exact) and where
    that rule is written, e.g. "p.yaml: rules[2]"."""
    bands: tuple[Band, ...]
    rule: Optional[int]
    source: str


# --- selectors ----------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class IndexRange:
    """Layer indices lo..hi inclusive."""
    lo: int
    hi: int

    def matches(self, name: str, index: Optional[int], num_layers: Optional[int]) -> bool:
        return index is not None and self.lo <= index <= self.hi

    def to_yaml(self):
        return self.lo if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class FirstLast:
    """The first or last `n` layers of the model."""
    which: str   # "first" | "last"
    n: int

    def matches(self, name: str, index: Optional[int], num_layers: Optional[int]) -> bool:
        if index is None or num_layers is None:
            return False
        return index < self.n if self.which == "first" else index >= num_layers - self.n

    def to_yaml(self):
        return {self.which: self.n}


@dataclass(frozen=True)
class PathGlob:
    """fnmatch on the dotted module path, `a-b` components matching integers in [a, b]; matches
    the named module and its descendants."""
    pattern: str
    components: tuple = field(compare=False)   # each a glob string or an (lo, hi) pair

    def matches(self, name: str, index: Optional[int], num_layers: Optional[int]) -> bool:
        return _match_components(self.components, tuple(name.split(".")))

    def to_yaml(self):
        return self.pattern


def _match_components(pattern: tuple, path: tuple) -> bool:
    if not pattern:
        return True   # the pattern named an ancestor of the site (or the site itself)
    if not path:
        return False
    head, rest = pattern[0], pattern[1:]
    if isinstance(head, tuple):
        lo, hi = head
        return path[0].isdigit() and lo <= int(path[0]) <= hi and _match_components(rest, path[1:])
    # fnmatch's `*` crosses dots, so a wildcard component may cover several path components
    spans = range(1, len(path) + 1) if any(c in head for c in "*?[") else (1,)
    return any(fnmatch.fnmatchcase(".".join(path[:k]), head) and _match_components(rest, path[k:])
               for k in spans)


Selector = Union[IndexRange, FirstLast, PathGlob]


@dataclass(frozen=True)
class Rule:
    selectors: tuple[Selector, ...]      # a union
    bands: tuple[Band, ...]
    by_length: bool                      # written as by_length (kept for to_dict)
    line: Optional[int] = field(default=None, compare=False)

    def matches(self, name: str, index: Optional[int], num_layers: Optional[int]) -> bool:
        return any(s.matches(name, index, num_layers) for s in self.selectors)

    def selector_yaml(self):
        out = [s.to_yaml() for s in self.selectors]
        return out[0] if len(out) == 1 else out

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"layers": self.selector_yaml()}
        if not self.by_length:
            d.update(use=self.bands[0].kind, **self.bands[0].params)
            return d
        d["by_length"] = [{**({"below": b.below} if b.below is not None else {}), "use": b.kind, **b.params}
                          for b in self.bands]
        return d


# --- the policy ---------------------------------------------------------------------------------

class Policy:
    """An ordered list of rules; `decide` gives the bands for one site."""

    def __init__(self, rules: tuple[Rule, ...] = (), source: str = "<policy>", version: int = 1,
                 description: Optional[str] = None):
        self.rules = tuple(rules)
        self.source = source
        self.version = version
        self.description = description

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>", *, base_dir: Union[str, os.PathLike, None] = None) -> "Policy":
        """Parse and validate YAML text; `source` names it in errors (usually the file path)."""
        if len(text) > MAX_POLICY_CHARS:
            raise PolicyError(f"{source}: {len(text)} characters; a policy is a few rules (at most "
                              f"{MAX_POLICY_CHARS} characters are read): is this the policy file?")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            size = _expanded_size(node)
            if size > MAX_POLICY_VALUES:
                raise PolicyError(f"{source}: the YAML expands to more than {MAX_POLICY_VALUES} values through its "
                                  "aliases (*name): a policy needs no more than a few hundred")
            data = yaml.load(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(e, "problem", None) or str(e)
            raise PolicyError(f"{where}: invalid YAML: {problem}") from None
        except RecursionError:
            raise PolicyError(f"{source}: nested too deeply to be a policy") from None
        locator = _Locator(node)
        if locator.duplicates:
            raise PolicyError([f"{source}:{line}: {_path(loc)}: duplicate key {key!r}"
                               for line, loc, key in locator.duplicates])
        return _Parser(source, locator, base_dir).parse(data)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>", *, base_dir: Union[str, os.PathLike, None] = None) -> "Policy":
        """Validate a policy given as plain data (the YAML structure); errors carry no line."""
        return _Parser(source, None, base_dir).parse(d)

    def decide(self, layer_name: str, layer_index: Optional[int], num_layers: Optional[int]) -> Decision:
        """Bands for the site at module path `layer_name` (index `layer_index` of `num_layers`)."""
        for i, rule in enumerate(self.rules):
            if rule.matches(layer_name, layer_index, num_layers):
                # fresh Bands: a caller that edits params must not edit the policy
                bands = tuple(Band(b.kind, b.below, dict(b.params)) for b in rule.bands)
                return Decision(bands, i, f"{self.source}: rules[{i}]")
        return Decision((Band("exact"),), None, f"{self.source}: no rule matched (exact)")

    def to_dict(self) -> dict:
        """The normalised structure: selectors in canonical spelling, parameters as given."""
        d: dict[str, Any] = {"version": self.version}
        if self.description is not None:
            d["description"] = self.description
        d["rules"] = [r.to_dict() for r in self.rules]
        return d

    def describe(self) -> str:
        """A short human summary: each rule's selectors and bands."""
        lines = [f"{self.source}: valid policy (version {self.version}), {len(self.rules)} "
                 f"rule{'s' if len(self.rules) != 1 else ''}, first match wins"]
        if self.description:
            lines.append(f"  {self.description.strip()}")
        for i, rule in enumerate(self.rules):
            where = f" (line {rule.line})" if rule.line is not None else ""
            selectors = ", ".join(_selector_text(s) for s in rule.selectors)
            lines.append(f"  rules[{i}]{where}: layers {selectors}")
            for b in rule.bands:
                bound = f"length < {b.below}" if b.below is not None else (
                    "longer" if len(rule.bands) > 1 else "any length")
                params = ", ".join(f"{k}={v}" for k, v in b.params.items())
                lines.append(f"      {bound:>16} -> {b.kind}{f' ({params})' if params else ''}")
        lines.append("  layers that match no rule: exact")
        return "\n".join(lines)

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and (self.version, self.rules) == (other.version, other.rules)

    def __hash__(self) -> int:
        import json
        return hash(json.dumps(self.to_dict()["rules"], sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self.rules)})"


def _selector_text(s: Selector) -> str:
    if isinstance(s, PathGlob):
        return repr(s.pattern)
    if isinstance(s, FirstLast):
        return f"{s.which} {s.n}"
    return f"index {s.to_yaml()}"


# A policy is a few rules. These bound what a hostile or mistaken file costs before it is rejected: a YAML alias
# bomb ("billion laughs") expands exponentially, and a megabytes-long file is no policy.
MAX_POLICY_CHARS = 1 << 20
MAX_POLICY_VALUES = 100_000


def _expanded_size(root) -> int:
    """How many nodes the composed YAML has once every alias is expanded (aliases share their node, so this is
    counted over the node graph, each shared node once per use, without expanding anything)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)] if root is not None else []
    while stack:  # iterative post-order: deep nesting must not recurse
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_POLICY_VALUES + 1)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes.get(id(root), 0)


def load_policy(spec=None) -> Policy:
    """None: the built-in default; a path to a YAML file; a dict; or a Policy (returned as is)."""
    if spec is None:
        return _default_policy()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        return Policy.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(f"{spec}: no such policy file") from None
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise PolicyError(f"{spec}: cannot read the policy: {e}") from None
        return Policy.from_yaml(text, source=str(spec), base_dir=path.parent)
    raise TypeError(f"policy must be None, a YAML path, a dict or a Policy, got {type(spec).__name__}")


@functools.lru_cache(maxsize=1)
def _default_policy() -> Policy:
    text = resources.files("longattn").joinpath(DEFAULT_POLICY).read_text(encoding="utf-8")
    return Policy.from_yaml(text, source=f"longattn/{DEFAULT_POLICY}")


def check_policy_file(path: Union[str, os.PathLike]) -> str:
    """Validate a policy file (raises PolicyError) and summarise it, for `longattn policy check`."""
    return load_policy(Path(path)).describe()


# --- validation ---------------------------------------------------------------------------------

def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Locator:
    """Line numbers of the composed YAML nodes, looked up by a key path like ("rules", 1, "use")."""

    def __init__(self, root: Optional[yaml.Node]):
        self.root = root
        self.duplicates: list[tuple[int, tuple, str]] = []
        if root is not None:
            self._find_duplicates(root, ())

    def _find_duplicates(self, node, loc):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                k = getattr(key, "value", None)
                if isinstance(key, yaml.ScalarNode) and k in seen:
                    self.duplicates.append((key.start_mark.line + 1, loc, k))
                seen.add(k)
                self._find_duplicates(value, loc + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._find_duplicates(item, loc + (i,))

    def line(self, loc: tuple, at_key: bool = False) -> Optional[int]:
        """Line of the value at `loc` (of its key with at_key), else of the nearest ancestor found."""
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        node, line = value, value.start_mark.line + 1
                        if at_key and part == loc[-1]:
                            line = key.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line


class _Parser:
    def __init__(self, source: str, locator: Optional[_Locator], base_dir):
        self.source = source
        self.locator = locator
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.errors: list[tuple[int, str]] = []

    # an error is recorded and parsing goes on where it can, so one run reports every problem
    def error(self, loc: tuple, message: str, *, at_key: bool = False, shown: Optional[tuple] = None):
        line = self.locator.line(loc, at_key=at_key) if self.locator else None
        where = f"{self.source}:{line}" if line is not None else self.source
        path = _path(loc if shown is None else shown)
        sep = " " if message.startswith("must") else ": "
        self.errors.append((line or 0, f"{where}: {path}{sep}{message}" if path else f"{where}: {message}"))

    def raise_if_errors(self):
        if self.errors:
            raise PolicyError([m for _, m in sorted(self.errors, key=lambda e: e[0])])

    def parse(self, data) -> Policy:
        if data is None:
            raise PolicyError(f"{self.source}: empty policy (expected a mapping with 'version' and 'rules')")
        if not isinstance(data, dict):
            self.error((), f"must be a mapping with 'version' and 'rules', got {_kind_of(data)}")
            self.raise_if_errors()
        for key in data:
            if key not in ("version", "rules", "description"):
                self.error((key,), f"unknown top-level key {key!r} (allowed: version, rules, description)", at_key=True,
                           shown=())
        version = data.get("version")
        if "version" not in data:
            self.error((), f"missing 'version' (write version: {SUPPORTED_VERSIONS[-1]})")
        elif version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            self.error(("version",), f"unsupported version {version!r} (supported: "
                       f"{', '.join(map(str, SUPPORTED_VERSIONS))})", shown=())
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            self.error(("description",), f"must be a string, got {_kind_of(description)}")
        rules = []
        if "rules" not in data:
            self.error((), "missing 'rules' (a list; an empty list leaves every layer exact)")
        elif not isinstance(data["rules"], list):
            self.error(("rules",), f"must be a list of rules, got {_kind_of(data['rules'])}")
        else:
            for i, raw in enumerate(data["rules"]):
                rule = self.rule(raw, ("rules", i))
                if rule is not None:
                    rules.append(rule)
        self.raise_if_errors()
        return Policy(tuple(rules), source=self.source, version=version, description=description)

    def rule(self, raw, loc: tuple) -> Optional[Rule]:
        if not isinstance(raw, dict):
            self.error(loc, f"must be a mapping with 'layers' and 'use' or 'by_length', got {_kind_of(raw)}")
            return None
        line = self.locator.line(loc) if self.locator else None
        selectors = None
        if "layers" not in raw:
            self.error(loc, "missing 'layers' (write layers: \"*\" for every layer)")
        else:
            selectors = self.selectors(raw["layers"], loc + ("layers",))
        has_use, has_bands = "use" in raw, "by_length" in raw
        if has_use and has_bands:
            self.error(loc, "give either 'use' or 'by_length', not both")
            return None
        if not has_use and not has_bands:
            self.error(loc, "give 'use' (one kind for every length) or 'by_length' (a list of length bands)")
            return None
        if has_use:
            params = {k: v for k, v in raw.items() if k not in ("layers", "use")}
            if "below" in params:
                self.error(loc + ("below",), "'below' belongs in a band of 'by_length', not beside 'use'",
                           at_key=True, shown=loc)
                del params["below"]
            band = self.band_body(raw["use"], params, loc, below=None)
            bands = (band,) if band is not None else None
        else:
            for key in raw:
                if key not in ("layers", "by_length"):
                    self.error(loc + (key,), f"unknown key {key!r} beside 'by_length' (a by_length rule takes "
                               "only 'layers' and 'by_length'; put parameters in each band)", at_key=True, shown=loc)
            bands = self.bands(raw["by_length"], loc + ("by_length",))
        if selectors is None or bands is None:
            return None
        return Rule(selectors, bands, by_length=has_bands, line=line)

    def bands(self, raw, loc: tuple) -> Optional[tuple[Band, ...]]:
        if not isinstance(raw, list) or not raw:
            self.error(loc, "must be a non-empty list of bands ({below: N, use: KIND, ...}, the last without "
                       f"'below'), got {_kind_of(raw)}")
            return None
        out, previous, ok = [], None, True
        for j, item in enumerate(raw):
            bloc = loc + (j,)
            last = j == len(raw) - 1
            if not isinstance(item, dict):
                self.error(bloc, f"must be a mapping like {{below: 8192, use: flash}}, got {_kind_of(item)}")
                ok = False
                continue
            below = item.get("below")
            if "below" in item:
                if isinstance(below, bool) or not isinstance(below, int) or below <= 0:
                    self.error(bloc + ("below",), f"must be a positive integer, got {below!r}")
                    ok, below = False, None
                elif last:
                    self.error(bloc + ("below",), "the last band must omit 'below': it covers every longer "
                               "length", at_key=True, shown=bloc)
                    ok = False
                elif previous is not None and below <= previous:
                    self.error(bloc + ("below",), f"must be greater than the previous band's below "
                               f"({previous}): bands are ordered by length, got {below}")
                    ok = False
                else:
                    previous = below
            elif not last:
                self.error(bloc, "missing 'below' (only the last band may omit it)")
                ok = False
            if "use" not in item:
                self.error(bloc, "missing 'use' (one of " + ", ".join(KINDS) + ")")
                ok = False
                continue
            params = {k: v for k, v in item.items() if k not in ("below", "use")}
            band = self.band_body(item["use"], params, bloc, below=None if last else below)
            ok = ok and band is not None
            out.append(band)
        return tuple(out) if ok else None

    def band_body(self, kind, params: dict, loc: tuple, below: Optional[int]) -> Optional[Band]:
        if not isinstance(kind, str) or kind not in KINDS:
            self.error(loc + ("use",), f"unknown kind {kind!r} (known: {', '.join(KINDS)})", shown=loc + ("use",))
            return None
        given, problems = validate_params(kind, params)
        for sub, message in problems:
            if message.startswith("unknown key"):
                self.error(loc + sub, message, at_key=True, shown=loc)
            else:
                self.error(loc + sub, message)
        if problems:
            return None
        if "feature_params" in given and self.base_dir is not None and not os.path.isabs(given["feature_params"]):
            given["feature_params"] = str((self.base_dir / given["feature_params"]).resolve())
        return Band(kind, below, given)

    def selectors(self, raw, loc: tuple) -> Optional[tuple[Selector, ...]]:
        if isinstance(raw, list):
            if not raw:
                self.error(loc, "must not be an empty list")
                return None
            parsed = [self.selector(item, loc + (j,)) for j, item in enumerate(raw)]
            return None if any(p is None for p in parsed) else tuple(parsed)
        one = self.selector(raw, loc)
        return None if one is None else (one,)

    def selector(self, raw, loc: tuple) -> Optional[Selector]:
        if isinstance(raw, bool):
            pass
        elif isinstance(raw, int):
            if raw >= 0:
                return IndexRange(raw, raw)
            self.error(loc, f"must be a layer index >= 0 (for the last layers write {{last: N}}), got {raw}")
            return None
        elif isinstance(raw, str):
            text = raw.strip()
            if text.isdigit():
                return IndexRange(int(text), int(text))
            m = _RANGE.match(text)
            if m:
                return self._range(IndexRange, m, loc, raw)
            components = text.split(".")
            if not text or any(not c for c in components):
                self.error(loc, f"must be a module-path glob such as \"model.layers.*\", got {raw!r}")
                return None
            parsed = []
            for c in components:
                m = _RANGE.match(c)
                if m:
                    r = self._range(lambda lo, hi: (lo, hi), m, loc, raw)
                    if r is None:
                        return None
                    parsed.append(r)
                else:
                    parsed.append(c)
            return PathGlob(text, tuple(parsed))
        elif isinstance(raw, dict):
            if len(raw) == 1 and next(iter(raw)) in ("first", "last"):
                which, n = next(iter(raw.items()))
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    return FirstLast(which, n)
                self.error(loc + (which,), f"must be a positive number of layers, got {n!r}")
                return None
            self.error(loc, f"must be {{first: N}} or {{last: N}}, got {raw!r}")
            return None
        self.error(loc, "must be a module-path glob, a layer index or range (\"0-3\"), {first: N}, {last: N} "
                   f"or a list of these, got {raw!r}")
        return None

    def _range(self, make, m, loc, raw):
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            self.error(loc, f"has an empty range {m.group(0)!r} (write low-high, low <= high), got {raw!r}")
            return None
        return make(lo, hi)


def _kind_of(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
