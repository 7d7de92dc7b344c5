"""Flow attention: Triton kernels (forward, backward preprocess, dk/dv, dq) and their launchers.

Math (see DESIGN.md): ``s' = scale[gi,gj] * tau * q.k + bias[gi,gj]`` (-inf where the pair mask
blocks), ``P = softmax(s')``, ``w = weight[gi,gj] * P``, ``out = w @ v``, ``mass[:, c] = sum of w over
key group c``. Scores live in the log2 domain (log2(e) folded into the scales) so the kernels use
exp2. The backward folds the mass and LSE cotangents into the per-row ``delta`` term:
``dS' = P * (weight * (dO.v + dmass[i, gj]) - delta)``, ``delta = dO.O + dmass.mass - dlse``.

Tiles are visited through a :class:`TilePlan`: uniform tiles read the rules as three scalars and
skip bounds checks, mixed tiles build them per element (one select per key group), blocked tiles
are never visited. A config with ``tma`` reads the operands loaded per tile through TMA
descriptors (Hopper on). ``python -m benchmarks.compile_report`` shows what each kernel costs in
registers, spills and shared memory on a GPU architecture, without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .tile_plan import TilePlan, build_tile_plan

LOG2E_FLOAT = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_FLOAT)  # globals read inside @triton.jit must be constexpr
LN2 = tl.constexpr(0.6931471805599453)
# Group ids index [GROUP_PAD]-wide register vectors (table rows, mass accumulators): G <= 16.
GROUP_PAD = tl.constexpr(16)


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(X, base, stride_n, b, h, start, n_rows, head_dim, MASK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
               TMA: tl.constexpr):
    """Rows ``start .. start + BLOCK`` of ``X[b, :, h, :]`` as ``[BLOCK, BLOCK_D]``. With TMA, one
    box of a ``[B, N, H, D]`` descriptor (rows past the end and columns past the head dim read
    zero; the copy engine computes the addresses); else pointer loads from ``X + base``, masked
    where rows may run past ``n_rows`` or the head dim is padded."""
    if TMA:  # (an early return would still compile the pointer code below for a descriptor)
        tile = tl.reshape(X.load([b, start, h, 0]), [BLOCK, BLOCK_D])
    else:
        rows = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = X + base + rows[:, None] * stride_n + offs_d[None, :]
        if MASK_ROWS and EVEN_D:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        elif MASK_ROWS:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < head_dim)[None, :],
                           other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return tile


@triton.jit
def _rule_vectors(Scale, Bias, Weight, offsets, valid, HAS_SCALE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The table row (or column) a program's uniform tiles draw from, kept in registers so a
    tile's rules cost a register select instead of a dependent memory load. (A program with
    no uniform tiles loads row 0 and never reads it.)"""
    unused = tl.zeros([GROUP_PAD], dtype=tl.float32)
    scale = tl.load(Scale + offsets, mask=valid, other=1.0) if HAS_SCALE else unused
    bias = tl.load(Bias + offsets, mask=valid, other=0.0) if HAS_BIAS else unused
    weight = tl.load(Weight + offsets, mask=valid, other=1.0) if HAS_WEIGHT else unused
    return scale, bias, weight


@triton.jit
def _select(vector, index):
    return tl.sum(tl.where(tl.arange(0, GROUP_PAD) == index, vector, 0.0), 0)


@triton.jit
def _table_tile(Table, base, rows, k_grp, NUM_GROUPS: tl.constexpr):
    """``Table[row, key group]`` (rows of NUM_GROUPS entries from ``base``) over a mixed tile,
    ``rows`` and ``k_grp`` broadcastable index tiles: one select per key group between columns
    gathered for the tile's rows only. (A gather per element would keep a 64-bit address per
    element live and spill the register file.)"""
    column = base + rows * NUM_GROUPS
    value = tl.load(Table + column)
    for c in tl.static_range(1, NUM_GROUPS):
        value = tl.where(k_grp == c, tl.load(Table + column + c), value)
    return value


