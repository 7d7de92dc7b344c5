"""Bulk protection on several devices with Ray: one worker per GPU (or per CPU core), each
with its own copy of the editor.

The driver hands out photos one at a time to whichever worker is free, writes the manifest as
records come back (one writer, so ``--resume`` works as in a single process) and never loads the
model itself. Workers load, batch, protect and save their photos (outputs are recorded where the
driver would write them: workers on other machines need the same file system). Results depend
only on the seed and each photo's name, so they are the same whatever worker protects a photo.
A worker that dies (killed for memory, say) fails the photos it held, which ``--resume``
retries; the others go on with the rest. One that dies loading the model is left out.
"""

from __future__ import annotations

import sys
from collections import deque

from .bulk import BatchedProtection, Job, Progress, failure_record, remaining_jobs
from .io import DEFAULT_MAX_PIXELS, Manifest
from .methods.decontext import ProtectConfig
from .models import UnknownBlocks


class WorkerError(RuntimeError):
    """The workers cannot start (no Ray, fewer devices than workers, no such model) or all
    died."""


class _Worker:
    """A Ray actor: a :class:`~ditflow.bulk.BatchedProtection` over its own pipeline."""

    def __init__(self, model: str, device: str, config: ProtectConfig, max_pixels: int):
        from .models.loading import pipeline_by_name

        try:
            pipeline = pipeline_by_name(model, device, kind="editor")
            self.protection = BatchedProtection(pipeline, config, max_pixels)
        except (FileNotFoundError, ValueError) as exc:  # not the model asked for; blocks it lacks
            self.error = exc
            return
        self.error = None

    def ready(self) -> Exception | None:
        """None, or why the model did not load."""
        return self.error

    def add(self, job: Job) -> list[dict]:
        return self.protection.add(job)

    def finish(self) -> list[dict]:
        return self.protection.finish()


def _loaded(ray, actors: list) -> list:
    """The actors that loaded their model. Any that could not is why the run cannot start
    (blocks the model lacks keep their type: the caller says who named them); actors that died
    loading (killed for memory, say) are left out, and if none is left, that is the error."""
    alive = []
    for actor in actors:
        try:
            error = ray.get(actor.ready.remote())
        except ray.exceptions.RayActorError as exc:
            died = exc
            continue
        if error:
            raise error if isinstance(error, UnknownBlocks) else WorkerError(str(error))
        alive.append(actor)
    if not alive:
        raise WorkerError(f"every worker died loading the model ({type(died).__name__}; out of "
                          "memory?)")
    if len(alive) < len(actors):
        print(f"{len(actors) - len(alive)} of {len(actors)} workers died loading the model "
              f"({type(died).__name__}); going on with {len(alive)}", file=sys.stderr)
    return alive


def run(jobs: list[Job], model: str, device: str, config: ProtectConfig, manifest: Manifest,
        workers: int, resume: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: bool = True) -> dict:
    """Protect every job on ``workers`` Ray workers, each loading ``model`` (as ``--model``
    names it) on ``device`` ("cuda", any index: the GPU Ray gives each worker; "cpu": one core
    each). Starts a local Ray instance unless one is running (``ray.init`` it yourself to use a
    cluster). Returns counts {"ok", "failed", "skipped"}."""
    try:
        import ray
    except ImportError as exc:
        raise WorkerError('several workers need Ray: pip install -e ".[scale]" (in the ditflow '
                          "checkout)") from exc

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    recorded = Progress(manifest, len(jobs), progress)
    try:
        kind = "GPU" if device.startswith("cuda") else "CPU"
        available = int(ray.cluster_resources().get(kind, 0))
        if workers > available:  # Ray would wait for them forever
            raise WorkerError(f"{workers} workers on {device} need {workers} {kind}s; the Ray "
                              f"cluster has {available}")
        worker = ray.remote(**{f"num_{kind.lower()}s": 1})(_Worker)
        # Ray shows a worker only the GPU it gives it, as cuda:0, whatever index --device names
        worker_device = "cuda" if kind == "GPU" else device
        actors = _loaded(ray, [worker.remote(model, worker_device, config, max_pixels)
                               for _ in range(workers)])
        queue = deque(remaining_jobs(jobs, manifest, resume, recorded))
        finishing, in_flight = set(), {}
        held = {actor: {} for actor in actors}  # per actor: its photos not yet recorded

        def give(actor) -> None:
            """The actor's next call: a photo while any are left, then its partial batches."""
            if queue:
                job = queue.popleft()
                recorded.start(job)
                held[actor][str(job.source.resolve())] = job
                in_flight[actor.add.remote(job)] = actor
            elif actor not in finishing:
                finishing.add(actor)
                in_flight[actor.finish.remote()] = actor

        for actor in actors:
            give(actor)
        while in_flight:
            (done,), _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(done)
            try:
                records = ray.get(done)
            except ray.exceptions.RayActorError as exc:
                lost = held.pop(actor).values()
                recorded.write([failure_record(job, config, f"{job.source}: the worker "
                                               f"protecting it died ({type(exc).__name__}; "
                                               "out of memory?)") for job in lost])
                if not held and queue:
                    raise WorkerError(f"every worker died; {len(queue)} photos were not "
                                      "started (rerun with --resume)") from None
                continue
            for record in records:
                held[actor].pop(record["input"], None)
            recorded.write(records)
            give(actor)
    finally:
        recorded.close()
        if started:
            ray.shutdown()
    return recorded.counts
