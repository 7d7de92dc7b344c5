"""FLUX.1 / FLUX.1 Kontext adapter: processors for ``FluxTransformer2DModel`` blocks.

The processor does what diffusers' ``FluxAttnProcessor`` does (projections, QK RMS-norm,
``[text, image]`` concatenation in double blocks, RoPE, output split and projections, dtype casts),
written against the module's public layers, with the attention call replaced by
:func:`ditflow.flow_attention` and RoPE by :func:`ditflow.rotary.apply_rotary` (one kernel where
the attention runs Triton's). Blocks where the intervention asks for nothing run the model's
original processor, untouched.
"""

from __future__ import annotations

import math

import torch

from .._memo import TensorMemo
from ..functional import flow_attention
from ..layout import TokenLayout
from ..rotary import apply_rotary
from ..session import AttentionPlan, BlockId
from .adapter import FlowProcessor, ProcessorAdapter


def _projections(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        enc = (attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
               if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv") else None)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        enc = None
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            enc = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                   attn.add_v_proj(encoder_hidden_states))
    return (q, k, v), enc


class FlowFluxAttnProcessor(FlowProcessor):
    """Processor for one FLUX attention module (double- or single-stream block)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask,
                         image_rotary_emb)

    def _flow(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
              plan: AttentionPlan):
        if attention_mask is not None:
            raise ValueError("ditflow's FLUX processor takes no attention_mask "
                             "(express masks as groups or a pair mask)")
        (q, k, v), enc = _projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if enc is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in enc)
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q, k = apply_rotary(q, image_rotary_emb), apply_rotary(k, image_rotary_emb)
        self._check_length(q.shape[1], plan)
        result = flow_attention(q, k, v, plan.layout.groups(q.device), rules=plan.rules,
                                pair_mask=self.session.pair_mask(self.block, plan, q, k),
                                return_mass=plan.return_mass)
        out = self.session.after_attention(self.block, plan, result).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:  # single-stream block: the block projects the output
            return out
        return self._joint_output(attn, out, encoder_hidden_states.shape[1])


class FluxAdapter(ProcessorAdapter):
    """Installs :class:`FlowFluxAttnProcessor` on every block of a FluxTransformer2DModel."""

    processor = FlowFluxAttnProcessor

    @staticmethod
    def blocks(transformer):
        double = list(transformer.transformer_blocks)
        single = list(transformer.single_transformer_blocks)
        ids = [BlockId("double", i, i) for i in range(len(double))]
        ids += [BlockId("single", i, len(double) + i) for i in range(len(single))]
        return list(zip(ids, double + single, strict=True))

    @staticmethod
    def call_layout(kwargs: dict, memo: TensorMemo) -> TokenLayout:
        """The layout of one transformer call: its text length, then one token per ``img_ids``
        row (context images carry index 1 on the first axis)."""
        text = kwargs["encoder_hidden_states"].shape[1]
        img_ids = kwargs["img_ids"]
        return memo.get((img_ids,), text, lambda: TokenLayout.from_flux_inputs(text, img_ids))


class KontextCalls:
    """Transformer calls of FLUX.1 Kontext edits, built directly for drivers that differentiate
    through the model (DeContext): ``[text | target noise | context photo]``. The prompt
    embeddings depend on the instruction only."""

    prompt_sees_image = False
    # Every instruction embeds to one shape (Step1X-Edit's: padded to 640 tokens, its mask read
    # by the connector as data, not by the attention's layout), so one CUDA graph of a PGD step
    # holds for all of them.
    prompts_share_one_graph = True

    def __init__(self, pipeline):
        self.pipe = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        # Read once: diffusers finds a model's device and dtype by walking its modules (a few
        # milliseconds for FLUX.1's 1279, per read), and the models stay put while in use.
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.vae_dtype = self.vae.dtype
        self.multiple = token_side(self.vae)
        self._ids: dict[tuple[int, int], torch.Tensor] = {}

    def working_size(self, height: int, width: int, resolution: int) -> tuple[int, int]:
        """About ``resolution``² pixels at the photo's aspect ratio, multiples of 16."""
        return working_size(height, width, resolution, self.multiple)

    def target_shape(self, height: int, width: int) -> tuple[int, int]:
        """(tokens, channels) of the target latents of a ``height x width`` pixel image."""
        return (height // self.multiple) * (width // self.multiple), \
            4 * self.vae.config.latent_channels

    def encode_prompt(self, text: str, image, max_sequence_length: int) -> dict:
        """One instruction's embeddings (no batch dimension); ``image`` is not used."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, device=self.device,
            max_sequence_length=max_sequence_length)
        return dict(encoder_hidden_states=embeds[0].to(self.dtype),
                    pooled_projections=pooled[0].to(self.dtype))

    def context_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents of photos in [0, 1], [B, 3, H, W] (differentiable)."""
        latents = encode_image(self.vae, pixels.to(self.vae_dtype))
        return pack_latents(latents).to(self.dtype)

    def inputs(self, noise: torch.Tensor, context: torch.Tensor, prompts: list[dict],
               timestep: torch.Tensor, guidance: float, size: tuple[int, int]) -> dict:
        """Keyword inputs of one transformer call: target ``noise`` [B, N, C] and ``context``
        tokens of ``size`` (pixels), one prompt and ``timestep`` (in 0..1, on the device) per
        batch element."""
        return dict(
            hidden_states=torch.cat([noise.to(self.dtype), context], dim=1),
            timestep=timestep,
            img_ids=self._image_ids(size),
            return_dict=False,
            **self._prompt_inputs(prompts, guidance),
        )

    def _prompt_inputs(self, prompts: list[dict], guidance: float) -> dict:
        """The prompts' part of the inputs: T5 and pooled CLIP embeddings, text ids, and the
        guidance embedding's scale where the model has one."""
        text = prompts[0]["encoder_hidden_states"].shape[0]
        return dict(
            encoder_hidden_states=torch.stack([p["encoder_hidden_states"] for p in prompts]),
            pooled_projections=torch.stack([p["pooled_projections"] for p in prompts]),
            txt_ids=torch.zeros(text, 3, device=self.device, dtype=self.dtype),
            guidance=(torch.full((len(prompts),), guidance, device=self.device)
                      if self.transformer.config.guidance_embeds else None),
        )

    def _image_ids(self, size: tuple[int, int]) -> torch.Tensor:
        """Position ids of the target and the context photo of ``size`` pixels, one tensor per
        size (so layouts and tile plans are cached)."""
        rows, columns = size[0] // self.multiple, size[1] // self.multiple
        if (rows, columns) not in self._ids:
            self._ids[(rows, columns)] = torch.cat([
                image_ids(rows, columns), self._context_ids(rows, columns)]).to(
                self.device, self.dtype)
        return self._ids[(rows, columns)]

    def _context_ids(self, rows: int, columns: int) -> torch.Tensor:
        """The context photo's position ids: FLUX.1 Kontext's index 1 on the first axis."""
        return image_ids(rows, columns, 1)

    @staticmethod
    def size_arguments(height: int, width: int) -> dict:
        """The pipeline-call arguments that edit an image of ``height x width`` at that size:
        without them FLUX.1 Kontext snaps to its preferred resolutions (about 1 MP)."""
        return dict(height=height, width=width, max_area=height * width, _auto_resize=False)

    def edit(self, image, prompt: str, size: tuple[int, int], steps: int, guidance: float,
             max_sequence_length: int, generator, output_type: str = "pil"):
        """The pipeline's edit of ``image`` (PIL, at ``size``: without its auto-resize the
        pipeline encodes the context at the image's own size): ``.images`` of the call
        (``output_type="latent"``: packed latents [1, N, C])."""
        return self.pipe(image=image, prompt=prompt, **self.size_arguments(*size),
                         num_inference_steps=steps, guidance_scale=guidance,
                         output_type=output_type, max_sequence_length=max_sequence_length,
                         generator=generator).images


# -- latents ---------------------------------------------------------------------------------------


def image_ids(height: int, width: int, index: int = 0, device=None, dtype=torch.float32):
    """FLUX position ids [height * width, 3] of one packed latent image; FLUX Kontext gives
    context images ``index`` 1 on the first axis."""
    ids = torch.zeros(height, width, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FLUX's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def working_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(h, w): about ``resolution``² pixels at the aspect ratio of ``height x width``, each a
    multiple of ``multiple`` (FLUX: the VAE factor x the 2x2 packing, 16)."""
    area = resolution**2
    aspect = width / height
    w = max(multiple, round(math.sqrt(area * aspect) / multiple) * multiple)
    h = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
    return h, w


def token_coverage(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each image token's pixels inside each pixel mask: ``[n, H, W]`` (bool or
    float; H, W multiples of the grid) -> float ``[n, rows, columns]``."""
    return torch.nn.functional.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0]


def token_side(vae) -> int:
    """Pixels per image-token side: the VAE's downsampling x FLUX's 2x2 packing (16; for a
    pipeline built without a VAE, FLUX's, as diffusers' pipelines assume)."""
    return 16 if vae is None else 2 ** len(vae.config.block_out_channels)


def token_grid(vae, height: int, width: int, method: str) -> tuple[int, int]:
    """(rows, columns) of the image tokens of a ``height x width`` image; a ValueError naming
    ``method`` where the size is off the token grid."""
    side = token_side(vae)
    if height % side or width % side:
        raise ValueError(f"{method}: height and width must be multiples of {side}, got "
                         f"{height}x{width}")
    return height // side, width // side


def encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1], [B, 3, H, W] -> normalised latents (the mode of the posterior, as
    FluxKontextPipeline encodes its context image)."""
    latents = vae.encode(pixels * 2 - 1).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor
