"""Registered torch.library ops for flow attention, their fake impls and autograd.

``ditflow::flow_attention_fwd`` / ``ditflow::flow_attention_bwd`` are opaque custom ops, so
``torch.compile`` treats them as single nodes on CPU and GPU alike; the forward op's autograd
is the backward op. :func:`flow_attention_op` is the differentiable call. Each op picks its
implementation from the ``backend`` argument:

* ``triton``: the fused kernels in ``ditflow.kernels`` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``);
* ``cpp``: the optional C++ CPU kernels in ``ditflow._C`` (csrc/; streaming softmax, O(N)
  memory), present when built with ``DITFLOW_BUILD_EXT=1``;
* ``reference``: :mod:`ditflow.reference` computed in fp32 (at least).

Inputs arrive validated by :mod:`ditflow.functional`: groups int32 ``[N]`` or ``[1 or B, N]``,
tables fp32 ``[1 or H, G, G]``, the pair mask bool ``[Nq, Nk]`` or ``[1 or B, Nq, Nk]``. The
layout tensors (groups, pair mask) come as the caller holds them, with or without the batch
dimension, so that inside a compiled graph the caller's own tensors reach the ops and key the
caches here (a view made in the graph would be a new tensor on every call): the Triton and C++
kernels take the mask packed to int32 bits ``[1 or B, Nq, ceil(Nk/32)]``, packed once per mask,
and the Triton kernels a tile plan, built once per layout and block shape.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import reference
from ._memo import TensorMemo
from .reference import stat_dtype, with_batch_dim

BACKENDS = ("triton", "cpp", "reference")

_plans = TensorMemo(max_entries=128)
_packed_masks = TensorMemo()
_checked_groups = TensorMemo()


_cpp_built: bool | None = None


@torch.compiler.assume_constant_result  # compiled callers get the answer, not a traced import
def cpp_available() -> bool:
    """Whether the C++ CPU extension was built (``import ditflow._C`` registers its ops)."""
    global _cpp_built
    if _cpp_built is None:
        try:
            from . import _C  # noqa: F401
            _cpp_built = True
        except ImportError:
            _cpp_built = False
    return _cpp_built


def _cpp_kernels():
    """The C++ ops, registered by importing ditflow._C (done here: a direct call of the ops
    need not have gone through flow_attention's backend choice)."""
    if not cpp_available():
        raise RuntimeError("backend='cpp' needs the C++ extension: "
                           "DITFLOW_BUILD_EXT=1 pip install -e . --no-build-isolation")
    return torch.ops.ditflow_cpp


def _check_group_ids(q_groups: Tensor | None, k_groups: Tensor | None, num_groups: int) -> None:
    """Raises unless every id in ``q_groups`` and ``k_groups`` is in [0, num_groups); reads
    them on the host."""
    for name, groups in (("q_groups", q_groups), ("k_groups", k_groups)):
        if groups is None or groups.numel() == 0:
            continue
        low, high = torch.stack([groups.min(), groups.max()]).tolist()
        if low < 0 or high >= num_groups:
            raise ValueError(f"{name}: group ids span [{low}, {high}] but the rules have "
                             f"{num_groups} groups (ids must be in [0, {num_groups}))")


def pack_pair_mask(mask: Tensor) -> Tensor:
    """bool [P, Nq, Nk] -> int32 [P, Nq, ceil(Nk/32)], bit j%32 of word j//32 = key j.

    Packed through bytes (2 bytes per pair in temporaries, not 8: a per-block mask at FLUX
    sizes is tens of millions of pairs); the int32 view of four bytes is little-endian, as on
    every machine the kernels run on."""
    nk = mask.shape[-1]
    words = -(-nk // 32)
    if words == 0:  # no keys (the int32 view below needs whole words)
        return torch.zeros(*mask.shape[:-1], 0, dtype=torch.int32, device=mask.device)
    padded = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.uint8, device=mask.device)
    padded[..., :nk] = mask
    weights = 2 ** torch.arange(8, device=mask.device, dtype=torch.uint8)
    packed = (padded.view(*mask.shape[:-1], words * 4, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int32)


def _pair_bits(pair_mask: Tensor | None) -> Tensor | None:
    if pair_mask is None:
        return None
    return _packed_masks.get((pair_mask,), None,
                             lambda: pack_pair_mask(with_batch_dim(pair_mask, 3)))


# ------------------------------------------------------------------------------------------------
# triton path
# ------------------------------------------------------------------------------------------------


def _kernels():
    """ditflow.kernels, imported on first use: triton is optional."""
    try:
        from . import kernels
    except ImportError as exc:  # triton missing (not Linux) or a broken install
        raise RuntimeError(
            "backend='triton' needs the Triton kernels (pip install triton); "
            f"importing ditflow.kernels failed: {exc}") from exc
    return kernels


def unit_channel_stride(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy where its last dimension is strided (the kernels read head
    dims contiguous)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _plan(inputs, plan_key: tuple, nq: int, nk: int, cfg, device):
    """The tile plan, cached on ``plan_key`` (see :func:`_flow_inputs`) and the block shape.

    The group ids are range-checked when a plan is built, once per group ids (not per pair mask:
    a mask made per block would read them back from the device in every block): under
    ``torch.compile`` flow_attention cannot check them, and the kernels index tables by them."""
    def checked_plan():
        _checked_groups.get(plan_key[:2], inputs.num_groups, lambda: _check_group_ids(
            inputs.q_groups, inputs.k_groups, inputs.num_groups))
        return _kernels().plan_for(inputs, nq, nk, cfg, device)

    # G too: ids valid for more groups must be checked again for fewer
    extra = (inputs.num_groups, nq, nk, cfg.block_m, cfg.block_n, str(device))
    return _plans.get(plan_key, extra, checked_plan)


def _check_32bit_offsets(**tensors: Tensor) -> None:
    """The kernels index with 32-bit offsets (``b * stride_b + ...``): refuse inputs that
    reach 2**31 elements from their start, or whose gradients and outputs (contiguous, as many
    elements) would, rather than touch the wrong memory."""
    for name, t in tensors.items():
        reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        span = max(t.numel(), reach + 1)
        if span >= 2**31:
            raise ValueError(f"backend='triton': {name} of shape {tuple(t.shape)} spans {span} "
                             "elements, past the kernels' 32-bit offsets (2**31): split the batch")


def _flow_inputs(num_groups, q_groups, k_groups, scale, bias, weight, pair_mask):
    """The kernels' inputs, and the key their tile plans are cached on: the op's own tensors
    that decide the plan (group ids, bias table, pair mask), as a compiled graph passes them."""
    inputs = _kernels().FlowInputs(num_groups, with_batch_dim(q_groups, 2),
                                   with_batch_dim(k_groups, 2), scale, bias, weight,
                                   _pair_bits(pair_mask))
    return inputs, (q_groups, k_groups, bias, pair_mask)


def _triton_forward(q, k, v, q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
                    softmax_scale, num_groups, return_mass):
    kernels = _kernels()
    inputs, plan_key = _flow_inputs(num_groups, q_groups, k_groups, scale_table, bias_table,
                                    weight_table, pair_mask)
    _check_32bit_offsets(q=q, k=k, v=v)
    q, k, v = (unit_channel_stride(t) for t in (q, k, v))
    configs = kernels.select_configs(q.shape[-1], q.dtype, q.device)
    plan = _plan(inputs, plan_key, q.shape[1], k.shape[1], configs.forward, q.device)
    return kernels.flow_attention_forward(q, k, v, inputs, softmax_scale, return_mass, plan,
                                          configs.forward)


def _triton_backward(dout, dlse, dmass, q, k, v, out, lse, mass, q_groups, k_groups, scale_table,
                     bias_table, weight_table, pair_mask, softmax_scale, num_groups):
    kernels = _kernels()
    inputs, plan_key = _flow_inputs(num_groups, q_groups, k_groups, scale_table, bias_table,
                                    weight_table, pair_mask)
    q, k, v, dout = (unit_channel_stride(t) for t in (q, k, v, dout))
    configs = kernels.select_configs(q.shape[-1], q.dtype, q.device)
    nq, nk = q.shape[1], k.shape[1]
    dkdv_plan = _plan(inputs, plan_key, nq, nk, configs.backward_dkdv, q.device)
    dq_plan = _plan(inputs, plan_key, nq, nk, configs.backward_dq, q.device)
    return kernels.flow_attention_backward(dout, dlse, dmass, q, k, v, out, lse, mass, inputs,
                                           softmax_scale, dkdv_plan, dq_plan, configs)


# ------------------------------------------------------------------------------------------------
# reference path
# ------------------------------------------------------------------------------------------------


def _upcast(*tensors):
    return [t if t is None or t.dtype == torch.float64 else t.float() for t in tensors]


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------


def _forward(
    q: Tensor, k: Tensor, v: Tensor,
    q_groups: Tensor | None, k_groups: Tensor | None,
    scale_table: Tensor | None, bias_table: Tensor | None, weight_table: Tensor | None,
    pair_mask: Tensor | None,
    softmax_scale: float, num_groups: int, return_mass: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out [B,Nq,H,D], lse [B,H,Nq], mass [B,H,Nq,G] or an empty tensor); lse and
    mass are fp32 (fp64 for fp64 inputs)."""
    if backend == "triton":
        return _triton_forward(q, k, v, q_groups, k_groups, scale_table, bias_table,
                               weight_table, pair_mask, softmax_scale, num_groups, return_mass)
    if backend == "cpp":
        return _cpp_kernels().flow_attention_fwd(
            q, k, v, with_batch_dim(q_groups, 2), with_batch_dim(k_groups, 2), scale_table,
            bias_table, weight_table, _pair_bits(pair_mask), softmax_scale, num_groups,
            return_mass)
    # checked per call (the reference keeps no plan): cheap next to its N x N scores
    _check_group_ids(q_groups, k_groups, num_groups)
    qf, kf, vf = _upcast(q, k, v)
    out, lse, mass = reference.flow_attention_reference(
        qf, kf, vf, q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
        softmax_scale=softmax_scale, num_groups=num_groups, return_mass=return_mass)
    stat = stat_dtype(q.dtype)
    mass = mass.to(stat) if return_mass else lse.new_empty(0, dtype=stat)
    return out.to(q.dtype), lse.to(stat), mass


flow_attention_fwd = torch.library.custom_op("ditflow::flow_attention_fwd", _forward,
                                             mutates_args=())


@flow_attention_fwd.register_fake
def _(q, k, v, q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
      softmax_scale, num_groups, return_mass, backend):
    batch, nq, heads, _ = q.shape
    stat = stat_dtype(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(batch, heads, nq, dtype=stat)
    mass = q.new_empty(batch, heads, nq, num_groups, dtype=stat) if return_mass else q.new_empty(
        0, dtype=stat)
    return out, lse, mass


def _backward(
    dout: Tensor, dlse: Tensor | None, dmass: Tensor | None,
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mass: Tensor | None,
    q_groups: Tensor | None, k_groups: Tensor | None,
    scale_table: Tensor | None, bias_table: Tensor | None, weight_table: Tensor | None,
    pair_mask: Tensor | None,
    softmax_scale: float, num_groups: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) given dO and the optional LSE / mass cotangents."""
    dout = dout.to(q.dtype)
    if backend == "triton":
        return _triton_backward(dout, dlse, dmass, q, k, v, out, lse, mass, q_groups, k_groups,
                                scale_table, bias_table, weight_table, pair_mask, softmax_scale,
                                num_groups)
    if backend == "cpp":
        return _cpp_kernels().flow_attention_bwd(
            dout, dlse, dmass, q, k, v, out, lse, mass, with_batch_dim(q_groups, 2),
            with_batch_dim(k_groups, 2), scale_table, bias_table, weight_table,
            _pair_bits(pair_mask), softmax_scale, num_groups)
    qf, kf, vf, doutf = _upcast(q, k, v, dout)
    dq, dk, dv = reference.flow_attention_reference_backward(
        doutf, dlse, dmass, qf, kf, vf, q_groups, k_groups, scale_table, bias_table,
        weight_table, pair_mask, softmax_scale=softmax_scale, num_groups=num_groups)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


flow_attention_bwd = torch.library.custom_op("ditflow::flow_attention_bwd", _backward,
                                             mutates_args=())


@flow_attention_bwd.register_fake
def _(dout, dlse, dmass, q, k, v, out, lse, mass, q_groups, k_groups, scale_table, bias_table,
      weight_table, pair_mask, softmax_scale, num_groups, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (q, k, v, q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
     softmax_scale, num_groups, return_mass, backend) = inputs
    out, lse, mass = output
    ctx.save_for_backward(q, k, v, out, lse, mass if return_mass else None, q_groups, k_groups,
                          scale_table, bias_table, weight_table, pair_mask)
    ctx.softmax_scale, ctx.num_groups, ctx.backend = softmax_scale, num_groups, backend


def _gradients(backward, ctx, dout, dlse, dmass):
    """(dq, dk, dv, None...) by ``backward``: the backward op, or its implementation."""
    (q, k, v, out, lse, mass, q_groups, k_groups, scale_table, bias_table, weight_table,
     pair_mask) = ctx.saved_tensors
    dq, dk, dv = backward(dout, dlse, None if mass is None else dmass, q, k, v, out, lse, mass,
                          q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
                          ctx.softmax_scale, ctx.num_groups, ctx.backend)
    return (dq, dk, dv) + (None,) * 10


flow_attention_fwd.register_autograd(functools.partial(_gradients, flow_attention_bwd),
                                     setup_context=_setup_context)


class _EagerFlowAttention(torch.autograd.Function):
    """The registered op's autograd, without the ops: in eager code a custom op's Python
    dispatch and autograd wrapper cost about 0.1 ms per call on the host, as much as a small
    block's whole attention."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(functools.partial(_gradients, _backward))


def flow_attention_op(q, k, v, q_groups, k_groups, scale_table, bias_table, weight_table,
                      pair_mask, softmax_scale, num_groups, return_mass, backend):
    """Differentiable (out, lse, mass) in q, k, v: arguments as :func:`flow_attention_fwd`'s.
    Under torch.compile the registered op, an opaque node with a fake (Dynamo cannot trace an
    autograd function given one tensor twice, as self-attention gives its group ids)."""
    args = (q, k, v, q_groups, k_groups, scale_table, bias_table, weight_table, pair_mask,
            softmax_scale, num_groups, return_mass, backend)
    if torch.compiler.is_compiling():
        return flow_attention_fwd(*args)
    return _EagerFlowAttention.apply(*args)
