"""The benchmark's results: the environment record, the table (Markdown here, rich in the CLI, from the same
cells), and the plot. Every file is written atomically (longattn.files)."""
from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata

from ..files import atomic_path


def _version(package: str):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Where the numbers were taken: device, versions, date (UTC)."""
    import torch
    env = {"device_type": device.type, "torch": torch.__version__, "triton": _version("triton"),
           "transformers": _version("transformers"), "python": platform.python_version(),
           "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        threads = env["torch_threads"]
        env["device"] = f"cpu: {env['cpu']} ({os.cpu_count()} cores, {threads} torch thread{'s' * (threads != 1)})"
    return env


# -- cells ------------------------------------------------------------------------------------------------------

def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def _ms(v) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _cell(row: dict, key: str, fmt) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    if isinstance(value, str):  # "oom" or "error: ..." (whole in the JSON)
        return value if len(value) <= 40 else value[:39] + "…"
    return fmt(value)


def columns(rows: list) -> list:
    """(header, cell function) for each column that some row has a value for."""
    cols = [("length", lambda r: length_label(r["length"]) + (" †" if r.get("past_trained_context") else "")),
            ("variant", lambda r: r["variant"]),
            ("prefill ms", lambda r: _cell(r, "prefill_ms", _ms)),
            ("× eager", lambda r: _cell(r, "speedup", lambda v: f"{v:.2f}")),
            ("peak MiB", lambda r: _cell(r, "peak_mb", lambda v: f"{v:.0f}" if v >= 10 else f"{v:.1f}")),
            ("compile s", lambda r: _cell(r, "compile_s", lambda v: f"{v:.1f}")),
            ("max rel err", lambda r: "ref" if r["variant"] == "eager" else _cell(r, "max_rel_err",
                                                                                     lambda v: f"{v:.1e}"))]
    optional = [("train_ms", "fwd+bwd ms", _ms), ("train_speedup", "fwd+bwd ×", lambda v: f"{v:.2f}"),
                ("generate_tok_s", "gen tok/s", lambda v: f"{v:.1f}"),
                ("generate_speedup", "gen ×", lambda v: f"{v:.2f}"),
                ("ppl", "ppl", lambda v: f"{v:.2f}")]
    for key, header, fmt in optional:
        if any(key in r for r in rows):
            cols.append((header, lambda r, key=key, fmt=fmt: _cell(r, key, fmt)))
    if any("sites" in r for r in rows):
        cols.append(("attention", lambda r: ", ".join(f"{k} ×{n}" for k, n in sorted(r.get("sites", {}).items()))
                     or "—"))
    return cols


def table_cells(rows: list) -> tuple[list, list]:
    cols = columns(rows)
    return [h for h, _ in cols], [[f(r) for _, f in cols] for r in rows]


def notes(record: dict) -> list:
    s = record["settings"]
    lines = ["× eager: eager's time over this variant's at the same length (higher is faster)"
             + ("; gen ×: tokens/s over eager's." if s.get("generate") else "."),
             f"compile s: the first call's wall time where it compiled a graph (one run included); "
             f"{'static graphs, one per length' if not s['dynamic'] else 'dynamic shapes, compiled once'}.",
             f"max rel err: {s['error_metric']}.",
             f"peak MiB: {s['memory_method']}.",
             f"timing: {s['timing_method']}."]
    if s.get("train"):
        lines.append(f"fwd+bwd: {s['train_loss']}.")
    if s.get("generate"):
        lines.append(f"gen tok/s: {s['generate']} new tokens per model.generate() call (greedy), the prompt's "
                     "prefill included.")
    if s.get("ppl_text"):
        lines.append(f"ppl: {s['ppl_method']}")
    if any(r.get("past_trained_context") for r in record["rows"]):
        lines.append(f"†: past the model's trained context ({s['trained_context']} positions, "
                     "config.max_position_embeddings).")
    return lines


def markdown(record: dict) -> str:
    env, s = record["env"], record["settings"]
    headers, cells = table_cells(record["rows"])
    lines = [f"# longattn bench: {s['model']}", "",
             f"{env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
             f"{env['date']}.", "",
             f"Model: {s['model_description']}, {s['dtype']}, batch {s.get('batch', 1)}. Inputs: {s['inputs']}.", "",
             f"Command: `{env['command']}`", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += [""] + [f"- {n}" for n in notes(record)]
    return "\n".join(lines) + "\n"


# -- files ------------------------------------------------------------------------------------------------------

def _numeric(rows, variant, key):
    points = [(r["length"], r.get(key)) for r in rows if r["variant"] == variant]
    return [(x, y) for x, y in points if isinstance(y, (int, float))]


def plot(record: dict, path: str) -> bool:
    """bench.png: speed-up over eager against length (prefill solid, fwd+bwd dashed), and perplexity against
    length when measured, one line per variant, log2 length axis. False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows, s = record["rows"], record["settings"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    panels = [("speedup", "× eager (higher is faster)")]
    if any(isinstance(r.get("ppl"), (int, float)) for r in rows):
        panels.append(("ppl", "perplexity"))
    fig = Figure(figsize=(6.4 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, variant in enumerate(variants):
            # a marker each, smaller for later variants: exact variants draw the same perplexity line
            style = {"color": f"C{j}", "marker": "osD^vP*X"[j % 8], "markersize": max(3, 9 - 1.5 * j)}
            points = _numeric(rows, variant, key)
            if points:
                ax.plot(*zip(*points), label=variant if key == "ppl" else f"{variant} prefill", **style)
            train = _numeric(rows, variant, "train_speedup") if key == "speedup" else []
            if train:
                ax.plot(*zip(*train), linestyle="--", fillstyle="none", label=f"{variant} fwd+bwd", **style)
        if key == "ppl" and s.get("trained_context") and lengths[-1] > s["trained_context"]:
            ax.axvspan(s["trained_context"], lengths[-1] * 1.2, color="0.9", label="past trained context")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{s['model']} — {record['env']['device']}", fontsize="medium")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def write_results(record: dict, out_dir: str) -> list:
    """bench.json, bench.md and bench.png in `out_dir`; the notes to print (the plot skipped)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "bench.json")) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    with atomic_path(os.path.join(out_dir, "bench.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(record))
    if plot(record, os.path.join(out_dir, "bench.png")):
        return []
    return ["bench.png not written: it needs matplotlib (pip install 'longattn[bench]')"]
