"""TokenLayout: the joint sequence of an MM-DiT as named token groups.

FLUX-family models attend over ``[text | image tokens]``; an in-context editor's image tokens are
``[target | context...]``. Every layout starts with the groups ``text`` (0), ``target`` (1) and
``context`` (2) (empty where a model has none), so rules can name them with the constants below;
finer groups (entity regions, flagged patches, padding) are carved out of them with
:meth:`TokenLayout.with_region`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rules import MAX_GROUPS, FlowRules

TEXT, TARGET, CONTEXT = 0, 1, 2
BASE_GROUPS = ("text", "target", "context")


class TokenLayout:
    """Group id of every token of the joint sequence, plus the group names.

    Args:
        groups: int [N] group id per token (text tokens first).
        names: one name per group; the first three are ``text``, ``target``, ``context``.
        text_len: number of text tokens at the start of the sequence (in group ``text`` or in
            regions carved from it).
    """

    def __init__(self, groups: torch.Tensor, names: Sequence[str], text_len: int):
        groups = groups.detach().to("cpu", torch.long).reshape(-1)
        names = tuple(names)
        if names[:3] != BASE_GROUPS:
            raise ValueError(f"TokenLayout: the first groups must be {BASE_GROUPS}, got {names}")
        if len(names) > MAX_GROUPS:
            raise ValueError(f"TokenLayout: {len(names)} groups; at most {MAX_GROUPS}")
        if len(set(names)) != len(names):
            raise ValueError(f"TokenLayout: duplicate group names in {names}")
        if groups.numel() and (groups.min() < 0 or groups.max() >= len(names)):
            raise ValueError("TokenLayout: group ids outside the named groups")
        head = groups[:text_len]
        if not 0 <= text_len <= groups.numel() or (groups[text_len:] == TEXT).any() or (
                (head == TARGET) | (head == CONTEXT)).any():
            raise ValueError(f"TokenLayout: text tokens must be the first {text_len} tokens")
        self._groups = groups
        self._names = names
        self._text_len = text_len
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._tokens: dict[tuple[int, torch.device], torch.Tensor] = {}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_segments(cls, text: int, target: int, context: int | Sequence[int] = 0
                      ) -> TokenLayout:
        """``[text | target | context images...]`` from token counts."""
        context_total = context if isinstance(context, int) else sum(context)
        groups = torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in
                            ((TEXT, text), (TARGET, target), (CONTEXT, context_total))])
        return cls(groups, BASE_GROUPS, text)

    @classmethod
    def from_flux_inputs(cls, text_len: int, img_ids: torch.Tensor) -> TokenLayout:
        """From a FLUX transformer call: ``text_len`` text tokens, then one image token per row
        of ``img_ids`` ([N_img, 3]); tokens whose first id axis is non-zero are context (FLUX
        Kontext gives context images index 1 there), the others are the target."""
        if img_ids.dim() == 3:
            img_ids = img_ids[0]
        image = torch.where(img_ids[:, 0].detach().cpu() != 0, CONTEXT, TARGET)
        groups = torch.cat([torch.full((text_len,), TEXT, dtype=torch.long), image])
        return cls(groups, BASE_GROUPS, text_len)

    def with_region(self, name: str, tokens: torch.Tensor) -> TokenLayout:
        """A new group ``name`` made of ``tokens`` (bool [N] or indices) taken from the groups
        they belonged to. A mask must be bool: N integer 0/1 values (N > 2) are refused, being
        no list of distinct token indices."""
        if name in self._names:
            raise ValueError(f"TokenLayout: group {name!r} exists already")
        groups = self._groups.clone()
        tokens = tokens.detach().cpu()
        if tokens.dtype == torch.bool and tokens.shape != groups.shape:
            raise ValueError(f"with_region({name!r}): mask of shape {tuple(tokens.shape)}, "
                             f"expected [{groups.numel()}]")
        if (tokens.dtype != torch.bool and tokens.shape == groups.shape and len(groups) > 2
                and bool(((tokens == 0) | (tokens == 1)).all())):
            raise ValueError(f"with_region({name!r}): an integer 0/1 tensor of the layout's "
                             f"length {len(groups)} would be taken as token indices (tokens 0 "
                             "and 1): pass a mask as bool (tokens.bool()), or indices")
        groups[tokens] = len(self._names)
        return TokenLayout(groups, (*self._names, name), self._text_len)

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return len(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def text_len(self) -> int:
        return self._text_len

    def __len__(self) -> int:
        return self._groups.numel()

    def __repr__(self) -> str:
        counts = torch.bincount(self._groups, minlength=self.num_groups).tolist()
        parts = ", ".join(f"{n}={c}" for n, c in zip(self._names, counts, strict=True))
        return f"TokenLayout({parts})"

    def group(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"no group {name!r}; groups are {self._names}") from None

    def mask(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool [N]: the tokens of group ``name``."""
        return self.groups(device) == self.group(name)

    def tokens(self, group: str | int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [n]: the positions of the tokens of ``group`` (a name or an id), found on the
        host and copied once per device: indexing with them reads no data-dependent count back
        from the GPU, as a bool mask or ``nonzero`` there would on every call."""
        key = (group if isinstance(group, int) else self.group(group), torch.device(device))
        cached = self._tokens.get(key)
        if cached is None:
            with torch.inference_mode(False):  # a normal tensor: autograd saves index tensors
                cached = (self._groups == key[0]).nonzero().squeeze(1).to(key[1])
            self._tokens[key] = cached
        return cached

    def groups(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 [N] group ids on ``device``, copied once per device (so kernels cache plans)."""
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            with torch.inference_mode(False):  # a normal tensor, so plan caches can key on it
                cached = self._groups.to(device, torch.int32)
            self._on_device[device] = cached
        return cached

    def rules(self) -> FlowRules:
        """Identity rules with this layout's groups, to build on with the readable edits."""
        return FlowRules(num_groups=self.num_groups)
