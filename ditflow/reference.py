"""The specification of flow attention, written plainly in PyTorch.

Tests and benchmarks compare every implementation against these functions (in fp64 for truth).
Scores are materialised, but only for a chunk of queries at a time, so memory is bounded by
``chunk_size x Nk`` per (batch, head) rather than ``Nq x Nk``.

Conventions: q [B, Nq, H, D], k/v [B, Nk, H, D]; groups int [1 or B, N]; tables [1 or H, G, G];
pair_mask bool [1 or B, Nq, Nk] with True = blocked.
"""

from __future__ import annotations

import torch

_CHUNK_BYTES = 256 * 2**20


def _chunk_rows(batch: int, heads: int, nk: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    per_row = batch * heads * nk * max(itemsize, 4) * 8  # ~8 live [B, H, rows, Nk] temporaries
    return max(1, _CHUNK_BYTES // max(per_row, 1))  # per_row is 0 for empty inputs


def _table(table: torch.Tensor | None, q_grp: torch.Tensor, k_grp: torch.Tensor, default: float,
           dtype: torch.dtype) -> torch.Tensor | float:
    """Per-element rule values [P, 1 or H, rows, Nk] gathered from a [1 or H, G, G] table."""
    if table is None:
        return default
    gathered = table.to(dtype)[:, q_grp[:, :, None], k_grp[:, None, :]]  # [HT, P, rows, Nk]
    return gathered.transpose(0, 1)


def _forward_chunk(q, k, v, q_grp, k_grp, scale, bias, weight, pair_mask, softmax_scale,
                   num_groups, return_mass):
    """One chunk of query rows. q [B, r, H, D]; q_grp [P, r]; pair_mask [Pm, r, Nk] or None."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    s = _table(scale, q_grp, k_grp, 1.0, s.dtype) * s + _table(bias, q_grp, k_grp, 0.0, s.dtype)
    if pair_mask is not None:
        s = s.masked_fill(pair_mask[:, None], float("-inf"))
    # A row with every key blocked has l = 0: keep it at P = 0, lse = -inf, with finite gradients.
    # Without keys (Nk = 0) every row is such a row.
    if s.shape[-1] == 0:
        row_max = s.new_zeros(*s.shape[:-1], 1)
    else:
        row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    l_sum = e.sum(dim=-1, keepdim=True)
    blocked_row = l_sum == 0
    l_safe = torch.where(blocked_row, torch.ones_like(l_sum), l_sum)
    p = e / l_safe
    lse = torch.where(blocked_row, torch.full_like(l_sum, float("-inf")),
                      row_max + torch.log(l_safe)).squeeze(-1)
    w = _table(weight, q_grp, k_grp, 1.0, s.dtype) * p
    out = torch.einsum("bhij,bjhd->bihd", w.to(v.dtype), v)
    mass = None
    if return_mass:
        one_hot = torch.nn.functional.one_hot(k_grp.long(), num_groups).to(w.dtype)  # [P, Nk, G]
        one_hot = one_hot.expand(w.shape[0], -1, -1)
        mass = torch.einsum("bhij,bjc->bhic", w, one_hot)
    return out, lse, mass


def _groups(groups: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if groups is None:
        return torch.zeros(1, n, dtype=torch.long, device=device)
    return with_batch_dim(groups.long(), 2)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse and mass for inputs of ``dtype``: fp32, or fp64 for fp64 inputs (the
    reference's ground truth and gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def with_batch_dim(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    """``t`` with its leading batch dimension, as a ``dims``-dimensional tensor: group ids
    [N] -> [1, N] (dims 2), a pair mask [Nq, Nk] -> [1, Nq, Nk] (dims 3). Not a reshape: that
    is ambiguous for 0 tokens."""
    return t if t is None or t.dim() == dims else t.unsqueeze(0)


def flow_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
    scale_table: torch.Tensor | None = None,
    bias_table: torch.Tensor | None = None,
    weight_table: torch.Tensor | None = None,
    pair_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    num_groups: int = 1,
    return_mass: bool = False,
    chunk_size: int | None = None,
):
    """Flow attention by the definition. Returns ``(out, lse, mass)``; mass is None unless asked.

    Computes in the inputs' dtype (pass fp64 inputs for ground truth); lse and mass come back in
    fp32 or fp64 (whichever is wider than the inputs). Differentiable with autograd.
    """
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    q_grp = _groups(q_groups, nq, q.device)
    k_grp = _groups(k_groups, nk, q.device)
    pair_mask = with_batch_dim(pair_mask, 3)
    stats = stat_dtype(q.dtype)
    rows = _chunk_rows(batch, heads, nk, q.element_size(), chunk_size)
    outs, lses, masses = [], [], []
    for start in range(0, max(nq, 1), rows):  # one empty chunk when Nq = 0: outputs of 0 rows
        stop = min(start + rows, nq)
        out, lse, mass = _forward_chunk(
            q[:, start:stop], k, v, q_grp[:, start:stop], k_grp, scale_table, bias_table,
            weight_table, None if pair_mask is None else pair_mask[:, start:stop],
            softmax_scale, num_groups, return_mass)
        outs.append(out)
        lses.append(lse.to(stats))
        if return_mass:
            masses.append(mass.to(stats))
    out = torch.cat(outs, dim=1)
    lse = torch.cat(lses, dim=2)
    mass = torch.cat(masses, dim=2) if return_mass else None
    return out, lse, mass


def flow_attention_reference_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    dmass: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
    scale_table: torch.Tensor | None = None,
    bias_table: torch.Tensor | None = None,
    weight_table: torch.Tensor | None = None,
    pair_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    num_groups: int = 1,
    chunk_size: int | None = None,
):
    """dq, dk, dv by the closed-form backward, one query chunk at a time::

        dw_ij  = <dO_i, v_j> + dmass[i, g_j]
        D_i    = <dO_i, O_i> + sum_c dmass_ic mass_ic - dlse_i
        dS_ij  = scale_ij * P_ij * (weight_ij * dw_ij - D_i)
        dV = w^T dO,  dQ = tau dS K,  dK = tau dS^T Q

    Tests check it against autograd through :func:`flow_attention_reference` and finite
    differences. Query rows are independent, so dk/dv are sums over chunks.
    """
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    q_grp = _groups(q_groups, nq, q.device)
    k_grp = _groups(k_groups, nk, q.device)
    pair_mask = with_batch_dim(pair_mask, 3)
    rows = _chunk_rows(batch, heads, nk, q.element_size(), chunk_size)
    # contiguous whatever the inputs' strides, as the registered op promises torch.compile
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    for start in range(0, nq, rows):
        stop = min(start + rows, nq)
        qc, qg = q[:, start:stop], q_grp[:, start:stop]
        s = torch.einsum("bihd,bjhd->bhij", qc, k) * softmax_scale
        scale = _table(scale_table, qg, k_grp, 1.0, s.dtype)
        weight = _table(weight_table, qg, k_grp, 1.0, s.dtype)
        s = scale * s + _table(bias_table, qg, k_grp, 0.0, s.dtype)
        if pair_mask is not None:
            s = s.masked_fill(pair_mask[:, None, start:stop], float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        w = weight * p
        do = dout[:, start:stop].to(s.dtype)
        out = torch.einsum("bhij,bjhd->bihd", w, v)
        dw = torch.einsum("bihd,bjhd->bhij", do, v)
        delta = torch.einsum("bihd,bihd->bhi", do, out)
        if dmass is not None:
            one_hot = torch.nn.functional.one_hot(k_grp, num_groups).to(s.dtype)
            one_hot = one_hot.expand(batch, -1, -1)
            dm = dmass[:, :, start:stop].to(s.dtype)  # [B, H, r, G]
            dw = dw + torch.einsum("bhic,bjc->bhij", dm, one_hot)
            mass = torch.einsum("bhij,bjc->bhic", w, one_hot)
            delta = delta + (dm * mass).sum(-1)
        if dlse is not None:
            delta = delta - dlse[:, :, start:stop].to(s.dtype)
        ds = scale * p * (weight * dw - delta[..., None])
        dq[:, start:stop] = torch.einsum("bhij,bjhd->bihd", ds, k) * softmax_scale
        dk += torch.einsum("bhij,bihd->bjhd", ds, qc) * softmax_scale
        dv += torch.einsum("bhij,bihd->bjhd", w, do)
    return dq, dk, dv
