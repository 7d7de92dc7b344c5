"""Qwen-Image / Qwen-Image-Edit adapter: processors for ``QwenImageTransformer2DModel`` blocks.

Every Qwen-Image block is dual-stream: text and image tokens have their own projections and
attend jointly over ``[text | target | context images...]``. The processor does what diffusers'
``QwenDoubleStreamAttnProcessor2_0`` does (projections, QK RMS-norm, complex RoPE per stream,
``[text, image]`` concatenation, output split and projections), with the attention call replaced
by :func:`ditflow.flow_attention`. Text padding (``encoder_hidden_states_mask``) becomes one
extra key group that no query sees, per batch element; interventions never see it (their
layout, rules and mass exclude it). Blocks where the intervention asks for nothing run the
model's original processor, untouched.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .._memo import TensorMemo
from ..functional import FlowAttentionOutput, flow_attention
from ..layout import TokenLayout
from ..rotary import apply_rotary_complex
from ..rules import FlowRules
from ..session import AttentionPlan, BlockId, Session
from .adapter import FlowProcessor, ProcessorAdapter
from .flux import pack_latents, working_size

_hidden_padding_rules: OrderedDict[tuple, FlowRules] = OrderedDict()


def _hidden_padding(rules: FlowRules) -> FlowRules:
    """``rules`` plus the hidden padding group, one object per distinct tables: interventions
    may build equal rules for every block (the session's identity rules are new each block), and
    the kernels' tile plans key on the device tables, which each object copies once."""
    key = (rules.num_groups, *(None if t is None else (tuple(t.shape), t.numpy().tobytes())
                               for t in rules.tables_on("cpu")))  # no copies per block
    hidden = _hidden_padding_rules.get(key)
    if hidden is None:
        hidden = _hidden_padding_rules[key] = rules.with_hidden_group()
        if len(_hidden_padding_rules) > 16:
            _hidden_padding_rules.popitem(last=False)
    _hidden_padding_rules.move_to_end(key)
    return hidden


def padded_key_groups(groups: torch.Tensor, text_mask: torch.Tensor, padding_group: int
                      ) -> torch.Tensor:
    """Key groups [B, N]: ``groups`` ([N], text first) with the padded text tokens of each batch
    element (``text_mask`` False) moved to ``padding_group``."""
    batch, text = text_mask.shape
    padding = torch.full_like(groups[:text], padding_group)
    keys = groups.expand(batch, -1).clone()
    keys[:, :text] = torch.where(text_mask, groups[:text], padding)
    return keys


class FlowQwenAttnProcessor(FlowProcessor):
    """Processor for one Qwen-Image attention module (a dual-stream block)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                         attention_mask, image_rotary_emb)

    @torch.compiler.disable
    def _with_padding(self, groups: torch.Tensor, text_mask: torch.Tensor, rules: FlowRules
                      ) -> tuple[torch.Tensor, FlowRules]:
        # Eager under torch.compile, like the session: cached per call, not traced per block;
        # keyed on the pipeline's own mask (one tensor per call), so every block of the call
        # shares the key groups and with them the kernels' tile plans.
        padding = rules.num_groups  # the group with_hidden_group adds

        def key_groups() -> torch.Tensor:
            with torch.inference_mode(False):  # a cache key for the plans: a normal tensor
                return padded_key_groups(groups, text_mask.to(groups.device, torch.bool),
                                         padding)

        return (self.session.derived.get((groups, text_mask), ("padded keys", padding),
                                         key_groups), _hidden_padding(rules))

    def _flow(self, attn, hidden_states, encoder_hidden_states, text_mask, attention_mask,
              image_rotary_emb, plan: AttentionPlan):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("ditflow's Qwen-Image processor needs encoder_hidden_states and takes "
                             "no attention_mask (text padding comes as "
                             "encoder_hidden_states_mask; other masks as groups or a pair mask)")
        head_dim = attn.inner_dim // attn.heads

        def project(layer, states):
            return layer(states).unflatten(-1, (-1, head_dim))

        def normed(layer, t):
            return t if layer is None else layer(t)

        q, k, v = (project(layer, hidden_states) for layer in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (project(layer, encoder_hidden_states)
                      for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q, k = normed(attn.norm_q, q), normed(attn.norm_k, k)
        tq, tk = normed(attn.norm_added_q, tq), normed(attn.norm_added_k, tk)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            q, k = (apply_rotary_complex(t, image_freqs) for t in (q, k))
            tq, tk = (apply_rotary_complex(t, text_freqs) for t in (tq, tk))
        q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        self._check_length(q.shape[1], plan)

        groups = plan.layout.groups(q.device)
        key_groups, rules = (groups, plan.rules) if text_mask is None else self._with_padding(
            groups, text_mask, plan.rules)
        result = flow_attention(q, k, v, groups, key_groups, rules=rules,
                                pair_mask=self.session.pair_mask(self.block, plan, q, k),
                                return_mass=plan.return_mass)
        if text_mask is not None and result.mass is not None:
            # built anew, not result._replace(mass=...): Dynamo (torch 2.11) cannot rebuild a
            # _replace'd NamedTuple at after_attention's graph break
            result = FlowAttentionOutput(result.out, result.lse,
                                         result.mass[..., :plan.layout.num_groups])
        out = self.session.after_attention(self.block, plan, result).flatten(2, 3).to(q.dtype)
        return self._joint_output(attn, out, encoder_hidden_states.shape[1])


class QwenImageAdapter(ProcessorAdapter):
    """Installs :class:`FlowQwenAttnProcessor` on every block of a QwenImageTransformer2DModel:
    blocks ``double.0`` ... ``double.{n-1}`` (Qwen-Image: 60)."""

    processor = FlowQwenAttnProcessor

    @staticmethod
    def blocks(transformer):
        return [(BlockId("double", i, i), block)
                for i, block in enumerate(transformer.transformer_blocks)]

    def install(self, transformer, session: Session):
        if getattr(transformer.config, "use_layer3d_rope", False):
            raise TypeError("ditflow's Qwen-Image adapter does not support Qwen-Image-Layered "
                            "(use_layer3d_rope): its image segments are layers, not "
                            "target and context")
        return super().install(transformer, session)

    @staticmethod
    def call_layout(kwargs: dict, memo: TensorMemo) -> TokenLayout:
        """The layout of one transformer call: its text tokens, then the images of
        ``img_shapes`` in order, the first the target, the others context (Qwen-Image-Edit's
        input images)."""
        text = kwargs["encoder_hidden_states"].shape[1]
        images = image_token_counts(kwargs.get("img_shapes"))
        return memo.get((), ("qwen", text, images),
                        lambda: TokenLayout.from_segments(text, images[0], list(images[1:])))


def image_token_counts(img_shapes) -> tuple[int, ...]:
    """Tokens per image of a Qwen-Image call's ``img_shapes``: per batch element a list of
    ``(frames, rows, columns)`` (or one such tuple); every batch element must have the same."""
    if not img_shapes:
        raise ValueError("Qwen-Image call without img_shapes: ditflow reads the image segments "
                         "from it")
    per_batch = img_shapes if isinstance(img_shapes, list) else [img_shapes]
    shapes = [[entry] if isinstance(entry, tuple) else list(entry) for entry in per_batch]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"img_shapes differ across the batch ({img_shapes}); Qwen-Image's RoPE "
                         "needs one image layout per call")
    return tuple(math.prod(shape) for shape in shapes[0])


class QwenEditCalls:
    """Transformer calls of Qwen-Image-Edit edits, built directly for drivers that
    differentiate through the model (DeContext): ``[text | target noise | context photo]``.

    The prompt embeddings come from Qwen2.5-VL, which sees the photo too: they are computed
    from the clean photo (no gradient flows through the 7B encoder). Sizes are multiples of
    32 pixels, as the pipeline's own resize to about 1 MP makes them, so a working
    resolution of 1024 reproduces the context the pipeline feeds the model.
    """

    prompt_sees_image = True
    # Each instruction embeds to its own length: a CUDA graph of a step would hold for one.
    prompts_share_one_graph = False

    def __init__(self, pipeline):
        self.pipe = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        # Read once, as KontextCalls does.
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.vae_dtype = self.vae.dtype
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)
        self.multiple = 4 * self.vae_scale_factor
        channels = self.vae.config.z_dim
        self._latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, channels, 1, 1, 1)
        self._latents_std = torch.tensor(self.vae.config.latents_std).view(1, channels, 1, 1, 1)

    def working_size(self, height: int, width: int, resolution: int) -> tuple[int, int]:
        """About ``resolution``² pixels at the photo's aspect ratio, multiples of 32."""
        return working_size(height, width, resolution, self.multiple)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        patch = 2 * self.vae_scale_factor
        return height // patch, width // patch

    def target_shape(self, height: int, width: int) -> tuple[int, int]:
        """(tokens, channels) of the target latents of a ``height x width`` pixel image."""
        rows, columns = self._grid(height, width)
        return rows * columns, 4 * self.vae.config.z_dim

    def encode_prompt(self, text: str, image, max_sequence_length: int) -> dict:
        """One instruction's embeddings for one photo (PIL), no batch dimension
        (``max_sequence_length`` is FLUX's: Qwen's pipelines keep every token)."""
        embeds, mask = self.pipe.encode_prompt(prompt=text, image=self._encoder_image(image),
                                               device=self.device)
        if mask is not None:
            embeds = embeds[:, mask[0].bool()]
        return dict(encoder_hidden_states=embeds[0].to(self.dtype))

    def _encoder_image(self, image):
        """What the pipeline's prompt encoder is given for the photo."""
        return image

    def context_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents of photos in [0, 1], [B, 3, H, W] (differentiable)."""
        video = (pixels.to(self.vae_dtype) * 2 - 1)[:, :, None]  # one frame
        latents = self.vae.encode(video).latent_dist.mode()
        mean = self._latents_mean.to(latents.device, latents.dtype)
        std = self._latents_std.to(latents.device, latents.dtype)
        return pack_latents(((latents - mean) / std)[:, :, 0]).to(self.dtype)

    def inputs(self, noise: torch.Tensor, context: torch.Tensor, prompts: list[dict],
               timestep: torch.Tensor, guidance: float, size: tuple[int, int]) -> dict:
        """Keyword inputs of one transformer call: target ``noise`` [B, N, C] and ``context``
        tokens of ``size`` (pixels), one prompt and ``timestep`` (in 0..1, on the device) per
        batch element; prompts of different lengths are padded and masked."""
        device, dtype = self.device, self.dtype
        embeds = [p["encoder_hidden_states"] for p in prompts]
        longest = max(e.shape[0] for e in embeds)
        padded = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[0]))
                              for e in embeds])
        mask = torch.stack([torch.arange(longest, device=device) < e.shape[0] for e in embeds])
        grid = (1, *self._grid(*size))
        return dict(
            hidden_states=torch.cat([noise.to(dtype), context], dim=1),
            encoder_hidden_states=padded,
            encoder_hidden_states_mask=None if mask.all() else mask,
            timestep=timestep,
            img_shapes=[[grid, grid]] * len(prompts),
            guidance=(torch.full((len(prompts),), guidance, device=device)
                      if self.transformer.config.guidance_embeds else None),
            return_dict=False,
        )

    def edit(self, image, prompt: str, size: tuple[int, int], steps: int, guidance: float,
             max_sequence_length: int, generator, output_type: str = "pil"):
        """The pipeline's edit of ``image`` (PIL) at ``size`` (the pipeline feeds the model its
        own ~1 MP copy of the image): ``.images`` of the call (``output_type="latent"``:
        packed latents [1, N, C]). Guided as the model card edits, by true CFG against a blank
        negative prompt at the pipeline's ``true_cfg_scale`` (without a negative prompt the
        pipeline does not guide at all); ``guidance``, FLUX's distilled scale, has no say."""
        h, w = size
        return self.pipe(image=image, prompt=prompt, negative_prompt=" ", height=h, width=w,
                         num_inference_steps=steps, output_type=output_type,
                         generator=generator).images


class QwenEditPlusCalls(QwenEditCalls):
    """:class:`QwenEditCalls` for Qwen-Image-Edit-2509/2511 (``QwenImageEditPlusPipeline``),
    with one input image: its prompt encoder sees the photo as "Picture 1", resized (as the
    pipeline does) to about 384² pixels."""

    def _encoder_image(self, image):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            calculate_dimensions,
        )

        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        return [self.pipe.image_processor.resize(image, height, width)]


def qwen_edit_calls(pipeline) -> QwenEditCalls:
    """The edit-call builder for a Qwen-Image-Edit pipeline (the 2509/2511 one included)."""
    plus = type(pipeline).__name__ == "QwenImageEditPlusPipeline"
    return (QwenEditPlusCalls if plus else QwenEditCalls)(pipeline)
