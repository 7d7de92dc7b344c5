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
    assert_early_stop_saves_blocks,
    assert_rules_and_pair_masks_reach_the_attention,
    assert_statistics_only_is_stock,
    assert_triton_matches_reference,
    eager_r_ctx,
    edit_rules,
    rules_everywhere,
)

from ditflow.layout import TokenLayout
from ditflow.models.flux import image_ids
from ditflow.models.step1x import (
    reference_ids,
    shifted_timesteps,
    step1x_layout,
    step1x_size,
)
from ditflow.session import StatsRecorder, attach
from ditflow.tiny import step1x_inputs, tiny_step1x_edit_pipeline, tiny_step1x_transformer

# (height, width, batch, padding, version): v1.0 (the reference shares the target's ids), text
# padding, a batch padded differently, v1.1 (the reference's ids shifted by 1, no pool scale)
CALLS = [
    (3, 5, 1, None, "v1.0"),
    (4, 3, 1, (3,), "v1.0"),
    (3, 4, 2, (0, 5), "v1.0"),
    (2, 3, 1, (2,), "v1.1"),
]


def _inputs(call, **kwargs):
    height, width, batch, padding, version = call
    return step1x_inputs(height, width, batch=batch, padding=padding, version=version,
                         **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_statistics_only_matches_the_stock_model(call, dtype, tol):
    """Recording mass in every block (flow attention everywhere, identity rules) changes
    nothing."""
    model = tiny_step1x_transformer(dtype=dtype, version=call[-1])
    assert_statistics_only_is_stock(model, _inputs(call, dtype=dtype), 4, tol)


def test_the_connector_sees_the_text_mask():
    """Padding is masked in the connector (not in the transformer): the output depends on it."""
    model = tiny_step1x_transformer()
    padded = step1x_inputs(3, 4, padding=(3,))
    unmasked = {**padded, "encoder_attention_mask": torch.ones_like(
        padded["encoder_attention_mask"])}
    assert (model(**padded)[0] - model(**unmasked)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@pytest.mark.parametrize("height, width", [(2, 3), (1, 4), (1, 1), (3, 1), (2, 1)])
def test_layout_from_the_call(height, width, version):
    """The target ends where the image ids start over, whichever ids the reference carries
    (v1.0: the target's own; v1.1: shifted by 1 on every axis)."""
    model = tiny_step1x_transformer(version=version)
    with attach(model, StatsRecorder()) as session:
        model(**step1x_inputs(height, width, text_len=5, version=version))
    n = height * width
    assert repr(session.layout) == f"TokenLayout(text=5, target={n}, context={n})"
    ids = torch.cat([image_ids(height, width), reference_ids(2, 2, version)])
    assert repr(step1x_layout(7, ids[None])) == f"TokenLayout(text=7, target={n}, context=4)"
    assert reference_ids(1, 2, "v1.1").tolist() == [[1, 1, 1], [1, 1, 2]]
    with pytest.raises(ValueError, match=r"version='v2': expected one of v1\.0, v1\.1"):
        tiny_step1x_transformer(version="v2")


def test_rules_match_reference_processor_with_gradients(monkeypatch):
    """Triton kernels (interpreter) vs the reference behind the same processor: outputs and
    gradients with respect to the reference latents."""
    inputs = step1x_inputs(3, 4, batch=2, padding=(1, 4))
    assert_triton_matches_reference(tiny_step1x_transformer(), inputs, 12, monkeypatch)


def test_rules_and_pair_masks_mean_what_they_say():
    assert_rules_and_pair_masks_reach_the_attention(tiny_step1x_transformer(), step1x_inputs(3, 4))


def test_rules_change_the_output():
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 4)
    stock = model(**inputs)[0]
    with attach(model, rules_everywhere(edit_rules)):
        ruled = model(**inputs)[0]
    assert (ruled - stock).abs().max() > 1e-3


def test_r_ctx_matches_explicit_probabilities():
    """r_ctx from the engine = r_ctx from explicit softmax probabilities of target queries over
    all keys (the 640-style padded text included, as the model attends to it), computed by
    diffusers' own FLUX processor with an eager probe as its attention call."""
    model = tiny_step1x_transformer()
    inputs = step1x_inputs(3, 5, text_len=6, batch=2, padding=(0, 2))
    layout = TokenLayout.from_segments(6, 15, 15)
    eager = eager_r_ctx(model, inputs, flux_module, layout)
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
    assert_early_stop_saves_blocks(tiny_step1x_transformer(), step1x_inputs(3, 4), "single.0",
                                   (4, 3), 12)


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


def test_guidance_is_damped_where_it_is_large():
    from ditflow.models.step1x import guided_velocity

    uncond = torch.zeros(1, 2, 4)
    cond = torch.tensor([[[0.1, 0.2, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]])  # norms 0.22 and 5
    plain = guided_velocity(cond, uncond, 6.0, damped=False)
    torch.testing.assert_close(plain, 6.0 * cond)
    damped = guided_velocity(cond, uncond, 6.0, damped=True)
    torch.testing.assert_close(damped[0, 0], plain[0, 0])  # a norm below 1 is left alone
    torch.testing.assert_close(damped[0, 1], plain[0, 1] / 5**0.4)


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
    # one of the two was silently ignored for the size_level snapping
    with pytest.raises(ValueError, match="height=12, width=None: give both or neither"):
        pipe(**{**call, "width": None})


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
    assert recorder.r_ctx and all(r.device.type == "cuda" for r in recorder.r_ctx.values())


# -- the authors' checkpoint -----------------------------------------------------------------------


def _authors_connector(params, x, t, mask, heads, depth):
    """Step1X-Edit's connector computed from the authors' parameter names and their
    description (masked-mean pooling, scaled by 1 + scale_factor in v1.0; a token refiner:
    sinusoidal timestep MLP plus pooled-text MLP as conditioning, gated self-attention and MLP
    blocks under a pairwise padding mask whose first key is always visible)."""
    import math

    import torch.nn.functional as F

    def linear(name, v):
        return F.linear(v, params[f"{name}.weight"], params[f"{name}.bias"])

    weights = mask.float().unsqueeze(-1)
    mean = (x * weights).sum(1) / weights.sum(1)
    pooled = linear("global_proj_out", mean * (1 + params.get("scale_factor", 0)))
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    angles = (t * 1000)[:, None] * freqs[None]
    timestep = torch.cat([angles.cos(), angles.sin()], dim=-1)
    c = linear("S.t_embedder.mlp.2", F.silu(linear("S.t_embedder.mlp.0", timestep)))
    c = c + linear("S.c_embedder.linear_2", F.silu(linear("S.c_embedder.linear_1", mean)))
    h = linear("S.input_embedder", x)
    b, n, width = h.shape
    visible = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    visible[..., 0] = True
    for i in range(depth):
        p = f"S.individual_token_refiner.blocks.{i}"
        gate_attn, gate_mlp = linear(f"{p}.adaLN_modulation.1", F.silu(c)).chunk(2, dim=-1)

        def norm(name, v, p=p):
            return F.layer_norm(v, (width,), params[f"{p}.{name}.weight"],
                                params[f"{p}.{name}.bias"], eps=1e-6)

        q, k, v = linear(f"{p}.self_attn_qkv", norm("norm1", h)).view(
            b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        h = h + linear(f"{p}.self_attn_proj", attended.transpose(1, 2).reshape(b, n, width)) \
            * gate_attn[:, None]
        hidden = F.silu(linear(f"{p}.mlp.fc1", norm("norm2", h)))
        h = h + linear(f"{p}.mlp.fc2", hidden) * gate_mlp[:, None]
    return h, pooled


def _authors_connector_shapes(llm: int, width: int, depth: int, version: str
                              ) -> dict[str, tuple]:
    shapes = {"global_proj_out.weight": (768, llm), "global_proj_out.bias": (768,)}
    if version == "v1.0":
        shapes["scale_factor"] = (1,)
    layers = {"S.input_embedder": (width, llm), "S.t_embedder.mlp.0": (width, 256),
              "S.t_embedder.mlp.2": (width, width), "S.c_embedder.linear_1": (width, llm),
              "S.c_embedder.linear_2": (width, width)}
    for i in range(depth):
        p = f"S.individual_token_refiner.blocks.{i}"
        layers.update({f"{p}.norm1": (width,), f"{p}.norm2": (width,),
                       f"{p}.self_attn_qkv": (3 * width, width),
                       f"{p}.self_attn_proj": (width, width),
                       f"{p}.mlp.fc1": (4 * width, width), f"{p}.mlp.fc2": (width, 4 * width),
                       f"{p}.adaLN_modulation.1": (2 * width, width)})
    for name, shape in layers.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, shape[:1]
    return shapes


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_the_connector_loads_the_authors_parameters_and_computes_their_function(version):
    from ditflow.models.step1x import Step1XConnector, convert_step1x_checkpoint

    torch.manual_seed(0)
    params = {name: torch.randn(shape) * 0.3 for name, shape in
              _authors_connector_shapes(16, 32, 2, version).items()}
    params = {k: v.abs() + 0.5 if k.endswith("norm1.weight") or k.endswith("norm2.weight")
              else v for k, v in params.items()}
    converted = convert_step1x_checkpoint({f"connector.{k}": v for k, v in params.items()})
    connector = Step1XConnector(16, 2, 16, 2, 768, pool_scale=version == "v1.0")
    connector.load_state_dict({k.removeprefix("connector."): v for k, v in converted.items()},
                              strict=True)
    x, t = torch.randn(2, 7, 16), torch.tensor([0.99, 0.3])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ours = connector(x, mask, t)
    theirs = _authors_connector(params, x, t, mask, heads=2, depth=2)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unexpected connector parameter 'S\.cross_attn\."):
        convert_step1x_checkpoint({"connector.S.cross_attn.weight": torch.zeros(1)})


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_every_parameter_of_the_released_model_is_loaded_with_its_shape(version):
    """The released checkpoints' names and shapes (FLUX.1's original names for the 12B
    transformer, the connector's) convert onto the full-size model exactly: no parameter
    missing, none left over, every shape right (on the meta device, no memory)."""
    from ditflow.models.step1x import Step1XEditTransformer, convert_step1x_checkpoint

    width, mlp = 3072, 12288
    shapes = {f"connector.{k}": v
              for k, v in _authors_connector_shapes(3584, 4096, 2, version).items()}
    layers = {"img_in": (width, 64), "time_in.in_layer": (width, 256),
              "time_in.out_layer": (width, width), "vector_in.in_layer": (width, 768),
              "vector_in.out_layer": (width, width), "txt_in": (width, 4096),
              "final_layer.linear": (64, width),
              "final_layer.adaLN_modulation.1": (2 * width, width)}
    for i in range(19):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            layers.update({f"{p}_mod.lin": (6 * width, width),
                           f"{p}_attn.qkv": (3 * width, width),
                           f"{p}_attn.proj": (width, width), f"{p}_mlp.0": (mlp, width),
                           f"{p}_mlp.2": (width, mlp)})
            shapes.update({f"{p}_attn.norm.query_norm.scale": (128,),
                           f"{p}_attn.norm.key_norm.scale": (128,)})
    for i in range(38):
        p = f"single_blocks.{i}"
        layers.update({f"{p}.linear1": (3 * width + mlp, width),
                       f"{p}.linear2": (width, width + mlp),
                       f"{p}.modulation.lin": (3 * width, width)})
        shapes.update({f"{p}.norm.query_norm.scale": (128,),
                       f"{p}.norm.key_norm.scale": (128,)})
    for name, shape in layers.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, shape[:1]
    with torch.device("meta"):
        checkpoint = {name: torch.empty(shape) for name, shape in shapes.items()}
        model = Step1XEditTransformer(version=version)
    model.load_state_dict(convert_step1x_checkpoint(checkpoint), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for t in checkpoint.values())


def test_step1x_folders_errors_name_what_is_missing(tmp_path):
    from ditflow.models.loading import load_editor, load_step1x_pipeline

    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_step1x_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing: step1x-edit\*\.safetensors, "
                                                r"vae\.safetensors, Qwen2\.5-VL-7B-Instruct/"):
        load_step1x_pipeline(tmp_path)
    (tmp_path / "step1x-edit-i1258.safetensors").touch()
    # a folder with a Step1X-Edit checkpoint and no model_index.json is a Step1X-Edit folder
    with pytest.raises(FileNotFoundError, match=r"Step1X-Edit folder; missing: "
                                                r"vae\.safetensors, Qwen2\.5-VL-7B-Instruct/$"):
        load_editor(tmp_path)
    (tmp_path / "step1x-edit-v1p1-official.safetensors").touch()
    with pytest.raises(ValueError, match="several Step1X-Edit checkpoints"):
        load_step1x_pipeline(tmp_path)
    # the checkpoint's own path chooses it (and is a Step1X-Edit model for load_editor)
    with pytest.raises(FileNotFoundError, match=r"missing: vae\.safetensors"):
        load_editor(tmp_path / "step1x-edit-v1p1-official.safetensors")


def test_chat_pieces_split_quoted_text_per_character_as_the_authors_embedder():
    from ditflow.models.step1x import chat_pieces

    head = "x" * 160
    assert chat_pieces(head + 'say "hi" now') == [head + 'say "', "\u201ch\u201d",
                                                 "\u201ci\u201d", '" now']
    # curly quotes count as quotes; an apostrophe opens one (to the end, if never closed)
    assert chat_pieces(head + "a \u201cb\u201d") == [head + 'a "', "\u201cb\u201d", '"']
    assert chat_pieces(head + "cat's ok") == [head + 'cat"'] + [
        f"\u201c{c}\u201d" for c in "s ok"]
    # quotes in the first 155 characters (the template's "Enhanced prompt") stay whole
    assert chat_pieces('say "hi"' + head) == ['say "hi"' + head]


def test_the_instruction_is_tokenized_as_the_authors_embedder_does():
    """After the photo, per-character pieces lose the curly quotes that wrapped them; before
    it, the processor's ids (image pads expanded) stay."""
    from PIL import Image

    from ditflow.models.step1x import CHAT, QWEN_PREFIX

    pipe = tiny_step1x_edit_pipeline()
    tokenizer = pipe.processor.tokenizer
    chat = CHAT.format(prefix=QWEN_PREFIX, instruction='write "ab" here')
    photo = Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8))
    ids = pipe.processor(text=[chat], images=[photo], return_tensors="pt")["input_ids"][0]
    ours = pipe._token_ids(chat, ids).tolist()
    end = ids.tolist().index(tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    assert ours[:end] == ids[:end].tolist()
    expected = tokenizer('<|vision_end|>write "').input_ids + tokenizer("a").input_ids + \
        tokenizer("b").input_ids + tokenizer('" here<|im_end|>\n<|im_start|>assistant\n'
                                             ).input_ids
    assert ours[end:] == expected
