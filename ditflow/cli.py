"""The ``ditflow`` command: ``protect`` photos, ``evaluate`` a protection, run the ``demo``,
``generate`` images with DeLeaker, ``edit`` several objects at once with ALE; ``generate`` and
``edit`` restrict an unsafe concept with UVR (``--uvr ANCHORS``).

Models: ``--model testbed`` (the default) is the small FLUX Kontext-style editor (for
``generate``: the text-to-image model) trained offline on procedural scenes that ships with
ditflow (32x32 scenes of coloured shapes); ``--model tiny`` is a random tiny FLUX and
``--model tiny-qwen`` / ``tiny-step1x`` a random tiny Qwen-Image-Edit / Step1X-Edit
(``protect`` and ``evaluate``; machinery only); ``--model DIR`` loads a local folder and never
downloads: FLUX.1 Kontext or (``protect``, ``evaluate``) Qwen-Image-Edit or Step1X-Edit; FLUX.1
for ``generate``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .io import DEFAULT_MAX_PIXELS
from .models import UnknownBlocks, presets
from .models.presets import BUILTIN

if TYPE_CHECKING:
    from .methods.decontext import ProtectConfig

SAMPLES = Path(__file__).resolve().parent / "samples"


class UsageError(Exception):
    """A command that cannot run as given (a bad folder, a model that is not the one asked for,
    settings an earlier run contradicts): ``error: <message>``, exit status 2."""


# What every command imports from the diffusers extra: distribution -> module.
DIFFUSERS_EXTRA = {"diffusers": "diffusers", "transformers": "transformers",
                   "safetensors": "safetensors", "Pillow": "PIL", "tqdm": "tqdm",
                   "scipy": "scipy"}


def _number(kind: type, low: float | None = None, high: float | None = None,
            above: float | None = None, below: float | None = None):
    """An argparse type: a finite ``kind`` (int or float) from ``low`` to ``high``, greater
    than ``above`` and less than ``below`` (bounds optional), so a bad value is refused naming
    its option."""
    limits = [f"{sign} {bound}" for sign, bound in ((">=", low), ("<=", high), (">", above),
                                                    ("<", below)) if bound is not None]
    wanted = (f"{'an integer' if kind is int else 'a number'} {' and '.join(limits)}" if limits
              else "a finite number")

    def parse(text: str):
        value = kind(text)  # argparse turns a ValueError into "invalid int value: ..."
        if not (math.isfinite(value) and (low is None or value >= low)
                and (high is None or value <= high) and (above is None or value > above)
                and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"{text}: expected {wanted}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _block_names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated block names, ``single.0,single.1`` (spaces allowed)."""
    from .session import is_block_name

    names = tuple(name.strip() for name in text.split(","))
    bad = [name for name in names if not is_block_name(name)]
    if bad:
        raise argparse.ArgumentTypeError(f"{text}: {bad[0]!r} is no block name (double.<i> or "
                                         "single.<i>, e.g. single.0,single.1)")
    return names


def _block_name(text: str) -> str:
    """An argparse type: one block name."""
    names = _block_names(text)
    if len(names) > 1:
        raise argparse.ArgumentTypeError(f"{text}: one block, e.g. single.10")
    return names[0]


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text}: not a device (cpu, cuda, cuda:1, ...)"
                                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU here (torch {torch.__version__}); "
                                         "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has "
                                         f"{torch.cuda.device_count()} CUDA GPU(s)")
    return text


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COUNT = _number(int, low=1)  # steps, tokens, batch sizes, workers
SIDE = _number(int, low=16)  # working resolutions and image sides, in pixels
FINITE = _number(float)
T5_TOKENS = _number(int, low=1, high=512)  # FLUX pipelines refuse longer T5 prompts


def _pipeline(model: str, device: str, kind: str = "kontext"):
    """:func:`~ditflow.models.loading.pipeline_by_name` for a command: the libraries' own
    chatter (optional image processors, prompt truncation, loading bars) silenced, a folder
    that is not the model asked for a one-line error."""
    import diffusers
    import transformers

    from .models.loading import pipeline_by_name

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    try:
        return pipeline_by_name(model, device, kind)
    except (FileNotFoundError, ValueError) as exc:  # not the model asked for
        raise UsageError(str(exc)) from None


def _model_settings(args) -> dict:
    """Resolution, attacked blocks and text length: the user's, else the model's defaults
    (:func:`~ditflow.models.presets.protect_defaults`)."""
    settings = presets.protect_defaults(args.model)
    if args.resolution:
        settings["resolution"] = args.resolution
    if args.blocks:
        settings["blocks"] = args.blocks
    if args.text_tokens:
        settings["max_sequence_length"] = args.text_tokens
    return settings


def _settings(args, defaults: dict, **option_names) -> dict:
    """``defaults`` overridden by the options given: the ``args`` attribute of each key, or the
    one ``option_names`` maps it to (``resolution="size"``)."""
    chosen = {key: getattr(args, option_names.get(key, key)) for key in defaults}
    return {key: defaults[key] if value is None else value for key, value in chosen.items()}


def _sampling(settings: dict, seed: int) -> dict:
    """The pipeline arguments of a ``generate`` or ``edit`` run: its steps and guidance, the
    seed's generator, float images out."""
    return dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                output_type="np", generator=torch.Generator().manual_seed(seed))


def _note_small_model(model: str, instead: str) -> None:
    """Say that a built-in ``model`` is for demos and tests, and what to pass ``instead``."""
    if model in BUILTIN:
        print(f"note: --model {model} is a small offline model for demos and tests; {instead}",
              file=sys.stderr)


def _config(args) -> ProtectConfig:
    from .methods.decontext import ProtectConfig

    return ProtectConfig(
        method=args.method, epsilon=args.epsilon, step_size=args.step_size, steps=args.steps,
        batch_size=args.batch_size, seed=args.seed, **_model_settings(args),
        gradient_checkpointing=args.checkpointing,
        compile_backend="inductor" if args.compile else None, cuda_graph=args.cuda_graph,
        eot_jpeg_quality=tuple(args.eot_jpeg) if args.eot_jpeg else None,
        eot_resize=tuple(args.eot_resize) if args.eot_resize else None,
        stop_window=args.stop_window, stop_min_gain=args.stop_min_gain)


