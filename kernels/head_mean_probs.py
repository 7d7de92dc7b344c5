"""Head-mean softmax probabilities of plain attention, ``mean_h softmax_j(scale q_ih . k_jh)``,
as [Nq, Nk] fp32, without the [H, Nq, Nk] scores (DeLeaker's image-image cuts read them every
block). Their launcher is :func:`.launch.head_mean_probs`.

Two kernels: the first takes each query's log-sum-exp per head over all keys (an attention
forward without values), the second recomputes each tile's scores head by head and sums
``exp2(s - lse)``. Both work in the log2 domain (``log2(e)`` folded into the scale) and accumulate
the products of the inputs in fp32, so bf16 and fp16 inputs give what their fp32 upcast gives.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _head_lse_kernel(q_ptr, k_ptr, lse_ptr, stride_qn, stride_qh, stride_kn, stride_kh,
                     nq, nk, head_dim, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """lse[h, i] (log2 domain) of BLOCK_M queries of one head over every key."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    channels = offs_d[None, :] < head_dim
    q = tl.load(q_ptr + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                mask=(offs_m[:, None] < nq) & channels, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :],
                    mask=(offs_n[:, None] < nk) & channels, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(offs_n[None, :] < nk, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + h * nq + offs_m, m_i + tl.log2(l_i), mask=offs_m < nq)


@triton.jit
def _head_mean_probs_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, stride_qn, stride_qh, stride_kn,
                            stride_kh, nq, nk, heads, head_dim, qk_scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of the head-mean probabilities, summed over the heads."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    channels = offs_d[None, :] < head_dim
    rows = offs_m < nq
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(heads):
        q = tl.load(q_ptr + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=rows[:, None] & channels, other=0.0)
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :],
                    mask=(offs_n[:, None] < nk) & channels, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        lse = tl.load(lse_ptr + h * nq + offs_m, mask=rows, other=0.0)
        acc += tl.exp2(s - lse[:, None])
    tl.store(out_ptr + offs_m[:, None] * nk + offs_n[None, :], acc / heads,
             mask=rows[:, None] & (offs_n[None, :] < nk))
