"""Procedural scenes: rendering, captions, edits and the pixel metrics are exact."""

from __future__ import annotations

import random

import numpy as np

from ditflow.testbed.scenes import (
    COLORS,
    SIZE,
    Scene,
    Shape,
    color_bleed,
    color_masks,
    masks,
    object_agreement,
    random_edit,
    random_scene,
    render,
    scene_distance,
)


def test_render_and_masks():
    scene = Scene("gray", (Shape("circle", "red", "left", "top"),
                           Shape("square", "blue", "right", "bottom")))
    image = render(scene)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    red, blue = masks(scene)
    assert red.sum() > 40 and blue.sum() > 40 and not (red & blue).any()
    assert (image[red] == COLORS["red"]).all() and (image[blue] == COLORS["blue"]).all()
    assert scene.caption() == "a red circle top left and a blue square bottom right on gray"


def test_metrics_are_exact_on_renders_and_catch_mistakes():
    rng = random.Random(3)
    for _ in range(100):
        e = random_edit(rng)
        assert object_agreement(render(e.target), e.target) == {"color": 1.0, "shape_iou": 1.0}
        assert scene_distance(e.context, e.target) >= 1
    scene = Scene("sand", (Shape("triangle", "green", "middle", "top"),))
    wrong = Scene("sand", (Shape("triangle", "orange", "middle", "top"),))
    assert object_agreement(render(wrong), scene)["color"] == 0.0
    empty = render(Scene("sand", ()))
    assert object_agreement(empty, scene)["shape_iou"] == 0.0


def test_color_bleed_is_zero_on_renders_and_measures_leaked_pixels():
    rng = random.Random(7)
    for _ in range(100):
        scene = random_scene(rng)
        assert color_bleed(render(scene), scene) == 0.0
    scene = Scene("gray", (Shape("circle", "red", "left", "top"),
                           Shape("square", "blue", "right", "bottom")))
    red, blue = masks(scene)
    image = render(scene)
    image[red] = COLORS["blue"]  # the blue leaks into the whole circle
    assert color_bleed(image, scene) == 0.5
    image = render(scene)
    image[blue] = COLORS["green"]  # wrong, but not another object's colour: no leakage
    assert color_bleed(image, scene) == 0.0
    one_color = Scene("gray", (Shape("circle", "red", "left", "top"),
                               Shape("square", "red", "right", "bottom")))
    assert color_bleed(render(one_color), one_color) == 0.0


def test_color_masks_find_each_object_where_it_is_drawn():
    rng = random.Random(11)
    for _ in range(50):
        scene = random_scene(rng)
        if len({s.color for s in scene.shapes}) == len(scene.shapes):
            assert np.array_equal(color_masks(render(scene), scene), np.stack(masks(scene)))
    scene = Scene("gray", (Shape("circle", "red", "left", "top"),))
    moved = Scene("gray", (Shape("circle", "red", "right", "bottom"),))
    assert np.array_equal(color_masks(render(moved), scene)[0], masks(moved)[0])


def test_edits_name_one_object_and_change_the_scene():
    rng = random.Random(5)
    kinds = set()
    for _ in range(200):
        e = random_edit(rng)
        looks = [(s.kind, s.color) for s in e.context.shapes]
        assert len(looks) == len(set(looks))
        kinds.add(e.instruction.split()[0])
        assert e.context.background == e.target.background
    assert kinds == {"make", "move", "add", "remove"}
    assert 1 <= len(random_scene(rng).shapes) <= 3


def test_instruction_pool_is_distinct_interleaved_and_in_vocabulary():
    from ditflow.testbed.models import VOCABULARY
    from ditflow.testbed.scenes import EDIT_KINDS, instruction_pool

    pool = instruction_pool()
    assert len(pool) == len(set(pool)) == 60
    assert [p.split()[0] for p in pool[:4]] == list(EDIT_KINDS)  # any prefix covers the kinds
    assert {w for p in pool for w in p.split()} <= set(VOCABULARY)