# Settings that do not change a protected photo (results depend on the seed and the file name,
# not on batching); the prompt pool is the model's.
_RESUMABLE_CHANGES = {"batch_size", "gradient_checkpointing", "compile_backend", "cuda_graph",
                      "prompts"}
# The protect options that set a recorded setting (the others are ProtectConfig's own defaults).
_OPTIONS = {"model": "--model", "format": "--format", "method": "--method",
            "epsilon": "--epsilon", "step_size": "--step-size", "steps": "--steps",
            "resolution": "--resolution", "blocks": "--blocks", "seed": "--seed",
            "max_sequence_length": "--text-tokens", "eot_jpeg_quality": "--eot-jpeg",
            "eot_resize": "--eot-resize", "stop_window": "--stop-window",
            "stop_min_gain": "--stop-min-gain"}


def _model_id(model: str) -> str:
    """``--model`` as a manifest records it: a built-in name, or the folder's absolute path
    (``models/kontext/`` and ``./models/kontext`` are one model)."""
    return model if model in BUILTIN else str(Path(model).expanduser().resolve())


def _recorded_settings(model: str, config: ProtectConfig, suffix: str) -> dict:
    """The settings of a run as its manifest records them: the model, the output format and
    the config with the model's defaults filled in as the protector fills them (a model
    folder's working resolution and blocks from its family, read from its files; left out
    where the folder holds no editor, whose loading fails next)."""
    from .methods.decontext import T5_FAMILIES, with_family_defaults
    from .models.loading import editor_transformer_name

    if model in BUILTIN:
        family = BUILTIN[model].family
    else:
        family = editor_transformer_name(model)
        config = with_family_defaults(config, family)
    # the text length changes nothing where no T5 reads the instruction
    ignored = _RESUMABLE_CHANGES | (set() if family in T5_FAMILIES else {"max_sequence_length"})
    settings = {key: json.loads(json.dumps(value)) for key, value in asdict(config).items()
                if key not in ignored and not (key in ("resolution", "blocks") and value is None)}
    return {"model": _model_id(model), "format": suffix.lstrip("."), **settings}


def _as_option(key: str, value) -> str:
    """A recorded setting as the option that gives it: ``--eot-jpeg 60 95``; ``no --stop-window``
    where it is off."""
    option = _OPTIONS.get(key)
    if option is None:
        return f"{key}={value!r}"
    if value is None:
        return f"no {option}"
    if isinstance(value, list):
        value = (",".join if key == "blocks" else " ".join)(map(str, value))
    return f"{option} {value}"


def _resume_conflict(manifest, settings: dict) -> str:
    """How the finished photos of ``manifest`` were protected differently from a run with
    ``settings`` (:func:`_recorded_settings`; "" if they were not)."""
    for record in manifest.records.values():
        if record.get("status") != "ok":
            continue
        earlier = {"model": _model_id(record.get("model", settings["model"])), **record["config"],
                   "format": Path(record["output"]).suffix.lstrip(".")}
        # a setting an earlier ditflow did not record cannot be compared
        changed = [f"{_as_option(key, earlier[key])} (now {_as_option(key, value)})"
                   for key, value in settings.items() if key in earlier and earlier[key] != value]
        if changed:
            return ", ".join(changed)
    return ""


