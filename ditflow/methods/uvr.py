"""UVR: safe generation and editing by restricting unsafe information flow (FLUX.1; editing:
FLUX.1 Kontext and Step1X-Edit).

Unsafe semantics show up in the first denoising steps (the start-up stage, t >= 850 of 1000) in
identifiable image patches. UVR finds those patches and restricts the attention flowing out of
or into them during that stage:

* **anchors** (:func:`collect_anchors`): per concept, the attention output (before the output
  projection) of image tokens at one block (``block``, single block 10 on FLUX.1) for
  generations or edits showing the concept; one anchor [H, D] per prompt: the mean, over the
  start-up steps and over the tokens a detector marks as the concept (``select``), of the
  outputs centred on their image's mean; saved as safetensors (:func:`save_anchors`);
* **localisation** (:func:`token_scores`, :func:`localize`): each image token's score is the
  scaled dot product of its centred attention output with the anchors (mean over heads and
  anchors), relative to the anchors' mean score with one another (1 = as close to the concept
  as the anchors are to each other); tokens above ``threshold`` are cleaned as the authors'
  code cleans them (3x3 elliptic closing, holes filled, regions under ``min_area_*`` tokens
  dropped, the rest kept by their share of the softmax of the gated scores: ``keep_share`` of
  it in generation, the ``keep_regions`` largest in editing);
* **generation** (FluxPipeline): localised at ``block`` at every start-up step; in every block
  of those steps the attention-output rows of the flagged image tokens become
  ``keep * out + (1 - keep) * N(0, 1)`` (keep 0.001);
* **editing** (FluxKontextPipeline, Step1XEditPipeline): localised once, on the context
  image's tokens, at the first step (Step1X-Edit batches the prompt with its negative prompt:
  localised on the prompt's, the weights apply to both); for the rest of the start-up stage
  the attention probabilities from text and target queries to the flagged context tokens are
  multiplied by 0.2 (core) and 0.4 (a ring around it: the core dilated ``ring_dilations``
  times by an elliptic window of ``ring_radius``), without renormalisation, and target
  queries' probabilities on text and target keys by 1.05: flow attention's ``weight`` table.

The paper's t >= 850, single block 10, keep 0.001 and weights, and its public code's clean-up,
region selection and ring (in tokens, for its 64x64 grid at 1024²) are the defaults. It leaves
the score's scale open (its thresholds, 0.6 for generation and 0.2 for editing, are on a scale
it does not give; its public code stubs the anchor scoring out), so the centring, the relative
scale and one threshold of 0.6 for both tasks are ours: without centring, the clean context
tokens of an edit all score alike; on this scale 16% of the tokens of concept-free
testbed contexts score above 0.2, 4% above 0.6 (``benchmarks/testbed_uvr.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import pixels_tensor, resize_pixels, to_pil, to_uint8
from ..layout import TARGET, TEXT, TokenLayout
from ..models import check_blocks, edit_calls_for
from ..models.flux import token_coverage, token_grid
from ..rules import FlowRules
from ..session import BlockId, Intervention, StepInfo, attach, is_block_name
from .calls import check_one_image_call, check_settings

MODES = ("generate", "edit")


@dataclass(frozen=True)
class UVRConfig:
    """UVR's hyperparameters (the paper's where it gives them)."""

    block: str = "single.10"
    threshold: float = 0.6  # on token_scores' scale (the paper's: 0.6 generation, 0.2 editing)
    start_up: float = 0.85  # the start-up stage: model timestep t / 1000 >= this
    # Region clean-up as in the authors' code, in tokens (their grid: 64x64 at 1024²):
    min_area_generate: int = 5  # least connected region kept
    min_area_edit: int = 3
    keep_share: float = 0.3  # generation: regions kept, largest softmax mass first, up to this
    keep_regions: int = 3  # editing: regions kept, the largest by softmax mass
    keep: float = 0.001  # generation: share of a flagged row's attention output kept
    core_weight: float = 0.2  # editing: probability factor on the flagged context tokens
    ring_weight: float = 0.4  # editing: the same on the ring around them
    ring_radius: int = 3  # editing: the ring is the core dilated by an elliptic window of
    ring_dilations: int = 2  # this radius (7x7), this many times, less the core
    boost: float = 1.05  # editing: target queries' probabilities on text and target keys
    seed: int = 0  # the replacement noise

    def __post_init__(self):
        check_settings("UVRConfig", [
            (is_block_name(self.block),
             f"block={self.block!r}; expected 'double.N' or 'single.N'"),
            (0 <= self.start_up <= 1, f"start_up={self.start_up}: expected the model's "
                                      "timestep t / 1000, in [0, 1] (0.85: the paper's t >= 850)"),
            (0 <= self.keep <= 1, f"keep={self.keep}: expected 0 <= keep <= 1"),
            (0 < self.keep_share <= 1, f"keep_share={self.keep_share}: expected 0 < keep_share "
                                       "<= 1"),
            (self.keep_regions >= 1, f"keep_regions={self.keep_regions}: expected >= 1"),
            *((getattr(self, name) >= 0, f"{name}={getattr(self, name)}: expected >= 0")
              for name in ("min_area_generate", "min_area_edit", "ring_radius",
                           "ring_dilations")),
        ])


# -- anchors and localisation ----------------------------------------------------------------


def token_scores(outputs: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Concept scores [n] of tokens from their attention outputs ``[n, H, D]``: the scaled dot
    product with each anchor ``[A, H, D]``, mean over heads and anchors, divided by the same
    mean between the anchors themselves."""
    if outputs.shape[1:] != anchors.shape[1:]:
        raise ValueError(f"UVR: the anchors are {anchors.shape[1]} heads x {anchors.shape[2]} "
                         f"dims, this block's attention {outputs.shape[1]} x {outputs.shape[2]}: "
                         "collect anchors with this model")
    outputs, anchors = outputs.float(), anchors.to(outputs.device).float()
    outputs = outputs - outputs.mean(0)
    heads, dim = anchors.shape[1:]
    norm = heads * dim**0.5
    scores = torch.einsum("nhd,ahd->n", outputs, anchors) / (len(anchors) * norm)
    mutual = torch.einsum("ahd,bhd->", anchors, anchors) / (len(anchors) ** 2 * norm)
    return scores / mutual


