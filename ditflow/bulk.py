"""Bulk photo protection: files in, protected files and a manifest out, resumable.

Photos stream through in batches of one working size (memory stays bounded however many photos
there are); each finished photo is written atomically and recorded in ``manifest.jsonl`` at once,
so an interrupted run loses nothing finished and ``resume=True`` picks up where it stopped.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .io import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    Manifest,
    Photo,
    load_photo,
    psnr,
    quantize_within_budget,
    save_photo,
    ssim,
)
from .methods.decontext import ProtectConfig, Protector


@dataclass
class Job:
    source: Path
    output: Path
    error: str = ""


def gather(inputs: Iterable[str], outdir: Path, suffix: str = ".png") -> list[Job]:
    """Files, folders (their files, not recursive) and glob patterns -> jobs with output paths
    ``outdir/<name><suffix>``. Missing inputs and clashing output names become failed jobs."""
    jobs: list[Job] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            sources = sorted(p for p in path.iterdir() if p.is_file()
                             and not p.name.startswith("."))
        elif path.is_file():
            sources = [path]
        else:
            sources = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not sources:
                jobs.append(Job(path, outdir / (path.stem + suffix),
                                f"{item}: no such file, folder or matching files"))
                continue
        jobs.extend(Job(s, outdir / (s.stem + suffix)) for s in sources)
    owners: dict[Path, Path] = {}
    for job in jobs:
        if job.error:
            continue
        other = owners.setdefault(job.output, job.source)
        if other != job.source:
            job.error = (f"{job.source}: its output {job.output.name} would overwrite the one of "
                         f"{other}; protect them into different folders")
    return jobs


def _record(job: Job, config: ProtectConfig, **fields) -> dict:
    return {"input": str(job.source), "output": str(job.output), "seed": config.seed,
            "config": {k: v for k, v in asdict(config).items() if k != "prompts"}, **fields}


def run(jobs: list[Job], pipeline, config: ProtectConfig, manifest: Manifest,
        resume: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True
        ) -> dict:
    """Protect every job; returns counts {"ok", "failed", "skipped"}."""
    from tqdm.auto import tqdm

    protector = Protector(pipeline, config)
    config = protector.config  # the model's defaults filled in: the manifest records them
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    pending: dict[tuple[int, int], list[tuple[Job, Photo]]] = {}
    images_bar = tqdm(total=len(jobs), desc="photos", unit="photo", disable=not progress)

    def fail(job: Job, message: str) -> None:
        manifest.append(_record(job, config, status="error", error=message))
        counts["failed"] += 1
        images_bar.update()

    def flush(size: tuple[int, int]) -> None:
        batch = pending.pop(size)
        steps_bar = tqdm(total=config.steps, desc=f"batch of {len(batch)} at {size[1]}x{size[0]}",
                         unit="step", leave=False, disable=not progress)
        try:
            start = time.perf_counter()
            results = protector.run([str(job.source) for job, _ in batch],
                                    [photo.tensor() for _, photo in batch],
                                    on_step=lambda _: steps_bar.update())
        finally:
            steps_bar.close()
        for (job, photo), result in zip(batch, results, strict=True):
            pixels = quantize_within_budget(photo.pixels, result.image, config.epsilon)
            save_photo(job.output, pixels, photo.alpha, photo.icc)
            diff = int(abs(pixels.astype(int) - photo.pixels.astype(int)).max())
            manifest.append(_record(
                job, config, status="ok", r_ctx_before=result.r_ctx_before,
                r_ctx_after=result.r_ctx_after, linf=diff, psnr=psnr(photo.pixels, pixels),
                ssim=ssim(photo.pixels, pixels), steps=result.steps,
                working_size=list(result.working_size),
                seconds=(time.perf_counter() - start) / len(batch), note=photo.note))
            counts["ok"] += 1
            images_bar.update()

    try:
        for job in jobs:
            if job.error:
                fail(job, job.error)
                continue
            if resume and manifest.finished(job.source, job.output):
                counts["skipped"] += 1
                images_bar.update()
                continue
            try:
                photo = load_photo(job.source, max_pixels)
            except ImageError as exc:
                fail(job, str(exc))
                continue
            size = protector.working_size(*photo.pixels.shape[:2])
            pending.setdefault(size, []).append((job, photo))
            if len(pending[size]) == config.batch_size:
                flush(size)
        for size in list(pending):
            flush(size)
    finally:
        images_bar.close()
    return counts
