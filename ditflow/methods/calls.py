"""Checks on the methods' settings and on the pipeline-call arguments they pass through."""

from __future__ import annotations

from collections.abc import Iterable

# the working size, which the edit methods derive from the photo and ``resolution=``
SIZE_ARGUMENTS = ("height", "width", "max_area")


def check_one_image_call(method: str, call_kwargs: dict, negative_prompt_ok: bool = False, *,
                         sized: bool = False, own: Iterable[str] = ()) -> None:
    """The methods' per-image state allows one image per call and no negative prompt (true CFG
    would run a second, differently tokenised prompt through the same rules), unless
    ``negative_prompt_ok``: a pipeline that always batches one with the prompt (Step1X-Edit),
    or a method that records the prompt's call only.

    ``sized``: the method sets the pipeline's height, width and max_area itself, from its
    ``resolution=``; ``own``: other pipeline arguments the method passes itself. Either in
    ``call_kwargs`` is refused, rather than failing as a duplicate keyword."""
    given = [name for name in SIZE_ARGUMENTS if sized and name in call_kwargs]
    if given:
        raise ValueError(f"{method}: {', '.join(given)} cannot be passed: the working size "
                         "comes from the photo's aspect ratio and resolution= (about "
                         "resolution² pixels); use resolution=")
    given = [name for name in own if name in call_kwargs]
    if given:
        raise ValueError(f"{method}: {', '.join(given)} cannot be passed: {method} sets "
                         f"{'it' if len(given) == 1 else 'them'} itself")
    if call_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"{method}: one image per call (num_images_per_prompt=1)")
    if negative_prompt_ok:
        return
    if call_kwargs.get("negative_prompt") is not None or call_kwargs.get(
            "negative_prompt_embeds") is not None:
        raise ValueError(f"{method}: no negative prompt (true CFG would run the method's rules "
                         "on the negative prompt's tokens too)")


def check_settings(owner: str, checks: Iterable[tuple[bool, str]]) -> None:
    """Refuse the first failed ``(ok, message)`` check: ``ValueError("owner: message")``."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{owner}: {message}")