def ellipse(radius: int) -> np.ndarray:
    """OpenCV's elliptic structuring element of size 2 * radius + 1 (the authors' windows):
    radius 1 is a cross, radius 3 a 7x7 disc."""
    offsets = np.arange(-radius, radius + 1)
    half_widths = np.floor(radius * np.sqrt(1 - (offsets / max(radius, 1)) ** 2) + 0.5)
    return np.abs(offsets)[None, :] <= half_widths[:, None]


def localize(scores: torch.Tensor, threshold: float, min_area: int, keep_share: float = 1.0,
             keep_regions: int | None = None) -> torch.Tensor:
    """Flagged tokens (bool [rows, columns]) from token scores on the token grid, cleaned as the
    authors' code cleans them: above ``threshold``, closed with a 3x3 elliptic window (the
    grid's border erodes nothing, as in OpenCV), holes filled (any background touching the
    border is outside; their flood fill starts from one corner), 8-connected regions of at least
    ``min_area`` tokens; ranked by their share of the softmax of the scores above the threshold,
    the first ``keep_regions`` are kept, or the first that hold ``keep_share`` of it."""
    from scipy import ndimage

    values = scores.detach().float().cpu().numpy()
    gated = values > threshold
    if not gated.any():
        return torch.zeros_like(scores, dtype=torch.bool)
    cross = ellipse(1)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(gated, cross), cross, border_value=1)
    filled = ndimage.binary_fill_holes(closed)
    labels, count = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    softmax = np.where(gated, np.exp(values - values[gated].max()), 0.0)
    softmax /= softmax.sum()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    masses = np.bincount(labels.ravel(), weights=softmax.ravel(), minlength=count + 1)
    regions = [r for r in range(1, count + 1) if sizes[r] >= min_area]
    regions.sort(key=lambda r: masses[r], reverse=True)
    if keep_regions is not None:
        kept = regions[:keep_regions]
    else:
        total, held, kept = sum(masses[r] for r in regions), 0.0, []
        for r in regions:
            if held >= keep_share * total:
                break
            kept.append(r)
            held += masses[r]
    return torch.from_numpy(np.isin(labels, kept)).to(scores.device)


class _AnchorRecorder(Intervention):
    """Keeps the attention outputs of the scored tokens at ``block`` in the start-up stage
    (generation: every start-up step; editing: the first step), of the prompt's call only (not
    a true-CFG negative prompt's)."""

    def __init__(self, mode: str, config: UVRConfig):
        self.mode, self.config = mode, config
        self.outputs: list[torch.Tensor] = []

    def attached(self, transformer):
        check_blocks(transformer, [self.config.block], "UVRConfig.block")

    def wants_mass(self, step, block):
        return (str(block) == self.config.block and step.call == 0
                and _in_start_up(step, self.mode, self.config))

    def observe(self, step, block, layout, result):
        if self.wants_mass(step, block):
            outputs = result.out[0, _scored_tokens(layout, self.mode)].detach().float()
            self.outputs.append(outputs - outputs.mean(0))


