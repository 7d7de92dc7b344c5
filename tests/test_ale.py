"""ALE: object regions, object-restricted embeddings, region-restricted attention against the
rule computed densely, background blending, and the edit end to end on the testbed editor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from helpers import TRITON_ON_CPU

from ditflow import flow_attention, ops
from ditflow.layout import TokenLayout
from ditflow.methods.ale import ALE, ALEConfig, edit, object_regions, restricted_embeddings
from ditflow.models.flux import encode_image, pack_latents
from ditflow.session import BlockId, StepInfo
from ditflow.testbed.evaluate import edit as stock_edit
from ditflow.testbed.evaluate import recolor_edits
from ditflow.testbed.scenes import SIZE, masks, render

CALL = (StepInfo(3, 0.5), BlockId("single", 0, 2))
OFF = ALEConfig(restrict_embeddings=False, mask_attention=False, blend_background=False)


@pytest.fixture
def editor(testbed_editor):
    return testbed_editor


@pytest.fixture(scope="module")
def two_object_edit():
    """(source pixels, instruction, phrases, masks of the edited objects) of a held-out edit."""
    source, target, instruction, phrases = recolor_edits(1, 2, seed=123)[0]
    edited = [i for i, s in enumerate(source.shapes) if s not in target.shapes]
    return render(source), instruction, phrases, [masks(source)[i] for i in edited]


def _ale(pipe, case, config: ALEConfig | None = None, **call):
    pixels, instruction, phrases, object_masks = case
    options = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np")
    return edit(pipe, pixels, instruction, phrases, object_masks, resolution=SIZE,
                config=config or ALEConfig(), max_sequence_length=24,
                generator=torch.Generator().manual_seed(0), **{**options, **call})


def test_object_regions_dilate_cover_and_stay_disjoint():
    pixel_masks = torch.zeros(2, 8, 12, dtype=torch.bool)
    pixel_masks[0, 0:4, 0:4] = True  # tokens are 2x2 pixels: tokens (0..1, 0..1)
    pixel_masks[1, 3:8, 4:12] = True  # any pixel counts: token rows 1..3, columns 2..5
    regions = object_regions(pixel_masks, (4, 6), dilation=0)
    assert regions[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert regions[1].sum() == 3 * 4 and not (regions[0] & regions[1]).any()
    # one pixel of dilation (1/12 of the longer side): object 0 reaches token row and column
    # 2; of those, tokens (1, 2) and (2, 2) hold object 1's own pixels and stay object 1's
    dilated = object_regions(pixel_masks, (4, 6), dilation=1 / 12)
    assert dilated[0].sum() == 9 - 2 and not (dilated[0] & dilated[1]).any()
    assert dilated[1, 1, 2] and dilated[1, 2, 2] and (dilated[1] >= regions[1]).all()


def test_rgb_cam_and_ore_equal_the_rules_computed_densely():
    """Object i's text tokens (its phrase, its own end-of-sequence tokens) get -inf from every
    image token outside region i (target and context), the instruction's end-of-sequence tokens
    from every image token inside a region, nothing else changes; reference (fp64), Triton
    interpreter and C++ (fp32)."""
    regions = torch.zeros(2, 3, 4, dtype=torch.bool)
    regions[0, :2, :2] = True
    regions[1, 1:, 3] = True
    # text: instruction tokens 0..6 (4 a phrase of object 1, 5..6 its end of sequence), then
    # each object's own end-of-sequence token
    objects, prompt_tail = ([1, 2, 7], [4, 8]), [5, 6]
    ale = ALE(objects, regions, prompt_tail)
    base = TokenLayout.from_segments(9, 12, 12)
    layout = ale.layout(*CALL, base)
    assert layout.names[3:] == ("prompt.tail", "object0.text", "object0.target",
                                "object0.context", "object1.text", "object1.target",
                                "object1.context")
    q, k, v = (torch.randn(1, 33, 2, 8, dtype=torch.float64) * 2 for _ in range(3))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    for tokens, region in zip(objects, regions, strict=True):
        inside = region.flatten()
        outside = 9 + torch.cat([(~inside).nonzero(), 12 + (~inside).nonzero()]).squeeze(1)
        logits[:, :, outside[:, None], torch.tensor(tokens)[None, :]] = float("-inf")
    in_regions = regions.any(0).flatten()
    in_regions = 9 + torch.cat([in_regions.nonzero(), 12 + in_regions.nonzero()]).squeeze(1)
    logits[:, :, in_regions[:, None], torch.tensor(prompt_tail)[None, :]] = float("-inf")
    expected = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    backends = [("reference", torch.float64, 1e-9)]
    if TRITON_ON_CPU:
        backends.append(("triton", torch.float32, 2e-5))
    if ops.cpp_available():
        backends.append(("cpp", torch.float32, 2e-5))
    for backend, dtype, tol in backends:
        low = [t.to(dtype) for t in (q, k, v)]
        out = flow_attention(*low, layout.groups(), rules=ale.rules(*CALL, layout),
                             backend=backend).out
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert ale.layout(*CALL, base) is layout  # one plan per call layout
    with pytest.raises(ValueError, match="regions are 3x4"):
        ale.layout(*CALL, TokenLayout.from_segments(9, 12, 24))
    with pytest.raises(ValueError, match="text has 7 tokens"):
        ale.layout(*CALL, TokenLayout.from_segments(7, 12, 12))


def test_restricted_embeddings_replace_the_phrases_and_append_their_own_ends(
        editor, two_object_edit):
    """ORE: each phrase's tokens carry the phrase encoded alone, and that encoding's
    end-of-sequence and padding tokens follow the instruction, as many as it has."""
    _, instruction, phrases, _ = two_object_edit
    plain = restricted_embeddings(editor, instruction, phrases, 24, restrict=False)
    full = plain.embeds
    restricted = restricted_embeddings(editor, instruction, phrases, 24)
    assert plain.object_tails is None and plain.prompt_tail is None
    assert plain.phrase_tokens == restricted.phrase_tokens
    assert torch.equal(plain.pooled, restricted.pooled)
    ids = editor.tokenizer_2(instruction)["input_ids"]
    tail = list(range(len(ids) - 1, 24))
    assert restricted.prompt_tail == tail
    assert restricted.embeds.shape[1] == 24 + len(phrases) * len(tail)
    phrase_tokens = [t for tokens in restricted.phrase_tokens for t in tokens]
    others = [t for t in range(24) if t not in phrase_tokens]
    torch.testing.assert_close(restricted.embeds[:, others], full[:, others], rtol=0, atol=0)
    for i, (phrase, tokens) in enumerate(zip(phrases, restricted.phrase_tokens, strict=True)):
        alone = editor.encode_prompt(prompt=phrase, prompt_2=None, max_sequence_length=24)[0]
        torch.testing.assert_close(restricted.embeds[:, tokens], alone[:, :len(tokens)])
        assert not torch.allclose(restricted.embeds[:, tokens], full[:, tokens])
        own_tail = restricted.object_tails[i]
        assert own_tail == list(range(24 + i * len(tail), 24 + (i + 1) * len(tail)))
        torch.testing.assert_close(restricted.embeds[:, own_tail],
                                   alone[:, len(tokens):len(tokens) + len(tail)])
    with pytest.raises(ValueError, match="tokenizes differently"):
        restricted_embeddings(editor, "make the red circle green", ["red circ"], 24)


def test_with_every_part_off_the_edit_is_the_stock_pipelines(editor, two_object_edit):
    out, regions = _ale(editor, two_object_edit, OFF, num_inference_steps=20)
    pixels, instruction, _, _ = two_object_edit
    stock = stock_edit(editor, pixels, instruction, steps=20, seed=0)
    assert np.array_equal((out[0] * 255).round().astype(np.uint8), stock)
    assert regions.shape == (2, SIZE // 2, SIZE // 2)


def test_blending_keeps_the_source_latents_outside_the_regions(editor, two_object_edit):
    latents, regions = _ale(editor, two_object_edit, ALEConfig(), output_type="latent")
    pixels = torch.from_numpy(two_object_edit[0]).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        source = pack_latents(encode_image(editor.vae, pixels))
    outside = ~regions.any(0).flatten()
    assert 0 < outside.sum() < outside.numel()
    torch.testing.assert_close(latents[:, outside], source[:, outside], rtol=0, atol=0)
    assert not torch.allclose(latents[:, ~outside], source[:, ~outside])
    unblended, _ = _ale(editor, two_object_edit, ALEConfig(blend_background=False),
                        output_type="latent")
    assert not torch.allclose(unblended[:, outside], source[:, outside])


def test_blending_noises_the_source_to_each_steps_level(editor, two_object_edit):
    """Between steps the background is the photo's latents noised to the next step's level
    with the generation's own noise (the last step's sigma is 0, so the final latents alone
    cannot tell)."""
    seen = []
    hook = editor.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].clone()),
        with_kwargs=True)
    try:
        _, regions = _ale(editor, two_object_edit, ALEConfig(), output_type="latent")
    finally:
        hook.remove()
    pixels = torch.from_numpy(two_object_edit[0]).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        source = pack_latents(encode_image(editor.vae, pixels))
    outside = ~regions.any(0).flatten()
    tokens = outside.numel()
    noise = seen[0][:, :tokens]  # the first step's target tokens are the starting noise
    for step, latents in enumerate(seen[1:], start=1):
        sigma = float(editor.scheduler.sigmas[step])
        want = (1 - sigma) * source + sigma * noise
        torch.testing.assert_close(latents[:, :tokens][:, outside], want[:, outside],
                                   rtol=1e-5, atol=1e-5)


def test_edit_rejects_bad_inputs(editor, two_object_edit):
    pixels, instruction, phrases, object_masks = two_object_edit
    cases = [
        (dict(masks=object_masks[:1]), "2 phrases but 1 masks"),
        (dict(masks=[object_masks[0], object_masks[1][:16]]), r"is \(16, 32\), the image is"),
        (dict(masks=[object_masks[0], np.zeros_like(object_masks[1])]), "is empty"),
        (dict(phrases=["the green star", phrases[1]]), "not in the prompt"),
        (dict(call=dict(negative_prompt="blurry")), "no negative prompt"),
        (dict(call=dict(num_images_per_prompt=2)), "one image per call"),
        # the size comes from resolution= (a duplicate-keyword TypeError before)
        (dict(call=dict(height=SIZE)), "ALE: height cannot be passed: .* use resolution="),
        (dict(call=dict(width=SIZE, max_area=SIZE**2)), "ALE: width, max_area cannot be passed"),
        (dict(call=dict(latents=None)), "ALE: latents cannot be passed: ALE sets it itself"),
        # background blending is a step-end callback (a caller's one was silently dropped)
        (dict(call=dict(callback_on_step_end=lambda pipe, i, t, tensors: {})),
         "ALE: callback_on_step_end cannot be passed"),
        (dict(phrases=phrases * 3, masks=object_masks * 3), "1..4 objects"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            edit(editor, pixels, instruction, overrides.get("phrases", phrases),
                 overrides.get("masks", object_masks), resolution=SIZE,
                 max_sequence_length=24, **overrides.get("call", {}))
    with pytest.raises(ValueError, match="dilation"):
        ALEConfig(dilation=1.5)
    with pytest.raises(TypeError, match="expected a FluxKontextPipeline, got str"):
        edit("not a pipeline", pixels, instruction, phrases, object_masks)


def test_a_larger_photo_is_edited_at_the_working_resolution(editor, two_object_edit):
    pixels, instruction, phrases, object_masks = two_object_edit
    big = np.kron(pixels, np.ones((2, 3, 1), dtype=np.uint8))  # 64 x 96
    big_masks = [np.kron(m, np.ones((2, 3), dtype=bool)) for m in object_masks]
    out, regions = _ale(editor, (big, instruction, phrases, big_masks))
    assert out.shape == (1, 26, 40, 3)  # about 32² pixels at 2:3, multiples of 2
    assert regions.shape == (2, 13, 20)


def test_a_plain_edit_encodes_the_photo_at_the_working_size(tmp_path, monkeypatch,
                                                           two_object_edit):
    # without its auto-resize, FLUX.1 Kontext encodes the context at the image's own size
    from PIL import Image

    from ditflow import cli

    load, encoded = cli._pipeline, []

    def spied(*args, **kwargs):
        pipeline = load(*args, **kwargs)
        encode = pipeline.vae.encode

        def recording(pixels, *rest, **options):
            encoded.append(tuple(pixels.shape[-2:]))
            return encode(pixels, *rest, **options)

        monkeypatch.setattr(pipeline.vae, "encode", recording)
        return pipeline

    monkeypatch.setattr(cli, "_pipeline", spied)
    pixels, instruction, _, _ = two_object_edit
    Image.fromarray(np.kron(pixels, np.ones((2, 3, 1), dtype=np.uint8))).save(tmp_path / "p.png")
    out = tmp_path / "edited.png"
    assert cli.main(["edit", str(tmp_path / "p.png"), instruction, "--steps", "1",
                     "-o", str(out)]) == 0
    assert encoded == [(26, 40)]  # 64 x 96 at about 32², as ALE edits it
    assert Image.open(out).size == (40, 26)


def test_edit_command(tmp_path, capsys, two_object_edit):
    from PIL import Image

    from ditflow.cli import main

    pixels, instruction, phrases, object_masks = two_object_edit
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    base = ["edit", str(tmp_path / "photo.png"), instruction, "--steps", "3"]
    objects = []
    for i, (phrase, mask) in enumerate(zip(phrases, object_masks, strict=True)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"mask{i}.png")
        objects += ["--object", phrase, str(tmp_path / f"mask{i}.png")]
    out = tmp_path / "edited.png"
    assert main([*base, *objects, "-o", str(out)]) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    assert Image.open(tmp_path / "edited-regions.png").size == (SIZE, SIZE)
    assert repr(phrases[0]) in capsys.readouterr().out
    assert main([*base, "--object", "the green star", str(tmp_path / "mask0.png"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "'the green star' is not in the prompt" in capsys.readouterr().err
    assert main([*base, "--object", phrases[0], str(tmp_path / "missing.png"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "missing.png: cannot read the mask" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
