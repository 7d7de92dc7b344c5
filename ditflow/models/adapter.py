"""What every model adapter shares: the processor protocol, and installing a processor on each
attention block."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .._memo import TensorMemo
from ..layout import TokenLayout
from ..session import AttentionPlan, BlockId, EarlyStop, Session


class FlowProcessor(ABC):
    """What every ditflow attention processor shares: the model's ``original`` processor where
    the intervention asks for nothing, ditflow's attention (:meth:`_flow`, the model-specific
    part) elsewhere, and the intervention's early stop after either."""

    def __init__(self, session: Session, block: BlockId, original):
        self.session = session
        self.block = block
        self.original = original

    def _run(self, attn, *args):
        """One processor call; ``args``: its arguments after ``attn``, in the order of the
        model's own processor (``__call__`` spells them out: diffusers passes a processor only
        the keywords its signature names)."""
        plan = self.session.attention_plan(self.block)
        out = self.original(attn, *args) if plan is None else self._flow(attn, *args, plan)
        if self.session.should_stop(self.block):
            raise EarlyStop(str(self.block))
        return out

    @abstractmethod
    def _flow(self, attn, *args):
        """ditflow's attention for this block: ``args`` as :meth:`_run` takes them, then the
        block's :class:`~ditflow.session.AttentionPlan`."""

    def _check_length(self, tokens: int, plan: AttentionPlan) -> None:
        if tokens != len(plan.layout):
            raise ValueError(f"{self.block}: the joint sequence has {tokens} tokens but the "
                             f"layout has {len(plan.layout)}")

    @staticmethod
    def _joint_output(attn, out: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A dual-stream block's attention output ``[text | image]`` [B, N, C] as (image, text),
        each through its stream's output projection (and the image's dropout)."""
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[0](image.contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)  # dropout
        return image, attn.to_add_out(text.contiguous())


class ProcessorAdapter(ABC):
    """Installs ``processor(session, block_id, original)`` on every attention block that
    :meth:`blocks` names, and restores the originals."""

    processor: type[FlowProcessor]

    @staticmethod
    @abstractmethod
    def blocks(transformer) -> list[tuple[BlockId, object]]:
        """(block id, block) for every attention block, in forward order."""

    @staticmethod
    @abstractmethod
    def call_layout(kwargs: dict, memo: TensorMemo) -> TokenLayout:
        """The token layout of one transformer call, from its keyword inputs."""

    def install(self, transformer, session: Session) -> list:
        processors = [block.attn.processor for _, block in self.blocks(transformer)]
        if any(isinstance(p, FlowProcessor) for p in processors):
            # an inner session's processor would answer for the outer one's blocks
            raise RuntimeError("attach: this model is already attached (attach calls do not "
                               "nest); combine the interventions into one")
        held = {type(p).__name__ for p in processors if isinstance(p, torch.nn.Module)}
        if held:  # IP-Adapter's: weighted modules taking inputs ditflow's processors lack
            raise TypeError(f"attach: the attention processors {', '.join(sorted(held))} carry "
                            "weights (an IP-Adapter?); ditflow wraps plain processors only: "
                            "unload them first (pipeline.unload_ip_adapter())")
        originals = []
        for block_id, block in self.blocks(transformer):
            originals.append((block.attn, block.attn.processor))
            # Assigned directly: set_processor would also touch unrelated module state.
            block.attn.processor = self.processor(session, block_id, block.attn.processor)
        return originals

    @staticmethod
    def restore(originals: list) -> None:
        for attn, processor in originals:
            attn.processor = processor
