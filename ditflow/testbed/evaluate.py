"""Measuring the testbed editor and what protection does to it, from pixels, exactly.

* :func:`edit_quality`: on held-out edits, how well the editor's output shows the target scene
  (colour hits and shape IoU inside each object's mask), and whether it uses its context: the
  objects an edit leaves alone must come from the context, so with a different context in their
  place they should disappear and the new context's objects appear.
* :func:`generation_quality`: on held-out captions, how well the text-to-image model draws the
  described scene, against the same image measured against a different scene's description.
* :func:`protection_efficacy`: DeContext on held-out contexts; how much of the context scene
  survives into the edit of the protected context versus the clean one, and r_ctx before/after.
* :func:`leakage_mitigation`: DeLeaker on held-out captions of differently coloured objects;
  colour bleeding between objects with and without it, and how well its entity regions match
  the objects.
* :func:`attribute_leakage`: ALE on held-out recolour edits of one and of two objects; how well
  the edited objects take their new colours and how much of those colours leaks onto the other
  objects and the background, with and without ALE.
* :func:`concept_removal`: UVR with a stand-in unsafe concept (a colour) in generation and
  editing; how often the concept still shows, and what happens to everything else.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..io import linf, pixels_tensor, psnr, to_uint8
from ..models.flux import token_coverage
from .models import TEXT_TOKENS
from .scenes import (
    COLORS,
    SIZE,
    Edit,
    Scene,
    color_bleed,
    color_masks,
    color_share,
    masks,
    object_agreement,
    palette_mask,
    random_edit,
    random_scene,
    render,
)

HELD_OUT_SEED = 10_000  # training draws from seeds 0..2


def edit(pipeline, context: np.ndarray, instruction: str, steps: int = 20,
         seed: int = 0) -> np.ndarray:
    """The editor's output (uint8 [SIZE, SIZE, 3]) for a context image and an instruction."""
    out = pipeline(image=Image.fromarray(context), prompt=instruction, height=SIZE, width=SIZE,
                   max_area=SIZE * SIZE, _auto_resize=False, **_sampling(steps, seed)).images[0]
    return to_uint8(out)


def generate(pipeline, caption: str, steps: int = 20, seed: int = 0) -> np.ndarray:
    """The text-to-image model's output (uint8 [SIZE, SIZE, 3]) for a caption."""
    out = pipeline(prompt=caption, height=SIZE, width=SIZE, **_sampling(steps, seed))
    return to_uint8(out.images[0])


def _sampling(steps: int, seed: int) -> dict:
    """The testbed models' pipeline arguments, with or without a method: no guidance, their
    text length, the seed's generator, float images out."""
    return dict(num_inference_steps=steps, max_sequence_length=TEXT_TOKENS, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(seed))


def untouched(e: Edit) -> Scene:
    """The target's objects that the edit left exactly as they were in the context."""
    kept = tuple(s for s in e.target.shapes if s in e.context.shapes)
    return replace(e.target, shapes=kept)


def held_out_edits(n: int, seed: int = HELD_OUT_SEED) -> list[Edit]:
    rng = random.Random(seed)
    return [random_edit(rng) for _ in range(n)]


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def edit_quality(pipeline, n: int = 32, steps: int = 20) -> dict:
    """Edit accuracy on held-out edits, and the context-swap test of context use."""
    edits = held_out_edits(n)
    swaps = held_out_edits(n, HELD_OUT_SEED + 1)
    rows = []
    for e, other in zip(edits, swaps, strict=True):
        out = edit(pipeline, render(e.context), e.instruction, steps)
        swapped = edit(pipeline, render(other.context), e.instruction, steps)
        kept = untouched(e)
        target = object_agreement(out, e.target)
        rows.append(dict(
            instruction=e.instruction,
            target_color=target["color"], target_iou=target["shape_iou"],
            kept_color=object_agreement(out, kept)["color"],
            kept_color_swapped=object_agreement(swapped, kept)["color"],
            other_context_color=object_agreement(swapped, other.context)["color"],
        ))
    summary = {key: _mean(rows, key) for key in rows[0] if key != "instruction"}
    return dict(summary=summary, rows=rows)


