"""What every model adapter shares: installing a ditflow processor on each attention block."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .._memo import TensorMemo
from ..layout import TokenLayout
from ..session import BlockId, Session


class ProcessorAdapter(ABC):
    """Installs ``processor(session, block_id, original)`` on every attention block that
    :meth:`blocks` names, and restores the originals."""

    processor: type

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
        if any(isinstance(p.__dict__.get("session"), Session) for p in processors):
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
