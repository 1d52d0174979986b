"""The parameters each kind takes in a policy, as pydantic models.

This is the catalogue of kinds' parameters and their defaults; the kinds themselves are `plan.KINDS`. Types,
ranges and enumerations live here; the shape of the document (rules, selectors, length bands) and the file/line
bookkeeping live in `policy.py`. A decision carries the keys the policy wrote and a kind's `written` keys: every
other default is the kernel's own too (tests/rewriter/test_catalogue.py checks that they agree), so a band that
omits a key runs the same either way. `written` are the keys whose policy default differs from the kernel's.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, model_validator

FEATURE_MAPS = ("elu", "relu", "favor", "taylor2", "hedgehog", "identity", "none")


def _integer(value: Any) -> int:
    # strict: YAML's `true` is a bool and `256.0` or "256" are typos we would rather name
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def _int_in(lo: Optional[int] = None, hi: Optional[int] = None, power_of_two: bool = False):
    if power_of_two:
        what = f"must be a power of two between {lo} and {hi}"
    elif lo is not None and hi is not None:
        what = f"must be an integer between {lo} and {hi}"
    elif lo == 0:
        what = "must be a non-negative integer"
    elif lo == 1:
        what = "must be a positive integer"
    else:
        what = "must be an integer"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(what)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(what)
        if power_of_two and value & (value - 1):
            raise ValueError(what)
        return value
    return PlainValidator(check)


def _positive_float(value: Any) -> float:
    # PyYAML follows YAML 1.1, where `1e-6` (no dot) is a string, not a number: accept it
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError("must be a positive number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _one_of(*choices: str):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(repr(c) for c in choices))
        return value
    return PlainValidator(check)


Integer = Annotated[int, PlainValidator(_integer)]
NonNegative = Annotated[int, _int_in(0)]
Positive = Annotated[int, _int_in(1)]


def _mesh_dim(value: Any):
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0) \
            or value == "":
        raise ValueError("must be a non-negative integer or a mesh dimension name")
    return value


class ContextParallel(BaseModel):
    """Run the band over a sequence sharded across ranks (torch.distributed initialised, > 1 rank);
    ignored otherwise. The model's inputs must then be each rank's shard, cut as `load_balance` says."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    mesh_dim: Annotated[Optional[Any], PlainValidator(_mesh_dim)] = None  # None: the WORLD group
    load_balance: Annotated[Literal["contiguous", "zigzag"], _one_of("contiguous", "zigzag")] = "contiguous"


class KindParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # keys written into every band of the kind at their default here, where the policy leaves them out
    written: ClassVar[tuple[str, ...]] = ()
    context_parallel: Optional[ContextParallel] = None  # any kind: see `ContextParallel`


class ExactParams(KindParams):
    """Leave the site as it was (the reference exact kernel under the dispatching op)."""


class FlashParams(KindParams):
    """The fused tiled exact kernel: same result as the model, O(n) memory."""


class HyperParams(KindParams):
    """HyperAttention (sortLSH blocks + sampled residual), with exact sinks and local window."""
    block_size: Annotated[int, _int_in(16, 4096, power_of_two=True)] = 256
    sample_size: NonNegative = 256
    lsh_bits: Annotated[int, _int_in(1, 16)] = 7
    min_seq_len: NonNegative = 4096   # exact below this length, as in the paper's code
    sink_tokens: NonNegative = 64
    local_window: NonNegative = 256
    variant: Annotated[Literal["default", "paper"], _one_of("default", "paper")] = "default"
    # how the residual's samples are drawn: uniformly, or by the rectangle's mean query (kernels/hyper/pattern.py);
    # unset: the variant's own (default: importance, paper: uniform)
    sampling: Annotated[Optional[Literal["uniform", "importance"]], _one_of("uniform", "importance")] = None
    seed: Integer = 0

    @model_validator(mode="after")
    def _paper_samples_uniformly(self):
        if self.variant == "paper" and self.sampling == "importance":
            raise ValueError("variant 'paper' is the paper's algorithm, which samples uniformly: "
                             "sampling 'importance' needs variant 'default'")
        return self


