"""``ditflow protect`` / ``evaluate`` / ``demo`` on real files: formats, bad inputs, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from helpers import done_lines
from PIL import Image, ImageCms

from ditflow.cli import main
from ditflow.io import psnr

FAST = ["--model", "tiny", "--steps", "2", "--resolution", "16", "--text-tokens", "8",
        "--quiet"]


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _records(out: Path) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in done_lines(out)}


@pytest.fixture
def photo_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(30, 40)).save(d / "good.png")
    rgba = np.dstack([_rgb(30, 40, 1), np.full((30, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(_rgb(30, 40, 2)).convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    Image.fromarray(_rgb(30, 40, 3)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(
        d / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(_rgb(30, 40, 4)).save(d / "rotated.jpg", exif=exif, quality=95)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_rgb(30, 40, 5)).save(d / "icc.png", icc_profile=icc)
    gray_icc = bytearray(icc)
    gray_icc[16:20] = b"GRAY"  # the header's colour space: a profile RGB output cannot use
    Image.fromarray(_rgb(30, 40, 6)[..., 0]).save(d / "gray_icc.png", icc_profile=bytes(gray_icc))
    key = _rgb(30, 40, 7)
    key[:10] = (1, 2, 3)
    Image.fromarray(key).save(d / "colour_key.png", transparency=(1, 2, 3))
    Image.fromarray(_rgb(30, 40, 8)).convert("P", palette=Image.ADAPTIVE, colors=4).save(
        d / "opaque_palette.png")
    frames = [Image.fromarray(_rgb(30, 40, 9 + i)).convert("P") for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    _write_rgb16_png(d / "rgb16.png", (np.arange(30 * 40 * 3).reshape(30, 40, 3) * 37) % 65536)
    (d / "corrupt.png").write_bytes((d / "good.png").read_bytes()[:60])
    (d / "notes.txt").write_text("not a photo")
    Image.fromarray(_rgb(8, 8)).save(d / "tiny.png")
    Image.fromarray(_rgb(100, 100)).save(d / "huge.png")
    return d


def _write_rgb16_png(path: Path, values: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    h, w, _ = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                          0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_folder_with_every_kind_of_input(photo_folder, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["protect", str(photo_folder), "-o", str(out), "--max-pixels", "5000", *FAST])
    assert status == 1  # some inputs failed, the rest went on
    records = _records(out)
    ok = {"good.png", "alpha.png", "palette.png", "cmyk.jpg", "gray16.png", "rotated.jpg",
          "icc.png", "gray_icc.png", "colour_key.png", "opaque_palette.png", "animated.gif",
          "rgb16.png"}
    assert {n for n, r in records.items() if r["status"] == "ok"} == ok
    errors = {n: r["error"] for n, r in records.items() if r["status"] == "error"}
    assert "corrupt or truncated" in errors["corrupt.png"]
    assert "not an image" in errors["notes.txt"]
    assert "too small" in errors["tiny.png"]
    assert "100x100 = 10000 pixels, over the limit of 5000 (the decompression-bomb guard" in (
        errors["huge.png"])
    for name in ok:
        record = records[name]
        assert record["linf"] <= 12 and record["r_ctx_after"] < record["r_ctx_before"] + 1e-3
        assert Path(record["output"]).suffix == ".png"
    assert Image.open(out / "alpha.png").mode == "RGBA"
    assert (np.asarray(Image.open(out / "alpha.png"))[..., 3] == 128).all()
    assert Image.open(out / "rotated.png").size == (30, 40)  # EXIF orientation applied
    assert Image.open(out / "icc.png").info.get("icc_profile")
    assert "16-bit" in records["gray16.png"]["note"]
    assert "16-bit" in records["rgb16.png"]["note"]
    assert "first of 3 frames" in records["animated.gif"]["note"]
    assert "GRAY colour profile dropped" in records["gray_icc.png"]["note"]
    assert "icc_profile" not in Image.open(out / "gray_icc.png").info
    transparent = np.asarray(Image.open(out / "colour_key.png"))[..., 3] == 0
    assert transparent[:10].all() and not transparent[10:].any()  # the colour key's pixels
    assert Image.open(out / "opaque_palette.png").mode == "RGB"  # no alpha it did not have
    assert not list(out.glob(".*.tmp"))
    err = capsys.readouterr().err
    assert "failed:" in err
    assert "does not protect against real editors" in err  # --model tiny is not a real editor


def test_budget_holds_exactly_in_the_saved_pixels(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pixels = _rgb(24, 24, 7)
    Image.fromarray(pixels).save(src / "a.png")
    out = tmp_path / "out"
    assert main(["protect", str(src / "a.png"), "-o", str(out), "--epsilon", "4.5", *FAST]) == 0
    saved = np.asarray(Image.open(out / "a.png")).astype(int)
    assert np.abs(saved - pixels.astype(int)).max() <= 4


def test_existing_manifest_needs_resume(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(src)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), *FAST]) == 0
    assert main(["protect", str(src), "-o", str(out), *FAST]) == 2
    assert main(["protect", str(src), "-o", str(out), "--resume", *FAST]) == 0
    assert len(done_lines(out)) == 1  # nothing redone


def test_resume_refuses_other_settings(tmp_path, capsys):
    """Resuming with another model or budget would mix two protections in one folder."""
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(src)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), *FAST]) == 0
    assert _records(out)["a.png"]["model"] == "tiny"
    capsys.readouterr()
    assert main(["protect", str(src), "-o", str(out), "--resume", *FAST, "--epsilon", "8"]) == 2
    assert "--epsilon 12.75 (now --epsilon 8.0)" in capsys.readouterr().err
    testbed = [a if a != "tiny" else "testbed" for a in FAST]
    assert main(["protect", str(src), "-o", str(out), "--resume", *testbed]) == 2
    assert "--model tiny (now --model testbed)" in capsys.readouterr().err
    # batching does not change a protected photo: resuming with another batch size is fine
    assert main(["protect", str(src), "-o", str(out), "--resume", *FAST, "--batch-size", "2"]) == 0


def test_compile_option_compiles_the_blocks_and_may_change_on_resume(tmp_path, monkeypatch):
    from ditflow import cli

    configs = []
    config = cli._config
    monkeypatch.setattr(cli, "_config", lambda args: configs.append(config(args)) or configs[-1])
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(src)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), *FAST]) == 0
    # Inductor would generate C++ for minutes here: the resumed run has nothing left to do,
    # and the option reaches the config
    assert main(["protect", str(src), "-o", str(out), "--resume", "--compile", *FAST]) == 0
    assert [c.compile_backend for c in configs] == [None, "inductor"]


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "diff-pgd"], "not with --method diff-pgd"),
    (["--eot-resize", "0.5", "1"], "not with --eot-resize"),
    (["--device", "cpu"], "--cuda-graph needs a GPU (--device cuda), not --device cpu"),
])
def test_cuda_graph_is_refused_with_options_it_cannot_replay(tmp_path, capsys, options,
                                                            message):
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(src)
    with pytest.raises(SystemExit) as exit_:
        main(["protect", str(src), "-o", str(tmp_path / "out"), "--cuda-graph", *options,
              *FAST])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_compares_options_left_out_and_the_format(tmp_path, capsys):
    """Options left out on resume take their defaults, as the manifest records them: an
    option the first run gave is missed, and so is a defaulted one it set otherwise."""
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(src)
    out = tmp_path / "out"
    run = ["protect", str(src), "-o", str(out), *FAST]
    first = [*run, "--eot-jpeg", "60", "95", "--stop-window", "1"]
    assert main(first) == 0
    capsys.readouterr()
    assert main([*run, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--eot-jpeg 60 95 (now no --eot-jpeg)" in err
    assert "--stop-window 1 (now no --stop-window)" in err
    assert main([*first, "--resume", "--text-tokens", "16"]) == 2  # FAST's 8 was recorded
    assert "--text-tokens 8 (now --text-tokens 16)" in capsys.readouterr().err
    assert main([*first, "--resume", "--format", "jpg"]) == 2  # would protect it again
    assert "--format png (now --format jpg)" in capsys.readouterr().err
    assert not (out / "a.jpg").exists()
    assert main([*first, "--resume"]) == 0
    assert "0 protected, 1 already done" in capsys.readouterr().out


def test_resume_with_a_model_folder_counts_its_defaults(tmp_path, capsys):
    """A model folder's resolution and blocks left out are its family's defaults, read from
    the folder's files before anything loads."""
    from dataclasses import asdict

    from ditflow.methods.decontext import FAMILY_DEFAULTS, ProtectConfig
    from ditflow.models.loading import editor_transformer_name

    folder = tmp_path / "kontext"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxKontextPipeline", "transformer": ["diffusers",
                                                               "FluxTransformer2DModel"]}))
    (tmp_path / "step1x").mkdir()
    (tmp_path / "step1x" / "step1x-edit-i1258.safetensors").touch()
    assert editor_transformer_name(tmp_path / "step1x") == "Step1XEditTransformer"
    assert editor_transformer_name(tmp_path / "nowhere") is None
    src, out = tmp_path / "a.png", tmp_path / "out"
    Image.fromarray(_rgb(20, 20)).save(src)
    out.mkdir()
    Image.fromarray(_rgb(20, 20)).save(out / "a.png")
    defaults = FAMILY_DEFAULTS["FluxTransformer2DModel"]
    config = asdict(ProtectConfig(steps=2, resolution=768, blocks=defaults["blocks"]))
    del config["prompts"]
    (out / "manifest.jsonl").write_text(json.dumps(
        {"model": str(folder), "input": str(src.resolve()), "output": str(out / "a.png"),
         "status": "ok", "config": config}) + "\n")
    resume = ["protect", str(src), "-o", str(out), "--model", str(folder), "--steps", "2",
              "--resume"]
    assert main(resume) == 2
    assert f"--resolution 768 (now --resolution {defaults['resolution']})" in (
        capsys.readouterr().err)
    # the same settings: on to loading the model, a usage error
    assert main([*resume, "--resolution", "768"]) == 2
    assert "not a complete diffusers pipeline folder" in capsys.readouterr().err


