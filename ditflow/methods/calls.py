"""Checks on the pipeline-call arguments the methods pass through."""

from __future__ import annotations


def check_one_image_call(method: str, call_kwargs: dict) -> None:
    """The methods' per-image state allows one image per call and no negative prompt (true CFG
    would run a second, differently tokenised prompt through the same rules)."""
    if call_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"{method}: one image per call (num_images_per_prompt=1)")
    if call_kwargs.get("negative_prompt") is not None or call_kwargs.get(
            "negative_prompt_embeds") is not None:
        raise ValueError(f"{method}: no negative prompt (true CFG would run the method's rules "
                         "on the negative prompt's tokens too)")
