"""TensorMemo: values derived from tensors, recomputed on change, dropped with their source."""

from __future__ import annotations

import gc

import torch

from ditflow import _memo
from ditflow._memo import TensorMemo, copy_to_device, host_values


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


def test_checked_group_ids_do_not_keep_the_callers_tensor_alive():
    """The validated copy cached for a group-id tensor must not be a view of it: a view would
    hold the tensor, so neither it nor its entry (and plans) would ever be freed."""
    import weakref

    from ditflow import flow_attention
    from ditflow.functional import _converted_groups
    from ditflow.rules import FlowRules

    groups = torch.tensor([0] * 5 + [1] * 7, dtype=torch.int32)  # already int32, contiguous
    q = torch.randn(1, 12, 1, 16)
    flow_attention(q, q, q, groups, rules=FlowRules(num_groups=2), backend="reference")
    alive = weakref.ref(groups)
    del groups
    gc.collect()
    assert alive() is None and not _converted_groups._entries


def test_inference_tensors_are_never_cached():
    """A tensor made under inference_mode has no version counter, so an in-place change could
    not be seen: values derived from it are computed on every call."""
    memo = TensorMemo()
    with torch.inference_mode():
        source = torch.zeros(3)
    assert memo.get((source,), "x", lambda: 1) == 1
    assert memo.get((source,), "x", lambda: 2) == 2 and memo.misses == 2
    assert not memo._entries


def test_tensors_copied_to_the_device_keep_their_values_on_the_host():
    host = torch.tensor([990.0, 985.0], dtype=torch.bfloat16) / 1000
    made = copy_to_device(host, "cpu", keep_values=True)
    assert host_values(made) == host.tolist() == [0.9921875, 0.984375]
    assert host_values(copy_to_device(torch.ones(2), "cpu")) is None  # not asked to keep them
    assert host_values(torch.tensor([0.5])) is None  # not made by copy_to_device
    made.mul_(2)  # changed since: its values must be read from it again
    assert host_values(made) is None
    again = copy_to_device(torch.zeros(2), "cpu", keep_values=True)
    key = id(again)
    del again
    gc.collect()
    assert key not in _memo._host_values  # forgotten with the tensor