def test_missing_inputs_and_clashing_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "x" / "same.png")
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "y" / "same.jpg")
    out = tmp_path / "out"
    status = main(["protect", str(tmp_path / "x"), str(tmp_path / "y"),
                   str(tmp_path / "nothing*.png"), "-o", str(out), *FAST])
    assert status == 1
    errors = [r["error"] for r in done_lines(out) if r["status"] == "error"]
    assert any("would overwrite" in e for e in errors)
    assert any("no such file" in e for e in errors)


def test_a_model_folder_that_is_not_one_is_a_one_line_error(tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(_rgb(20, 20)).save(photo)
    folder = tmp_path / "step1x"
    folder.mkdir()
    (folder / "step1x-edit-i1258.safetensors").touch()
    for model, message in ((tmp_path / "nowhere", "no such model directory"),
                           (folder, "Step1X-Edit folder; missing: vae.safetensors")):
        assert main(["protect", str(photo), "-o", str(tmp_path / "out"),
                     "--model", str(model)]) == 2
        assert re.search(f"^error: .*{message}", capsys.readouterr().err, re.MULTILINE)
    assert not (tmp_path / "out").exists()  # made only once the model has loaded


def test_blocks_the_model_lacks_name_the_option(tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(_rgb(20, 20)).save(photo)
    out = tmp_path / "out"
    assert main(["protect", str(photo), "-o", str(out), *FAST, "--blocks", "single.99"]) == 2
    err = capsys.readouterr().err
    assert "error: --blocks: ['single.99'] not in this model" in err and "ProtectConfig" not in err
    assert not out.exists()


def test_resume_after_the_process_is_killed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_rgb(20, 20, i)).save(src / f"p{i}.png")
    out = tmp_path / "out"
    options = ["--model", "tiny", "--steps", "40", "--resolution", "16", "--text-tokens", "8",
               "--quiet"]
    command = [sys.executable, "-m", "ditflow.cli", "protect", str(src), "-o", str(out), *options]
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_text().count('"ok"') >= 1:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {Path(r["output"]).name: os.path.getmtime(r["output"])
                   for r in _records(out).values()}
    assert 1 <= len(done_before) < 5, "the run should have been killed mid-batch"
    assert main(["protect", str(src), "-o", str(out), "--resume", *options]) == 0
    records = _records(out)
    assert sorted(records) == [f"p{i}.png" for i in range(5)]
    assert all(r["status"] == "ok" for r in records.values())
    for name, mtime in done_before.items():
        assert os.path.getmtime(out / name) == mtime  # finished work was not redone
    assert not list(out.glob(".*.tmp"))


def test_demo_has_no_model_option(capsys):
    """The demo always runs the bundled testbed editor."""
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", "tiny"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --model tiny" in capsys.readouterr().err


def test_help_gives_each_models_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "testbed 32, tiny 32, tiny-qwen 64, tiny-step1x 32" in text
    assert "FLUX.1 Kontext 512, testbed 24, tiny 16" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])  # the demo runs the testbed only
    text = " ".join(capsys.readouterr().out.split())
    assert "working resolution (default 32)" in text and "tiny-qwen" not in text
    assert "(default: single.0,single.1,single.2)" in text


