"""The settings each command runs a model with, unless its options say otherwise: the built-in
models that ``--model`` names (the trained testbed, the random tiny pipelines) and, for a real
model's folder, the published recipe of the method the command runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A built-in model's settings, the same for every command.

    Attributes:
        resolution: working resolution in pixels (``generate``: the image side).
        text_tokens: T5 tokens of the prompt or instruction.
        blocks: the blocks DeContext attacks (small sets for the tiny models; the testbed's
            front single-stream blocks, as DeContext's single.0..25 of FLUX.1's 38).
        family: its transformer's class, as :data:`ditflow.models.FAMILIES` names it.
        own_instructions: whether the model has its own instruction pool (the testbed editor
            knows only its scenes' vocabulary), used for DeContext instead of the 60 of
            :data:`~ditflow.methods.prompts.PROMPT_POOL`.
    """

    resolution: int
    text_tokens: int
    blocks: tuple[str, ...]
    family: str = "FluxTransformer2DModel"
    guidance: float = 1.0
    steps: int = 20
    own_instructions: bool = False

    @property
    def generates(self) -> bool:
        """Whether ``generate`` and ``edit`` can drive it: they run FLUX.1 pipelines (the tiny
        Qwen-Image-Edit and Step1X-Edit only protect and evaluate)."""
        return self.family == "FluxTransformer2DModel"

    def instructions(self) -> tuple[str, ...] | None:
        """The model's own DeContext instruction pool, or None for the default one."""
        if not self.own_instructions:
            return None
        from ..testbed.scenes import instruction_pool

        return instruction_pool()


TINY_BLOCKS = ("double.0", "double.1", "single.0", "single.1")
BUILTIN = {
    "testbed": Preset(32, 24, ("single.0", "single.1", "single.2"), own_instructions=True),
    "tiny": Preset(32, 16, TINY_BLOCKS),
    "tiny-qwen": Preset(64, 16, ("double.0", "double.1"), "QwenImageTransformer2DModel"),
    "tiny-step1x": Preset(32, 16, TINY_BLOCKS, "Step1XEditTransformer"),
}

# A real FLUX.1 model's settings per command: the authors' (DeLeaker and a plain generation:
# 512², 256 tokens, 20 steps; UVR: 1024², 512 tokens, 28 steps) and FLUX.1 Kontext's pipeline
# defaults for edits. protect and evaluate take a model folder's resolution and blocks from its
# family (decontext.FAMILY_DEFAULTS), once the folder says which it is.
REAL = {
    "generate": dict(resolution=512, text_tokens=256, guidance=3.5, steps=20),
    "generate-uvr": dict(resolution=1024, text_tokens=512, guidance=3.5, steps=28),
    "edit": dict(resolution=1024, text_tokens=512, guidance=3.5, steps=28),
    "protect": dict(resolution=None, text_tokens=512, blocks=None),
}


def defaults(model: str, command: str) -> dict:
    """What ``command`` (a key of :data:`REAL`) runs ``model`` with where no option is given:
    the built-in model's preset, else the real model's."""
    preset = BUILTIN.get(model)
    if preset is None:
        return dict(REAL[command])
    return {key: getattr(preset, key) for key in REAL[command]}


def protect_defaults(model: str) -> dict:
    """The :class:`~ditflow.methods.decontext.ProtectConfig` fields that depend on ``model``:
    working resolution, attacked blocks (both None for a model folder: the protector takes its
    family's), instruction tokens and, for the testbed, its own instruction pool."""
    settings = defaults(model, "protect")
    fields = dict(resolution=settings["resolution"], blocks=settings["blocks"],
                  max_sequence_length=settings["text_tokens"])
    instructions = BUILTIN[model].instructions() if model in BUILTIN else None
    if instructions is not None:
        fields["prompts"] = instructions
    return fields