def _output_folder_problem(outdir: Path, inputs: list[str]) -> str:
    """Why protected photos cannot go to ``outdir`` ("" if they can). Creates nothing: the
    first photo or manifest line written makes the folder, once the model has loaded."""
    if outdir.exists() and not outdir.is_dir():
        return f"-o {outdir} is a file, not a folder"
    if any(Path(item).is_dir() and Path(item).resolve() == outdir.resolve() for item in inputs):
        return (f"-o {outdir} is also an input folder: the protected photos would replace the "
                "originals; choose another output folder")
    existing = next(p for p in (outdir.absolute(), *outdir.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"cannot create the output folder {outdir}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"cannot write to the output folder {outdir}" if existing == outdir.absolute()
                else f"cannot create the output folder {outdir}: {existing} is not writable")
    return ""


def _blocks_named_by_option(error: UnknownBlocks, args) -> str:
    """The protector's refusal of blocks the model lacks (checked once it has loaded), naming
    what set them, ``--blocks`` or the model family's defaults, rather than ProtectConfig's
    field."""
    if args.blocks:
        return error.named("--blocks")
    return error.named("the default blocks of this model's family") + "; choose them with --blocks"


def protect_command(args) -> int:
    from . import bulk, scale
    from .io import Manifest
    from .methods.decontext import UnsupportedSetting

    outdir = Path(args.output)
    suffix = ".jpg" if args.format == "jpg" else ".png"
    if args.format == "jpg":
        print("warning: JPEG recompresses the protected photo: it weakens the perturbation, can "
              "take pixels past --epsilon (the manifest records the saved file's L-inf) and drops "
              "transparency; PNG (the default) keeps all three", file=sys.stderr)
    if args.command == "protect":  # not for the demo's testbed run
        _note_small_model(args.model, "its perturbation does not protect against real editors: "
                          "pass --model with a local FLUX.1 Kontext, Qwen-Image-Edit or "
                          "Step1X-Edit folder for that")
    problem = _output_folder_problem(outdir, args.inputs)
    if problem:
        raise UsageError(problem)
    manifest = Manifest(outdir / "manifest.jsonl", run_fields={"model": _model_id(args.model)})
    finished = any(record.get("status") == "ok" for record in manifest.records.values())
    if finished and not args.resume:
        raise UsageError(f"{manifest.path} holds photos of an earlier run; pass --resume to "
                         "continue it or choose another output folder")
    config = _config(args)
    conflict = _resume_conflict(manifest, _recorded_settings(args.model, config, suffix))
    if conflict:
        raise UsageError(f"{manifest.path} holds photos protected with {conflict}; resume with "
                         "the earlier run's options, or protect into another folder")
    jobs = bulk.gather(args.inputs, outdir, suffix, manifest)
    if all(job.error for job in jobs):  # nothing to load a model for
        for job in jobs:
            print(f"  {job.error}", file=sys.stderr)
        print("error: no photos to protect", file=sys.stderr)
        return 1
    options = dict(resume=args.resume, max_pixels=args.max_pixels, progress=not args.quiet)
    try:
        if args.workers > 1:
            counts = scale.run(jobs, args.model, args.device, config, manifest, args.workers,
                               **options)
        else:
            counts = bulk.run(jobs, _pipeline(args.model, args.device, kind="editor"), config,
                              manifest, **options)
    except scale.WorkerError as exc:
        raise UsageError(str(exc)) from None
    except UnknownBlocks as exc:
        raise UsageError(_blocks_named_by_option(exc, args)) from None
    except UnsupportedSetting as exc:
        raise UsageError(f"--{exc.setting.replace('_', '-')}: {exc.reason}") from None
    except KeyboardInterrupt:
        again = ("rerun with --resume to continue" if args.command == "protect"
                 else "the demo starts over when run again")
        if any(record.get("status") == "ok" for record in manifest.records.values()):
            print(f"\ninterrupted: finished photos are saved and recorded in {manifest.path}; "
                  f"{again}", file=sys.stderr)
        else:
            print(f"\ninterrupted before any photo finished; {again}", file=sys.stderr)
        return 130
    print(f"{counts['ok']} protected, {counts['skipped']} already done, {counts['failed']} "
          f"failed; manifest: {manifest.path}")
    this_run = {str(job.source.resolve()) for job in jobs}  # not earlier runs' failures
    for record in manifest.records.values():
        if record.get("status") == "error" and record["input"] in this_run:
            print(f"  failed: {record['error']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _evaluation_pairs(clean_dir: Path, protected_dir: Path) -> list[tuple[Path, Path]]:
    """(clean, protected) photo files: as the protected folder's manifest records them where it
    has one (by the clean photo's path, or its file name if the photo has moved), else matched
    by file stem. Clean photos without a match are named; a bad folder is a UsageError."""
    from .io import Manifest, folder_files

    for name, folder in (("clean", clean_dir), ("protected", protected_dir)):
        if not folder.is_dir():
            raise UsageError(f"the {name} folder {folder} "
                             f"{'is a file' if folder.exists() else 'does not exist'}")
    manifest = Manifest(protected_dir / "manifest.jsonl")
    by_name: dict[str, list[dict]] = {}  # for clean photos moved since they were protected
    for input_path, record in manifest.records.items():
        by_name.setdefault(Path(input_path).name, []).append(record)
    pairs, protected_files = [], folder_files(protected_dir)
    for clean_path in folder_files(clean_dir):
        if manifest.records:
            named = by_name.get(clean_path.name, [])
            record = manifest.records.get(str(clean_path.resolve()),
                                          named[0] if len(named) == 1 else {})
            output = protected_dir / Path(record["output"]).name if "output" in record else None
            matches = [output] if record.get("status") == "ok" and output.is_file() else []
        else:
            matches = [p for p in protected_files if p.stem == clean_path.stem]
        if len(matches) > 1:  # say, a photo protected again with another --format
            raise UsageError(f"{matches[0]} and {matches[1]} both match {clean_path.name}; "
                             f"move all but one out of {protected_dir}")
        if matches:
            pairs.append((clean_path, matches[0]))
        else:
            print(f"not evaluated: {clean_path}: no protected photo in {protected_dir}"
                  + (f" (none in {manifest.path})" if manifest.records else ""),
                  file=sys.stderr)
    if not pairs:
        raise UsageError(f"no protected photo in {protected_dir} for a photo in "
                         f"{clean_dir} (matched " + ("by its manifest)" if manifest.records else
                                                     "by name without extension)"))
    return pairs


def evaluate_command(args) -> int:
    """r_ctx, edit similarity and perturbation quality of protected photos against clean ones."""
    from .methods.decontext import ProtectConfig, Protector, evaluate_protection

    pairs = _evaluation_pairs(Path(args.clean), Path(args.protected))
    if args.json:
        problem = _json_output_problem(Path(args.json), pairs, Path(args.protected))
        if problem:
            raise UsageError(f"--json {args.json}: {problem}")
    faces = None
    if args.face_model:
        from .faces import FaceEmbedder

        try:
            faces = FaceEmbedder(args.face_model, args.face_size)
        except (FileNotFoundError, ValueError, ImportError) as exc:  # no file, not a model
            raise UsageError(f"--face-model {exc}") from None
    from tqdm.auto import tqdm

    pipeline = _pipeline(args.model, args.device, kind="editor")
    pipeline.set_progress_bar_config(disable=True)  # one bar over the photos instead
    try:
        protector = Protector(pipeline, ProtectConfig(**_model_settings(args)))
    except UnknownBlocks as exc:
        raise UsageError(_blocks_named_by_option(exc, args)) from None
    prompt = args.prompt or ("make the red circle blue" if args.model == "testbed"
                             else "A photo of this person")
    rows, skipped = [], 0
    try:
        for clean_path, protected_path in tqdm(pairs, desc="photos", unit="photo", leave=False):
            pixels = _load_pair(clean_path, protected_path, args.max_pixels)
            if pixels is None:
                skipped += 1
                continue
            rows.append(dict(photo=clean_path.name, **evaluate_protection(
                protector, *pixels, prompt, args.edit_steps, faces)))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the {len(rows)} photos evaluated so far", file=sys.stderr)
        _evaluation_report(rows, faces is not None, args.json)
        return 130
    status = _evaluation_report(rows, faces is not None, args.json)
    return status or (1 if skipped or not rows else 0)


def _load_pair(clean_path: Path, protected_path: Path, max_pixels: int
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """The clean and the protected photo's pixels, or None after saying why the pair is
    skipped (unreadable, or of different sizes)."""
    from .io import ImageError, load_photo

    try:
        clean = load_photo(clean_path, max_pixels)
        protected = load_photo(protected_path, max_pixels)
    except ImageError as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return None
    if clean.pixels.shape != protected.pixels.shape:
        sizes = [f"{p.pixels.shape[1]}x{p.pixels.shape[0]}" for p in (clean, protected)]
        print(f"skipped: {clean_path} is {sizes[0]}, {protected_path} {sizes[1]} (a protected "
              "photo keeps its original's size: not its protection?)", file=sys.stderr)
        return None
    return clean.pixels, protected.pixels


def _json_output_problem(path: Path, pairs: list[tuple[Path, Path]], protected_dir: Path) -> str:
    """Why evaluate cannot write its rows to ``path`` ("" if it can): a folder, an unwritable
    place, or a file it reads (a photo, the manifest)."""
    problem = _file_place_problem(path)
    if problem:
        return problem
    read = {p.resolve() for pair in pairs for p in pair} | {
        (protected_dir / "manifest.jsonl").resolve()}
    if path.resolve() in read:
        return "would overwrite a file evaluate reads; choose another file"
    return ""


def _file_place_problem(path: Path) -> str:
    """Why no file can be written at ``path`` ("" if one can): a folder is there, or the folder
    it goes into is missing or not writable."""
    if path.is_dir():
        return "is a folder; name a file in it"
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write into {folder} (create it, or choose another place)"
    return ""


def _evaluation_report(rows: list[dict], with_faces: bool, json_path: str | None) -> int:
    """Print the rows and write them to ``json_path``; 1 if that write fails, else 0."""
    from .io import to_json, write_file

    face_header = f" {'ID clean':>9} {'ID prot.':>9}" if with_faces else ""
    print(f"{'photo':<24} {'r_ctx clean':>11} {'protected':>10} {'edit PSNR':>10} "
          f"{'edit SSIM':>10} {'pert. PSNR':>11} {'pert. SSIM':>11} {'L-inf':>6}{face_header}")
    for r in rows:
        face = (f" {r['face_sim_clean_edit']:>9.3f} {r['face_sim_protected_edit']:>9.3f}"
                if with_faces else "")
        print(f"{r['photo']:<24} {r['r_ctx_clean']:>11.4f} {r['r_ctx_protected']:>10.4f} "
              f"{r['edit_psnr']:>10.2f} {r['edit_ssim']:>10.4f} {r['perturbation_psnr']:>11.2f} "
              f"{r['perturbation_ssim']:>11.4f} {r['linf']:>6}{face}")
    if json_path:
        try:
            write_file(Path(json_path), to_json(rows, indent=1).encode())
        except OSError as error:
            print(f"error: cannot write {json_path}: {error.strerror or error}", file=sys.stderr)
            return 1
    return 0


def _start_demo_over(scenes_dir: Path, protected_dir: Path) -> None:
    """Remove what an earlier demo wrote in its folders, and only that: its scenes, and the
    manifest and protected photos of its scenes and of the sample photos. Another run's
    protected photos in ``protected_dir`` are a UsageError, not deleted."""
    from .io import Manifest

    earlier = Manifest(protected_dir / "manifest.jsonl")
    ours = (scenes_dir.resolve(), SAMPLES)  # the scenes (even if removed since) and samples
    others = sorted(p for p in earlier.records if Path(p).parent not in ours)
    if others:
        raise UsageError(f"{protected_dir} holds photos protected by another run (of "
                         f"{others[0]}{' and others' if len(others) > 1 else ''}); choose "
                         "another -o for the demo")
    for name in earlier.output_names():
        (protected_dir / name).unlink(missing_ok=True)
    earlier.path.unlink(missing_ok=True)
    for scene in scenes_dir.glob("scene*.png"):
        scene.unlink()


def demo_command(args) -> int:
    """Protect held-out testbed scenes and the sample photos, then edit the clean and the
    protected scenes."""
    from PIL import Image

    from .io import Manifest
    from .testbed.evaluate import edit, figure_grid, held_out_edits, untouched
    from .testbed.scenes import object_agreement, render

    outdir = Path(args.output)
    scenes_dir, protected_dir = outdir / "scenes", outdir / "protected"
    for folder in (outdir, scenes_dir, protected_dir):
        problem = _output_folder_problem(folder, [])
        if problem:
            raise UsageError(problem)
    figure = outdir / "figure.png"
    if figure.is_dir():
        raise UsageError(f"{figure} is a folder: the demo writes its figure there; move it or "
                         "choose another -o")
    _start_demo_over(scenes_dir, protected_dir)
    scenes_dir.mkdir(parents=True, exist_ok=True)
    edits = held_out_edits(args.scenes)
    scenes = [scenes_dir / f"scene{i}.png" for i in range(len(edits))]
    for path, e in zip(scenes, edits, strict=True):
        Image.fromarray(render(e.context)).save(path)
    photos = sorted(SAMPLES.glob("*.png"))
    # protect's options the demo has not: the testbed editor, lossless, a fresh start
    status = protect_command(argparse.Namespace(**{
        **vars(args), "inputs": [str(p) for p in scenes + photos], "output": str(protected_dir),
        "model": "testbed", "format": "png", "resume": False, "quiet": False,
        "max_pixels": DEFAULT_MAX_PIXELS}))
    if status:
        return status
    records = Manifest(protected_dir / "manifest.jsonl").records
    resolution = args.resolution or BUILTIN["testbed"].resolution
    print(f"\nsample photos (optimised at the testbed editor's {resolution} px, the perturbation "
          "mapped back to each photo's size)")
    print(f"{'photo':<16} {'size':>9} {'r_ctx before':>12} {'after':>7}")
    for path in photos:
        record = records[str(path.resolve())]
        with Image.open(path) as image:
            w, h = image.size
        print(f"{path.name:<16} {f'{w}x{h}':>9} {record['r_ctx_before']:>12.3f} "
              f"{record['r_ctx_after']:>7.3f}")
    pipeline = _pipeline("testbed", args.device)
    pipeline.set_progress_bar_config(disable=True)
    print(f"\n{'scene':<8} {'instruction':<42} {'r_ctx':>6} {'->':>2} {'r_ctx':<6} "
          f"{'context kept in edit: clean -> protected':>42}")
    rows = []
    for i, (path, e) in enumerate(zip(scenes, edits, strict=True)):
        clean = render(e.context)
        protected = np.asarray(Image.open(protected_dir / path.name).convert("RGB"))
        edited = [edit(pipeline, image, e.instruction) for image in (clean, protected)]
        kept = [object_agreement(out, untouched(e))["color"] for out in edited]
        record = records[str(path.resolve())]
        print(f"scene{i:<3} {e.instruction:<42} {record['r_ctx_before']:>6.3f} -> "
              f"{record['r_ctx_after']:<6.3f} {kept[0]:>33.2f} -> {kept[1]:.2f}")
        rows.append(np.concatenate([clean, protected, *edited], axis=1))
    Image.fromarray(figure_grid(rows)).save(figure)
    print(f"\nfigure (context | protected | edit of context | edit of protected): {figure}")
    return 0


REGION_COLORS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                          (145, 30, 180), (70, 240, 240)], dtype=np.uint8)


def _output_file_problem(path: Path) -> str:
    """Why an image cannot be written to ``path`` ("" if it can)."""
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        return f"-o {path}: name a .png or .jpg file"
    problem = _file_place_problem(path)
    return f"-o {path}: {problem}" if problem else ""


def regions_path(output: Path) -> Path:
    """Where ``generate`` and ``edit`` write the map of their regions next to ``output``."""
    return output.with_name(f"{output.stem}-regions.png")


def _save_results(output: Path, image: np.ndarray, regions: torch.Tensor | None = None,
                  phrases: list[str] = (), what: str = "") -> int:
    """Write the image (float [H, W, 3] in [0, 1]), then, given regions (bool [n, rows,
    columns] on the token grid), their map at the image's size, each region in its own colour,
    and print the regions' sizes; without regions, remove a map an earlier run left beside
    ``output``, which would pass for this image's. A write that fails is a one-line error (exit
    status 1)."""
    from PIL import Image

    from .io import save_photo, to_uint8

    files = [(output, to_uint8(image))]
    if regions is not None:
        overlay = np.full((*regions.shape[1:], 3), 255, dtype=np.uint8)
        for color, region in zip(REGION_COLORS, regions.cpu().numpy(), strict=False):
            overlay[region] = color
        files.append((regions_path(output), np.asarray(Image.fromarray(overlay).resize(
            image.shape[1::-1], Image.Resampling.NEAREST))))
    for path, pixels in files:
        try:
            save_photo(path, pixels)
        except OSError as error:
            print(f"error: cannot write {path}: {error.strerror or error}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    if regions is None:
        stale_map = regions_path(output)
        if stale_map.is_file():
            stale_map.unlink(missing_ok=True)
            print(f"removed {stale_map}: an earlier run's (this run made no region map)")
        return 0
    sizes = ", ".join(f"{p!r} {int(r.sum())}" for p, r in zip(phrases, regions, strict=True))
    print(f"{what} regions (image tokens): {sizes}")
    return 0


def _run_uvr(args, output: Path, run) -> int:
    """Generation or edit with UVR: anchors from ``args.uvr`` (their block unless
    ``--uvr-block``), ``run(anchors, metadata, config) -> (images, mask)``; writes the image
    and the flagged-token map."""
    from .methods.uvr import UVRConfig, load_anchors

    try:
        anchors, metadata = load_anchors(args.uvr)
        block = args.uvr_block or metadata.get("block", UVRConfig.block)
        threshold = UVRConfig.threshold if args.uvr_threshold is None else args.uvr_threshold
        images, mask = run(anchors, metadata, UVRConfig(block=block, threshold=threshold))
    except UnknownBlocks as error:
        raise UsageError(error.named("--uvr-block") if args.uvr_block else error.named(
            f"the block of --uvr {args.uvr}'s anchors") + "; collect anchors with this model "
            "or pass --uvr-block") from None
    except ValueError as error:  # not an anchors file; anchors of another mode, model
        raise UsageError(str(error)) from None
    if mask is None:
        print("UVR flagged nothing: the output is the model's own", file=sys.stderr)
        return _save_results(output, images[0])
    return _save_results(output, images[0], mask[None], [metadata.get("concept", "concept")],
                         "flagged")


def generate_command(args) -> int:
    from .methods.deleaker import DeLeakerConfig, generate

    settings = _settings(args, presets.defaults(
        args.model, "generate-uvr" if args.uvr is not None else "generate"), resolution="size")
    size, text_tokens = settings["resolution"], settings["text_tokens"]
    _note_small_model(args.model, "pass --model with a local FLUX.1 folder for real images")
    pipeline = _pipeline(args.model, args.device, kind="t2i")
    call = _sampling(settings, args.seed)
    output = Path(args.output)
    if args.uvr is not None:
        from .methods.uvr import generate as uvr_generate

        return _run_uvr(args, output, lambda anchors, metadata, config: uvr_generate(
            pipeline, args.prompt, anchors, height=size, width=size, config=config,
            anchor_metadata=metadata, max_sequence_length=text_tokens, **call))
    if args.entity:
        if len(args.entity) == 1:
            print("warning: one --entity: DeLeaker separates pairs of entities, so it makes no "
                  "edits (the image is the plain generation's; its region is mapped)",
                  file=sys.stderr)
        config = DeLeakerConfig(alpha=args.alpha, mask_threshold=args.mask_threshold,
                                pair_threshold=args.pair_threshold, mask_steps=args.mask_steps,
                                record_from=args.record_from, start_block=args.start_block)
        try:
            images, regions = generate(pipeline, args.prompt, args.entity, height=size,
                                       width=size, config=config,
                                       max_sequence_length=text_tokens, **call)
        except ValueError as error:  # entities not in the prompt, sizes off the latent grid
            raise UsageError(str(error)) from None
        if regions is None:
            print(f"warning: the generation ended before block call {config.start_block}: "
                  "DeLeaker made no edits (more --steps or a lower --start-block)",
                  file=sys.stderr)
            return _save_results(output, images[0])
        empty = [repr(e) for e, region in zip(args.entity, regions, strict=True)
                 if not region.any()]
        if empty:
            print(f"warning: DeLeaker found no image region for {', '.join(empty)}: no "
                  "edits touch it (the attention on its words stayed under --mask-threshold)",
                  file=sys.stderr)
        return _save_results(output, images[0], regions, args.entity, "entity")
    print("no --entity given: plain generation, without DeLeaker", file=sys.stderr)
    images = pipeline(prompt=args.prompt, height=size, width=size,
                      max_sequence_length=text_tokens, **call).images
    return _save_results(output, images[0])


def _load_mask(path: str) -> np.ndarray:
    """A mask image: bool [H, W], True where its grey level is above half."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .io import ImageError

    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("L")) > 127
    except (OSError, UnidentifiedImageError) as error:
        raise ImageError(f"{path}: cannot read the mask ({error})") from None


def edit_command(args) -> int:
    from .io import ImageError, load_photo, resize_pixels, to_pil
    from .methods.ale import ALEConfig, edit
    from .models import edit_calls_for

    settings = _settings(args, presets.defaults(args.model, "edit"))
    _note_small_model(args.model, "pass --model with a local FLUX.1 Kontext folder for real "
                      "photos")
    try:
        photo = load_photo(args.image)
        masks = [_load_mask(path) for _, path in args.object]
    except ImageError as error:
        raise UsageError(str(error)) from None
    pipeline = _pipeline(args.model, args.device, kind="kontext")
    call = _sampling(settings, args.seed)
    output = Path(args.output)
    if args.uvr is not None:
        from .methods.uvr import edit as uvr_edit

        return _run_uvr(args, output, lambda anchors, metadata, config: uvr_edit(
            pipeline, photo.pixels, args.prompt, anchors, resolution=settings["resolution"],
            config=config, anchor_metadata=metadata,
            max_sequence_length=settings["text_tokens"], **call))
    if args.object:
        phrases = [phrase for phrase, _ in args.object]
        config = ALEConfig(dilation=args.dilation, restrict_embeddings=not args.no_ore,
                           mask_attention=not args.no_rgb_cam,
                           blend_background=not args.no_blending)
        try:
            images, regions = edit(pipeline, photo.pixels, args.prompt, phrases, masks,
                                   resolution=settings["resolution"], config=config,
                                   max_sequence_length=settings["text_tokens"], **call)
        except ValueError as error:  # phrases not in the prompt, masks of the wrong size
            raise UsageError(str(error)) from None
        return _save_results(output, images[0], regions, phrases, "object")
    print("no --object given: plain edit, without ALE", file=sys.stderr)
    # at the working size, as ALE and UVR edit (Kontext would encode the photo at its own size)
    calls = edit_calls_for(pipeline)
    size = calls.working_size(*photo.pixels.shape[:2], settings["resolution"])
    images = calls.edit(to_pil(resize_pixels(photo.tensor(), size)), args.prompt, size,
                        settings["steps"], settings["guidance"], settings["text_tokens"],
                        call["generator"], output_type="np")
    return _save_results(output, images[0])


def _builtin_help(key: str, generating: bool = False) -> str:
    """The built-in models' defaults of a setting: ``testbed 32, tiny 32, ...``."""
    return ", ".join(f"{name} {getattr(preset, key)}" for name, preset in BUILTIN.items()
                     if preset.generates or not generating)


def _default_help(key: str, command: str, uvr: bool = False) -> str:
    """A generate or edit option's defaults: ``default 512, with --uvr 1024; testbed 32, ...``."""
    with_uvr = f", with --uvr {presets.REAL['generate-uvr'][key]}" if uvr else ""
    return (f"default {presets.REAL[command][key]}{with_uvr}; "
            f"{_builtin_help(key, generating=True)}")


# Model folders' defaults as decontext.FAMILY_DEFAULTS sets them.
RESOLUTION_HELP = ("working resolution (default by model: FLUX.1 Kontext and Step1X-Edit 512, "
                   f"Qwen-Image-Edit 1024; {_builtin_help('resolution')})")
TEXT_TOKENS_HELP = ("FLUX's T5 tokens of the instruction (default by model: FLUX.1 Kontext "
                    f"{presets.REAL['protect']['text_tokens']}, "
                    f"{_builtin_help('text_tokens', generating=True)}; "
                    "Qwen-Image-Edit and Step1X-Edit ignore it)")


def _protect_options(p: argparse.ArgumentParser, steps_default: int | None = None,
                     output_default: str | None = None, model: str | None = None) -> None:
    """protect's options; ``model``: the one model a command runs (the demo's), whose defaults
    the help gives."""
    preset = BUILTIN.get(model)
    p.add_argument("-o", "--output", required=output_default is None, default=output_default,
                   help="output folder")
    p.add_argument("--method", default="decontext", choices=["decontext", "diff-pgd"])
    p.add_argument("--epsilon", type=_number(float, low=1, high=255), default=12.75,
                   help="L-inf budget, 0..255 units (at least 1: outputs are 8-bit)")
    p.add_argument("--step-size", type=_number(float, above=0, high=255), default=0.6375,
                   help="PGD step, 0..255 units")
    p.add_argument("--steps", type=COUNT, default=steps_default,
                   help=f"PGD steps (default {steps_default})" if steps_default else
                   "PGD steps (default: the authors', 800 for decontext, 600 for diff-pgd)")
    p.add_argument("--resolution", type=SIDE, default=None,
                   help=f"working resolution (default {preset.resolution})" if preset
                   else RESOLUTION_HELP)
    blocks_default = (",".join(preset.blocks) if preset else
                      "FLUX.1 Kontext and Step1X-Edit single.0..single.25, Qwen-Image-Edit "
                      "double.20..double.46; " + "; ".join(
                          f"{name} {','.join(b.blocks)}" for name, b in BUILTIN.items()))
    p.add_argument("--blocks", type=_block_names, default=None,
                   help=f"attacked blocks, e.g. single.0,single.1 (default: {blocks_default})")
    p.add_argument("--batch-size", type=COUNT, default=1)
    p.add_argument("--workers", type=COUNT, default=1,
                   help="protect on this many devices at once with Ray (one GPU each with "
                        "--device cuda, else one CPU core each; pip install -e '.[scale]')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-tokens", type=COUNT, default=None,
                   help=f"T5 tokens of the instruction (default {preset.text_tokens})" if preset
                   else TEXT_TOKENS_HELP)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer's blocks (torch.compile, Inductor; a GPU): "
                        "the first steps compile for a minute or two, later ones run faster "
                        "where the GPU is busy (large photos, batches)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each PGD step from a CUDA graph (DeContext on FLUX.1 Kontext "
                        "or Step1X-Edit, a GPU): the host stops bounding small steps (512²); "
                        "holds a second copy of the step's memory")
    p.add_argument("--eot-jpeg", type=_number(int, low=1, high=100), nargs=2,
                   metavar=("LOW", "HIGH"),
                   help="JPEG quality range for expectation over transformations")
    p.add_argument("--eot-resize", type=_number(float, above=0), nargs=2,
                   metavar=("LOW", "HIGH"),
                   help="resize scale range for expectation over transformations")
    p.add_argument("--stop-window", type=COUNT, default=None,
                   help="convergence stop: check r_ctx every N steps (off by default)")
    p.add_argument("--stop-min-gain", type=_number(float, low=0), default=0.002,
                   help="convergence stop: least r_ctx drop per window to go on")
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)


