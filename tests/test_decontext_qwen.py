"""DeContext against Qwen-Image-Edit, on the tiny offline Qwen-Image-Edit pipeline (CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from ditflow.methods.decontext import ProtectConfig, Protector, protect
from ditflow.tiny import tiny_qwen_edit_pipeline

BLOCKS = ("double.0", "double.1")


def qwen_config(**overrides) -> ProtectConfig:
    settings = dict(steps=4, resolution=64, blocks=BLOCKS, eval_prompts=2)
    return ProtectConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_edit_pipeline()


def test_model_defaults_and_the_pipelines_own_size(qwen):
    # the tiny model has 2 blocks: Qwen-Image-Edit's default double.20..46 is refused, by name
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
    (result,) = protect([photo], plus, qwen_config(steps=10))  # a clear margin, as above
    assert result.r_ctx_after < result.r_ctx_before
    assert all(isinstance(images, list) and len(images) == 1 for images in seen)
    assert seen[0][0].size == calculate_dimensions(CONDITION_IMAGE_SIZE, 96 / 32)


def test_editor_folders_are_told_apart_by_their_pipeline_class(tmp_path):
    from ditflow.models.loading import load_editor, load_flux_pipeline

    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(ValueError, match="holds a QwenImagePipeline; ditflow's editors are "
                                         "FluxKontextPipeline, QwenImageEditPipeline, "
                                         r"QwenImageEditPlusPipeline \(diffusers folders\) "
                                         "and Step1X-Edit"):
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


def test_diff_pgd_targets_are_guided_edits(qwen):
    """Qwen-Image-Edit guides only by true CFG, which needs a negative prompt: the clean edits
    Diff-PGD aims away from run both branches (two transformer calls per denoising step)."""
    from PIL import Image

    calls = []
    hook = qwen.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        protector = Protector(qwen, qwen_config(method="diff-pgd"))
        image = Image.new("RGB", (64, 64), (120, 80, 40))
        protector.calls.edit(image, "make it blue", (64, 64), 3, 3.5, 16,
                             torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2 * 3
