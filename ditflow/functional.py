"""The public op: :func:`flow_attention`."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from ._memo import TensorMemo
from .rules import FlowRules

_converted_groups = TensorMemo()


class FlowAttentionOutput(NamedTuple):
    """``out`` [B, Nq, H, D]; ``lse`` [B, H, Nq] (natural log) when asked;
    ``mass`` [B, H, Nq, G] when asked. lse and mass are fp32, fp64 for fp64 inputs."""

    out: Tensor
    lse: Tensor | None
    mass: Tensor | None


def resolve_backend(backend: str | None, device: torch.device,
                    dtype: torch.dtype | None = None) -> str:
    """The implementation to run: the argument, else ``DITFLOW_BACKEND``, else the best for
    the device (Triton on CUDA; on CPU the C++ kernels when built, else the reference).
    For float64 ``dtype`` that default is the reference, the only exact path; a backend named
    by the argument or ``DITFLOW_BACKEND`` that is not the reference raises TypeError. So does
    ``"triton"`` for bfloat16 CPU tensors: Triton's interpreter mis-computes bfloat16 dots."""
    pinned = os.environ.get("DITFLOW_BACKEND")
    name = backend or pinned
    if not name:
        name = "triton" if device.type == "cuda" else (
            "cpp" if ops.cpp_available() else "reference")
    if name not in ops.BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {', '.join(ops.BACKENDS)}")
    if name == "cpp" and (device.type != "cpu" or not ops.cpp_available()):
        raise ValueError("backend='cpp' runs on CPU tensors and needs the C++ extension: "
                         "DITFLOW_BUILD_EXT=1 pip install -e . --no-build-isolation"
                         if device.type == "cpu" else f"backend='cpp' does not run on {device}")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' with CPU tensors runs the kernels in Triton's "
                         "interpreter: set TRITON_INTERPRET=1 before importing ditflow")
    if name == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # the interpreter computes tl.dot on bfloat16 operands wrongly (errors of 1e8): refused
        # rather than returning garbage
        raise TypeError("backend='triton' with CPU tensors runs in Triton's interpreter, which "
                        "mis-computes bfloat16: use float16 or float32 q, k, v, or "
                        "backend='cpp' or 'reference' for bfloat16 on CPU")
    if name == "triton" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' does not run on {device.type} tensors")
    if dtype == torch.float64 and name != "reference":
        if backend is None and pinned is None:
            return "reference"
        raise TypeError(f"float64 inputs run on backend='reference' only (backend "
                        f"{name!r} takes float16, bfloat16 and float32)")
    return name


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, N, H, D], got {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, "
                            f"got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, _, h, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match q {tuple(q.shape)} "
                             "in batch, heads or head_dim ([B, N, H, D])")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v differ in length: {k.shape[1]} vs {v.shape[1]}")
    if not 1 <= d <= 256:
        raise ValueError(f"head_dim {d} is not supported (1..256)")


def _normalise_groups(name: str, groups: Tensor, batch: int, n: int,
                      device: torch.device) -> Tensor:
    """``groups`` validated and as int32, contiguous, in the caller's rank ([N] or [B, N]): the
    ops add the batch dimension themselves (``with_batch_dim``), since under torch.compile a
    view made here would be a new tensor on every call and miss their caches."""
    if not isinstance(groups, Tensor):
        raise TypeError(f"{name}: expected an integer tensor [N] or [B, N], "
                        f"got {type(groups).__name__}")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {groups.dtype}")
    if groups.device != device:
        raise ValueError(f"{name} is on {groups.device} but q is on {device}")
    shaped = groups.unsqueeze(0) if groups.dim() == 1 else groups
    if shaped.dim() != 2 or shaped.shape[1] != n or shaped.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected shape [{n}] or [1 or {batch}, {n}], "
                         f"got {tuple(groups.shape)}")

    # The ids' range is checked by the ops (the Triton kernels once per layout, when they plan
    # it), so that it is checked under torch.compile too.
    if torch.compiler.is_compiling():
        # When already int32 and contiguous, the caller's tensor itself: it then reaches the op
        # unchanged on every call, and the op's plan cache keys on it and follows its in-place
        # changes.
        return groups.to(torch.int32).contiguous()

    def converted() -> Tensor:
        # a copy: a view would keep the caller's tensor alive, and with it this cache entry;
        # a normal tensor even under inference_mode, so the plan caches downstream can key on it
        with torch.inference_mode(False):
            return groups.to(torch.int32, memory_format=torch.contiguous_format, copy=True)

    # Keyed on the caller's tensor, so a layout reused across calls is converted and planned
    # once (the memo downstream keys on the tensor returned here).
    return _converted_groups.get((groups,), None, converted)


def _check_groups_without_rules(q_groups: Tensor, k_groups: Tensor) -> None:
    """Without rules there is one group: every id must be 0. Said here, where it is known that
    no rules were given (the ops' range check speaks of the rules' groups). Reads the ids on the
    host, only on this path: ditflow's own callers always pass rules."""
    for name, groups in (("q_groups", q_groups), ("k_groups", k_groups)):
        if groups.numel() and bool(groups.any()):
            raise ValueError(f"{name}: group ids other than 0 without rules: pass "
                             "rules=FlowRules(num_groups=G) for G groups (it changes nothing but "
                             "gives the per-group mass), or no group ids for plain attention")


