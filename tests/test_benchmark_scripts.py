"""The benchmark scripts run end to end (on a CPU, at tiny sizes: so the GPU sweeps cannot rot
between GPU runs), and the README's performance tables render from the committed results."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import (
    attention,
    generation,
    protect_step,
    testbed_ale,
    testbed_deleaker,
    testbed_uvr,
)
from benchmarks.render_table import render

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_attention_table_filters_by_dtype_and_shape():
    # The file README's table comes from (later devices' files may lack these rows).
    path = RESULTS / "attention-NVIDIA-H100-80GB-HBM3-2026-11-22.json"
    table = render(path, dtype="bfloat16", shape="kontext-1024")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "N=" in line]
    assert rows and all("| bfloat16 |" in line and "kontext-1024" in line for line in rows)
    assert "commit" in table.splitlines()[-1]


def test_attention_table_names_providers_not_installed_instead_of_giving_them_rows():
    table = render(RESULTS / "attention-NVIDIA-H200-2026-11-29-v9.json")
    assert "not installed" not in table.split("Not installed there:")[0]
    assert "Not installed there: flash-attn, fa4 (plain)," in table
    assert sum(line.startswith("| kontext-1024") for line in table.splitlines()) == 16


def test_protect_step_table_gives_the_speed_up_over_the_recipe_at_each_resolution(tmp_path):
    lines = render(RESULTS / "protect-step-full-NVIDIA-H200-2026-11-29.json").splitlines()
    assert lines[0].startswith("| model | resolution | tokens | provider | ms per step |")
    recipes = [line for line in lines if "authors' recipe" in line]
    assert len(recipes) == 2 and all(line.endswith("| 1.00x |") for line in recipes)
    rows = _rows(RESULTS / "protect-step-full-NVIDIA-H200-2026-11-29.json")
    fused = [r for r in rows if r["provider"].startswith("ditflow (early stop")]
    recipe = [r for r in rows if r["provider"] == "authors' recipe"]
    for ours, theirs in zip(fused, recipe, strict=True):
        assert f"| {theirs['ms'] / ours['ms']:.2f}x |" in "\n".join(lines)
    # a run cut short before the recipe's row, or whose recipe failed
    data = json.loads((RESULTS / "protect-step-full-NVIDIA-H200-2026-11-29.json").read_text())
    data["rows"] = [*data["rows"][:2], dict(data["rows"][2], ms=math.nan, note="OOM")]
    path = tmp_path / "protect-step.json"
    path.write_text(json.dumps(data))
    cut = render(path).splitlines()
    assert cut[2].endswith("| n/a |") and cut[4].endswith("| OOM | | |")
    # a profiled run: the kernels' time of a step next to its wall time
    profiled = render(RESULTS / "protect-step-full-NVIDIA-H200-2026-11-29-sliced-recipe.json")
    assert "| ms per step | device ms | peak MiB |" in profiled
    assert "| ditflow (early stop, fused mass) | 279 | 177 | 9487 | 1.93x |" in profiled


@pytest.mark.parametrize(("kernel", "kind"), [
    ("_bwd_dkdv_kernel", "ditflow attention"),
    ("ditflow_cpp::flow_attention_bwd", "ditflow attention"),  # the C++ kernels, on a CPU
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128",
     "SDPA"),  # a cuDNN kernel, but attention
    ("fmha_cutlassB_bf16_aligned_128x64_k65536_sm80", "SDPA"),  # a CUTLASS one
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT", "matrix products"),
    ("triton_poi_fused_add_mul_0", "compiled (Inductor)"),
    ("void at::native::elementwise_kernel<128, 2>", "other"),
])
def test_profiled_kernels_are_classed_by_what_they_compute(kernel, kind):
    from benchmarks.timing import _kernel_class

    assert _kernel_class(kernel) == kind


def test_protect_step_times_the_rows_asked_for_and_batches_per_photo(tmp_path):
    rows = _rows(protect_step.main(["--model", "tiny", "--resolution", "32", "--out",
                                    str(tmp_path), "--rows", "recipe", "ditflow", "batched",
                                    "--batch", "3", "--chain", "1"]))
    assert [r["provider"] for r in rows] == [
        RECIPES[3], RECIPES[0], "ditflow, 3 photos per step (ms per photo)"]
    assert rows[1]["tokens"] == rows[2]["tokens"]  # one photo's sequence
    # the CUDA graph's row, asked for without a GPU: recorded as failed, with the reason
    (graphed,) = _rows(protect_step.main(["--model", "tiny", "--resolution", "32", "--out",
                                          str(tmp_path), "--rows", "graphed"]))
    assert graphed["provider"] == "ditflow, CUDA graph" and math.isnan(graphed["ms"])
    assert graphed["note"] == ("UnsupportedSetting: cuda_graph: the model is on cpu; CUDA graphs "
                               "need it on a GPU")


@pytest.mark.parametrize("model", ["host", "host-step1x", "host-qwen"])
def test_the_host_models_run_every_block_of_the_full_size_step(tmp_path, model):
    """``--model host[-step1x|-qwen]``: the editors' depth at tiny widths, so their step runs
    the full-size step's every operation (the default attacked blocks, the recipe's all)."""
    import inspect

    from diffusers import (
        AutoencoderKLQwenImage,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
    )

    from ditflow.models.step1x import Step1XEditTransformer

    build, full_class, depths = {
        "host": (protect_step.host_models, FluxTransformer2DModel,
                 ("num_layers", "num_single_layers")),
        "host-step1x": (protect_step.host_step1x_models, Step1XEditTransformer,
                        ("num_layers", "num_single_layers")),
        "host-qwen": (protect_step.host_qwen_models, QwenImageTransformer2DModel,
                      ("num_layers",))}[model]
    transformer, vae = build()
    full_size = inspect.signature(full_class).parameters
    for depth in depths:
        assert transformer.config[depth] == full_size[depth].default
    if isinstance(vae, AutoencoderKLQwenImage):
        full_vae = inspect.signature(AutoencoderKLQwenImage).parameters
        assert vae.config.dim_mult == full_vae["dim_mult"].default
        assert vae.config.num_res_blocks == full_vae["num_res_blocks"].default
    else:
        assert len(vae.encoder.down_blocks) == 4
    rows = _rows(protect_step.main(["--model", model, "--resolution", "32", "--rows",
                                    "ditflow", "recipe", "--chain", "1", "--out",
                                    str(tmp_path)]))
    assert all(math.isfinite(r["ms"]) and r["tokens"] > 0 for r in rows)


def test_a_batched_step_gives_each_photo_its_own_gradient():
    from ditflow.methods.decontext import _frozen

    pipe = protect_step._pipeline("tiny")
    config = protect_step._config("tiny", 32)
    (protector, pixels, prompts, timesteps, noise), _ = protect_step._step_inputs(pipe, config, 2)
    with _frozen(pipe.transformer, pipe.vae):
        together = protect_step.ditflow_step(protector, pixels, prompts, timesteps, noise)
        for i in range(2):
            alone = protect_step.ditflow_step(protector, pixels[i:i + 1], prompts[i:i + 1],
                                              timesteps[i:i + 1], noise[i:i + 1])
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-7)


def test_generation_table_gives_each_provider_s_overhead(tmp_path):
    lines = render(RESULTS / "generation-NVIDIA-H200-2026-11-29.json").splitlines()
    assert lines[0] == "| size | steps | provider | seconds | overhead |"
    assert "| stock diffusers (SDPA) | 4.89 | +0.0% |" in lines[2]
    # a provider that failed shows its note
    data = json.loads((RESULTS / "generation-NVIDIA-H200-2026-11-29.json").read_text())
    data["rows"].append(dict(data["rows"][-1], provider="broken", seconds=math.nan,
                             note="RuntimeError: boom"))
    data["rows"][-1].pop("overhead")
    path = tmp_path / "generation.json"
    path.write_text(json.dumps(data))
    assert "| broken | RuntimeError: boom | |" in render(path)


def test_sweep_tables_have_one_row_per_shape_and_config():
    path = RESULTS / "sweep-NVIDIA-H200-2026-11-29-chosen.json"
    lines = render(path, shape="kontext-1024").splitlines()
    assert lines[0].startswith("| shape | dtype | config | forward ms |")
    rows = [line for line in lines if line.startswith("| kontext-1024")]
    assert [row.split(" | ")[2] for row in rows] == [
        "default", "forward=128x128:8:5:tma,backward_dkdv=64x64:4:3:tma,backward_dq=64x64:4:3:tma"]
    older = render(RESULTS / "sweep-NVIDIA-H100-80GB-HBM3-2026-11-22.json")  # no errors recorded
    assert "| n/a / n/a |" in older


def test_cpu_kernel_tables_have_one_row_per_backend_and_size():
    sweep = max(p for p in RESULTS.glob("cpu-kernel-*.json") if "testbed" not in p.name)
    lines = render(sweep).splitlines()
    assert lines[0] == "| N | backend | forward + backward s | peak MiB |"
    assert sum(line.startswith("| 4096 |") for line in lines) == 2
    testbed = max(RESULTS.glob("cpu-kernel-testbed-*.json"))
    rows = [line for line in render(testbed).splitlines() if line.startswith("| 536 |")]
    assert [row.split(" | ")[1] for row in rows] == ["cpp", "reference", "sdpa"]


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["meta"]["command"].startswith("python -m benchmarks.")
    return data["rows"]


def test_attention_sweep_checks_every_provider_against_the_reference(tmp_path, monkeypatch):
    # neither flash-attn nor FlashAttention-4 installed
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    rows = _rows(attention.main(["--shape", "tiny", "--dtype", "fp32", "--out", str(tmp_path)]))
    by_key = {(r["direction"], r["provider"]): r for r in rows}
    measured = [
        ("forward", "ditflow (no rules)"), ("forward", "ditflow (rules + mass)"),
        ("forward", "ditflow (mass only)"), ("forward", "eager reference (rules + mass)"),
        ("forward", "sdpa flash"), ("forward", "flex (plain)"),
        ("forward+backward", "ditflow (no rules)"), ("forward+backward", "ditflow (rules + mass)"),
        ("forward+backward", "eager reference (rules + mass)"),
        ("forward+backward", "sdpa flash"),
    ]
    for key in measured:
        row = by_key[key]
        assert row["ms"] > 0 and "note" not in row, key
        # fp32 inputs: every provider agrees with the fp32 reference (outputs, or dq/dk/dv)
        assert row["max_err"] < 1e-5, key
    # Providers that cannot run on a CPU are recorded as NaN with the reason, not dropped.
    cudnn = by_key[("forward", "sdpa cudnn")]
    assert math.isnan(cudnn["ms"]) and cudnn["note"]
    assert ("forward+backward", "flex (scale rules, grad through lse)") in by_key
    # So are providers that are not installed.
    missing = [("forward", "flash-attn"), ("forward+backward", "flash-attn"),
               ("forward", "fa4 (plain)"), ("forward", "fa4 (scale rules + lse)"),
               ("forward+backward", "fa4 (plain)"),
               ("forward+backward", "fa4 (scale rules, grad through lse)")]
    for key in missing:
        assert math.isnan(by_key[key]["ms"]) and by_key[key]["note"] == "not installed", key


def test_attention_provider_whose_setup_fails_is_recorded_with_the_reason(monkeypatch):
    fa4 = types.ModuleType("flash_attn.cute")
    fa4.flash_attn_func = None
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fa4)

    def moved_api(num_groups):
        raise AttributeError("module 'cutlass.cute' has no attribute 'make_rmem_tensor'\nmore")

    monkeypatch.setattr(attention, "_fa4_score_mods", moved_api)
    device = torch.device("cpu")
    p = attention.Problem.random(attention.SHAPES["tiny"], torch.float32, device)
    forward, backward = attention._fa4(p)
    assert list(forward) == ["fa4 (plain)", "fa4 (scale rules + lse)"]
    assert list(backward) == ["fa4 (plain)", "fa4 (scale rules, grad through lse)"]
    for name, (fn, truth) in {**forward, **backward}.items():
        row = attention._timed(dict(provider=name), fn, p.flops, device, truth)
        assert math.isnan(row["ms"]) and row["note"] == (
            "AttributeError: module 'cutlass.cute' has no attribute 'make_rmem_tensor'"), name


def test_config_sweep_times_the_default_table_and_pinned_configs(tmp_path):
    rows = _rows(attention.main(["--shape", "tiny", "--dtype", "fp32", "--out", str(tmp_path),
                                 "--sweep", "default", "forward=64x32:4:1:tma",
                                 "backward_dq=64x64:4:1"]))
    assert [r["config"] for r in rows] == ["default", "forward=64x32:4:1:tma",
                                           "backward_dq=64x64:4:1"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "note" not in r for r in rows)
    # fp32: every config agrees with the fp32 reference, outputs and dq/dk/dv
    assert all(r["fwd_max_err"] < 1e-5 and r["bwd_max_err"] < 1e-5 for r in rows)


def test_compile_report_table_has_a_row_per_kernel_variant_and_config():
    path = max(RESULTS.glob("compile-sm90-*.json"))
    lines = render(path).splitlines()
    assert lines[0].startswith("| kernel | variant | config | registers | spilled bytes |")
    rows = _rows(path)
    assert sum(line.startswith("| dkdv |") for line in lines) == sum(
        r["kernel"] == "dkdv" for r in rows) > 0


RECIPES = ["ditflow (early stop, fused mass)", "ditflow, compiled blocks",
           "ditflow, gradient checkpointing", "authors' recipe",
           "ditflow, 4 photos per step (ms per photo)"]


def test_protect_step_benchmark_runs_every_recipe(tmp_path):
    # aot_eager: the compiled row's tracing and autograd without inductor's minutes of codegen
    compiled = ["--compile-backend", "aot_eager"]
    path = protect_step.main(["--model", "tiny", "--resolution", "32", "--out", str(tmp_path),
                              "--profile", "--chain", "2", *compiled])
    rows = _rows(path)
    assert [r["provider"] for r in rows] == RECIPES
    assert all(r["ms"] > 0 and r["tokens"] == 8 + 2 * 16 * 16 for r in rows)
    for profile in (r["profile"] for r in rows):
        assert sum(profile["by_class"].values()) == pytest.approx(profile["total_ms"])
        assert profile["by_class"]["matrix products"] > 0  # aten::mm / addmm on a CPU
        top = [k["ms"] for k in profile["top"]]
        assert top == sorted(top, reverse=True) and 0 < sum(top) <= profile["total_ms"]
    qwen_path = protect_step.main(["--model", "tiny-qwen", "--resolution", "64",
                                   "--out", str(tmp_path), "--chain", "1", *compiled])
    rows = _rows(qwen_path)
    assert [r["provider"] for r in rows] == [*RECIPES[:3], "eager recipe", RECIPES[4]]
    assert all(r["ms"] > 0 and r["tokens"] > 2 * 4 * 4 for r in rows)
    step1x_path = protect_step.main(["--model", "tiny-step1x", "--resolution", "32",
                                     "--out", str(tmp_path), "--chain", "1", *compiled])
    rows = _rows(step1x_path)
    assert [r["provider"] for r in rows] == RECIPES
    assert all(r["ms"] > 0 and r["tokens"] == 64 + 2 * 16 * 16 for r in rows)
    # One file per model: gpu_runs.sh runs the models one after another into one folder.
    assert [p.name.split("-CPU")[0] for p in (path, qwen_path, step1x_path)] == [
        "protect-step-tiny", "protect-step-tiny-qwen", "protect-step-tiny-step1x"]
    assert sorted(tmp_path.glob("protect-step-*.json")) == sorted([path, qwen_path, step1x_path])


def test_compiled_blocks_give_the_eager_gradient_and_are_undone_afterwards():
    from ditflow.methods.decontext import _compiled_blocks, _frozen

    pipe = protect_step._pipeline("tiny")
    inputs, _ = protect_step._step_inputs(pipe, protect_step._config("tiny", 32))
    modules = list(pipe.transformer.modules())
    with _frozen(pipe.transformer, pipe.vae):
        eager = protect_step.ditflow_step(*inputs)
        with _compiled_blocks(pipe.transformer, "aot_eager"):
            assert sum(m._compiled_call_impl is not None for m in modules) == 4  # 2 + 2 blocks
            compiled = protect_step.ditflow_step(*inputs)
        assert all(m._compiled_call_impl is None for m in modules)
    torch.testing.assert_close(compiled, eager)


def test_protect_step_builds_the_model_once_and_records_a_failing_recipe(tmp_path, monkeypatch):
    builds = []
    build = protect_step._pipeline

    def counted_build(model):
        builds.append(model)
        return build(model)

    monkeypatch.setattr(protect_step, "_pipeline", counted_build)

    def failing_recipe(*args):
        raise RuntimeError("out of resource: shared memory, Required: 264192\nHardware limit")

    monkeypatch.setattr(protect_step, "eager_step", failing_recipe)
    rows = _rows(protect_step.main(["--model", "tiny", "--resolution", "32", "48",
                                    "--out", str(tmp_path), "--compile-backend", "aot_eager",
                                    "--chain", "1"]))
    assert builds == ["tiny"]
    assert [(r["resolution"], r["provider"]) for r in rows] == [
        (resolution, recipe) for resolution in (32, 48) for recipe in RECIPES]
    ditflow = [r for r in rows if r["provider"] != "authors' recipe"]
    failed = [r for r in rows if r["provider"] == "authors' recipe"]
    assert all(r["ms"] > 0 and "note" not in r for r in ditflow)
    assert all(math.isnan(r["ms"]) and r["tokens"] > 0 and r["note"] ==
               "RuntimeError: out of resource: shared memory, Required: 264192" for r in failed)


def test_generation_benchmark_reports_overhead_against_stock(tmp_path):
    path = generation.main(["--model", "tiny", "--size", "32", "--steps", "2", "--repeats", "1",
                            "--profile", "--out", str(tmp_path)])
    rows = _rows(path)
    assert len(rows) == 6 and rows[0]["overhead"] == 0
    assert all(r["seconds"] > 0 and math.isfinite(r["overhead"]) for r in rows)
    assert all(r["profile"]["total_ms"] > 0 for r in rows)
    assert "| seconds | device s | overhead |" in render(path)


def test_generation_benchmark_records_a_failing_provider_and_keeps_rows_when_cut_short(
        tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def interrupted(*args, **kwargs):  # what a timeout does to the run
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "UVR", failing)
    monkeypatch.setattr(generation, "DeLeaker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generation.main(["--model", "tiny", "--size", "32", "--steps", "2", "--repeats", "1",
                         "--out", str(tmp_path)])
    (path,) = tmp_path.iterdir()  # one file, rewritten after every provider
    rows = _rows(path)
    assert [r["provider"] for r in rows] == [
        "stock diffusers (SDPA)", "ditflow, attached with nothing active",
        "ditflow, rules in every block and step", "ditflow, mass recorded in every block",
        "ditflow, UVR (every token flagged)"]
    assert all(r["seconds"] > 0 and math.isfinite(r["overhead"]) for r in rows[:4])
    assert math.isnan(rows[4]["seconds"]) and math.isnan(rows[4]["overhead"])
    assert rows[4]["note"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_testbed_deleaker_benchmark_scores_every_variant(tmp_path):
    testbed_deleaker.main(["--captions", "1", "--steps", "4", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("testbed-deleaker-*.json")
    result = json.loads(path.read_text())
    assert set(result["summary"]) == {"none", *testbed_deleaker.VARIANTS}
    for name, scores in result["summary"].items():
        assert 0 <= scores["color_bleed"] <= 1 and scores["seconds"] > 0
        assert (name == "none") == ("region_iou_drawn" not in scores)
    assert path.with_suffix(".png").exists()


def test_testbed_ale_benchmark_scores_every_variant(tmp_path):
    testbed_ale.main(["--edits", "1", "--steps", "4", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("testbed-ale-*.json")
    result = json.loads(path.read_text())
    assert set(result["summary"]) == {"one object", "two objects"}
    for by_variant in result["summary"].values():
        assert set(by_variant) == {"none", *testbed_ale.VARIANTS}
        for scores in by_variant.values():
            assert 0 <= scores["leaked_pixels"] <= 1 and 0 <= scores["edited_color"] <= 1
            assert scores["background_psnr"] > 0 and scores["seconds"] > 0
    assert [row["kind"] for row in result["rows"]] == ["one object", "two objects"]
    assert path.with_suffix(".png").exists()


def test_testbed_uvr_benchmark_scores_every_set_and_variant(tmp_path):
    testbed_uvr.main(["--prompts", "1", "--anchors", "4", "--steps", "8", "--out",
                      str(tmp_path)])
    (path,) = tmp_path.glob("testbed-uvr-*.json")
    result = json.loads(path.read_text())
    assert len(result["summary"]) == 4 and len(result["rows"]) == 4
    for by_variant in result["summary"].values():
        assert set(by_variant) == {"none", "scores", *testbed_uvr.VARIANTS}
        for name in ["none", *testbed_uvr.VARIANTS]:
            assert 0 <= by_variant[name]["shows"] <= 1 and by_variant[name]["change"] >= 0
        assert 0 <= by_variant["scores"]["share_of_other_tokens_above_0.6"] <= 1
    assert result["anchors"]["generation"] >= 1 and result["anchors"]["editing"] >= 1
    assert path.with_suffix(".png").exists()
