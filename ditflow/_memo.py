"""A small cache for values derived from tensors (tile plans, packed masks, validated groups),
and host data copied to the device without waiting for it.

Entries are keyed by the identity of the source tensors and remembered with their version
counters, so an in-place change through torch or a new tensor at a recycled address never
returns a stale value; an entry is dropped as soon as a source tensor is freed (a per-block pair
mask must not keep its packed copy alive). Writes that bypass the version counter are not seen:
through ``.data``, ``.numpy()``, DLPack or another library sharing the storage, after which the
old value comes back (change such tensors with torch ops, or pass a new tensor). Inference
tensors have no version counter and are never cached. Under ``torch.compile`` tracing nothing is
cached (tensors are fakes); the value is recomputed inside the graph instead.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


class TensorMemo:
    def __init__(self, max_entries: int = 64):
        self._entries: OrderedDict = OrderedDict()
        self._max_entries = max_entries
        self.misses = 0

    def get(self, sources: Sequence[torch.Tensor | None], extra: Hashable,
            compute: Callable[[], T]) -> T:
        if torch.compiler.is_compiling():
            return compute()
        if any(t is not None and t.is_inference() for t in sources):
            # An inference tensor (made under torch.inference_mode) has no version counter, so
            # an in-place change could not be seen: computed afresh on every call, never stale.
            self.misses += 1
            return compute()
        key = (tuple(id(t) for t in sources), extra)
        versions = tuple(None if t is None else t._version for t in sources)
        entry = self._entries.get(key)
        if entry is not None:
            refs, cached_versions, value = entry
            alive = all((r is None and t is None) or (r is not None and r() is t)
                        for r, t in zip(refs, sources, strict=True))
            if alive and cached_versions == versions:
                self._entries.move_to_end(key)
                return value
        self.misses += 1
        value = compute()
        def forget(_ref, key=key, entries=self._entries):
            entry = entries.get(key)
            if entry is not None and _ref in entry[0]:
                del entries[key]

        refs = tuple(None if t is None else weakref.ref(t, forget) for t in sources)
        self._entries[key] = (refs, versions, value)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


# id of a tensor made by copy_to_device -> (a weak reference to it, its values as a flat list,
# its version then). Keyed by id, not by the tensor: a tensor's == compares its elements.
_host_values: dict[int, tuple[weakref.ref, list, int]] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    entry = _host_values.get(key)
    if entry is not None and entry[0] is ref:
        del _host_values[key]


def copy_to_device(host: torch.Tensor, device: torch.device | str, *,
                   keep_values: bool = False) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, without waiting for the work queued there.

    A plain copy from pageable memory waits for every kernel queued before it, so a per-step
    timestep or noise made on the host would stop the host from queueing a step while the GPU
    runs the last one; this copy goes through pinned memory, asynchronously (the pinned block
    is not reused before the copy ends). ``keep_values``: remember the values (a few, such as
    timesteps) for :func:`host_values`, so that reading them back needs no wait either."""
    device = torch.device(device)
    if device.type == "cpu":
        out = host
    elif device.type == "cuda":
        out = host.pin_memory().to(device, non_blocking=True)
    else:
        out = host.to(device)
    if keep_values and not (torch.compiler.is_compiling() or out.is_inference()):
        key = id(out)
        ref = weakref.ref(out, lambda r, key=key: _forget(r, key))
        _host_values[key] = (ref, host.reshape(-1).tolist(), out._version)
    return out


def host_values(tensor: torch.Tensor) -> list | None:
    """The values of a tensor made by :func:`copy_to_device` and unchanged since, flattened,
    read on the host; None for any other tensor."""
    if torch.compiler.is_compiling() or tensor.is_inference():
        return None
    entry = _host_values.get(id(tensor))
    if entry is None or entry[0]() is not tensor or entry[2] != tensor._version:
        return None
    return entry[1]
