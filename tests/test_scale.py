"""``ditflow protect --workers N``: the same protected photos and records as one process, with
Ray workers (CPU processes here; one GPU each on a GPU machine)."""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("ray")
from helpers import done_lines
from PIL import Image

from ditflow.cli import main

FAST = ["--model", "tiny", "--steps", "2", "--resolution", "16", "--text-tokens", "8",
        "--quiet", "--device", "cpu"]


def _records(folder) -> dict[str, dict]:
    return {r["input"]: r for r in done_lines(folder)}


def test_workers_protect_exactly_as_one_process(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 20), (24, 40), (20, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not a photo")
    alone, pooled = tmp_path / "alone", tmp_path / "pooled"
    assert main(["protect", str(photos), "-o", str(alone), *FAST]) == 1  # notes.txt failed
    assert main(["protect", str(photos), "-o", str(pooled), *FAST, "--workers", "2"]) == 1
    want, got = _records(alone), _records(pooled)
    assert want.keys() == got.keys() and len(got) == 4
    for source, record in want.items():
        assert got[source]["status"] == record["status"]
        if record["status"] == "ok":
            assert got[source]["r_ctx_after"] == record["r_ctx_after"]
            name = f"{source.rsplit('/', 1)[-1]}"
            assert np.array_equal(np.asarray(Image.open(alone / name)),
                                  np.asarray(Image.open(pooled / name)))
    # resume: nothing left but the file that cannot be protected
    assert main(["protect", str(photos), "-o", str(pooled), *FAST, "--workers", "2",
                 "--resume"]) == 1
    assert len(done_lines(pooled)) == 5


def test_workers_that_cannot_start_are_a_one_line_error(tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(photo)
    common = ["protect", str(photo), "-o", str(tmp_path / "out"), *FAST]
    assert main([*common, "--workers", "10000"]) == 2
    assert "10000 workers on cpu need 10000 CPUs" in capsys.readouterr().err
    assert main([*common, "--workers", "2", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'}: no such model")
    assert main([*common, "--workers", "2", "--blocks", "single.99"]) == 2  # checked on load
    assert "\nerror: --blocks: ['single.99'] not in this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_gpu_worker_loads_the_model_on_the_gpu_ray_gives_it(tmp_path, monkeypatch):
    """Ray shows a worker only its own GPU, as cuda:0, so --device cuda:1 is no device there.
    A stand-in Ray (no GPU here) records the device each worker is given."""
    from ditflow import scale
    from ditflow.io import Manifest
    from ditflow.methods.decontext import ProtectConfig

    class Ref:  # what a Ray call returns: here, its value
        def __init__(self, value):
            self.value = value

    class Call:  # a Ray actor's method
        def __init__(self, value):
            self.remote = lambda: Ref(value)

    class Worker:  # a Ray actor with no photos to protect
        def __init__(self):
            self.ready, self.finish = Call(None), Call([])

    devices = []

    def start_worker(model, device, config, max_pixels):
        devices.append(device)
        return Worker()

    def remote(**resources):
        assert resources == {"num_gpus": 1}
        return lambda worker_class: types.SimpleNamespace(remote=start_worker)

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        is_initialized=lambda: True, cluster_resources=lambda: {"GPU": 2}, remote=remote,
        get=lambda refs: [r.value for r in refs] if isinstance(refs, list) else refs.value,
        wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:])))
    counts = scale.run([], "tiny", "cuda:1", ProtectConfig(), Manifest(tmp_path / "m.jsonl"),
                       workers=2, progress=False)
    assert counts == {"ok": 0, "failed": 0, "skipped": 0}
    assert devices == ["cuda", "cuda"]


def _kill(ray, actor, get) -> None:
    """Kill a Ray actor and return once it is dead (ray.kill is asynchronous: a call made just
    after it could still run); ``get``: Ray's own ``ray.get``."""
    ray.kill(actor)
    for _ in range(600):
        try:
            get(actor.ready.remote())
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    pytest.fail("a killed worker still answers after 30 s")


def _kill_workers(monkeypatch, killed: int, when: str) -> None:
    """Kill ``killed`` of the run's workers as soon as they exist ("created") or once they
    loaded the model, before any photo is handed out ("loaded")."""
    import ray

    actors, real_remote, real_get = [], ray.remote, ray.get

    def remote(**resources):
        def wrap(cls):
            actor_class = real_remote(**resources)(cls)

            class Recording:
                @staticmethod
                def remote(*args):
                    actors.append(actor_class.remote(*args))
                    if when == "created" and len(actors) <= killed:
                        _kill(ray, actors[-1], real_get)
                    return actors[-1]

            return Recording
        return wrap

    gets = []

    def get(refs):
        result = real_get(refs)
        gets.append(refs)
        if when == "loaded" and len(gets) == 2:  # the run checked that both workers loaded
            for actor in actors[:killed]:
                _kill(ray, actor, real_get)
        return result

    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "get", get)


def _photos(tmp_path, count: int):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(count):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(photos / f"p{i}.png")
    return photos


@pytest.mark.parametrize("killed", [1, 2])
def test_a_dead_worker_fails_the_photos_it_held_and_the_others_go_on(tmp_path, monkeypatch,
                                                                       capsys, killed):
    """Workers killed mid-run (say, for memory), each holding one photo: those photos are
    recorded as failed, a surviving worker protects the rest (with none left: a one-line
    error), and --resume redoes them."""
    photos, out = _photos(tmp_path, 3), tmp_path / "out"
    _kill_workers(monkeypatch, killed, "loaded")
    status = main(["protect", str(photos), "-o", str(out), *FAST, "--workers", "2"])
    records = _records(out)
    failed = [r for r in records.values() if r["status"] == "error"]
    assert len(failed) == killed
    assert all("the worker protecting it died (ActorDiedError" in r["error"] for r in failed)
    if killed == 1:
        assert status == 1 and len(records) == 3
    else:
        assert status == 2 and len(records) == 2
        assert "error: every worker died; 1 photos were not started (rerun with --resume)" \
            in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["protect", str(photos), "-o", str(out), *FAST, "--resume"]) == 0
    assert all(r["status"] == "ok" for r in _records(out).values())


@pytest.mark.parametrize("killed", [1, 2])
def test_workers_that_die_loading_the_model_leave_the_others_or_a_one_line_error(
        tmp_path, monkeypatch, capsys, killed):
    photos, out = _photos(tmp_path, 2), tmp_path / "out"
    _kill_workers(monkeypatch, killed, "created")
    status = main(["protect", str(photos), "-o", str(out), *FAST, "--workers", "2"])
    err = capsys.readouterr().err
    if killed == 1:
        assert status == 0 and len(_records(out)) == 2
        assert "1 of 2 workers died loading the model (ActorDiedError); going on with 1" in err
    else:
        assert status == 2 and not out.exists()
        assert "error: every worker died loading the model (ActorDiedError; out of memory?)" \
            in err
