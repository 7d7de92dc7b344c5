"""Offline tiny FLUX models, built in code (no hub access), for tests and demos.

The transformer follows the configuration diffusers' own tests use for FLUX, with two blocks of
each kind so early stop and per-block statistics have something to skip.
"""

from __future__ import annotations

import torch


def tiny_flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2,
                          dtype: torch.dtype = torch.float32):
    """A random FluxTransformer2DModel: 2 heads x 16, 4 latent channels, rope axes (4, 4, 8)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def image_ids(height: int, width: int, index: int = 0) -> torch.Tensor:
    """FLUX position ids [height * width, 3] of one packed image; Kontext context images carry
    ``index`` 1 on the first axis."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(height: int, width: int, text_len: int = 8, contexts: int = 0, batch: int = 1,
                seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Random keyword inputs for one call of the tiny transformer: a ``height x width`` target
    (packed tokens) followed by ``contexts`` context images of the same size."""
    g = torch.Generator().manual_seed(seed)
    tokens = height * width * (1 + contexts)
    ids = torch.cat([image_ids(height, width)] + [image_ids(height, width, 1)] * contexts)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        hidden_states=rand(batch, tokens, 4),
        encoder_hidden_states=rand(batch, text_len, 32),
        pooled_projections=rand(batch, 32),
        timestep=torch.full((batch,), 0.99, device=device, dtype=dtype),
        img_ids=ids.to(device, dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        guidance=None,
        return_dict=False,
    )