def _uvr_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uvr", default=None, metavar="ANCHORS",
                   help="restrict an unsafe concept's flow (UVR) with these anchors "
                        "(.safetensors from ditflow.methods.uvr.save_anchors)")
    p.add_argument("--uvr-threshold", type=FINITE, default=None,
                   help="UVR: flag tokens scoring above this (1 = as close as the anchors; "
                        "default 0.6, UVRConfig's)")
    p.add_argument("--uvr-block", type=_block_name, default=None,
                   help="UVR: the localisation block (default: the anchors' own; anchors that "
                        "record their block run only there)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ditflow`` command line and its subcommands' parsers, one per job."""
    from .methods.deleaker import DeLeakerConfig

    parser = argparse.ArgumentParser(  # the docstring's first paragraph, without its markup
        prog="ditflow", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="protect photos against in-context editing (DeContext)")
    p.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default), 'tiny', 'tiny-qwen', 'tiny-step1x' or a local "
                        "FLUX.1 Kontext, Qwen-Image-Edit or Step1X-Edit folder")
    _protect_options(p)
    p.add_argument("--format", default="png", choices=["png", "jpg"])
    p.add_argument("--resume", action="store_true", help="skip photos already protected")
    p.add_argument("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb guard: refuse larger images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=protect_command)

    p = sub.add_parser("evaluate", help="compare protected photos with the clean ones")
    p.add_argument("clean", help="folder of clean photos")
    p.add_argument("protected", help="folder of protected photos (paired through its "
                                     "manifest, or by file name without extension)")
    p.add_argument("--model", default="testbed", help="as for protect")
    p.add_argument("--prompt", default=None,
                   help="the edit (default: a testbed edit for --model testbed, else "
                        "the paper's 'A photo of this person', which is not among the "
                        "instructions protect optimises on)")
    p.add_argument("--edit-steps", type=COUNT, default=20, help="the edits' steps (default 20)")
    p.add_argument("--resolution", type=SIDE, default=None, help=RESOLUTION_HELP)
    p.add_argument("--blocks", type=_block_names, default=None,
                   help="blocks r_ctx is measured on (as for protect)")
    p.add_argument("--text-tokens", type=COUNT, default=None, help=TEXT_TOKENS_HELP)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb guard: refuse larger images")
    p.add_argument("--face-model", default=None,
                   help="local face-recognition model (.onnx, or a torch.export .pt2; ArcFace "
                        "input convention) for identity similarity; never downloaded")
    p.add_argument("--face-size", type=SIDE, default=112, help="the face model's input side")
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.set_defaults(run=evaluate_command)

    # the demo runs the bundled testbed editor: no --model
    p = sub.add_parser("demo", help="protect testbed scenes and edit them, offline")
    _protect_options(p, steps_default=200, output_default="demo-output", model="testbed")
    p.add_argument("--scenes", type=COUNT, default=4,
                   help="held-out testbed scenes to protect and edit (default 4)")
    p.set_defaults(run=demo_command)

    p = sub.add_parser("generate", help="text-to-image with DeLeaker (semantic-leakage "
                       "mitigation) or UVR (unsafe-concept restriction)")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, help="image file (.png or .jpg)")
    p.add_argument("--entity", action="append", default=[],
                   help="an entity phrase of the prompt, e.g. --entity 'a cow' --entity "
                        "'a horse' (1-6; none: plain generation)")
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default), 'tiny' or a local FLUX.1 folder")
    p.add_argument("--size", type=SIDE, default=None, help="image side, a multiple of 16 "
                   f"({_default_help('resolution', 'generate', uvr=True)})")
    p.add_argument("--steps", type=COUNT, default=None,
                   help=_default_help("steps", "generate", uvr=True))
    p.add_argument("--guidance", type=FINITE, default=None,
                   help=_default_help("guidance", "generate"))
    p.add_argument("--text-tokens", type=T5_TOKENS, default=None,
                   help=f"T5 tokens ({_default_help('text_tokens', 'generate', uvr=True)})")
    p.add_argument("--seed", type=int, default=0)
    defaults = DeLeakerConfig()
    p.add_argument("--alpha", type=_number(float, above=0), default=defaults.alpha,
                   help="logit factor, image tokens of an entity on its own text")
    p.add_argument("--mask-threshold", type=FINITE, default=defaults.mask_threshold,
                   help="entity regions: mean + T * std of the entity's attention")
    p.add_argument("--pair-threshold", type=FINITE, default=defaults.pair_threshold,
                   help="image-image cuts: mean + T * std over the pair region")
    p.add_argument("--mask-steps", type=COUNT, default=defaults.mask_steps,
                   help="denoising steps whose attention makes the entity regions")
    p.add_argument("--record-from", type=_number(int, low=0), default=defaults.record_from,
                   help="block call (counted over the generation) from which that attention "
                        "is recorded")
    p.add_argument("--start-block", type=_number(int, low=0), default=defaults.start_block,
                   help="block call (counted over the generation) from which edits apply")
    _uvr_options(p)
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.set_defaults(run=generate_command)

    p = sub.add_parser("edit", help="in-context edit of several objects at once with ALE "
                       "(attribute-leakage-free editing), or with UVR")
    p.add_argument("image", help="the source photo")
    p.add_argument("prompt", help="the instruction, e.g. 'make the car blue and the bike red'")
    p.add_argument("-o", "--output", required=True, help="image file (.png or .jpg)")
    p.add_argument("--object", nargs=2, action="append", default=[], metavar=("PHRASE", "MASK"),
                   help="an edited object: its phrase in the prompt ('the car blue') and a "
                        "mask image of the photo's size (white = object); repeat per object "
                        "(1-4; none: plain edit)")
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default), 'tiny' or a local FLUX.1 Kontext folder")
    p.add_argument("--resolution", type=SIDE, default=None,
                   help=f"working resolution ({_default_help('resolution', 'edit')})")
    p.add_argument("--steps", type=COUNT, default=None, help=_default_help("steps", "edit"))
    p.add_argument("--guidance", type=FINITE, default=None,
                   help=_default_help("guidance", "edit"))
    p.add_argument("--text-tokens", type=T5_TOKENS, default=None,
                   help=f"FLUX's T5 tokens ({_default_help('text_tokens', 'edit')})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dilation", type=_number(float, low=0, below=1), default=0.04,
                   help="region dilation, a fraction of the image's longer side")
    p.add_argument("--no-ore", action="store_true",
                   help="ablation: the phrases keep their in-prompt embeddings")
    p.add_argument("--no-rgb-cam", action="store_true",
                   help="ablation: no region-restricted attention to the phrases")
    p.add_argument("--no-blending", action="store_true",
                   help="ablation: the background is generated, not kept")
    _uvr_options(p)
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.set_defaults(run=edit_command)
    return parser, sub.choices