@triton.jit
def _rule(Table, table_base, q_grp, k_grp, vector, tile_group, NUM_GROUPS: tl.constexpr,
          MIXED: tl.constexpr):
    """One rule over a tile: for uniform tiles the scalar at ``tile_group`` of the table row
    preloaded in ``vector``; for mixed tiles per element from the broadcastable group-id tiles
    ``q_grp``/``k_grp``. Callers fetch each rule where it is first used, so a mixed tile's
    per-element values are not held in registers across the tile's dots, with one exception:
    the dk/dv tile's weight, fetched for the dv dot and kept across the dw dot for dS."""
    if MIXED:
        value = _table_tile(Table, table_base, q_grp, k_grp, NUM_GROUPS)
    else:
        value = _select(vector, tile_group)
    return value


@triton.jit
def _logits(qk, Scale, Bias, table_base, q_grp, k_grp, scale_vec, bias_vec, tile_group, qk_scale,
            NUM_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
            MIXED: tl.constexpr):
    """Scores in log2 units, ``qk * scale * qk_scale + bias``, each rule applied only when present
    (an add of 0.0 per element is not foldable) and the scalar factors multiplied first."""
    if HAS_SCALE:
        s = qk * (_rule(Scale, table_base, q_grp, k_grp, scale_vec, tile_group, NUM_GROUPS, MIXED)
                  * qk_scale)
    else:
        s = qk * qk_scale
    if HAS_BIAS:
        s += _rule(Bias, table_base, q_grp, k_grp, bias_vec, tile_group, NUM_GROUPS, MIXED) * LOG2E
    return s


