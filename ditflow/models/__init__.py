"""Model adapters: how a model's attention blocks map onto flow attention.

An adapter names a transformer's blocks (``blocks``), installs ditflow processors on them
(``install`` / ``restore``) and reads the token layout of each transformer call
(``call_layout``). Edit-call builders (``KontextCalls``, ``QwenEditCalls``,
``QwenEditPlusCalls``) make the transformer inputs of an edit step directly, for drivers that
differentiate through the model.
"""

from __future__ import annotations

import importlib

import torch

# transformer class name -> (module, adapter class, edit-call builder factory, models it serves)
ADAPTERS = {
    "FluxTransformer2DModel": ("flux", "FluxAdapter", "KontextCalls",
                               "FLUX.1, FLUX.1 Kontext"),
    "QwenImageTransformer2DModel": ("qwenimage", "QwenImageAdapter", "qwen_edit_calls",
                                    "Qwen-Image, Qwen-Image-Edit"),
}


def _member(transformer: torch.nn.Module, index: int):
    name = type(transformer).__name__
    if name not in ADAPTERS:
        supported = "; ".join(f"{cls} ({entry[-1]})" for cls, entry in ADAPTERS.items())
        raise TypeError(f"ditflow has no adapter for {name}; supported: {supported}")
    module = ADAPTERS[name][0]
    try:
        return getattr(importlib.import_module(f".{module}", __name__), ADAPTERS[name][index])
    except ImportError as exc:
        raise ImportError(f"{name} support needs diffusers: pip install 'ditflow[diffusers]'"
                          ) from exc


def adapter_for(transformer: torch.nn.Module):
    """The adapter for ``transformer``; a clear error for models ditflow does not know."""
    return _member(transformer, 1)()


def edit_calls_for(pipeline):
    """The builder of direct transformer calls for edits with ``pipeline`` (an in-context
    editor: FLUX.1 Kontext, Qwen-Image-Edit or Qwen-Image-Edit-2509/2511)."""
    return _member(pipeline.transformer, 2)(pipeline)
