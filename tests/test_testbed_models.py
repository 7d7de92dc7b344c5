"""The committed testbed models load offline and do what their README numbers say."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

from ditflow.testbed.evaluate import (
    edit,
    edit_quality,
    generate,
    generation_quality,
    held_out_edits,
)
from ditflow.testbed.models import testbed_pipeline as load_testbed
from ditflow.testbed.scenes import render


def _quiet(kind: str):
    pipeline = load_testbed(kind)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def editor():
    return _quiet("editor")


def test_editor_is_seeded_and_deterministic(editor):
    e = held_out_edits(1)[0]
    a = edit(editor, render(e.context), e.instruction, steps=8, seed=3)
    b = edit(editor, render(e.context), e.instruction, steps=8, seed=3)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_editor_uses_its_context(editor):
    """Objects an edit leaves alone come from the context: swapping the context removes them
    and brings the other context's objects in."""
    summary = edit_quality(editor, n=8, steps=20)["summary"]
    assert summary["kept_color"] >= summary["kept_color_swapped"] + 0.3
    assert summary["other_context_color"] >= 0.3


@pytest.fixture(scope="module")
def t2i():
    return _quiet("t2i")


def test_t2i_is_seeded_and_deterministic(t2i):
    a, b = (generate(t2i, "a red circle top left on sand", steps=8, seed=5) for _ in range(2))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_t2i_draws_what_the_caption_says(t2i):
    """Objects' colours match their own caption far more often than another scene's."""
    summary = generation_quality(t2i, n=8, steps=20)["summary"]
    assert summary["color"] >= summary["color_other"] + 0.3
    assert summary["shape_iou"] >= summary["shape_iou_other"] + 0.2


def test_generation_quality_needs_another_scene_to_compare_with():
    """With one caption, the 'other' scene would be the caption's own: a baseline equal to the
    score it is meant to sit under."""
    with pytest.raises(ValueError, match="at least 2 captions"):
        generation_quality(None, n=1)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m ditflow\.testbed\.train editor"):
        load_testbed("editor", weights=tmp_path)
