"""Checks on the pipeline-call arguments the methods pass through."""

from __future__ import annotations


def check_one_image_call(method: str, call_kwargs: dict, batches_guidance: bool = False
                         ) -> None:
    """The methods' per-image state allows one image per call and no negative prompt (true CFG
    would run a second, differently tokenised prompt through the same rules), except in a
    pipeline that always batches one with the prompt (``batches_guidance``: Step1X-Edit)."""
    if call_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"{method}: one image per call (num_images_per_prompt=1)")
    if batches_guidance:
        return
    if call_kwargs.get("negative_prompt") is not None or call_kwargs.get(
            "negative_prompt_embeds") is not None:
        raise ValueError(f"{method}: no negative prompt (true CFG would run the method's rules "
                         "on the negative prompt's tokens too)")