def _check_args(args) -> str:
    """What the options say together that no single option's check sees ("" if nothing)."""
    for name in ("eot_jpeg", "eot_resize"):
        low_high = getattr(args, name, None)
        if low_high and low_high[0] > low_high[1]:
            return (f"--{name.replace('_', '-')} {low_high[0]} {low_high[1]}: LOW must not "
                    "exceed HIGH")
    if getattr(args, "cuda_graph", False):
        clash = [option for option, given in (
            ("--method diff-pgd", args.method == "diff-pgd"), ("--eot-jpeg", args.eot_jpeg),
            ("--eot-resize", args.eot_resize)) if given]
        if clash:
            return f"--cuda-graph replays DeContext steps as they are: not with {clash[0]}"
        if torch.device(args.device).type != "cuda":
            return f"--cuda-graph needs a GPU (--device cuda), not --device {args.device}"
    if args.command not in ("generate", "edit"):
        return ""
    if not getattr(BUILTIN.get(args.model), "generates", True):
        return f"--model {args.model} serves protect and evaluate; {args.command} drives FLUX.1 " \
               "pipelines"
    if getattr(args, "size", None) and args.size % 16:
        return (f"--size {args.size}: FLUX.1 makes images of multiples of 16 px (try "
                f"{args.size - args.size % 16})")
    option, given = (("--entity", args.entity) if args.command == "generate"
                     else ("--object", args.object))
    if args.uvr is None:
        uvr_only = [name for name, value in (("--uvr-threshold", args.uvr_threshold),
                                             ("--uvr-block", args.uvr_block)) if value is not None]
        if uvr_only:
            return f"{' and '.join(uvr_only)} set UVR, which runs with --uvr ANCHORS only"
    else:
        if given:
            return f"--uvr and {option} are separate methods; give one"
        if not Path(args.uvr).is_file():
            folder = args.uvr and Path(args.uvr).is_dir()  # ('' is no file, not '.')
            return (f"--uvr {args.uvr}: " + ("a folder" if folder else "no such file") +
                    " (anchors are a file saved with ditflow.methods.uvr.save_anchors)")
    from .methods.ale import MAX_OBJECTS
    from .methods.deleaker import MAX_ENTITIES

    most = MAX_ENTITIES if args.command == "generate" else MAX_OBJECTS
    if len(given) > most:
        return f"{option}: at most {most}, got {len(given)}"
    return _output_clash(args)


