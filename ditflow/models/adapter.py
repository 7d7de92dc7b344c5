"""What every model adapter shares: installing a ditflow processor on each attention block."""

from __future__ import annotations

from ..session import BlockId, Session


class ProcessorAdapter:
    """Installs ``processor(session, block_id, original)`` on every attention block that
    :meth:`blocks` names, and restores the originals. Subclasses give ``processor``,
    ``blocks`` and ``call_layout`` (the token layout of one transformer call)."""

    processor: type

    @staticmethod
    def blocks(transformer) -> list[tuple[BlockId, object]]:
        raise NotImplementedError

    def install(self, transformer, session: Session) -> list:
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
