"""Step1X-Edit: its transformer, pipeline and adapter (Step1X-Edit is not in diffusers).

Step1X-Edit's diffusion transformer is FLUX.1's architecture (19 double- and 38 single-stream
blocks, 24 heads x 128, RoPE axes (16, 56, 56)) without a guidance embedding, fed by a
*connector* instead of T5 and CLIP: the last hidden states of Qwen2.5-VL-7B (which reads the
instruction together with the photo) go through a two-block token refiner (HunyuanVideo's) to
become the 640 text tokens, and their masked mean, projected, replaces CLIP's pooled vector.
:class:`Step1XEditTransformer` is therefore diffusers' ``FluxTransformer2DModel`` plus
diffusers' ``HunyuanVideoTokenRefiner``; ditflow's FLUX processors serve its attention blocks,
so every intervention that runs on FLUX.1 Kontext runs on Step1X-Edit.

The joint sequence is ``[text 640 | target | reference]``. Text padding is not masked in the
transformer (the authors' model attends to all 640 text tokens). Two releases: v1.0 gives the
reference image the target's own position ids and scales the connector's pooled vector by a
learned factor; v1.1 adds 1 to every axis of the reference's ids and has no such factor. The
layout is read from where the image ids start over: a new first-axis index, or the target's
first position again.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTokenRefiner
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .._memo import TensorMemo
from ..layout import TokenLayout
from .adapter import ProcessorAdapter
from .flux import (
    FlowFluxAttnProcessor,
    FluxAdapter,
    KontextCalls,
    encode_image,
    image_ids,
    pack_latents,
    token_side,
)

VERSIONS = ("v1.0", "v1.1")
# What Step1X-Edit's embedder puts before the photo and the instruction (the model was trained
# on hidden states of this chat; the embedding keeps what follows its first 217 tokens).
QWEN_PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual '
    'descriptions suitable for image generation. Evaluate the level of detail in the user '
    'prompt:\n- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, '
    'textures, and spatial relationships to create vivid and concrete scenes.\n- If the prompt '
    'is already detailed, refine and enhance the existing details slightly without '
    'overcomplicating.\n\nHere are examples of how to transform or refine prompts:\n- User '
    'Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, '
    'sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red '
    'flowers.\n- User Prompt: A busy city street -> Enhanced: A bustling city street scene at '
    'dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and '
    'a double-decker bus passing by towering glass skyscrapers.\n\nPlease generate only the '
    'enhanced description for the prompt below and avoid including any additional commentary '
    'or evaluations:\nUser Prompt:')
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{prefix}"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n")
# Qwen2.5-VL's image size range in Step1X-Edit's embedder (pixels).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 256 * 28 * 28, 324 * 28 * 28
# Past this character of the chat, Step1X-Edit's embedder tokenizes quoted text per character.
QUOTES_FROM = 155


def chat_pieces(chat: str) -> list[str]:
    """How Step1X-Edit's embedder splits the chat before tokenizing what follows the photo:
    curly quotes and apostrophes become straight double quotes; past character
    :data:`QUOTES_FROM` every character between two quotes is a piece of its own, wrapped in
    curly quotes (which tokenizing then strips); the rest stays whole (an opening quote ends
    the piece before it, a closing quote starts the next)."""
    chat = chat.replace("\u201c", '"').replace("\u201d", '"').replace("'", '"')
    pieces, current, quoted = [], "", False
    for i, char in enumerate(chat):
        if char == '"' and i > QUOTES_FROM:
            current += char
            if not quoted:
                pieces.append(current)
                current = ""
            quoted = not quoted
        elif quoted:
            pieces.append(f"\u201c{char}\u201d")
        else:
            current += char
    return [*pieces, current] if current else pieces


class Step1XConnector(torch.nn.Module):
    """Qwen2.5-VL hidden states [B, L, in_channels] -> (text tokens [B, L, heads x head_dim],
    pooled vector [B, pooled_dim]). The pooled vector is the masked mean of the hidden states,
    projected; with ``pool_scale`` (v1.0) the mean is first scaled by ``1 + pool_scale``, a
    learned scalar (initialised as the authors' to -0.91)."""

    def __init__(self, in_channels: int, num_attention_heads: int, attention_head_dim: int,
                 num_layers: int, pooled_dim: int, pool_scale: bool):
        super().__init__()
        self.refiner = HunyuanVideoTokenRefiner(in_channels, num_attention_heads,
                                                attention_head_dim, num_layers)
        self.pool = torch.nn.Linear(in_channels, pooled_dim)
        self.pool_scale = torch.nn.Parameter(torch.full((1,), -0.91)) if pool_scale else None

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, timestep: torch.Tensor):
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        mean = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)
        if self.pool_scale is not None:
            mean = mean * (1 + self.pool_scale.to(hidden_states.dtype))
        pooled = self.pool(mean)
        # the refiner embeds the timestep in the model's 0..1000 units
        return self.refiner(hidden_states, timestep * 1000, mask), pooled


