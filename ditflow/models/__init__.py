"""Model adapters: how a model's attention blocks map onto flow attention."""

from __future__ import annotations

import torch


def adapter_for(transformer: torch.nn.Module):
    """The adapter for ``transformer``; a clear error for models ditflow does not know."""
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        try:
            from .flux import FluxAdapter
        except ImportError as exc:
            raise ImportError("FLUX support needs diffusers: pip install 'ditflow[diffusers]'"
                              ) from exc
        return FluxAdapter()
    raise TypeError(f"ditflow has no adapter for {name}; supported: FluxTransformer2DModel "
                    "(FLUX.1, FLUX.1 Kontext)")