def _in_start_up(step: StepInfo, mode: str, config: UVRConfig) -> bool:
    return step.timestep >= config.start_up and (mode == "generate" or step.index == 0)


def _scored_tokens(layout: TokenLayout, mode: str) -> torch.Tensor:
    """Token indices UVR scores: the generated image's (generation) or the context's (editing)."""
    return layout.mask("target" if mode == "generate" else "context").nonzero().squeeze(1)


def collect_anchors(pipeline, prompts: Sequence[str], *, height: int, width: int,
                    select: Callable[[np.ndarray], np.ndarray], images: Sequence | None = None,
                    config: UVRConfig = UVRConfig(), **call_kwargs) -> torch.Tensor:
    """Anchors [A, H, D] of a concept, one per prompt: for a FluxPipeline, generations of
    ``prompts``, ``select`` marking the concept's pixels in each generated image; for a
    FluxKontextPipeline or Step1XEditPipeline, edits of ``images`` (which show the concept),
    ``select`` marking it in each image. ``select``: uint8 [H, W, 3] -> bool [H, W] (a
    detector, or masks you drew). Prompts whose selection is empty give no anchor; an anchor
    over the whole image would be zero (outputs are centred on their image's mean)."""
    if isinstance(prompts, str):
        raise TypeError(f"collect_anchors: prompts={prompts!r}: expected a sequence of prompts, "
                        f"e.g. [{prompts!r}]")
    mode = _mode_of(pipeline)
    if mode == "edit" and (images is None or len(images) != len(prompts)):
        raise ValueError("collect_anchors: an editing pipeline needs one image per prompt")
    # edits at exactly height x width (the selection is made on the output as numpy, whatever
    # output_type says); anchors come from the prompt's call only
    check_one_image_call("UVR collect_anchors", call_kwargs, negative_prompt_ok=True,
                         own=("max_area", "_auto_resize"))
    grid = token_grid(pipeline.vae, height, width, "UVR")
    anchors = []
    for i, prompt in enumerate(prompts):
        recorder = _AnchorRecorder(mode, config)
        source = None if mode == "generate" else _working_image(images[i], height, width)
        with attach(pipeline, recorder):
            out = _call(pipeline, prompt, source, height, width,
                        **{**call_kwargs, "output_type": "np"}).images[0]
        if not recorder.outputs:
            raise ValueError(f"collect_anchors: no step reached the start-up stage (t >= "
                             f"{config.start_up * 1000:.0f}; editing: at the first step)")
        shown = to_uint8(out) if mode == "generate" else np.asarray(source)
        # tokens at least half covered by the selected pixels
        chosen = token_coverage(torch.from_numpy(np.asarray(select(shown), dtype=bool))[None],
                                grid)[0] >= 0.5
        if chosen.any() and not chosen.all():
            tokens = chosen.flatten().to(recorder.outputs[0].device)
            anchors.append(torch.stack([o[tokens].mean(0) for o in recorder.outputs]).mean(0))
    if not anchors:
        raise ValueError("collect_anchors: select marked no tokens (or all of them) in every "
                         "image; anchors need the concept's part of the image")
    return torch.stack(anchors).cpu()


def save_anchors(path: str | Path, anchors: torch.Tensor, concept: str, block: str,
                 mode: str) -> None:
    """Anchors as safetensors, with the concept, block and mode (generate / edit) they are for."""
    from safetensors.torch import save_file

    save_file({"anchors": anchors.contiguous()}, str(path),
              metadata=dict(concept=concept, block=block, mode=mode))


