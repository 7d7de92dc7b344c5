"""Attaching an intervention to a model: the Intervention protocol, statistics, early stop.

An :class:`Intervention` decides, for each (denoising step, block), which :class:`FlowRules`
apply, whether the block's attention statistics are wanted, whether its attention output is
rewritten, and whether the forward pass may stop after the block. :func:`attach` installs ditflow
processors on a transformer (or a pipeline's transformer) for the duration of a ``with`` block and
restores the exact original processors on exit, exceptions included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._memo import TensorMemo, host_values
from .functional import FlowAttentionOutput
from .layout import CONTEXT, TARGET, TokenLayout
from .rules import FlowRules


class BlockId(NamedTuple):
    """A transformer block: ``kind`` is ``"double"`` or ``"single"``; ``index`` counts within
    its kind; ``order`` counts over the whole forward pass (FLUX: double 0..18 = 0..18, single
    0..37 = 19..56)."""

    kind: str
    index: int
    order: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.index}"


class StepInfo(NamedTuple):
    """``index``: denoising step, counted from 0 per attached session (two calls with the same
    timestep, as with true CFG, share one index); ``timestep``: the model's timestep input (FLUX
    and Qwen-Image pipelines pass t/1000); ``call``: the transformer call within the step (0,
    then 1 for true CFG's negative prompt, which pipelines run second)."""

    index: int
    timestep: float
    call: int = 0


class EarlyStop(Exception):
    """Raised by a processor after the last block an intervention needs."""


class Intervention:
    """Base class: override what you need. Defaults: the call's layout, no rules, no pair mask,
    no statistics, the output as computed, no early stop."""

    def layout(self, step: StepInfo, block: BlockId, layout: TokenLayout) -> TokenLayout:
        """The token groups this block's rules and statistics refer to: the call's layout
        (text / target / context), or a refinement of it (entity regions, flagged patches)."""
        return layout

    def rules(self, step: StepInfo, block: BlockId, layout: TokenLayout) -> FlowRules | None:
        return None

    def pair_mask(self, step: StepInfo, block: BlockId, layout: TokenLayout, q: torch.Tensor,
                  k: torch.Tensor) -> torch.Tensor | None:
        """Token pairs to block beyond the group rules, from this block's queries and keys
        ([B, N, H, D], after RoPE): bool [B or 1, N, N], True = blocked. Asked only where
        :meth:`rules`, :meth:`wants_mass` or :meth:`edits_output` made the block run ditflow's
        attention."""
        return None

    def wants_mass(self, step: StepInfo, block: BlockId) -> bool:
        return False

    def edits_output(self, step: StepInfo, block: BlockId) -> bool:
        """Whether :meth:`edit_output` rewrites this block's attention output."""
        return False

    def observe(self, step: StepInfo, block: BlockId, layout: TokenLayout,
                result: FlowAttentionOutput) -> None:
        """Receives the attention result of blocks where rules, mass or an output edit were
        active."""

    def edit_output(self, step: StepInfo, block: BlockId, layout: TokenLayout,
                    out: torch.Tensor) -> torch.Tensor:
        """This block's attention output [B, N, H, D] (before the output projection), or its
        replacement; asked after :meth:`observe` where :meth:`edits_output` said so."""
        return out

    def stop_after(self, step: StepInfo, block: BlockId) -> bool:
        return False

    def attached(self, transformer: torch.nn.Module) -> None:
        """Called by :func:`attach` once the processors are installed, before the model runs:
        check what the intervention names against ``transformer`` (block names:
        ``ditflow.models.check_blocks``) and reset state kept per attachment. Raising refuses
        the attachment (the processors are restored)."""


_BLOCK_NAME = re.compile(r"(double|single)\.(\d+)")


def is_block_name(name: str) -> bool:
    """Whether ``name`` is written as a block's name: ``double.<i>`` or ``single.<i>``."""
    return _BLOCK_NAME.fullmatch(name) is not None


def _block_names(blocks) -> set[str] | None:
    """``StatsRecorder.blocks`` as a set of names, refusing what is no block name."""
    if blocks is None:
        return None
    if isinstance(blocks, (str, BlockId)):
        raise ValueError(f"StatsRecorder: blocks={blocks!r}: expected a list of block names, "
                         f"e.g. [{str(blocks)!r}]")
    names = {str(b) for b in blocks}
    bad = sorted(name for name in names if not is_block_name(name))
    if bad:
        raise ValueError(f"StatsRecorder: blocks {bad} are no block names: expected "
                         "'double.<i>' or 'single.<i>' (e.g. 'single.3') or BlockIds")
    return names


def context_ratio(mass: torch.Tensor, layout: TokenLayout, src: int = TARGET,
                  dst: int = CONTEXT) -> torch.Tensor:
    """r_ctx per batch element [B]: attention mass of ``src`` queries on ``dst`` keys, averaged
    over heads and ``src`` queries (DeContext's statistic; softmax over all keys)."""
    queries = layout.tokens(src, mass.device)
    return mass[..., dst].index_select(2, queries).mean(dim=(1, 2))


@dataclass
class StatsRecorder(Intervention):
    """Records reductions of the attention mass per (step, block), never anything N x N.

    Args:
        blocks: the blocks to record, a list of ``BlockId`` or ``"single.3"`` names, checked
            against the model when attached; None = all.
        src, dst: the query and key groups of ``r_ctx``.
        mass_maps: also keep head-mean mass per query and group ([B, N, G]).
        stop_after_last: end the forward pass after the last recorded block (only with an
            explicit ``blocks`` list; a loss over blocks 0..k need not pay for the rest). The
            stop is for :meth:`Session.forward`, which returns None then; a pipeline called
            under it would see the ``EarlyStop`` raised after that block.
        call: which transformer call of each step to record: None, every call (a later call
            at the same step replaces the entry); 0, only the prompt's under true CFG; 1, only
            the negative prompt's (pipelines run it second).

    ``r_ctx[(step, "single.3")]`` is a [B] tensor that keeps its autograd graph. Entries are
    those of the latest :func:`attach`: attaching the recorder again clears them. Steps are
    counted by timestep change, so attach once per pipeline call: two calls under one attach
    whose timesteps repeat (two 1-step calls) share step indices and overwrite each other.
    """

    blocks: Iterable[str | BlockId] | None = None
    src: int = TARGET
    dst: int = CONTEXT
    mass_maps: bool = False
    stop_after_last: bool = False
    call: int | None = None
    r_ctx: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    maps: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self._names = _block_names(self.blocks)
        if self.stop_after_last and not self._names:
            raise ValueError("StatsRecorder: stop_after_last needs an explicit blocks list")
        # double blocks run before single blocks
        self._last = None if not self._names else max(
            self._names, key=lambda name: (name.split(".")[0] == "single", int(name.split(".")[1])))

    def _recorded(self, step: StepInfo, block: BlockId) -> bool:
        return ((self.call is None or step.call == self.call)
                and (self._names is None or str(block) in self._names))

    def wants_mass(self, step, block):
        return self._recorded(step, block)

    def observe(self, step, block, layout, result):
        if result.mass is None or not self._recorded(step, block):
            return
        self.r_ctx[(step.index, str(block))] = context_ratio(result.mass, layout, self.src,
                                                             self.dst)
        if self.mass_maps:
            self.maps[(step.index, str(block))] = result.mass.mean(dim=1)

    def stop_after(self, step, block):
        return self.stop_after_last and str(block) == self._last

    def mean_r_ctx(self) -> torch.Tensor:
        """Mean of the recorded r_ctx over steps and blocks, per batch element."""
        if not self.r_ctx:
            raise RuntimeError("StatsRecorder: nothing recorded")
        return torch.stack(list(self.r_ctx.values())).mean(dim=0)

    def attached(self, transformer):
        """Checks ``blocks`` against the model and clears the entries of an earlier attach
        (step indices restart at 0 with each)."""
        if self._names:
            from .models import check_blocks

            check_blocks(transformer, self._names, "StatsRecorder.blocks")
        self.clear()

    def clear(self) -> None:
        self.r_ctx.clear()
        self.maps.clear()


class AttentionPlan(NamedTuple):
    """What a block's ditflow attention computes: its token groups, rules and statistics, and
    whether the intervention rewrites its output."""

    layout: TokenLayout
    rules: FlowRules
    return_mass: bool
    edits_output: bool


class Session:
    """Per-attachment state: the current step, layout and intervention. Created by
    :func:`attach`; processors call :meth:`attention_plan`, :meth:`pair_mask` and
    :meth:`after_attention`."""

    def __init__(self, transformer: torch.nn.Module, intervention: Intervention, adapter,
                 layout: TokenLayout | None = None):
        self.transformer = transformer
        self.intervention = intervention
        self.adapter = adapter
        self.fixed_layout = layout
        self.layout: TokenLayout | None = layout
        self.step: StepInfo | None = None
        self.blocks_run = 0
        self._stopped = False
        self._last_timestep: float | None = None
        # Per-call values derived from the call's tensors (layouts, padded key groups).
        self.derived = TensorMemo(max_entries=8)

    # The methods processors and hooks call run eagerly under torch.compile: their Python state
    # (step counter, layouts, the intervention's choices) changes per call and must not become
    # guards that recompile the model every step.

    @torch.compiler.disable
    def begin_call(self, kwargs: dict) -> None:
        self._stopped = False
        timestep = kwargs.get("timestep")
        if timestep is None:
            t = 0.0
        elif isinstance(timestep, torch.Tensor):
            # the timesteps ditflow makes carry their values on the host: no wait for the device
            values = host_values(timestep)
            t = float(timestep.reshape(-1)[0]) if values is None else values[0]
        else:
            t = float(timestep)
        if self.step is None:
            self.step = StepInfo(0, t)
        elif t != self._last_timestep:
            self.step = StepInfo(self.step.index + 1, t)
        else:
            self.step = self.step._replace(call=self.step.call + 1)
        self._last_timestep = t
        if self.fixed_layout is None:
            self.layout = self.adapter.call_layout(kwargs, self.derived)

    @torch.compiler.disable
    def attention_plan(self, block: BlockId) -> AttentionPlan | None:
        """This block's plan, or None for the model's own attention."""
        self.blocks_run += 1
        layout = self.intervention.layout(self.step, block, self.layout)
        rules = self.intervention.rules(self.step, block, layout)
        wants_mass = self.intervention.wants_mass(self.step, block)
        edits_output = self.intervention.edits_output(self.step, block)
        if rules is None and not wants_mass and not edits_output:
            return None
        if rules is None:
            rules = layout.rules()
        elif rules.num_groups != layout.num_groups:
            raise ValueError(f"rules for {block} have {rules.num_groups} groups but the layout "
                             f"has {layout.num_groups} ({', '.join(layout.names)})")
        return AttentionPlan(layout, rules, wants_mass, edits_output)

    @torch.compiler.disable
    def pair_mask(self, block: BlockId, plan: AttentionPlan, q: torch.Tensor,
                  k: torch.Tensor) -> torch.Tensor | None:
        return self.intervention.pair_mask(self.step, block, plan.layout, q, k)

    @torch.compiler.disable
    def after_attention(self, block: BlockId, plan: AttentionPlan,
                        result: FlowAttentionOutput) -> torch.Tensor:
        """Hands the result to the intervention; returns the attention output to use."""
        self.intervention.observe(self.step, block, plan.layout, result)
        if not plan.edits_output:
            return result.out
        return self.intervention.edit_output(self.step, block, plan.layout, result.out)

    @torch.compiler.disable
    def should_stop(self, block: BlockId) -> bool:
        """True once per call, after the last block the intervention needs. Blocks re-run by
        gradient checkpointing's recomputation (after the stop) never stop again."""
        if self._stopped or not self.intervention.stop_after(self.step, block):
            return False
        self._stopped = True
        return True

    def forward(self, *args, **kwargs):
        """Call the transformer; returns its output, or None when the intervention stopped the
        pass early (its statistics are then complete and differentiable)."""
        try:
            return self.transformer(*args, **kwargs)
        except EarlyStop:
            return None


def _transformer_of(model) -> torch.nn.Module:
    transformer = getattr(model, "transformer", model)
    # torch.compile(transformer) wraps it: processors and hooks go on the module it compiles
    transformer = getattr(transformer, "_orig_mod", transformer)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"attach: expected a transformer or a pipeline with .transformer, got "
                        f"{type(model).__name__}")
    return transformer