def _check_pair_mask(pair_mask: Tensor, batch: int, nq: int, nk: int, device) -> None:
    if not isinstance(pair_mask, Tensor) or pair_mask.dtype != torch.bool:
        raise TypeError("pair_mask: expected a bool tensor [Nq, Nk] or [B, Nq, Nk] "
                        "(True = blocked)")
    if pair_mask.device != device:
        raise ValueError(f"pair_mask is on {pair_mask.device} but q is on {device}")
    mask = pair_mask.unsqueeze(0) if pair_mask.dim() == 2 else pair_mask
    if mask.dim() != 3 or mask.shape[1:] != (nq, nk) or mask.shape[0] not in (1, batch):
        raise ValueError(f"pair_mask: expected shape [{nq}, {nk}] or [1 or {batch}, {nq}, {nk}],"
                         f" got {tuple(pair_mask.shape)}")


def flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_groups: Tensor | None = None,
    k_groups: Tensor | None = None,
    rules: FlowRules | None = None,
    pair_mask: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    return_mass: bool = False,
    backend: str | None = None,
) -> FlowAttentionOutput:
    """Attention with group rules and attention statistics, differentiable in q, k, v.

    Args:
        q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; fp16, bf16, fp32 (fp64 on the reference
            only; bf16 not on ``"triton"`` with CPU tensors, Triton's interpreter).
            Any strides.
        q_groups, k_groups: integer group id of every token, [N] or [B, N], in [0, G).
            ``k_groups`` defaults to ``q_groups`` when Nq == Nk (joint self-attention).
            Without groups every token is in group 0.
        rules: :class:`FlowRules` with G groups (G <= 16); None = plain attention, G = 1
            (group ids, if given, all 0). Use ``FlowRules(num_groups=G)`` to get per-group mass
            without changing attention.
        pair_mask: bool [Nq, Nk] or [B, Nq, Nk], True blocks the pair (query i, key j).
        scale: softmax scale tau; default 1/sqrt(D).
        return_lse, return_mass: also return the row log-sum-exp / the per-group mass.
        backend: ``"triton"``, ``"cpp"`` or ``"reference"``; default ``DITFLOW_BACKEND`` or
            the best for the device (see ``resolve_backend``).

    For query i (group a) and key j (group b)::

        s'_ij = scale[a,b] * tau * <q_i, k_j> + bias[a,b]     (-inf if the pair is blocked)
        P_ij  = softmax_j(s'_ij);  w_ij = weight[a,b] * P_ij   (no renormalisation)
        out_i = sum_j w_ij v_j;    lse_i = log sum_j exp(s'_ij)
        mass_ic = sum over keys j of group c of w_ij

    A row with every key blocked gives out = 0, mass = 0, lse = -inf and zero gradients.
    """
    _check_qkv(q, k, v)
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    if rules is not None and not isinstance(rules, FlowRules):
        raise TypeError(f"rules: expected FlowRules, got {type(rules).__name__}")
    num_groups = 1 if rules is None else rules.num_groups
    if rules is not None and rules.num_heads not in (1, heads):
        raise ValueError(f"rules are per head for {rules.num_heads} heads but q has {heads}")
    if k_groups is None and q_groups is not None:
        if nq != nk:
            raise ValueError("k_groups is required when Nq != Nk (cross-attention)")
        k_groups = q_groups
    if q_groups is None and k_groups is not None:
        raise ValueError("q_groups is required when k_groups is given")
    if q_groups is not None:
        q_groups = _normalise_groups("q_groups", q_groups, batch, nq, q.device)
        k_groups = _normalise_groups("k_groups", k_groups, batch, nk, q.device)
        if rules is None and not torch.compiler.is_compiling():
            _check_groups_without_rules(q_groups, k_groups)
    if pair_mask is not None:
        _check_pair_mask(pair_mask, batch, nq, nk, q.device)
    tables = (None, None, None) if rules is None else rules.tables_on(q.device)
    name = resolve_backend(backend, q.device, q.dtype)
    fp16_max = torch.finfo(torch.float16).max
    if (name == "triton" and q.dtype == torch.float16 and rules is not None
            and rules.max_abs_weight > fp16_max):
        # the Triton kernels cast the weighted probabilities to the inputs' dtype for P @ V
        raise ValueError(f"rules: a weight of {rules.max_abs_weight:g} overflows the Triton "
                         f"kernels' float16 products (largest {fp16_max:g}): use float32 "
                         f"{'' if q.device.type == 'cpu' else 'or bfloat16 '}q, k, v, or "
                         "smaller weights")
    if scale is None:
        scale = head_dim**-0.5
    out, lse, mass = ops.flow_attention_op(
        q, k, v, q_groups, k_groups, *tables, pair_mask, float(scale), num_groups, return_mass,
        name)
    return FlowAttentionOutput(out, lse if return_lse else None, mass if return_mass else None)
