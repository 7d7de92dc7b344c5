"""Flow attention's Triton kernels: forward, backward preprocess, dk/dv and dq. Their launchers
are in :mod:`.launch`, their block shapes in :mod:`.configs`.

Math: ``s' = scale[gi,gj] * tau * q.k + bias[gi,gj]`` (-inf where the pair mask blocks),
``P = softmax(s')``, ``w = weight[gi,gj] * P``, ``out = w @ v``, ``mass[:, c] = sum of w over key
group c``. Scores live in the log2 domain (log2(e) folded into the scales) so the kernels use
exp2. The backward folds the mass and LSE cotangents into the per-row ``delta`` term:
``dS' = P * (weight * (dO.v + dmass[i, gj]) - delta)``, ``delta = dO.O + dmass.mass - dlse``
(the closed form ``ditflow.reference.flow_attention_reference_backward`` states and tests). Its
preprocess kernel forms what of ``dS = scale * dS'`` does not depend on the key, once per query
and key group: ``dS = P * (scale * weight * dO.v + term[i, gj])``, ``term[i, c] = scale[gi, c] *
(weight[gi, c] * dmass[i, c] - delta_i)`` (one column, ``-delta``, without mass gradient or
scale rule), so the tile loops read one per-query vector for it instead of delta and dmass.

Tiles are visited through a :class:`~.tile_plan.TilePlan`: uniform tiles read the rules as three
scalars and skip bounds checks, mixed tiles build them per element (one select per key group),
blocked tiles are never visited. Each kernel walks its uniform tiles, then its mixed ones; the
mixed-tile loop is pipelined two deep when groups are present, where it spills less, and one
deep without them, where mixed tiles are only the ragged tail (plans shift tiles only for
groups) and one stage spills nothing
(benchmarks/NOTES.md, v4). A config with ``tma`` reads the operands loaded per tile through TMA
descriptors (Hopper on). ``python -m benchmarks.compile_report`` shows what each kernel costs in
registers, spills and shared memory on a GPU architecture, without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
    box of a ``[B, N, H, D]`` descriptor (rows before 0 or past the end and columns past the head
    dim read zero; the copy engine computes the addresses); else pointer loads from ``X + base``,
    masked where rows may lie outside [0, n_rows) or the head dim is padded."""
    if TMA:  # (an early return would still compile the pointer code below for a descriptor)
        tile = tl.reshape(X.load([b, start, h, 0]), [BLOCK, BLOCK_D])
    else:
        rows = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = X + base + rows[:, None] * stride_n + offs_d[None, :]
        if MASK_ROWS and EVEN_D:
            tile = tl.load(ptrs, mask=_in_range(rows, n_rows)[:, None], other=0.0)
        elif MASK_ROWS:
            tile = tl.load(ptrs, mask=_in_range(rows, n_rows)[:, None] & (offs_d < head_dim)[None, :],
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
def _in_range(offs, n):
    """Which positions of a tile lie in [0, n): a plan's first tiles may start before the
    sequence (its offsets, :mod:`.tile_plan`), its last ones run past the end."""
    return (offs >= 0) & (offs < n)


@triton.jit
def _clamped(offs, n):
    return tl.minimum(tl.maximum(offs, 0), n - 1)


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
    the dk/dv tile's weight, fetched for the dv dot and kept across the dw dot for dS (times
    the scale there)."""
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
def _tile_visits(Uniform, Counts, Tiles, Groups, b, per_batch_plans, tile, n_tiles, list_len):
    """This program's visit list in a tile plan (its ``row_*`` or ``col_*`` half): the single
    group of the program's own tile (-1 if it holds several), the numbers of uniform and mixed
    tiles to visit, and pointers to the visited tiles' indices and single groups, uniform tiles
    first. ``tile`` is the program's tile of ``n_tiles``; each list is ``list_len`` long.
    ``per_batch_plans`` is 1 when each batch element has its own plan, 0 when one serves all."""
    index = b * per_batch_plans * n_tiles + tile
    uniform_group = tl.load(Uniform + index)
    n_uniform = tl.load(Counts + index * 2)
    n_mixed = tl.load(Counts + index * 2 + 1)
    return uniform_group, n_uniform, n_mixed, Tiles + index * list_len, Groups + index * list_len


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
        k_grp = tl.load(KG + kg_base + offs_n, mask=_in_range(offs_n, Nk), other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32) + gk
    q_tile, k_tile = q_grp[:, None], k_grp[None, :]
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gk, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = _in_range(offs_n, Nk)[None, :]
        if HAS_PAIR_MASK:
            keep = keep & ~_pair_blocked(PairBits, bits_base, stride_bits_n,
                                         _clamped(offs_m, Nq), n_start, Nk, BLOCK_N)
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
    per_batch_plans, q_offset, k_offset, H, Nq, Nk, head_dim, qk_scale,
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
    n_col_tiles = tl.cdiv(Nk + k_offset, BLOCK_N)

    m_start = pid_m * BLOCK_M - q_offset
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b * stride_qb + h * stride_qh, stride_qn, b, h, m_start, Nq,
                   head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    if HAS_GROUPS:
        q_grp = tl.load(QG + b * stride_qgb + offs_m, mask=_in_range(offs_m, Nq), other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)

    gq, n_uniform, n_mixed, tiles, tile_groups = _tile_visits(
        QUniform, RowCounts, RowTiles, RowGroups, b, per_batch_plans, pid_m, n_row_tiles,
        n_col_tiles)

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
            acc, l_i, m_i, mass, q, q_grp, offs_m, n * BLOCK_N - k_offset, gk, scale_vec,
            bias_vec, weight_vec,
            K, V, KG, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            RETURN_MASS, False, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        n = tl.load(tiles + i)
        acc, l_i, m_i, mass = _fwd_tile(
            acc, l_i, m_i, mass, q, q_grp, offs_m, n * BLOCK_N - k_offset, 0, scale_vec,
            bias_vec, weight_vec,
            K, V, KG, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            RETURN_MASS, True, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    # Rows with every key blocked have l_i == 0: out = 0, mass = 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row_ok = _in_range(offs_m, Nq)
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
    Out, DOut, Lse, DLse, Mass, DMass, QG, Scale, Weight, Term, Lse2,
    stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh, stride_qgb,
    stride_table_h, H, Nq, head_dim,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_DMASS: tl.constexpr, HAS_DLSE: tl.constexpr,
    PER_KEY_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The per-query terms of dS (module docstring): with ``PER_KEY_GROUP`` ``term[i, c]`` for
    each key group c, else ``-delta_i``; ``delta = dO.O + dmass.mass - dlse``. And the LSE in
    log2 units (+inf for blocked rows)."""
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
    cols = tl.arange(0, GROUP_PAD)
    gmask = row_ok[:, None] & (cols < NUM_GROUPS)[None, :]
    offs = row[:, None] * NUM_GROUPS + cols[None, :]
    if HAS_DMASS:
        mass = tl.load(Mass + offs, mask=gmask, other=0.0)
        dmass = tl.load(DMass + offs, mask=gmask, other=0.0)
        delta += tl.sum(mass * dmass, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=row_ok, other=0.0)
    lse = tl.load(Lse + row, mask=row_ok, other=float("-inf"))
    if PER_KEY_GROUP:
        if HAS_GROUPS:
            q_grp = tl.load(QG + b * stride_qgb + offs_m, mask=row_ok, other=0)
        else:
            q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)
        rule = h * stride_table_h + q_grp[:, None] * NUM_GROUPS + cols[None, :]
        term = tl.zeros([BLOCK_M, GROUP_PAD], dtype=tl.float32) - delta[:, None]
        if HAS_DMASS:
            if HAS_WEIGHT:
                dmass *= tl.load(Weight + rule, mask=gmask, other=1.0)
            term += dmass
        if HAS_SCALE:
            term *= tl.load(Scale + rule, mask=gmask, other=1.0)
        tl.store(Term + offs, term, mask=gmask)
    else:
        tl.store(Term + row, -delta, mask=row_ok)
    tl.store(Lse2 + row, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=row_ok)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, k_grp, n_start, m_start, gq, gk, scale_vec, bias_vec, weight_vec,
    Q, DOut, Lse2, Term, QG, Scale, Bias, Weight, PairBits,
    b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
    stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    PER_KEY_GROUP: tl.constexpr, MIXED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    q = _load_tile(Q, q_base, stride_qn, b, h, m_start, Nq, head_dim, MIXED, EVEN_D, BLOCK_M,
                   BLOCK_D, TMA)
    do = _load_tile(DOut, do_base, stride_don, b, h, m_start, Nq, head_dim, MIXED, EVEN_D,
                    BLOCK_M, BLOCK_D, TMA)
    # Uniform tiles address per-query vectors as a scalar base plus constant offsets: no
    # per-element address arithmetic (NOTES v9).
    row_start = row_base + m_start
    if MIXED:
        lse2 = tl.load(Lse2 + row_base + offs_m, mask=_in_range(offs_m, Nq), other=float("inf"))
    else:
        lse2 = tl.load(Lse2 + row_start + tl.arange(0, BLOCK_M))
    if MIXED and HAS_GROUPS:
        q_grp = tl.load(QG + qg_base + offs_m, mask=_in_range(offs_m, Nq), other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)
    # Transposed tile: rows are keys, columns are queries.
    q_tile, k_tile = q_grp[None, :], k_grp[:, None]
    qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gq, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = _in_range(offs_n, Nk)[:, None]
        if HAS_PAIR_MASK:
            keep = keep & ~tl.trans(_pair_blocked(PairBits, bits_base, stride_bits_n,
                                                  _clamped(offs_m, Nq), n_start, Nk,
                                                  BLOCK_N))
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[None, :])
    if HAS_WEIGHT:
        weight = _rule(Weight, table_base, q_tile, k_tile, weight_vec, gq, NUM_GROUPS, MIXED)
    else:
        weight = 1.0
    dv = tl.dot((p * weight).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dw = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    # dS = P * (scale * weight * dw + term[i, group of j]) (module docstring)
    if MIXED:
        factor = weight
        if HAS_SCALE:
            factor *= _table_tile(Scale, table_base, q_tile, k_tile, NUM_GROUPS)
        if PER_KEY_GROUP:
            term = _table_tile(Term, 0, (row_base + _clamped(offs_m, Nq))[None, :], k_tile,
                               NUM_GROUPS)
        else:
            term = tl.load(Term + row_base + offs_m, mask=_in_range(offs_m, Nq), other=0.0)[None, :]
        ds = p * (dw * factor + term)
    else:  # scalar rules: one FMA per element (loaded here, after the dots: shorter loops)
        scale = _select(scale_vec, gq) if HAS_SCALE else 1.0
        if PER_KEY_GROUP:
            term = tl.load(Term + row_start * NUM_GROUPS + gk + tl.arange(0, BLOCK_M) * NUM_GROUPS)
        else:
            term = tl.load(Term + row_start + tl.arange(0, BLOCK_M))
        ds = p * (dw * (weight * scale) + term[None, :])
    ds = ds.to(q.dtype)
    dk = tl.dot(ds, q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse2, Term, QG, KG, Scale, Bias, Weight, PairBits,
    KUniform, ColCounts, ColTiles, ColGroups,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_qgb, stride_kgb, stride_table_h, stride_bits_b, stride_bits_n,
    per_batch_plans, q_offset, k_offset, H, Nq, Nk, head_dim, qk_scale, sm_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    PER_KEY_GROUP: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_col_tiles = tl.num_programs(0)
    n_row_tiles = tl.cdiv(Nq + q_offset, BLOCK_M)

    n_start = pid_n * BLOCK_N - k_offset
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, b * stride_kb + h * stride_kh, stride_kn, b, h, n_start, Nk,
                   head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, False)
    v = _load_tile(V, b * stride_vb + h * stride_vh, stride_vn, b, h, n_start, Nk,
                   head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, False)
    if HAS_GROUPS:
        k_grp = tl.load(KG + b * stride_kgb + offs_n, mask=_in_range(offs_n, Nk), other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32)

    gk, n_uniform, n_mixed, tiles, tile_groups = _tile_visits(
        KUniform, ColCounts, ColTiles, ColGroups, b, per_batch_plans, pid_n, n_col_tiles,
        n_row_tiles)

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
            dk, dv, k, v, k_grp, n_start, m * BLOCK_M - q_offset, gq, gk, scale_vec, bias_vec,
            weight_vec,
            Q, DOut, Lse2, Term, QG, Scale, Bias, Weight, PairBits,
            b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
            stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            PER_KEY_GROUP, False, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        m = tl.load(tiles + i)
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, k_grp, n_start, m * BLOCK_M - q_offset, 0, 0, scale_vec, bias_vec,
            weight_vec,
            Q, DOut, Lse2, Term, QG, Scale, Bias, Weight, PairBits,
            b, h, q_base, do_base, row_base, qg_base, table_base, bits_base,
            stride_qn, stride_don, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            PER_KEY_GROUP, True, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    mask = _in_range(offs_n, Nk)[:, None] & (offs_d < head_dim)[None, :]
    base = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, row_term, q_grp, offs_m, n_start, gk, scale_vec, bias_vec, weight_vec,
    K, V, KG, Term, Scale, Bias, Weight, PairBits,
    b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
    stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    PER_KEY_GROUP: tl.constexpr, MIXED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K, k_base, stride_kn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    v = _load_tile(V, v_base, stride_vn, b, h, n_start, Nk, head_dim, MIXED, EVEN_D, BLOCK_N,
                   BLOCK_D, TMA)
    if MIXED and HAS_GROUPS:
        k_grp = tl.load(KG + kg_base + offs_n, mask=_in_range(offs_n, Nk), other=0)
    else:
        k_grp = tl.zeros([BLOCK_N], dtype=tl.int32)
    q_tile, k_tile = q_grp[:, None], k_grp[None, :]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _logits(qk, Scale, Bias, table_base, q_tile, k_tile, scale_vec, bias_vec, gk, qk_scale,
                NUM_GROUPS, HAS_SCALE, HAS_BIAS, MIXED)
    if MIXED:
        keep = _in_range(offs_n, Nk)[None, :]
        if HAS_PAIR_MASK:
            keep = keep & ~_pair_blocked(PairBits, bits_base, stride_bits_n,
                                         _clamped(offs_m, Nq), n_start, Nk, BLOCK_N)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dw = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    # dS = P * (scale * weight * dw + term[i, group of j]) (module docstring)
    rows = row_base + _clamped(offs_m, Nq)
    if MIXED:
        if HAS_WEIGHT:
            dw *= _table_tile(Weight, table_base, q_tile, k_tile, NUM_GROUPS)
        if HAS_SCALE:
            dw *= _table_tile(Scale, table_base, q_tile, k_tile, NUM_GROUPS)
        if PER_KEY_GROUP:
            term = _table_tile(Term, 0, rows[:, None], k_tile, NUM_GROUPS)
        else:
            term = row_term[:, None]
        ds = p * (dw + term)
    else:  # scalar rules: one FMA per element
        weight = _select(weight_vec, gk) if HAS_WEIGHT else 1.0
        scale = _select(scale_vec, gk) if HAS_SCALE else 1.0
        term = tl.load(Term + rows * NUM_GROUPS + gk) if PER_KEY_GROUP else row_term
        ds = p * (dw * (weight * scale) + term[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse2, Term, QG, KG, Scale, Bias, Weight, PairBits,
    QUniform, RowCounts, RowTiles, RowGroups,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_qgb, stride_kgb, stride_table_h, stride_bits_b, stride_bits_n,
    per_batch_plans, q_offset, k_offset, H, Nq, Nk, head_dim, qk_scale, sm_scale,
    NUM_GROUPS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    PER_KEY_GROUP: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_row_tiles = tl.num_programs(0)
    n_col_tiles = tl.cdiv(Nk + k_offset, BLOCK_N)

    m_start = pid_m * BLOCK_M - q_offset
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = _in_range(offs_m, Nq)
    q = _load_tile(Q, b * stride_qb + h * stride_qh, stride_qn, b, h, m_start, Nq,
                   head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    do = _load_tile(DOut, b * stride_dob + h * stride_doh, stride_don, b, h, m_start, Nq,
                    head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, False)
    row_base = pid_bh * Nq
    lse2 = tl.load(Lse2 + row_base + offs_m, mask=row_ok, other=float("inf"))
    # -delta per query, loaded once (with PER_KEY_GROUP each tile reads its key group's column
    # instead, and this is unused)
    row_term = tl.zeros([BLOCK_M], dtype=tl.float32) if PER_KEY_GROUP else tl.load(
        Term + row_base + offs_m, mask=row_ok, other=0.0)
    if HAS_GROUPS:
        q_grp = tl.load(QG + b * stride_qgb + offs_m, mask=row_ok, other=0)
    else:
        q_grp = tl.zeros([BLOCK_M], dtype=tl.int32)

    gq, n_uniform, n_mixed, tiles, tile_groups = _tile_visits(
        QUniform, RowCounts, RowTiles, RowGroups, b, per_batch_plans, pid_m, n_row_tiles,
        n_col_tiles)

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
            dq, q, do, lse2, row_term, q_grp, offs_m, n * BLOCK_N - k_offset, gk, scale_vec,
            bias_vec, weight_vec,
            K, V, KG, Term, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            PER_KEY_GROUP, False, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)
    for i in tl.range(n_uniform, n_uniform + n_mixed, num_stages=2 if HAS_GROUPS else 1):
        n = tl.load(tiles + i)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, row_term, q_grp, offs_m, n * BLOCK_N - k_offset, 0, scale_vec,
            bias_vec, weight_vec,
            K, V, KG, Term, Scale, Bias, Weight, PairBits,
            b, h, k_base, v_base, kg_base, row_base, table_base, bits_base,
            stride_kn, stride_vn, stride_bits_n, Nq, Nk, head_dim, qk_scale,
            NUM_GROUPS, HAS_GROUPS, HAS_SCALE, HAS_BIAS, HAS_WEIGHT, HAS_PAIR_MASK,
            PER_KEY_GROUP, True, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
