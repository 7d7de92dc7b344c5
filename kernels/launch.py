"""Launchers of the flow-attention kernels: :class:`FlowInputs` (everything but q/k/v that
shapes the computation), the tile plan for a block shape (:func:`plan_for`), and
:func:`flow_attention_forward` / :func:`flow_attention_backward`, which marshal tensors, strides
and flags into the ``@triton.jit`` kernels of :mod:`.flow_attention`; and
:func:`rotary_embedding` and :func:`head_mean_probs`, the launchers of :mod:`.rotary` and
:mod:`.head_mean_probs`.

Imports only torch and triton: validation, caching of plans and autograd live in
``ditflow.ops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .configs import FlowConfigs, KernelConfig
from .flow_attention import (
    LOG2E_FLOAT,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_preprocess_kernel,
    _fwd_kernel,
)
from .head_mean_probs import _head_lse_kernel, _head_mean_probs_kernel
from .rotary import _rotary_kernel
from .tile_plan import TilePlan, aligned_offset, build_tile_plan


@dataclass(frozen=True)
class FlowInputs:
    """Everything but q/k/v that shapes the computation, already on the inputs' device.

    ``q_groups``/``k_groups`` int32 [1 or B, N]; tables fp32 [1 or H, G, G]; ``pair_bits`` int32
    [1 or B, Nq, ceil(Nk/32)]. Absent entries mean: one group / no rule of that kind / no mask.
    """

    num_groups: int = 1
    q_groups: torch.Tensor | None = None
    k_groups: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    pair_bits: torch.Tensor | None = None

    def flags(self) -> dict:
        return dict(
            NUM_GROUPS=self.num_groups,
            HAS_GROUPS=self.q_groups is not None,
            HAS_SCALE=self.scale is not None,
            HAS_BIAS=self.bias is not None,
            HAS_WEIGHT=self.weight is not None,
            HAS_PAIR_MASK=self.pair_bits is not None,
        )

    def allowed_pairs(self) -> torch.Tensor | None:
        """[G, G] bool: group pairs that at least one head does not block."""
        if self.bias is None:
            return None
        return (self.bias > float("-inf")).any(dim=0)


def _table_args(inputs: FlowInputs, like: torch.Tensor):
    """Tables expanded to a common head count (a dummy pointer for absent ones) and the
    stride between heads (0 when all heads share the tables)."""
    tables = [inputs.scale, inputs.bias, inputs.weight]
    heads = max([t.shape[0] for t in tables if t is not None] + [1])
    dummy = like.new_empty(1, dtype=torch.float32)
    head_stride = inputs.num_groups**2 if heads > 1 else 0
    return [dummy if t is None else t.expand(heads, -1, -1).contiguous() for t in tables], head_stride


def _batch_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.shape[0] == 1 else t.stride(0)


def plan_for(inputs: FlowInputs, nq: int, nk: int, cfg: KernelConfig, device) -> TilePlan:
    """The tile plan of ``inputs``' layout at ``cfg``'s block shape (callers cache it), its tiles
    shifted to put group boundaries between them where no pair mask is set."""
    offsets = (0, 0) if inputs.pair_bits is not None else (
        aligned_offset(inputs.q_groups, nq, cfg.block_m, inputs.num_groups),
        aligned_offset(inputs.k_groups, nk, cfg.block_n, inputs.num_groups))
    return build_tile_plan(nq, nk, cfg.block_m, cfg.block_n, device, inputs.num_groups,
                           inputs.q_groups, inputs.k_groups, inputs.allowed_pairs(), inputs.pair_bits,
                           *offsets)


def _common_args(inputs: FlowInputs, q: torch.Tensor):
    """Arguments every kernel takes: group ids, tables, pair bits (dummy pointers where
    absent) and their strides, in the kernels' parameter order."""
    dummy_int = q.new_empty(1, dtype=torch.int32)
    tables, table_head_stride = _table_args(inputs, q)
    groups = [dummy_int if g is None else g for g in (inputs.q_groups, inputs.k_groups)]
    bits = dummy_int if inputs.pair_bits is None else inputs.pair_bits
    pointers = (*groups, *tables, bits)
    strides = (
        _batch_stride(inputs.q_groups), _batch_stride(inputs.k_groups), table_head_stride,
        _batch_stride(inputs.pair_bits),
        0 if inputs.pair_bits is None else inputs.pair_bits.stride(1),
    )
    return pointers, strides


