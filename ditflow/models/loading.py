"""Loading real pipelines from a local directory (never from a hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FLUX_PIPELINES = {"kontext": "FluxKontextPipeline", "t2i": "FluxPipeline"}
QWEN_PIPELINES = {"edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline",
                  "t2i": "QwenImagePipeline"}


def missing_components(path: Path, given: tuple[str, ...] = ()) -> list[str]:
    """What a diffusers pipeline folder lacks: model_index.json and the folders of the
    components it names (except components ``given`` by the caller and optional ones listed
    as null)."""
    if not (path / "model_index.json").is_file():
        return ["model_index.json"]
    index = json.loads((path / "model_index.json").read_text())
    wanted = [name for name, entry in index.items()
              if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
              and name not in given]
    return [f"{name}/" for name in wanted if not (path / name).is_dir()]


def _load_local(path: str | Path, pipeline_name: str, example: str, dtype: torch.dtype,
                components: dict | None = None):
    import diffusers

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a diffusers pipeline folder, "
                                f"e.g. a local copy of {example})")
    components = components or {}
    missing = missing_components(path, tuple(components))
    if missing:
        raise FileNotFoundError(f"{path} is not a complete diffusers pipeline folder; missing: "
                                f"{', '.join(missing)}")
    held = json.loads((path / "model_index.json").read_text()).get("_class_name")
    if held is not None and held != pipeline_name:
        raise ValueError(f"{path} holds a {held}; this needs a {pipeline_name}")
    pipeline_class = getattr(diffusers, pipeline_name)
    return pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **components)


def _pipeline_name(kind: str, pipelines: dict[str, str]) -> str:
    if kind not in pipelines:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(pipelines)}")
    return pipelines[kind]


# The in-context editors ditflow protects against, by pipeline class.
EDITORS = ("FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def load_editor(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The in-context editor in a local diffusers folder, FLUX.1 Kontext or Qwen-Image-Edit
    (-2509/2511), chosen by its model_index.json; an error names what the folder holds
    otherwise."""
    index = Path(path).expanduser() / "model_index.json"
    # without a model_index.json the loader explains what is missing
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else EDITORS[0]
    if name not in EDITORS:
        raise ValueError(f"{path} holds a {name}; ditflow's editors are {', '.join(EDITORS)}")
    return _load_local(path, name, "black-forest-labs/FLUX.1-Kontext-dev or Qwen/Qwen-Image-Edit",
                       dtype)


def load_flux_pipeline(path: str | Path, kind: str = "kontext",
                       dtype: torch.dtype = torch.bfloat16):
    """FLUX.1 Kontext (``kind="kontext"``) or FLUX.1 (``"t2i"``) from a local diffusers folder,
    with ``local_files_only=True``. Errors name the folder and what is missing."""
    return _load_local(path, _pipeline_name(kind, FLUX_PIPELINES),
                       "black-forest-labs/FLUX.1-Kontext-dev", dtype)


def load_qwen_pipeline(path: str | Path, kind: str = "edit", dtype: torch.dtype = torch.bfloat16,
                       **components):
    """Qwen-Image-Edit (``kind="edit"``), Qwen-Image-Edit-2509/2511 (``"edit-plus"``: several
    input images) or Qwen-Image (``"t2i"``) from a local diffusers folder, with
    ``local_files_only=True``. ``components`` replace loaded ones: ``text_encoder=None,
    tokenizer=None, processor=None`` skips the 7B Qwen2.5-VL encoder when you call the pipeline
    with precomputed ``prompt_embeds``. Errors name the folder and what is missing."""
    return _load_local(path, _pipeline_name(kind, QWEN_PIPELINES), "Qwen/Qwen-Image-Edit", dtype,
                       components)
