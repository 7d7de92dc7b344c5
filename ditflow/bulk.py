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

import torch

from .io import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    Manifest,
    Photo,
    decode_pixels,
    encode_photo,
    folder_files,
    is_jpeg,
    linf,
    load_photo,
    pixels_tensor,
    psnr,
    quantize_within_budget,
    ssim,
    write_file,
)
from .methods.decontext import ProtectConfig, Protector


@dataclass
class Job:
    """A photo file to protect into ``output``; ``error``: why it cannot be ("" if it can)."""

    source: Path
    output: Path
    error: str = ""


def gather(inputs: Iterable[str], outdir: Path, suffix: str = ".png",
           manifest: Manifest | None = None) -> list[Job]:
    """Files, folders (:func:`~ditflow.io.folder_files`: not recursive, no hidden files) and
    glob patterns (``**`` recursive) -> jobs with output paths ``outdir/<name><suffix>``.
    Missing inputs and outputs that would replace a file become failed jobs: another input's
    output, an input photo, or any file in ``outdir`` that ``manifest`` does not record as this
    photo's protection."""
    jobs: list[Job] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            sources = folder_files(path)
            if not sources:
                jobs.append(Job(path, outdir / (path.name + suffix),
                                f"{item}: no photos in this folder"))
        elif path.is_file():
            sources = [path]
        else:
            sources = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not sources:
                jobs.append(Job(path, outdir / (path.stem + suffix),
                                f"{item}: no such file, folder or matching files"))
                continue
        jobs.extend(Job(s, outdir / (s.stem + suffix)) for s in sources)
    jobs = _one_job_per_photo(jobs)
    inputs_here = {job.source.resolve() for job in jobs if not job.error}
    owners: dict[Path, Path] = {}
    for job in jobs:
        if job.error:
            continue
        if job.output.resolve() in inputs_here:  # this photo's or another input's file
            job.error = (f"{job.source}: its output {job.output} is an input photo and would "
                         "be overwritten; choose another output folder")
            continue
        recorded = manifest.protected_from(job.output) if manifest else None
        if recorded and recorded != job.source.resolve():
            job.error = (f"{job.source}: its output {job.output} is the protected photo of "
                         f"{recorded} ({manifest.path}); protect them into different folders")
        elif not recorded and job.output.exists():
            job.error = (f"{job.source}: {job.output} exists and is no protected photo this "
                         "folder's manifest records; ditflow never replaces a file it did not "
                         "write: move it or choose another output folder")
        elif (other := owners.setdefault(job.output, job.source)) != job.source:
            job.error = (f"{job.source}: its output {job.output.name} would overwrite the one of "
                         f"{other}; protect them into different folders")
    return jobs


def _one_job_per_photo(jobs: list[Job]) -> list[Job]:
    """A photo named twice (a file and its folder, a link and its target) is protected once,
    under its own name where one of the spellings has it (not a link's)."""
    chosen: dict[Path, Job] = {}
    unique: list[Job] = []
    for job in jobs:
        if job.error:
            unique.append(job)
            continue
        target = job.source.resolve()
        kept = chosen.get(target)
        if kept is None:
            chosen[target] = job
            unique.append(job)
        elif kept.source.name != target.name and job.source.name == target.name:
            unique[unique.index(kept)] = chosen[target] = job
    return unique


def _paths(job: Job) -> dict:
    """A manifest record's input (by its absolute path, so a resume finds it however the path
    is written) and output."""
    return {"input": str(job.source.resolve()), "output": str(job.output)}


def _record(job: Job, config: ProtectConfig, **fields) -> dict:
    return {**_paths(job), "seed": config.seed,
            "config": {k: v for k, v in asdict(config).items() if k != "prompts"}, **fields}


def failure_record(job: Job, config: ProtectConfig, message: str) -> dict:
    """The manifest record of a photo that could not be protected (``--resume`` retries it)."""
    return _record(job, config, status="error", error=message)


