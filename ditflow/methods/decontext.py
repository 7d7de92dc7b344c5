"""DeContext: protect photos against in-context editing (and the Diff-PGD baseline).

DeContext perturbs a photo, within an L-inf budget, so that an in-context editor (FLUX.1 Kontext,
Qwen-Image-Edit or Step1X-Edit) stops attending to it: the loss is ``r_ctx``, the attention mass of
the edit's target tokens on the photo's context tokens (softmax over all keys), averaged over heads,
target queries and the attacked blocks (FLUX.1 Kontext and Step1X-Edit: single-stream blocks 0..25,
the authors'; Qwen-Image-Edit: double.20..46 of 60, at the same depths, our analogue). Each PGD step
samples an instruction from ``config.prompts`` (default :data:`PROMPT_POOL`), a timestep in
[980, 1000) and fresh target noise, takes the gradient of ``r_ctx`` through the fused kernel's
mass gradient (the forward stops after the last attacked block), and moves the photo by a signed
step, projected back into the budget and [0, 1].

Units: ``epsilon`` and ``step_size`` are in 0..255 pixel units. The authors' Kontext budget,
epsilon 0.1 and step 0.005 in the [-1, 1] range, is 12.75/255 and 0.6375/255 (their Step1X-Edit
script works in [0, 1]: its 0.1 is 25.5/255; pass it as ``epsilon`` to reproduce it).

Resolution: the photo is optimised at the editor's working resolution (``resolution``² pixels,
aspect ratio kept, snapped to the model's multiple: 16 for FLUX.1 Kontext and Step1X-Edit (as its
pipeline snaps at ``size_level = resolution``), 32 for Qwen-Image-Edit; the authors used 512x512
crops) and the perturbation is resized back (bilinear) to the photo's own resolution, added to the
original and clipped to the budget. FLUX.1 Kontext's pipeline itself snaps inputs to its preferred
resolutions (about 1 megapixel) unless called with ``_auto_resize=False``; Qwen-Image-Edit's always
resizes its input to about 1 megapixel (its default working resolution here, 1024, is exactly that
size).

Qwen-Image-Edit's and Step1X-Edit's prompt embeddings come from Qwen2.5-VL, which sees the photo
as well: they are computed once per instruction from the clean photo, and the perturbation acts
through the context tokens only. Timesteps are drawn from [980, 1000) for every editor (the
authors' Step1X-Edit script also uses t = 1000 every tenth step).

``method="diff-pgd"``: the baseline maximises the flow-matching loss of the target prediction
against clean edits of the same photo (noisy target ``(1 - s) z + s e``), all blocks, same
budget and driver.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .._memo import TensorMemo, copy_to_device
from ..io import pixels_tensor, resize_pixels, to_pil
from ..layout import TokenLayout
from ..models import adapter_for, check_blocks, edit_calls_for
from ..session import StatsRecorder, attach
from ..wide_attention import wide_heads_sdpa
from .calls import check_settings
from .prompts import PROMPT_POOL
from .step_graph import GraphedGradient

# The attacked blocks and working resolution when the config leaves them to the model. FLUX.1
# Kontext and Step1X-Edit (the same transformer layout): the authors'. Qwen-Image-Edit: ours
# (its 60 blocks at the depths of the authors' single.0..25 among FLUX's 57, 19/57 to 45/57 of
# the way through; the ~1 MP size its pipeline feeds the model).
DEFAULT_BLOCKS = tuple(f"single.{i}" for i in range(26))
FAMILY_DEFAULTS = {
    "FluxTransformer2DModel": dict(blocks=DEFAULT_BLOCKS, resolution=512),
    "QwenImageTransformer2DModel": dict(blocks=tuple(f"double.{i}" for i in range(20, 47)),
                                        resolution=1024),
    "Step1XEditTransformer": dict(blocks=DEFAULT_BLOCKS, resolution=512),
}
# Families whose instruction goes through T5: the only ones max_sequence_length changes
# (Qwen-Image-Edit and Step1X-Edit embed it with Qwen2.5-VL).
T5_FAMILIES = ("FluxTransformer2DModel",)
METHODS = ("decontext", "diff-pgd")
AUTHORS_STEPS = {"decontext": 800, "diff-pgd": 600}


class UnsupportedSetting(ValueError):
    """A :class:`ProtectConfig` setting that the model, or the device it is on, cannot run."""

    def __init__(self, setting: str, reason: str):
        super().__init__(f"{setting}: {reason}")
        self.setting, self.reason = setting, reason


@dataclass(frozen=True)
class ProtectConfig:
    """Settings of a protection run; defaults reproduce the authors' FLUX.1 Kontext recipe.

    Attributes:
        method: ``"decontext"`` or the ``"diff-pgd"`` baseline.
        epsilon: L-inf budget in 0..255 pixel units.
        step_size: signed-gradient step per iteration, 0..255 units.
        steps: PGD iterations; None = the authors' for the method (DeContext 800, Diff-PGD 600).
        resolution: working resolution: the photo is optimised at about resolution² pixels;
            None = the model's (FLUX.1 Kontext and Step1X-Edit 512, Qwen-Image-Edit 1024).
        blocks: attacked blocks (``"single.3"``, ``"double.7"``); the forward stops after the
            last one. None = the model's (see ``FAMILY_DEFAULTS``).
        timesteps: the range t is drawn from, in the scheduler's 0..1000 units.
        guidance: guidance embedding value (FLUX.1 Kontext; models without one ignore it).
        batch_size: photos optimised together (same working resolution).
        seed: every random draw of a photo comes from (seed, photo name): results do not depend
            on batching or on resuming.
        max_sequence_length: T5 tokens of the instruction (FLUX.1 Kontext; the editors that
            embed it with Qwen2.5-VL ignore it).
        prompts: the instruction pool (the testbed editor has its own, in its vocabulary).
        gradient_checkpointing: trade compute for memory in the attacked blocks.
        compile_backend: compile the transformer's repeated blocks with this ``torch.compile``
            backend while protecting (regional compilation: each block class once, for all
            its blocks; ``"inductor"`` fuses FLUX's elementwise work on a GPU). The first
            steps compile (a minute or two); later batches reuse the compiled code. None =
            eager.
        cuda_graph: replay each DeContext step from a CUDA graph (FLUX.1 Kontext and
            Step1X-Edit, on a GPU): the host no longer launches the step's kernels one by one,
            which bounds the step at 512². Captured on the first step of each batch shape
            (after the compilation, with ``compile_backend``, whose host time the graph then
            hides); holds another copy of the step's memory. Not with Diff-PGD or expectation
            over transformations.
        eot_jpeg_quality: (low, high) JPEG quality drawn per step (straight-through gradient)
            so the protection survives recompression; None = off.
        eot_resize: (low, high) scale drawn per step, down- and up-sampled; None = off.
        stop_window, stop_min_gain: optional convergence stop: every ``stop_window`` steps the
            evaluation r_ctx is measured and a photo whose r_ctx fell by less than
            ``stop_min_gain`` since the last check stops. None = run all steps (the authors).
        eval_prompts: how many of the pool's first instructions measure r_ctx before/after
            (the pools are ordered so that the first ones cover every category).
        diffpgd_edits, diffpgd_edit_steps: clean edits per photo for Diff-PGD, and their
            sampling steps.
    """

    method: str = "decontext"
    epsilon: float = 12.75
    step_size: float = 0.6375
    steps: int | None = None
    resolution: int | None = None
    blocks: tuple[str, ...] | None = None
    timesteps: tuple[float, float] = (980.0, 1000.0)
    guidance: float = 3.5
    batch_size: int = 1
    seed: int = 0
    max_sequence_length: int = 512
    prompts: tuple[str, ...] = PROMPT_POOL
    gradient_checkpointing: bool = False
    compile_backend: str | None = None
    cuda_graph: bool = False
    eot_jpeg_quality: tuple[int, int] | None = None
    eot_resize: tuple[float, float] | None = None
    stop_window: int | None = None
    stop_min_gain: float = 0.002
    eval_prompts: int = 6
    diffpgd_edits: int = 2
    diffpgd_edit_steps: int = 20

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", AUTHORS_STEPS.get(self.method))
        checks = [
            (self.method in METHODS, f"method={self.method!r}: expected one of {METHODS}"),
            (0 < self.epsilon <= 255, f"epsilon={self.epsilon}: expected 0 < epsilon <= 255 "
                                      "(pixel units; 12.75 is the authors' 0.1 in [-1, 1])"),
            (self.step_size > 0, f"step_size={self.step_size}: expected > 0 (pixel units)"),
            (self.steps is None or self.steps >= 0, f"steps={self.steps}: expected >= 0"),
            (self.resolution is None or self.resolution >= 16,
             f"resolution={self.resolution}: expected >= 16"),
            (not isinstance(self.blocks, str), f"blocks={self.blocks!r}: expected a sequence of "
                                               "names, e.g. ('single.0', 'single.1')"),
            (self.blocks is None or len(self.blocks) > 0, "blocks: expected at least one block"),
            (0 <= self.timesteps[0] < self.timesteps[1] <= 1000,
             f"timesteps={self.timesteps}: expected 0 <= low < high <= 1000"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: expected >= 1"),
            (not isinstance(self.prompts, str), f"prompts={self.prompts!r}: expected a sequence "
                                                "of instructions, e.g. ('Make it red',)"),
            (len(self.prompts) > 0, "prompts: expected at least one instruction"),
            (self.compile_backend is None or isinstance(self.compile_backend, str),
             f"compile_backend={self.compile_backend!r}: expected a torch.compile backend name "
             "such as 'inductor', or None"),
            (not self.cuda_graph or self.method == "decontext",
             "cuda_graph: DeContext steps only (Diff-PGD's clean edits are made per photo)"),
            (not self.cuda_graph or (self.eot_jpeg_quality is None and self.eot_resize is None),
             "cuda_graph: not with eot_jpeg_quality or eot_resize (they change the step on "
             "the host, in every step)"),
            (self.stop_window is None or self.stop_window >= 1,
             f"stop_window={self.stop_window}: expected >= 1 or None"),
            *((getattr(self, name) >= 1, f"{name}={getattr(self, name)}: expected >= 1")
              for name in ("eval_prompts", "diffpgd_edits", "diffpgd_edit_steps")),
        ]
        if self.eot_jpeg_quality is not None:
            low, high = self.eot_jpeg_quality
            checks.append((1 <= low <= high <= 100, f"eot_jpeg_quality={self.eot_jpeg_quality}: "
                           "expected 1 <= low <= high <= 100"))
        if self.eot_resize is not None:
            low, high = self.eot_resize
            checks.append((0 < low <= high,
                           f"eot_resize={self.eot_resize}: expected 0 < low <= high"))
        check_settings("ProtectConfig", checks)


def with_family_defaults(config: ProtectConfig, transformer_name: str | None) -> ProtectConfig:
    """``config`` with the blocks and resolution it leaves open set to those of the model family
    whose transformer class is ``transformer_name`` (unchanged for an unknown one)."""
    defaults = FAMILY_DEFAULTS.get(transformer_name, {})
    return replace(config, blocks=config.blocks or defaults.get("blocks"),
                   resolution=config.resolution or defaults.get("resolution"))


@dataclass
class ProtectResult:
    """One protected photo. ``image``: float [3, H, W] in [0, 1] at the photo's own resolution
    (quantise with :func:`ditflow.io.quantize_within_budget` to keep the budget exact in 8 bits).
    ``r_ctx_before``/``after``: evaluation r_ctx (fixed instructions, t = 990, fixed noise) of
    the clean and the protected photo at the working resolution."""

    name: str
    image: torch.Tensor
    r_ctx_before: float
    r_ctx_after: float
    steps: int
    seconds: float
    working_size: tuple[int, int]
    history: list[float] = field(default_factory=list)


def _photo_seed(seed: int, name: str) -> int:
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes (valid names as before)
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _choice(n: int, generator: torch.Generator) -> int:
    """A uniform draw from 0..n-1."""
    return int(torch.randint(n, (1,), generator=generator))


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).hexdigest()


def _straight_through_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress in the forward pass, identity gradient (BPDA)."""
    from PIL import Image

    out = []
    for img in x.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
        decoded = torch.from_numpy(np.array(Image.open(buffer)))
        out.append(decoded.permute(2, 0, 1).float() / 255)
    compressed = torch.stack(out).to(x.device, x.dtype)
    return x + (compressed - x).detach()


@contextmanager
def _frozen(*modules: torch.nn.Module):
    """No parameter gradients while protecting (the photo is the only variable)."""
    states = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in states:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in states:
            p.requires_grad_(flag)


@contextmanager
def _compiled_blocks(transformer, backend: str | None):
    """The transformer's repeated blocks compiled with ``backend`` while the context lasts
    (diffusers' regional compilation); None: eager. Undone afterwards; compiling again later
    reuses Dynamo's cache, so a later batch does not recompile."""
    if backend is None:
        yield
        return
    if not getattr(transformer, "_repeated_blocks", None):
        raise ValueError(f"compile_backend={backend!r}: {type(transformer).__name__} names no "
                         "repeated blocks to compile (its _repeated_blocks); protect without it")
    transformer.compile_repeated_blocks(backend=backend)
    try:
        yield
    finally:
        for module in transformer.modules():
            module._compiled_call_impl = None  # what Module.compile set


@contextmanager
def _checkpointing(transformer, enabled: bool):
    was = getattr(transformer, "gradient_checkpointing", False)
    if enabled and not was:
        transformer.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not was:
            transformer.disable_gradient_checkpointing()


class Protector:
    """DeContext / Diff-PGD against an in-context editor pipeline (real or tiny; any of
    :data:`ditflow.models.EDITORS`). See the module doc."""

    def __init__(self, pipeline, config: ProtectConfig | None = None):
        self.transformer = pipeline.transformer
        self.calls = edit_calls_for(pipeline)
        self.config = with_family_defaults(config or ProtectConfig(),
                                           type(self.transformer).__name__)
        self.vae = pipeline.vae
        self.device, self.dtype = self.calls.device, self.calls.dtype
        self._prompt_cache: dict[tuple[str, str | None], dict] = {}
        self._digests = TensorMemo()  # photo -> content digest, the prompt cache's key
        # Layouts are cached per call shape: their group ids stay the same tensors, so the
        # kernels' layout checks and tile plans are computed once, not every step.
        self._adapter = adapter_for(self.transformer)
        self._layouts = TensorMemo(max_entries=64)
        check_blocks(self.transformer, map(str, self.config.blocks), "ProtectConfig.blocks")
        self._graphed = self._graphed_gradient() if self.config.cuda_graph else None
        # The VAE encoder's mid-block attention (one head of 384 or 512 channels) as matrix
        # products on a GPU: SDPA's only kernel for such heads is slow (ditflow.wide_attention).
        self.wide_vae_attention = self.device.type == "cuda"
        self.eval_prompts = self.config.prompts[: self.config.eval_prompts]

    def _graphed_gradient(self) -> GraphedGradient:
        if not self.calls.prompts_share_one_graph:
            raise UnsupportedSetting(
                "cuda_graph", f"not for {type(self.transformer).__name__}: its instructions' "
                "embeddings differ in length or padding, and a graph holds for one; protect "
                "without it")
        if self.device.type != "cuda":
            raise UnsupportedSetting("cuda_graph", f"the model is on {self.device}; CUDA graphs "
                                     "need it on a GPU")
        return GraphedGradient(self)

    # -- geometry ------------------------------------------------------------------------------

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): about resolution² pixels at the photo's aspect ratio, snapped as the editor
        snaps (FLUX.1 Kontext: nearest multiples of 16; Qwen-Image-Edit: of 32; Step1X-Edit:
        its pipeline's rounding)."""
        return self.calls.working_size(height, width, self.config.resolution)

    # -- model inputs --------------------------------------------------------------------------

    def _prompt(self, text: str, image: torch.Tensor) -> dict:
        """An instruction's embeddings; for editors whose text encoder sees the photo
        (Qwen-Image-Edit, Step1X-Edit), those of ``image`` ([3, H, W] in [0, 1]) with it."""
        key = (text, self._digests.get((image,), "sha256", lambda: _digest(image))
               if self.calls.prompt_sees_image else None)
        cached = self._prompt_cache.get(key)
        if cached is None:
            photo = to_pil(image) if self.calls.prompt_sees_image else None
            with torch.no_grad():
                cached = self.calls.encode_prompt(text, photo, self.config.max_sequence_length)
            self._prompt_cache[key] = cached
        return cached

    def _inputs(self, pixels, prompts, timesteps, noise, prompt_images=None):
        """Transformer keyword inputs: target noise, then the photos' context tokens; the
        prompt encoder sees ``prompt_images`` (default: the photos themselves)."""
        return self._model_inputs(pixels, self._embeddings(pixels, prompts, prompt_images),
                                  self._timestep(timesteps), noise)

    def _embeddings(self, pixels, prompts, prompt_images=None) -> list[dict]:
        """Each photo's instruction embeddings; the prompt encoder sees ``prompt_images``
        (default: the photos themselves)."""
        seen = pixels.detach() if prompt_images is None else prompt_images
        return [self._prompt(p, image) for p, image in zip(prompts, seen, strict=True)]

    def _model_inputs(self, pixels, embeds: list[dict], timestep: torch.Tensor, noise) -> dict:
        """Transformer keyword inputs from the photos, their instructions' embeddings, the
        timestep tensor and the target noise."""
        with wide_heads_sdpa() if self.wide_vae_attention else nullcontext():
            context = self.calls.context_tokens(pixels)
        return self.calls.inputs(noise, context, embeds, timestep, self.config.guidance,
                                 tuple(pixels.shape[-2:]))

    def _timestep(self, timesteps: Sequence[float]) -> torch.Tensor:
        """The transformer's timestep input: per photo, the scheduler's t (0..1000) / 1000, its
        values also kept on the host, where the session reads them."""
        return copy_to_device(torch.tensor(timesteps, dtype=self.dtype) / 1000, self.device,
                              keep_values=True)

    def _target_shape(self, pixels) -> tuple[int, int]:
        return self.calls.target_shape(*pixels.shape[-2:])

    def _draw(self, gens, pixels):
        """Per-photo draws for one step: instruction, timestep, target noise, EOT choices."""
        cfg = self.config
        tokens, channels = self._target_shape(pixels)
        prompts, ts, noise, jpeg, scale = [], [], [], [], []
        low, high = cfg.timesteps
        for g in gens:
            prompts.append(cfg.prompts[_choice(len(cfg.prompts), g)])
            ts.append(low + (high - low) * float(torch.rand((), generator=g)))
            noise.append(torch.randn(tokens, channels, generator=g))
            if cfg.eot_jpeg_quality is not None:
                ql, qh = cfg.eot_jpeg_quality
                jpeg.append(int(torch.randint(ql, qh + 1, (1,), generator=g)))
            if cfg.eot_resize is not None:
                sl, sh = cfg.eot_resize
                scale.append(sl + (sh - sl) * float(torch.rand((), generator=g)))
        return prompts, ts, copy_to_device(torch.stack(noise), self.device), jpeg, scale

    def _transform(self, x, jpeg: list[int], scale: list[float]) -> torch.Tensor:
        """Expectation over transformations: per-photo resize round trip and JPEG."""
        if not jpeg and not scale:
            return x
        out = []
        for i in range(x.shape[0]):
            xi = x[i: i + 1]
            if scale:
                size = [max(8, round(d * scale[i])) for d in xi.shape[-2:]]
                xi = F.interpolate(F.interpolate(xi, size=size, mode="bilinear", antialias=True),
                                   size=x.shape[-2:], mode="bilinear")
            if jpeg:
                xi = _straight_through_jpeg(xi, jpeg[i])
            out.append(xi)
        return torch.cat(out)

    # -- losses --------------------------------------------------------------------------------

    def _layout(self, inputs) -> TokenLayout:
        return self._adapter.call_layout(inputs, self._layouts)

    @contextmanager
    def attached_r_ctx(self, pixels, prompts, timesteps, noise, prompt_images=None
                       ) -> Iterator[torch.Tensor]:
        """Per-photo r_ctx [B] over the attacked blocks (the forward stops after the last one),
        with ditflow's processors kept on the model until the ``with`` block ends: take its
        gradient inside, so that gradient checkpointing recomputes the blocks as they ran.
        ``prompt_images``: what the prompt encoder sees ([3, H, W] each), if not ``pixels``
        (editors whose prompt encoder sees the photo)."""
        with self._r_ctx_of(self._inputs(pixels, prompts, timesteps, noise, prompt_images)
                            ) as r_ctx:
            yield r_ctx

    @contextmanager
    def _r_ctx_of(self, inputs: dict) -> Iterator[torch.Tensor]:
        """:meth:`attached_r_ctx` of the transformer's keyword inputs."""
        recorder = StatsRecorder(blocks=self.config.blocks, stop_after_last=True)
        with attach(self.transformer, recorder, self._layout(inputs)) as session:
            session.forward(**inputs)
            yield recorder.mean_r_ctx().float()

    def r_ctx(self, pixels, prompts, timesteps, noise, prompt_images=None) -> torch.Tensor:
        """:meth:`attached_r_ctx`'s values, for evaluation (detached from the model's
        processors: a gradient through checkpointed blocks must be taken inside that one)."""
        with self.attached_r_ctx(pixels, prompts, timesteps, noise, prompt_images) as r_ctx:
            return r_ctx

    def at_working_size(self, photos: Sequence[torch.Tensor]) -> torch.Tensor:
        """Photos of one working size (float [3, H, W] in [0, 1]) as the editor sees them:
        resized to it, [B, 3, h, w] on the device."""
        sizes = {self.working_size(*p.shape[-2:]) for p in photos}
        if len(sizes) != 1:
            raise ValueError(f"a batch needs one working size, got {sizes}")
        (size,) = sizes
        return torch.stack([resize_pixels(p.float(), size) for p in photos]).to(self.device)

    def evaluate_r_ctx(self, pixels: torch.Tensor) -> list[float]:
        """Evaluation r_ctx per photo: fixed instructions, t = 990, noise from a fixed seed;
        the editor sees these photos everywhere (its prompt encoder included)."""
        g = torch.Generator().manual_seed(1234)
        tokens, channels = self._target_shape(pixels)
        noise = torch.randn(tokens, channels, generator=g).to(self.device)
        b = pixels.shape[0]
        with torch.no_grad():
            total = sum(self.r_ctx(pixels, [prompt] * b, [990.0] * b, noise.expand(b, -1, -1))
                        for prompt in self.eval_prompts)
        return (total / len(self.eval_prompts)).tolist()

    def edit(self, pixels: torch.Tensor, prompt: str, steps: int, seed: int = 0) -> np.ndarray:
        """The editor's own edit (uint8 [h, w, 3]) of a photo at the working size (float
        [3, h, w] from :meth:`at_working_size`: Kontext would encode a larger photo at its own
        size), seeded."""
        image = self.calls.edit(to_pil(pixels), prompt, tuple(pixels.shape[-2:]), steps,
                                self.config.guidance, self.config.max_sequence_length,
                                torch.Generator().manual_seed(seed))[0]
        return np.asarray(image.convert("RGB"))

    def _clean_edits(self, pixels, gens) -> list[torch.Tensor]:
        """Diff-PGD targets: K = ``diffpgd_edits`` packed latents [B, N, C] of clean edits of
        the photos."""
        cfg = self.config
        size = tuple(pixels.shape[-2:])
        images = [to_pil(p) for p in pixels]
        edits = []
        for _ in range(cfg.diffpgd_edits):
            prompts = [cfg.prompts[_choice(len(cfg.prompts), g)] for g in gens]
            latents = [self.calls.edit(image, prompt, size, cfg.diffpgd_edit_steps, cfg.guidance,
                                       cfg.max_sequence_length, g, output_type="latent")
                       for image, prompt, g in zip(images, prompts, gens, strict=True)]
            edits.append(torch.cat(latents).to(self.dtype))
        return edits

    def _flow_matching_loss(self, pixels, edits, gens, prompts, timesteps, noise, prompt_images):
        """Per-photo MSE of the velocity prediction against a clean edit (to be maximised)."""
        picks = [_choice(len(edits), g) for g in gens]
        target = torch.stack([edits[k][i] for i, k in enumerate(picks)])
        # in fp32: bf16 rounds sigma = 0.99 to 0.9921875 (1 - sigma off by 22 %) and t >= 998 to 1
        sigma = copy_to_device(torch.tensor(timesteps)[:, None, None] / 1000, self.device)
        noisy = ((1 - sigma) * target.float() + sigma * noise.float()).to(self.dtype)
        inputs = self._inputs(pixels, prompts, timesteps, noisy, prompt_images)
        pred = self.transformer(**inputs)[0][:, : target.shape[1]]
        return (pred.float() - (noise - target).float()).square().mean(dim=(1, 2))

    # -- the driver ----------------------------------------------------------------------------

    @contextmanager
    def _batch_embeddings(self):
        """The instructions' embeddings of a batch's photos live as long as its run, a failed
        one too (a bulk run goes on to the next batch): they are not needed again."""
        try:
            yield
        finally:
            if self.calls.prompt_sees_image:
                self._prompt_cache.clear()

    def run(self, names: Sequence[str], photos: Sequence[torch.Tensor],
            on_step: Callable[[int], None] | None = None) -> list[ProtectResult]:
        """Protect photos of one working size together. ``photos``: float [3, H, W] in [0, 1]
        (any H, W; those of a batch must share a working size)."""
        cfg = self.config
        start = time.perf_counter()
        photos = [pixels_tensor(p, f"photo {n!r}") for n, p in zip(names, photos, strict=True)]
        clean = self.at_working_size(photos)
        gens = [torch.Generator().manual_seed(_photo_seed(cfg.seed, n)) for n in names]
        eps, alpha = cfg.epsilon / 255, cfg.step_size / 255
        with _frozen(self.transformer, self.vae), \
                _checkpointing(self.transformer, cfg.gradient_checkpointing), \
                _compiled_blocks(self.transformer, cfg.compile_backend), \
                self._batch_embeddings():
            before = self.evaluate_r_ctx(clean)
            # What the prompt encoder sees while optimising: the clean photos, one stable tensor
            # each (their digests are computed once). An encoder that sees them embeds every
            # instruction now and then idles through the steps.
            clean_photos = clean.unbind()
            if self.calls.prompt_sees_image:
                for photo in clean_photos:
                    for text in dict.fromkeys(cfg.prompts):
                        self._prompt(text, photo)
            edits = self._clean_edits(clean, gens) if cfg.method == "diff-pgd" else None
            adv = clean.clone()
            active = list(range(len(photos)))
            # the photos still optimised, as an index on the device (a list index is copied
            # there in every step, waiting for the queued work)
            rows = copy_to_device(torch.tensor(active, dtype=torch.long), self.device)
            steps_run = [0] * len(photos)
            history: list[list[float]] = [[r] for r in before]
            for step in range(cfg.steps):
                if not active:
                    break
                x = adv.index_select(0, rows).requires_grad_()
                grad, direction = self._step_gradient(x, active, rows, gens, clean_photos, edits)
                with torch.no_grad():
                    adv.index_copy_(0, rows, _project(x + direction * alpha * grad.sign(),
                                                      clean.index_select(0, rows), eps))
                for i in active:
                    steps_run[i] += 1
                if on_step is not None:
                    on_step(step)
                if cfg.stop_window and (step + 1) % cfg.stop_window == 0:
                    active = self._still_improving(adv, active, history)
                    rows = copy_to_device(torch.tensor(active, dtype=torch.long), self.device)
            after = self.evaluate_r_ctx(adv)
        seconds = (time.perf_counter() - start) / len(photos)
        size = tuple(clean.shape[-2:])
        return [ProtectResult(name, _at_photo_size(adv[i] - clean[i], photo, eps), before[i],
                              after[i], steps_run[i], seconds, size, history[i])
                for i, (name, photo) in enumerate(zip(names, photos, strict=True))]

    def _step_gradient(self, x, active, rows, gens, clean_photos, edits
                       ) -> tuple[torch.Tensor, float]:
        """One PGD step's gradient at ``x`` (the photos of ``active``, at ``rows`` of the
        batch) and the direction to move along it: DeContext lowers r_ctx, Diff-PGD raises the
        denoising error."""
        gens = [gens[i] for i in active]
        prompt_images = [clean_photos[i] for i in active]
        prompts, ts, noise, jpeg, scale = self._draw(gens, x)
        with torch.enable_grad():
            seen = self._transform(x, jpeg, scale)
            if self._graphed is not None:  # DeContext without transformations
                grad = self._graphed(x, prompts, ts, noise, prompt_images)
                if grad is not None:  # else the capture failed: eagerly, as without it
                    return grad, -1.0
            if self.config.method == "decontext":
                with self.attached_r_ctx(seen, prompts, ts, noise, prompt_images) as r_ctx:
                    (grad,) = torch.autograd.grad(r_ctx.sum(), x)
                return grad, -1.0
            loss = self._flow_matching_loss(seen, [e.index_select(0, rows) for e in edits],
                                            gens, prompts, ts, noise, prompt_images)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            return grad, 1.0

    def _still_improving(self, adv, active: list[int], history: list[list[float]]
                         ) -> list[int]:
        """The convergence stop: the photos of ``active`` whose r_ctx fell by at least
        ``stop_min_gain`` since the last check (each photo's r_ctx appended to its history)."""
        still = []
        for i, r in zip(active, self.evaluate_r_ctx(adv[active]), strict=True):
            if history[i][-1] - r >= self.config.stop_min_gain:
                still.append(i)
            history[i].append(r)
        return still


def _project(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` in the L-inf ball of radius ``eps`` around ``clean``, and in [0, 1]."""
    return torch.minimum(torch.maximum(x, clean - eps), clean + eps).clamp(0, 1)


def _at_photo_size(delta: torch.Tensor, photo: torch.Tensor, eps: float) -> torch.Tensor:
    """The protected photo: a perturbation found at the working size, resized (bilinear) to
    the photo's own and added to it, within the budget."""
    delta = F.interpolate(delta[None].float().cpu(), size=photo.shape[-2:], mode="bilinear")[0]
    original = photo.float().cpu()
    return _project(original + delta, original, eps)


def evaluate_protection(protector: Protector, clean: np.ndarray, protected: np.ndarray,
                        prompt: str, edit_steps: int, faces=None) -> dict:
    """The paper's measures of one protected photo (uint8 [H, W, 3], the clean one's size):
    r_ctx of clean and protected at the working size, how alike the editor's edits of the two
    are (PSNR, SSIM), the perturbation's PSNR, SSIM and L-inf and, given a
    :class:`~ditflow.faces.FaceEmbedder`, the identity similarity of each edit to the clean
    photo's person (protection works when the protected photo's edit no longer shows them)."""
    from ..io import linf, psnr, ssim

    working = protector.at_working_size([pixels_tensor(clean), pixels_tensor(protected)])
    r_clean, r_protected = protector.evaluate_r_ctx(working)
    edits = [protector.edit(pixels, prompt, edit_steps) for pixels in working]
    row = dict(r_ctx_clean=r_clean, r_ctx_protected=r_protected, edit_psnr=psnr(*edits),
               edit_ssim=ssim(*edits), perturbation_psnr=psnr(clean, protected),
               perturbation_ssim=ssim(clean, protected), linf=linf(clean, protected))
    if faces is not None:
        row.update(face_sim_clean_edit=faces.similarity(clean, edits[0]),
                   face_sim_protected_edit=faces.similarity(clean, edits[1]))
    return row


def iter_protect(named_photos: Sequence[tuple[str, torch.Tensor]], pipeline,
                 config: ProtectConfig | None = None,
                 on_step: Callable[[int], None] | None = None) -> Iterator[ProtectResult]:
    """Protect photos batch by batch (photos of one working size share a batch), yielding each
    result as soon as its batch is done. Photos as :func:`protect` takes them, all in memory
    (:class:`ditflow.bulk.BatchedProtection` batches files with bounded memory)."""
    protector = Protector(pipeline, config)
    by_size: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
    for name, photo in named_photos:
        photo = pixels_tensor(photo, f"photo {name!r}")  # all checked before any work
        by_size.setdefault(protector.working_size(*photo.shape[-2:]), []).append((name, photo))
    for group in by_size.values():
        for start in range(0, len(group), protector.config.batch_size):
            batch = group[start: start + protector.config.batch_size]
            yield from protector.run([n for n, _ in batch], [p for _, p in batch], on_step)


def protect(photos: Sequence[torch.Tensor], pipeline, config: ProtectConfig | None = None
            ) -> list[ProtectResult]:
    """Protect photos (float tensors [3, H, W] in [0, 1], PIL images or uint8 arrays [H, W, 3])
    with DeContext (or Diff-PGD); results (float [3, H, W]) in input order. For files, use
    ``ditflow protect`` (manifest, resume, image formats)."""
    named = [(f"photo{i}", p) for i, p in enumerate(photos)]
    results = {r.name: r for r in iter_protect(named, pipeline, config)}
    return [results[name] for name, _ in named]


__all__ = ["DEFAULT_BLOCKS", "ProtectConfig", "ProtectResult", "Protector", "UnsupportedSetting",
           "evaluate_protection", "iter_protect", "protect"]
