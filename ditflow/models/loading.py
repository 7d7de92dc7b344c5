"""Loading real pipelines from a local directory (never from a hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Components a diffusers FLUX pipeline folder must hold (model_index.json names them).
FLUX_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                   "tokenizer_2", "transformer")
PIPELINES = {"kontext": "FluxKontextPipeline", "t2i": "FluxPipeline"}


def missing_components(path: Path) -> list[str]:
    """What a diffusers pipeline folder lacks: model_index.json and component folders."""
    if not (path / "model_index.json").is_file():
        return ["model_index.json"]
    index = json.loads((path / "model_index.json").read_text())
    wanted = [name for name in FLUX_COMPONENTS if index.get(name, [None, None])[0] is not None]
    return [f"{name}/" for name in wanted if not (path / name).is_dir()]


def load_flux_pipeline(path: str | Path, kind: str = "kontext",
                       dtype: torch.dtype = torch.bfloat16):
    """FLUX.1 Kontext (``kind="kontext"``) or FLUX.1 (``"t2i"``) from a local diffusers folder,
    with ``local_files_only=True``. Errors name the folder and what is missing."""
    import diffusers

    if kind not in PIPELINES:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(PIPELINES)}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a diffusers pipeline folder, "
                                "e.g. a local copy of black-forest-labs/FLUX.1-Kontext-dev)")
    missing = missing_components(path)
    if missing:
        raise FileNotFoundError(f"{path} is not a complete diffusers pipeline folder; missing: "
                                f"{', '.join(missing)}")
    pipeline_class = getattr(diffusers, PIPELINES[kind])
    return pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True)
