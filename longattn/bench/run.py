"""The benchmark loop: every variant at every length, one row of metrics per (length, variant).

Each variant is compiled once (dynamic shapes unless static) and reused across the lengths. At each length eager
runs first: its output is the reference for the others' output difference.
"""
from __future__ import annotations

import gc
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..backends.torch_compile import reports
from ..quality import perplexity_windows, window_nll
from .measure import PeakMemory, first_call, is_out_of_memory, time_calls

Progress = Callable[[str, int, str], None]  # (variant, length, what is running now)


@dataclass(frozen=True)
class Variant:
    """One way to run the model: eager (backend None), plain torch.compile ("inductor"), or
    torch.compile(backend="longattn") with `policy` (a Policy, path or dict; None is the built-in one)."""
    name: str
    backend: Optional[str] = None
    policy: Any = None

    def compile(self, fn, dynamic: bool, inner: str):
        if self.backend is None:
            return fn
        if self.backend == "longattn":
            return torch.compile(fn, backend="longattn", dynamic=dynamic,
                                 options={"policy": self.policy, "inner": inner})
        return torch.compile(fn, backend=self.backend, dynamic=dynamic)


@dataclass
class Workload:
    """The model and how to call it: `sequence(length)` is its sequence input at a length (token ids (1, S),
    or features), `kwargs(x)` the keyword arguments of one forward call on such an input."""
    model: torch.nn.Module
    sequence: Callable[[int], torch.Tensor]
    kwargs: Callable[[torch.Tensor], dict]
    causal_lm: bool = False          # its output is next-token logits, and it has generate()
    trained_context: Optional[int] = None


@dataclass
class Settings:
    lengths: list
    device: torch.device
    dynamic: bool = True
    inner: str = "inductor"          # the longattn backend's inner compiler
    repeats: int = 10
    budget_s: float = 5.0
    train: bool = False
    generate: int = 0                # new tokens per generate() call; 0: not measured
    ppl_ids: Optional[torch.Tensor] = None   # (T,) the text's tokens: perplexity at each length
    pad_token_id: int = 0