class BatchedProtection:
    """Protects photo files in batches of one working size: :meth:`add` loads a job's photo
    and queues it (a full batch is protected and its photos saved); :meth:`finish` protects the
    partial batches. Both return the manifest records of the photos they finished (or failed).
    At most ``PENDING_BATCHES`` batches' worth of photos wait (the fullest partial batch goes
    first), so photos of many working sizes do not pile up in memory. ``progress``: a bar over
    each batch's PGD steps."""

    PENDING_BATCHES = 4

    def __init__(self, pipeline, config: ProtectConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: bool = False):
        self.protector = Protector(pipeline, config)
        self.config = self.protector.config  # the model's defaults filled in, as recorded
        self.max_pixels = max_pixels
        self.progress = progress
        self._pending: dict[tuple[int, int], list[tuple[Job, Photo]]] = {}

    def add(self, job: Job) -> list[dict]:
        if job.error:
            return [self.failed(job, job.error)]
        try:
            photo = load_photo(job.source, self.max_pixels)
        except ImageError as exc:
            return [self.failed(job, str(exc))]
        size = self.protector.working_size(*photo.pixels.shape[:2])
        self._pending.setdefault(size, []).append((job, photo))
        if len(self._pending[size]) == self.config.batch_size:
            return self._flush(size)
        if sum(map(len, self._pending.values())) > self.PENDING_BATCHES * self.config.batch_size:
            return self._flush(max(self._pending, key=lambda s: len(self._pending[s])))
        return []

    def finish(self) -> list[dict]:
        return [record for size in list(self._pending) for record in self._flush(size)]

    def failed(self, job: Job, message: str) -> dict:
        return failure_record(job, self.config, message)

    def _flush(self, size: tuple[int, int]) -> list[dict]:
        batch = self._pending.pop(size)
        try:
            return self._protect(batch, size)
        except Exception as exc:  # a batch that fails (out of memory, ...) does not end the run
            message = f"protection failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, torch.OutOfMemoryError):
                message += " (try a smaller --batch-size, or --checkpointing)"
            return [self.failed(job, f"{job.source}: {message}") for job, _ in batch]

    def _protect(self, batch: list[tuple[Job, Photo]], size: tuple[int, int]) -> list[dict]:
        from tqdm.auto import tqdm

        steps_bar = tqdm(total=self.config.steps, desc=f"batch of {len(batch)} at "
                         f"{size[1]}x{size[0]}", unit="step", leave=False,
                         disable=not self.progress)
        try:
            start = time.perf_counter()
            # seeds from file names: results depend on the seed and the name, not on the path
            results = self.protector.run([job.source.name for job, _ in batch],
                                         [photo.tensor() for _, photo in batch],
                                         on_step=lambda _: steps_bar.update())
        finally:
            steps_bar.close()
        files = [encode_photo(quantize_within_budget(photo.pixels, result.image,
                                                     self.config.epsilon),
                              photo.alpha, photo.icc, jpeg=is_jpeg(job.output))
                 for (job, photo), result in zip(batch, results, strict=True)]
        # measured on the files as saved (a JPEG's pixels are not the ones encoded), and
        # r_ctx after as the editor will see them
        saved = [decode_pixels(data) for data in files]
        after = self.protector.evaluate_r_ctx(self.protector.at_working_size(
            [pixels_tensor(pixels) for pixels in saved]))
        seconds = (time.perf_counter() - start) / len(batch)
        records = []
        for (job, photo), result, data, pixels, r_ctx in zip(batch, results, files, saved, after,
                                                            strict=True):
            try:
                write_file(job.output, data)
            except OSError as exc:
                records.append(self.failed(job, f"{job.source}: cannot write {job.output}: "
                                                f"{exc.strerror or exc}"))
                continue
            records.append(_record(
                job, self.config, status="ok", r_ctx_before=result.r_ctx_before,
                r_ctx_after=r_ctx, linf=linf(photo.pixels, pixels), psnr=psnr(photo.pixels, pixels),
                ssim=ssim(photo.pixels, pixels), steps=result.steps,
                working_size=list(result.working_size), seconds=seconds, note=photo.note))
        return records


class Progress:
    """What a bulk run writes as records arrive: the manifest, the counts, the photos bar."""

    def __init__(self, manifest: Manifest, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.manifest = manifest
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.bar = tqdm(total=total, desc="photos", unit="photo", disable=not progress)

    def start(self, job: Job) -> None:
        """Records that ``job`` may write its output (before it can)."""
        if not job.error:
            self.manifest.append({**_paths(job), "status": "started"})

    def write(self, records: list[dict]) -> None:
        for record in records:
            self.manifest.append(record)
            self.counts["ok" if record["status"] == "ok" else "failed"] += 1
            self.bar.update()

    def skip(self) -> None:
        self.counts["skipped"] += 1
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def remaining_jobs(jobs: list[Job], manifest: Manifest, resume: bool, progress: Progress
                   ) -> list[Job]:
    """The jobs a run has left, counting the others as skipped in ``progress``: with
    ``resume``, those not finished in the manifest (jobs that cannot run are always recorded
    again)."""
    left = []
    for job in jobs:
        if resume and not job.error and manifest.finished(job.source, job.output):
            progress.skip()
        else:
            left.append(job)
    return left


def run(jobs: list[Job], pipeline, config: ProtectConfig, manifest: Manifest,
        resume: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True
        ) -> dict:
    """Protect every job in this process; returns counts {"ok", "failed", "skipped"}."""
    protection = BatchedProtection(pipeline, config, max_pixels, progress)
    recorded = Progress(manifest, len(jobs), progress)
    try:
        for job in remaining_jobs(jobs, manifest, resume, recorded):
            recorded.start(job)
            recorded.write(protection.add(job))
        recorded.write(protection.finish())
    finally:
        recorded.close()
    return recorded.counts
