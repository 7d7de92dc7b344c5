"""The Triton kernels compiled for an H100 (sm_90) on this machine, no GPU needed: what the GPU
would build fits its shared memory, runs on wgmma, and spills and computes per score element no
more than when the compile report was written (benchmarks/NOTES.md, v4, v5, v8 and v9)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from benchmarks import compile_report
from kernels import launch as launchers
from kernels.configs import select_configs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not compile_report.available(),
                                reason="this Triton ships no NVIDIA compiler tools")

# Most spill-stack bytes of any variant at the default configs, by Triton release (measured with
# tiles that may start before the sequence, NOTES v9: forward 120 / dk-dv 272 / dq 8 with 3.9,
# 0 / 208 / 48 with 3.6; the mixed-tile loops hold them). The kernels with per-element table
# gathers in unpipelined mixed tiles spilled 1160 / 1152 / 416 (3.9), 1240 / 736 / 200 (3.6).
SPILL_BUDGET = {
    "3.9": {"forward": 160, "dkdv": 384, "dq": 64},
    "3.6": {"forward": 128, "dkdv": 320, "dq": 96},
}

# Most local-memory instructions inside a uniform-tile loop (the hot loop) at the default
# configs, by Triton release: measured forward 0 / dk-dv 0 / dq 0 with 3.9, 0 / 22 / 0 with 3.6
# (NOTES v9).
LOOP_SPILL_BUDGET = {
    "3.9": {"forward": 8, "dkdv": 16, "dq": 8},
    "3.6": {"forward": 8, "dkdv": 32, "dq": 8},
}

# Operations per score element in the uniform-tile loops, the same with Triton 3.6 and 3.9
# (NOTES v5; they were plain 8 / 8 / 7 and rules + mass 10 / 11 / 9).
SCORE_OPS = {
    "plain": {"forward": 7, "dkdv": 6, "dq": 5},
    "rules+mass": {"forward": 8, "dkdv": 9, "dq": 7},
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The report at the default configs, run as a user runs it: the tests' TRITON_INTERPRET=1
    would hand Triton's compiler interpreted functions."""
    out = tmp_path_factory.mktemp("compile")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--variant", "plain",
                    "rules+mass", "bias+pair-mask", "--out", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads(next(out.glob("compile-sm90-*.json")).read_text())["rows"]


def test_default_configs_fit_an_h100_and_use_wgmma(rows):
    for row in rows:
        assert row["fits"], row
        assert row["wgmma"] > 0, row


def test_spills_within_the_budget_of_this_triton(rows):
    release = ".".join(triton.__version__.split(".")[:2])
    if release not in SPILL_BUDGET:
        pytest.skip(f"spill budgets were measured with Triton {', '.join(SPILL_BUDGET)}")
    for row in rows:
        assert row["spill_stack_bytes"] <= SPILL_BUDGET[release][row["kernel"]], row


def test_uniform_tile_loops_spill_within_the_budget_of_this_triton(rows):
    release = ".".join(triton.__version__.split(".")[:2])
    if release not in LOOP_SPILL_BUDGET:
        pytest.skip(f"loop spill budgets were measured with Triton {', '.join(LOOP_SPILL_BUDGET)}")
    for row in rows:
        assert 0 < row["loop_instructions"] < 2000, row
        assert row["loop_local_accesses"] <= LOOP_SPILL_BUDGET[release][row["kernel"]], row


def test_uniform_tiles_do_no_more_work_per_score_than_measured(rows):
    for row in rows:
        if row["variant"] in SCORE_OPS:
            assert row["score_ops"] <= SCORE_OPS[row["variant"]][row["kernel"]], row


def test_tma_configs_load_tiles_through_tma(tmp_path):
    """A ``:tma`` config compiles to TMA loads (UTMALDG) with wgmma, within shared memory."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--variant", "rules+mass",
                    "--config", "64x64:4:3:tma", "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    rows = json.loads(next(tmp_path.glob("compile-sm90-configs-*.json")).read_text())["rows"]
    assert {row["kernel"] for row in rows} == {"forward", "dkdv", "dq"}
    for row in rows:
        assert row["config"] == "64x64:4:3:tma" and row["tma_loads"] > 0, row
        assert row["fits"] and row["wgmma"] > 0, row


def test_a_per_kernel_config_pins_that_kernel_over_the_table(tmp_path):
    """``--config`` takes ``DITFLOW_TRITON_CONFIG`` specs: ``default`` is the GPU table, a named
    kernel's shape replaces the table's for that kernel only."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--variant", "plain",
                    "--kernel", "dkdv", "dq", "--config", "default", "backward_dq=64x128:8:2:tma",
                    "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    rows = json.loads(next(tmp_path.glob("compile-sm90-configs-*.json")).read_text())["rows"]
    assert [(row["kernel"], row["config"]) for row in rows] == [
        ("dkdv", "64x64:4:3:tma"), ("dq", "64x64:4:3:tma"),
        ("dkdv", "64x64:4:3:tma"), ("dq", "64x128:8:2:tma")]


def test_launches_are_recorded_and_the_kernels_restored():
    kernel = launchers._fwd_kernel
    configs = select_configs(128, torch.float16, torch.device("cuda"), arch=90)
    launches = compile_report.capture(torch.float16, configs, "rules+mass")
    assert set(launches) == {"forward", "dkdv", "dq"}
    assert launches["forward"].kwargs["RETURN_MASS"] and launches["dkdv"].kwargs["PER_KEY_GROUP"]
    assert launchers._fwd_kernel is kernel


def test_hopper_defaults_read_tiles_through_tma_and_older_gpus_keep_pointer_loads(monkeypatch):
    """The Hopper table's 5-stage forward needs 224 KiB of shared memory, more than an A100's."""
    monkeypatch.delenv("DITFLOW_TRITON_CONFIG", raising=False)
    cuda = torch.device("cuda")
    hopper = select_configs(128, torch.bfloat16, cuda, arch=90)
    assert hopper.forward.num_stages == 5
    assert all(cfg.tma for cfg in (hopper.forward, hopper.backward_dkdv, hopper.backward_dq))
    ampere = select_configs(128, torch.bfloat16, cuda, arch=80)
    assert ampere.forward.num_stages == 2
    assert not any(cfg.tma for cfg in (ampere.forward, ampere.backward_dkdv, ampere.backward_dq))



def test_the_rotary_kernel_moves_whole_rows_on_hopper():
    """FLUX's RoPE kernel reads and writes 16-byte vectors, without local memory: it splits
    each row into channel pairs in registers."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", "import json; from benchmarks.compile_report "
                           "import rotary_memory_accesses as r; print(json.dumps(r()))"],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert json.loads(done.stdout) == {"forward": ["ld.global.v4.b32", "st.global.v4.b32"],
                                       "backward": ["ld.global.v4.b32", "st.global.v4.b32"]}


def test_the_head_mean_probability_kernels_use_wgmma_without_spills():
    """DeLeaker's head-mean probabilities at FLUX's shape: tensor-core products (wgmma) and no
    local memory in either kernel."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", "import json; from benchmarks.compile_report "
                           "import head_mean_probs_report as r; print(json.dumps(r()))"],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    report = json.loads(done.stdout)
    assert set(report) == {"_head_lse_kernel", "_head_mean_probs_kernel"}
    for kernel in report.values():
        assert kernel["local"] == [] and kernel["wgmma"] > 0, report