@triton.jit
def _pair_blocked(PairBits, bits_base, stride_bits_n, q_idx, n_start, Nk, BLOCK_K: tl.constexpr):
    """[len(q_idx), BLOCK_K], True where the packed pair mask blocks (query q_idx[i], key
    n_start + j); n_start is a multiple of 32. Each query's words are loaded once and unpacked
    in registers; keys past Nk read 0."""
    word = n_start // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(PairBits + bits_base + q_idx[:, None] * stride_bits_n + word[None, :],
                    mask=(word < tl.cdiv(Nk, 32))[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, [q_idx.shape[0], BLOCK_K]) != 0


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, mass, q, q_grp, offs_m, n_start, gk, scale_vec, bias_vec, weight_vec,
    K, V, KG, Scale, Bias, Weight, PairBits,
    b, h, k_base, v_base, kg_base, table_base, bits_base,
    stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    RETURN_MASS: tl.constexpr, MIXED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K, k_base, stride_kn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    v = _load_tile(V, v_base, stride_vn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MIXED and HAS_GROUPS:
        k_grp = tl.load(KG + kg_base + offs_n, mask=offs_n < Nk, other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32) + gk
    q_tile, k_tile = q_grp[:, None], k_grp[None, :]
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gk, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = (offs_n < Nk)[None, :]
        if HAS_PAIR_MASK:
            keep = keep & ~_pair_blocked(PairBits, bits_base, stride_bits_n,
                                         tl.minimum(offs_m, Nq - 1), n_start, Nk, BLOCK_N)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row blocked so far stays at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    row_sum = tl.sum(p, 1)
    l_i = l_i * alpha + row_sum
    if HAS_WEIGHT:
        weight = _rule(Weight, table_base, q_tile, k_tile, weight_vec, gk, NUM_GROUPS, MIXED)
        w = p * weight
    else:
        weight = 1.0
        w = p
    acc = tl.dot(w.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    if RETURN_MASS:
        cols = tl.arange(0, GROUP_PAD)[None, :]
        mass = mass * alpha[:, None]
        if MIXED:
            for c in tl.static_range(NUM_GROUPS):
                in_c = tl.sum(tl.where(k_grp[None, :] == c, w, 0.0), 1)
                mass += tl.where(cols == c, in_c[:, None], 0.0)
        else:  # one key group, one scalar weight: the softmax's row sum gives the mass
            mass += tl.where(cols == gk, (row_sum * weight)[:, None], 0.0)
    return acc, l_i, m_new, mass


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Mass, QG, KG, Scale, Bias, Weight, PairBits,
    QUniform, RowCounts, RowTiles, RowGroups,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_qgb, stride_kgb, stride_table_h, stride_bits_b, stride_bits_n,
    plan_batch, H, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    RETURN_MASS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_row_tiles = tl.num_programs(0)
    n_col_tiles = tl.cdiv(Nk, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b * stride_qb + h * stride_qh, stride_qn, b, h, pid_m * BLOCK_M, Nq,
                   head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    if HAS_GROUPS:
        q_grp = tl.load(QG + b * stride_qgb + offs_m, mask=offs_m < Nq, other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)

    plan_row = b * plan_batch * n_row_tiles + pid_m
    gq = tl.load(QUniform + plan_row)
    n_uniform = tl.load(RowCounts + plan_row * 2)
    n_mixed = tl.load(RowCounts + plan_row * 2 + 1)
    tiles = RowTiles + plan_row * n_col_tiles
    tile_groups = RowGroups + plan_row * n_col_tiles

    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    kg_base = b * stride_kgb
    table_base = h * stride_table_h
    bits_base = b * stride_bits_b
    cols = tl.arange(0, GROUP_PAD)
    scale_vec, bias_vec, weight_vec = _rule_vectors(
        Scale, Bias, Weight, table_base + tl.maximum(gq, 0) * NUM_GROUPS + cols,
        cols < NUM_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M, GROUP_PAD], dtype=tl.float32)
    for i in range(0, n_uniform):
        n = tl.load(tiles + i)
        gk = tl.load(tile_groups + i)
        acc, l_i, m_i, mass = _fwd_tile(
            acc, l_i, m_i, mass, q, q_grp, offs_m, n * BLOCK_N, gk, scale_vec, bias_vec, weight_vec,
            K, V, KG, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            RETURN_MASS, False, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    # Mixed tiles: pipelined two deep, they spill less when groups are present; without groups
    # they are only the ragged tail, and one stage spills nothing (benchmarks/NOTES.md, v4).
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        n = tl.load(tiles + i)
        acc, l_i, m_i, mass = _fwd_tile(
            acc, l_i, m_i, mass, q, q_grp, offs_m, n * BLOCK_N, 0, scale_vec, bias_vec, weight_vec,
            K, V, KG, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            RETURN_MASS, True, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    # Rows with every key blocked have l_i == 0: out = 0, mass = 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row_ok = offs_m < Nq
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(Lse + pid_bh * Nq + offs_m, lse, mask=row_ok)
    if RETURN_MASS:
        m_ptrs = Mass + (pid_bh * Nq + offs_m[:, None]) * NUM_GROUPS + cols[None, :]
        tl.store(m_ptrs, mass / l_safe[:, None], mask=row_ok[:, None] & (cols < NUM_GROUPS)[None, :])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Lse, DLse, Mass, DMass, Delta, Lse2,
    stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh,
    H, Nq, head_dim,
    NUM_GROUPS: tl.constexpr, HAS_DMASS: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = dO.O + dmass.mass - dlse, and the LSE in log2 units (+inf for blocked rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh * Nq + offs_m
    if HAS_DMASS:
        cols = tl.arange(0, GROUP_PAD)
        gmask = row_ok[:, None] & (cols < NUM_GROUPS)[None, :]
        offs = row[:, None] * NUM_GROUPS + cols[None, :]
        mass = tl.load(Mass + offs, mask=gmask, other=0.0)
        dmass = tl.load(DMass + offs, mask=gmask, other=0.0)
        delta += tl.sum(mass * dmass, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=row_ok, other=0.0)
    lse = tl.load(Lse + row, mask=row_ok, other=float("-inf"))
    tl.store(Delta + row, delta, mask=row_ok)
    tl.store(Lse2 + row, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=row_ok)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, k_grp, offs_n, n_start, m_start, gq, gk, scale_vec, bias_vec, weight_vec,
    Q, DOut, Lse2, Delta, DMass, QG, Scale, Bias, Weight, PairBits,
    b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
    stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    HAS_DMASS: tl.constexpr, MIXED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    offs_m = m_start + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, q_base, stride_qn, b, h, m_start, Nq, head_dim, MIXED, EVEN_D, BLOCK_M,
                   BLOCK_D, TMA)
    do = _load_tile(DOut, do_base, stride_don, b, h, m_start, Nq, head_dim, MIXED, EVEN_D,
                    BLOCK_M, BLOCK_D, TMA)
    if MIXED:
        lse2 = tl.load(Lse2 + row_base + offs_m, mask=offs_m < Nq, other=float("inf"))
        delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Nq, other=0.0)
    else:
        lse2 = tl.load(Lse2 + row_base + offs_m)
        delta = tl.load(Delta + row_base + offs_m)
    if MIXED and HAS_GROUPS:
        q_grp = tl.load(QG + qg_base + offs_m, mask=offs_m < Nq, other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)
    # Transposed tile: rows are keys, columns are queries.
    q_tile, k_tile = q_grp[None, :], k_grp[:, None]
    qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gq, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = (offs_n < Nk)[:, None]
        if HAS_PAIR_MASK:
            keep = keep & ~tl.trans(_pair_blocked(PairBits, bits_base, stride_bits_n,
                                                  tl.minimum(offs_m, Nq - 1), n_start, Nk,
                                                  BLOCK_N))
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[None, :])
    if HAS_WEIGHT:
        weight = _rule(Weight, table_base, q_tile, k_tile, weight_vec, gq, NUM_GROUPS, MIXED)
    else:
        weight = 1.0
    dv = tl.dot((p * weight).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dw = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    # dS = scale * dS', dS' = P * (weight * (dw + dmass[i, group of j]) - delta_i) (DESIGN.md)
    if MIXED:
        if HAS_DMASS:
            dw += _table_tile(DMass, 0, (row_base + tl.minimum(offs_m, Nq - 1))[None, :],
                              k_tile, NUM_GROUPS)
        ds = p * (weight * dw - delta[None, :])
        if HAS_SCALE:
            ds *= _table_tile(Scale, table_base, q_tile, k_tile, NUM_GROUPS)
    else:  # scalar rules fold into a factor on dw and a per-query term: one FMA per element
        scale = _select(scale_vec, gq) if HAS_SCALE else 1.0
        per_query = -delta
        if HAS_DMASS:
            per_query += weight * tl.load(DMass + (row_base + offs_m) * NUM_GROUPS + gk)
        ds = p * (dw * (weight * scale) + (per_query * scale)[None, :])
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse2, Delta, DMass, QG, KG, Scale, Bias, Weight, PairBits,
    KUniform, ColCounts, ColTiles, ColGroups,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_qgb, stride_kgb, stride_table_h, stride_bits_b, stride_bits_n,
    plan_batch, H, Nq, Nk, head_dim, qk_scale, sm_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    HAS_DMASS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_col_tiles = tl.num_programs(0)
    n_row_tiles = tl.cdiv(Nq, BLOCK_M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, b * stride_kb + h * stride_kh, stride_kn, b, h, pid_n * BLOCK_N, Nk,
                   head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, False)
    v = _load_tile(V, b * stride_vb + h * stride_vh, stride_vn, b, h, pid_n * BLOCK_N, Nk,
                   head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, False)
    if HAS_GROUPS:
        k_grp = tl.load(KG + b * stride_kgb + offs_n, mask=offs_n < Nk, other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32)

    plan_col = b * plan_batch * n_col_tiles + pid_n
    gk = tl.load(KUniform + plan_col)
    n_uniform = tl.load(ColCounts + plan_col * 2)
    n_mixed = tl.load(ColCounts + plan_col * 2 + 1)
    tiles = ColTiles + plan_col * n_row_tiles
    tile_groups = ColGroups + plan_col * n_row_tiles

    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_dob + h * stride_doh
    row_base = pid_bh * Nq
    qg_base = b * stride_qgb
    table_base = h * stride_table_h
    bits_base = b * stride_bits_b
    cols = tl.arange(0, GROUP_PAD)
    scale_vec, bias_vec, weight_vec = _rule_vectors(
        Scale, Bias, Weight, table_base + cols * NUM_GROUPS + tl.maximum(gk, 0),
        cols < NUM_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_uniform):
        m = tl.load(tiles + i)
        gq = tl.load(tile_groups + i)
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, k_grp, offs_n, pid_n * BLOCK_N, m * BLOCK_M, gq, gk, scale_vec, bias_vec,
            weight_vec,
            Q, DOut, Lse2, Delta, DMass, QG, Scale, Bias, Weight, PairBits,
            b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
            stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK, HAS_DMASS,
            False, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    # Mixed tiles: pipelined two deep, they spill less when groups are present; without groups
    # they are only the ragged tail, and one stage spills nothing (benchmarks/NOTES.md, v4).
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        m = tl.load(tiles + i)
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, k_grp, offs_n, pid_n * BLOCK_N, m * BLOCK_M, 0, 0, scale_vec, bias_vec,
            weight_vec,
            Q, DOut, Lse2, Delta, DMass, QG, Scale, Bias, Weight, PairBits,
            b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
            stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK, HAS_DMASS,
            True, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    mask = (offs_n < Nk)[:, None] & (offs_d < head_dim)[None, :]
    base = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, delta, q_grp, offs_m, n_start, gk, scale_vec, bias_vec, weight_vec,
    K, V, KG, DMass, Scale, Bias, Weight, PairBits,
    b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
    stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    HAS_DMASS: tl.constexpr, MIXED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K, k_base, stride_kn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    v = _load_tile(V, v_base, stride_vn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    if MIXED and HAS_GROUPS:
        k_grp = tl.load(KG + kg_base + offs_n, mask=offs_n < Nk, other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32)
    q_tile, k_tile = q_grp[:, None], k_grp[None, :]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gk, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = (offs_n < Nk)[None, :]
        if HAS_PAIR_MASK:
            keep = keep & ~_pair_blocked(PairBits, bits_base, stride_bits_n,
                                         tl.minimum(offs_m, Nq - 1), n_start, Nk, BLOCK_N)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dw = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    # dS = scale * dS', dS' = P * (weight * (dw + dmass[i, group of j]) - delta_i) (DESIGN.md)
    if MIXED:
        if HAS_DMASS:
            dw += _table_tile(DMass, 0, (row_base + tl.minimum(offs_m, Nq - 1))[:, None],
                              k_tile, NUM_GROUPS)
        if HAS_WEIGHT:
            dw *= _table_tile(Weight, table_base, q_tile, k_tile, NUM_GROUPS)
        ds = p * (dw - delta[:, None])
        if HAS_SCALE:
            ds *= _table_tile(Scale, table_base, q_tile, k_tile, NUM_GROUPS)
    else:  # scalar rules fold into a factor on dw and a per-query term: one FMA per element
        weight = _select(weight_vec, gk) if HAS_WEIGHT else 1.0
        scale = _select(scale_vec, gk) if HAS_SCALE else 1.0
        per_query = -delta
        if HAS_DMASS:
            per_query += weight * tl.load(DMass + (row_base + offs_m) * NUM_GROUPS + gk,
                                          mask=offs_m < Nq, other=0.0)
        ds = p * (dw * (weight * scale) + (per_query * scale)[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse2, Delta, DMass, QG, KG, Scale, Bias, Weight, PairBits,
    QUniform, RowCounts, RowTiles, RowGroups,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_qgb, stride_kgb, stride_table_h, stride_bits_b, stride_bits_n,
    plan_batch, H, Nq, Nk, head_dim, qk_scale, sm_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    HAS_DMASS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_row_tiles = tl.num_programs(0)
    n_col_tiles = tl.cdiv(Nk, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q = _load_tile(Q, b * stride_qb + h * stride_qh, stride_qn, b, h, pid_m * BLOCK_M, Nq,
                   head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    do = _load_tile(DOut, b * stride_dob + h * stride_doh, stride_don, b, h, pid_m * BLOCK_M, Nq,
                    head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    row_base = pid_bh * Nq
    lse2 = tl.load(Lse2 + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    if HAS_GROUPS:
        q_grp = tl.load(QG + b * stride_qgb + offs_m, mask=row_ok, other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)

    plan_row = b * plan_batch * n_row_tiles + pid_m
    gq = tl.load(QUniform + plan_row)
    n_uniform = tl.load(RowCounts + plan_row * 2)
    n_mixed = tl.load(RowCounts + plan_row * 2 + 1)
    tiles = RowTiles + plan_row * n_col_tiles
    tile_groups = RowGroups + plan_row * n_col_tiles

    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    kg_base = b * stride_kgb
    table_base = h * stride_table_h
    bits_base = b * stride_bits_b
    cols = tl.arange(0, GROUP_PAD)
    scale_vec, bias_vec, weight_vec = _rule_vectors(
        Scale, Bias, Weight, table_base + tl.maximum(gq, 0) * NUM_GROUPS + cols,
        cols < NUM_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_uniform):
        n = tl.load(tiles + i)
        gk = tl.load(tile_groups + i)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, q_grp, offs_m, n * BLOCK_N, gk, scale_vec, bias_vec, weight_vec,
            K, V, KG, DMass, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK, HAS_DMASS,
            False, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    # Mixed tiles: pipelined two deep, they spill less when groups are present; without groups
    # they are only the ragged tail, and one stage spills nothing (benchmarks/NOTES.md, v4).
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        n = tl.load(tiles + i)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, q_grp, offs_m, n * BLOCK_N, 0, scale_vec, bias_vec, weight_vec,
            K, V, KG, DMass, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK, HAS_DMASS,
            True, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block shape of one kernel: ``block_m`` queries by ``block_n`` keys, powers of two of at
    least 16 and 32 (the pair mask is unpacked 32 keys at a time). ``tma``: the operands read
    per tile come through TMA descriptors where the GPU has TMA (Hopper on) and the tensors'
    alignment allows; elsewhere the same config loads through pointers."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False

    def __post_init__(self):
        for name, least in (("block_m", 16), ("block_n", 32)):
            size = getattr(self, name)
            if size < least or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {least}, got {size}")


@dataclass(frozen=True)
class FlowConfigs:
    forward: KernelConfig
    backward_dkdv: KernelConfig
    backward_dq: KernelConfig


def parse_config(spec: str) -> KernelConfig:
    """``BMxBN[:warps[:stages[:tma]]]``, e.g. ``128x64:8:3`` or ``128x128:8:2:tma``."""
    blocks, *rest = spec.split(":")
    if len(rest) > 3 or (len(rest) == 3 and rest[2] != "tma"):
        raise ValueError(f"kernel config {spec!r}: expected BMxBN[:warps[:stages[:tma]]]")
    block_m, block_n = (int(x) for x in blocks.lower().split("x"))
    num_warps = int(rest[0]) if rest else 4
    num_stages = int(rest[1]) if len(rest) > 1 else 1
    return KernelConfig(block_m, block_n, num_warps, num_stages, tma=len(rest) == 3)


def _default_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> FlowConfigs:
    if device.type != "cuda":  # the interpreter: small tiles exercise multi-tile loops cheaply
        cfg = KernelConfig(32, 32, 4, 1)
        return FlowConfigs(cfg, cfg, cfg)
    if head_dim > 128 or dtype == torch.float32:
        return FlowConfigs(KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 2),
                           KernelConfig(32, 32, 4, 2))
    # Measured on an H100 at the Kontext 1024² shape (bf16, D=128, rules + mass), see
    # benchmarks/results/sweep-*.json: 128x128/8 warps/2 stages forward, 64x64/4/3 backward.
    return FlowConfigs(
        forward=KernelConfig(128, 128, 8, 2),
        backward_dkdv=KernelConfig(64, 64, 4, 3),
        backward_dq=KernelConfig(64, 64, 4, 3),
    )


def select_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> FlowConfigs:
    """Block shapes for the three kernels.

    Plans are built per block shape, so this is a small table rather than a Triton autotuner.
    ``DITFLOW_TRITON_CONFIG`` pins it: ``BMxBN[:warps[:stages[:tma]]]`` for every kernel, or
    ``forward=...,backward_dkdv=...,backward_dq=...`` per kernel (unnamed ones keep the table).
    """
    configs = _default_configs(head_dim, dtype, device)
    pinned = os.environ.get("DITFLOW_TRITON_CONFIG")
    if not pinned:
        return configs
    if "=" not in pinned:
        cfg = parse_config(pinned)
        return FlowConfigs(cfg, cfg, cfg)
    chosen = {}
    for item in pinned.split(","):
        name, _, spec = item.partition("=")
        if name not in FlowConfigs.__dataclass_fields__:
            raise ValueError(f"DITFLOW_TRITON_CONFIG: unknown kernel {name!r} "
                             "(forward, backward_dkdv, backward_dq)")
        chosen[name] = parse_config(spec)
    return replace(configs, **chosen)


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
    return build_tile_plan(nq, nk, cfg.block_m, cfg.block_n, device, inputs.num_groups,
                           inputs.q_groups, inputs.k_groups, inputs.allowed_pairs(), inputs.pair_bits)


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


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _plan_batch(plan: TilePlan) -> int:
    return 1 if plan.batched else 0


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
    grid = (triton.cdiv(nq, cfg.block_m), batch * heads)
    (k_tiles, v_tiles), tma = _tile_operands(cfg, cfg.block_n, block_d, k, v)
    _fwd_kernel[grid](
        q, k_tiles, v_tiles, out, lse, mass_arg, *pointers,
        plan.q_uniform_group, plan.row_counts, plan.row_tiles, plan.row_groups,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *strides,
        _plan_batch(plan), heads, nq, nk, head_dim, softmax_scale * LOG2E_FLOAT,
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
    delta = torch.empty(batch, heads, nq, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    has_dmass = dmass is not None
    dummy = delta.new_empty(1)
    pre_block = 64
    dmass_arg = dmass.contiguous() if has_dmass else dummy
    _bwd_preprocess_kernel[(triton.cdiv(nq, pre_block), batch * heads)](
        out, dout, lse, dummy if dlse is None else dlse.contiguous(),
        mass if has_dmass else dummy, dmass_arg, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        heads, nq, head_dim,
        NUM_GROUPS=inputs.num_groups, HAS_DMASS=has_dmass, HAS_DLSE=dlse is not None,
        BLOCK_M=pre_block, BLOCK_D=block_d,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    pointers, strides = _common_args(inputs, q)
    shared = dict(
        **inputs.flags(), HAS_DMASS=has_dmass, EVEN_D=head_dim == block_d, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    cfg = configs.backward_dkdv
    (q_tiles, dout_tiles), tma = _tile_operands(cfg, cfg.block_m, block_d, q, dout)
    _bwd_dkdv_kernel[(triton.cdiv(nk, cfg.block_n), batch * heads)](
        q_tiles, k, v, dout_tiles, dk, dv, lse2, delta, dmass_arg, *pointers,
        dkdv_plan.k_uniform_group, dkdv_plan.col_counts, dkdv_plan.col_tiles,
        dkdv_plan.col_groups,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        *strides,
        _plan_batch(dkdv_plan), heads, nq, nk, head_dim, softmax_scale * LOG2E_FLOAT, softmax_scale,
        **shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = configs.backward_dq
    (k_tiles, v_tiles), tma = _tile_operands(cfg, cfg.block_n, block_d, k, v)
    _bwd_dq_kernel[(triton.cdiv(nq, cfg.block_m), batch * heads)](
        q, k_tiles, v_tiles, dout, dq, lse2, delta, dmass_arg, *pointers,
        dq_plan.q_uniform_group, dq_plan.row_counts, dq_plan.row_tiles, dq_plan.row_groups,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *strides,
        _plan_batch(dq_plan), heads, nq, nk, head_dim, softmax_scale * LOG2E_FLOAT, softmax_scale,
        **shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv
