"""Where a prompt's phrases sit among its text tokens (DeLeaker's entities, ALE's objects)."""

from __future__ import annotations

from collections.abc import Sequence


def phrase_token_positions(tokenizer, prompt: str, phrases: Sequence[str],
                           max_length: int) -> list[list[int]]:
    """Token positions of each phrase in ``prompt`` as ``tokenizer`` encodes it (FLUX: the T5
    tokenizer, ``max_length`` = the pipeline's ``max_sequence_length``): the tokens whose
    characters overlap the phrase's first occurrence. Phrases must not share tokens."""
    if isinstance(phrases, str):
        raise TypeError(f"phrases={phrases!r}: expected a sequence of phrases, e.g. "
                        f"[{phrases!r}]")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"phrase_token_positions: {type(tokenizer).__name__} gives no "
                        "character offsets; use a fast tokenizer (FLUX's T5TokenizerFast)")
    offsets = tokenizer(prompt, max_length=max_length, truncation=True,
                        return_offsets_mapping=True)["offset_mapping"]
    positions, seen = [], set()
    for phrase in phrases:
        start = prompt.find(phrase)
        if not phrase or start < 0:
            raise ValueError(f"phrase {phrase!r} is not in the prompt {prompt!r}")
        end = start + len(phrase)
        tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not tokens:
            raise ValueError(f"phrase {phrase!r} falls beyond the first {max_length} tokens of "
                             "the prompt")
        if seen & set(tokens):
            raise ValueError(f"phrase {phrase!r} shares tokens with another phrase")
        seen.update(tokens)
        positions.append(tokens)
    return positions