@contextmanager
def attach(model, intervention: Intervention, layout: TokenLayout | None = None
           ) -> Iterator[Session]:
    """Install ditflow processors on every attention block of ``model`` (a transformer or a
    diffusers pipeline) for the duration of the ``with`` block.

    The token layout is read from each transformer call (FLUX: text length and ``img_ids``;
    Qwen-Image: text length and ``img_shapes``) unless ``layout`` is given. Blocks where the
    intervention asks for nothing run the model's own processor unchanged. One attachment at a
    time per model; ``intervention.attached(transformer)`` runs first (its checks and resets).
    With gradient checkpointing, take gradients inside the ``with`` block: the backward
    recomputes the blocks through the processors installed then. Steps are counted from 0 by
    timestep change within one attachment: attach once per pipeline call.
    """
    from .models import adapter_for

    transformer = _transformer_of(model)
    adapter = adapter_for(transformer)
    session = Session(transformer, intervention, adapter, layout)
    originals = adapter.install(transformer, session)
    hook = None
    try:
        intervention.attached(transformer)
        hook = transformer.register_forward_pre_hook(
            lambda module, args, kwargs: session.begin_call(kwargs), with_kwargs=True)
        yield session
    finally:
        if hook is not None:
            hook.remove()
        adapter.restore(originals)