def _output_clash(args) -> str:
    """Why ``generate`` or ``edit`` cannot write ``-o`` and its region map ("" if they can):
    either would replace an input (the photo, a mask, the anchors) or is a folder."""
    output = Path(args.output)
    problem = _output_file_problem(output)
    if problem:
        return problem
    inputs = {"the source photo": getattr(args, "image", None), "--uvr": args.uvr,
              **{f"the mask of {phrase!r}": mask for phrase, mask in
                 getattr(args, "object", None) or []}}
    for output_name, path in (("-o", output), ("the region map", regions_path(output))):
        for input_name, source in inputs.items():
            if source and path.resolve() == Path(source).resolve():
                return f"{output_name} {path} would overwrite {input_name}"
    if regions_path(output).is_dir():  # -o itself: _output_file_problem
        return f"the region map {regions_path(output)} is a folder"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name, module in DIFFUSERS_EXTRA.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        print(f"error: ditflow {args.command} needs the diffusers extra ({', '.join(missing)} "
              'missing): pip install -e ".[diffusers]" in the ditflow checkout', file=sys.stderr)
        return 2
    problem = _check_args(args)
    if problem:
        commands[args.command].error(problem)  # with the subcommand's usage line
    try:
        return args.run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # protect and evaluate say what they kept; the others keep nothing
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