def _token_strides(*tensors: torch.Tensor) -> list[int]:
    """The batch, token and head strides of ``[B, N, H, D]`` tensors, in order (the kernels
    take head dims contiguous)."""
    return [stride for t in tensors for stride in t.stride()[:3]]


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _tma_allows(t: torch.Tensor) -> bool:
    """TMA reads ``t``: the GPU has the copy engine (the interpreter emulates it), ``t`` is not
    empty (a descriptor's dimensions are positive), the base is 16-byte aligned and so is every
    stride but the last, which is 1."""
    if t.numel() == 0 or (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9):
        return False
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1]))


def _tile_operands(cfg: KernelConfig, rows: int, block_d: int, *tensors: torch.Tensor):
    """The ``[B, N, H, D]`` tensors a kernel reads per tile, as TMA descriptors of
    ``rows x block_d`` boxes when ``cfg.tma`` and every tensor allows it, else as they are;
    and whether they are descriptors (the kernels' ``TMA`` flag)."""
    if not (cfg.tma and all(_tma_allows(t) for t in tensors)):
        return tensors, False
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, block_d])
                 for t in tensors), True


def flow_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: FlowInputs,
    softmax_scale: float,
    return_mass: bool,
    plan: TilePlan,
    cfg: KernelConfig,
):
    """q [B, Nq, H, D], k/v [B, Nk, H, D] with unit stride on D. Returns out, lse, mass."""
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, nq, device=q.device, dtype=torch.float32)
    mass = (torch.empty(batch, heads, nq, inputs.num_groups, device=q.device, dtype=torch.float32)
            if return_mass else lse.new_empty(0))
    mass_arg = mass if return_mass else lse.new_empty(1)  # kernels get a real pointer
    pointers, strides = _common_args(inputs, q)
    block_d = _block_d(head_dim)
    grid = (triton.cdiv(nq + plan.q_offset, cfg.block_m), batch * heads)
    (k_tiles, v_tiles), tma = _tile_operands(cfg, cfg.block_n, block_d, k, v)
    _fwd_kernel[grid](
        q, k_tiles, v_tiles, out, lse, mass_arg, *pointers,
        plan.q_uniform_group, plan.row_counts, plan.row_tiles, plan.row_groups,
        *_token_strides(q, k, v, out),
        *strides,
        int(plan.batched), plan.q_offset, plan.k_offset, heads, nq, nk, head_dim,
        softmax_scale * LOG2E_FLOAT,
        **inputs.flags(), RETURN_MASS=return_mass, EVEN_D=head_dim == block_d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype), TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse, mass