class Step1XEditTransformer(ModelMixin, ConfigMixin):
    """Step1X-Edit's transformer: :class:`Step1XConnector` then a ``FluxTransformer2DModel``
    (``dit``) without guidance embedding. Defaults are the released model's sizes.

    ``version``: ``"v1.0"`` or ``"v1.1"`` (see the module doc).
    """

    _supports_gradient_checkpointing = True
    # diffusers' regional compilation (compile_repeated_blocks): the FLUX part's blocks
    _repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    @register_to_config
    def __init__(self, in_channels: int = 64, num_layers: int = 19, num_single_layers: int = 38,
                 attention_head_dim: int = 128, num_attention_heads: int = 24,
                 axes_dims_rope: tuple[int, ...] = (16, 56, 56), llm_channels: int = 3584,
                 connector_heads: int = 32, connector_head_dim: int = 128,
                 connector_layers: int = 2, pooled_dim: int = 768, version: str = "v1.0"):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"version={version!r}: expected one of {', '.join(VERSIONS)}")
        self.connector = Step1XConnector(llm_channels, connector_heads, connector_head_dim,
                                         connector_layers, pooled_dim,
                                         pool_scale=version == "v1.0")
        self.dit = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=connector_heads * connector_head_dim,
            pooled_projection_dim=pooled_dim, guidance_embeds=False,
            axes_dims_rope=tuple(axes_dims_rope))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor | None = None,
                return_dict: bool = False):
        """``hidden_states``: packed ``[target | reference]`` latents [B, N, in_channels];
        ``encoder_hidden_states``: Qwen2.5-VL hidden states [B, L, llm_channels] with their
        ``encoder_attention_mask`` [B, L]; ``timestep`` in 0..1 [B]; ``img_ids`` [N, 3]. Returns
        the velocity of every image token (FLUX's output)."""
        text, pooled = self.connector(encoder_hidden_states, encoder_attention_mask, timestep)
        if txt_ids is None:
            txt_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=img_ids.dtype)
        return self.dit(hidden_states=hidden_states, encoder_hidden_states=text,
                        pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                        txt_ids=txt_ids, return_dict=return_dict)


def reference_ids(rows: int, columns: int, version: str) -> torch.Tensor:
    """Position ids of a ``rows x columns`` reference image: v1.0 repeats the target's, v1.1
    adds 1 on every axis."""
    ids = image_ids(rows, columns)
    return ids if version == "v1.0" else ids + 1


def step1x_layout(text_len: int, img_ids: torch.Tensor) -> TokenLayout:
    """``[text | target | reference...]``: the target is the first image, which ends where the
    image ids start over (another first-axis index, or the target's first position again)."""
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    ids = img_ids.detach().cpu()
    first = ids[0]
    starts = ((ids[1:, 0] != first[0]) | (ids[1:, 1:] == first[1:]).all(dim=1)).nonzero()
    target = int(starts[0]) + 1 if len(starts) else ids.shape[0]
    return TokenLayout.from_segments(text_len, target, ids.shape[0] - target)


class Step1XAdapter(ProcessorAdapter):
    """ditflow's FLUX processors on the transformer's ``dit``; layouts from the Step1X call."""

    processor = FlowFluxAttnProcessor

    @staticmethod
    def blocks(transformer):
        return FluxAdapter.blocks(transformer.dit)

    @staticmethod
    def call_layout(kwargs: dict, memo: TensorMemo) -> TokenLayout:
        text = kwargs["encoder_hidden_states"].shape[1]
        img_ids = kwargs["img_ids"]
        return memo.get((img_ids,), text, lambda: step1x_layout(text, img_ids))


# -- the authors' checkpoint -----------------------------------------------------------------------

