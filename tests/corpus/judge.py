"""Judging one corpus case, for both front ends: what a wrong rewrite is, what a miss is, and the tally.

Wrong rewrites fail the test at once (hypothesis then shrinks the program); with
LONGATTN_CORPUS_KEEP_GOING=1 (the long run) they are collected with their programs and fail the test
at its end, so one run lists them all. Misses (true attention not rewritten) never fail by
themselves: each is classified by the test's allow-list of known misses, and only a miss that no
entry explains fails, so a new kind of miss (a coverage regression) is caught too.
"""
from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from hypothesis import HealthCheck, Phase, settings

from .programs import Program

KEEP_GOING = os.environ.get("LONGATTN_CORPUS_KEEP_GOING") == "1"
ALL_FLASH = {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}
# Skip reasons of a score chain holding an op the matcher does not read: which one is reported first depends on
# what sits around the op (an add or a where above it cannot tell the scores from the mask).
CHAIN_NOT_READ = r"not understood|cannot tell the scores from the mask|where\(\) whose branches are not scores"
TOL_ATTENTION = 1e-4     # fp32, rewritten attention against eager
TOL_LOOKALIKE = 1e-5     # nothing should have changed


def corpus_settings(default: int):
    """Deterministic hypothesis settings, max_examples from LONGATTN_CORPUS_EXAMPLES. The programs are drawn from a
    seed, so shrinking (which could only shrink the seed) is skipped: a failure prints its program's source."""
    return settings(max_examples=examples(default), derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    phases=[Phase.explicit, Phase.generate])


def examples(default: int) -> int:
    """hypothesis max_examples: LONGATTN_CORPUS_EXAMPLES=N for a longer run."""
    return int(os.environ.get("LONGATTN_CORPUS_EXAMPLES", default))


class WrongRewrite(AssertionError):
    """The rewritten program computes something else, or a look-alike was rewritten."""


class NewMiss(AssertionError):
    """True attention was not rewritten, for a reason no entry of the allow-list explains."""


@dataclass(frozen=True)
class KnownMiss:
    """An allow-listed miss: programs whose features match `when` (each value one allowed string or a tuple
    of them; the key "run" is the run: explain / static / dynamic for FX, static / dynamic for ONNX; "one_key" is
    "True" for programs drawn at one query and one key) and whose
    skip reason matches the regex `reason` ("no site found" when none was reported)."""
    kind: str
    when: dict
    reason: str
    why: str

    def matches(self, features: dict, reason: str) -> bool:
        for key, allowed in self.when.items():
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if features.get(key) not in allowed:
                return False
        return re.search(self.reason, reason) is not None


@dataclass
class Tally:
    """Counts for one front end, printed at the end of the session (tests/corpus/conftest.py)."""
    front_end: str
    counts: collections.Counter = field(default_factory=collections.Counter)
    misses: collections.Counter = field(default_factory=collections.Counter)
    miss_examples: dict = field(default_factory=dict)
    skip_reasons: collections.Counter = field(default_factory=collections.Counter)
    wrong: list = field(default_factory=list)
    hits_of_known_misses: collections.Counter = field(default_factory=collections.Counter)
    new_misses: collections.Counter = field(default_factory=collections.Counter)
    new_miss_examples: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counts
        lines = [f"corpus ({self.front_end}): {c['generated']} programs generated "
                 f"({c['attention']} attention, {c['mask_lookalike']} of them with a causal-looking mask; "
                 f"{c['lookalike']} look-alikes)"]
        for key in sorted(k for k in c if k not in ("generated", "attention", "lookalike", "mask_lookalike")):
            lines.append(f"  {key}: {c[key]}")
        if self.misses:
            lines.append("  misses by kind (allow-listed):")
            for kind, n in self.misses.most_common():
                lines.append(f"    {n:5d}  {kind}    e.g. {self.miss_examples[kind]}")
        if self.hits_of_known_misses:
            lines.append("  allow-listed kinds rewritten anyway (fixed?):")
            for kind, n in self.hits_of_known_misses.most_common():
                lines.append(f"    {n:5d}  {kind}")
        if self.new_misses:
            lines.append("  NEW misses (no allow-list entry):")
            for kind, n in self.new_misses.most_common():
                lines.append(f"    {n:5d}  {kind}")
                for example in self.new_miss_examples[kind][:3]:
                    lines.append(textwrap_indent(example))
        lines.append(f"  wrong rewrites: {len(self.wrong)}")
        for w in self.wrong:
            lines.append(textwrap_indent(w))
        return "\n".join(lines)


