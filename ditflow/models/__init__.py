"""Model adapters: how a model's attention blocks map onto flow attention.

An adapter names a transformer's blocks (``blocks``), installs ditflow processors on them
(``install`` / ``restore``) and reads the token layout of each transformer call
(``call_layout``). Edit-call builders (``KontextCalls``, ``QwenEditCalls``,
``QwenEditPlusCalls``, ``Step1XEditCalls``) make the transformer inputs of an edit step
directly, for drivers that differentiate through the model.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch


class ModelFamily(NamedTuple):
    module: str  # ditflow.models.<module>
    adapter: str  # processors, block names, each call's layout
    edit_calls: str  # builds an edit step's transformer inputs (in-context editors)
    models: str  # what it serves, for error messages


FAMILIES = {
    "FluxTransformer2DModel": ModelFamily("flux", "FluxAdapter", "KontextCalls",
                                          "FLUX.1, FLUX.1 Kontext"),
    "QwenImageTransformer2DModel": ModelFamily("qwenimage", "QwenImageAdapter",
                                               "qwen_edit_calls", "Qwen-Image, Qwen-Image-Edit"),
    "Step1XEditTransformer": ModelFamily("step1x", "Step1XAdapter", "Step1XEditCalls",
                                         "Step1X-Edit"),
}


def _compiled_from(transformer: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (or ``transformer`` itself): its class names the
    family and its modules the blocks."""
    return getattr(transformer, "_orig_mod", transformer)


def _member(transformer: torch.nn.Module, member: str):
    name = type(_compiled_from(transformer)).__name__
    family = FAMILIES.get(name)
    if family is None:
        supported = "; ".join(f"{cls} ({f.models})" for cls, f in FAMILIES.items())
        raise TypeError(f"ditflow has no adapter for {name}; supported: {supported}")
    try:
        module = importlib.import_module(f".{family.module}", __name__)
    except ImportError as exc:
        raise ImportError(f"{name} support needs diffusers: pip install 'ditflow[diffusers]'"
                          ) from exc
    return getattr(module, getattr(family, member))


def adapter_for(transformer: torch.nn.Module):
    """The adapter for ``transformer``; a clear error for models ditflow does not know."""
    return _member(transformer, "adapter")()


class UnknownBlocks(ValueError):
    """Block names a model lacks; ``what`` set them (a config field, an option)."""

    def __init__(self, what: str, missing: list[str], known: list[str]):
        super().__init__(what, missing, known)
        self.what, self.missing, self.known = what, missing, known

    def __str__(self) -> str:
        return self.named(self.what)

    def named(self, what: str) -> str:
        """The message, saying that ``what`` set the blocks."""
        return (f"{what}: {self.missing} not in this model ({len(self.known)} blocks: "
                f"{self.known[0]} .. {self.known[-1]})")


def check_blocks(transformer: torch.nn.Module, names, what: str) -> None:
    """Refuse block names (``"single.3"``) that ``transformer`` lacks, naming ``what`` set
    them (:class:`UnknownBlocks`)."""
    transformer = _compiled_from(transformer)
    known = [str(block) for block, _ in adapter_for(transformer).blocks(transformer)]
    missing = sorted(set(names) - set(known))
    if missing:
        raise UnknownBlocks(what, missing, known)


# In-context editors (a photo in, its edit out); text-to-image pipelines of the same families
# share their transformers but never see a context image.
EDITORS = ("FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
           "Step1XEditPipeline")


def edit_calls_for(pipeline):
    """The builder of direct transformer calls for edits with ``pipeline`` (an in-context
    editor: FLUX.1 Kontext, Qwen-Image-Edit, Qwen-Image-Edit-2509/2511 or Step1X-Edit)."""
    if not any(cls.__name__ in EDITORS for cls in type(pipeline).__mro__):
        raise TypeError(f"{type(pipeline).__name__} is not an in-context editor (it edits no "
                        f"photo); expected one of {', '.join(EDITORS)}")
    return _member(pipeline.transformer, "edit_calls")(pipeline)