_REFINER_BLOCK = {"norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0",
                  "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                  "adaLN_modulation.1": "norm_out.linear"}
_REFINER = {"input_embedder": "proj_in",
            "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
            "c_embedder.linear_1": "time_text_embed.text_embedder.linear_1",
            "c_embedder.linear_2": "time_text_embed.text_embedder.linear_2"}


def _connector_key(key: str) -> list[str]:
    """The names of one parameter of the authors' connector (``S.…``: the token refiner,
    ``global_proj_out``, ``scale_factor``) in :class:`Step1XConnector`; a fused qkv
    projection becomes three."""
    simple = {"global_proj_out.weight": "pool.weight", "global_proj_out.bias": "pool.bias",
              "scale_factor": "pool_scale"}
    if key in simple:
        return [simple[key]]
    module, _, kind = key.rpartition(".")
    if module.startswith("S.individual_token_refiner.blocks."):
        index, _, layer = module.removeprefix("S.individual_token_refiner.blocks.").partition(".")
        block = f"refiner.token_refiner.refiner_blocks.{index}"
        if layer == "self_attn_qkv":
            return [f"{block}.attn.to_{p}.{kind}" for p in "qkv"]
        if layer in _REFINER_BLOCK:
            return [f"{block}.{_REFINER_BLOCK[layer]}.{kind}"]
    elif module.removeprefix("S.") in _REFINER:
        return [f"refiner.{_REFINER[module.removeprefix('S.')]}.{kind}"]
    raise ValueError(f"unexpected connector parameter {key!r} (a Step1X-Edit variant ditflow "
                     "does not know?)")


def convert_step1x_checkpoint(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' Step1X-Edit checkpoint (FLUX.1's original parameter names plus
    ``connector.*``) in :class:`Step1XEditTransformer`'s names. The FLUX part goes through
    diffusers' own FLUX.1 conversion (written for the released width, 3072)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    flux, converted = {}, {}
    for key, value in checkpoint.items():
        if not key.startswith("connector."):
            flux[key] = value
            continue
        names = _connector_key(key.removeprefix("connector."))
        for name, part in zip(names, value.chunk(len(names)), strict=True):
            converted[f"connector.{name}"] = part
    if flux:
        for key, value in convert_flux_transformer_checkpoint_to_diffusers(flux).items():
            converted[f"dit.{key}"] = value
    return converted


# -- pipeline --------------------------------------------------------------------------------------


def step1x_size(height: int, width: int, size_level: int, multiple: int = 16
                ) -> tuple[int, int]:
    """(h, w) Step1X-Edit edits a ``height x width`` photo at: about ``size_level``² pixels at
    its aspect ratio, rounded up, then down to multiples of ``multiple`` (the authors'
    snapping)."""
    aspect = width / height
    if width > height:
        w = math.ceil(math.sqrt(size_level**2 * aspect))
        h = math.ceil(w / aspect)
    else:
        h = math.ceil(math.sqrt(size_level**2 / aspect))
        w = math.ceil(h * aspect)
    return max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)


def shifted_timesteps(steps: int, image_tokens: int) -> torch.Tensor:
    """FLUX.1's schedule: ``steps + 1`` times from 1 to 0, shifted towards 1 by an amount
    linear in the image's token count (0.5 at 256 tokens, 1.15 at 4096)."""
    mu = 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float, damped: bool
                    ) -> torch.Tensor:
    """Classifier-free guidance; ``damped``: each token's guidance ``cond - uncond`` divided by
    its norm to the power 0.4 where that norm exceeds 1 (the authors' early steps)."""
    guidance = cond - uncond
    if damped:
        guidance = guidance / guidance.norm(dim=-1, keepdim=True).clamp(min=1) ** 0.4
    return uncond + scale * guidance


