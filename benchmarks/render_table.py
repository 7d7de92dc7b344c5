"""Render the README's performance table from a results file written by benchmarks.attention.

    python -m benchmarks.render_table benchmarks/results/attention-<device>-<date>.json

Prints Markdown: one row per (shape, dtype, direction, provider), then the file's provenance.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def render(path: Path, dtype: str | None = None) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    lines = [
        "| shape | dtype | pass | provider | ms | TFLOP/s | peak MiB |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if dtype and r["dtype"] != dtype:
            continue
        ms = r["ms"]
        cells = ("OOM" if r.get("note") == "OOM" else "n/a") if math.isnan(ms) else None
        lines.append(
            f"| {r['shape']} (N={r['n']}) | {r['dtype']} | {r['direction']} | {r['provider']} | "
            + (f"{cells} | | |" if cells else
               f"{ms:.3f} | {r['tflops']:.0f} | {r['peak_mib']:.0f} |"))
    lines.append("")
    lines.append(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit'][:7]}, {meta['date'][:10]}; `{meta['command']}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dtype", default=None, help="only rows of this dtype (e.g. bfloat16)")
    args = parser.parse_args()
    print(render(args.results, args.dtype))


if __name__ == "__main__":
    main()