def textwrap_indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


TALLIES: dict[str, Tally] = {}


def tally(front_end: str) -> Tally:
    return TALLIES.setdefault(front_end, Tally(front_end))


def count_program(t: Tally, program: Program) -> None:
    t.counts["generated"] += 1
    t.counts[program.kind] += 1
    if program.kind == "attention" and "mask_lookalike" in program.features:
        t.counts["mask_lookalike"] += 1


def wrong(t: Tally, program: Program, mode: str, what: str) -> None:
    """A wrong rewrite: fail now (hypothesis shrinks it), or collect it in the long run."""
    message = f"WRONG REWRITE ({t.front_end}, {mode}): {what}\n{program.describe()}"
    t.counts[f"wrong rewrites ({mode})"] += 1
    if KEEP_GOING:
        t.wrong.append(message)
        return
    raise WrongRewrite(message)


def judge_sites(t: Tally, program: Program, mode: str, sites: list, allow: list[KnownMiss],
                causal_allowed: bool = False) -> Optional[str]:
    """Check one run's report rows (SiteReport) against what the program is. Returns the miss kind, if it was
    a miss. causal_allowed: a causal claim is not wrong for this program (an ONNX model's buffer is a constant)."""
    rewritten = [s for s in sites if s.status == "rewritten"]
    if program.kind == "lookalike":
        if rewritten:
            wrong(t, program, mode, f"a look-alike was rewritten: {[(s.pattern, s.mask) for s in rewritten]}")
        else:
            t.counts[f"look-alikes left alone ({mode})"] += 1
            for s in sites:
                t.skip_reasons[_normalise(s.reason or s.status)] += 1
        return None
    trivially_causal = program.sizes.sq == 1 and program.sizes.sk == 1  # one key: causal or not, the same
    for s in rewritten:
        if "causal" in s.mask and not program.causal and not causal_allowed and not trivially_causal:
            wrong(t, program, mode, f"a mask that is not causal was taken for causal: {s.mask} ({s.causal_proof})")
        if program.training and abs(s.dropout_p - program.dropout_p) > 1e-12:
            wrong(t, program, mode, f"dropout p {s.dropout_p} recorded, the program has {program.dropout_p}")
    if len(rewritten) > 1:
        wrong(t, program, mode, f"{len(rewritten)} sites rewritten in a program with one attention")
    # one_key: a static export at one query and one key folds a built mask to a scalar
    features = dict(program.features, run=mode, one_key=str(trivially_causal))
    if rewritten:
        t.counts[f"attention rewritten ({mode})"] += 1
        if program.causal and program.sizes.sq > 1 and "causal" not in rewritten[0].mask:  # one query: no mask
            return _miss(t, program, features, "causal not proven: " + (rewritten[0].causal_proof or "no causal term"),
                         allow, mode)
        for known in allow:
            if known.matches(features, "<rewritten>"):
                t.hits_of_known_misses[known.kind] += 1
        return None
    reasons = [s.reason for s in sites if s.reason] or (["left exact"] if sites else ["no site found"])
    t.counts[f"attention not rewritten ({mode})"] += 1
    if sites:
        t.counts[f"  of which skipped with a reason ({mode})"] += 1
    return _miss(t, program, features, reasons[0], allow, mode)


