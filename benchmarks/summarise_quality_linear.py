"""One table from several `quality_linear.py` runs: a column per run (context length x converted layers), a row
per attention variant, perplexity and its change against the exact model of the same run.

    python benchmarks/summarise_quality_linear.py OUT_BASE RUN.jsonl [RUN.jsonl ...]

Writes OUT_BASE.md (each run's settings and calibration times below the table); the runs' own files keep the
per-layer figures.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longattn.files import atomic_path  # noqa: E402


def load(path: str) -> dict:
    records = [json.loads(line) for line in open(path)]
    env = next(r for r in records if r["kind"] == "env")
    tokens = int(env["eval"].split(" windows of ")[1].split()[0])
    return {"path": path, "env": env, "label": f"{tokens // 1024}K, layers {env['layers']}, window {env['local_window']}",
            "ppl": {r["attention"]: r for r in records if r["kind"] == "ppl"},
            "calibration": {r["fit"]: r["seconds"] for r in records if r["kind"] == "calibration"}}


def table(runs: list[dict]) -> str:
    names = []
    for run in runs:
        names += [n for n in run["ppl"] if n not in names]
    lines = ["| attention | " + " | ".join(r["label"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name in names:
        cells = []
        for run in runs:
            r = run["ppl"].get(name)
            cells.append("—" if r is None else f"{r['ppl']:.2f} ({100 * r['rel_to_exact']:+.1f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(out_base: str, paths: list[str]) -> None:
    runs = [load(p) for p in paths]
    parts = ["# Linear kind quality per feature map: SmolLM2-135M-Instruct, perplexity (change vs exact)", "",
             table(runs), "", "## Runs", ""]
    for run in runs:
        env = run["env"]
        parts.append(f"- **{run['label']}** (`{os.path.basename(run['path'])}`, {env['date']}): {env['eval']}; "
                     f"sinks {env['sink_tokens']} + window {env['local_window']}; calibration on {env['calibration_text']}, "
                     f"{env['steps']} + {env['hybrid_steps']} hedgehog steps, {env['rows']} rows; "
                     f"torch {env['torch']}, {env['threads']} threads. Calibration wall time: "
                     + ", ".join(f"{fit} {s:.0f} s" for fit, s in run["calibration"].items()) + ".")
    with atomic_path(out_base + ".md") as tmp, open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
