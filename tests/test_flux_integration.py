"""FLUX / FLUX Kontext integration on tiny random models built in code (CPU)."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers.models.transformers.transformer_flux as flux_module
from helpers import (
    TRITON_DEVICE,
    HostReads,
    assert_checkpointing_keeps_the_gradient,
    assert_compiled_matches_eager,
    assert_rules_and_pair_masks_reach_the_attention,
    assert_statistics_only_is_stock,
    assert_triton_matches_reference,
    eager_r_ctx,
    edit_rules,
    rules_everywhere,
)

from ditflow import FlowRules
from ditflow.layout import TARGET, TEXT, TokenLayout
from ditflow.models.adapter import FlowProcessor
from ditflow.session import BlockId, Intervention, StatsRecorder, attach
from ditflow.tiny import flux_inputs, tiny_flux_transformer

# (height, width, context images): T2I, Kontext with one and two contexts, non-square
CALLS = [(3, 5, 0), (4, 3, 1), (3, 5, 1), (2, 3, 2)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_statistics_only_matches_stock_diffusers(call, dtype, tol):
    """Recording mass in every block (flow attention everywhere, identity rules) changes nothing."""
    model = tiny_flux_transformer(dtype=dtype)
    inputs = flux_inputs(*call[:2], contexts=call[2], dtype=dtype)
    assert_statistics_only_is_stock(model, inputs, 4, tol)


def test_layout_from_the_call():
    model = tiny_flux_transformer()
    recorder = StatsRecorder()
    with attach(model, recorder) as session:
        model(**flux_inputs(2, 3, text_len=5, contexts=2))
    assert repr(session.layout) == "TokenLayout(text=5, target=6, context=12)"


def test_layout_regions_carved_from_text_stay_text():
    layout = TokenLayout.from_segments(4, 6).with_region("word", torch.tensor([1, 2]))
    assert layout.text_len == 4 and layout.groups()[:4].tolist() == [0, 3, 3, 0]
    image_first = torch.tensor([TARGET] + [TEXT] * 3 + [TARGET] * 6)
    trailing_text = torch.tensor([TEXT] * 4 + [TARGET] * 5 + [TEXT])
    for groups in (image_first, trailing_text):
        with pytest.raises(ValueError, match="text tokens must be the first 4 tokens"):
            TokenLayout(groups, ("text", "target", "context"), 4)


def test_rules_match_reference_processor_with_gradients(monkeypatch):
    """Triton kernels (interpreter) vs the reference behind the same processor, outputs and
    gradients with respect to the context latents."""
    assert_triton_matches_reference(tiny_flux_transformer(), flux_inputs(3, 4, contexts=1), 12,
                                    monkeypatch)


def test_rules_and_pair_masks_mean_what_they_say():
    assert_rules_and_pair_masks_reach_the_attention(tiny_flux_transformer(),
                                                    flux_inputs(3, 4, contexts=1))


def test_rules_change_the_output():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    stock = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        ruled = model(**inputs)[0]
    assert (ruled - stock).abs().max() > 1e-3


def test_edit_output_replaces_the_attention_output_of_the_chosen_blocks():
    """What edit_output returns is what the block projects: the identity keeps the stock
    output; scaling the output of one block changes it; observe sees the output unedited."""

    class ScaleOutput(Intervention):
        def __init__(self, factor):
            self.factor, self.seen = factor, []

        def edits_output(self, step, block):
            return str(block) == "single.0"

        def observe(self, step, block, layout, result):
            self.seen.append(result.out.clone())

        def edit_output(self, step, block, layout, out):
            return out * self.factor

    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    stock = model(**inputs)[0]
    identity, half = ScaleOutput(1.0), ScaleOutput(0.5)
    with attach(model, identity):
        same = model(**inputs)[0]
    with attach(model, half):
        scaled = model(**inputs)[0]
    torch.testing.assert_close(same, stock, rtol=1e-5, atol=1e-5)
    assert (scaled - stock).abs().max() > 1e-3
    assert len(half.seen) == 1 and torch.equal(half.seen[0], identity.seen[0])


def test_r_ctx_matches_explicit_probabilities():
    """r_ctx from the engine = r_ctx from explicit softmax probabilities of target queries over
    all keys, computed by diffusers' own processor (its attention call replaced by an eager
    probe)."""
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 5, text_len=6, contexts=1)
    layout = TokenLayout.from_segments(6, 15, 15)
    eager = eager_r_ctx(model, inputs, flux_module, layout)
    recorder = StatsRecorder()
    with attach(model, recorder):
        model(**inputs)
    engine = [recorder.r_ctx[(0, name)] for name in ("double.0", "double.1", "single.0",
                                                      "single.1")]
    for got, want in zip(engine, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("intervention", [
    lambda: StatsRecorder(),
    lambda: rules_everywhere(functools.cache(edit_rules)),  # one rules object per layout
], ids=["mass", "rules"])
def test_attention_calls_read_nothing_back_from_the_device(intervention, monkeypatch):
    """Once layouts are planned, a block running ditflow's attention with rules or mass asks the
    device for nothing on the host: on a GPU each such read waits for every queued kernel."""
    monkeypatch.setenv("DITFLOW_BACKEND", "triton")
    model = tiny_flux_transformer().to(TRITON_DEVICE)
    inputs = flux_inputs(3, 5, text_len=6, contexts=1, device=TRITON_DEVICE)
    reads = HostReads()
    run = FlowProcessor._run

    def logged_run(self, attn, *args):
        with reads:
            return run(self, attn, *args)

    with attach(model, intervention()):
        model(**inputs)  # plans the layout
        monkeypatch.setattr(FlowProcessor, "_run", logged_run)
        model(**inputs)
    assert reads.ops == []


def test_attach_round_trip_and_exception_restore():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    processors = [b.attn.processor for b in (*model.transformer_blocks,
                                              *model.single_transformer_blocks)]
    before = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        model(**inputs)
    assert [b.attn.processor for b in (*model.transformer_blocks,
                                        *model.single_transformer_blocks)] == processors
    assert torch.equal(model(**inputs)[0], before)
    assert not model._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"), attach(model, StatsRecorder()):
        raise RuntimeError("boom")
    assert [b.attn.processor for b in (*model.transformer_blocks,
                                        *model.single_transformer_blocks)] == processors


def test_attach_refuses_a_model_already_attached():
    """An inner session's processors would answer for the outer one's blocks (an outer
    intervention silently undone)."""
    model = tiny_flux_transformer()
    with attach(model, StatsRecorder()):
        with pytest.raises(RuntimeError, match="already attached"), \
                attach(model, StatsRecorder()):
            pass
        assert all(type(b.attn.processor).__name__ == "FlowFluxAttnProcessor"
                   for b in model.single_transformer_blocks)  # the outer session's, kept
    assert isinstance(model.single_transformer_blocks[0].attn.processor,
                      flux_module.FluxAttnProcessor)


def test_attach_refuses_processors_with_weights():
    """IP-Adapter's processors are modules with weights and inputs of their own: refused with
    a message, nothing installed."""

    class WeightedProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Linear(1, 1)

    model = tiny_flux_transformer()
    model.transformer_blocks[0].attn.processor = WeightedProcessor()
    with pytest.raises(TypeError, match="WeightedProcessor carry weights"), \
            attach(model, StatsRecorder()):
        pass
    assert isinstance(model.single_transformer_blocks[0].attn.processor,
                      flux_module.FluxAttnProcessor)
    assert not model._forward_pre_hooks


def test_early_stop_runs_fewer_blocks_with_the_same_statistics():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    full = StatsRecorder(blocks=["double.1", "single.0"])
    with attach(model, full) as session:
        session.forward(**inputs)
        full_blocks = session.blocks_run
    early = StatsRecorder(blocks=["double.1", "single.0"], stop_after_last=True)
    with attach(model, early) as session:
        assert session.forward(**inputs) is None
        early_blocks = session.blocks_run
    assert (full_blocks, early_blocks) == (4, 3)
    assert full.r_ctx.keys() == early.r_ctx.keys()
    for key in full.r_ctx:
        torch.testing.assert_close(early.r_ctx[key], full.r_ctx[key])


def test_early_stop_gradient_reaches_context_latents():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    latents = inputs["hidden_states"].clone().requires_grad_()
    recorder = StatsRecorder(blocks=["single.0"], stop_after_last=True)
    with attach(model, recorder) as session:
        session.forward(**{**inputs, "hidden_states": latents})
    (grad,) = torch.autograd.grad(recorder.mean_r_ctx().sum(), latents)
    assert grad[:, 12:].abs().sum() > 0


def test_steps_are_counted_by_timestep():
    model = tiny_flux_transformer()
    recorder = StatsRecorder(blocks=["single.1"])
    with attach(model, recorder):
        for t in (0.9, 0.9, 0.5):  # two calls at one timestep (true CFG) share a step index
            model(**{**flux_inputs(2, 2, contexts=1), "timestep": torch.tensor([t])})
    assert sorted(recorder.r_ctx) == [(0, "single.1"), (1, "single.1")]


def test_rules_with_wrong_group_count_are_refused():
    model = tiny_flux_transformer()
    wrong = rules_everywhere(lambda layout: FlowRules(num_groups=2))
    message = r"rules for double\.0 have 2 groups but the layout has 3"
    with pytest.raises(ValueError, match=message), attach(model, wrong):
        model(**flux_inputs(2, 2, contexts=1))


def test_gradient_checkpointing_with_early_stop():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    assert_checkpointing_keeps_the_gradient(model, inputs, ["double.1", "single.0"])


def test_kontext_pipeline_with_an_intervention_produces_an_image():
    from PIL import Image

    from ditflow.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline("kontext")
    photo = Image.fromarray(torch.randint(0, 255, (12, 16, 3), dtype=torch.uint8).numpy())
    recorder = StatsRecorder(blocks=["single.0"])
    with attach(pipe, rules_everywhere(edit_rules)) as session:
        image = pipe(image=photo, prompt="make the cat smile", height=12, width=16,
                     max_area=12 * 16, _auto_resize=False, num_inference_steps=3,
                     max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 12)
    assert repr(session.layout) == "TokenLayout(text=8, target=48, context=48)"
    assert session.step.index == 2
    with attach(pipe, recorder):
        pipe(image=photo, prompt="make the cat smile", height=12, width=16, max_area=12 * 16,
             _auto_resize=False, num_inference_steps=2, max_sequence_length=8)
    assert sorted(recorder.r_ctx) == [(0, "single.0"), (1, "single.0")]


def test_local_loading_errors_name_what_is_missing(tmp_path):
    from ditflow.models.loading import load_flux_pipeline

    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_flux_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing: model_index\.json"):
        load_flux_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "FluxKontextPipeline", "vae": ["diffusers", "AutoencoderKL"], '
        '"transformer": ["diffusers", "FluxTransformer2DModel"]}')
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="missing: transformer/"):
        load_flux_pipeline(tmp_path)


def test_local_loading_round_trip(tmp_path):
    """A pipeline saved to disk loads back offline and runs."""
    from ditflow.models.loading import load_flux_pipeline
    from ditflow.tiny import tiny_flux_pipeline

    tiny_flux_pipeline("t2i").save_pretrained(tmp_path)
    pipe = load_flux_pipeline(tmp_path, kind="t2i", dtype=torch.float32)
    image = pipe(prompt="a red circle", height=8, width=8, num_inference_steps=1,
                 max_sequence_length=8).images[0]
    assert image.size == (8, 8)


def test_compiled_transformer_matches_eager_without_recompiling_per_step():
    model = tiny_flux_transformer()
    inputs = flux_inputs(3, 4, contexts=1)
    assert_compiled_matches_eager(model, inputs, lambda: rules_everywhere(edit_rules))


def test_mass_maps_are_head_means_per_query_and_group():
    model = tiny_flux_transformer()
    recorder = StatsRecorder(blocks=["double.0"], mass_maps=True)
    with attach(model, recorder):
        model(**flux_inputs(3, 4, text_len=6, contexts=1))
    maps = recorder.maps[(0, "double.0")]
    assert maps.shape == (1, 6 + 24, 3)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 30))


@pytest.mark.gpu
def test_model_cpu_offload_with_an_intervention():
    """Processors build every tensor on the inputs' device, so accelerate's offload hooks work."""
    pytest.importorskip("accelerate")
    from PIL import Image

    from ditflow.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline("kontext")
    pipe.enable_model_cpu_offload()
    photo = Image.fromarray(torch.randint(0, 255, (12, 16, 3), dtype=torch.uint8).numpy())
    recorder = StatsRecorder(blocks=["single.0"])
    with attach(pipe, recorder):
        pipe(image=photo, prompt="make the cat smile", height=12, width=16, max_area=12 * 16,
             _auto_resize=False, num_inference_steps=2, max_sequence_length=8)
    assert recorder.r_ctx and all(r.device.type == "cuda" for r in recorder.r_ctx.values())


def test_early_stop_every_step():
    """Each call stops after the last recorded block, step after step."""
    model = tiny_flux_transformer()
    recorder = StatsRecorder(blocks=["single.0", "double.1"], stop_after_last=True)
    with attach(model, recorder) as session:
        for t in (0.9, 0.8):
            assert session.forward(**{**flux_inputs(2, 2, contexts=1),
                                      "timestep": torch.tensor([t])}) is None
    assert sorted(recorder.r_ctx) == [(0, "double.1"), (0, "single.0"), (1, "double.1"),
                                      (1, "single.0")]
    assert session.blocks_run == 6


@pytest.mark.parametrize("blocks, match", [
    ("single.1", r"blocks='single.1': expected a list of block names, e.g. \['single.1'\]"),
    (["single1"], r"blocks \['single1'\] are no block names: expected 'double.<i>' or "),
    (["double.1", "single.x"], r"blocks \['single.x'\] are no block names"),
], ids=["a str", "no dot", "no index"])
def test_stats_recorder_refuses_what_is_no_block_list(blocks, match):
    with pytest.raises(ValueError, match=match):
        StatsRecorder(blocks=blocks, stop_after_last=True)


def test_stats_recorder_blocks_the_model_lacks_are_refused_when_attached():
    """A block the model lacks (a typo, another model's name) would record nothing, and with
    stop_after_last the pass would never stop: attach refuses it and installs nothing."""
    model = tiny_flux_transformer()
    processors = [b.attn.processor for b in model.single_transformer_blocks]
    recorder = StatsRecorder(blocks=["double.1", "single.10"], stop_after_last=True)
    with pytest.raises(ValueError, match=r"StatsRecorder.blocks: \['single.10'\] not in this "
                                         r"model \(4 blocks: double.0 .. single.1\)"), \
            attach(model, recorder):
        pass
    assert [b.attn.processor for b in model.single_transformer_blocks] == processors
    assert not model._forward_pre_hooks
    with attach(model, StatsRecorder(blocks=[BlockId("single", 1, 3)])):  # BlockIds too
        pass


def test_a_stats_recorder_attached_again_starts_empty():
    """Step indices restart with each attach: a reused recorder's entries are the latest
    attachment's only, never a mix of two runs (mean_r_ctx averaged two images)."""
    model = tiny_flux_transformer()
    recorder = StatsRecorder(blocks=["single.1"], mass_maps=True)

    def run(timesteps, seed):
        torch.manual_seed(seed)
        inputs = flux_inputs(2, 2, contexts=1)
        with attach(model, recorder):
            for t in timesteps:
                model(**{**inputs, "timestep": torch.tensor([t])})
        return {key: r.clone() for key, r in recorder.r_ctx.items()}

    run((0.9, 0.5), seed=0)
    second = run((0.9,), seed=1)
    assert list(recorder.r_ctx) == list(recorder.maps) == [(0, "single.1")]
    torch.testing.assert_close(recorder.mean_r_ctx(), second[(0, "single.1")])
