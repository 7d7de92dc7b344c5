"""DeContext against the in-context editors whose prompt encoder (Qwen2.5-VL) sees the photo:
Qwen-Image-Edit and Step1X-Edit, on their tiny offline pipelines (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ditflow.cli import SAMPLES, main
from ditflow.io import to_pil
from ditflow.methods.decontext import ProtectConfig, Protector
from ditflow.models.presets import BUILTIN
from ditflow.tiny import tiny_qwen_edit_pipeline, tiny_step1x_edit_pipeline

# CLI name: (builder, two attacked blocks, working resolution, the text mask's input name)
EDITORS = {
    "tiny-qwen": (tiny_qwen_edit_pipeline, ("double.0", "double.1"), 64,
                  "encoder_hidden_states_mask"),
    "tiny-step1x": (tiny_step1x_edit_pipeline, ("double.1", "single.0"), 32,
                    "encoder_attention_mask"),
}


@pytest.fixture(scope="module", params=list(EDITORS))
def editor(request):
    """(CLI name, pipeline, a short config attacking two blocks)."""
    build, blocks, resolution, _ = EDITORS[request.param]
    config = ProtectConfig(steps=4, resolution=resolution, blocks=blocks, eval_prompts=2)
    return request.param, build(), config


def test_a_batch_equals_each_photo_alone(editor):
    """Two photos with instructions of different lengths (padded and masked together) in one
    call: each photo's r_ctx and pixel gradient are those it gets alone."""
    name, pipeline, config = editor
    protector = Protector(pipeline, config)
    size = config.resolution
    pixels = torch.rand(2, 3, size, size)
    prompts, timesteps = ["make the cat smile", "add a hat"], [985.0, 991.0]
    tokens, channels = protector._target_shape(pixels)
    noise = torch.randn(2, tokens, channels)
    mask = protector._inputs(pixels, prompts, timesteps, noise)[EDITORS[name][3]]
    assert mask.sum(-1)[0] != mask.sum(-1)[1]

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


def test_the_prompt_encoder_sees_the_clean_photo_while_optimising(editor, monkeypatch):
    """PGD steps use the clean photo's embeddings (computed once); the final evaluation uses
    the protected photo's."""
    _, pipeline, config = editor
    protector = Protector(pipeline, ProtectConfig(**{
        **config.__dict__, "steps": 3, "prompts": ("make the cat smile",), "eval_prompts": 1}))
    seen = []
    encode = protector.calls.encode_prompt

    def spy(text, image, max_sequence_length):
        seen.append(np.asarray(image))
        return encode(text, image, max_sequence_length)

    monkeypatch.setattr(protector.calls, "encode_prompt", spy)
    photo = torch.rand(3, config.resolution, config.resolution)
    (result,) = protector.run(["photo"], [photo])
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], np.asarray(to_pil(photo)))
    assert not np.array_equal(seen[1], seen[0])
    assert result.steps == 3 and not protector._prompt_cache


def test_a_failed_run_drops_its_photos_embeddings(editor, monkeypatch):
    """A bulk run goes on after a batch fails (out of memory, say): that batch's instruction
    embeddings must not stay behind."""
    _, pipeline, config = editor
    protector = Protector(pipeline, ProtectConfig(**{**config.__dict__, "steps": 3,
                                                     "eval_prompts": 1}))

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory at the first step")

    monkeypatch.setattr(protector, "_draw", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        protector.run(["photo"], [torch.rand(3, config.resolution, config.resolution)])
    assert not protector._prompt_cache


def test_gradient_matches_the_eager_recipe_through_diffusers_own_processor(editor):
    """ditflow's step (early stop, fused mass gradient; Qwen-Image's text padding as a hidden
    key group) and the eager recipe (all blocks through diffusers' own processor with its
    masks, explicit probabilities, gradient checkpointing) give the same pixel gradient, for
    two photos whose instructions differ in length."""
    from benchmarks.protect_step import ditflow_step, eager_step
    from ditflow.methods.decontext import _checkpointing, _frozen

    _, pipeline, config = editor
    protector = Protector(pipeline, config)
    pixels = torch.rand(2, 3, config.resolution, config.resolution)
    tokens, channels = protector._target_shape(pixels)
    step = (["make the cat smile", "add a hat"], [985.0, 991.0],
            torch.randn(2, tokens, channels))
    with _frozen(pipeline.transformer, pipeline.vae):
        ours = ditflow_step(protector, pixels, *step)
        with _checkpointing(pipeline.transformer, True):
            theirs = eager_step(protector, pixels, *step)
    assert ours.abs().max() > 0
    # ditflow sums the photos' r_ctx, the recipe averages them
    torch.testing.assert_close(ours, 2 * theirs, atol=1e-7, rtol=1e-4)


def test_cli_protects_and_evaluates(editor, tmp_path):
    name, _, _ = editor
    out = tmp_path / "protected"
    assert main(["protect", str(SAMPLES / "coffee.png"), "-o", str(out), "--model", name,
                 "--steps", "3", "--quiet"]) == 0
    (record,) = [r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
                 if r["status"] != "started"]
    assert record["status"] == "ok" and record["linf"] <= 12
    assert record["config"]["blocks"] == list(BUILTIN[name].blocks)
    rows = tmp_path / "rows.json"
    assert main(["evaluate", str(SAMPLES), str(out), "--model", name, "--edit-steps", "1",
                 "--json", str(rows)]) == 0
    (row,) = json.loads(rows.read_text())
    assert row["photo"] == "coffee.png" and 0 < row["r_ctx_protected"] < 1


def test_generate_and_edit_refuse_the_editor(editor, capsys):
    name, _, _ = editor
    for command in (["generate", "a red circle"], ["edit", str(SAMPLES / "coffee.png"), "x"]):
        with pytest.raises(SystemExit):
            main([*command, "-o", "out.png", "--model", name])
        assert f"{name} serves protect and evaluate" in capsys.readouterr().err
