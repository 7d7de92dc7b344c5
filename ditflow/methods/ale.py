"""ALE: attribute-leakage-free multi-object editing, on in-context editors (FLUX.1 Kontext).

Editing several objects at once ("make the car blue and the bike yellow") leaks attributes: the
bike turns a little blue, the wall behind the car changes. ALE (published on a Stable Diffusion
U-Net) closes the three paths; ditflow brings it to MM-DiT editors. Per object, the user gives
its phrase in the instruction and a mask of where it is in the source image; then

1. **object-restricted embeddings (ORE)**: each phrase is encoded by T5 on its own and those
   embeddings replace the phrase's tokens in the instruction's embedding (T5 mixes the whole
   instruction into every token, so in context "the bike" also carries "blue"); the phrase's
   own end-of-sequence and padding tokens are appended to the text, and an object's region
   reads those instead of the instruction's (which carry every object's attributes: FLUX runs
   T5 without a padding mask);
2. **region-guided attention masking (RGB-CAM)**: an object's text tokens are attended only by
   image tokens inside the object's region (its mask dilated by ``dilation`` x the image's
   longer side) on the target and on the context image; elsewhere the pair is blocked. With ORE
   this is the MM-DiT form of the paper's per-region blending of each object's own
   cross-attention: a region's image tokens read its object's embeddings and no other object's;
3. **background blending**: after every denoising step, target tokens outside the union of the
   regions are reset to the source image's latents noised to the step's level with the
   generation's own noise, ``(1 - sigma) z_src + sigma * noise``, so the last step (sigma 0)
   leaves the source latents there exactly.

The edit runs at a working resolution (about ``resolution``² pixels at the source's aspect
ratio, multiples of 16 on FLUX) and returns the edited image at that size. Masks are the user's
(the authors use Grounded-SAM, which needs weights ditflow never downloads); a token several
regions claim goes to the object whose own mask covers most of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..io import pixels_tensor, resize_pixels
from ..layout import BASE_GROUPS, CONTEXT, TARGET, TokenLayout
from ..models.flux import (
    encode_image,
    pack_latents,
    token_coverage,
    token_side,
    working_size,
)
from ..rules import MAX_GROUPS, FlowRules
from ..session import Intervention, attach
from .calls import check_one_image_call
from .phrases import phrase_token_positions

# a text, target and context group per object, and the instruction's end-of-sequence tokens
MAX_OBJECTS = (MAX_GROUPS - len(BASE_GROUPS) - 1) // 3


@dataclass(frozen=True)
class ALEConfig:
    """ALE's region dilation (the authors' ~4% of the image size) and switches for its three
    parts (the paper's ablations)."""

    dilation: float = 0.04
    restrict_embeddings: bool = True
    mask_attention: bool = True
    blend_background: bool = True

    def __post_init__(self):
        if not 0 <= self.dilation < 1:
            raise ValueError(f"ALEConfig: dilation={self.dilation} must be in [0, 1) (a "
                             "fraction of the image's longer side)")


def object_regions(masks: torch.Tensor, grid: tuple[int, int], dilation: float) -> torch.Tensor:
    """Object regions on the image-token grid from pixel masks ``[n, H, W]`` (H, W multiples
    of the grid): each mask dilated by ``round(dilation * max(H, W))`` pixels (square window);
    a token belongs to a region when any of its pixels does; a token several regions claim goes
    to the object whose undilated mask covers most of it (dilated coverage breaks ties).
    bool [n, rows, columns]."""
    masks = masks.float()
    radius = round(dilation * max(masks.shape[-2:]))
    dilated = F.max_pool2d(masks[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] \
        if radius else masks
    inside, near = token_coverage(masks, grid), token_coverage(dilated, grid)
    # coverage steps are >= 1/1024 (tokens up to 32x32 pixels), so x1000 ranks inside first
    owner = (inside * 1000 + near).argmax(0)
    return (near > 0) & (owner == torch.arange(len(masks))[:, None, None])


@dataclass
class ObjectEmbeddings:
    """The instruction's text conditioning with object-restricted embeddings.

    ``embeds`` [1, L + n * tail, D]: the T5 embeddings of the instruction (L tokens), each
    phrase's tokens replaced by the phrase encoded alone, then per object the end-of-sequence
    and padding tokens of that encoding (``tail`` = the instruction's own count of them).
    ``phrase_tokens``: per object, its phrase's token positions; ``object_tails``: per object,
    the positions of its appended tokens; ``prompt_tail``: the instruction's end-of-sequence and
    padding positions, for no object's region. Unrestricted: the plain embeddings and no
    tails."""

    embeds: torch.Tensor
    pooled: torch.Tensor  # the pooled CLIP embedding [1, D], of the whole instruction
    phrase_tokens: list[list[int]]
    object_tails: list[list[int]] | None = None
    prompt_tail: list[int] | None = None


def restricted_embeddings(pipeline, prompt: str, phrases: Sequence[str],
                          max_sequence_length: int, restrict: bool = True) -> ObjectEmbeddings:
    """The text conditioning of ``prompt`` for objects named by ``phrases`` (see
    :class:`ObjectEmbeddings`)."""
    device = pipeline._execution_device  # the transformer's device, also under CPU offload
    with torch.no_grad():
        embeds, pooled, _ = pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                   max_sequence_length=max_sequence_length)
    tokenizer = pipeline.tokenizer_2
    positions = phrase_token_positions(tokenizer, prompt, phrases, max_sequence_length)
    if not restrict:
        return ObjectEmbeddings(embeds, pooled, positions)
    ids = tokenizer(prompt, max_length=max_sequence_length, truncation=True)["input_ids"]
    prompt_tail = list(range(len(ids) - 1, embeds.shape[1]))  # end of sequence, padding
    tails, object_tails = [], []
    for phrase, tokens in zip(phrases, positions, strict=True):
        alone_ids = tokenizer(phrase)["input_ids"][:len(tokens)]
        if alone_ids != [ids[t] for t in tokens]:
            raise ValueError(f"ALE: the phrase {phrase!r} tokenizes differently on its own than "
                             "inside the prompt; give whole words")
        with torch.no_grad():
            alone = pipeline.encode_prompt(prompt=phrase, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)[0]
        embeds[:, tokens] = alone[:, :len(tokens)]
        start = embeds.shape[1] + len(prompt_tail) * len(tails)
        tails.append(alone[:, len(tokens):len(tokens) + len(prompt_tail)])
        object_tails.append(list(range(start, start + len(prompt_tail))))
    return ObjectEmbeddings(torch.cat([embeds, *tails], dim=1), pooled, positions, object_tails,
                            prompt_tail)


class ALE(Intervention):
    """ALE's attention restrictions as an intervention: object ``i``'s text tokens
    (``object_tokens[i]``: RGB-CAM's phrase tokens, ORE's appended end-of-sequence tokens) are
    attended only by image tokens of region ``i`` (``regions[i]``, bool [rows, columns] on the
    token grid), on the target and on the one context image, in every block and step; the
    ``prompt_tail`` tokens (ORE: the instruction's end-of-sequence and padding) by no region's.
    :func:`edit` attaches it; attach it yourself (``ditflow.session.attach``) around a
    FluxKontextPipeline call to combine it with other inputs."""

    def __init__(self, object_tokens: Sequence[Sequence[int]], regions: torch.Tensor,
                 prompt_tail: Sequence[int] | None = None):
        if not 1 <= len(object_tokens) <= MAX_OBJECTS or len(object_tokens) != len(regions):
            raise ValueError(f"ALE: 1..{MAX_OBJECTS} objects, each with token positions and a "
                             f"region; got {len(object_tokens)} and {len(regions)}")
        self.object_tokens = [torch.as_tensor(list(t), dtype=torch.long) for t in object_tokens]
        self.regions = regions.detach().cpu().bool()
        self.prompt_tail = None if prompt_tail is None else torch.as_tensor(list(prompt_tail),
                                                                             dtype=torch.long)
        self._plan_for: TokenLayout | None = None
        self._plan: tuple[TokenLayout, FlowRules] | None = None

    def layout(self, step, block, layout):
        if layout is not self._plan_for:
            self._plan_for, self._plan = layout, self._build(layout)
        return self._plan[0]

    def rules(self, step, block, layout):
        return self._plan[1]

    def _build(self, base: TokenLayout) -> tuple[TokenLayout, FlowRules]:
        """Groups ``object{i}.text``, ``object{i}.target``, ``object{i}.context`` (and
        ``prompt.tail``); each object's text blocked from every image group but its own two, the
        prompt's tail from every object's."""
        rows, columns = self.regions.shape[1:]
        target, context = (base.mask(name).nonzero().squeeze(1) for name in ("target", "context"))
        if len(target) != rows * columns or len(context) != rows * columns:
            raise ValueError(f"ALE: {len(target)} target and {len(context)} context tokens, but "
                             f"the regions are {rows}x{columns}; edit one source image with a "
                             "target of its size")
        layout = base
        tokens_wanted = max(int(t.max()) for t in self.object_tokens)
        if tokens_wanted >= base.text_len:
            raise ValueError(f"ALE: object text token {tokens_wanted}, but the text has "
                             f"{base.text_len} tokens; pass the embeddings of "
                             "restricted_embeddings to the pipeline")
        if self.prompt_tail is not None:
            layout = layout.with_region("prompt.tail", self.prompt_tail)
        for i, (tokens, region) in enumerate(zip(self.object_tokens, self.regions, strict=True)):
            inside = region.flatten()
            layout = layout.with_region(f"object{i}.text", tokens)
            layout = layout.with_region(f"object{i}.target", target[inside])
            layout = layout.with_region(f"object{i}.context", context[inside])
        image = [TARGET, CONTEXT] + [layout.group(f"object{i}.{part}")
                                     for i in range(len(self.regions))
                                     for part in ("target", "context")]
        rules = layout.rules()
        for i in range(len(self.regions)):
            own = {layout.group(f"object{i}.target"), layout.group(f"object{i}.context")}
            rules = rules.block([g for g in image if g not in own], layout.group(f"object{i}.text"))
        if self.prompt_tail is not None:
            rules = rules.block(image[2:], layout.group("prompt.tail"))
        return layout, rules


def _as_masks(masks, phrases: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
    """Per object a mask [H, W] (bool or numbers, nonzero = inside) -> bool [n, H, W]."""
    out = []
    for phrase, mask in zip(phrases, masks, strict=True):
        mask = torch.as_tensor(np.asarray(mask)) != 0
        if tuple(mask.shape) != size:
            raise ValueError(f"ALE: the mask of {phrase!r} is {tuple(mask.shape)}, the image is "
                             f"{size}; give masks at the image's size")
        if not mask.any():
            raise ValueError(f"ALE: the mask of {phrase!r} is empty")
        out.append(mask)
    return torch.stack(out)


def _background_blending(source: torch.Tensor, noise: torch.Tensor, edited: torch.Tensor
                         ) -> dict:
    """The call arguments of background blending: after every step, the target tokens outside
    the regions (``edited`` False, [N]) become the packed ``source`` latents [1, N, C] noised to
    the next step's level with the generation's own ``noise``."""
    inside = edited[None, :, None]

    def blend(pipe, i, t, tensors):
        sigma = float(pipe.scheduler.sigmas[i + 1])
        background = (1 - sigma) * source + sigma * noise
        return {"latents": torch.where(inside, tensors["latents"], background)}

    return dict(callback_on_step_end=blend, callback_on_step_end_tensor_inputs=["latents"])


def edit(pipeline, image, prompt: str, phrases: Sequence[str], masks, *,
         resolution: int = 1024, config: ALEConfig = ALEConfig(),
         max_sequence_length: int = 512, generator: torch.Generator | None = None,
         **call_kwargs):
    """One FluxKontextPipeline edit of ``image`` with ALE: ``(images, regions)``, the pipeline's
    images (at the working resolution, see the module doc) and the object regions (bool
    [n, rows, columns] on the token grid).

    Args:
        image: the source: PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1].
        prompt: the instruction, e.g. "make the red car blue and the bike yellow".
        phrases: per object, its phrase in ``prompt`` ("the red car blue"), whole words.
        masks: per object, where it is in ``image`` ([H, W], nonzero = inside).
        call_kwargs: more FluxKontextPipeline arguments (``num_inference_steps``,
            ``guidance_scale``, ``output_type``...); not the size (``height``, ``width``,
            ``max_area``: set from ``resolution``), nor a step-end callback while blending
            the background (the blending is one).
    """
    from diffusers import FluxKontextPipeline
    from diffusers.utils.torch_utils import randn_tensor

    if not isinstance(pipeline, FluxKontextPipeline):
        raise TypeError(f"ALE: expected a FluxKontextPipeline, got {type(pipeline).__name__}")
    if len(phrases) != len(masks):
        raise ValueError(f"ALE: {len(phrases)} phrases but {len(masks)} masks")
    if not 1 <= len(phrases) <= MAX_OBJECTS:
        raise ValueError(f"ALE: 1..{MAX_OBJECTS} objects, got {len(phrases)}")
    blending = ("callback_on_step_end", "callback_on_step_end_tensor_inputs")
    check_one_image_call("ALE", call_kwargs, sized=True,
                         own=("prompt_embeds", "pooled_prompt_embeds", "latents",
                              *(blending if config.blend_background else ())))
    pixels = pixels_tensor(image)
    object_masks = _as_masks(masks, phrases, tuple(pixels.shape[1:]))
    patch = token_side(pipeline.vae)
    height, width = working_size(*pixels.shape[1:], resolution, patch)
    if (height, width) != tuple(pixels.shape[1:]):
        pixels = resize_pixels(pixels, (height, width))
        object_masks = F.interpolate(object_masks[:, None].float(), (height, width),
                                     mode="nearest-exact")[:, 0] > 0.5
    grid = (height // patch, width // patch)
    regions = object_regions(object_masks, grid, config.dilation)

    text = restricted_embeddings(pipeline, prompt, phrases, max_sequence_length,
                                 config.restrict_embeddings)
    device, dtype = text.embeds.device, text.embeds.dtype
    with torch.no_grad():
        source = encode_image(pipeline.vae, pixels[None].to(device, pipeline.vae.dtype))
    noise = pack_latents(randn_tensor(source.shape, generator=generator, device=device,
                                      dtype=dtype))
    call = dict(image=source.to(dtype), prompt_embeds=text.embeds, pooled_prompt_embeds=text.pooled,
                height=height, width=width, max_area=height * width, latents=noise,
                generator=generator, max_sequence_length=max_sequence_length, **call_kwargs)
    if config.blend_background:
        call.update(_background_blending(pack_latents(source.to(dtype)), noise,
                                         regions.any(0).flatten().to(device)))
    # RGB-CAM restricts the phrases to their regions, ORE the objects' own end-of-sequence tokens
    object_tails = text.object_tails or [[] for _ in phrases]
    object_tokens = [(phrase if config.mask_attention else []) + tail
                     for phrase, tail in zip(text.phrase_tokens, object_tails, strict=True)]
    if not any(object_tokens):
        return pipeline(**call).images, regions
    with attach(pipeline, ALE(object_tokens, regions, text.prompt_tail)):
        return pipeline(**call).images, regions