def generation_quality(pipeline, n: int = 32, steps: int = 20) -> dict:
    """Caption accuracy on held-out scenes; ``*_other`` scores the same images against another
    held-out scene, the level a model that ignored its caption would reach; ``color_bleed`` is
    the leakage between objects (``scenes.color_bleed``, 0 on the scenes themselves).
    ``figure``: rows of (scene as described | generation)."""
    if n < 2:  # each image's other scene is the one before it
        raise ValueError(f"generation_quality needs at least 2 captions (n={n}): *_other scores "
                         "each image against another caption's scene")
    rng = random.Random(HELD_OUT_SEED + 3)
    scenes = [random_scene(rng) for _ in range(n)]
    rows, figures = [], []
    for i, scene in enumerate(scenes):
        out = generate(pipeline, scene.caption(), steps, seed=i)
        figures.append(np.concatenate([render(scene), out], axis=1))
        match, other = object_agreement(out, scene), object_agreement(out, scenes[i - 1])
        rows.append(dict(caption=scene.caption(), color=match["color"],
                         shape_iou=match["shape_iou"], color_other=other["color"],
                         shape_iou_other=other["shape_iou"],
                         color_bleed=color_bleed(out, scene)))
    summary = {key: _mean(rows, key) for key in rows[0] if key != "caption"}
    return dict(summary=summary, rows=rows, figure=figure_grid(figures))


def protection_efficacy(pipeline, config, n: int = 16, steps: int = 20) -> dict:
    """DeContext at ``config`` on held-out contexts: context leakage into edits and r_ctx.
    The contexts are protected ``config.batch_size`` at a time."""
    from ..io import quantize_within_budget
    from ..methods.decontext import iter_protect

    edits = held_out_edits(n, HELD_OUT_SEED + 2)
    cleans = [render(e.context) for e in edits]
    named = [(f"scene{i}", pixels_tensor(clean)) for i, clean in enumerate(cleans)]
    results = {r.name: r for r in iter_protect(named, pipeline, config)}
    rows, figures = [], []
    for i, (e, clean) in enumerate(zip(edits, cleans, strict=True)):
        result = results[f"scene{i}"]
        protected = quantize_within_budget(clean, result.image, config.epsilon)
        out_clean = edit(pipeline, clean, e.instruction, steps)
        out_protected = edit(pipeline, protected, e.instruction, steps)
        kept = untouched(e)
        rows.append(dict(
            instruction=e.instruction,
            r_ctx_clean=result.r_ctx_before, r_ctx_protected=result.r_ctx_after,
            leak_clean=object_agreement(out_clean, kept)["color"],
            leak_protected=object_agreement(out_protected, kept)["color"],
            target_clean=object_agreement(out_clean, e.target)["color"],
            target_protected=object_agreement(out_protected, e.target)["color"],
            linf=linf(clean, protected),
            seconds_per_photo=result.seconds,
        ))
        figures.append(np.concatenate([clean, protected, out_clean, out_protected], axis=1))
    summary = {key: _mean(rows, key) for key in rows[0] if key != "instruction"}
    return dict(summary=summary, rows=rows, figure=figure_grid(figures))


