"""Tile classification for flow attention.

Every (query tile, key tile) pair of one batch element is put in one of three classes:

* ``UNIFORM``: one query group and one key group and no pair-mask bit inside the tile; the rules
  are three scalars and the tile is full (no bounds checks).
* ``MIXED``: anything else that is not blocked (group boundaries inside the tile, pair-mask bits,
  the ragged last tile of either dimension, and the first when tiles are shifted); the rules are
  gathered per element.
* ``BLOCKED``: every pair is blocked for every head (bias ``-inf`` or pair mask); the tile is
  skipped in forward and backward.

The kernels do not scan the class map: they walk per-tile lists of the tiles to visit, uniform
tiles first, so their loops carry no branches. Plans depend only on the layout (groups, blocked
group pairs, pair mask) and the block shape, so callers cache them.

Tiles need not start at token 0: a plan may shift them by an offset per dimension (tile ``t``
covers tokens ``t * block - offset`` onwards), chosen by :func:`aligned_offset` so that group
boundaries fall between tiles where that saves work. Qwen-Image-Edit's 1390 text tokens before two 4096-token images
put both boundaries and the end inside 128-token tiles: three rows and three columns of mixed
tiles, 7.8% of all; shifted by 18 tokens, only the first row and column are (2.6%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIFORM, MIXED, BLOCKED = 0, 1, 2


@dataclass(frozen=True)
class TilePlan:
    """Visit lists for one block shape. Tensors are int32 on the inputs' device.

    ``row_*`` lists key tiles per query tile (forward and dq), ``col_*`` lists query tiles per
    key tile (dk/dv). ``*_counts[..., 0]`` is the number of uniform tiles, ``[..., 1]`` the
    number of mixed ones; the tile indices follow in that order, and ``*_groups`` holds the
    single group of each listed tile (-1 for mixed ones), so a kernel reads it by list position
    instead of through the tile index. The leading dimension is 1 when the layout is shared by
    the whole batch.
    """

    q_uniform_group: torch.Tensor  # [P, Mt], -1 where the query tile holds several groups
    k_uniform_group: torch.Tensor  # [P, Nt]
    row_counts: torch.Tensor  # [P, Mt, 2]
    row_tiles: torch.Tensor  # [P, Mt, Nt]
    row_groups: torch.Tensor  # [P, Mt, Nt]
    col_counts: torch.Tensor  # [P, Nt, 2]
    col_tiles: torch.Tensor  # [P, Nt, Mt]
    col_groups: torch.Tensor  # [P, Nt, Mt]
    q_offset: int = 0  # query tile t starts at token t * block_m - q_offset
    k_offset: int = 0

    @property
    def batched(self) -> bool:
        return self.row_tiles.shape[0] > 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_groups(groups: torch.Tensor | None, n: int, block: int, offset: int, num_groups: int,
                 device):
    """Which groups each tile holds ([P, T, G] bool) and its single group or -1 ([P, T])."""
    tiles = _cdiv(n + offset, block)
    if groups is None:  # every token in group 0
        present = torch.zeros(1, tiles, num_groups, dtype=torch.bool, device=device)
        present[..., 0] = True
        uniform = torch.zeros(1, tiles, dtype=torch.int32, device=device)
    else:
        padded = torch.full((groups.shape[0], tiles * block), -1, dtype=torch.int32, device=device)
        padded[:, offset:offset + n] = groups
        padded = padded.view(groups.shape[0], tiles, block)
        present = (padded.unsqueeze(-1) == torch.arange(num_groups, device=device)).any(dim=2)
        single = present.sum(-1) == 1
        uniform = torch.where(single, present.int().argmax(-1), -1).to(torch.int32)
    # ragged tiles need bounds checks
    if offset:
        uniform[:, 0] = -1
    if (n + offset) % block:
        uniform[:, -1] = -1
    return present, uniform


# What a mixed tile costs beyond a uniform one, in uniform tiles (their loops are 2.3-3.2x longer;
# Qwen-Image-Edit's forward: benchmarks/NOTES.md, v9)
MIXED_TILE_EXTRA = 1.5


def aligned_offset(groups: torch.Tensor | None, n: int, block: int, num_groups: int) -> int:
    """The tile offset in [0, block) whose tiles cost least along this dimension, counted over
    every batch element's layout ``groups`` ([P, N]) as if the other dimension were tiled alike:
    T tiles of which M are mixed (:func:`_tile_groups`: several groups, or ragged) cost T²
    uniform tile pairs plus ``MIXED_TILE_EXTRA`` for each of the M (2T - M) mixed ones. 0 on
    ties."""
    if groups is None:
        return 0
    costs = []
    for offset in range(block):
        _, uniform = _tile_groups(groups, n, block, offset, num_groups, groups.device)
        tiles, mixed = uniform.shape[1], (uniform < 0).sum(1).double()
        costs.append((tiles**2 + MIXED_TILE_EXTRA * mixed * (2 * tiles - mixed)).sum())
    return int(torch.stack(costs).argmin())  # the first of the cheapest: 0 on ties


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word (SWAR arithmetic in int64, so the sign bit is a bit)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) & 0xFFFFFFFF) >> 24


def _pair_mask_tile_counts(pair_bits: torch.Tensor, nq: int, nk: int, block_m: int, block_n: int):
    """Number of blocked pairs per tile, [Pm, Mt, Nt], from the packed mask: key tiles are
    whole words (block_n is a multiple of 32), so counting set bits per word is enough and the
    mask is never unpacked."""
    mt, nt = _cdiv(nq, block_m), _cdiv(nk, block_n)
    words_per_tile = block_n // 32
    counts = torch.zeros(pair_bits.shape[0], mt * block_m, nt * words_per_tile,
                         dtype=torch.int64, device=pair_bits.device)
    counts[:, :nq, :pair_bits.shape[-1]] = _popcount(pair_bits)
    return counts.view(pair_bits.shape[0], mt, block_m, nt, words_per_tile).sum(dim=(2, 4))


def _visit_lists(tile_class: torch.Tensor):
    """Per row of ``tile_class`` [P, R, C]: counts [P, R, 2] and tile indices [P, R, C]."""
    columns = tile_class.shape[-1]
    order = tile_class.long() * columns + torch.arange(columns, device=tile_class.device)
    tiles = (order.sort(dim=-1).values % columns).to(torch.int32)
    counts = torch.stack([(tile_class == UNIFORM).sum(-1), (tile_class == MIXED).sum(-1)], dim=-1)
    return counts.to(torch.int32).contiguous(), tiles.contiguous()


def build_tile_plan(
    nq: int,
    nk: int,
    block_m: int,
    block_n: int,
    device: torch.device,
    num_groups: int = 1,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
    allowed_pairs: torch.Tensor | None = None,
    pair_bits: torch.Tensor | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
) -> TilePlan:
    """Classify tiles and build the kernels' visit lists.

    ``num_groups`` is G; ``q_groups`` [Pq, Nq] / ``k_groups`` [Pk, Nk] are int32 group ids (None: one group),
    ``allowed_pairs`` [G, G] bool says which group pairs some head does not block (None: all),
    ``pair_bits`` [Pm, Nq, ceil(Nk/32)] int32 is the packed pair mask (bit set = blocked), which
    needs tiles from token 0 (offsets 0: its key tiles are whole 32-bit words).
    """
    if pair_bits is not None and (q_offset or k_offset):
        raise ValueError("a pair mask needs tile offsets 0")
    q_present, q_uniform = _tile_groups(q_groups, nq, block_m, q_offset, num_groups, device)
    k_present, k_uniform = _tile_groups(k_groups, nk, block_n, k_offset, num_groups, device)
    if allowed_pairs is None:
        allowed_pairs = torch.ones(num_groups, num_groups, dtype=torch.bool, device=device)
    reach = q_present.float() @ allowed_pairs.float() @ k_present.float().transpose(1, 2)
    blocked = reach == 0
    uniform = (q_uniform.unsqueeze(-1) >= 0) & (k_uniform.unsqueeze(-2) >= 0)
    if pair_bits is not None:
        counts = _pair_mask_tile_counts(pair_bits, nq, nk, block_m, block_n)
        # pairs per tile: full tiles, then the ragged last one (no tiles for 0 tokens)
        rows = (nq - block_m * torch.arange(_cdiv(nq, block_m), device=device)).clamp(max=block_m)
        cols = (nk - block_n * torch.arange(_cdiv(nk, block_n), device=device)).clamp(max=block_n)
        blocked = blocked | (counts == rows[:, None] * cols[None, :])
        uniform = uniform & (counts == 0)
    tile_class = torch.where(blocked, BLOCKED, torch.where(uniform, UNIFORM, MIXED))
    row_counts, row_tiles = _visit_lists(tile_class)
    col_counts, col_tiles = _visit_lists(tile_class.transpose(1, 2))
    batch = tile_class.shape[0]
    q_uniform = q_uniform.expand(batch, -1).contiguous()
    k_uniform = k_uniform.expand(batch, -1).contiguous()
    return TilePlan(
        q_uniform_group=q_uniform,
        k_uniform_group=k_uniform,
        row_counts=row_counts,
        row_tiles=row_tiles,
        row_groups=torch.gather(k_uniform[:, None, :].expand_as(row_tiles), 2,
                                row_tiles.long()).contiguous(),
        col_counts=col_counts,
        col_tiles=col_tiles,
        col_groups=torch.gather(q_uniform[:, None, :].expand_as(col_tiles), 2,
                                col_tiles.long()).contiguous(),
        q_offset=q_offset,
        k_offset=k_offset,
    )
