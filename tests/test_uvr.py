"""UVR: scores, localisation, the generation output edit and the editing weights against the
rules computed densely, anchors, and generation / editing end to end on the testbed models."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")

from helpers import TRITON_ON_CPU

from ditflow import flow_attention, ops
from ditflow.layout import TokenLayout
from ditflow.methods.uvr import (
    UVR,
    UVRConfig,
    collect_anchors,
    edit,
    ellipse,
    generate,
    load_anchors,
    localize,
    save_anchors,
    token_scores,
)
from ditflow.session import BlockId, StepInfo
from ditflow.testbed import evaluate
from ditflow.testbed.models import TEXT_TOKENS
from ditflow.testbed.scenes import SIZE, palette_mask, render
from ditflow.tiny import tiny_flux_pipeline

CONFIG = UVRConfig(block="single.1")
START_UP = StepInfo(1, 0.95)
LATER = StepInfo(9, 0.5)
BLOCK = BlockId("double", 0, 0)


def test_anchors_of_another_model_are_refused_by_shape():
    with pytest.raises(ValueError, match=r"anchors are 4 heads x 16 dims, this block's "
                                         r"attention 2 x 16: collect anchors with this model"):
        token_scores(torch.randn(6, 2, 16), torch.randn(3, 4, 16))


def test_config_names_the_bad_setting():
    # start_up is t / 1000: the paper's "t >= 850" as 850 never reached the start-up stage
    with pytest.raises(ValueError, match=r"UVRConfig: start_up=850: expected the model's "
                                         r"timestep t / 1000, in \[0, 1\]"):
        UVRConfig(start_up=850)
    with pytest.raises(ValueError, match="UVRConfig: keep_share=0: expected 0 < keep_share"):
        UVRConfig(keep_share=0)
    with pytest.raises(ValueError, match="UVRConfig: ring_radius=-1: expected >= 0"):
        UVRConfig(ring_radius=-1)
    with pytest.raises(ValueError, match="UVRConfig: block='single10'"):
        UVRConfig(block="single10")


def test_token_scores_are_relative_to_the_anchors_and_centred():
    anchor = torch.randn(2, 8)
    outputs = torch.stack([anchor, -anchor, torch.zeros(2, 8)]) + torch.randn(2, 8)  # + common
    scores = token_scores(outputs, torch.stack([anchor, anchor]))
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.0, 0.0]), rtol=1e-5, atol=1e-5)


def test_elliptic_windows_are_opencvs():
    assert ellipse(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert ellipse(3).astype(int).tolist() == [
        [0, 0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0, 0]]


def test_localize_cleans_the_mask_and_keeps_the_regions_holding_the_softmax_mass():
    """The authors' clean-up: gate, close, fill holes, drop small regions, then keep regions by
    their share of the softmax of the gated scores."""
    scores = torch.zeros(12, 12)
    scores[2:7, 2:7] = 1.0  # region A: 24 gated tokens, most of the softmax mass
    scores[4, 4] = 0.1  # a hole in A: filled
    scores[8:10, 8:11] = 1.2  # region B: 6 tokens, less mass than A
    scores[10, 1] = 3.0  # a one-token speck: under the least area
    a = torch.zeros(12, 12, dtype=torch.bool)
    a[2:7, 2:7] = True
    b = scores == 1.2
    assert torch.equal(localize(scores, 0.6, 5, keep_share=0.3), a)
    assert torch.equal(localize(scores, 0.6, 5, keep_share=1.0), a | b)
    assert torch.equal(localize(scores, 0.6, 5, keep_regions=3), a | b)
    assert torch.equal(localize(scores, 0.6, 5, keep_regions=1), a)
    assert torch.equal(localize(scores, 0.6, 7, keep_regions=3), a)  # B is under 7 tokens
    assert torch.equal(localize(scores, 0.6, 1, keep_regions=3)[10, 1], torch.tensor(True))
    assert not localize(scores, 5.0, 1, keep_regions=3).any()
    edge = torch.zeros(8, 8)
    edge[0, 2:6] = 1.0  # a strip along the border: closing keeps it as it is
    assert torch.equal(localize(edge, 0.6, 1), edge > 0)


def _uvr(mode: str, grid=(3, 4), **config) -> UVR:
    return UVR(torch.randn(2, 2, 8), grid, mode, UVRConfig(block="double.0", **config))


def test_generation_replaces_flagged_rows_with_noise_in_the_start_up_stage():
    uvr = _uvr("generate")
    layout = TokenLayout.from_segments(5, 12)
    assert uvr.layout(START_UP, BLOCK, layout) is layout and uvr.rules(START_UP, BLOCK,
                                                                        layout) is None
    assert uvr.edits_output(START_UP, BLOCK)  # the localisation block (double.0 here)
    assert not uvr.edits_output(START_UP, BlockId("double", 1, 1))  # nothing flagged yet
    uvr.flagged = torch.zeros(3, 4, dtype=torch.bool)
    uvr.flagged[0, 1] = uvr.flagged[2, 3] = True
    assert uvr.edits_output(START_UP, BlockId("double", 1, 1))
    assert not uvr.edits_output(LATER, BLOCK)
    out = torch.randn(1, 17, 2, 8)
    edited = uvr.edit_output(START_UP, BLOCK, layout, out)
    noise = torch.randn(1, 2, 2, 8, generator=torch.Generator().manual_seed(0))
    expected = out.clone()
    for i, token in enumerate((1, 11)):  # every flagged row replaced whole (the authors')
        expected[:, 5 + token] = 0.001 * out[:, 5 + token] + 0.999 * noise[:, i]
    torch.testing.assert_close(edited, expected)


def test_editing_weights_equal_the_rule_computed_densely():
    """Text and target queries: probabilities on flagged context tokens x0.2, on the ring
    x0.4; target queries on text and target keys x1.05; no renormalisation."""
    uvr = _uvr("edit", grid=(3, 4), ring_radius=1, ring_dilations=1)
    base = TokenLayout.from_segments(5, 12, 12)
    assert uvr.rules(START_UP, BLOCK, uvr.layout(START_UP, BLOCK, base)) is None  # no mask yet
    uvr.mask = torch.zeros(3, 4, dtype=torch.bool)
    uvr.mask[0, 0] = True
    layout = uvr.layout(START_UP, BLOCK, base)
    rules = uvr.rules(START_UP, BLOCK, layout)
    assert layout.names[3:] == ("uvr.core", "uvr.ring") and rules is not None
    assert uvr.layout(LATER, BLOCK, base) is base and uvr.rules(LATER, BLOCK, base) is None
    q, k, v = (torch.randn(1, 29, 2, 8, dtype=torch.float64) * 2 for _ in range(3))
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5).softmax(-1)
    core, ring = [17], [18, 21]  # context token (0, 0) and its neighbours in a 3x3 cross
    fp32 = [torch.tensor(x).item() for x in (0.2, 0.4, 1.05)]  # the rule tables hold fp32
    probs[:, :, :17, core] *= fp32[0]
    probs[:, :, :17, ring] *= fp32[1]
    probs[:, :, 5:17, :17] *= fp32[2]
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    backends = [("reference", torch.float64, 1e-9)]
    if TRITON_ON_CPU:
        backends.append(("triton", torch.float32, 2e-5))
    if ops.cpp_available():
        backends.append(("cpp", torch.float32, 2e-5))
    for backend, dtype, tol in backends:
        low = [t.to(dtype) for t in (q, k, v)]
        out = flow_attention(*low, layout.groups(), rules=rules, backend=backend).out
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="grid is 3x4"):
        uvr.layout(START_UP, BLOCK, TokenLayout.from_segments(5, 12, 20))


def test_the_editing_ring_is_the_authors_two_7x7_elliptic_dilations():
    uvr = _uvr("edit", grid=(20, 20))
    uvr.mask = torch.zeros(20, 20, dtype=torch.bool)
    uvr.mask[10, 10] = True
    layout = uvr.layout(START_UP, BLOCK, TokenLayout.from_segments(5, 400, 400))
    ring = layout.mask("uvr.ring")[405:].reshape(20, 20)
    widths = ring.sum(1)[4:17].tolist()
    widths[6] += 1  # the core's row
    assert widths == [1, 5, 9, 11, 13, 13, 13, 13, 13, 11, 9, 5, 1] and ring.sum() == 116


@pytest.fixture
def t2i(testbed_t2i):
    return testbed_t2i


@pytest.fixture
def editor(testbed_editor):
    return testbed_editor


def _purple(image: np.ndarray) -> np.ndarray:
    return palette_mask(image, "purple")


def _options(seed: int = 0) -> dict:
    return dict(num_inference_steps=8, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(seed))


def test_generation_on_the_testbed(t2i, editor, tmp_path):
    rng = random.Random(3)
    scenes = evaluate._scenes_with(rng, "purple", True, 6)
    anchors = collect_anchors(t2i, [s.caption() for s in scenes[:4]], height=SIZE, width=SIZE,
                              select=_purple, config=CONFIG, max_sequence_length=TEXT_TOKENS,
                              **_options())
    assert anchors.shape[1:] == (4, 16) and 1 <= len(anchors) <= 4
    save_anchors(tmp_path / "purple.safetensors", anchors, "purple", CONFIG.block, "generate")
    loaded, metadata = load_anchors(tmp_path / "purple.safetensors")
    assert torch.equal(loaded, anchors) and metadata == dict(
        concept="purple", block="single.1", mode="generate")
    caption = scenes[5].caption()  # "a purple circle top left and a red circle ..."
    stock = t2i(prompt=caption, height=SIZE, width=SIZE, max_sequence_length=TEXT_TOKENS,
                **_options()).images
    unflagged, mask = generate(t2i, caption, anchors, height=SIZE, width=SIZE,
                               config=UVRConfig(block="single.1", threshold=1e9),
                               max_sequence_length=TEXT_TOKENS, **_options())
    assert mask is None and np.allclose(unflagged, stock, atol=1e-5)  # kernel vs SDPA
    out, mask = generate(t2i, caption, anchors, height=SIZE, width=SIZE, config=CONFIG,
                         max_sequence_length=TEXT_TOKENS, **_options())
    assert mask is not None and mask.shape == (16, 16) and not np.allclose(out, stock)
    with pytest.raises(ValueError, match="anchors are for mode 'generate'"):
        edit(editor, render(scenes[0]), "make it red", anchors,
             resolution=SIZE, config=CONFIG, anchor_metadata=metadata)
    with pytest.raises(ValueError, match="anchors are for block 'elsewhere'"):
        generate(t2i, caption, anchors, height=SIZE, width=SIZE, config=CONFIG,
                 anchor_metadata={**metadata, "block": "elsewhere"})
    with pytest.raises(ValueError,
                       match=r"UVRConfig.block: \['single.99'\] not in this model \(6 blocks"):
        generate(t2i, caption, anchors, height=SIZE, width=SIZE,
                 config=UVRConfig(block="single.99"))
    with pytest.raises(ValueError, match="no negative prompt"):
        generate(t2i, caption, anchors, height=SIZE, width=SIZE, negative_prompt="x")
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(t2i, caption, anchors, height=SIZE + 1, width=SIZE)
    with pytest.raises(TypeError, match="FluxKontextPipeline or Step1XEditPipeline"):
        edit(t2i, render(scenes[0]), caption, anchors)


def test_edit_refuses_the_size_in_the_call_arguments(editor):
    """uvr.edit sets the call's size from resolution= (and the editor's _auto_resize): naming
    either again is refused with what to do, not a duplicate-keyword TypeError."""
    photo, anchors = np.zeros((SIZE, SIZE, 3), np.uint8), torch.randn(1, 4, 16)
    for size in (dict(height=SIZE), dict(width=SIZE), dict(max_area=SIZE * SIZE)):
        with pytest.raises(ValueError, match=f"UVR: {next(iter(size))} cannot be passed: the "
                                             "working size .* use resolution="):
            edit(editor, photo, "make it red", anchors, resolution=SIZE, config=CONFIG, **size)
    with pytest.raises(ValueError, match="UVR: _auto_resize cannot be passed: UVR sets it"):
        edit(editor, photo, "make it red", anchors, resolution=SIZE, config=CONFIG,
             _auto_resize=True)


def test_anchor_collection_refuses_what_it_sets_itself(editor):
    photo = np.zeros((SIZE, SIZE, 3), np.uint8)
    for name, value in (("max_area", SIZE * SIZE), ("_auto_resize", True)):
        with pytest.raises(ValueError, match=f"UVR collect_anchors: {name} cannot be passed"):
            collect_anchors(editor, ["make it red"], images=[photo], height=SIZE, width=SIZE,
                            select=lambda image: image[..., 0] > 0, **{name: value})
    # one prompt as a string was a prompt per character
    with pytest.raises(TypeError, match="prompts='make it red': expected a sequence of prompts"):
        collect_anchors(editor, "make it red", images=[photo], height=SIZE, width=SIZE,
                        select=lambda image: image[..., 0] > 0)


def test_anchor_collection_refuses_a_block_the_model_lacks_before_it_runs(editor):
    """A wrong UVRConfig.block is named before any edit runs (it ran every prompt's edit, then
    blamed the start-up stage)."""
    photo = np.zeros((SIZE, SIZE, 3), np.uint8)
    calls = []
    hook = editor.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError,
                           match=r"UVRConfig.block: \['single.99'\] not in this model"):
            collect_anchors(editor, ["make it red"], images=[photo], height=SIZE, width=SIZE,
                            select=lambda image: image[..., 0] > 0,
                            config=UVRConfig(block="single.99"), max_sequence_length=24,
                            **_options())
    finally:
        hook.remove()
    assert not calls


def test_editing_on_the_testbed(editor):
    rng = random.Random(4)
    edits = evaluate._edits_with(rng, "purple", True, 5)
    anchors = collect_anchors(editor, [e.instruction for e in edits[:4]], height=SIZE,
                              width=SIZE, images=[render(e.context) for e in edits[:4]],
                              select=_purple, config=CONFIG, max_sequence_length=24,
                              **_options())
    e = edits[4]  # "add a red circle top middle" to a scene with a purple object
    stock = evaluate.edit(editor, render(e.context), e.instruction, steps=8, seed=0)
    unflagged, mask = edit(editor, render(e.context), e.instruction, anchors, resolution=SIZE,
                           config=UVRConfig(block="single.1", threshold=1e9),
                           max_sequence_length=24, **_options())
    assert mask is None and np.array_equal((unflagged[0] * 255).round().astype(np.uint8), stock)
    out, mask = edit(editor, render(e.context), e.instruction, anchors, resolution=SIZE,
                     config=CONFIG, max_sequence_length=24, **_options())
    truth = torch.from_numpy(_purple(render(e.context))).float()
    on_tokens = truth.reshape(16, 2, 16, 2).mean((1, 3)) >= 0.5
    # flagged: mostly the purple object, a good part of it (8 of its 20 tokens)
    assert mask is not None and (mask & on_tokens).sum() >= max(0.3 * on_tokens.sum(),
                                                                0.8 * mask.sum())
    assert not np.array_equal((out[0] * 255).round().astype(np.uint8), stock)
    with pytest.raises(ValueError, match="select marked no tokens"):
        collect_anchors(editor, [edits[0].instruction], height=SIZE, width=SIZE,
                        images=[render(edits[0].context)], select=lambda im: im[..., 0] < 0,
                        config=CONFIG, max_sequence_length=24, **_options())


def test_uvr_commands(tmp_path, capsys):
    from PIL import Image

    from ditflow.cli import main

    anchors = torch.randn(3, 2, 16)
    save_anchors(tmp_path / "a.safetensors", anchors, "purple", "single.0", "generate")
    out = tmp_path / "gen.png"
    assert main(["generate", "a red circle", "--model", "tiny", "--size", "16", "--steps", "2",
                 "--uvr", str(tmp_path / "a.safetensors"), "--uvr-threshold", "-100",
                 "-o", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert Image.open(tmp_path / "gen-regions.png").size == (16, 16)
    assert "flagged regions" in capsys.readouterr().out
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert main(["edit", str(tmp_path / "photo.png"), "make it red", "--model", "tiny",
                 "--steps", "2", "--uvr", str(tmp_path / "a.safetensors"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "anchors are for mode 'generate'" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert main(["generate", "a red circle", "--model", "tiny", "--size", "16", "--uvr",
                 str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a ditflow anchors file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--uvr", str(tmp_path / "a.safetensors"),
              "--entity", "red circle", "-o", str(tmp_path / "x.png")])
    assert "--uvr and --entity are separate methods" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # a block the model lacks, named for what set it: the anchors, or --uvr-block
    save_anchors(tmp_path / "far.safetensors", anchors, "purple", "single.9", "generate")
    common = ["generate", "a red circle", "--model", "tiny", "--size", "16", "--steps", "1",
              "-o", str(tmp_path / "x.png")]
    assert main([*common, "--uvr", str(tmp_path / "far.safetensors")]) == 2
    assert (f"error: the block of --uvr {tmp_path / 'far.safetensors'}'s anchors: ['single.9'] "
            "not in this model") in capsys.readouterr().err
    assert main([*common, "--uvr", str(tmp_path / "far.safetensors"), "--uvr-block",
                 "single.9"]) == 2
    assert "error: --uvr-block: ['single.9'] not in this model" in capsys.readouterr().err


def test_editing_with_step1x_edit():
    """Step1X-Edit batches the prompt with its negative prompt: anchors and localisation use
    the prompt's outputs, the weights act on both; nothing flagged leaves the edit as it is."""
    from ditflow.tiny import tiny_step1x_edit_pipeline

    pipe = tiny_step1x_edit_pipeline()
    photos = [np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
              for i in range(3)]

    def left_half(image):
        return np.arange(image.shape[1])[None, :].repeat(image.shape[0], 0) < image.shape[1] // 2

    options = dict(num_inference_steps=6)  # the first two in the start-up stage
    config = UVRConfig(block="double.0")
    anchors = collect_anchors(pipe, ["add a hat", "make it red"], height=16, width=16,
                              images=photos[:2], select=left_half, config=config, **options)
    assert anchors.shape == (2, 2, 16)
    stock = pipe(image=_pil(photos[2]), prompt="add a hat", height=16, width=16,
                 output_type="pt", generator=torch.Generator().manual_seed(0),
                 **options).images
    unflagged, mask = edit(pipe, photos[2], "add a hat", anchors, resolution=16,
                           config=UVRConfig(block="double.0", threshold=1e9), output_type="pt",
                           generator=torch.Generator().manual_seed(0), **options)
    assert mask is None and torch.allclose(unflagged, stock, atol=1e-5)
    out, mask = edit(pipe, photos[2], "add a hat", anchors, resolution=16,
                     config=UVRConfig(block="double.0", threshold=-1e9), output_type="pt",
                     generator=torch.Generator().manual_seed(0), **options)
    assert mask is not None and mask.shape == (8, 8) and mask.all()
    assert not torch.allclose(out, stock, atol=1e-3)
    # its negative prompt is always batched in, so naming one is fine (FLUX.1 Kontext refuses)
    edit(pipe, photos[2], "add a hat", anchors, resolution=16, negative_prompt="blurry",
         config=UVRConfig(block="double.0"), **options)


def _pil(pixels):
    from PIL import Image

    return Image.fromarray(pixels)


def test_anchors_from_an_editor_whose_transformer_is_compiled():
    """torch.compile wraps the transformer; attach and the edit-call builder see through it."""
    pipe = tiny_flux_pipeline("kontext")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    photo = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    anchors = collect_anchors(pipe, ["make it red"], images=[photo], height=32, width=32,
                              select=lambda image: np.arange(32)[:, None].repeat(32, 1) < 16,
                              config=UVRConfig(block="single.0", start_up=0.0),
                              num_inference_steps=1, max_sequence_length=8)
    assert anchors.shape[0] == 1