def flow_attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    dmass: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mass: torch.Tensor | None,
    inputs: FlowInputs,
    softmax_scale: float,
    dkdv_plan: TilePlan,
    dq_plan: TilePlan,
    configs: FlowConfigs,
):
    """Gradients dq, dk, dv from dO and the optional mass / LSE cotangents."""
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    block_d = _block_d(head_dim)
    lse2 = torch.empty(batch, heads, nq, device=q.device, dtype=torch.float32)
    has_dmass = dmass is not None
    # dS's per-query term (kernels' docstring): a column per key group where it depends on one
    per_key_group = has_dmass or inputs.scale is not None
    term = lse2.new_empty(batch, heads, nq, *([inputs.num_groups] if per_key_group else []))
    dummy = lse2.new_empty(1)
    (scale, _, weight), stride_table_h = _table_args(inputs, q)
    flags = inputs.flags()
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(nq, pre_block), batch * heads)](
        out, dout, lse, dummy if dlse is None else dlse.contiguous(),
        mass if has_dmass else dummy, dmass.contiguous() if has_dmass else dummy,
        q.new_empty(1, dtype=torch.int32) if inputs.q_groups is None else inputs.q_groups,
        scale, weight, term, lse2,
        *_token_strides(out, dout), _batch_stride(inputs.q_groups), stride_table_h,
        heads, nq, head_dim,
        **{key: flags[key] for key in ("NUM_GROUPS", "HAS_GROUPS", "HAS_SCALE", "HAS_WEIGHT")},
        HAS_DMASS=has_dmass, HAS_DLSE=dlse is not None, PER_KEY_GROUP=per_key_group,
        BLOCK_M=pre_block, BLOCK_D=block_d,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    pointers, strides = _common_args(inputs, q)
    shared = dict(
        **flags, PER_KEY_GROUP=per_key_group, EVEN_D=head_dim == block_d, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    cfg = configs.backward_dkdv
    (q_tiles, dout_tiles), tma = _tile_operands(cfg, cfg.block_m, block_d, q, dout)
    _bwd_dkdv_kernel[(triton.cdiv(nk + dkdv_plan.k_offset, cfg.block_n), batch * heads)](
        q_tiles, k, v, dout_tiles, dk, dv, lse2, term, *pointers,
        dkdv_plan.k_uniform_group, dkdv_plan.col_counts, dkdv_plan.col_tiles,
        dkdv_plan.col_groups,
        *_token_strides(q, k, v, dout, dk),
        *strides,
        int(dkdv_plan.batched), dkdv_plan.q_offset, dkdv_plan.k_offset, heads, nq, nk, head_dim,
        softmax_scale * LOG2E_FLOAT, softmax_scale,
        **shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = configs.backward_dq
    (k_tiles, v_tiles), tma = _tile_operands(cfg, cfg.block_n, block_d, k, v)
    _bwd_dq_kernel[(triton.cdiv(nq + dq_plan.q_offset, cfg.block_m), batch * heads)](
        q, k_tiles, v_tiles, dout, dq, lse2, term, *pointers,
        dq_plan.q_uniform_group, dq_plan.row_counts, dq_plan.row_tiles, dq_plan.row_groups,
        *_token_strides(q, k, v, dout, dq),
        *strides,
        int(dq_plan.batched), dq_plan.q_offset, dq_plan.k_offset, heads, nq, nk, head_dim,
        softmax_scale * LOG2E_FLOAT, softmax_scale,
        **shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


# Tokens per program of the rotary kernel: 16 rows of 128 channels (FLUX's head dim) per load.
ROTARY_BLOCK_S = 16


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     transpose: bool = False) -> torch.Tensor:
    """FLUX's rotary embedding of ``x`` [B, S, H, D] (last dimension contiguous, D a power of 2) by
    ``cos``, ``sin`` [S, D] fp32 (contiguous), into a new tensor of ``x``'s dtype;
    ``transpose``: the backward's rotation."""
    batch, seq_len, heads, head_dim = x.shape
    out = torch.empty(batch, seq_len, heads, head_dim, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(seq_len, ROTARY_BLOCK_S), batch * heads)
    _rotary_kernel[grid](
        x, out, cos, sin, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), cos.stride(0), seq_len, heads, HEAD_DIM=head_dim,
        BLOCK_S=ROTARY_BLOCK_S, TRANSPOSE=transpose)
    return out


# Tiles of the head-mean probabilities: 64 queries x 64 keys, the whole head dim per dot.
HEAD_MEAN_BLOCK = 64


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float,
                    k_out: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_h softmax_j(scale q_ih . k_jh)`` fp32 of ``q`` [Nq, H, D] and ``k`` [Nk, H, D]
    (head dims contiguous; Nk >= 1), normalised over ``k`` and taken at the keys ``k_out``
    [No, H, D] (default ``k``): [Nq, No]."""
    nq, heads, head_dim = q.shape
    k_out = k if k_out is None else k_out
    nk, n_out = k.shape[0], k_out.shape[0]
    lse = torch.empty(heads, nq, dtype=torch.float32, device=q.device)
    out = torch.empty(nq, n_out, dtype=torch.float32, device=q.device)
    if nq == 0 or n_out == 0:
        return out
    common = dict(BLOCK_M=HEAD_MEAN_BLOCK, BLOCK_N=HEAD_MEAN_BLOCK,
                  BLOCK_D=_block_d(head_dim), DOT_PRECISION=_dot_precision(q.dtype))
    qk_scale = scale * LOG2E_FLOAT
    rows = triton.cdiv(nq, HEAD_MEAN_BLOCK)
    _head_lse_kernel[(rows, heads)](
        q, k, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), nq, nk, head_dim,
        qk_scale, **common)
    _head_mean_probs_kernel[(rows, triton.cdiv(n_out, HEAD_MEAN_BLOCK))](
        q, k_out, lse, out, q.stride(0), q.stride(1), k_out.stride(0), k_out.stride(1), nq, n_out,
        heads, head_dim, qk_scale, **common)
    return out
