"""Step1X-Edit integration on a tiny random model built in code (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers.models.transformers.transformer_flux as flux_module
from helpers import (
    assert_checkpointing_keeps_the_gradient,
    assert_compiled_matches_eager,
    assert_statistics_only_is_stock,
    edit_rules,
    rules_everywhere,
)

from ditflow.layout import TokenLayout
from ditflow.models.flux import image_ids
from ditflow.models.step1x import shifted_timesteps, step1x_layout, step1x_size
from ditflow.session import StatsRecorder, attach
from ditflow.tiny import step1x_inputs, tiny_step1x_edit_pipeline, tiny_step1x_transformer

# (height, width, batch, padding, reference index): v1.0 ids (the reference shares the
# target's), text padding, a batch padded differently, v1.1 ids (reference index 1)
CALLS = [
    (3, 5, 1, None, 0),
    (4, 3, 1, (3,), 0),
    (3, 4, 2, (0, 5), 0),
    (2, 3, 1, (2,), 1),
]


def _inputs(call, **kwargs):
    height, width, batch, padding, reference = call
    return step1x_inputs(height, width, batch=batch, padding=padding,
                         reference_index=reference, **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_statistics_only_matches_the_stock_model(call, dtype, tol):
    """Recording mass in every block (flow attention everywhere, identity rules) changes
    nothing."""
    model = tiny_step1x_transformer(dtype=dtype, reference_index=call[-1])
    assert_statistics_only_is_stock(model, _inputs(call, dtype=dtype), 4, tol)


def test_the_connector_sees_the_text_mask():
    """Padding is masked in the connector (not in the transformer): the output depends on it."""
    model = tiny_step1x_transformer()
    padded = step1x_inputs(3, 4, padding=(3,))
    unmasked = {**padded, "encoder_attention_mask": torch.ones_like(
        padded["encoder_attention_mask"])}
    assert (model(**padded)[0] - model(**unmasked)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("reference_index", [0, 1])
@pytest.mark.parametrize("height, width", [(2, 3), (1, 4), (1, 1), (3, 1)])
def test_layout_from_the_call(height, width, reference_index):
    """The target ends where the image ids restart at row 0, column 0, whichever index the
    reference carries (v1.0: 0, the target's own; v1.1: 1)."""
    model = tiny_step1x_transformer(reference_index=reference_index)
    with attach(model, StatsRecorder()) as session:
        model(**step1x_inputs(height, width, text_len=5, reference_index=reference_index))
    n = height * width
    assert repr(session.layout) == f"TokenLayout(text=5, target={n}, context={n})"
    ids = torch.cat([image_ids(height, width), image_ids(2, 2, reference_index)])
    assert repr(step1x_layout(7, ids[None])) == f"TokenLayout(text=7, target={n}, context=4)"


def test_rules_match_reference_processor_with_gradients(monkeypatch):
    """Triton kernels (interpreter) vs the reference behind the same processor: outputs and
    gradients with respect to the reference latents."""
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4, batch=2, padding=(1, 4))
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("DITFLOW_BACKEND", backend)
        latents = inputs["hidden_states"].clone().requires_grad_()
        with attach(model, rules_everywhere(edit_rules)):
            out = model(**{**inputs, "hidden_states": latents})[0]
        (grad,) = torch.autograd.grad(out[:, :12].square().sum(), latents)
        results[backend] = (out, grad[:, 12:])
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert results["reference"][1].abs().sum() > 0


def test_rules_change_the_output():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4)
    stock = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        ruled = model(**inputs)[0]
    assert (ruled - stock).abs().max() > 1e-3


def test_r_ctx_matches_explicit_probabilities(monkeypatch):
    """r_ctx from the engine = r_ctx from explicit softmax probabilities of target queries over
    all keys (the 640-style padded text included, as the model attends to it), computed by
    diffusers' own FLUX processor with an eager probe as its attention call."""
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 5, text_len=6, batch=2, padding=(0, 2))
    layout = TokenLayout.from_segments(6, 15, 15)
    target, context = layout.mask("target"), layout.mask("context")
    eager = []

    def probe(query, key, value, attn_mask=None, **kwargs):
        scores = torch.einsum("bihd,bjhd->bhij", query, key) * query.shape[-1] ** -0.5
        probs = scores.softmax(dim=-1)
        eager.append(probs[:, :, target][..., context].sum(-1).mean(dim=(1, 2)))
        return torch.einsum("bhij,bjhd->bihd", probs, value)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", probe)
    model(**inputs)
    monkeypatch.undo()
    recorder = StatsRecorder()
    with attach(model, recorder):
        model(**inputs)
    names = ("double.0", "double.1", "single.0", "single.1")
    for name, want in zip(names, eager, strict=True):
        torch.testing.assert_close(recorder.r_ctx[(0, name)], want, atol=1e-6, rtol=1e-5)


def test_attach_round_trip_and_exception_restore():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4, padding=(2,))
    blocks = (*model.dit.transformer_blocks, *model.dit.single_transformer_blocks)
    processors = [b.attn.processor for b in blocks]
    before = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        model(**inputs)
    assert [b.attn.processor for b in blocks] == processors
    assert torch.equal(model(**inputs)[0], before)
    assert not model._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"), attach(model, StatsRecorder()):
        raise RuntimeError("boom")
    assert [b.attn.processor for b in blocks] == processors


