"""DeContext against Qwen-Image-Edit, on the tiny offline Qwen-Image-Edit pipeline (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from ditflow.cli import SAMPLES, main
from ditflow.methods.decontext import ProtectConfig, Protector, _to_pil, protect
from ditflow.tiny import tiny_qwen_edit_pipeline

BLOCKS = ("double.0", "double.1")


def qwen_config(**overrides) -> ProtectConfig:
    settings = dict(steps=4, resolution=64, blocks=BLOCKS, eval_prompts=2)
    return ProtectConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_edit_pipeline()


def test_model_defaults_and_the_pipelines_own_size(qwen):
    # the tiny model has 2 blocks: Qwen-Image-Edit's default double.0..39 is refused, by name
    message = r"not in this model \(2 blocks: double\.0 \.\. double\.1\)"
    with pytest.raises(ValueError, match=message):
        Protector(qwen, ProtectConfig())
    protector = Protector(qwen, qwen_config(resolution=None))
    assert protector.config.resolution == 1024
    # at 1024 the working size is the ~1 MP size the pipeline itself feeds the model
    for height, width in ((480, 640), (1000, 333), (512, 512)):
        pipeline_width, pipeline_height, _ = calculate_dimensions(1024 * 1024, width / height)
        assert protector.working_size(height, width) == (pipeline_height, pipeline_width)


def test_protection_lowers_r_ctx_within_the_exact_budget(qwen):
    photo = torch.rand(3, 40, 80)
    (result,) = protect([photo], qwen, qwen_config(steps=10))
    assert result.image.shape == photo.shape
    assert (result.image - photo).abs().max() <= 12.75 / 255 + 1e-6
    assert result.r_ctx_after < result.r_ctx_before
    assert result.working_size == (32, 96)  # multiples of 32


def test_a_batch_of_instructions_of_different_lengths_equals_each_alone(qwen):
    """Prompts of different lengths in one call are padded and the padding masked: each photo's
    r_ctx and pixel gradient are those it gets alone."""
    protector = Protector(qwen, qwen_config())
    pixels = torch.rand(2, 3, 64, 64)
    prompts, timesteps = ["make the cat smile", "add a hat"], [985.0, 991.0]
    tokens, channels = protector._target_shape(pixels)
    noise = torch.randn(2, tokens, channels)
    assert protector._inputs(pixels, prompts, timesteps, noise)[
        "encoder_hidden_states_mask"] is not None

    def r_ctx_and_grad(i: slice):
        x = pixels[i].clone().requires_grad_()
        r = protector.r_ctx(x, prompts[i], timesteps[i], noise[i])
        return r.detach(), torch.autograd.grad(r.sum(), x)[0]

    together = r_ctx_and_grad(slice(0, 2))
    alone = [r_ctx_and_grad(slice(i, i + 1)) for i in range(2)]
    torch.testing.assert_close(together[0], torch.cat([a[0] for a in alone]), atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(together[1], torch.cat([a[1] for a in alone]), atol=1e-6,
                               rtol=1e-4)
    assert together[1].abs().sum() > 0


def test_the_prompt_encoder_sees_the_clean_photo_while_optimising(qwen, monkeypatch):
    """Qwen2.5-VL embeds the photo with the instruction: PGD steps use the clean photo's
    embeddings (computed once); the final evaluation uses the protected photo's."""
    protector = Protector(qwen, qwen_config(steps=3, prompts=("make the cat smile",),
                                            eval_prompts=1))
    seen = []
    encode = protector.calls.encode_prompt

    def spy(text, image, max_sequence_length):
        seen.append(np.asarray(image))
        return encode(text, image, max_sequence_length)

    monkeypatch.setattr(protector.calls, "encode_prompt", spy)
    photo = torch.rand(3, 64, 64)
    (result,) = protector.run(["photo"], [photo])
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], np.asarray(_to_pil(photo)))
    assert not np.array_equal(seen[1], seen[0])
    assert result.steps == 3 and not protector._prompt_cache