class LinearParams(KindParams):
    """Hybrid linear attention: exact sinks + local window, feature-map attention for older keys."""
    # A policy's linear is the hybrid (the kernels' HYBRID_DEFAULTS): a softmax-trained model needs its sinks and
    # window exact. The kernel's own defaults, 0 and 0, are plain linear attention, what a direct call of the
    # literature's linear attention (and fla's, which the benchmarks compare with) expects.
    written: ClassVar[tuple[str, ...]] = ("sink_tokens", "local_window")
    feature_map: Annotated[str, _one_of(*FEATURE_MAPS)] = "elu"
    num_features: Positive = 256
    seed: Integer = 0
    sink_tokens: NonNegative = 64
    local_window: NonNegative = 256
    normalize: Annotated[bool, PlainValidator(_boolean)] = True
    eps: Annotated[float, PlainValidator(_positive_float)] = 1e-6
    update_rule: Annotated[Literal["add", "delta"], _one_of("add", "delta")] = "add"
    chunk_size: Annotated[int, _int_in(16, 256, power_of_two=True)] = 64
    # fitted maps from `longattn calibrate`: a file path (relative: from the policy file's folder), optionally
    # "#layers.N"; without it the rewriter appends each site's section (kernels/linear/params_file.py)
    feature_params: Annotated[Optional[str], PlainValidator(_string)] = None
    # torch.compile only: decode steps (batch 1) fold their new tokens into a state the site
    # keeps between calls instead of recomputing the cached prefix (kernels/linear/incremental.py says what
    # it checks before trusting a kept state)
    decode_state: Annotated[bool, PlainValidator(_boolean)] = False

    @model_validator(mode="after")
    def _the_kernel_takes_them(self):
        """The combinations the kernel refuses (feature_map 'none' with neither sinks nor window, normalize=False
        with them), refused here with the kernel's own words, so that a policy that passes `policy check` runs."""
        from ..kernels.linear.reference import check_options
        check_options(causal=True, feature_map=self.feature_map, sink_tokens=self.sink_tokens,
                      local_window=self.local_window, normalize=self.normalize, eps=self.eps,
                      update_rule=self.update_rule, chunk_size=self.chunk_size, where="linear")
        return self


PARAMS: dict[str, type[KindParams]] = {
    "exact": ExactParams, "flash": FlashParams, "hyper": HyperParams, "linear": LinearParams,
}


def allowed_keys(kind: str) -> tuple[str, ...]:
    """The kind's own keys, then the one every kind takes (context_parallel)."""
    own = tuple(k for k in PARAMS[kind].model_fields if k not in KindParams.model_fields)
    return own + tuple(KindParams.model_fields)


def defaults(kind: str) -> dict[str, Any]:
    """Every parameter of `kind` with its policy default: the kernels' own, but for the kind's `written` keys."""
    return {name: f.default for name, f in PARAMS[kind].model_fields.items()}


def validate_params(kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[tuple, str]]]:
    """Check `params` for `kind`. Returns (the keys given, normalised, and the kind's `written` keys;
    [(loc, message), ...]).

    Each loc is a tuple of keys below the band or rule; messages read after the key path
    ("must be ..., got 5") or, for unknown keys, stand alone.
    """
    model = PARAMS[kind]
    try:
        parsed = model.model_validate(params)
    except ValidationError as e:
        return {}, [_describe(kind, err) for err in e.errors()]
    given = parsed.model_dump(exclude_unset=True)
    for name in model.written:
        given.setdefault(name, getattr(parsed, name))
    return given, []


def _describe(kind: str, err: dict) -> tuple[tuple, str]:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        allowed = allowed_keys(kind)
        if len(loc) > 1 and loc[0] == "context_parallel":
            allowed = tuple(ContextParallel.model_fields)
            return loc, f"unknown key {key!r} in context_parallel (allowed: {', '.join(allowed)})"
        if allowed == tuple(KindParams.model_fields):
            return loc, f"unknown key {key!r}: use: {kind} takes no parameters other than context_parallel"
        msg = f"unknown key {key!r} for use: {kind} (allowed: {', '.join(allowed)})"
        close = _closest(str(key), allowed)
        return loc, msg + (f"; did you mean {close!r}?" if close else "")
    if err["type"] == "value_error":
        text = str(err["ctx"]["error"])
    else:
        text = err["msg"][:1].lower() + err["msg"][1:]
    return loc, f"{text}, got {err['input']!r}"


def _closest(word: str, choices) -> Optional[str]:
    import difflib
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None