def test_early_stop_runs_fewer_blocks_with_the_same_statistics_and_gradients():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4)
    runs = {}
    for stop in (False, True):
        latents = inputs["hidden_states"].clone().requires_grad_()
        recorder = StatsRecorder(blocks=["single.0"], stop_after_last=stop)
        with attach(model, recorder) as session:
            output = session.forward(**{**inputs, "hidden_states": latents})
            (grad,) = torch.autograd.grad(recorder.mean_r_ctx().sum(), latents)
        runs[stop] = (session.blocks_run, output is None, recorder.r_ctx[(0, "single.0")], grad)
    assert runs[False][:2] == (4, False) and runs[True][:2] == (3, True)
    torch.testing.assert_close(runs[True][2], runs[False][2])
    torch.testing.assert_close(runs[True][3], runs[False][3])
    assert runs[True][3][:, 12:].abs().sum() > 0


def test_compiled_transformer_matches_eager_without_recompiling_per_step():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4, padding=(2,))
    assert_compiled_matches_eager(model, inputs, lambda: rules_everywhere(edit_rules))


def test_gradient_checkpointing_with_early_stop():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4, padding=(2,))
    assert_checkpointing_keeps_the_gradient(model, inputs, ["double.1", "single.0"])


def test_the_authors_size_snapping_and_schedule():
    # about size_level² pixels, rounded up, then down to multiples of 16
    assert step1x_size(480, 640, 512) == (432, 592)
    assert step1x_size(640, 480, 512) == (592, 432)
    assert step1x_size(512, 512, 512) == (512, 512)
    assert step1x_size(100, 1000, 512) == (160, 1616)
    times = shifted_timesteps(4, 1024)
    assert times[0] == 1 and times[-1] == 0 and (times.diff() < 0).all()
    # the shift keeps more of the schedule near t = 1 for larger images
    assert (shifted_timesteps(4, 4096)[1:-1] > times[1:-1]).all()


def test_prompt_embeddings_keep_what_follows_the_template():
    """Qwen2.5-VL reads the template, the photo and the instruction; the embeddings start at
    the photo's "Picture 1: " label, are zero-padded to the text length, and depend on the
    photo."""
    from PIL import Image

    pipe = tiny_step1x_edit_pipeline()
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
              for _ in range(2)]
    seen = []
    encoder_forward = pipe.text_encoder.forward

    def spy(input_ids=None, **kwargs):
        seen.append(input_ids)
        return encoder_forward(input_ids=input_ids, **kwargs)

    pipe.text_encoder.forward = spy
    embeds, mask = pipe.encode_prompt(["add a hat", "add a hat"], photos)
    start = pipe.config.template_tokens
    label = pipe.processor.tokenizer("Picture 1: ").input_ids
    assert seen[0][0, start: start + len(label)].tolist() == label
    kept = min(seen[0].shape[1] - start, 64)
    assert embeds.shape == (2, 64, 16) and mask[0].sum() == kept
    assert (embeds[0, kept:] == 0).all() and (embeds[0, :kept] != 0).any(dim=-1).all()
    assert not torch.allclose(embeds[0], embeds[1])  # the photo is part of the input


def test_edit_pipeline_with_an_intervention():
    """A Step1XEditPipeline call (classifier-free guidance: prompt and negative prompt in one
    batched call per step) runs under an intervention and produces an image of the photo's
    size; statistics are per step."""
    from PIL import Image

    pipe = tiny_step1x_edit_pipeline()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3),
                                                              dtype=np.uint8))
    call = dict(image=photo, prompt="make the cat smile", num_inference_steps=3, height=12,
                width=20)
    recorder = StatsRecorder(blocks=["single.1"])
    with attach(pipe, recorder) as session:
        image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (50, 30)
    assert repr(session.layout) == "TokenLayout(text=64, target=60, context=60)"
    assert sorted(recorder.r_ctx) == [(i, "single.1") for i in range(3)]
    assert recorder.r_ctx[(0, "single.1")].shape == (2,)  # prompt and negative prompt
    with attach(pipe, rules_everywhere(edit_rules)):
        ruled = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(stock), np.asarray(image))  # statistics change nothing
    assert not np.array_equal(np.asarray(stock), np.asarray(ruled))
    latents = pipe(**call, output_type="latent").images
    assert latents.shape == (1, 60, 4)
    with pytest.raises(ValueError, match="expected multiples of 2"):
        pipe(**{**call, "height": 13})


def test_unknown_models_name_step1x_among_the_supported():
    with pytest.raises(TypeError, match=r"Step1XEditTransformer \(Step1X-Edit\)"), attach(
            torch.nn.Linear(2, 2), StatsRecorder()):
        pass


@pytest.mark.gpu
def test_model_cpu_offload_with_an_intervention():
    pytest.importorskip("accelerate")
    from PIL import Image

    pipe = tiny_step1x_edit_pipeline()
    pipe.enable_model_cpu_offload()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3),
                                                              dtype=np.uint8))
    recorder = StatsRecorder(blocks=["single.1"])
    with attach(pipe, recorder):
        pipe(image=photo, prompt="make the cat smile", num_inference_steps=2, height=16,
             width=16)
    assert all(r.device.type == "cuda" for r in recorder.r_ctx.values())
