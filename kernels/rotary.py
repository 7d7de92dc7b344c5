"""FLUX's rotary position embedding as one Triton kernel, forward and backward. Its launcher is
:func:`.launch.rotary_embedding`.

For each token s and channel pair (2j, 2j + 1) of ``x`` [B, S, H, D] (diffusers'
``apply_rotary_emb`` with interleaved pairs, computed in fp32 and rounded once)::

    out[2j]     = x[2j] cos[s, 2j]     - x[2j+1] sin[s, 2j]
    out[2j + 1] = x[2j+1] cos[s, 2j+1] + x[2j] sin[s, 2j+1]

and its transpose for the backward. diffusers makes about eight kernels of it per tensor (the
pair swap, fp32 copies, products, the cast), each a pass over the tensor in memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr,
                   stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, stride_fs,
                   seq_len, heads,
                   HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, TRANSPOSE: tl.constexpr):
    """One head of one batch element over BLOCK_S tokens; TRANSPOSE applies the transposed
    rotation (the backward: dx from dout). Rows are loaded whole (vectorised) and split into
    their even and odd channels in registers."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    channels = tl.arange(0, HEAD_DIM)
    rows = s[:, None] < seq_len

    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + s[:, None] * stride_xs + channels[None, :],
                mask=rows).to(tl.float32)
    freq_at = s[:, None] * stride_fs + channels[None, :]
    cos = tl.load(cos_ptr + freq_at, mask=rows)
    sin = tl.load(sin_ptr + freq_at, mask=rows)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_S, HEAD_DIM // 2, 2)))
    cos_even, cos_odd = tl.split(tl.reshape(cos, (BLOCK_S, HEAD_DIM // 2, 2)))
    sin_even, sin_odd = tl.split(tl.reshape(sin, (BLOCK_S, HEAD_DIM // 2, 2)))
    if TRANSPOSE:
        out_even = x_even * cos_even + x_odd * sin_odd
        out_odd = x_odd * cos_odd - x_even * sin_even
    else:
        out_even = x_even * cos_even - x_odd * sin_even
        out_odd = x_odd * cos_odd + x_even * sin_odd
    out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_S, HEAD_DIM))

    tl.store(out_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + channels[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows)