def test_help_states_defaults_as_the_library_has_them(capsys):
    """The help spells some defaults out in words (the parser is built without importing the
    methods, which need diffusers): they must be what UVRConfig and decontext.FAMILY_DEFAULTS
    say."""
    from ditflow.methods.decontext import FAMILY_DEFAULTS
    from ditflow.methods.uvr import UVRConfig

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert f"default {UVRConfig.threshold}, UVRConfig's" in " ".join(
        capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for family, editors in (("FluxTransformer2DModel", "FLUX.1 Kontext and Step1X-Edit"),
                            ("Step1XEditTransformer", "FLUX.1 Kontext and Step1X-Edit"),
                            ("QwenImageTransformer2DModel", "Qwen-Image-Edit")):
        defaults = FAMILY_DEFAULTS[family]
        assert f"{editors} {defaults['resolution']}" in text
        assert f"{editors} {defaults['blocks'][0]}..{defaults['blocks'][-1]}" in text
        assert len(defaults["blocks"]) == int(defaults["blocks"][-1].split(".")[1]) - int(
            defaults["blocks"][0].split(".")[1]) + 1  # "a..b" names every block between


def test_a_demo_whose_protection_cannot_run_says_why(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--steps", "1", "--scenes", "1",
                 "--blocks", "single.99"]) == 2
    assert capsys.readouterr().err.endswith("--blocks: ['single.99'] not in this model "
                                            "(6 blocks: double.0 .. single.3)\n")


