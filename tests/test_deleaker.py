"""DeLeaker: entity tokens, entity regions, and its attention edits against the paper's rule
computed densely."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import TRITON_DEVICE, HostReads, needs_triton_on_cpu

from ditflow import flow_attention, ops
from ditflow.functional import FlowAttentionOutput
from ditflow.layout import TokenLayout
from ditflow.methods.deleaker import (
    HEADS_AT_ONCE,
    DeLeaker,
    DeLeakerConfig,
    _head_mean_probs,
    entity_masks,
    generate,
)
from ditflow.methods.phrases import phrase_token_positions
from ditflow.session import BlockId, StepInfo, attach
from ditflow.testbed.models import build_text_encoders
from ditflow.tiny import tiny_flux_pipeline

PROMPT = "a red circle top left and a blue square bottom middle on sand"
EARLY = (StepInfo(3, 0.9), BlockId("double", 1, 1))  # call 3 * 4 + 1 = 13: statistics, no edits
LATE = (StepInfo(5, 0.5), BlockId("single", 1, 3))  # call 5 * 4 + 3 = 23 >= 18: edits


@pytest.fixture(scope="module")
def tokenizer():
    return build_text_encoders()[3]


def test_phrase_token_positions(tokenizer):
    assert phrase_token_positions(tokenizer, PROMPT, ["red circle", "blue square"], 24) == [
        [1, 2], [7, 8]]
    assert phrase_token_positions(tokenizer, PROMPT, ["square"], 24) == [[8]]


@pytest.mark.parametrize("entities, max_length, message", [
    (["green circle"], 24, "not in the prompt"),
    (["blue square"], 5, "beyond the first 5 tokens"),
    (["red circle", "circle"], 24, "shares tokens"),
])
def test_phrase_token_errors(tokenizer, entities, max_length, message):
    with pytest.raises(ValueError, match=message):
        phrase_token_positions(tokenizer, PROMPT, entities, max_length)


def test_phrases_are_a_sequence(tokenizer):
    """One phrase as a string was read as phrases of one character each (and refused for
    sharing tokens)."""
    with pytest.raises(TypeError, match=r"phrases='red circle': expected a sequence of "
                                        r"phrases, e.g. \['red circle'\]"):
        phrase_token_positions(tokenizer, PROMPT, "red circle", 24)


def test_config_names_the_bad_setting():
    with pytest.raises(ValueError, match="DeLeakerConfig: alpha=0: expected > 0"):
        DeLeakerConfig(alpha=0)
    with pytest.raises(ValueError, match="DeLeakerConfig: mask_steps=0: expected >= 1"):
        DeLeakerConfig(mask_steps=0)
    with pytest.raises(ValueError, match="DeLeakerConfig: record_from=-1: expected >= 0"):
        DeLeakerConfig(record_from=-1)


def test_phrase_tokens_need_offsets():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        phrase_token_positions(SlowTokenizer(), PROMPT, ["red circle"], 24)


def _blobs() -> torch.Tensor:
    """Two blobs three tokens or more from the border (closing twice grows a blob nearer than
    that into the border, where erosion removes nothing)."""
    truth = torch.zeros(2, 14, 16, dtype=torch.bool)
    truth[0, 3:7, 3:7] = True
    truth[1, 7:11, 8:13] = True
    return truth


def test_entity_masks_find_blobs_drop_specks_and_are_disjoint():
    truth = _blobs()
    scores = torch.rand(2, 14, 16) * 0.1 + truth * 1.0
    scores[0, 10, 4] = 5.0  # a one-token speck: removed by the opening
    assert torch.equal(entity_masks(scores, 1.0), truth)
    # entity 1 also claims entity 0's blob, less strongly: the blob stays entity 0's
    scores[1] += truth[0] * 0.6
    masks = entity_masks(scores, 0.5)
    assert torch.equal(masks[0], truth[0]) and not (masks[0] & masks[1]).any()
    assert torch.equal(masks[1], truth[1])


def _leaker(**config) -> DeLeaker:
    return DeLeaker([[1, 2], [4]], (4, 5), blocks_per_step=4, config=DeLeakerConfig(**config))


@pytest.mark.parametrize("switch", ["suppress_text", "reinforce_text", "suppress_image"])
def test_each_ablation_switch_turns_its_own_edit_off(switch):
    leaker = _leaker(**{switch: False})
    leaker.masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    leaker.masks[0, :2, :3] = True
    leaker.masks[1, 2:, 1:] = True
    layout = leaker.layout(*LATE, TokenLayout.from_segments(6, 20))
    rules = leaker.rules(*LATE, layout)
    image0, text0, text1 = (layout.group(name) for name in
                            ("entity0.image", "entity0.text", "entity1.text"))
    q = k = torch.randn(1, 26, 3, 8)
    cut = leaker.pair_mask(*LATE, layout, q, k)
    edits = {"suppress_text": rules.bias is not None
             and bool(torch.isinf(rules.bias[0, image0, text1])),
             "reinforce_text": rules.scale is not None and float(rules.scale[0, image0, text0]) > 1,
             "suppress_image": cut is not None and bool(cut.any())}
    assert edits == {name: name != switch for name in edits}


def test_regions_come_from_the_recorded_attention_mass():
    """observe() averages image-to-entity-text mass over blocks; the first edited block turns
    it into regions and entity groups."""
    leaker = DeLeaker([[1, 2], [4]], (14, 16), blocks_per_step=4,
                      config=DeLeakerConfig(open_iterations=0, close_iterations=0))
    base = TokenLayout.from_segments(6, 224)
    early = leaker.layout(*EARLY, base)
    assert early.names[3:] == ("entity0.text", "entity1.text") and leaker.rules(*EARLY, early) \
        is None and leaker.wants_mass(*EARLY)
    truth = _blobs()
    mass = torch.rand(1, 2, 230, early.num_groups) * 0.05
    for e, group in enumerate((3, 4)):
        mass[0, :, 6:, group] += truth[e].flatten() * (2.0 if e == 0 else 1.0)
    leaker.observe(*EARLY, early, FlowAttentionOutput(None, None, mass))
    late = leaker.layout(*LATE, base)
    assert torch.equal(leaker.masks, truth)
    for e in range(2):
        assert torch.equal(late.mask(f"entity{e}.image")[6:], truth[e].flatten())
    with pytest.raises(ValueError, match="one image per transformer call"):
        leaker.observe(*EARLY, early, FlowAttentionOutput(None, None, mass.expand(2, -1, -1, -1)))


def test_statistics_start_at_block_call_12_and_end_with_the_mask_steps():
    leaker = _leaker()  # 4 blocks per step
    assert not leaker.wants_mass(StepInfo(2, 0.9), BlockId("double", 3, 3))  # call 11
    assert leaker.wants_mass(StepInfo(3, 0.9), BlockId("double", 0, 0))  # call 12
    assert leaker.wants_mass(StepInfo(11, 0.5), BlockId("double", 0, 0))
    assert not leaker.wants_mass(StepInfo(12, 0.4), BlockId("double", 0, 0))


@pytest.mark.parametrize("entities", [1, 2, 3])
def test_self_reinforcement_compounds_once_per_pair_as_the_authors_loop_does(entities):
    """alpha ** (E - 1): the authors multiply once per pair an entity is in (one entity, no
    pair: no edit)."""
    leaker = DeLeaker([[1], [2], [3]][:entities], (4, 5), blocks_per_step=4)
    leaker.masks = torch.zeros(entities, 4, 5, dtype=torch.bool)
    for e in range(entities):
        leaker.masks[e, e] = True
    layout = leaker.layout(*LATE, TokenLayout.from_segments(6, 20))
    scale = leaker.rules(*LATE, layout).scale
    image, text = layout.group("entity0.image"), layout.group("entity0.text")
    factor = 1.0 if scale is None else scale[0, image, text].item()
    assert factor == pytest.approx(1.2 ** (entities - 1))


def test_a_recording_window_past_the_mask_steps_is_refused():
    with pytest.raises(ValueError, match="record_from=48 is past the mask steps' last block"):
        DeLeaker([[1]], (4, 5), blocks_per_step=4,
                 config=DeLeakerConfig(mask_steps=12, record_from=48))


def test_token_grid_must_match_the_call():
    with pytest.raises(ValueError, match="token grid is 4x5"):
        _leaker().layout(*EARLY, TokenLayout.from_segments(6, 21))


def _papers_rule(q, k, v, text, regions, alpha, pair_threshold):
    """The DeLeaker edit of one attention call, densely: image tokens of entity i get -inf on
    entity j's text, logits x alpha on their own text, and -inf on entity j's image tokens where
    the head-mean probability of the unedited attention exceeds mean + t * std over the pair
    region; then the softmax."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    plain = logits.softmax(-1).mean(1)[0]
    edited = logits.clone()
    for i, rows in enumerate(regions):
        for j, cols in enumerate(regions):
            r, c = rows[:, None], cols[None, :]
            if i == j:
                edited[:, :, r, text[i][None, :]] *= alpha
                continue
            edited[:, :, r, text[j][None, :]] = float("-inf")
            pair = plain[r, c]
            cut = pair > pair.mean() + pair_threshold * pair.std()
            edited[:, :, r, c] = edited[:, :, r, c].masked_fill(cut, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", edited.softmax(-1), v)


@pytest.mark.parametrize("backend, dtype, tol", [
    ("reference", torch.float64, 1e-9),
    pytest.param("triton", torch.float32, 2e-5, marks=needs_triton_on_cpu),
    pytest.param("cpp", torch.float32, 2e-5, marks=pytest.mark.skipif(
        not ops.cpp_available(), reason="C++ extension not built")),
])
def test_edits_equal_the_papers_rule_computed_densely(backend, dtype, tol):
    torch.manual_seed(0)
    leaker = _leaker()
    leaker.masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    leaker.masks[0, :2, :3] = True
    leaker.masks[1, 2:, 1:] = True
    base = TokenLayout.from_segments(6, 20)
    q, k, v = (torch.randn(1, 26, 3, 8, dtype=torch.float64) * 2 for _ in range(3))
    layout = leaker.layout(*LATE, base)
    low = [t.to(dtype) for t in (q, k, v)]
    result = flow_attention(*low, layout.groups(), rules=leaker.rules(*LATE, layout),
                            pair_mask=leaker.pair_mask(*LATE, layout, *low[:2]), backend=backend)
    regions = [6 + m.flatten().nonzero().squeeze(1) for m in leaker.masks]
    alpha = torch.tensor(1.2).item()  # the rule tables hold fp32
    expected = _papers_rule(q, k, v, [torch.tensor([1, 2]), torch.tensor([4])], regions, alpha,
                            1.0)
    torch.testing.assert_close(result.out.double(), expected, rtol=tol, atol=tol)
    # before start_block nothing is edited
    early = leaker.layout(*EARLY, base)
    assert leaker.rules(*EARLY, early) is None
    assert leaker.pair_mask(*EARLY, early, q, k) is None


def _editing_leaker() -> tuple[DeLeaker, TokenLayout]:
    """A DeLeaker in its mask steps with two current regions on a 4 x 5 grid (no rebuild), and
    the layout of a late block call (6 text tokens)."""
    leaker = _leaker()
    leaker.masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    leaker.masks[0, :2, :3] = True
    leaker.masks[1, 2:, 1:] = True
    leaker._masks_from = leaker._score_count = 1
    leaker._score_sum = torch.zeros(2, 4, 5)
    return leaker, leaker.layout(*LATE, TokenLayout.from_segments(6, 20))


def test_regions_are_scored_on_the_unedited_attention_once_edits_start():
    """In the mask steps after block call 18 the region tokens' attention is edited; their
    scores still come from the plain softmax (as the authors record it before their edits),
    so the edits never feed back into the regions."""
    torch.manual_seed(0)
    leaker, layout = _editing_leaker()
    assert leaker.wants_mass(*LATE) and leaker.rules(*LATE, layout) is not None
    q, k, v = (torch.randn(1, 26, 3, 8, dtype=torch.float64) * 2 for _ in range(3))
    result = flow_attention(q, k, v, layout.groups(), rules=leaker.rules(*LATE, layout),
                            pair_mask=leaker.pair_mask(*LATE, layout, q, k), return_mass=True,
                            backend="reference")
    leaker.observe(*LATE, layout, result)
    plain = (torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5).softmax(-1).mean(1)[0, 6:]
    expected = torch.stack([plain[:, [1, 2]].mean(-1), plain[:, [4]].mean(-1)])
    torch.testing.assert_close(leaker._score_sum.double(), expected.reshape(2, 4, 5),
                               rtol=1e-5, atol=1e-6)


def test_cuts_and_scores_read_nothing_back_from_the_device():
    """Once the regions are planned, a block's cuts, unedited scores and statistics ask the
    device for nothing on the host (on a GPU each such read waits for every queued kernel)."""
    torch.manual_seed(0)
    leaker, layout = _editing_leaker()
    q, k, v = (torch.randn(1, 26, 3, 8) for _ in range(3))
    reads = HostReads()
    for mode in (torch.no_grad(), reads):  # the first block copies token positions once
        with mode:
            mask = leaker.pair_mask(*LATE, layout, q, k)
        result = flow_attention(q, k, v, layout.groups(), rules=leaker.rules(*LATE, layout),
                                pair_mask=mask, return_mass=True, backend="reference")
        with mode:
            leaker.observe(*LATE, layout, result)
    assert mask.any() and reads.ops == []


def _exact_head_mean_probs(q, k):
    scale = q.shape[-1] ** -0.5
    return torch.einsum("ihd,jhd->hij", q.double(), k.double()).mul(scale).softmax(-1).mean(0)


@pytest.mark.parametrize("heads", [1, HEADS_AT_ONCE, 2 * HEADS_AT_ONCE + 3])
def test_head_mean_probabilities_batch_heads_without_changing_them(heads, monkeypatch):
    monkeypatch.setenv("DITFLOW_BACKEND", "reference")
    q, k = torch.randn(7, heads, 16), torch.randn(11, heads, 16)
    columns = torch.tensor([3, 0, 10, 3])
    torch.testing.assert_close(_head_mean_probs(q, k, columns).double(),
                               _exact_head_mean_probs(q, k)[:, columns])


KERNEL_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if TRITON_DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(("nq", "nk", "heads", "head_dim"),
                         [(1, 1, 1, 8), (7, 11, 3, 16), (70, 130, 5, 8), (65, 64, 24, 128)])
def test_head_mean_probability_kernels_give_the_exact_means(monkeypatch, dtype, nq, nk, heads,
                                                            head_dim):
    """The two kernels against float64 over the same (rounded) inputs: queries and keys of
    every tile position, odd sizes, one head and FLUX's 24 x 128; strided query rows, as
    DeLeaker gathers them; every key, then some keys (normalised over all), then none."""
    monkeypatch.setenv("DITFLOW_BACKEND", "triton")
    q = torch.randn(nq, heads, 2 * head_dim, device=TRITON_DEVICE).to(dtype)[..., ::2]
    k = torch.randn(nk, heads, head_dim, device=TRITON_DEVICE).to(dtype)
    exact = _exact_head_mean_probs(q, k)
    some = torch.randperm(nk, device=TRITON_DEVICE)[: (nk + 1) // 2].repeat(2)
    for columns in (torch.arange(nk, device=TRITON_DEVICE), some, some[:0]):
        got = _head_mean_probs(q, k, columns)
        assert got.dtype == torch.float32 and got.shape == (nq, len(columns))
        torch.testing.assert_close(got.double(), exact[:, columns], rtol=2e-5, atol=1e-7)


def test_the_grid_border_erodes_nothing():
    """OpenCV's opening (the authors'): a region along the border survives it."""
    scores = torch.zeros(1, 10, 12)
    scores[0, :2, 3:9] = 1.0  # a two-token strip along the top edge
    assert torch.equal(entity_masks(scores, 1.0)[0], scores[0] > 0)


def test_generation_on_a_tiny_pipeline():
    """A FluxPipeline call with DeLeaker gives an image and regions; with edits never reached,
    the image is the stock pipeline's and the processors are restored."""
    pipe = tiny_flux_pipeline("t2i")
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle and a blue square"
    call = dict(height=12, width=8, num_inference_steps=3, max_sequence_length=16,
                guidance_scale=1.0, output_type="pt")
    stock = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
    processors = [b.attn.processor for b in pipe.transformer.transformer_blocks]
    unedited, _ = generate(pipe, prompt, ["red circle", "blue square"],
                           config=DeLeakerConfig(start_block=10**6),
                           generator=torch.Generator().manual_seed(0), **call)
    torch.testing.assert_close(unedited, stock, rtol=1e-5, atol=1e-5)
    assert [b.attn.processor for b in pipe.transformer.transformer_blocks] == processors
    edited, masks = generate(pipe, prompt, ["red circle", "blue square"],
                             config=DeLeakerConfig(start_block=2, mask_steps=2, record_from=0),
                             generator=torch.Generator().manual_seed(0), **call)
    assert edited.shape == stock.shape and torch.isfinite(edited).all()
    assert masks.shape == (2, 6, 4) and masks.dtype == torch.bool
    # one instance, two generations: the second starts afresh and repeats the first
    leaker = DeLeaker.for_pipeline(pipe, prompt, ["red circle", "blue square"], 12, 8, 16,
                                   DeLeakerConfig(start_block=2, mask_steps=2, record_from=0))
    with attach(pipe, leaker):
        first = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
    with attach(pipe, leaker):
        second = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(first, edited, rtol=0, atol=0)
    torch.testing.assert_close(second, edited, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(pipe, prompt, ["red circle"], height=13, width=8)
    pipe.vae = None  # a pipeline for latents only: FLUX's 16-pixel tokens, as diffusers assumes
    assert DeLeaker.for_pipeline(pipe, prompt, ["red circle", "blue square"], 64, 32,
                                 16).token_grid == (4, 2)
    with pytest.raises(ValueError, match="no negative prompt"):
        generate(pipe, prompt, ["red circle"], height=12, width=8, negative_prompt="blurry")
    with pytest.raises(ValueError, match="one image per call"):
        generate(pipe, prompt, ["red circle"], height=12, width=8, num_images_per_prompt=2)


def test_generate_command(tmp_path, capsys):
    from ditflow.cli import main

    out = tmp_path / "cow.png"
    prompt = "a red circle and a blue square"
    assert main(["generate", prompt, "--entity", "red circle", "--entity", "blue square",
                 "--model", "tiny", "--size", "16", "--steps", "6", "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (16, 16)
    assert Image.open(tmp_path / "cow-regions.png").size == (16, 16)
    assert "'red circle'" in capsys.readouterr().out
    assert main(["generate", prompt, "--entity", "green", "--model", "tiny", "--size", "16",
                 "--steps", "1", "-o", str(tmp_path / "x.png")]) == 2
    assert "'green' is not in the prompt" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", prompt, "--entity", "red circle", "--model", "tiny", "--size",
                 "16", "--steps", "2", "-o", str(tmp_path / "short.png")]) == 0
    assert "DeLeaker made no edits" in capsys.readouterr().err
    assert main(["generate", prompt, "--entity", "red circle", "--model", "tiny", "--size",
                 "16", "--steps", "6", "--mask-threshold", "100", "-o",
                 str(tmp_path / "none.png")]) == 0
    assert "no image region for 'red circle'" in capsys.readouterr().err
