"""The README's performance tables render from the committed results files."""

from __future__ import annotations

from pathlib import Path

from benchmarks.render_table import render

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_attention_table_filters_by_dtype():
    path = sorted(RESULTS.glob("attention-*.json"))[-1]
    table = render(path, dtype="bfloat16")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "N=" in line]
    assert rows and all("| bfloat16 |" in line for line in rows)
    assert "commit" in table.splitlines()[-1]


def test_cpu_kernel_table_has_one_row_per_backend_and_size():
    path = sorted(RESULTS.glob("cpu-kernel-*.json"))[-1]
    lines = render(path).splitlines()
    assert lines[0] == "| N | backend | forward + backward s | peak MiB |"
    assert sum(line.startswith("| 4096 |") for line in lines) == 2
