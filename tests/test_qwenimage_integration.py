"""Qwen-Image / Qwen-Image-Edit integration on a tiny random model built in code (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers.models.transformers.transformer_qwenimage as qwen_module
from helpers import (
    TRITON_DEVICE,
    assert_checkpointing_keeps_the_gradient,
    assert_compiled_matches_eager,
    assert_early_stop_saves_blocks,
    assert_rules_and_pair_masks_reach_the_attention,
    assert_statistics_only_is_stock,
    assert_triton_matches_reference,
    eager_r_ctx,
    edit_rules,
    rules_everywhere,
)

from ditflow import FlowRules, ops
from ditflow.layout import CONTEXT, TARGET, TEXT, TokenLayout
from ditflow.models.qwenimage import image_token_counts, padded_key_groups
from ditflow.session import Intervention, StatsRecorder, attach
from ditflow.tiny import qwen_inputs, tiny_qwen_transformer

# (height, width, context sizes, batch, padding): T2I without and with text padding, an edit with
# a context of its own size, two contexts, a batch whose elements pad their text differently
CALLS = [
    (3, 5, (), 1, None),
    (3, 5, (), 1, (3,)),
    (4, 3, ((3, 5),), 1, (2,)),
    (2, 3, ((2, 3), (3, 3)), 1, None),
    (3, 4, ((2, 2),), 2, (0, 3)),
]


def _inputs(call, **kwargs):
    height, width, contexts, batch, padding = call
    return qwen_inputs(height, width, contexts=contexts, batch=batch, padding=padding, **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_statistics_only_matches_stock_diffusers(call, dtype, tol):
    """Recording mass in every block (flow attention everywhere, identity rules, text padding as
    a hidden key group) changes nothing."""
    model = tiny_qwen_transformer(dtype=dtype)
    inputs = _inputs(call, dtype=dtype)
    assert_statistics_only_is_stock(model, inputs, 2, tol)


def test_zero_cond_t_model_matches_stock_diffusers():
    """Qwen-Image-Edit-2511's transformer (input images modulated as at t = 0) under
    statistics-only attention: the stock output."""
    model = tiny_qwen_transformer(zero_cond_t=True)
    inputs = qwen_inputs(3, 4, contexts=((3, 4), (2, 2)), padding=(2,))
    stock = model(**inputs)[0]
    with attach(model, StatsRecorder()):
        ours = model(**inputs)[0]
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_text_padding_matters_to_the_stock_model():
    """The padded calls above test something: the stock model's output depends on the mask."""
    model = tiny_qwen_transformer()
    padded = _inputs(CALLS[-1])
    unmasked = {**padded, "encoder_hidden_states_mask": None}
    assert (model(**padded)[0] - model(**unmasked)[0]).abs().max() > 1e-3


def test_layout_from_the_call():
    model = tiny_qwen_transformer()
    with attach(model, StatsRecorder()) as session:
        model(**qwen_inputs(2, 3, text_len=5, contexts=((2, 2), (1, 4))))
    assert repr(session.layout) == "TokenLayout(text=5, target=6, context=8)"
    assert image_token_counts([(1, 2, 3)]) == (6,)
    assert image_token_counts([[(1, 2, 3), (1, 4, 4)]] * 2) == (6, 16)


def test_padded_key_groups_and_the_hidden_group():
    groups = torch.tensor([0, 0, 0, 1, 1, 2], dtype=torch.int32)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert padded_key_groups(groups, mask, 3).tolist() == [[0, 0, 0, 1, 1, 2],
                                                           [0, 3, 3, 1, 1, 2]]
    rules = FlowRules(num_groups=3).weight_probs(TARGET, CONTEXT, 0.5).block(TEXT, TARGET)
    hidden = rules.with_hidden_group()
    assert hidden.num_groups == 4
    assert torch.equal(hidden.weight[0, :3, :3], rules.weight[0])
    assert torch.equal(hidden.bias[0, :3, :3], rules.bias[0])
    assert torch.isneginf(hidden.bias[0, :, 3]).all() and (hidden.weight[0, 3] == 1).all()
    with pytest.raises(ValueError, match="a hidden group needs a free group"):
        FlowRules(num_groups=16).with_hidden_group()


def test_rules_match_reference_processor_with_gradients(monkeypatch):
    """Triton kernels (interpreter) vs the reference behind the same processor, with text
    padding: outputs and gradients with respect to the context latents."""
    inputs = qwen_inputs(3, 4, contexts=((3, 4),), batch=2, padding=(1, 4))
    assert_triton_matches_reference(tiny_qwen_transformer(), inputs, 12, monkeypatch)