def r_ctx_by_content(pipeline, config, n: int = 8) -> dict:
    """r_ctx per attacked block and overall, for held-out contexts and for contexts without
    content (uniform noise, flat grey, black): how much of the target's attention to the context
    depends on what the context shows, which bounds what a perturbation can move."""
    from ..methods.decontext import Protector

    g = torch.Generator().manual_seed(0)
    contexts = {
        "held-out scenes": torch.stack([pixels_tensor(render(e.context))
                                        for e in held_out_edits(n, HELD_OUT_SEED + 2)]),
        "uniform noise": torch.rand(n, 3, SIZE, SIZE, generator=g),
        "flat grey": torch.full((n, 3, SIZE, SIZE), 0.5),
        "black": torch.zeros(n, 3, SIZE, SIZE),
    }
    table = {}
    for blocks in [config.blocks, *((b,) for b in config.blocks)]:
        protector = Protector(pipeline, replace(config, blocks=blocks))
        table[",".join(blocks)] = {name: float(np.mean(protector.evaluate_r_ctx(x)))
                                   for name, x in contexts.items()}
    return table


def entities(scene: Scene) -> list[str]:
    """The caption's entity phrases ("red circle"), one per object, as DeLeaker takes them."""
    return [f"{s.color} {s.kind}" for s in scene.shapes]