def output_tensor(out) -> torch.Tensor:
    """The tensor a model call is compared by: logits, else the last hidden state, else the first output."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot tell which output to time and compare in a {type(out).__name__}")


def max_rel_err(out: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 24) -> float:
    """max |out - ref| / max |ref|, in float32, a chunk at a time (long logits would not fit twice); NaN stays
    NaN."""
    a, b = out.detach().reshape(-1), ref.reshape(-1)
    diffs, peaks = [], []
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].float(), b[i:i + chunk].to(a.device).float()
        diffs.append((x - y).abs().max())
        peaks.append(y.abs().max())
    diff, peak = torch.stack(diffs).max().item(), torch.stack(peaks).max().item()
    return diff / peak if peak else diff


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _failure(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "oom"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"error: {type(error).__name__}: {text}"[:300]


def _distinct_sites(graph_reports) -> list:
    """The sites of the reports of one compile, each graph's once: dynamo can trace a frame again and call the
    backend a second time for the same graph (SmolLM2 with inductor inside, dynamic shapes)."""
    seen, sites = set(), []
    for report in graph_reports:
        key = tuple((s.layer, s.pattern, s.status, repr(s.bands)) for s in report)
        if key not in seen:
            seen.add(key)
            sites += list(report)
    return sites


class _VariantRun:
    """One variant's compiled callables (made on first use, kept across lengths) and its measurements."""

    def __init__(self, variant: Variant, work: Workload, settings: Settings, progress: Progress):
        self.variant, self.work, self.settings, self.progress = variant, work, settings, progress
        self.call = variant.compile(work.model, settings.dynamic, settings.inner)
        self.generate_forward = None
        self.sites = None        # longattn: the site reports of the prefill graph(s)
        self.first_done = set()  # the measurements (prefill, train_, generate_) that have made their first call

    # -- one length ---------------------------------------------------------------------------------------------
    def measure(self, length: int, reference: dict) -> dict:
        row = {"length": length, "variant": self.variant.name}
        if self.work.trained_context:
            row["past_trained_context"] = length > self.work.trained_context
        x = self.work.sequence(length)
        out = self._guarded(row, self._prefill_keys(), lambda: self._prefill(row, x, length))
        if out is not None:
            if self.variant.backend is None:
                reference[length] = out.detach().cpu() if out.device.type != "cpu" else out.detach()
            elif length in reference:
                self._guarded(row, ["max_rel_err"], lambda: row.update(max_rel_err=max_rel_err(out, reference[length])))
            if self.settings.ppl_ids is not None:
                self._guarded(row, ["ppl"], lambda: self._perplexity(row, length, out))
            del out
        self._free()
        if self.settings.train:
            self._guarded(row, ["train_ms", "train_peak_mb"], lambda: self._train(row, x, length))
            self._free()
        if self.settings.generate:
            self._guarded(row, ["generate_tok_s"], lambda: self._generate(row, x, length))
            self._free()
        return row

    def _prefill_keys(self):
        keys = ["prefill_ms", "peak_mb"]
        if self.variant.backend is not None:
            keys.append("max_rel_err")
        if self.settings.ppl_ids is not None:
            keys.append("ppl")
        return keys

    def _guarded(self, row: dict, keys: list, fn):
        """fn()'s result; an exception (out of memory or another) is recorded under `keys` and the run goes on."""
        try:
            return fn()
        except Exception as e:  # one variant or length must not sink the whole run: the row says what failed
            for key in keys:
                row[key] = _failure(e)
            return None

    def _first(self, row: dict, prefix: str, fn, length: int, stage: str):
        """The warm-up call; where it compiled a graph its time is recorded as `<prefix>compile_s`."""
        compiled_before = _graphs_compiled()
        compiles = self.variant.backend and (prefix not in self.first_done or not self.settings.dynamic)
        self.first_done.add(prefix)
        self.progress(self.variant.name, length, f"{stage}: first call" + (" (compiles)" if compiles else ""))
        result, seconds = first_call(fn, self.settings.device)
        row[f"{prefix}first_call_s"] = round(seconds, 3)
        if _graphs_compiled() > compiled_before:
            row[f"{prefix}compile_s"] = round(seconds, 2)
        return result

    def _timed(self, fn):
        with PeakMemory(self.settings.device) as memory:
            ms, reps, result = time_calls(fn, self.settings.device, self.settings.repeats, self.settings.budget_s)
        return ms, reps, memory.mb, result

    def _prefill(self, row: dict, x: torch.Tensor, length: int):
        kwargs = self.work.kwargs(x)

        def call():
            return output_tensor(self.call(**kwargs))

        with torch.no_grad():
            seen = len(reports())
            self._first(row, "", call, length, "prefill")
            if self.variant.backend == "longattn" and self.sites is None:
                self.sites = _distinct_sites(reports()[seen:])
            self.progress(self.variant.name, length, "prefill: timing")
            row["prefill_ms"], row["prefill_reps"], row["peak_mb"], out = self._timed(call)
        if self.sites is not None:
            row["sites"] = dict(Counter(site.kind_at(length) for site in self.sites))
        return out

    def _perplexity(self, row: dict, length: int, first_logits: torch.Tensor) -> None:
        """Sliding windows of `length` tokens over the text, half a window apart; the first window is the
        prefill's own input (its logits are reused)."""
        ids = self.settings.ppl_ids
        windows = perplexity_windows(ids.shape[0], length, max(1, length // 2))
        if not windows:
            row["ppl"] = None
            row["ppl_note"] = f"the text has {ids.shape[0]} tokens, fewer than the length"
            return
        self.progress(self.variant.name, length, f"perplexity: {len(windows)} windows")
        total, count = 0.0, 0
        with torch.no_grad():
            for begin, first in windows:
                window = ids[begin:begin + length]
                logits = first_logits if begin == 0 else output_tensor(self.call(**self.work.kwargs(window[None])))
                nll, n = window_nll(logits[0], window, first)
                total, count = total + nll, count + n
        row["ppl"] = math.exp(total / count)
        row["ppl_windows"], row["ppl_tokens"] = len(windows), count

    def _train(self, row: dict, x: torch.Tensor, length: int) -> None:
        kwargs = self.work.kwargs(x)
        params = [p for p in self.work.model.parameters() if p.requires_grad]

        def step():
            for p in params:
                p.grad = None
            output_tensor(self.call(**kwargs)).float().square().mean().backward()

        with torch.enable_grad():
            self._first(row, "train_", step, length, "fwd+bwd")
            self.progress(self.variant.name, length, "fwd+bwd: timing")
            row["train_ms"], row["train_reps"], row["train_peak_mb"], _ = self._timed(step)
        for p in params:
            p.grad = None

    def _generate(self, row: dict, ids: torch.Tensor, length: int) -> None:
        """Tokens per second of model.generate (greedy, exactly N new tokens, the prompt's prefill included),
        with the variant's compile of model.forward (always dynamic: a static graph per decode step would
        recompile at every token)."""
        model, n = self.work.model, self.settings.generate
        if self.variant.backend is not None and self.generate_forward is None:
            self.generate_forward = self.variant.compile(model.forward, True, self.settings.inner)

        def call():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=self.settings.pad_token_id)

        if self.generate_forward is not None:
            model.forward = self.generate_forward  # transformers' generate() calls self.forward
        try:
            with torch.no_grad():
                out = self._first(row, "generate_", call, length, "generate")
                if out.shape[-1] != length + n:
                    raise RuntimeError(f"generate() returned {out.shape[-1] - length} new tokens, not {n}")
                self.progress(self.variant.name, length, "generate: timing")
                ms, row["generate_reps"], _, _ = self._timed(call)
        finally:
            if self.generate_forward is not None:
                del model.forward
        row["generate_ms"] = ms
        row["generate_tok_s"] = n / (ms / 1e3)

    def _free(self) -> None:
        gc.collect()
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()


def run_bench(work: Workload, variants: list, settings: Settings, progress: Optional[Progress] = None,
              on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Measure every variant at every length; one row (a dict of metrics) per (length, variant), in that
    order. Eager must be among the variants: the others' output difference and speed-up are against it.

    Lengths outside, variants inside: the variants compared at a length are measured minutes apart, not a whole
    run apart, so a machine whose load drifts (a shared CPU) favours none of them. Each variant is compiled
    at its first call and reused across the lengths (dynamo keeps each backend's graphs apart)."""
    if not any(v.backend is None for v in variants):
        raise ValueError("the variants must include eager (backend None): it is the reference")
    variants = sorted(variants, key=lambda v: v.backend is not None)  # eager first: the reference at each length
    progress = progress or (lambda variant, length, stage: None)
    rows = []
    torch._dynamo.reset()
    # every variant's graphs (prefill, fwd+bwd, generate's prefill and decode) sit on the same code objects: allow
    # them all, and fail a variant that still runs past the limit rather than let dynamo fall back to eager and
    # report eager's speed as the variant's own
    limit = max(torch._dynamo.config.recompile_limit, 8 * len(variants))
    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        runs = [_VariantRun(variant, work, settings, progress) for variant in variants]
        for length in settings.lengths:
            reference = {}
            for run in runs:
                row = run.measure(length, reference)
                rows.append(row)
                if on_row:
                    on_row(row)
        del runs
        torch._dynamo.reset()
    add_speedups(rows)
    return rows


def add_speedups(rows: list) -> None:
    """speedup (prefill), train_speedup and generate_speedup: eager's time over this variant's at the length."""
    eager = {r["length"]: r for r in rows if r["variant"] == "eager"}
    for r in rows:
        base = eager.get(r["length"], {})
        for key, metric, higher_is_faster in (("speedup", "prefill_ms", False), ("train_speedup", "train_ms", False),
                                              ("generate_speedup", "generate_tok_s", True)):
            mine, theirs = r.get(metric), base.get(metric)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and mine > 0 and theirs > 0:
                r[key] = mine / theirs if higher_is_faster else theirs / mine
