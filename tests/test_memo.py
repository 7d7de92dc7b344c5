"""TensorMemo: values derived from tensors, recomputed on change, dropped with their source."""

from __future__ import annotations

import gc

import torch

from ditflow._memo import TensorMemo


def test_memo_hits_recomputes_on_change_and_forgets_freed_sources():
    memo = TensorMemo()
    source = torch.zeros(3)
    assert memo.get((source,), "x", lambda: 1) == 1
    assert memo.get((source,), "x", lambda: 2) == 1 and memo.misses == 1
    source.add_(1)  # in-place change: recomputed
    assert memo.get((source,), "x", lambda: 3) == 3 and memo.misses == 2
    other = torch.zeros(3)
    memo.get((other,), "x", lambda: 4)
    assert len(memo._entries) == 2
    del source
    gc.collect()
    assert len(memo._entries) == 1  # the freed tensor's entry is gone
    assert memo.get((other,), "x", lambda: 5) == 4