def load_anchors(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(anchors [A, H, D], metadata with concept, block and mode)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("anchors"), dict(f.metadata() or {})
    except (OSError, KeyError, SafetensorError) as error:
        raise ValueError(f"{path}: not a ditflow anchors file ({error}); make one with "
                         "ditflow.methods.uvr.collect_anchors and save_anchors") from None


# -- the intervention ------------------------------------------------------------------------


class UVR(Intervention):
    """UVR for one image per call: ``mode`` "generate" (FluxPipeline) or "edit"
    (FluxKontextPipeline, Step1XEditPipeline), ``anchors`` [A, H, D] from
    :func:`collect_anchors` with the same model, block and mode, ``grid`` the (rows, columns)
    of the scored image; ``guidance_batch``: the pipeline batches the prompt with its negative
    prompt (Step1X-Edit), localise on the first. After a call, :attr:`scores` holds the last
    localisation's token scores ([rows, columns]) and :attr:`mask` the tokens flagged at any
    localisation (bool [rows, columns]) or None."""

    def __init__(self, anchors: torch.Tensor, grid: tuple[int, int], mode: str,
                 config: UVRConfig = UVRConfig(), guidance_batch: bool = False):
        if mode not in MODES:
            raise ValueError(f"UVR: mode={mode!r}; expected one of {MODES}")
        if anchors.dim() != 3 or not len(anchors):
            raise ValueError(f"UVR: anchors of shape {tuple(anchors.shape)}; expected [A, H, D]")
        self.anchors, self.grid, self.mode, self.config = anchors, tuple(grid), mode, config
        self.guidance_batch = guidance_batch
        self._reset()
        self._plan: tuple[TokenLayout, TokenLayout, torch.Tensor, FlowRules] | None = None
        self._noise: torch.Generator | None = None

    def attached(self, transformer):
        check_blocks(transformer, [self.config.block], "UVRConfig.block")

    def _reset(self) -> None:
        self.scores: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None  # generation: the last localisation's tokens

    def _localizes(self, step: StepInfo, block: BlockId) -> bool:
        return str(block) == self.config.block and _in_start_up(step, self.mode, self.config)

    def layout(self, step, block, layout):
        if step.index == 0 and block.order == 0:  # a new generation
            self._reset()
        scored = _scored_tokens(layout, self.mode)
        if len(scored) != self.grid[0] * self.grid[1]:
            raise ValueError(f"UVR: {len(scored)} scored image tokens, but the grid is "
                             f"{self.grid[0]}x{self.grid[1]}; build UVR for the image size "
                             "you generate or edit")
        if self.mode == "generate" or self.mask is None or step.timestep < self.config.start_up:
            return layout
        return self._edit_plan(layout)[1]

    def _edit_plan(self, base: TokenLayout):
        """Editing: (layout with ``uvr.core`` and ``uvr.ring`` carved from the context, rules),
        rebuilt only when the call layout or the mask changes."""
        if self._plan is None or self._plan[0] is not base or self._plan[2] is not self.mask:
            from scipy import ndimage

            context = base.mask("context").nonzero().squeeze(1)
            core = self.mask.cpu()
            grown = core
            if self.config.ring_dilations:
                grown = torch.from_numpy(ndimage.binary_dilation(
                    core.numpy(), ellipse(self.config.ring_radius),
                    iterations=self.config.ring_dilations))
            layout = base.with_region("uvr.core", context[core.flatten()])
            layout = layout.with_region("uvr.ring", context[(grown & ~core).flatten()])
            core_group, ring_group = layout.group("uvr.core"), layout.group("uvr.ring")
            rules = (layout.rules()
                     .weight_probs([TEXT, TARGET], core_group, self.config.core_weight)
                     .weight_probs([TEXT, TARGET], ring_group, self.config.ring_weight)
                     .weight_probs(TARGET, [TEXT, TARGET], self.config.boost))
            self._plan = (base, layout, self.mask, rules)
        return self._plan

    def rules(self, step, block, layout):
        if self.mode == "edit" and self.mask is not None and \
                step.timestep >= self.config.start_up and layout is self._plan[1]:
            return self._plan[3]
        return None

    def wants_mass(self, step, block):
        return self.mode == "edit" and self._localizes(step, block)

    def edits_output(self, step, block):
        # the localisation block also goes through ditflow's attention, to be observed
        return self.mode == "generate" and step.timestep >= self.config.start_up and (
            self.flagged is not None or self._localizes(step, block))

    def observe(self, step, block, layout, result):
        if not self._localizes(step, block):
            return
        if result.out.shape[0] > (2 if self.guidance_batch else 1):
            raise ValueError(f"UVR: one image per transformer call, got a batch of "
                             f"{result.out.shape[0]} (call the pipeline once per image)")
        outputs = result.out[0, _scored_tokens(layout, self.mode).to(result.out.device)]
        self.scores = token_scores(outputs.detach(), self.anchors).reshape(self.grid)
        cfg = self.config
        if self.mode == "generate":
            mask = localize(self.scores, cfg.threshold, cfg.min_area_generate,
                            keep_share=cfg.keep_share)
        else:
            mask = localize(self.scores, cfg.threshold, cfg.min_area_edit,
                            keep_regions=cfg.keep_regions)
        if not mask.any():
            self.flagged = None  # this step's outputs stay as computed
            return
        self.flagged = mask
        self.mask = mask if self.mask is None else self.mask | mask

    def edit_output(self, step, block, layout, out):
        if self.flagged is None:
            return out
        if self._noise is None or self._noise.device != out.device:
            self._noise = torch.Generator(out.device).manual_seed(self.config.seed)
        rows = _scored_tokens(layout, self.mode).to(out.device)
        rows = rows[self.flagged.flatten().to(out.device)]
        noise = torch.randn(out.shape[0], len(rows), *out.shape[2:], generator=self._noise,
                            device=out.device, dtype=out.dtype)
        out = out.clone()
        out[:, rows] = self.config.keep * out[:, rows] + (1 - self.config.keep) * noise
        return out


# -- pipeline calls ---------------------------------------------------------------------------


def _mode_of(pipeline) -> str:
    from diffusers import FluxKontextPipeline, FluxPipeline

    from ..models.step1x import Step1XEditPipeline

    if isinstance(pipeline, FluxKontextPipeline | Step1XEditPipeline):
        return "edit"
    if isinstance(pipeline, FluxPipeline):
        return "generate"
    raise TypeError(f"UVR: expected a FluxPipeline, FluxKontextPipeline or Step1XEditPipeline, "
                    f"got {type(pipeline).__name__}")


def _batches_guidance(pipeline) -> bool:
    from ..models.step1x import Step1XEditPipeline

    return isinstance(pipeline, Step1XEditPipeline)


def _working_image(image, height: int, width: int):
    """The source as a PIL image of exactly ``height x width``."""
    return to_pil(resize_pixels(pixels_tensor(image), (height, width)))


def _call(pipeline, prompt: str, source, height: int, width: int, **call_kwargs):
    """A generation, or an edit of ``source`` (PIL) at exactly ``height x width``."""
    if source is None:
        return pipeline(prompt=prompt, height=height, width=width, **call_kwargs)
    return pipeline(image=source, prompt=prompt,
                    **edit_calls_for(pipeline).size_arguments(height, width), **call_kwargs)


def _check_anchors(metadata: dict[str, str] | None, mode: str, config: UVRConfig) -> None:
    for key, wanted in (("mode", mode), ("block", config.block)):
        if metadata and metadata.get(key, wanted) != wanted:
            raise ValueError(f"UVR: the anchors are for {key} {metadata[key]!r}, this run "
                             f"uses {wanted!r}; collect anchors with the same {key}")


def generate(pipeline, prompt: str, anchors: torch.Tensor, *, height: int, width: int,
             config: UVRConfig = UVRConfig(), anchor_metadata: dict[str, str] | None = None,
             **call_kwargs):
    """One FluxPipeline generation with UVR: ``(images, mask)``, the pipeline's images and the
    tokens flagged at any start-up step (bool [rows, columns]; None when nothing was flagged:
    the generation is then the model's own, up to the kernel's rounding at the localisation
    block)."""
    if _mode_of(pipeline) != "generate":
        raise TypeError("UVR generate: expected a FluxPipeline (for Kontext use uvr.edit)")
    check_one_image_call("UVR", call_kwargs)
    _check_anchors(anchor_metadata, "generate", config)
    uvr = UVR(anchors, token_grid(pipeline.vae, height, width, "UVR"), "generate", config)
    with attach(pipeline, uvr):
        images = _call(pipeline, prompt, None, height, width, **call_kwargs).images
    return images, uvr.mask


def edit(pipeline, image, prompt: str, anchors: torch.Tensor, *, resolution: int = 1024,
         config: UVRConfig = UVRConfig(), anchor_metadata: dict[str, str] | None = None,
         **call_kwargs):
    """One FluxKontextPipeline or Step1XEditPipeline edit of ``image`` with UVR, at the
    working resolution (about ``resolution``² pixels at the image's aspect ratio, snapped as
    the editor snaps; the context is resized to it): ``(images, mask)``, the mask on the
    context's tokens. ``call_kwargs``: more pipeline arguments, not the size (``height``,
    ``width``, ``max_area``: set from ``resolution``)."""
    if _mode_of(pipeline) != "edit":
        raise TypeError("UVR edit: expected a FluxKontextPipeline or Step1XEditPipeline (for "
                        "FLUX.1 use uvr.generate)")
    check_one_image_call("UVR", call_kwargs, negative_prompt_ok=_batches_guidance(pipeline),
                         sized=True, own=("_auto_resize",))
    _check_anchors(anchor_metadata, "edit", config)
    pixels = pixels_tensor(image)
    height, width = edit_calls_for(pipeline).working_size(*pixels.shape[1:], resolution)
    uvr = UVR(anchors, token_grid(pipeline.vae, height, width, "UVR"), "edit", config,
              guidance_batch=_batches_guidance(pipeline))
    with attach(pipeline, uvr):
        images = _call(pipeline, prompt, _working_image(pixels, height, width), height, width,
                       **call_kwargs).images
    return images, uvr.mask
