"""Render the README's performance tables from results files.

    python -m benchmarks.render_table benchmarks/results/attention-<device>-<date>.json \
        --shape kontext-1024 --dtype bfloat16
    python -m benchmarks.render_table benchmarks/results/cpu-kernel-<device>-<date>.json
    python -m benchmarks.render_table benchmarks/results/compile-sm90-<device>-<date>.json
    python -m benchmarks.render_table benchmarks/results/sweep-<device>-<date>.json
    python -m benchmarks.render_table benchmarks/results/protect-step-full-<device>-<date>.json
    python -m benchmarks.render_table benchmarks/results/generation-<device>-<date>.json

Prints Markdown, then the file's provenance: for benchmarks.attention one row per (shape, dtype,
direction, provider) (providers not installed where it ran are named under the table, not
given rows), for its ``--sweep`` one per (shape, dtype, config); for benchmarks.cpu_kernel one
row per (N, backend); for benchmarks.compile_report one row per (kernel, variant, config); for
benchmarks.protect_step one per (resolution, provider), with the speed-up over the authors' (or
eager) recipe; for benchmarks.generation one per provider.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def render(path: Path, dtype: str | None = None, shape: str | None = None) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    if "backend" in rows[0]:
        lines = _cpu_kernel_rows(rows)
    elif "resolution" in rows[0]:
        lines = _protect_step_rows(rows)
    elif "steps" in rows[0]:
        lines = _generation_rows(rows)
    elif "registers" in rows[0]:
        lines = _compile_rows(rows)
    elif "config" in rows[0]:
        lines = _sweep_rows(rows, dtype, shape)
    else:
        lines = _attention_rows(rows, dtype, shape)
    lines.append("")
    lines.append(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit'][:7]}, {meta['date'][:10]}; `{meta['command']}`")
    return "\n".join(lines)


def _cpu_kernel_rows(rows: list[dict]) -> list[str]:
    lines = ["| N | backend | forward + backward s | peak MiB |", "|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["n"], r["backend"])):
        lines.append(f"| {r['n']} | {r['backend']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} |")
    return lines


def _protect_step_rows(rows: list[dict]) -> list[str]:
    # a run with --profile: the kernels' time in one profiled step, next to the wall time (a
    # step whose wall time exceeds it waits on the host)
    profiled = any("profile" in r for r in rows)
    device = " device ms |" if profiled else ""
    lines = [f"| model | resolution | tokens | provider | ms per step |{device} peak MiB | "
             "speed-up |", "|---|---:|---:|---|---:|" + "---:|" * (3 if profiled else 2)]
    # the recipe ditflow is measured against: the authors' (or, on Qwen, the eager one)
    recipes = {r["resolution"]: r["ms"] for r in rows if r["provider"].endswith("recipe")}
    for r in rows:
        if math.isnan(r["ms"]):
            lines.append(f"| {r['model']} | {r['resolution']}² | {r['tokens']} | "
                         f"{r['provider']} | {r.get('note', 'n/a')} |" + " |" * (
                             3 if profiled else 2))
            continue
        recipe = recipes.get(r["resolution"], math.nan)  # a run cut short before the recipe
        speed_up = "n/a" if math.isnan(recipe) else f"{recipe / r['ms']:.2f}x"
        busy = f" {r['profile']['total_ms']:.0f} |" if "profile" in r else " |"
        peak = "n/a" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"  # on a CPU
        lines.append(f"| {r['model']} | {r['resolution']}² | {r['tokens']} | {r['provider']} | "
                     f"{r['ms']:.0f} |{busy if profiled else ''} {peak} | {speed_up} |")
    return lines


def _generation_rows(rows: list[dict]) -> list[str]:
    # a run with --profile: the kernels' time of a generation next to its wall time
    profiled = any("profile" in r for r in rows)
    device = " device s |" if profiled else ""
    lines = [f"| size | steps | provider | seconds |{device} overhead |",
             "|---:|---:|---|---:|" + "---:|" * (2 if profiled else 1)]
    for r in rows:
        if math.isnan(r["seconds"]):
            lines.append(f"| {r['size']}² | {r['steps']} | {r['provider']} | "
                         f"{r.get('note', 'n/a')} |" + " |" * (2 if profiled else 1))
            continue
        busy = f" {r['profile']['total_ms'] / 1e3:.2f} |" if "profile" in r else " |"
        lines.append(f"| {r['size']}² | {r['steps']} | {r['provider']} | {r['seconds']:.2f} |"
                     f"{busy if profiled else ''} {r['overhead']:+.1%} |")
    return lines


def _compile_rows(rows: list[dict]) -> list[str]:
    lines = ["| kernel | variant | config | registers | spilled bytes | local ld / st "
             "| uniform loop: instructions, local accesses | shared KiB | wgmma | ops / score |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        loop = (f"{r['loop_instructions']}, {r['loop_local_accesses']}"
                if "loop_instructions" in r else "n/a")  # older reports did not count it
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['registers']} | "
                     f"{r['spill_stack_bytes']} | {r['local_loads']} / {r['local_stores']} | "
                     f"{loop} | {r['shared_bytes'] // 1024}{'' if r['fits'] else ' (too large)'} | "
                     f"{r['wgmma']} | {r['score_ops']} |")
    return lines


def _sweep_rows(rows: list[dict], dtype: str | None, shape: str | None) -> list[str]:
    lines = ["| shape | dtype | config | forward ms | TFLOP/s | forward + backward ms "
             "| backward TFLOP/s | max err forward / backward |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if (dtype and r["dtype"] != dtype) or (shape and r["shape"] != shape):
            continue
        if "fwd_bwd_ms" not in r:  # a config that failed: its note
            lines.append(f"| {r['shape']} (N={r['n']}) | {r['dtype']} | {r['config']} | "
                         f"{r.get('note', 'n/a')} | | | | |")
            continue
        errors = " / ".join(f"{r[key]:.1e}" if key in r else "n/a"  # older sweeps: unchecked
                            for key in ("fwd_max_err", "bwd_max_err"))
        lines.append(f"| {r['shape']} (N={r['n']}) | {r['dtype']} | {r['config']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['bwd_tflops']:.0f} | {errors} |")
    return lines


def _attention_rows(rows: list[dict], dtype: str | None, shape: str | None) -> list[str]:
    lines = [
        "| shape | dtype | pass | provider | ms | TFLOP/s | peak MiB | max err |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    missing = []
    for r in rows:
        if (dtype and r["dtype"] != dtype) or (shape and r["shape"] != shape):
            continue
        if r.get("note") == "not installed":
            missing.append(r["provider"])
            continue
        ms = r["ms"]
        cells = ("OOM" if r.get("note") == "OOM" else "n/a") if math.isnan(ms) else None
        error = f"{r['max_err']:.1e}" if "max_err" in r else ""
        lines.append(
            f"| {r['shape']} (N={r['n']}) | {r['dtype']} | {r['direction']} | {r['provider']} | "
            + (f"{cells} | | | |" if cells else
               f"{ms:.3f} | {r['tflops']:.0f} | {r['peak_mib']:.0f} | {error} |"))
    if missing:
        lines += ["", "Not installed there: " + ", ".join(dict.fromkeys(missing)) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dtype", default=None, help="only rows of this dtype (e.g. bfloat16)")
    parser.add_argument("--shape", default=None, help="only rows of this shape (e.g. kontext-1024)")
    args = parser.parse_args()
    print(render(args.results, args.dtype, args.shape))


if __name__ == "__main__":
    main()