def _miss(t: Tally, program: Program, features: dict, reason: str, allow: list[KnownMiss], mode: str) -> str:
    for known in allow:
        if known.matches(features, reason):
            t.misses[f"{known.kind} [{mode}]"] += 1
            t.miss_examples.setdefault(f"{known.kind} [{mode}]", _normalise(reason)[:110])
            return known.kind
    message = (f"NEW MISS ({t.front_end}, {mode}): true attention not rewritten and no allow-list entry explains "
               f"it.\nreason: {reason}\n{program.describe()}")
    if KEEP_GOING:
        t.new_misses[_normalise(reason)[:150] + f" [{mode}]"] += 1
        t.new_miss_examples.setdefault(_normalise(reason)[:150] + f" [{mode}]", []).append(message)
        return "new"
    raise NewMiss(message)


def _normalise(reason: str) -> str:
    return re.sub(r"\b(\w+_)?\d+\b", "N", re.sub(r"0x[0-9a-f]+", "0x…", reason))


# --- comparing outputs -------------------------------------------------------------------------

def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare(t: Tally, program: Program, mode: str, got, want, what: str) -> None:
    """Outputs must agree within the tolerance for the program's kind (inf equal to inf: look-alikes may return
    masked scores)."""
    tol = TOL_LOOKALIKE if program.kind == "lookalike" else TOL_ATTENTION
    got, want = as_tuple(got), as_tuple(want)
    if len(got) != len(want):
        wrong(t, program, mode, f"{what}: {len(got)} outputs, eager gives {len(want)}")
        return
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = torch.as_tensor(g), torch.as_tensor(w)
        if not torch.isfinite(w).all() and program.kind == "attention" and i == 0:
            raise AssertionError(f"corpus generator bug: eager output is not finite\n{program.describe()}")
        if g.shape != w.shape:
            wrong(t, program, mode, f"{what}: output {i} has shape {tuple(g.shape)}, eager {tuple(w.shape)}")
            return
        if not torch.allclose(g.double(), w.double(), rtol=tol, atol=tol, equal_nan=True):
            finite = torch.isfinite(w) & torch.isfinite(g)
            err = (g.double() - w.double())[finite].abs().max().item() if finite.any() else float("nan")
            lost = int((~torch.isfinite(g) & torch.isfinite(w)).sum())
            wrong(t, program, mode, f"{what}: output {i} differs from eager by {err:.3g} (tolerance {tol}); "
                                    f"non-finite where eager is finite: {lost}")
            return


def compare_dropout(t: Tally, program: Program, mode: str, run_compiled, run_eager, runs: int = 512) -> None:
    """Train-mode dropout draws other masks than eager does: compare in distribution instead. The mean over
    `runs` calls must agree within 6 standard errors, and the total variance (which grows with p/(1-p)) within
    a factor 2: a rewrite that dropped the dropout or used another p (0.1 for 0.25: a third of the variance)
    fails one of the two. 512 runs: with a single key (one Bernoulli draw per call, the noisiest case) the
    variance ratio's log has a standard deviation near 0.19, so a factor 2 is 3.6 of them."""
    torch.manual_seed(1)
    got = torch.stack([as_tuple(run_compiled())[0].double() for _ in range(runs)])
    want = torch.stack([as_tuple(run_eager())[0].double() for _ in range(runs)])
    se = (got.var(0) / runs + want.var(0) / runs).sqrt()
    gap = (got.mean(0) - want.mean(0)).abs()
    if not bool((gap <= 6 * se + 1e-4).all()):
        wrong(t, program, mode, f"train-mode dropout: mean of {runs} runs differs from eager's by up to "
                                f"{(gap / (se + 1e-12)).max().item():.1f} standard errors")
        return
    ratio = (got.var(0).sum() / want.var(0).sum().clamp_min(1e-30)).item()
    if not 0.5 <= ratio <= 2.0:
        wrong(t, program, mode, f"train-mode dropout: variance over {runs} runs is {ratio:.2f}x eager's")
