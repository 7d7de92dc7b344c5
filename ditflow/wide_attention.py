"""Attention over heads wider than 256 channels: the VAE encoders' mid-block attention (FLUX.1's
one head of 512 channels, Qwen-Image's of 384) over every latent pixel, which DeContext's step
differentiates through.

PyTorch's SDPA has no flash or cuDNN kernel for such heads and falls back to its
memory-efficient one, slow there: its backward alone took 60 ms of a 1024² FLUX.1 Kontext step
on an H200 (16384 tokens; benchmarks/NOTES.md, v14). Here the same attention is plain matrix
products over query chunks (scores fp32, probabilities cast to the inputs' dtype for the
products with values, as flash-style kernels do), and the backward recomputes each chunk's
probabilities from the saved log-sum-exp, so memory stays linear in the tokens.

:func:`wide_heads_sdpa` routes ``scaled_dot_product_attention`` calls with such heads (no mask,
dropout or causality) to :func:`wide_attention` while it is active.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# SDPA's flash and cuDNN kernels take heads up to this many channels
WIDEST_FUSED_HEAD = 256
# fp32 score elements per query chunk (64 MiB)
CHUNK_SCORES = 1 << 24
# half-precision products with fp32 outputs (torch 2.8 on); before, inputs are upcast
_FP32_OUT = torch.__version__ >= "2.8"


def _scores(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` ([G, M, K] x [G, K, N]) in fp32 at least: half-precision inputs multiply
    exactly and accumulate in fp32 on a GPU's tensor cores; elsewhere upcast."""
    if _FP32_OUT and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    wide = torch.promote_types(a.dtype, torch.float32)
    return torch.bmm(a.to(wide), b.to(wide))


class _WideAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int) -> Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:2], dtype=torch.promote_types(q.dtype, torch.float32))
        k_t = k.transpose(1, 2)
        for start in range(0, q.shape[1], chunk):
            rows = slice(start, start + chunk)
            scores = _scores(q[:, rows], k_t) * scale
            lse[:, rows] = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[:, rows, None])
            out[:, rows] = torch.bmm(probs.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=lse.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=lse.dtype, device=v.device)
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        for start in range(0, q.shape[1], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp(_scores(q[:, rows], k_t) * scale - lse[:, rows, None])
            grad = dout[:, rows]
            dv += _scores(probs.to(v.dtype).transpose(1, 2), grad)
            delta = (grad.to(lse.dtype) * out[:, rows].to(lse.dtype)).sum(-1, keepdim=True)
            dscores = (probs * (_scores(grad, v_t) - delta) * scale).to(q.dtype)
            dq[:, rows] = torch.bmm(dscores, k)
            dk += _scores(dscores.transpose(1, 2), q[:, rows])
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def wide_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Softmax attention of ``q`` [..., Nq, D] over ``k``, ``v`` [..., Nk, D] (the leading
    dimensions alike), differentiable: ``scaled_dot_product_attention`` without mask, dropout
    or causality, for any head width."""
    *lead, nq, head_dim = q.shape
    nk = k.shape[-2]
    scale = head_dim**-0.5 if scale is None else scale
    chunk = max(1, CHUNK_SCORES // max(nk, 1))
    out = _WideAttention.apply(q.reshape(-1, nq, head_dim), k.reshape(-1, nk, head_dim),
                               v.reshape(-1, nk, v.shape[-1]), scale, chunk)
    return out.reshape(*lead, nq, v.shape[-1])


class _WideHeadsMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.routed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _routable(*args, **kwargs):
            self.routed += 1
            q, k, v = args[:3]
            return wide_attention(q, k, v, kwargs.get("scale"))
        return func(*args, **kwargs)


def _routable(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> bool:
    return (query.shape[-1] > WIDEST_FUSED_HEAD and attn_mask is None and dropout_p == 0.0
            and not is_causal and not enable_gqa and query.shape[:-2] == key.shape[:-2])


@contextmanager
def wide_heads_sdpa():
    """Within the block, ``scaled_dot_product_attention`` calls with heads wider than
    :data:`WIDEST_FUSED_HEAD` (and no mask, dropout or causality) run :func:`wide_attention`;
    yields the mode, whose ``routed`` counts them."""
    with _WideHeadsMode() as mode:
        yield mode
