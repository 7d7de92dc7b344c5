"""FLUX's rotary position embedding of queries and keys, fused where flow attention runs its
Triton kernels.

:func:`apply_rotary` is diffusers' ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (pairs
interleaved, computed in fp32, rounded once to ``x``'s dtype): one kernel instead of about eight
per tensor, and one for its gradient. Elsewhere (the CPU backends, under ``torch.compile``,
whose Inductor fuses diffusers' version itself) it is diffusers' function.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor

from . import ops
from .functional import resolve_backend


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return ops._kernels().rotary_embedding(x, cos, sin)

    @staticmethod
    def backward(ctx, dout: Tensor):
        cos, sin = ctx.saved_tensors
        dx = ops._kernels().rotary_embedding(ops.unit_channel_stride(dout), cos, sin,
                                             transpose=True)
        return dx, None, None



def _fused_here(x: Tensor, cos: Tensor) -> bool:
    """Whether the kernel serves ``x`` [B, S, H, D]: flow attention's Triton backend for its
    device and dtype, a head dim of 2^k (k >= 1: a row is one load), fp32 frequencies of
    ``x``'s length."""
    head_dim = x.shape[-1]
    return (not torch.compiler.is_compiling()
            and resolve_backend(None, x.device, x.dtype) == "triton"
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0
            and cos.dtype == torch.float32 and cos.shape == (x.shape[1], head_dim))


def apply_rotary(x: Tensor, freqs: tuple[Tensor, Tensor]) -> Tensor:
    """``x`` [B, S, H, D] rotated by FLUX's ``(cos, sin)`` [S, D] (its ``image_rotary_emb``)."""
    cos, sin = freqs
    if not _fused_here(x, cos):
        return apply_rotary_emb(x, freqs, sequence_dim=1)
    cos, sin = cos.to(x.device).contiguous(), sin.to(x.device).contiguous()
    return _FusedRotary.apply(ops.unit_channel_stride(x), cos, sin)
