"""A small cache for values derived from tensors (tile plans, packed masks, validated groups).

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
