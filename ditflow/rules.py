"""FlowRules: what flows between token groups, as three small tables.

For a query in group ``a`` and a key in group ``b`` (optionally per head ``h``):

* ``scale[h, a, b]`` multiplies the logit (default 1),
* ``bias[h, a, b]`` is added to the logit (default 0; ``-inf`` blocks the pair),
* ``weight[h, a, b]`` multiplies the softmax probability afterwards, without renormalising
  (default 1).

Rules are immutable; the readable constructors return new rules::

    rules = (FlowRules(num_groups=3)
             .block(src=TARGET, dst=CONTEXT)          # target queries never see context keys
             .scale_logits(src=TARGET, dst=TEXT, factor=1.2)
             .weight_probs(src=[TEXT, TARGET], dst=CONTEXT, factor=0.2))
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable

import torch

MAX_GROUPS = 16
# The Triton kernels scale biases by log2(e) in fp32 and subtract row maxima: a finite bias
# beyond this would overflow there (finfo(float32).min, a common "mask value", does).
MAX_FINITE_BIAS = 1e30

# Device copies of tables, by content and shared by all rules: rules built afresh for every block
# (``layout.rules().scale_logits(...)`` in ``Intervention.rules``) then copy no table per call (a
# blocking host-to-device copy waits for the GPU), and the tile plans, which key on the device
# bias table, are built once.
_device_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_DEVICE_TABLES = 64

# ids: ints, numpy integers or integer tensors (one, or several)
Groups = int | Iterable[int]
Heads = int | Iterable[int] | None


def _id(g) -> int | None:
    """``g`` as a Python int when it is one integer (an int, a numpy integer, a one-element
    integer tensor: anything ``operator.index`` takes), else None. Bools are not ids: True
    would index the tables as a mask."""
    if isinstance(g, bool) or (isinstance(g, torch.Tensor) and g.dtype == torch.bool):
        return None
    try:
        return operator.index(g)
    except TypeError:
        return None


def _as_index(groups: Groups, limit: int, what: str) -> list[int]:
    kind = "head" if what == "heads" else "group"
    try:
        items = [groups] if _id(groups) is not None or isinstance(groups, str) else list(groups)
    except TypeError:  # neither an id nor iterable: a float, a bool
        items = [groups]
    if not items:
        raise ValueError(f"{what}={groups!r}: expected at least one {kind} id")
    ids = [_id(g) for g in items]
    for i in ids:
        if i is None or not 0 <= i < limit:
            raise ValueError(f"{what}={groups!r}: expected {kind} ids in [0, {limit})")
    return ids


def _check_table(name: str, table: torch.Tensor) -> torch.Tensor:
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"FlowRules {name}: expected a tensor of shape [G, G] or [H, G, G], "
                        f"got {type(table).__name__}")
    if not table.is_floating_point():
        raise TypeError(f"FlowRules {name}: expected a floating tensor, got {table.dtype}")
    if table.dim() not in (2, 3) or table.shape[-1] != table.shape[-2]:
        raise ValueError(f"FlowRules {name}: expected shape [G, G] or [H, G, G], "
                         f"got {tuple(table.shape)}")
    if table.numel() == 0:
        raise ValueError(f"FlowRules {name}: shape {tuple(table.shape)} is empty: expected at "
                         "least one head and one group")
    # A tensor of its own, never a view: saved for a compiled graph's backward, a view comes
    # back as a new tensor every call and would miss the kernels' plan cache. A normal tensor
    # even when the rules are built under inference_mode: the plan cache keys on the tables,
    # and autograd saves them for the backward.
    with torch.inference_mode(False):
        table = table.detach().to("cpu", torch.float32).reshape(-1, *table.shape[-2:]).clone(
            memory_format=torch.contiguous_format)
    if torch.isnan(table).any():
        raise ValueError(f"FlowRules {name}: contains NaN")
    if name == "bias":
        if (table == float("inf")).any():
            raise ValueError("FlowRules bias: +inf is not allowed (use -inf to block a pair)")
        finite = table[torch.isfinite(table)]
        if finite.numel() and finite.abs().max() > MAX_FINITE_BIAS:
            raise ValueError(f"FlowRules bias: finite values must lie within +-{MAX_FINITE_BIAS:g}"
                             f", got {finite[finite.abs().argmax()].item():g} (use -inf to block "
                             "a pair)")
    elif not torch.isfinite(table).all():
        raise ValueError(f"FlowRules {name}: must be finite")
    return table


class FlowRules:
    """Group-pair rules for :func:`ditflow.flow_attention`.

    Args:
        scale, bias, weight: raw tables, ``[G, G]`` or per head ``[H, G, G]``; None = default.
        num_groups: G; required when no table is given, checked against the tables otherwise.
    """

    def __init__(self, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, *, num_groups: int | None = None):
        tables = {name: _check_table(name, t) for name, t in
                  (("scale", scale), ("bias", bias), ("weight", weight)) if t is not None}
        sizes = {t.shape[-1] for t in tables.values()}
        if num_groups is not None:
            sizes.add(num_groups)
        if len(sizes) != 1:
            raise ValueError(
                "FlowRules: tables and num_groups disagree on the number of groups "
                f"({sorted(sizes)})" if sizes else "FlowRules: give num_groups or a table")
        (groups,) = sizes
        if not 1 <= groups <= MAX_GROUPS:
            raise ValueError(f"FlowRules: {groups} groups; ditflow supports 1..{MAX_GROUPS}")
        heads = {t.shape[0] for t in tables.values()} - {1}
        if len(heads) > 1:
            raise ValueError(f"FlowRules: per-head tables disagree on the head count ({heads})")
        self._num_groups = groups
        self._num_heads = max([t.shape[0] for t in tables.values()] + [1])
        self._tables: dict[str, torch.Tensor] = tables
        # read once here, so that checking it syncs nothing and breaks no compiled graph
        self._max_abs_weight = float(tables["weight"].abs().max()) if "weight" in tables else 1.0
        self._on_device: dict[torch.device, tuple] = {}

    @property
    def num_groups(self) -> int:
        return self._num_groups

    @property
    def num_heads(self) -> int:
        """1 when the rules are shared by all heads, H for per-head rules."""
        return self._num_heads

    @property
    def max_abs_weight(self) -> float:
        """The largest ``|weight|`` of the tables (1.0 without a weight table)."""
        return self._max_abs_weight

    # The tables as copies: rules are immutable, and a write to the table itself would get past
    # the checks made when they were built (and reach a CPU call but not a device copy made
    # earlier). The kernels read the tables through tables_on, not through these.

    @property
    def scale(self) -> torch.Tensor | None:
        """A copy of the scale table, fp32 [1 or H, G, G] (None when not set: 1 everywhere)."""
        return self._copy("scale")

    @property
    def bias(self) -> torch.Tensor | None:
        """A copy of the bias table, fp32 [1 or H, G, G] (None when not set: 0 everywhere)."""
        return self._copy("bias")

    @property
    def weight(self) -> torch.Tensor | None:
        """A copy of the weight table, fp32 [1 or H, G, G] (None when not set: 1 everywhere)."""
        return self._copy("weight")

    def _copy(self, name: str) -> torch.Tensor | None:
        table = self._tables.get(name)
        return None if table is None else table.clone()

    def __repr__(self) -> str:
        parts = [f"num_groups={self._num_groups}"]
        parts += [f"{name}=[{'x'.join(map(str, t.shape))}]" for name, t in self._tables.items()]
        return f"FlowRules({', '.join(parts)})"

    # -- readable constructors -----------------------------------------------------------------

    def _edited(self, name: str, src: Groups, dst: Groups, heads: Heads, num_heads: int | None,
                op: str, value: float) -> FlowRules:
        g = self._num_groups
        rows = _as_index(src, g, "src")
        cols = _as_index(dst, g, "dst")
        default = 0.0 if name == "bias" else 1.0
        table = self._tables.get(name, torch.full((1, g, g), default))
        if num_heads is not None:
            if heads is None:
                raise ValueError(f"FlowRules: num_heads={num_heads!r} without heads=: name the "
                                 "heads to edit, or leave num_heads out to edit every head")
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(f"FlowRules: num_heads={num_heads!r}: expected the model's "
                                 "head count, a positive int")
            if self.num_heads > 1 and num_heads != self.num_heads:
                raise ValueError(f"FlowRules: num_heads={num_heads} but these rules are per head "
                                 f"for {self.num_heads} heads: pass num_heads={self.num_heads} "
                                 "or leave it out")
        if heads is not None:
            table_heads = num_heads or self.num_heads
            if table_heads == 1:
                raise ValueError("FlowRules: per-head edits need num_heads=H (the model's heads)")
            head_idx = _as_index(heads, table_heads, "heads")
            table = table.expand(table_heads, g, g).clone()
        else:
            head_idx = list(range(table.shape[0]))
            table = table.clone()
        sel = (torch.tensor(head_idx)[:, None, None], torch.tensor(rows)[None, :, None],
               torch.tensor(cols)[None, None, :])
        if op == "set":
            table[sel] = value
        elif op == "mul":
            table[sel] *= value
        else:
            table[sel] += value
        tables = dict(self._tables)
        tables[name] = table
        return FlowRules(**tables, num_groups=g)

    def block(self, src: Groups, dst: Groups, *, heads: Heads = None,
              num_heads: int | None = None) -> FlowRules:
        """Queries in ``src`` groups never attend to keys in ``dst`` groups (bias = -inf)."""
        return self._edited("bias", src, dst, heads, num_heads, "set", float("-inf"))

    def add_bias(self, src: Groups, dst: Groups, value: float, *, heads: Heads = None,
                 num_heads: int | None = None) -> FlowRules:
        """Add ``value`` to the logits of (src, dst) pairs."""
        return self._edited("bias", src, dst, heads, num_heads, "add", value)

    def scale_logits(self, src: Groups, dst: Groups, factor: float, *, heads: Heads = None,
                     num_heads: int | None = None) -> FlowRules:
        """Multiply the logits of (src, dst) pairs by ``factor`` before the softmax."""
        return self._edited("scale", src, dst, heads, num_heads, "mul", factor)

    def weight_probs(self, src: Groups, dst: Groups, factor: float, *, heads: Heads = None,
                     num_heads: int | None = None) -> FlowRules:
        """Multiply the probabilities of (src, dst) pairs by ``factor`` after the softmax
        (no renormalisation)."""
        return self._edited("weight", src, dst, heads, num_heads, "mul", factor)

    def with_hidden_group(self) -> FlowRules:
        """These rules plus one last group, G, whose keys no query attends to (text padding):
        the tables grow by a row and a column, the new column blocked."""
        g = self._num_groups
        if g == MAX_GROUPS:
            raise ValueError(f"FlowRules: a hidden group needs a free group; these rules have "
                             f"{g} (at most {MAX_GROUPS})")

        def grown(table: torch.Tensor, fill: float) -> torch.Tensor:
            out = torch.full((table.shape[0], g + 1, g + 1), fill)
            out[:, :g, :g] = table
            return out

        tables = {name: grown(t, 0.0 if name == "bias" else 1.0)
                  for name, t in self._tables.items()}
        tables.setdefault("bias", torch.zeros(1, g + 1, g + 1))[:, :, g] = float("-inf")
        return FlowRules(**tables, num_groups=g + 1)

    # -- kernel side ---------------------------------------------------------------------------

    def tables_on(self, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        """(scale, bias, weight) as fp32 [1 or H, G, G] on ``device``, copied once per device
        and content and shared by every call and every rules object with equal tables:
        read-only."""
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            cached = tuple(None if t is None else _table_on(t, device)
                           for t in map(self._tables.get, ("scale", "bias", "weight")))
            self._on_device[device] = cached
        return cached


def _table_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The shared copy of ``table`` on ``device`` (on the CPU, the first such table itself)."""
    with torch.inference_mode(False):  # normal tensors: cache keys, saved for backward
        if torch.compiler.is_compiling():  # traced: the copy is made in the graph
            return table.to(device)
        key = (device, tuple(table.shape), table.numpy().tobytes())
        copy = _device_tables.get(key)
        if copy is None:
            copy = _device_tables[key] = table.to(device)
            if len(_device_tables) > _MAX_DEVICE_TABLES:
                _device_tables.popitem(last=False)
        _device_tables.move_to_end(key)
        return copy
