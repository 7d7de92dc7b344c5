"""Model adapters: how a model's attention blocks map onto flow attention.

An adapter names a transformer's blocks (``blocks``), installs ditflow processors on them
(``install`` / ``restore``) and reads the token layout of each transformer call
(``call_layout``).
"""

from __future__ import annotations

import importlib

import torch

# transformer class name -> (module, adapter class, models it serves)
ADAPTERS = {
    "FluxTransformer2DModel": ("flux", "FluxAdapter", "FLUX.1, FLUX.1 Kontext"),
    "QwenImageTransformer2DModel": ("qwenimage", "QwenImageAdapter",
                                    "Qwen-Image, Qwen-Image-Edit"),
}


def adapter_for(transformer: torch.nn.Module):
    """The adapter for ``transformer``; a clear error for models ditflow does not know."""
    name = type(transformer).__name__
    if name not in ADAPTERS:
        supported = "; ".join(f"{cls} ({models})" for cls, (_, _, models) in ADAPTERS.items())
        raise TypeError(f"ditflow has no adapter for {name}; supported: {supported}")
    module, adapter, _ = ADAPTERS[name]
    try:
        return getattr(importlib.import_module(f".{module}", __name__), adapter)()
    except ImportError as exc:
        raise ImportError(f"{name} support needs diffusers: pip install 'ditflow[diffusers]'"
                          ) from exc