def test_qwen_image_edit_2511_sees_the_photo_as_picture_1_at_384_squared(monkeypatch):
    """QwenImageEditPlusPipeline (2509/2511, here with zero_cond_t): the prompt encoder gets the
    photo as its one input image, resized as the pipeline resizes it; protection works."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        calculate_dimensions,
    )

    plus = tiny_qwen_edit_pipeline(plus=True)
    seen = []
    encode = plus.encode_prompt

    def spy(prompt, image=None, **kwargs):
        seen.append(image)
        return encode(prompt, image=image, **kwargs)

    monkeypatch.setattr(plus, "encode_prompt", spy)
    photo = torch.rand(3, 40, 80)
    (result,) = protect([photo], plus, qwen_config(steps=6))
    assert result.r_ctx_after < result.r_ctx_before
    assert all(isinstance(images, list) and len(images) == 1 for images in seen)
    assert seen[0][0].size == calculate_dimensions(CONDITION_IMAGE_SIZE, 96 / 32)


def test_cli_protects_and_evaluates_against_the_tiny_qwen_editor(tmp_path):
    out = tmp_path / "protected"
    assert main(["protect", str(SAMPLES / "coffee.png"), "-o", str(out), "--model", "tiny-qwen",
                 "--steps", "3", "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["linf"] <= 12
    assert record["config"]["blocks"] == list(BLOCKS) and record["config"]["resolution"] == 64
    rows = tmp_path / "rows.json"
    assert main(["evaluate", str(SAMPLES), str(out), "--model", "tiny-qwen", "--edit-steps", "1",
                 "--json", str(rows)]) == 0
    (row,) = json.loads(rows.read_text())
    assert row["photo"] == "coffee.png" and 0 < row["r_ctx_protected"] < 1


def test_generate_and_edit_refuse_the_qwen_editor(capsys):
    for command in (["generate", "a red circle"], ["edit", str(SAMPLES / "coffee.png"), "x"]):
        with pytest.raises(SystemExit):
            main([*command, "-o", "out.png", "--model", "tiny-qwen"])
        assert "tiny-qwen serves protect and evaluate" in capsys.readouterr().err


def test_editor_folders_are_told_apart_by_their_pipeline_class(tmp_path):
    from ditflow.models.loading import load_editor, load_flux_pipeline

    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(ValueError, match="holds a QwenImagePipeline; ditflow's editors are "
                                         "FluxKontextPipeline, QwenImageEditPipeline, "
                                         "QwenImageEditPlusPipeline"):
        load_editor(tmp_path)
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "QwenImageEditPipeline", "vae": ["diffusers", "AutoencoderKLQwenImage"]}')
    with pytest.raises(FileNotFoundError, match=r"missing: vae/.*"):
        load_editor(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_editor(tmp_path / "nowhere")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="holds a QwenImageEditPipeline; this needs a "
                                         "FluxKontextPipeline"):
        load_flux_pipeline(tmp_path)  # e.g. `ditflow edit`, FLUX-only, given a Qwen folder


def test_gradient_matches_the_eager_recipe_through_diffusers_own_processor(qwen):
    """ditflow's step (early stop, fused mass gradient, padding as a hidden key group) and the
    eager recipe (all blocks through diffusers' own processor and its padding mask, explicit
    probabilities, gradient checkpointing) give the same pixel gradient, for two photos whose
    instructions differ in length."""
    from benchmarks.protect_step import ditflow_step, eager_step
    from ditflow.methods.decontext import _checkpointing, _frozen

    protector = Protector(qwen, qwen_config(blocks=("double.0", "double.1")))
    pixels = torch.rand(2, 3, 64, 64)
    tokens, channels = protector._target_shape(pixels)
    step = (["make the cat smile", "add a hat"], [985.0, 991.0],
            torch.randn(2, tokens, channels))
    with _frozen(qwen.transformer, qwen.vae):
        ours = ditflow_step(protector, pixels, *step)
        with _checkpointing(qwen.transformer, True):
            theirs = eager_step(protector, pixels, *step)
    assert ours.abs().max() > 0
    # ditflow sums the photos' r_ctx, the recipe averages them
    torch.testing.assert_close(ours, 2 * theirs, atol=1e-7, rtol=1e-4)
