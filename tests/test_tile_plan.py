"""Tile classification: blocked tiles are never visited, uniform tiles need no checks."""

from __future__ import annotations

import pytest
import torch

from ditflow.kernels import BLOCKED, MIXED, UNIFORM, build_tile_plan
from ditflow.kernels.tile_plan import aligned_offset
from ditflow.ops import pack_pair_mask

TEXT, TARGET, CONTEXT = 0, 1, 2


def _classes(plan, batch=0):
    """Dense [Mt, Nt] class map rebuilt from the row visit lists."""
    mt, nt = plan.row_tiles.shape[1:]
    classes = torch.full((mt, nt), BLOCKED)
    for m in range(mt):
        n_uniform, n_mixed = plan.row_counts[batch, m].tolist()
        tiles = plan.row_tiles[batch, m].tolist()
        for n in tiles[:n_uniform]:
            classes[m, n] = UNIFORM
        for n in tiles[n_uniform:n_uniform + n_mixed]:
            classes[m, n] = MIXED
    return classes


def test_kontext_layout_with_blocked_context():
    # [text 32 | target 64 | context 64] in 32-token tiles; target queries never see context.
    groups = torch.tensor([TEXT] * 32 + [TARGET] * 64 + [CONTEXT] * 64, dtype=torch.int32)[None]
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[TARGET, CONTEXT] = False
    plan = build_tile_plan(160, 160, 32, 32, torch.device("cpu"), 3, groups, groups, allowed)
    classes = _classes(plan)
    assert (classes[1:3, 3:5] == BLOCKED).all()  # target rows x context columns
    assert (classes[classes != BLOCKED] == UNIFORM).all()  # boundaries align with tiles
    assert plan.q_uniform_group[0].tolist() == [0, 1, 1, 2, 2]
    # uniform tiles carry the key group of their column, by list position
    m = 1
    n_uniform = plan.row_counts[0, m, 0]
    for n, g in zip(plan.row_tiles[0, m, :n_uniform], plan.row_groups[0, m, :n_uniform],
                    strict=True):
        assert plan.k_uniform_group[0, n] == g
    # the column lists are the transpose
    cols = plan.col_counts[0, :, 0] + plan.col_counts[0, :, 1]
    assert cols.tolist() == (classes != BLOCKED).sum(0).tolist()


def test_ragged_tails_and_group_boundaries_are_mixed():
    groups = torch.tensor([0] * 40 + [1] * 30, dtype=torch.int32)[None]  # 70 tokens, boundary 40
    plan = build_tile_plan(70, 70, 32, 32, torch.device("cpu"), 2, groups, groups)
    classes = _classes(plan)
    assert classes[0, 0] == UNIFORM
    assert (classes[1, :] == MIXED).all()  # the tile holding the boundary
    assert (classes[:, 2] == MIXED).all()  # the ragged last column tile
    assert (classes[2, :] == MIXED).all()  # the ragged last row tile


def _layout(*lengths: int) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                   torch.tensor(lengths))[None]


def test_offsets_put_group_boundaries_between_tiles():
    """Qwen-Image-Edit at 1 MP: 1390 text tokens, two 4096-token images. From token 0, both
    boundaries and the end fall inside 128-token tiles (three rows and columns of mixed tiles);
    shifted by 18, only the first (ragged) row and column are mixed."""
    groups = _layout(1390, 4096, 4096)
    n = groups.shape[1]
    assert aligned_offset(groups, n, 128, 3) == 18
    mixed = {}
    for offset in (0, 18):
        plan = build_tile_plan(n, n, 128, 128, torch.device("cpu"), 3, groups, groups,
                               q_offset=offset, k_offset=offset)
        mixed[offset] = int(plan.row_counts[..., 1].sum())
    assert mixed == {0: 441, 18: 149}  # 3 rows and columns of 75 tiles, then 1 (9600 = 75 x 128)
    plan = build_tile_plan(n, n, 128, 128, torch.device("cpu"), 3, groups, groups,
                           q_offset=18, k_offset=18)
    assert plan.q_uniform_group[0, :12].tolist() == [-1] + [0] * 10 + [1]  # 18 + 1390 = 11 x 128


