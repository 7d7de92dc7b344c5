"""DeContext against Step1X-Edit, on the tiny offline Step1X-Edit pipeline (CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from ditflow.methods.decontext import ProtectConfig, Protector, protect
from ditflow.models.step1x import step1x_size
from ditflow.tiny import tiny_step1x_edit_pipeline

BLOCKS = ("single.0", "single.1")


def step1x_config(**overrides) -> ProtectConfig:
    settings = dict(steps=4, resolution=32, blocks=BLOCKS, eval_prompts=2)
    return ProtectConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def step1x():
    return tiny_step1x_edit_pipeline()


def test_model_defaults_and_the_pipelines_own_size(step1x):
    # the authors' single.0..25 is the default; the tiny model has 2 single blocks
    message = r"not in this model \(4 blocks: double\.0 \.\. single\.1\)"
    with pytest.raises(ValueError, match=message):
        Protector(step1x, ProtectConfig())
    protector = Protector(step1x, step1x_config(resolution=None))
    assert protector.config.resolution == 512
    # the working size is the one the pipeline edits at with size_level = resolution
    for height, width in ((480, 640), (1000, 333), (512, 512)):
        assert protector.working_size(height, width) == step1x_size(height, width, 512, 2)


def test_protection_lowers_r_ctx_within_the_exact_budget(step1x):
    photo = torch.rand(3, 20, 40)
    (result,) = protect([photo], step1x, step1x_config(steps=10))
    assert result.image.shape == photo.shape
    assert (result.image - photo).abs().max() <= 12.75 / 255 + 1e-6
    assert result.r_ctx_after < result.r_ctx_before
    assert result.working_size == step1x_size(20, 40, 32, 2)


def test_diff_pgd_runs_against_step1x(step1x):
    photo = torch.rand(3, 32, 32)
    config = step1x_config(method="diff-pgd", steps=2, diffpgd_edits=1, diffpgd_edit_steps=2)
    (result,) = protect([photo], step1x, config)
    assert 0 < (result.image - photo).abs().max() <= 12.75 / 255 + 1e-6