def test_every_block_of_a_call_shares_one_tile_plan(monkeypatch):
    """The pipeline's text mask is int64: the padded key groups are derived from it once per
    call, not once per block, so the kernels plan the layout once."""
    monkeypatch.setenv("DITFLOW_BACKEND", "triton")
    inputs = qwen_inputs(3, 4, contexts=((3, 4),), batch=2, padding=(1, 4), device=TRITON_DEVICE)
    inputs["encoder_hidden_states_mask"] = inputs["encoder_hidden_states_mask"].long()
    model = tiny_qwen_transformer().to(TRITON_DEVICE)
    misses = ops._plans.misses
    with attach(model, rules_everywhere(edit_rules)):
        model(**inputs)
    assert ops._plans.misses - misses == 1  # two blocks, one layout, one block shape


def test_rules_and_pair_masks_mean_what_they_say():
    assert_rules_and_pair_masks_reach_the_attention(tiny_qwen_transformer(), _inputs(CALLS[-1]))


def test_rules_change_the_output():
    model = tiny_qwen_transformer()
    inputs = qwen_inputs(3, 4, contexts=((3, 4),))
    stock = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        ruled = model(**inputs)[0]
    assert (ruled - stock).abs().max() > 1e-3


def test_r_ctx_matches_explicit_probabilities():
    """r_ctx from the engine = r_ctx from explicit softmax probabilities of target queries over
    all unpadded keys, computed by diffusers' own processor (its attention call replaced by an
    eager probe)."""
    model = tiny_qwen_transformer()
    inputs = qwen_inputs(3, 5, text_len=6, contexts=((3, 5),), batch=2, padding=(0, 2))
    layout = TokenLayout.from_segments(6, 15, 15)
    eager = eager_r_ctx(model, inputs, qwen_module, layout)
    recorder = StatsRecorder(mass_maps=True)
    with attach(model, recorder):
        model(**inputs)
    for name, want in zip(("double.0", "double.1"), eager, strict=True):
        torch.testing.assert_close(recorder.r_ctx[(0, name)], want, atol=1e-6, rtol=1e-5)
        # the padding is invisible to interventions: the mass over the layout's groups is all
        assert recorder.maps[(0, name)].shape == (2, 6 + 30, 3)
        torch.testing.assert_close(recorder.maps[(0, name)].sum(-1), torch.ones(2, 36))


def test_regions_carved_from_text_keep_the_padding_hidden():
    """An intervention's own groups (a text region) and the padding group coexist."""

    class BlockWord(Intervention):
        def layout(self, step, block, layout):
            return layout.with_region("word", torch.tensor([1, 2]))

        def rules(self, step, block, layout):
            return layout.rules().block(TARGET, layout.group("word"))

        def wants_mass(self, step, block):
            return True

        def observe(self, step, block, layout, result):
            self.mass = result.mass

    model = tiny_qwen_transformer()
    intervention = BlockWord()
    with attach(model, intervention):
        model(**qwen_inputs(3, 4, contexts=((3, 4),), padding=(3,)))
    target = slice(8, 20)
    assert intervention.mass.shape[-1] == 4
    assert (intervention.mass[:, :, target, 3] == 0).all()
    mass = intervention.mass
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]))


def test_attach_round_trip_and_exception_restore():
    model = tiny_qwen_transformer()
    inputs = qwen_inputs(3, 4, contexts=((3, 4),), padding=(2,))
    processors = [b.attn.processor for b in model.transformer_blocks]
    before = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        model(**inputs)
    assert [b.attn.processor for b in model.transformer_blocks] == processors
    assert torch.equal(model(**inputs)[0], before)
    with pytest.raises(RuntimeError, match="boom"), attach(model, StatsRecorder()):
        raise RuntimeError("boom")
    assert [b.attn.processor for b in model.transformer_blocks] == processors


def test_early_stop_runs_fewer_blocks_with_the_same_statistics_and_gradients():
    assert_early_stop_saves_blocks(tiny_qwen_transformer(num_layers=3),
                                   qwen_inputs(3, 4, contexts=((3, 4),)), "double.1", (3, 2), 12)


def test_bad_calls_are_refused_with_the_reason():
    model = tiny_qwen_transformer()
    inputs = qwen_inputs(2, 2, contexts=((2, 2),), batch=2)
    mixed = {**inputs, "img_shapes": [[(1, 2, 2), (1, 2, 2)], [(1, 2, 2), (1, 1, 4)]]}
    with pytest.raises(ValueError, match="img_shapes differ across the batch"), attach(
            model, StatsRecorder()):
        model(**mixed)

    class SixteenGroups(Intervention):
        def layout(self, step, block, layout):
            for i in range(13):
                layout = layout.with_region(f"patch{i}", torch.tensor([8 + i]))
            return layout

        def rules(self, step, block, layout):
            return layout.rules()

    sixteen = SixteenGroups()
    with pytest.raises(ValueError, match="a hidden group needs a free group"), attach(
            model, sixteen):
        model(**qwen_inputs(4, 4, padding=(2,)))
    model.register_to_config(use_layer3d_rope=True)
    with pytest.raises(TypeError, match="Qwen-Image-Layered"), attach(model, StatsRecorder()):
        pass


