"""DeContext against Step1X-Edit, on the tiny offline Step1X-Edit pipeline (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ditflow.cli import SAMPLES, main
from ditflow.methods.decontext import ProtectConfig, Protector, _to_pil, protect
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


def test_a_batch_equals_each_photo_alone(step1x):
    """Two photos with different instructions (different unpadded lengths in the connector) in
    one call: each photo's r_ctx and pixel gradient are those it gets alone."""
    protector = Protector(step1x, step1x_config())
    pixels = torch.rand(2, 3, 32, 32)
    prompts, timesteps = ["make the cat smile", "add a hat"], [985.0, 991.0]
    tokens, channels = protector._target_shape(pixels)
    noise = torch.randn(2, tokens, channels)
    masks = protector._inputs(pixels, prompts, timesteps, noise)["encoder_attention_mask"]
    assert masks[0].sum() != masks[1].sum()

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


def test_the_prompt_encoder_sees_the_clean_photo_while_optimising(step1x, monkeypatch):
    protector = Protector(step1x, step1x_config(steps=3, prompts=("make the cat smile",),
                                                eval_prompts=1))
    seen = []
    encode = protector.calls.encode_prompt

    def spy(text, image, max_sequence_length):
        seen.append(np.asarray(image))
        return encode(text, image, max_sequence_length)

    monkeypatch.setattr(protector.calls, "encode_prompt", spy)
    photo = torch.rand(3, 32, 32)
    (result,) = protector.run(["photo"], [photo])
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], np.asarray(_to_pil(photo)))
    assert not np.array_equal(seen[1], seen[0])
    assert result.steps == 3


def test_gradient_matches_the_authors_recipe_through_diffusers_own_processor(step1x):
    """ditflow's step (early stop, fused mass gradient) and the authors' recipe (all blocks
    through diffusers' FLUX processor, explicit probabilities, gradient checkpointing) give
    the same pixel gradient."""
    from benchmarks.protect_step import ditflow_step, eager_step
    from ditflow.methods.decontext import _checkpointing, _frozen

    protector = Protector(step1x, step1x_config(blocks=("double.1", "single.0")))
    pixels = torch.rand(2, 3, 32, 32)
    tokens, channels = protector._target_shape(pixels)
    step = (["make the cat smile", "add a hat"], [985.0, 991.0],
            torch.randn(2, tokens, channels))
    with _frozen(step1x.transformer, step1x.vae):
        ours = ditflow_step(protector, pixels, *step)
        with _checkpointing(step1x.transformer, True):
            theirs = eager_step(protector, pixels, *step)
    assert ours.abs().max() > 0
    # ditflow sums the photos' r_ctx, the recipe averages them
    torch.testing.assert_close(ours, 2 * theirs, atol=1e-7, rtol=1e-4)


def test_diff_pgd_runs_against_step1x(step1x):
    photo = torch.rand(3, 32, 32)
    config = step1x_config(method="diff-pgd", steps=2, diffpgd_edits=1, diffpgd_edit_steps=2)
    (result,) = protect([photo], step1x, config)
    assert 0 < (result.image - photo).abs().max() <= 12.75 / 255 + 1e-6


def test_cli_protects_and_evaluates_against_the_tiny_step1x_editor(tmp_path):
    out = tmp_path / "protected"
    assert main(["protect", str(SAMPLES / "coffee.png"), "-o", str(out), "--model",
                 "tiny-step1x", "--steps", "3", "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["linf"] <= 12
    assert record["config"]["blocks"] == ["double.0", "double.1", "single.0", "single.1"]
    rows = tmp_path / "rows.json"
    assert main(["evaluate", str(SAMPLES), str(out), "--model", "tiny-step1x", "--edit-steps",
                 "1", "--json", str(rows)]) == 0
    (row,) = json.loads(rows.read_text())
    assert row["photo"] == "coffee.png" and 0 < row["r_ctx_protected"] < 1


def test_generate_and_edit_refuse_the_step1x_editor(capsys):
    for command in (["generate", "a red circle"], ["edit", str(SAMPLES / "coffee.png"), "x"]):
        with pytest.raises(SystemExit):
            main([*command, "-o", "out.png", "--model", "tiny-step1x"])
        assert "tiny-step1x serves protect and evaluate" in capsys.readouterr().err