def test_the_demo_refuses_folders_it_cannot_use(tmp_path, capsys):
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    assert main(["demo", "-o", str(tmp_path / "a.png"), "--steps", "1", "--scenes", "1"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # a folder holding a protect run's photos: the demo would remove them as its own
    assert main(["protect", str(tmp_path / "a.png"), "-o", str(tmp_path / "demo" / "protected"),
                 *FAST]) == 0
    assert main(["demo", "-o", str(tmp_path / "demo"), "--steps", "1", "--scenes", "1"]) == 2
    assert "holds photos protected by another run" in capsys.readouterr().err
    assert (tmp_path / "demo" / "protected" / "a.png").is_file()
    # where the figure goes, before the run rather than with a traceback after it
    (tmp_path / "other" / "figure.png").mkdir(parents=True)
    assert main(["demo", "-o", str(tmp_path / "other"), "--steps", "1", "--scenes", "1"]) == 2
    assert f"{tmp_path / 'other' / 'figure.png'} is a folder" in capsys.readouterr().err
    assert not (tmp_path / "other" / "protected").exists()


def test_demo_protects_and_edits_testbed_scenes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--steps", "3", "--scenes", "2"]) == 0
    text = capsys.readouterr().out
    assert "scene0" in text and "scene1" in text and "r_ctx" in text
    figure = Image.open(out / "figure.png")
    assert figure.size[0] == 4 * 32 * 4  # four 32-px panels, upscaled 4x
    records = _records(out / "protected")
    assert len(records) == 2 + 3  # the scenes and the sample photos
    assert all(r["status"] == "ok" and r["linf"] <= 12 for r in records.values())
    from ditflow.cli import SAMPLES

    for sample in SAMPLES.glob("*.png"):
        assert sample.name in text
        assert Image.open(out / "protected" / sample.name).size == Image.open(sample).size
    # run again: the demo starts over, replacing the protected photos it wrote itself
    assert main(["demo", "-o", str(out), "--steps", "1", "--scenes", "1"]) == 0
    assert all(r["status"] == "ok" for r in _records(out / "protected").values())
    assert sorted(p.name for p in (out / "scenes").iterdir()) == ["scene0.png"]  # not scene1


def test_evaluate(tmp_path):
    out = tmp_path / "protected"
    from ditflow.cli import SAMPLES

    assert main(["protect", str(SAMPLES / "coffee.png"), "-o", str(out), *FAST]) == 0
    rows_file = tmp_path / "rows.json"
    face_model = tmp_path / "face.pt2"
    torch.export.save(torch.export.export(MeanColour(), (torch.zeros(1, 3, 112, 112),)),
                      str(face_model))
    assert main(["evaluate", str(SAMPLES), str(out), "--model", "tiny", "--edit-steps", "1",
                 "--resolution", "16", "--text-tokens", "8", "--json", str(rows_file),
                 "--face-model", str(face_model)]) == 0
    (row,) = json.loads(rows_file.read_text())
    assert row["photo"] == "coffee.png"
    assert row["linf"] <= 12 and row["perturbation_psnr"] > 25
    record = _records(out)["coffee.png"]  # the same measurement when the photo was protected
    assert record["r_ctx_before"] != pytest.approx(record["r_ctx_after"], abs=1e-5)
    assert row["r_ctx_clean"] == pytest.approx(record["r_ctx_before"], abs=1e-5)
    assert row["r_ctx_protected"] == pytest.approx(record["r_ctx_after"], abs=1e-5)
    for key in ("face_sim_clean_edit", "face_sim_protected_edit"):
        assert -1 - 1e-9 <= row[key] <= 1 + 1e-9
    assert row["face_sim_clean_edit"] != row["face_sim_protected_edit"]  # two edits


def test_evaluate_refuses_a_json_file_it_cannot_or_must_not_write(tmp_path, capsys):
    """Before the model loads: a folder, or a file it reads (a photo, the manifest)."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    clean.mkdir()
    Image.fromarray(_rgb(20, 20)).save(clean / "a.png")
    assert main(["protect", str(clean), "-o", str(out), *FAST]) == 0
    for target, message in ((out, "is a folder"),
                            (tmp_path / "no" / "rows.json",
                             f"cannot write into {tmp_path / 'no'} (create it"),
                            (clean / "a.png", "would overwrite a file evaluate reads"),
                            (out / "manifest.jsonl", "would overwrite a file evaluate reads")):
        assert main(["evaluate", str(clean), str(out), "--json", str(target)]) == 2
        assert f"--json {target}: {message}" in capsys.readouterr().err
    assert Image.open(clean / "a.png").size == (20, 20)


def test_evaluate_fails_when_a_pair_is_skipped(tmp_path, capsys):
    clean, out = tmp_path / "clean", tmp_path / "out"
    clean.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb(20, 20)).save(clean / name)
    assert main(["protect", str(clean), "-o", str(out), *FAST]) == 0
    Image.fromarray(_rgb(20, 24)).save(clean / "b.png")  # not the photo protected
    assert main(["evaluate", str(clean), str(out), "--model", "tiny", "--edit-steps", "1",
                 "--resolution", "16", "--text-tokens", "8"]) == 1
    err = capsys.readouterr().err
    assert f"skipped: {clean / 'b.png'} is 24x20, {out / 'b.png'} 20x20" in err


def test_an_interrupted_protection_says_what_it_kept(tmp_path, monkeypatch, capsys):
    from ditflow import bulk

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bulk, "run", interrupted)
    photo = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 20)).save(photo)
    assert main(["protect", str(photo), "-o", str(tmp_path / "out"), *FAST]) == 130
    assert "interrupted before any photo finished; rerun with --resume" in (
        capsys.readouterr().err)


def test_resume_lets_the_text_length_change_where_the_editor_ignores_it(tmp_path, capsys):
    photo, out = tmp_path / "a.png", tmp_path / "out"
    Image.fromarray(_rgb(20, 20)).save(photo)
    qwen = ["--model", "tiny-qwen", "--steps", "1", "--quiet"]
    assert main(["protect", str(photo), "-o", str(out), *qwen]) == 0
    assert main(["protect", str(photo), "-o", str(out), *qwen, "--resume",
                 "--text-tokens", "32"]) == 0
    assert main(["protect", str(photo), "-o", str(tmp_path / "flux"), *FAST]) == 0
    assert main(["protect", str(photo), "-o", str(tmp_path / "flux"), *FAST, "--resume",
                 "--text-tokens", "12"]) == 2  # T5 reads FLUX.1 Kontext's instruction
    assert "--text-tokens 8 (now --text-tokens 12)" in capsys.readouterr().err


def test_block_options_take_spaces_and_refuse_what_is_no_block(tmp_path, capsys):
    from ditflow.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["protect", "x", "-o", "y", "--blocks", "single.0, single.1"])
    assert args.blocks == ("single.0", "single.1")
    for argv in (["protect", "x", "-o", "y", "--blocks", "single.0,single1"],
                 ["generate", "a cow", "-o", "y.png", "--uvr-block", "single.1,single.2"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "argument --" in capsys.readouterr().err


def test_evaluate_refuses_face_models_it_cannot_load(tmp_path, capsys):
    """Before the editor loads: a missing file, another kind of file, one its loader cannot
    read, each a one-line error naming the option."""
    for folder in ("clean", "protected"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_rgb(20, 20)).save(tmp_path / folder / "a.png")
    (tmp_path / "face.txt").write_text("")
    (tmp_path / "face.pt2").write_text("not an exported program")
    for name, message in (("missing.onnx", "no face-recognition model file there"),
                          ("face.txt", "expected an .onnx model or a torch.export program"),
                          ("face.pt2", "not a torch.export program")):
        assert main(["evaluate", str(tmp_path / "clean"), str(tmp_path / "protected"),
                     "--face-model", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --face-model {tmp_path / name}: {message}")
        assert "Traceback" not in err


def test_evaluate_refuses_two_protected_files_of_one_photo(tmp_path, capsys):
    """Say, a.png and the a.jpg of a run with another --format: which was meant is unknown."""
    for folder in ("clean", "protected"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_rgb(20, 20)).save(tmp_path / folder / "a.png")
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "protected" / "a.jpg")
    assert main(["evaluate", str(tmp_path / "clean"), str(tmp_path / "protected")]) == 2
    assert re.search(r"^error: .*a\.jpg and .*a\.png both match a\.png", capsys.readouterr().err)


def test_evaluate_pairs_photos_by_their_whole_stem(tmp_path):
    """a.png and a.v2.png are two photos, not two protections of a.png."""
    from ditflow.cli import _evaluation_pairs

    for folder in ("clean", "protected"):
        (tmp_path / folder).mkdir()
        for name in ("a.png", "a.v2.png"):
            Image.fromarray(_rgb(20, 20)).save(tmp_path / folder / name)
    pairs = _evaluation_pairs(tmp_path / "clean", tmp_path / "protected")
    assert [(c.name, p.name) for c, p in pairs] == [("a.png", "a.png"),
                                                   ("a.v2.png", "a.v2.png")]


def test_evaluate_leaves_hidden_files_out_as_protect_does(tmp_path, capsys):
    """.DS_Store and ._a.png (macOS) are no photos: evaluate neither pairs nor names them."""
    from ditflow.cli import _evaluation_pairs

    for folder in ("clean", "protected"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_rgb(20, 20)).save(tmp_path / folder / "a.png")
        (tmp_path / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (tmp_path / folder / "._a.png").write_bytes(b"\0\5\26\7")
    pairs = _evaluation_pairs(tmp_path / "clean", tmp_path / "protected")
    assert [(c.name, p.name) for c, p in pairs] == [("a.png", "a.png")]
    assert capsys.readouterr().err == ""


class MeanColour(torch.nn.Module):
    """A stand-in face recogniser for the --face-model plumbing."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_output_folders_that_cannot_take_the_photos(tmp_path, capsys):
    """Refused before any model loads: the input folder itself (the originals would be
    replaced), a file; a photo named twice is protected once."""
    src = tmp_path / "in"
    src.mkdir()
    pixels = _rgb(20, 20)
    Image.fromarray(pixels).save(src / "a.png")
    assert main(["protect", str(src), "-o", str(src), *FAST]) == 2
    assert "also an input folder" in capsys.readouterr().err
    assert (np.asarray(Image.open(src / "a.png")) == pixels).all()
    Image.fromarray(pixels).save(src / "a.jpg")  # its output would be a.png, another input
    assert main(["protect", str(src / "a.jpg"), str(src / "a.png"), "-o", str(src), *FAST]) == 1
    assert "is an input photo and would be overwritten" in capsys.readouterr().err
    assert (np.asarray(Image.open(src / "a.png")) == pixels).all()
    (src / "a.jpg").unlink()
    (tmp_path / "file").write_text("")
    assert main(["protect", str(src), "-o", str(tmp_path / "file"), *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["protect", str(src), "-o", str(tmp_path / "file" / "out"), *FAST]) == 2
    assert f"cannot create the output folder {tmp_path / 'file' / 'out'}: " in (
        capsys.readouterr().err)
    out = tmp_path / "out"
    assert main(["protect", str(src / "a.png"), str(src), "-o", str(out), *FAST]) == 0
    assert len(_records(out)) == 1 and len(done_lines(out)) == 1
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not private to the user


def test_nothing_to_protect_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["protect", str(tmp_path / "empty"), str(tmp_path / "typo.png"), "-o", str(out),
                 *FAST]) == 1
    err = capsys.readouterr().err
    assert "empty: no photos in this folder" in err and "typo.png: no such file" in err
    assert "no photos to protect" in err and not out.exists()


@pytest.mark.parametrize("option", [["--epsilon", "0.5"], ["--epsilon", "nan"],
                                    ["--steps", "0"], ["--batch-size", "0"],
                                    ["--resolution", "8"], ["--eot-jpeg", "0", "200"],
                                    ["--device", "tpu"]])
def test_bad_option_values_name_the_option(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["protect", str(tmp_path), "-o", str(tmp_path / "out"), *FAST, *option])
    assert exit_.value.code == 2
    assert f"argument {option[0]}: {option[1]}: " in capsys.readouterr().err


def test_a_manifest_line_cut_by_a_crash_is_redone_and_the_next_kept(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.fromarray(_rgb(20, 20)).save(src / f"{name}.png")
    out = tmp_path / "out"
    assert main(["protect", str(src / "a.png"), "-o", str(out), *FAST]) == 0
    manifest = out / "manifest.jsonl"
    manifest.write_text(manifest.read_text()[:-40])  # the crash cut the only line short
    assert main(["protect", str(src), "-o", str(out), "--resume", *FAST]) == 0
    assert sorted(_readable_records(out)) == ["a.png", "b.png"]  # on lines of their own


def _readable_records(out: Path) -> dict[str, dict]:
    records = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[Path(record["input"]).name] = record
    return records


def test_evaluate_names_missing_folders_and_unmatched_photos(tmp_path, capsys):
    (tmp_path / "clean").mkdir()
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "clean" / "p[1].png")
    (tmp_path / "protected").mkdir()
    assert main(["evaluate", str(tmp_path / "clean"), str(tmp_path / "nowhere")]) == 2
    assert re.search(r"the protected folder .*nowhere does not exist", capsys.readouterr().err)
    assert main(["evaluate", str(tmp_path / "clean"), str(tmp_path / "protected")]) == 2
    assert re.search(r"no protected photo in .*protected for a photo in",
                     capsys.readouterr().err)
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "protected" / "p[1].png")  # glob characters
    assert main(["evaluate", str(tmp_path / "clean"), str(tmp_path / "protected"),
                 "--model", "tiny", "--edit-steps", "1", "--resolution", "16",
                 "--text-tokens", "8"]) == 0


def test_evaluate_pairs_photos_as_the_manifest_records_them(tmp_path, capsys):
    """a.jpg and a.png share a stem: protect keeps a.jpg's output (a.png clashes), and evaluate
    must not compare a.png with a.jpg's protection; photos without one are named."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    clean.mkdir()
    Image.fromarray(_rgb(20, 20, 1)).save(clean / "a.jpg", quality=95)
    Image.fromarray(_rgb(20, 20, 2)).save(clean / "a.png")
    Image.fromarray(_rgb(20, 20, 3)).save(clean / "b.png")
    assert main(["protect", str(clean), "-o", str(out), *FAST]) == 1  # a.png clashes
    (out / "b.png").unlink()
    capsys.readouterr()
    rows = tmp_path / "rows.json"
    assert main(["evaluate", str(clean), str(out), "--model", "tiny", "--edit-steps", "1",
                 "--resolution", "16", "--text-tokens", "8", "--json", str(rows)]) == 0
    assert [row["photo"] for row in json.loads(rows.read_text())] == ["a.jpg"]
    err = capsys.readouterr().err
    assert f"not evaluated: {clean / 'a.png'}: no protected photo" in err
    assert f"not evaluated: {clean / 'b.png'}: no protected photo" in err
    moved = clean.rename(tmp_path / "moved")  # the originals moved since: paired by file name
    assert main(["evaluate", str(moved), str(out), "--model", "tiny", "--edit-steps", "1",
                 "--resolution", "16", "--text-tokens", "8", "--json", str(rows)]) == 0
    assert [row["photo"] for row in json.loads(rows.read_text())] == ["a.jpg"]


def test_generate_and_edit_refuse_outputs_they_cannot_write(tmp_path, capsys):
    photo, map_named = tmp_path / "p.png", tmp_path / "q-regions.png"
    for path in (photo, map_named):
        Image.fromarray(_rgb(20, 20)).save(path)
    for argv, message in (
            (["generate", "a red circle", "-o", str(tmp_path)], "name a .png or .jpg file"),
            (["generate", "a red circle", "-o", str(tmp_path / "no" / "x.png")],
             "cannot write into"),
            (["edit", str(photo), "make it blue", "-o", str(photo)], "overwrite the source"),
            (["edit", str(photo), "make it blue", "--object", "it", str(tmp_path / "m.png"),
              "-o", str(tmp_path / "m.png")], "would overwrite the mask of 'it'"),
            (["edit", str(map_named), "make it blue", "-o", str(tmp_path / "q.jpg")],
             f"the region map {map_named} would overwrite the source photo"),
            (["generate", "a red circle", "-o", str(tmp_path / "p-regions" / ".." / "x.png")],
             "cannot write into"),
            (["generate", "a red circle", "--uvr", "", "-o", str(tmp_path / "x.png")],
             "--uvr : no such file"),
            (["generate", "a red circle", "--entity", "circle", "--alpha", "0", "-o",
              str(tmp_path / "x.png")], "--alpha: 0: expected a number > 0"),
            (["edit", str(photo), "make it blue", "--dilation", "1", "-o", str(tmp_path / "x.png")],
             "--dilation: 1: expected a number >= 0 and < 1"),
            (["generate", "a red circle", "--text-tokens", "600", "-o", str(tmp_path / "x.png")],
             "--text-tokens: 600: expected an integer >= 1 and <= 512"),
            (["generate", "a red circle", "--size", "40", "-o", str(tmp_path / "x.png")],
             "generate: error: --size 40: FLUX.1 makes images of multiples of 16 px (try 32)"),
            (["generate", "a b c d e f g", *[a for e in "abcdefg" for a in ("--entity", e)],
              "-o", str(tmp_path / "x.png")], "generate: error: --entity: at most 6, got 7"),
            (["edit", str(photo), "x", *[a for e in "abcde" for a in ("--object", e, "m.png")],
              "-o", str(tmp_path / "x.png")], "edit: error: --object: at most 4, got 5"),
            (["generate", "x", "--uvr", str(tmp_path), "-o", str(tmp_path / "x.png")],
             f"--uvr {tmp_path}: a folder"),
            (["edit", str(photo), "x", "--uvr-threshold", "0.3", "--uvr-block", "single.1",
              "-o", str(tmp_path / "x.png")],
             "--uvr-threshold and --uvr-block set UVR, which runs with --uvr ANCHORS only")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    (tmp_path / "x-regions.png").mkdir()
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png")])
    assert f"the region map {tmp_path / 'x-regions.png'} is a folder" in capsys.readouterr().err


def test_results_that_cannot_be_written_are_one_line_errors(tmp_path, capsys):
    from ditflow.cli import _save_results

    (tmp_path / "x-regions.png").mkdir()  # made after the checks, say
    regions = torch.ones(1, 2, 2, dtype=torch.bool)
    assert _save_results(tmp_path / "x.png", np.zeros((4, 4, 3)), regions, ["it"], "object") == 1
    assert (tmp_path / "x.png").exists()  # the image is written first
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'x-regions.png'}") and err[-1] == "\n"


def test_region_maps_have_a_colour_for_every_region_a_command_takes():
    """_save_results pairs colours and regions without strict: a region past the last colour
    would go undrawn."""
    from ditflow.cli import REGION_COLORS
    from ditflow.methods.ale import MAX_OBJECTS
    from ditflow.methods.deleaker import MAX_ENTITIES

    assert len({tuple(color) for color in REGION_COLORS}) >= max(MAX_ENTITIES, MAX_OBJECTS)


def test_an_image_without_regions_removes_an_earlier_runs_map(tmp_path, capsys):
    from ditflow.cli import _save_results

    regions = torch.ones(1, 2, 2, dtype=torch.bool)
    assert _save_results(tmp_path / "x.png", np.zeros((4, 4, 3)), regions, ["it"], "object") == 0
    assert (tmp_path / "x-regions.png").is_file()
    assert _save_results(tmp_path / "x.png", np.zeros((4, 4, 3))) == 0
    assert not (tmp_path / "x-regions.png").exists()
    assert f"removed {tmp_path / 'x-regions.png'}" in capsys.readouterr().out


def test_a_missing_uvr_anchors_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png"),
              "--uvr", str(tmp_path / "concept.safetensors")])
    err = capsys.readouterr().err
    assert "--uvr " + str(tmp_path / "concept.safetensors") + ": no such file" in err
    assert err.startswith("usage: ditflow generate") and "ditflow generate: error:" in err


def test_commands_without_the_diffusers_extra_say_how_to_install_it():
    """In a fresh process, so that no module imported by an earlier test hides an import of
    diffusers on the way to the command (building the parser, say)."""
    def without_diffusers(argv: list[str]) -> subprocess.CompletedProcess:
        script = ("import sys; sys.modules['diffusers'] = None; from ditflow.cli import main; "
                  f"sys.exit(main({argv!r}))")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    run = without_diffusers(["demo"])
    assert run.returncode == 2
    assert run.stderr == ('error: ditflow demo needs the diffusers extra (diffusers missing): '
                          'pip install -e ".[diffusers]" in the ditflow checkout\n')
    for argv in (["--help"], ["generate", "--help"], ["edit", "--help"]):
        run = without_diffusers(argv)
        assert run.returncode == 0 and run.stdout.startswith("usage: ditflow"), run.stderr


@pytest.mark.parametrize("name", ["animated.gif", "pages.tiff"])
def test_a_multi_frame_photo_is_closed_once_loaded(name, tmp_path):
    """Pillow keeps such a file open for its other frames; a bulk run must not leave that to
    the garbage collector."""
    import warnings

    from ditflow.io import load_photo

    frames = [Image.fromarray(_rgb(20, 20, seed)) for seed in range(2)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert load_photo(tmp_path / name).note == "first of 2 frames protected"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_float_images_load_by_their_range_and_thin_photos_have_an_ssim(tmp_path):
    from ditflow.io import load_photo, ssim

    ramp = np.linspace(0, 1, 20 * 20, dtype=np.float32).reshape(20, 20)
    Image.fromarray(ramp, "F").save(tmp_path / "f.tiff")
    photo = load_photo(tmp_path / "f.tiff")
    assert photo.pixels.min() == 0 and photo.pixels.max() == 255
    assert "floating-point" in photo.note
    thin = _rgb(4, 226)  # thinner than SSIM's 11 px window
    assert ssim(thin, thin) == pytest.approx(1.0) and ssim(thin, 255 - thin) < 0


def test_a_failing_batch_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from ditflow.methods.decontext import Protector

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(_rgb(20, 20)).save(src / f"{name}.png")
    run = Protector.run

    def failing_on_b(self, names, photos, on_step=None):
        if "b.png" in names:
            raise RuntimeError("out of something")
        return run(self, names, photos, on_step)

    monkeypatch.setattr(Protector, "run", failing_on_b)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), *FAST]) == 1
    records = _records(out)
    assert [records[n]["status"] for n in ("a.png", "b.png", "c.png")] == ["ok", "error", "ok"]
    assert "protection failed: RuntimeError: out of something" in records["b.png"]["error"]
    monkeypatch.setattr(Protector, "run", run)
    # resumed from another working directory with relative paths: finished photos are found
    monkeypatch.chdir(tmp_path)
    assert main(["protect", "in", "-o", "out", "--resume", *FAST]) == 0
    assert "1 protected, 2 already done" in capsys.readouterr().out


def test_photos_of_many_sizes_do_not_pile_up(tmp_path, monkeypatch):
    from ditflow.bulk import BatchedProtection

    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(20, 20), (20, 60), (60, 20), (20, 40), (40, 20)]):
        Image.fromarray(_rgb(h, w, i)).save(src / f"p{i}.png")
    monkeypatch.setattr(BatchedProtection, "PENDING_BATCHES", 1)
    waiting = []
    protect = BatchedProtection._protect

    def counting(self, batch, size):
        waiting.append(len(batch) + sum(map(len, self._pending.values())))
        return protect(self, batch, size)

    monkeypatch.setattr(BatchedProtection, "_protect", counting)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), "--batch-size", "2", *FAST]) == 0
    assert len(_records(out)) == 5
    assert max(waiting) <= 3  # one batch of 2 in memory, plus the photo that overflowed it


def test_files_ditflow_did_not_write_are_never_replaced(tmp_path, capsys):
    """Outputs next to their originals (-o the inputs' own folder, given by glob) and resumes
    with other inputs: any file the manifest does not record as that photo's protection stays
    untouched."""
    folder = tmp_path / "g"
    folder.mkdir()
    Image.fromarray(_rgb(20, 20, 1)).save(folder / "holiday.jpg", quality=95)
    Image.fromarray(_rgb(20, 20, 2)).save(folder / "holiday.png")  # another original
    before = (folder / "holiday.png").read_bytes()
    assert main(["protect", str(folder / "*.jpg"), "-o", str(folder), *FAST]) == 1
    assert "exists and is no protected photo" in capsys.readouterr().err
    assert (folder / "holiday.png").read_bytes() == before

    cams, out = [tmp_path / "cam1", tmp_path / "cam2"], tmp_path / "out"
    for seed, cam in enumerate(cams):  # camera file names repeat
        cam.mkdir()
        Image.fromarray(_rgb(20, 20, seed)).save(cam / "IMG_0001.png")
    assert main(["protect", str(cams[0]), "-o", str(out), *FAST]) == 0
    protected = (out / "IMG_0001.png").read_bytes()
    assert main(["protect", str(cams[1]), "-o", str(out), "--resume", *FAST]) == 1
    assert f"is the protected photo of {cams[0] / 'IMG_0001.png'}" in capsys.readouterr().err
    assert (out / "IMG_0001.png").read_bytes() == protected
    assert main(["protect", str(cams[0]), "-o", str(out), "--resume", *FAST]) == 0


def test_jpeg_outputs_are_measured_as_saved(tmp_path):
    src = tmp_path / "a.png"
    pixels = _rgb(24, 24, 3)
    Image.fromarray(pixels).save(src)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), "--format", "jpg", "--epsilon", "4",
                 *FAST]) == 0
    record = _records(out)["a.png"]
    saved = np.asarray(Image.open(out / "a.jpg").convert("RGB")).astype(int)
    assert record["linf"] == np.abs(saved - pixels.astype(int)).max()  # JPEG may pass epsilon
    assert record["psnr"] == pytest.approx(psnr(pixels, saved.astype(np.uint8)))


def test_awkward_file_names_are_protected_and_failures_name_their_photo(tmp_path, monkeypatch,
                                                                       capsys):
    from ditflow.methods.decontext import Protector

    src = tmp_path / "in"
    src.mkdir()
    names = [os.fsdecode(b"caf\xe9.png"), "L" * 240 + ".png", "b.png"]  # not UTF-8; 244 bytes
    for seed, name in enumerate(names):
        Image.fromarray(_rgb(20, 20, seed)).save(src / name)
    (src / "link.png").symlink_to(src / "b.png")
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), "--batch-size", "2", *FAST]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)  # b.png, not link.png

    def failing(self, names, photos, on_step=None):
        raise RuntimeError("out of something")

    monkeypatch.setattr(Protector, "run", failing)
    assert main(["protect", str(src / "b.png"), str(src / names[1]), "-o",
                 str(tmp_path / "again"), "--batch-size", "2", *FAST]) == 1
    errors = {Path(r["input"]).name: r["error"] for r in done_lines(tmp_path / "again")}
    assert all(error.startswith(f"{src / name}: protection failed")
               for name, error in errors.items()) and len(errors) == 2


def test_a_resumed_run_lists_only_its_own_failures(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "deeper").mkdir(parents=True)
    Image.fromarray(_rgb(20, 20)).save(src / "p.png")
    Image.fromarray(_rgb(20, 20, 1)).save(src / "deeper" / "q.png")
    (src / "notes.jpg").write_text("not a photo")
    out = tmp_path / "out"
    assert main(["protect", str(src / "p.png"), str(src / "notes.jpg"), "-o", str(out),
                 *FAST]) == 1
    capsys.readouterr()
    assert main(["protect", str(src / "**" / "q.png"), "-o", str(out), "--resume",
                 *FAST]) == 0  # ** is recursive
    assert "notes.jpg" not in capsys.readouterr().err
    assert (out / "q.png").exists()


def test_manifests_are_standard_json(tmp_path):
    """An unchanged photo's PSNR is infinite: null in the manifest, which JSON readers accept."""
    from ditflow.io import to_json

    assert json.loads(to_json({"psnr": float("inf"), "x": [float("nan"), 1.5]})) == {
        "psnr": None, "x": [None, 1.5]}


def test_model_folders_resume_however_they_are_written(tmp_path, monkeypatch):
    from ditflow.cli import _model_id

    (tmp_path / "kontext").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _model_id("kontext") == _model_id("./kontext/") == str(tmp_path / "kontext")
    assert _model_id("tiny") == "tiny"


def test_refused_default_blocks_are_not_blamed_on_the_option():
    from argparse import Namespace

    from ditflow.cli import _blocks_named_by_option
    from ditflow.models import UnknownBlocks

    error = UnknownBlocks("ProtectConfig.blocks", ["single.10"], ["single.0", "single.1"])
    assert _blocks_named_by_option(error, Namespace(blocks="single.10")).startswith("--blocks:")
    message = _blocks_named_by_option(error, Namespace(blocks=None))
    assert message.startswith("the default blocks") and message.endswith("with --blocks")


@pytest.mark.parametrize("option", ["--eot-jpeg", "--eot-resize"])
def test_eot_ranges_must_be_ordered(option, tmp_path, capsys):
    low_high = ["0.9", "0.5"] if option == "--eot-resize" else ["95", "60"]
    with pytest.raises(SystemExit):
        main(["protect", str(tmp_path), "-o", str(tmp_path / "out"), option, *low_high])
    assert "LOW must not exceed HIGH" in capsys.readouterr().err
