"""Procedural scenes: a few coloured shapes on a textured background, known exactly.

Everything about a scene (shapes, colours, positions, sizes) is data, so captions, per-object
masks and edits are exact and so are the metrics computed on generated images. Edit triplets are
(context scene, instruction, target scene): recolour, move, add, remove.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

SIZE = 32  # pixels per side
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {  # two-tone textures, muted so shapes stand out
    "gray": ((120, 120, 120), (140, 140, 140)),
    "sand": ((170, 150, 110), (185, 165, 125)),
    "teal": ((70, 110, 110), (85, 125, 125)),
}
POSITIONS = {"left": 8, "middle": 16, "right": 24}  # x of the object's centre
ROWS = {"top": 9, "bottom": 23}  # y of the object's centre
RADIUS = 5


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    column: str
    row: str

    @property
    def center(self) -> tuple[int, int]:
        return POSITIONS[self.column], ROWS[self.row]

    def phrase(self) -> str:
        return f"a {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        parts = [f"{s.phrase()} {s.row} {s.column}" for s in self.shapes]
        return " and ".join(parts) + f" on {self.background}"


def _shape_mask(shape: Shape) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy = shape.center
    dx, dy = xx - cx, yy - cy
    if shape.kind == "circle":
        return dx**2 + dy**2 <= RADIUS**2
    if shape.kind == "square":
        return (np.abs(dx) <= RADIUS - 1) & (np.abs(dy) <= RADIUS - 1)
    # triangle pointing up: inside three half-planes
    return (dy <= RADIUS - 1) & (dy >= -RADIUS) & (np.abs(dx) <= (dy + RADIUS) * 0.6)


def masks(scene: Scene) -> list[np.ndarray]:
    """bool [SIZE, SIZE] per shape, later shapes drawn over earlier ones."""
    out = []
    covered = np.zeros((SIZE, SIZE), dtype=bool)
    for shape in reversed(scene.shapes):
        mask = _shape_mask(shape) & ~covered
        covered |= mask
        out.append(mask)
    return out[::-1]


def render(scene: Scene) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]."""
    low, high = BACKGROUNDS[scene.background]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    stripes = ((xx + yy) // 4) % 2 == 0
    image = np.where(stripes[..., None], np.array(low), np.array(high)).astype(np.uint8)
    for shape, mask in zip(scene.shapes, masks(scene), strict=True):
        image[mask] = COLORS[shape.color]
    return image


def random_scene(rng: random.Random, count: int | None = None) -> Scene:
    """1-3 shapes in distinct slots; no two share kind and colour, so "the red circle" names one
    object."""
    count = count if count is not None else rng.choice((1, 2, 2, 3))
    slots = rng.sample([(c, r) for c in POSITIONS for r in ROWS], count)
    looks = rng.sample([(k, c) for k in SHAPES for c in COLORS], count)
    shapes = tuple(Shape(k, c, col, row) for (k, c), (col, row) in zip(looks, slots, strict=True))
    return Scene(rng.choice(list(BACKGROUNDS)), shapes)


@dataclass(frozen=True)
class Edit:
    context: Scene
    instruction: str
    target: Scene


def random_edit(rng: random.Random) -> Edit:
    """recolour / move / add / remove one shape of a random scene."""
    scene = random_scene(rng)
    free = [(c, r) for c in POSITIONS for r in ROWS
            if all((s.column, s.row) != (c, r) for s in scene.shapes)]
    kinds = ["recolor", "move", "add"] + (["remove"] if len(scene.shapes) > 1 else [])
    kind = rng.choice(kinds)
    i = rng.randrange(len(scene.shapes))
    shape = scene.shapes[i]
    shapes = list(scene.shapes)
    taken = {(s.kind, s.color) for s in scene.shapes}
    if kind == "recolor":
        color = rng.choice([c for c in COLORS if (shape.kind, c) not in taken])
        shapes[i] = replace(shape, color=color)
        instruction = f"make the {shape.color} {shape.kind} {color}"
    elif kind == "move":
        column, row = rng.choice(free)
        shapes[i] = replace(shape, column=column, row=row)
        instruction = f"move the {shape.color} {shape.kind} to the {row} {column}"
    elif kind == "add":
        column, row = rng.choice(free)
        look = rng.choice([(k, c) for k in SHAPES for c in COLORS if (k, c) not in taken])
        new = Shape(*look, column, row)
        shapes.append(new)
        instruction = f"add {new.phrase()} {row} {column}"
    else:
        del shapes[i]
        instruction = f"remove the {shape.color} {shape.kind}"
    return Edit(scene, instruction, replace(scene, shapes=tuple(shapes)))


EDIT_KINDS = ("make", "move", "add", "remove")  # an instruction's first word names its kind


def instruction_pool(per_kind: int = 15, seed: int = 20_000) -> tuple[str, ...]:
    """Distinct testbed instructions, ``per_kind`` of each edit kind, interleaved by kind: the
    DeContext prompt pool for the testbed editor (the photo-editing pool is outside its
    vocabulary)."""
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {kind: [] for kind in EDIT_KINDS}
    while any(len(v) < per_kind for v in by_kind.values()):
        instruction = random_edit(rng).instruction
        bucket = by_kind[instruction.split()[0]]
        if len(bucket) < per_kind and instruction not in bucket:
            bucket.append(instruction)
    return tuple(p for group in zip(*by_kind.values(), strict=True) for p in group)


_PALETTE = {name: np.array(rgb, dtype=float) for name, rgb in COLORS.items()}


def _nearest_names(pixels: np.ndarray, candidates: dict[str, np.ndarray]) -> np.ndarray:
    """The name of the candidate colour nearest to each pixel: str [SIZE, SIZE]."""
    names = list(candidates)
    dist = np.stack([np.linalg.norm(pixels - candidates[n], axis=-1) for n in names])
    return np.array(names)[dist.argmin(0)]


def _scene_colors(scene: Scene) -> dict[str, np.ndarray]:
    """The palette and the scene's (mean) background colour."""
    return {**_PALETTE, "background": np.mean(BACKGROUNDS[scene.background], axis=0)}


def object_agreement(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """How well ``image`` (uint8 [SIZE, SIZE, 3]) shows ``scene``, measured inside each
    object's mask: ``color`` = share of objects whose mean colour is nearest to their named
    colour (among the palette and the background); ``shape_iou`` = mean IoU between each
    object's mask and the pixels nearest to its colour around it."""
    if not scene.shapes:
        return {"color": 1.0, "shape_iou": 1.0}
    candidates = _scene_colors(scene)
    pixels = image.astype(float)
    nearest = _nearest_names(pixels, candidates)  # each pixel's palette entry or background
    color_hits, ious = [], []
    all_masks = masks(scene)
    covered = np.any(all_masks, axis=0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for shape, mask in zip(scene.shapes, all_masks, strict=True):
        others = covered & ~mask  # the masks do not overlap
        mean = pixels[mask].mean(0)
        best = min(candidates, key=lambda n: np.linalg.norm(mean - candidates[n]))
        color_hits.append(best == shape.color)
        cx, cy = shape.center
        window = (np.abs(xx - cx) <= RADIUS + 2) & (np.abs(yy - cy) <= RADIUS + 2)
        predicted = (nearest == shape.color) & window & ~others
        union = (predicted | mask).sum()
        ious.append((predicted & mask).sum() / union if union else 0.0)
    return {"color": float(np.mean(color_hits)), "shape_iou": float(np.mean(ious))}


def color_masks(image: np.ndarray, scene: Scene) -> np.ndarray:
    """Per object, the pixels of ``image`` whose nearest colour (among the palette and the
    scene's background) is the object's colour: bool [objects, SIZE, SIZE]."""
    nearest = _nearest_names(image.astype(float), _scene_colors(scene))
    return np.stack([nearest == s.color for s in scene.shapes])


def palette_mask(image: np.ndarray, color: str) -> np.ndarray:
    """bool [SIZE, SIZE]: the pixels of ``image`` nearest ``color`` among the palette and every
    background's mean colour (no scene needed)."""
    candidates = {**_PALETTE, **{f"background {name}": np.mean(tones, axis=0)
                                 for name, tones in BACKGROUNDS.items()}}
    return _nearest_names(image.astype(float), candidates) == color


def color_share(image: np.ndarray, region: np.ndarray, colors, scene: Scene) -> float:
    """Share of the pixels of ``image`` in ``region`` (bool [SIZE, SIZE]) whose nearest colour
    (among the palette and the scene's background) is one of ``colors``."""
    nearest = _nearest_names(image.astype(float), _scene_colors(scene))
    return float(np.isin(nearest[region], sorted(colors)).mean())


def color_bleed(image: np.ndarray, scene: Scene) -> float:
    """Semantic leakage between objects, measured inside each object's mask: the share of its
    pixels whose nearest palette colour is another object's colour in the scene and not its own
    (0 = no bleeding). Mean over the objects; 0 for scenes whose objects share one colour."""
    colors = {s.color for s in scene.shapes}
    if len(colors) < 2:
        return 0.0
    nearest = _nearest_names(image.astype(float), _PALETTE)
    bled = [np.isin(nearest[mask], sorted(colors - {shape.color})).mean()
            for shape, mask in zip(scene.shapes, masks(scene), strict=True) if mask.any()]
    return float(np.mean(bled)) if bled else 0.0


def scene_distance(a: Scene, b: Scene) -> int:
    """Objects that differ between two scenes (same slot compared by kind and colour)."""
    slots_a = {(s.column, s.row): (s.kind, s.color) for s in a.shapes}
    slots_b = {(s.column, s.row): (s.kind, s.color) for s in b.shapes}
    return sum(slots_a.get(k) != slots_b.get(k) for k in set(slots_a) | set(slots_b))