def test_an_offset_may_add_a_tile_when_it_aligns_enough_boundaries():
    groups = _layout(13, 64, 64, 64, 51)  # 256 tokens: 8 tiles of 32, 4 holding a boundary
    assert aligned_offset(groups, 256, 32, 5) == 19
    plan = build_tile_plan(256, 256, 32, 32, torch.device("cpu"), 5, groups, groups,
                           q_offset=19, k_offset=19)
    assert plan.q_uniform_group[0].tolist() == [-1, 1, 1, 2, 2, 3, 3, 4, -1]  # 9 tiles


def _work(groups, n, block, offset):
    """Tile pairs a self-attention plan visits, a mixed one counted 2.5 (NOTES v9)."""
    plan = build_tile_plan(n, n, block, block, torch.device("cpu"), int(groups.max()) + 1,
                           groups, groups, q_offset=offset, k_offset=offset)
    uniform, mixed = plan.row_counts.sum(dim=(0, 1)).tolist()
    return uniform + 2.5 * mixed


def test_the_chosen_offset_never_costs_more_than_none():
    """Short runs (ALE's object regions cut from image rows): shifting can split two boundaries
    that shared a tile; the choice counts tiles, not boundaries."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        runs = torch.randint(1, 40, (30,), generator=generator)
        ids = torch.randint(0, 5, (30,), generator=generator, dtype=torch.int32)
        groups = torch.repeat_interleave(ids, runs)[None]
        n = groups.shape[1]
        offset = aligned_offset(groups, n, 32, 5)
        assert _work(groups, n, 32, offset) <= _work(groups, n, 32, 0)
    assert aligned_offset(_layout(97, 3, 10, 54), 164, 32, 4) == 0  # 0 would lose here


def test_aligned_layouts_keep_offset_zero():
    assert aligned_offset(_layout(512, 4096, 4096), 8704, 128, 3) == 0  # Kontext
    assert aligned_offset(_layout(512, 1024, 1027), 2563, 128, 3) == 0  # a ragged end alone
    assert aligned_offset(None, 97, 32, 1) == 0
    # per-batch layouts: the offset serving most boundaries over the batch
    groups = torch.cat([_layout(13, 64, 64), _layout(45, 32, 64)])
    assert aligned_offset(groups, 141, 32, 3) == 19


def test_a_pair_mask_needs_offsets_zero():
    bits = pack_pair_mask(torch.zeros(1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="pair mask needs tile offsets 0"):
        build_tile_plan(64, 64, 32, 32, torch.device("cpu"), pair_bits=bits, q_offset=3)


def test_pair_mask_blocks_and_mixes_tiles():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :32, :32] = True  # a whole tile
    mask[:, 40, 50] = True  # one pair
    plan = build_tile_plan(64, 64, 32, 32, torch.device("cpu"), pair_bits=pack_pair_mask(mask))
    assert _classes(plan).tolist() == [[BLOCKED, UNIFORM], [UNIFORM, MIXED]]


def test_per_batch_layouts():
    groups = torch.tensor([[0] * 32 + [1] * 32, [1] * 64], dtype=torch.int32)
    allowed = torch.tensor([[True, False], [True, True]])
    plan = build_tile_plan(64, 64, 32, 32, torch.device("cpu"), 2, groups, groups, allowed)
    assert plan.batched
    assert _classes(plan, 0).tolist() == [[UNIFORM, BLOCKED], [UNIFORM, UNIFORM]]
    assert (_classes(plan, 1) == UNIFORM).all()


def test_pair_mask_tile_counts_match_the_dense_mask():
    """Blocked pairs per tile counted from the packed words (sign bits and a ragged last word
    included) equal the dense count."""
    from ditflow.kernels.tile_plan import _pair_mask_tile_counts

    for nq, nk, bm, bn in [(70, 97, 32, 32), (130, 64, 64, 64), (17, 200, 16, 128)]:
        mask = torch.rand(2, nq, nk) < 0.5
        mt, nt = -(-nq // bm), -(-nk // bn)
        dense = torch.zeros(2, mt * bm, nt * bn, dtype=torch.int64)
        dense[:, :nq, :nk] = mask
        want = dense.view(2, mt, bm, nt, bn).sum(dim=(2, 4))
        assert torch.equal(_pair_mask_tile_counts(pack_pair_mask(mask), nq, nk, bm, bn), want)