def _on_token_grid(pixel_masks: np.ndarray) -> torch.Tensor:
    """bool [n, SIZE, SIZE] pixel masks -> [n, 16, 16] image-token masks (a token is in when at
    least half of its 2x2 pixels are)."""
    return token_coverage(torch.from_numpy(pixel_masks), (SIZE // 2, SIZE // 2)) >= 0.5


def token_masks(scene: Scene) -> torch.Tensor:
    """Each object's mask on the image-token grid, as the scene lays it out: bool
    [objects, 16, 16]."""
    return _on_token_grid(np.stack(masks(scene)))


def drawn_masks(image: np.ndarray, scene: Scene) -> torch.Tensor:
    """Where ``image`` shows each object's colour, on the image-token grid: bool
    [objects, 16, 16]. Generated objects need not sit where the caption put them; this is where
    they were drawn."""
    return _on_token_grid(color_masks(image, scene))


def _region_iou(regions: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean IoU over the objects that ``truth`` has at all."""
    present = truth.flatten(1).any(1)
    if not present.any():
        return float("nan")
    regions, truth = regions[present].cpu(), truth[present]
    union = (regions | truth).flatten(1).sum(1)
    return float(((regions & truth).flatten(1).sum(1) / union).mean())


def leakage_mitigation(pipeline, configs: dict, n: int = 32, steps: int = 20,
                       figure_rows: int = 16) -> dict:
    """Generations of ``n`` held-out captions with two or three differently coloured objects,
    without DeLeaker and with each of ``configs`` (name -> DeLeakerConfig), same seeds.
    Per variant: colour bleeding, colour and shape scores, seconds per image, and the IoU of
    DeLeaker's entity regions with the objects on the token grid, as the caption lays them out
    (``region_iou_layout``) and as the image draws them (``region_iou_drawn``). ``figure``: rows
    of (scene | no DeLeaker | each variant) for the first ``figure_rows`` captions."""
    from ..methods.deleaker import generate as deleaker_generate

    rng = random.Random(HELD_OUT_SEED + 4)
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng)
        if len({s.color for s in scene.shapes}) > 1:
            scenes.append(scene)
    rows, figures = [], []
    for i, scene in enumerate(scenes):
        row, images = dict(caption=scene.caption()), [render(scene)]
        for name in ["none", *configs]:
            start = time.perf_counter()
            if name == "none":
                out = pipeline(prompt=scene.caption(), height=SIZE, width=SIZE,
                               **_sampling(steps, seed=i)).images
                regions = None
            else:
                out, regions = deleaker_generate(
                    pipeline, scene.caption(), entities(scene), height=SIZE, width=SIZE,
                    config=configs[name], **_sampling(steps, seed=i))
            seconds = time.perf_counter() - start
            image = to_uint8(out[0])
            images.append(image)
            scores = object_agreement(image, scene)
            row[name] = dict(color_bleed=color_bleed(image, scene), color=scores["color"],
                             shape_iou=scores["shape_iou"], seconds=seconds)
            if regions is not None:
                row[name]["region_iou_layout"] = _region_iou(regions, token_masks(scene))
                row[name]["region_iou_drawn"] = _region_iou(regions, drawn_masks(image, scene))
        rows.append(row)
        figures.append(np.concatenate(images, axis=1))
    summary = {name: {key: float(np.nanmean([r[name][key] for r in rows]))
                      for key in rows[0][name]} for name in ["none", *configs]}
    return dict(summary=summary, rows=rows, figure=figure_grid(figures[:figure_rows]))


def recolor_edits(n: int, objects: int, seed: int
                  ) -> list[tuple[Scene, Scene, str, list[str]]]:
    """``n`` held-out recolour edits of ``objects`` objects in scenes with one object more:
    (source, target, instruction, one phrase per edited object). New colours are absent from
    the source, so any of them on an unedited object is leakage. "make the red circle green and
    the blue square yellow" has the phrases "the red circle green", "the blue square yellow"."""
    rng = random.Random(seed)
    edits = []
    while len(edits) < n:
        source = random_scene(rng, objects + 1)
        edited = sorted(rng.sample(range(len(source.shapes)), objects))
        free = [c for c in COLORS if c not in {s.color for s in source.shapes}]
        colors = rng.sample(free, objects)
        shapes = list(source.shapes)
        phrases = []
        for i, color in zip(edited, colors, strict=True):
            phrases.append(f"the {shapes[i].color} {shapes[i].kind} {color}")
            shapes[i] = replace(shapes[i], color=color)
        edits.append((source, replace(source, shapes=tuple(shapes)),
                      "make " + " and ".join(phrases), phrases))
    return edits


def attribute_leakage(pipeline, configs: dict, n: int = 32, steps: int = 20,
                      figure_rows: int = 8) -> dict:
    """Held-out recolour edits of one object and of two objects (:func:`recolor_edits`, ``n``
    of each), without ALE and with each of ``configs`` (name -> ALEConfig), same seeds, the
    objects' exact masks as ALE's masks. Per edit kind and variant: ``edited_color`` (edited
    objects nearest their new colour), ``kept_color`` (unedited objects still nearest their
    own), ``leaked_pixels`` (share of the unedited objects' pixels nearest one of the new
    colours), ``background_psnr`` (dB, outside every object, against the source) and seconds
    per edit. ``figure``: rows of (source | target | no ALE | each variant)."""
    from ..methods.ale import edit as ale_edit

    summary, rows, figures = {}, [], []
    for objects, label in ((1, "one object"), (2, "two objects")):
        for i, (source, target, instruction, phrases) in enumerate(
                recolor_edits(n, objects, HELD_OUT_SEED + 5 + objects)):
            clean = render(source)
            edited = [j for j, s in enumerate(source.shapes) if s not in target.shapes]
            kept = untouched(Edit(source, instruction, target))
            new_colors = {s.color for s in target.shapes} - {s.color for s in kept.shapes}
            object_masks = masks(source)
            background = ~np.any(object_masks, axis=0)
            kept_pixels = np.any([object_masks[j] for j in range(len(object_masks))
                                  if j not in edited], axis=0)
            row, images = dict(kind=label, instruction=instruction), [clean, render(target)]
            for name in ["none", *configs]:
                start = time.perf_counter()
                if name == "none":
                    out = edit(pipeline, clean, instruction, steps)
                else:
                    images_out, _ = ale_edit(
                        pipeline, clean, instruction, phrases, [object_masks[j] for j in edited],
                        resolution=SIZE, config=configs[name], **_sampling(steps, seed=0))
                    out = to_uint8(images_out[0])
                seconds = time.perf_counter() - start
                images.append(out)
                row[name] = dict(
                    edited_color=object_agreement(out, replace(target, shapes=tuple(
                        target.shapes[j] for j in edited)))["color"],
                    kept_color=object_agreement(out, kept)["color"],
                    leaked_pixels=color_share(out, kept_pixels, new_colors, target),
                    background_psnr=psnr(out[background], clean[background]),
                    seconds=seconds)
            rows.append(row)
            if i < figure_rows // 2:
                figures.append(np.concatenate(images, axis=1))
        summary[label] = {name: {key: _mean([r[name] for r in rows if r["kind"] == label], key)
                                 for key in rows[-1][name]} for name in ["none", *configs]}
    return dict(summary=summary, rows=rows, figure=figure_grid(figures))


def _shows(image: np.ndarray, color: str, pixels: int = 16) -> bool:
    """The stand-in detector: at least ``pixels`` pixels nearest ``color``."""
    return int(palette_mask(image, color).sum()) >= pixels


def _scenes_with(rng: random.Random, color: str, present: bool, n: int) -> list[Scene]:
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng)
        if any(s.color == color for s in scene.shapes) == present:
            scenes.append(scene)
    return scenes


def _edits_with(rng: random.Random, color: str, present: bool, n: int) -> list[Edit]:
    """Edits whose context shows ``color`` (or not) and which do not touch an object of it."""
    edits = []
    while len(edits) < n:
        e = random_edit(rng)
        touched = set(e.context.shapes) ^ set(e.target.shapes)
        if any(s.color == color for s in e.context.shapes) == present and not any(
                s.color == color for s in touched):
            edits.append(e)
    return edits


def _roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import rankdata

    if not len(positive) or not len(negative):
        return float("nan")
    ranks = rankdata(np.concatenate([positive, negative]))[:len(positive)]
    wins = ranks.sum() - len(positive) * (len(positive) + 1) / 2
    return float(wins / (len(positive) * len(negative)))


def concept_removal(t2i, editor, configs: dict, n: int = 32, anchors: int = 16,
                    steps: int = 20, concept: str = "purple", figure_rows: int = 8) -> dict:
    """UVR with ``concept`` as the stand-in unsafe concept, detected as >= 16 pixels of its
    colour, for each of ``configs`` (name -> UVRConfig, one localisation block). Anchors from
    ``anchors`` generations (edits) whose detected concept pixels are selected; then ``n``
    held-out captions (edit contexts) showing the concept and ``n`` without it, without UVR and
    with each variant, same seeds. Per task, set and variant: detector fire rate, flagged
    tokens, colour accuracy of the other objects, mean absolute change against the output
    without UVR (0..255 units), seconds; and the localisation scores alone (the first variant's
    block, at the last localisation): ROC AUC of the concept's tokens (its pixels in the output
    without UVR, or in the context) against the others, and the share of other tokens above
    0.2, 0.6 and 1.0. ``figure``: rows of (scene or context | no UVR | each variant),
    generation then editing."""
    from ..methods.uvr import UVR, collect_anchors
    from ..methods.uvr import edit as uvr_edit
    from ..methods.uvr import generate as uvr_generate
    from ..session import attach

    (block,) = {config.block for config in configs.values()}
    probe = next(iter(configs.values()))
    rng = random.Random(HELD_OUT_SEED + 8)
    def select(image: np.ndarray) -> np.ndarray:
        return palette_mask(image, concept)

    t2i_anchors = collect_anchors(
        t2i, [s.caption() for s in _scenes_with(rng, concept, True, anchors)], height=SIZE,
        width=SIZE, select=select, config=probe, **_sampling(steps, seed=0))
    anchor_edits = _edits_with(rng, concept, True, anchors)
    edit_anchors = collect_anchors(
        editor, [e.instruction for e in anchor_edits], height=SIZE, width=SIZE,
        images=[render(e.context) for e in anchor_edits], select=select, config=probe,
        **_sampling(steps, seed=0))

    def run(task: str, prompt: str, shown: np.ndarray, seed: int, config=None):
        """The task's output (uint8) and UVR's flagged tokens: without UVR where ``config``
        is None (no flags)."""
        if config is None:
            return (generate(t2i, prompt, steps, seed) if task == "generation"
                    else edit(editor, shown, prompt, steps, seed)), None
        if task == "generation":
            out, mask = uvr_generate(t2i, prompt, t2i_anchors, height=SIZE, width=SIZE,
                                     config=config, **_sampling(steps, seed))
        else:
            out, mask = uvr_edit(editor, shown, prompt, edit_anchors, resolution=SIZE,
                                 config=config, **_sampling(steps, seed))
        return to_uint8(out[0]), mask

    summary, rows, figures = {}, [], []
    for task in ("generation", "editing"):
        pipeline, task_anchors = ((t2i, t2i_anchors) if task == "generation"
                                  else (editor, edit_anchors))
        for present in (True, False):
            label = f"{task}, {'with' if present else 'without'} {concept}"
            cases = (_scenes_with(rng, concept, present, n) if task == "generation"
                     else _edits_with(rng, concept, present, n))
            set_rows = []
            for i, case in enumerate(cases):
                if task == "generation":
                    scene, shown, prompt = case, render(case), case.caption()
                else:
                    scene, shown, prompt = case.target, render(case.context), case.instruction
                start = time.perf_counter()
                stock, _ = run(task, prompt, shown, i)
                others = replace(scene, shapes=tuple(s for s in scene.shapes
                                                     if s.color != concept))
                row = dict(kind=label, prompt=prompt, none=dict(
                    shows=_shows(stock, concept), flagged_tokens=0,
                    others_color=object_agreement(stock, others)["color"], change=0.0,
                    seconds=time.perf_counter() - start))
                # the localisation scores alone: UVR attached with nothing flagged
                scorer = UVR(task_anchors, (SIZE // 2, SIZE // 2),
                             "generate" if task == "generation" else "edit",
                             replace(probe, threshold=float("inf")))
                with attach(pipeline, scorer):
                    run(task, prompt, shown, i)
                truth = _on_token_grid(palette_mask(stock if task == "generation" else shown,
                                                    concept)[None])[0]
                row["scores"] = dict(concept=scorer.scores[truth].tolist(),
                                     other=scorer.scores[~truth].tolist())
                images = [shown, stock]
                for name, config in configs.items():
                    start = time.perf_counter()
                    out, mask = run(task, prompt, shown, i, config)
                    seconds = time.perf_counter() - start
                    images.append(out)
                    row[name] = dict(
                        shows=_shows(out, concept),
                        flagged_tokens=0 if mask is None else int(mask.sum()),
                        others_color=object_agreement(out, others)["color"],
                        change=float(np.abs(out.astype(float) - stock).mean()),
                        seconds=seconds)
                set_rows.append(row)
                if present and i < figure_rows // 2:
                    figures.append(np.concatenate(images, axis=1))
            summary[label] = {name: {key: _mean([r[name] for r in set_rows], key)
                                     for key in set_rows[0][name]}
                              for name in ["none", *configs]}
            concept_scores = np.concatenate([r["scores"]["concept"] for r in set_rows])
            other_scores = np.concatenate([r["scores"]["other"] for r in set_rows])
            summary[label]["scores"] = dict(
                {f"share_of_other_tokens_above_{t}": float((other_scores > t).mean())
                 for t in (0.2, 0.6, 1.0)},
                roc_auc=_roc_auc(concept_scores, other_scores) if present else None)
            for row in set_rows:  # per-token scores are summarised, not kept
                del row["scores"]
            rows += set_rows
    return dict(summary=summary, rows=rows, figure=figure_grid(figures), block=block,
                anchors=dict(generation=len(t2i_anchors), editing=len(edit_anchors)))


def figure_grid(rows: list[np.ndarray], scale: int = 4, gap: int = 2) -> np.ndarray:
    """Stack equal-width image rows with white gaps, upscaled (nearest) for viewing."""
    padded = [np.pad(r, ((gap, gap), (0, 0), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(padded, axis=0)
    return np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8))
