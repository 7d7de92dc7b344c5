"""Rotary position embeddings of queries and keys, fused where flow attention runs its Triton
kernels.

:func:`apply_rotary` is diffusers' ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (FLUX:
pairs interleaved, computed in fp32, rounded once to ``x``'s dtype) and
:func:`apply_rotary_complex` its ``apply_rotary_emb_qwen(x, freqs, use_real=False)``
(Qwen-Image: the pairs as complex numbers times complex frequencies, the same rotation): one
kernel instead of about eight per tensor, and one for its gradient. Elsewhere (the CPU
backends, under ``torch.compile``, whose Inductor fuses diffusers' versions itself) they are
diffusers' functions.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import Tensor

from . import ops
from ._memo import TensorMemo
from .functional import resolve_backend

# Qwen-Image's complex frequencies as interleaved (cos, sin): made once per transformer call
# (its blocks share one frequency tensor)
_interleaved = TensorMemo(max_entries=4)


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


def _fused_here(x: Tensor, freqs: Tensor, channels: int) -> bool:
    """Whether the kernel serves ``x`` [B, S, H, D]: flow attention's Triton backend for its
    device and dtype, a head dim of 2^k (k >= 1: a row is one load), frequencies of ``x``'s
    length with ``channels`` each."""
    head_dim = x.shape[-1]
    return (not torch.compiler.is_compiling()
            and resolve_backend(None, x.device, x.dtype) == "triton"
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0
            and freqs.shape == (x.shape[1], channels))


def apply_rotary(x: Tensor, freqs: tuple[Tensor, Tensor]) -> Tensor:
    """``x`` [B, S, H, D] rotated by FLUX's ``(cos, sin)`` [S, D] (its ``image_rotary_emb``)."""
    cos, sin = freqs
    if not (cos.dtype == torch.float32 and _fused_here(x, cos, x.shape[-1])):
        return apply_rotary_emb(x, freqs, sequence_dim=1)
    cos, sin = cos.to(x.device).contiguous(), sin.to(x.device).contiguous()
    return _FusedRotary.apply(ops.unit_channel_stride(x), cos, sin)


def apply_rotary_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """``x`` [B, S, H, D] rotated by Qwen-Image's complex ``freqs`` [S, D / 2]."""
    if not (freqs.dtype == torch.complex64 and _fused_here(x, freqs, x.shape[-1] // 2)):
        return apply_rotary_emb_qwen(x, freqs, use_real=False)
    cos, sin = _interleaved.get((freqs,), x.device, lambda: tuple(
        part.repeat_interleave(2, dim=-1).contiguous().to(x.device)
        for part in torch.view_as_real(freqs).unbind(-1)))
    return _FusedRotary.apply(ops.unit_channel_stride(x), cos, sin)