def test_edit_pipeline_with_an_intervention_and_true_cfg(tmp_path):
    """A QwenImageEditPipeline call (true CFG: a padded negative prompt, a call per prompt at
    each step) runs under an intervention, produces an image, and loads back offline."""
    from PIL import Image

    from ditflow.models.loading import load_qwen_pipeline
    from ditflow.tiny import tiny_qwen_edit_pipeline

    pipe = tiny_qwen_edit_pipeline()
    photo = Image.fromarray(torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy())
    call = dict(image=photo, prompt="make the cat smile",
                negative_prompt_embeds=torch.randn(1, 5, 16),
                negative_prompt_embeds_mask=torch.tensor([[1, 1, 1, 0, 0]]), true_cfg_scale=2.0,
                num_inference_steps=2, height=32, width=48)
    recorder, negative = StatsRecorder(blocks=["double.1"], call=0), StatsRecorder(call=1)
    with attach(pipe, rules_everywhere(edit_rules)) as session:
        image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 32)
    # the last call is the negative prompt's: 5 text tokens, a 2 x 3 target, and the ~1 MP
    # context the pipeline makes of the 4:3 photo (896 x 1184 pixels: 56 x 74 tokens)
    assert repr(session.layout) == "TokenLayout(text=5, target=6, context=4144)"
    assert session.step.index == 1 and session.step.call == 1
    for stats in (recorder, negative):
        with attach(pipe, stats):
            pipe(**call, generator=torch.Generator().manual_seed(0))
    assert sorted(recorder.r_ctx) == [(0, "double.1"), (1, "double.1")]
    assert len(negative.r_ctx) == 4
    # one context, both calls: the prompt's and the negative prompt's statistics differ
    assert not torch.allclose(recorder.r_ctx[(0, "double.1")], negative.r_ctx[(0, "double.1")])

    stock = np.asarray(pipe(**call, generator=torch.Generator().manual_seed(0)).images[0])
    assert not np.array_equal(stock, np.asarray(image))  # the rules changed the edit
    pipe.save_pretrained(tmp_path)  # the tiny processor is ours: passed in, not saved
    loaded = load_qwen_pipeline(tmp_path, dtype=torch.float32, processor=pipe.processor)
    again = loaded(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(again), stock)


def test_local_loading_errors_name_what_is_missing(tmp_path):
    from ditflow.models.loading import load_qwen_pipeline

    with pytest.raises(FileNotFoundError, match="Qwen/Qwen-Image-Edit"):
        load_qwen_pipeline(tmp_path / "nowhere")
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "QwenImageEditPipeline", "vae": ["diffusers", "AutoencoderKLQwenImage"],'
        ' "processor": [null, null], "transformer": ["diffusers", "QwenImageTransformer2DModel"]}')
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing: transformer/$"):
        load_qwen_pipeline(tmp_path)
    with pytest.raises(ValueError, match="kind='kontext': expected one of edit, edit-plus, t2i"):
        load_qwen_pipeline(tmp_path, kind="kontext")


def test_compiled_transformer_matches_eager_without_recompiling_per_step():
    model = tiny_qwen_transformer()
    inputs = qwen_inputs(3, 4, contexts=((3, 4),), padding=(2,))
    assert_compiled_matches_eager(model, inputs, lambda: rules_everywhere(edit_rules))


def test_gradient_checkpointing_with_early_stop():
    model = tiny_qwen_transformer(num_layers=3)
    inputs = qwen_inputs(3, 4, contexts=((3, 4),), padding=(2,))
    assert_checkpointing_keeps_the_gradient(model, inputs, ["double.0", "double.1"])


@pytest.mark.gpu
def test_model_cpu_offload_with_an_intervention():
    """Processors build every tensor (padded key groups included) on the inputs' device, so
    accelerate's offload hooks work."""
    pytest.importorskip("accelerate")
    from PIL import Image

    from ditflow.tiny import tiny_qwen_edit_pipeline

    pipe = tiny_qwen_edit_pipeline()
    pipe.enable_model_cpu_offload()
    photo = Image.fromarray(torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy())
    recorder = StatsRecorder(blocks=["double.1"])
    with attach(pipe, recorder):
        pipe(image=photo, prompt="make the cat smile", negative_prompt="blurry",
             true_cfg_scale=2.0, num_inference_steps=2, height=32, width=32)
    assert recorder.r_ctx and all(r.device.type == "cuda" for r in recorder.r_ctx.values())


def test_unknown_models_are_refused_with_the_supported_ones():
    message = (r"no adapter for Linear; supported: FluxTransformer2DModel \(FLUX.1, FLUX.1 "
               r"Kontext\); QwenImageTransformer2DModel \(Qwen-Image, Qwen-Image-Edit\)")
    with pytest.raises(TypeError, match=message), attach(torch.nn.Linear(2, 2), StatsRecorder()):
        pass