class Step1XEditPipeline(DiffusionPipeline):
    """Edits a photo with Step1X-Edit, as the authors' inference does: the photo resized to
    about ``size_level``² pixels, Qwen2.5-VL embeddings of instruction and photo (the first
    ``template_tokens`` hidden states dropped, at most ``max_text_tokens`` kept, zero-padded),
    FLUX.1's shifted schedule, classifier-free guidance against ``negative_prompt`` (while
    t > ``rescale_above``, the guidance of each token is divided by its norm to the power 0.4
    where that norm exceeds 1; 0.93 in the authors' current code, 1.0 = never, as in their
    first release), the edit resized back to the photo's size.

    The instruction is tokenized as the authors' embedder tokenizes it (:func:`chat_pieces`;
    token id 0 masked, as theirs does); the reference image is encoded with the mode of the
    VAE posterior (the authors sample it).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer: Step1XEditTransformer, vae, text_encoder, processor,
                 template_tokens: int = 217, max_text_tokens: int = 640):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder,
                              processor=processor)
        self.register_to_config(template_tokens=template_tokens, max_text_tokens=max_text_tokens)

    @property
    def multiple(self) -> int:
        """Pixels per image token side: the VAE factor times FLUX's 2x2 packing."""
        return token_side(self.vae)

    def encode_prompt(self, prompts: list[str], images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, max_text_tokens, C], mask [B, max_text_tokens]) of each
        instruction read together with its photo (PIL)."""
        device = self._execution_device
        total, start = self.config.max_text_tokens, self.config.template_tokens
        width = self.text_encoder.config.text_config.hidden_size
        embeds = torch.zeros(len(prompts), total, width, device=device,
                             dtype=self.transformer.dtype)
        mask = torch.zeros(len(prompts), total, device=device, dtype=torch.long)
        for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            chat = CHAT.format(prefix=QWEN_PREFIX, instruction=prompt)
            inputs = self.processor(text=[chat], images=[image], padding=True,
                                    return_tensors="pt")
            ids = self._token_ids(chat, inputs["input_ids"][0])
            # the authors' embedder masks token id 0 ("!" in Qwen's vocabulary)
            inputs.update(input_ids=ids[None], attention_mask=(ids > 0).long()[None])
            hidden = self.text_encoder(**inputs.to(device),
                                       output_hidden_states=True).hidden_states[-1]
            kept = hidden[0, start:start + total]
            embeds[i, : kept.shape[0]] = kept.to(embeds.dtype)
            mask[i, : kept.shape[0]] = 1
        return embeds, mask

    def _token_ids(self, chat: str, ids: torch.Tensor) -> torch.Tensor:
        """The processor's token ids of ``chat`` (image pads expanded) up to the photo's end
        marker, then the authors' tokenization of the rest (:func:`chat_pieces`)."""
        tokenizer = self.processor.tokenizer
        opening, closing = (tokenizer(q).input_ids for q in ("\u201c", "\u201d"))
        retokenized = []
        for piece in chat_pieces(chat):
            tokens = tokenizer(piece).input_ids
            if tokens[: len(opening)] == opening and tokens[-len(closing):] == closing:
                tokens = tokens[len(opening): -len(closing)]
            retokenized += tokens
        end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        cut = int((ids == end).nonzero()[0])
        return torch.cat([ids[:cut], torch.tensor(retokenized[retokenized.index(end):])])

    @torch.no_grad()
    def __call__(self, image, prompt: str, negative_prompt: str = "",
                 num_inference_steps: int = 28, guidance_scale: float = 6.0,
                 size_level: int = 512, height: int | None = None, width: int | None = None,
                 rescale_above: float = 0.93, generator: torch.Generator | None = None,
                 output_type: str = "pil"):
        """Edit ``image`` (PIL) by ``prompt``. ``height`` and ``width`` (both, multiples of
        :attr:`multiple`, 16) replace the ``size_level`` snapping. ``output_type``: ``"pil"``
        (at the photo's own size), ``"pt"`` ([1, 3, h, w] in [0, 1] at the working size),
        ``"np"`` (the same as [1, h, w, 3]) or ``"latent"`` (packed [1, N, C])."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        device, dtype = self._execution_device, self.transformer.dtype
        if (height is None) != (width is None):
            raise ValueError(f"height={height}, width={width}: give both or neither (the "
                             "size_level snapping)")
        if height is None:
            height, width = step1x_size(image.height, image.width, size_level, self.multiple)
        if height % self.multiple or width % self.multiple:
            raise ValueError(f"height={height}, width={width}: expected multiples of "
                             f"{self.multiple}")
        photo = image.convert("RGB").resize((width, height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)
        pixels = (pixels.float() / 255)[None].to(device)
        reference = pack_latents(encode_image(self.vae, pixels.to(self.vae.dtype))).to(dtype)
        channels = self.vae.config.latent_channels
        rows, columns = height // self.multiple, width // self.multiple
        noise = randn_tensor((1, channels, 2 * rows, 2 * columns), generator=generator,
                             device=device, dtype=dtype)
        latents = pack_latents(noise)
        guided = guidance_scale > 1
        prompts = [prompt, negative_prompt] if guided else [prompt]
        embeds, mask = self.encode_prompt(prompts, [photo] * len(prompts))
        ids = torch.cat([image_ids(rows, columns), reference_ids(
            rows, columns, self.transformer.config.version)]).to(device, dtype)
        times = shifted_timesteps(num_inference_steps, rows * columns).tolist()
        with self.progress_bar(total=num_inference_steps) as progress:
            for t, t_next in itertools.pairwise(times):
                batch = len(prompts)
                tokens = torch.cat([latents, reference], dim=1).expand(batch, -1, -1)
                velocity = self.transformer(
                    hidden_states=tokens, encoder_hidden_states=embeds,
                    encoder_attention_mask=mask,
                    timestep=torch.full((batch,), t, device=device, dtype=dtype), img_ids=ids,
                    return_dict=False)[0][:, : latents.shape[1]]
                if guided:
                    velocity = guided_velocity(*velocity.float().chunk(2), guidance_scale,
                                               damped=t > rescale_above)
                latents = (latents.float() + (t_next - t) * velocity.float()).to(dtype)
                progress.update()
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        edited = self._decode(latents, rows, columns)
        if output_type == "pt":
            return ImagePipelineOutput(images=edited)
        if output_type == "np":
            return ImagePipelineOutput(images=edited.permute(0, 2, 3, 1).cpu().numpy())
        array = edited[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
        return ImagePipelineOutput(images=[Image.fromarray(array).resize(image.size)])

    def _decode(self, latents: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """Packed latents -> pixels [1, 3, h, w] in [0, 1]."""
        b, _, features = latents.shape
        channels = features // 4
        grid = latents.view(b, rows, columns, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        grid = grid.reshape(b, channels, 2 * rows, 2 * columns).to(self.vae.dtype)
        config = self.vae.config
        decoded = self.vae.decode(grid / config.scaling_factor + config.shift_factor).sample
        return (decoded.float().clamp(-1, 1) + 1) / 2


# -- direct calls for DeContext --------------------------------------------------------------------


class Step1XEditCalls(KontextCalls):
    """Transformer calls of Step1X-Edit edits, built directly for drivers that differentiate
    through the model (DeContext): ``[text 640 | target noise | reference photo]``. The prompt
    embeddings come from Qwen2.5-VL, which sees the photo too: they are computed from the clean
    photo (no gradient flows through the 7B encoder). ``pipeline``: a
    :class:`Step1XEditPipeline`, or anything with its ``transformer``, ``vae`` and
    ``encode_prompt``."""

    prompt_sees_image = True

    def _context_ids(self, rows: int, columns: int) -> torch.Tensor:
        return reference_ids(rows, columns, self.transformer.config.version)

    def working_size(self, height: int, width: int, resolution: int) -> tuple[int, int]:
        """The size the pipeline edits a ``height x width`` photo at with ``size_level =
        resolution``."""
        return step1x_size(height, width, resolution, self.multiple)

    def encode_prompt(self, text: str, image, max_sequence_length: int) -> dict:
        """One instruction's embeddings for one photo (PIL), no batch dimension (Step1X-Edit
        always uses its own 640 text tokens; ``max_sequence_length`` is FLUX's)."""
        embeds, mask = self.pipe.encode_prompt([text], [image])
        return dict(encoder_hidden_states=embeds[0], encoder_attention_mask=mask[0])

    def _prompt_inputs(self, prompts: list[dict], guidance: float) -> dict:
        """Qwen2.5-VL embeddings and their mask (Step1X-Edit has no guidance embedding)."""
        return dict(
            encoder_hidden_states=torch.stack([p["encoder_hidden_states"] for p in prompts]),
            encoder_attention_mask=torch.stack([p["encoder_attention_mask"] for p in prompts]),
        )

    @staticmethod
    def size_arguments(height: int, width: int) -> dict:
        """The pipeline-call arguments that edit at ``height x width`` exactly."""
        return dict(height=height, width=width)

    def edit(self, image, prompt: str, size: tuple[int, int], steps: int, guidance: float,
             max_sequence_length: int, generator, output_type: str = "pil"):
        """The pipeline's edit of ``image`` (PIL) at ``size`` with its own guidance scale
        (``guidance`` is FLUX's embedding): ``.images`` of the call."""
        return self.pipe(image=image, prompt=prompt, **self.size_arguments(*size),
                         num_inference_steps=steps, generator=generator,
                         output_type=output_type).images
