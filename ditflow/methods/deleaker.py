"""DeLeaker: semantic-leakage mitigation by attention reweighting, at inference time (T2I).

"A cow and a horse" can give the horse cow patches: attributes of one entity leak into
another's image region through attention. Given the prompt's entity phrases, DeLeaker

1. **finds each entity's image region** from the model's own attention: for every image token,
   the mass its attention puts on the entity's text tokens (head mean, divided by the entity's
   token count), averaged over every block of the first ``mask_steps`` denoising steps from
   the ``record_from``-th block call on; the
   region is where that average exceeds ``mean + mask_threshold * std`` over the image tokens,
   opened once and closed twice with a 3x3 window on the token grid, the grid's border eroding
   nothing (a token claimed by several entities goes to the one whose threshold it exceeds
   most, in standard deviations);
2. **reweights attention** from the ``start_block``-th block call on (calls counted over the
   whole generation, ``blocks_per_step`` per step: 57 on FLUX.1), for every pair of entities
   (i, j), i != j: image tokens of i never attend to text tokens of j; their logits on their own
   text tokens are multiplied by ``alpha`` once per pair (``alpha ** (E - 1)`` with E entities,
   as the authors' loop over pairs compounds it; one entity: no edit); image-image attention
   from i's region to j's is blocked where its head-mean probability exceeds
   ``mean + pair_threshold * std`` over the pair region (the "abnormally high", leaking links;
   the rest carry interactions). The softmax is renormalised after the edits.

All of it runs inside flow attention: the entity groups carry the text rules, a pair mask the
image-image cuts, and the statistics are the kernel's attention mass, so no block materialises
its attention matrix (the pair threshold reads probabilities of one region pair at a time).

Masks are refreshed after every block of the mask steps from the unedited attention, as the
authors' code records it before its edits: once edits start, the region tokens' scores come
from the probabilities the pair threshold reads anyway (their rows of the plain softmax; the
other tokens' attention is not edited), so the edits never feed back into the regions they
are cut along. Defaults are the authors' (FLUX.1-dev, 20 steps): alpha 1.2, both thresholds
1.0, masks from block calls 12 to 12 x 57 - 1 (steps 0..11), edits from block call 18.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..functional import resolve_backend
from ..layout import BASE_GROUPS, TokenLayout
from ..rules import MAX_GROUPS, FlowRules
from ..session import BlockId, Intervention, StepInfo, attach
from .calls import check_one_image_call, check_settings
from .phrases import phrase_token_positions

MAX_ENTITIES = (MAX_GROUPS - len(BASE_GROUPS)) // 2  # each entity adds a text and an image group


@dataclass(frozen=True)
class DeLeakerConfig:
    """DeLeaker's hyperparameters (the authors' defaults) and switches for its three edits
    (the paper's ablations)."""

    alpha: float = 1.2
    mask_threshold: float = 1.0
    pair_threshold: float = 1.0
    mask_steps: int = 12
    record_from: int = 12
    start_block: int = 18
    open_iterations: int = 1
    close_iterations: int = 2
    suppress_text: bool = True
    reinforce_text: bool = True
    suppress_image: bool = True

    def __post_init__(self):
        check_settings("DeLeakerConfig", [
            (self.alpha > 0, f"alpha={self.alpha}: expected > 0"),
            (self.mask_steps >= 1, f"mask_steps={self.mask_steps}: expected >= 1"),
            *((getattr(self, name) >= 0, f"{name}={getattr(self, name)}: expected >= 0")
              for name in ("record_from", "start_block", "open_iterations",
                           "close_iterations")),
        ])


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 dilation; outside the grid is background (max pooling pads with -inf)."""
    return F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 erosion; outside the grid is foreground, so the border erodes nothing (OpenCV's
    morphology, which the authors use)."""
    return ~_dilate(~mask)


def entity_masks(scores: torch.Tensor, threshold: float, open_iterations: int = 1,
                 close_iterations: int = 2) -> torch.Tensor:
    """Entity regions from attention scores ``[E, h, w]`` (per image token): above
    ``mean + threshold * std`` of the entity's scores, opened then closed with a 3x3 window
    (``n`` iterations: n erosions then n dilations, and the reverse), made disjoint (a token
    goes to the entity whose threshold it exceeds most, in stds). bool [E, h, w]."""
    flat = scores.flatten(1)
    z = (scores - flat.mean(1)[:, None, None]) / flat.std(1).clamp_min(1e-12)[:, None, None]
    masks = z > threshold
    for morph in [_erode] * open_iterations + [_dilate] * (open_iterations + close_iterations) \
            + [_erode] * close_iterations:
        masks = morph(masks)
    owner = torch.where(masks, z, float("-inf")).argmax(0)
    return masks & (owner == torch.arange(len(scores), device=scores.device)[:, None, None])


class DeLeaker(Intervention):
    """The DeLeaker intervention for one prompt: attach it to a FLUX text-to-image pipeline
    (``with ditflow.session.attach(pipe, leaker): pipe(prompt, ...)``) or use
    :func:`generate`. Attach it around each pipeline call (steps are counted per attachment);
    each generation starts afresh, so one instance serves many seeds of its prompt.

    Args:
        entity_tokens: per entity, its text-token positions
            (:func:`ditflow.methods.phrases.phrase_token_positions`).
        token_grid: (rows, columns) of the image tokens (FLUX: height and width / 16).
        blocks_per_step: transformer blocks per denoising step (FLUX.1: 19 + 38 = 57).
        config: hyperparameters.

    After a generation, :attr:`masks` holds the entity regions (bool [E, rows, columns]).
    One image per transformer call: the regions are per image.
    """

    def __init__(self, entity_tokens: Sequence[Sequence[int]], token_grid: tuple[int, int],
                 blocks_per_step: int, config: DeLeakerConfig = DeLeakerConfig()):
        if not 1 <= len(entity_tokens) <= MAX_ENTITIES:
            raise ValueError(f"DeLeaker: 1..{MAX_ENTITIES} entities, got {len(entity_tokens)}")
        if config.record_from >= config.mask_steps * blocks_per_step:
            raise ValueError(f"DeLeaker: record_from={config.record_from} is past the mask "
                             f"steps' last block call ({config.mask_steps} steps x "
                             f"{blocks_per_step} blocks): no region would ever be found")
        self.entity_tokens = [torch.as_tensor(list(t), dtype=torch.long) for t in entity_tokens]
        self._on_device: dict[torch.device, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.token_grid = tuple(token_grid)
        self.blocks_per_step = blocks_per_step
        self.config = config
        self._reset()
        self._plan_key: tuple | None = None  # (base layout, masks) of the cached plan
        self._plan: tuple[TokenLayout, FlowRules | None] | None = None

    @classmethod
    def for_pipeline(cls, pipeline, prompt: str, entities: Sequence[str], height: int,
                     width: int, max_sequence_length: int = 512,
                     config: DeLeakerConfig = DeLeakerConfig()) -> DeLeaker:
        """DeLeaker for a FluxPipeline call with this prompt, entity phrases and image size."""
        from ..models.flux import token_grid  # diffusers: the CLI imports this module without

        grid = token_grid(pipeline.vae, height, width, "DeLeaker")
        positions = phrase_token_positions(pipeline.tokenizer_2, prompt, entities,
                                           max_sequence_length)
        model = pipeline.transformer.config
        return cls(positions, grid, model.num_layers + model.num_single_layers, config)

    def _reset(self) -> None:
        self.masks: torch.Tensor | None = None
        # this block's region tokens (image indices) and their unedited scores [E, rows]
        self._unedited: tuple[torch.Tensor, torch.Tensor] | None = None
        self._score_sum: torch.Tensor | None = None  # summed per-entity scores [E, h, w]
        self._score_count = 0  # blocks summed
        self._masks_from = 0  # blocks the current masks were built from

    # -- the intervention ----------------------------------------------------------------------

    def _entity_tokens_on(self, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The entities' text-token positions and their counts on ``device``, copied once (a
        copy in every block would wait for the GPU)."""
        if device not in self._on_device:
            self._on_device[device] = ([t.to(device) for t in self.entity_tokens],
                                       torch.tensor([len(t) for t in self.entity_tokens],
                                                    device=device))
        return self._on_device[device]

    def _call(self, step: StepInfo, block: BlockId) -> int:
        return step.index * self.blocks_per_step + block.order

    def _editing(self, step: StepInfo, block: BlockId) -> bool:
        return self._call(step, block) >= self.config.start_block

    def layout(self, step, block, layout):
        if step.index == 0 and block.order == 0:  # a new generation
            self._reset()
        image_tokens = len(layout) - layout.text_len
        if image_tokens != self.token_grid[0] * self.token_grid[1]:
            raise ValueError(f"DeLeaker: {image_tokens} image tokens, but the token grid is "
                             f"{self.token_grid[0]}x{self.token_grid[1]}; build DeLeaker for "
                             "the image size you generate")
        editing = self._editing(step, block)
        if editing and self._score_count and self._masks_from != self._score_count and (
                step.index < self.config.mask_steps or self.masks is None):
            masks = entity_masks(self._score_sum / self._score_count,
                                 self.config.mask_threshold, self.config.open_iterations,
                                 self.config.close_iterations)
            if self.masks is None or not torch.equal(masks, self.masks):
                self.masks = masks  # a new tensor: a new plan; unchanged regions keep theirs
            self._masks_from = self._score_count
        key = (layout, self.masks if editing else None)
        if self._plan_key is None or any(a is not b for a, b in zip(key, self._plan_key,
                                                                     strict=True)):
            self._plan_key, self._plan = key, self._build(*key)
        return self._plan[0]

    def _build(self, base: TokenLayout, masks: torch.Tensor | None):
        """(layout, rules): groups ``entity{i}.text``, and ``entity{i}.image`` with the rules
        between them once the regions are known."""
        layout = base
        for i, tokens in enumerate(self.entity_tokens):
            if int(tokens.max()) >= base.text_len:
                raise ValueError(f"DeLeaker: entity {i} has text token {int(tokens.max())} but "
                                 f"the text has {base.text_len} tokens")
            layout = layout.with_region(f"entity{i}.text", tokens)
        if masks is None:
            return layout, None
        for i, mask in enumerate(masks.cpu()):
            layout = layout.with_region(f"entity{i}.image",
                                        base.text_len + mask.flatten().nonzero().squeeze(1))
        rules = layout.rules()
        text = [layout.group(f"entity{i}.text") for i in range(len(masks))]
        image = [layout.group(f"entity{i}.image") for i in range(len(masks))]
        for i in range(len(masks)):
            others = text[:i] + text[i + 1:]
            if self.config.suppress_text and others:
                rules = rules.block(image[i], others)
            if self.config.reinforce_text and others:
                rules = rules.scale_logits(image[i], text[i],
                                           self.config.alpha ** len(others))
        return layout, rules

    def rules(self, step, block, layout):
        return self._plan[1]

    def wants_mass(self, step, block):
        return (step.index < self.config.mask_steps
                and self._call(step, block) >= self.config.record_from)

    def observe(self, step, block, layout, result):
        if result.mass is None:
            return
        if result.mass.shape[0] != 1:
            raise ValueError(f"DeLeaker: one image per transformer call, got a batch of "
                             f"{result.mass.shape[0]} (call the pipeline once per image)")
        first = layout.group("entity0.text")  # _build adds the entities' text groups in order
        _, counts = self._entity_tokens_on(result.mass.device)
        image_mass = result.mass[0, :, layout.text_len:, first:first + len(counts)].detach().float()
        scores = (image_mass.mean(0) / counts).T
        if self._unedited is not None:  # the region tokens' attention was edited
            rows, unedited = self._unedited
            scores[:, rows] = unedited
            self._unedited = None
        scores = scores.reshape(-1, *self.token_grid)
        self._score_sum = scores if self._score_sum is None else self._score_sum + scores
        self._score_count += 1

    def pair_mask(self, step, block, layout, q, k):
        """The image-image cuts; in the mask steps also the region tokens' unedited scores,
        from the same probabilities, for :meth:`observe`."""
        self._unedited = None
        if not (self._editing(step, block) and self.masks is not None):
            return None
        records = self.wants_mass(step, block)
        cuts = self.config.suppress_image and len(self.masks) > 1
        if not (records or cuts):
            return None
        regions = [layout.tokens(f"entity{i}.image", q.device) for i in range(len(self.masks))]
        rows = torch.cat(regions)
        # The regions' rows, in one pass, over the keys read below: the regions (the cuts) and
        # the entities' text tokens (the scores), normalised over all keys.
        texts = self._entity_tokens_on(q.device)[0] if records else []
        keys = [*(regions if cuts else []), *texts]
        by_key = _head_mean_probs(q[0, rows], k[0], torch.cat(keys)).split(
            [len(tokens) for tokens in keys], dim=1)
        if records:
            scores = torch.stack([probs.mean(-1) for probs in by_key[len(keys) - len(texts):]])
            self._unedited = (rows - layout.text_len, scores)
        if not cuts:
            return None
        mask = torch.zeros(1, q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
        sizes = [len(region) for region in regions]
        for j, (cols, to_cols) in enumerate(zip(regions, by_key[:len(regions)], strict=True)):
            for i, (rows, pair) in enumerate(zip(regions, to_cols.split(sizes), strict=True)):
                if i == j or not len(rows) or not len(cols):
                    continue
                # mean and std of the non-zero probabilities, without gathering them (a size
                # read back from the GPU): with fewer than two they are NaN and nothing is cut
                nonzero = pair > 0
                count = nonzero.sum()
                mean = (pair * nonzero).sum() / count
                std = ((pair - mean).square() * nonzero).sum().div(count - 1).sqrt()
                cut = pair > mean + self.config.pair_threshold * std
                mask[0, rows[:, None], cols[None, :]] = cut
        return mask


# Heads per batched product in _head_mean_probs_reference: a few kernels per block rather than
# several per head (launches dominated a per-head loop), holding this many [Nq, Nk] fp32 blocks.
HEADS_AT_ONCE = 8


def _head_mean_probs(q: torch.Tensor, k: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax probabilities [Nq, len(columns)] fp32 of queries ``q`` [Nq, H, D] over
    keys ``k`` [Nk, H, D] (plain attention over all of them), at the keys ``columns``: two
    Triton kernels where flow attention runs Triton's (no [H, Nq, Nk] scores, the products on
    tensor cores, the probabilities of the other keys never made), else
    :func:`_head_mean_probs_reference`."""
    if resolve_backend(None, q.device, q.dtype) != "triton":
        return _head_mean_probs_reference(q, k)[:, columns]
    q, k = ops.unit_channel_stride(q), ops.unit_channel_stride(k)
    return ops._kernels().head_mean_probs(q, k, q.shape[-1] ** -0.5, k[columns])


def _head_mean_probs_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`_head_mean_probs` in fp32 PyTorch, :data:`HEADS_AT_ONCE` heads at a time."""
    scale = q.shape[-1] ** -0.5
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, N, D]
    total = torch.zeros(q.shape[1], k.shape[1], device=q.device)
    for h in range(0, q.shape[0], HEADS_AT_ONCE):
        scores = torch.bmm(q[h:h + HEADS_AT_ONCE], k[h:h + HEADS_AT_ONCE].transpose(1, 2))
        total += scores.mul_(scale).softmax(-1).sum(0)
    return total / q.shape[0]


def generate(pipeline, prompt: str, entities: Sequence[str], *, height: int, width: int,
             config: DeLeakerConfig = DeLeakerConfig(), max_sequence_length: int = 256,
             **call_kwargs):
    """One FluxPipeline generation with DeLeaker: ``(images, masks)``, the pipeline's images and
    the entity regions (bool [E, height / 16, width / 16] on FLUX; None when the generation
    ended before ``config.start_block``, so nothing was edited)."""
    check_one_image_call("DeLeaker", call_kwargs)
    leaker = DeLeaker.for_pipeline(pipeline, prompt, entities, height, width,
                                   max_sequence_length, config)
    with attach(pipeline, leaker):
        images = pipeline(prompt=prompt, height=height, width=width,
                          max_sequence_length=max_sequence_length, **call_kwargs).images
    return images, leaker.masks
